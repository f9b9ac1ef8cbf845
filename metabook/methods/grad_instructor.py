"""Grad-Instructor (Ino 2024, arXiv 2406.10559): an evaluation network (ENN, enn.py) steers
backpropagation. The update [R]: loss = CE(f_W(x), y) - w(t) E(render(W)), E the ENN (fitted per
seed in prepare(), cached in OUT/cache/), w(t) = gi.weight * schedule(t / T); with gi.refit_every
> 0 the ENN is refitted on short episodes from the target's current weights. Arms: `baseline`,
`l1`, `he_init`, `grad_instructor` and `gi_init_critic` (episodes from initialisation only); each
reports its train-test gap, the GI arms their critic's calibration. [A]: the abstract, [R]: ours.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, knob, section
from ..data import Batch
from ..train import Arm, Experiment, per_example, run_experiment
from .baseline import Baseline, set_lr
from .enn import (ENN, Trajectory, collect_episodes, enn_config_key, episodes_per_round, fit_enn, he_init_,
                  load_or_train_enn, render_model, reward_examples, weight_matrices)

SCHEDULES = ("constant", "linear_decay", "cosine_decay")


def weight_schedule(kind: str, t: float) -> float:
    """The ENN term's multiplier at training progress t in [0, 1]."""
    if kind == "constant":
        return 1.0
    if kind == "linear_decay":
        return max(1.0 - t, 0.0)
    if kind == "cosine_decay":
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    raise ValueError(f"unknown gi.schedule {kind!r}; choose one of: {', '.join(SCHEDULES)}")


@torch.no_grad()
def train_test_gap(model: nn.Module, streams, n: int = 5000) -> dict:
    """Accuracy (eval mode, no augmentation) on the first n training images and on the test split."""
    train = per_example(model, streams.in_order("train", n))[0].double().mean().item()
    test = per_example(model, streams.in_order("test"))[0].double().mean().item()
    return {"train_acc_eval": train, "test_acc": test, "gap": train - test}


class PlainBP(Baseline):
    """Plain backprop (the `baseline` arm): the MLP's default init; reports the train-test gap."""

    def extras(self, streams) -> dict:
        return train_test_gap(self.model, streams)


class HeInit(PlainBP):
    """Backprop from He (Kaiming-normal, fan_in, ReLU) initial weights, zero biases."""

    name = "he_init"

    def setup(self, ctx) -> None:
        he_init_(ctx.model)             # the global RNG: run_arms seeds it before every arm
        super().setup(ctx)


class L1Reg(PlainBP):
    """Backprop + L1 on the weight matrices: loss = CE + gi.l1 * sum_l |W_l|_1."""

    name = "l1"

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.c = section(cfg, GI)

    def step(self, batch: Batch, meta_batch, lr: float) -> dict:
        set_lr(self.opt, lr)
        with self.autocast():
            logits = self.model(batch.x)
        ce = F.cross_entropy(logits.float(), batch.y, label_smoothing=self.label_smoothing)
        penalty = sum(w.abs().sum() for w in weight_matrices(self.model))
        self.descend(ce + self.c.l1 * penalty)
        return {"loss": ce.detach(), "l1_norm": penalty.detach(), "acc": (logits.argmax(1) == batch.y).float().mean()}


