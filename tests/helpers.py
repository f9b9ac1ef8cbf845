"""Small float64 problems shared by the meta-gradient tests."""
import torch
import torch.nn as nn


def tiny_bn_net():
    """Linear(5, 6) -> BatchNorm1d -> tanh -> Linear(6, 3), float64, fixed initial weights."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


def weighted_problem():
    """A training batch (8 examples) and a meta batch (6), 5 features, 3 classes, float64."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(3, (8,), generator=g)
    xm, ym = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(3, (6,), generator=g)
    return x, y, xm, ym


class Killed(Exception):
    """Raised by a `kill_at` callback: stops a training run mid-way, as a killed process would."""


def kill_at(step: int):
    """An on_step callback that raises Killed once `step` steps have run."""
    def on_step(done, *_):
        if done == step:
            raise Killed
    return on_step


def same_time_budget(out, target: str, seed: int = 0) -> tuple[float, float, float]:
    """(epochs bought, epochs trained, ratio) of `baseline_same_time` in run directory `out`: the
    target's finished steps times the step-cost ratio timed side by side, its one-off stage
    included (train.arm_seed_config's rule), against the epochs the arm's record trained for."""
    import json
    from pathlib import Path

    runs = Path(out) / "runs"
    target_run = json.loads((runs / f"{target}-seed{seed}.json").read_text())
    same = json.loads((runs / f"baseline_same_time-seed{seed}.json").read_text())["config"]
    cost, ratio = target_run["cost"], same["same_time_ratio"]
    train_s, one_off_s = ((cost["train_cpu_seconds"], cost.get("one_off_cpu_seconds"))
                          if cost.get("train_cpu_seconds") is not None else (cost["train_seconds"], cost.get("one_off_seconds")))
    steps = ratio * cost["steps"] * (1 + (one_off_s or 0.0) / train_s)
    return target_run["config"]["epochs"] * steps / cost["steps"], same["epochs"], ratio