class GradInstructor(PlainBP):
    """p.grad = grad CE - w(t) grad E on the weight matrices (biases: grad CE), E the ENN trained in
    prepare() on this run's split, or the `enn` given (e.g. a recorded one)."""

    name = "grad_instructor"
    # the critic's episodes, and the replays of the target's run (gi.starts=trajectory), as long as the run
    one_off_units = (("gi.episodes", 8), ("epochs", 1.0))

    def __init__(self, cfg: dict, enn: ENN | None = None):
        super().__init__(cfg)
        self.cfg = cfg
        self.c, self.target = section(cfg, GI), {"width": cfg["width"], "depth": cfg["depth"]}   # the MLP's shape
        self.enn_key = enn_config_key(cfg)            # everything the ENN's training reads
        episodes_per_round(self.c)                    # a bad gi.episodes / gi.rounds fails before any arm runs
        self.enn, self.given = enn, enn is not None

    def setup(self, ctx) -> None:
        super().setup(ctx)
        p = next(ctx.model.parameters())
        enn = self.enn if self.given else ENN(len(weight_matrices(ctx.model)), self.c.enn_channels)
        self.enn = enn.to(device=p.device, dtype=p.dtype).requires_grad_(False).eval()
        self.enn_info, self.value0, self.steps, self.refits = {}, float("nan"), 0, []

    def prepare(self) -> None:
        """Train this seed's ENN (or load it from the run's cache); note its initial prediction."""
        if not self.given:
            enn, self.enn_info = load_or_train_enn(self.c, self.enn_key, self.ctx.streams, self.ctx.num_classes,
                                                   self.ctx.seed, self.ctx.cache_dir, **self.target,
                                                   target_cfg=self.cfg, total_steps=self.ctx.total_steps,
                                                   init_state=self.model.state_dict())
            self.enn.load_state_dict(enn.state_dict())
        self.value0 = self.value()

    def w(self) -> float:
        return self.c.weight * weight_schedule(self.c.schedule, self.steps / self.ctx.total_steps)

    def value(self) -> float:
        with torch.no_grad():
            return self.enn(render_model(self.model, self.c)[None])[0].item()

    def step(self, batch: Batch, meta_batch, lr: float) -> dict:
        """One descent on CE - w(t) E(render(W)) (with gi.refit_every, after an online refit every that
        many steps): the ENN is frozen in the step and reads the weight matrices only, so the weights
        get grad CE - w grad E and the biases grad CE. The network's forward
        runs in mixed precision when cfg['amp'] asks; the rendering and the ENN in fp32."""
        if self.c.refit_every and self.steps and self.steps % self.c.refit_every == 0:
            self.refit()
        set_lr(self.opt, lr)
        with self.autocast():
            logits = self.model(batch.x)
        ce = F.cross_entropy(logits.float(), batch.y, label_smoothing=self.label_smoothing)
        value = self.enn(render_model(self.model, self.c)[None])[0]
        w = self.w()
        self.descend(ce - w * value)
        self.steps += 1
        return {"loss": ce.detach(), "acc": (logits.argmax(1) == batch.y).float().mean(),
                "enn_value": value.detach(), "gi_weight": w}

    def refit(self) -> None:
        """The online refit [R]: gi.refit_episodes episodes of gi.episode_steps steps, all starting from
        the target's current weights and guided by the current ENN (as in the later rounds of its
        training), then gi.refit_iters Adam iterations of the ENN's fit on those episodes alone, so the
        critic learns what its guidance does where the target is now. Its own streams
        ("episode-{round}-{e}", rounds after the training's) and RNG: a resumed run repeats it bit for bit.
        Logs the critic's prediction for the current weights before and after, and their reward accuracy."""
        c, ctx, t0 = self.c, self.ctx, time.perf_counter()
        round_ = c.rounds - 1 + self.steps // c.refit_every         # after the rounds of train_enn
        reward = reward_examples(c, ctx.streams)
        here = Trajectory([self.steps], [{n: v.detach().clone() for n, v in self.model.state_dict().items()}],
                          [], ctx.total_steps)
        before = self.value()
        device = reward.y.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            eps = collect_episodes(dataclasses.replace(c, init_share=0.0), self.target["width"], self.target["depth"],
                                   ctx.streams, reward.x, reward.y, ctx.num_classes, c.refit_episodes,
                                   ctx.seed + c.enn_seed, enn=self.enn, round_=round_, trajectory=here)
            self.enn.requires_grad_(True).train()
            fit_enn(self.enn, eps.states, eps.accs, objective=c.enn_objective, gamma=c.gamma, lam=c.lam,
                    iters=c.refit_iters, lr=c.enn_lr, batch=c.enn_batch, refresh=c.refresh,
                    seed=ctx.seed + c.enn_seed + round_, init_bias=False, conservative=c.conservative,
                    conservative_step=c.conservative_step)
            self.enn.requires_grad_(False).eval()
        self.refits.append({"step": self.steps, "pred_before": before, "pred_after": self.value(),
                            "real": eps.accs[0, 0].item(), "diverged": eps.diverged,
                            "seconds": time.perf_counter() - t0})

    def diagnostics(self, streams) -> dict:
        """||w(t) grad E|| / ||grad CE|| over the weight matrices, on the first training batch (eval mode),
        and the calibration pair: the ENN's prediction for the current weights (`enn_now`) and their
        accuracy on the critic's own reward images, the meta split (`reward_acc`)."""
        reward = reward_examples(self.c, streams)
        with torch.no_grad():
            was = self.model.training
            self.model.eval()
            reward_acc = (self.model(reward.x).argmax(1) == reward.y).float().mean().item()
            enn_now = self.value()
            self.model.train(was)
        b = streams.examples("train", 0, streams.batch_size())
        weights, was = weight_matrices(self.model), self.model.training
        self.model.eval()
        with torch.enable_grad():
            ce = F.cross_entropy(self.model(b.x), b.y, label_smoothing=self.label_smoothing)
            g_ce = torch.autograd.grad(ce, weights)
            g_enn = torch.autograd.grad(self.enn(render_model(self.model, self.c)[None])[0], weights)
        self.model.train(was)
        norm = lambda gs: torch.sqrt(sum((g * g).sum() for g in gs))
        return {"enn_grad_ratio": (self.w() * norm(g_enn) / norm(g_ce).clamp_min(1e-30)).item(),
                "enn_now": enn_now, "reward_acc": reward_acc}

    def extras(self, streams) -> dict:
        quality = {f"enn_{k}": v for k, v in self.enn_info.items()
                   if k in ("seconds", "episodes", "sgd_steps", "spearman_initial", "spearman_all", "final_mae")}
        refits = {"enn_refits": self.refits} if self.refits else {}
        return {**super().extras(streams), "enn_value_initial": self.value0, "enn_value_final": self.value(),
                **quality, **refits, "enn": self.enn_info}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "enn": self.enn.state_dict(), "enn_info": self.enn_info,
                "value0": self.value0, "steps": self.steps, "refits": self.refits}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.enn.load_state_dict(state["enn"])
        self.enn_info, self.value0, self.steps = state["enn_info"], state["value0"], state["steps"]
        self.refits = state.get("refits", [])


# ----------------------------------------------------------------------------- config and the chapter

@dataclass
class GI:
    """Grad-Instructor (keys gi.*): the ENN term, the `l1` arm, and the ENN's rendering, episodes and fit."""
    prefix: ClassVar[str] = "gi"
    weight: float = knob(0.1, "w: the ENN term's weight in CE - w(t) E(render(W)) [R]", ">= 0")
    schedule: str = knob("constant", "w(t) = w * schedule(t / T)", choices=SCHEDULES)
    canvas: int = knob(64, "a weight matrix is first resized to canvas x canvas [R]", ">= 1")
    resolution: float = knob(0.15, "then down-sampled by this factor per side (0.15^2 of the pixels [A])",
                             "in (0, 1]")
    l1: float = knob(1e-5, "L1 coefficient of the `l1` arm [R]", ">= 0")
    enn_objective: str = knob("rl", "the ENN's target: rl (TD(lambda) value of the accuracies) | regression "
                              "(the snapshot's accuracy)", choices=("rl", "regression"))
    gamma: float = knob(1.0, "discount: 1 = predict the final accuracy, 0 = the next snapshot's", "in [0, 1]")
    lam: float = knob(0.8, "TD(lambda): 1 = Monte-Carlo returns, 0 = TD(0)", "in [0, 1]")
    starts: str = knob("trajectory", "where the ENN's episodes start: trajectory (weights saved along a full-length "
                       "run of the target per round: the baseline's, then the one the current ENN guides; and a "
                       "gi.init_share of fresh inits) | init (fresh inits only)",
                       choices=("trajectory", "init"))
    start_points: int = knob(8, "trajectory states saved, at steps round(k T / gi.start_points), k = 0..", ">= 1")
    init_share: float = knob(0.25, "with starts=trajectory: share of episodes from a fresh init (He x gain)", "in [0, 1]")
    episodes: int = knob(160, "short target trainings for the ENN (incl. held-out ones)",
                         ">= 3 (and >= 2 * gi.rounds: some are held out)")
    rounds: int = knob(3, "collect-and-fit rounds; rounds > 0 follow the current ENN", ">= 1")
    holdout: float = knob(0.25, "fraction of each round's episodes held out to measure the ENN (Spearman)",
                          "in (0, 1)")
    episode_steps: int = knob(40, "SGD steps per episode", ">= 1")
    snapshot_every: int = knob(5, "steps between states (K = episode_steps // snapshot_every)", ">= 1")
    eval_size: int = knob(500, "meta-split images behind each snapshot's accuracy (the reward)", ">= 1")
    gain_min: float = knob(0.2, "behaviour policy: lowest init gain (x He std; log-uniform)", "> 0")
    gain_max: float = knob(2.0, "behaviour policy: highest init gain", "> 0")
    lr_min: float = knob(0.003, "behaviour policy: lowest learning rate (log-uniform)", "> 0")
    lr_max: float = knob(0.1, "behaviour policy: highest learning rate", "> 0")
    enn_channels: int = knob(8, "conv channels per weight image in the ENN", ">= 1")
    enn_iters: int = knob(600, "Adam iterations fitting the ENN (per round)", ">= 1")
    enn_lr: float = knob(3e-3, "Adam learning rate of the ENN's fit", "> 0")
    enn_batch: int = knob(64, "states per minibatch of the ENN's fit", ">= 1")
    refresh: int = knob(25, "iterations between TD(lambda) target refreshes", ">= 1")
    conservative: float = knob(0.0, "alpha of a conservative ENN fit: + alpha (E(x') - E(x)), x' = x one step up the "
                               "ENN's gradient (COMs, Trabucco et al. 2021) [R]; 0 = the plain fit", ">= 0")
    conservative_step: float = knob(0.1, "that step's length, as a fraction of the state's norm", "> 0")
    refit_every: int = knob(0, "steps of the target between online refits of its critic on episodes from its "
                            "current weights (GradInstructor.refit) [R]; 0 = a frozen critic", ">= 0")
    refit_episodes: int = knob(8, "episodes per online refit, each gi.episode_steps steps from the current weights",
                               ">= 2")
    refit_iters: int = knob(100, "Adam iterations of each online refit, on that refit's episodes only", ">= 1")
    enn_seed: int = knob(0, "added to the run's seed: the ENN's episodes and init (one ENN per seed)", ">= 0")
    same_time: bool = knob(True, "also run the baseline for grad_instructor's wall-clock")
    arms: list[str] = knob(["baseline", "l1", "he_init", "grad_instructor", "gi_init_critic"],
                           "arms to run: baseline and grad_instructor are required",
                           choices=("baseline", "l1", "he_init", "grad_instructor", "gi_init_critic"))


SECTIONS = (GI,)
DEFAULTS: dict = {
    # the target: an MLP on flattened CIFAR-10 (the abstract's targets are MLPs [A]; sizes [R])
    "model": "mlp", "width": 256, "depth": 2,
    "augment": False,              # plain MLP training, so the train-test gap is visible
    "weight_decay": 0.0,           # "plain backprop": no regulariser; L1 is its own arm
    "lr": 0.05,
}
PRESETS: dict = {
    # CI: seconds of training (62 steps per arm) and a tiny ENN (24 episodes of 20 steps, 2 rounds).
    "smoke": {"train_size": 4000, "meta_size": 500, "width": 128, "epochs": 2.0, "checkpoint_every": 50,
              "gi.episodes": 24, "gi.rounds": 2, "gi.episode_steps": 20, "gi.enn_iters": 150},
    # 2 cores, 3 seeds: 2,340 steps per arm. Measured on one loaded core (width 256, batch 128): plain step
    # 13-14 ms, Grad-Instructor step 13-31 ms, ENN episode 0.4-0.75 s. Estimate per seed: its ENN 1-2 min +
    # ~3.5 min for the five arms + baseline_same_time's share of the ENN's time -> about 18-20 min (not re-measured).
    "cpu": {"train_size": 20000, "epochs": 15.0, "gi.episodes": 160},
    # The verdict's record (issue 19): the cpu budget with 5 seeds and the baseline at 30 epochs beside it.
    "converged": {"train_size": 20000, "epochs": 15.0, "gi.episodes": 160},
    "gpu": {"width": 1024, "depth": 3, "epochs": 30.0, "gi.episodes": 400, "gi.episode_steps": 100,
            "gi.snapshot_every": 10, "gi.enn_iters": 2000},
    "paper": {"width": 1024, "depth": 3, "epochs": 100.0, "gi.episodes": 2000, "gi.episode_steps": 200,
              "gi.snapshot_every": 20, "gi.enn_iters": 5000},
}


ARMS = {"baseline": Arm(PlainBP), "l1": Arm(L1Reg), "he_init": Arm(HeInit), "grad_instructor": Arm(GradInstructor),
        "gi_init_critic": Arm(GradInstructor, {"gi.starts": "init"})}     # the control: issue 18's critic
GI_ARMS = ("grad_instructor", "gi_init_critic")


def calibration(history: list[dict]) -> dict:
    """The critic's calibration along a target run, from its evaluation rows: mean |ENN prediction -
    reward-split accuracy| over all rows and over the second half of training, and the last row's pair."""
    rows = [h for h in history if "enn_now" in h and "reward_acc" in h]
    if not rows:
        return {}
    err = np.array([h["enn_now"] - h["reward_acc"] for h in rows])
    late = err[len(err) // 2:]
    return {"mae": float(np.abs(err).mean()), "late_mae": float(np.abs(late).mean()), "bias": float(err.mean()),
            "final_pred": rows[-1]["enn_now"], "final_real": rows[-1]["reward_acc"], "evaluations": len(rows)}


def experiments(cfg: dict) -> list[Experiment]:
    names = cfg["gi.arms"]
    if "baseline" not in names or "grad_instructor" not in names:
        raise ConfigError(f"gi.arms={','.join(names)}: baseline and grad_instructor are required")
    return [Experiment("grad_instructor", "grad_instructor", {n: ARMS[n] for n in ARMS if n in names}, cfg,
                       same_time_for="grad_instructor" if cfg["gi.same_time"] else None)]


def run(cfg: dict, seeds: list[int], out_dir=None, progress: bool = True, dataset=None) -> dict:
    """The ARMS at equal epochs and seeds (with gi.same_time also the baseline at grad_instructor's
    wall-clock, its ENN included); each seed's ENN info goes to record["enn"][seed]."""
    record = run_experiment(experiments(cfg)[0], seeds, out_dir=out_dir, progress=progress, dataset=dataset)
    arm = record["arms"]["grad_instructor"]
    for name in GI_ARMS:            # the ENN infos leave the extras; the control's under its arm's name
        if name in record["arms"]:
            infos = {seed: ex.pop("enn") for seed, ex in record["arms"][name]["extras"].items()}
            if name == "grad_instructor":
                record["enn"] = infos
            else:
                record.setdefault("enn_by_arm", {})[name] = infos
            record.setdefault("calibration", {})[name] = {
                seed: calibration(hist) for seed, hist in record["arms"][name]["history"].items()}
    record["cost"]["enn_seconds"] = record["metrics"]["enn_seconds"] = arm["one_off_seconds"]["mean"]
    for name, cal in record.get("calibration", {}).items():
        if values := [c["late_mae"] for c in cal.values() if c]:
            record["metrics"][f"{name}_late_calibration_mae"] = float(np.mean(values))
    for key in ("spearman_initial", "spearman_all"):
        if values := [info[key] for info in record["enn"].values() if key in info]:
            record["metrics"][f"enn_{key}"] = float(np.mean(values))
    for arm in record["arms"].values():
        if gaps := [e["gap"] for e in arm.get("extras", {}).values() if "gap" in e]:
            arm["gap"] = {"mean": float(np.mean(gaps)), "per_seed": gaps}
    return record
