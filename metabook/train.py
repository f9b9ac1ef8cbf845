"""The one training loop. Every method (the baseline and the five meta-learning methods) plugs in.

A method is a small object with four functions (see `Method`). The loop owns everything else:
data order, the learning-rate schedule, evaluation, history, progress bar, per-step timing,
NaN checks, checkpoints and resume. So the numbers and costs of all methods are comparable
line for line.
"""
from __future__ import annotations

import math
import os
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .config import pick_device
from .data import (Batch, Dataset, DeviceLoader, class_skewed_weights, corrupt_labels, load_dataset,
                   parse_classes, split_train_meta, target_subset)
from .models import build_model


class Method(Protocol):
    name: str
    uses_meta: bool          # does step() need a batch from the held-out meta split?

    def setup(self, model: torch.nn.Module, data: "RunData", cfg: dict) -> None: ...
    def step(self, batch: Batch, meta_batch: Batch | None, lr: float) -> dict[str, float]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class NonFiniteError(FloatingPointError):
    """A loss or meta-gradient became NaN/inf. The message names the step and the quantity."""


class RunError(RuntimeError):
    """A run cannot start or go on because of its state on disk (a checkpoint or finished run of
    another config, a corrupt state file, an unwritable or locked output folder, a full disk).
    The message is one line naming the file and the fix."""


# ----------------------------------------------------------------------------- data for one run

@dataclass
class RunData:
    dataset: Dataset
    train: DeviceLoader          # shuffled, augmented
    meta: DeviceLoader           # the held-out split, shuffled, not augmented (meta batches)
    val: DeviceLoader            # the held-out split, in order (validation accuracy)
    test: DeviceLoader
    train_idx: torch.Tensor      # positions of the train split in dataset.x_train
    meta_idx: torch.Tensor
    corrupted: torch.Tensor      # (len(train_idx),) bool: which training labels were corrupted
    info: dict = field(default_factory=dict)
    target_probs: torch.Tensor | None = None   # (C,) target class distribution (personalization)
    train_prior: torch.Tensor | None = None    # (C,) class frequencies of the (noisy) training labels


def prepare_data(cfg: dict, seed: int, device: torch.device, dataset: Dataset | None = None) -> RunData:
    """Load the dataset, split train/meta by seed, corrupt training labels if asked, build loaders."""
    ds = dataset or load_dataset(cfg["dataset"])
    train_idx, meta_idx = split_train_meta(ds.y_train, cfg["meta_size"], cfg["train_size"], seed)
    favoured = parse_classes(cfg["target.classes"], ds.num_classes)
    target_probs = None
    if favoured:      # personalization: the meta split follows the target distribution instead
        target_probs = class_skewed_weights(ds.num_classes, favoured, cfg["target.ratio"])
        is_train = torch.zeros(len(ds.y_train), dtype=torch.bool)
        is_train[train_idx] = True
        pool = torch.nonzero(~is_train).flatten()
        meta_idx = pool[target_subset(ds.y_train[pool], target_probs, cfg["meta_size"], seed)]
    y_train, corrupted = corrupt_labels(ds.y_train[train_idx], cfg["noise.kind"], cfg["noise.rate"],
                                        ds.num_classes, seed)
    n_test = cfg["test_size"] or len(ds.y_test)
    common = dict(device=device, channels_last=cfg["channels_last"])
    bs = cfg["batch_size"]
    train = DeviceLoader(ds.x_train[train_idx], y_train, bs, train=True, seed=seed,
                         augment=cfg["augment"], **common)
    meta = DeviceLoader(ds.x_train[meta_idx], ds.y_train[meta_idx], min(bs, max(len(meta_idx), 1)),
                        train=True, seed=seed + 7919, augment=False, **common)
    val = DeviceLoader(ds.x_train[meta_idx], ds.y_train[meta_idx], 500, train=False, **common)
    test = DeviceLoader(ds.x_test[:n_test], ds.y_test[:n_test], 500, train=False, **common)
    info = {**ds.describe(), "train_size": len(train_idx), "meta_size": len(meta_idx),
            "test_size": n_test, "noise": {"kind": cfg["noise.kind"], "rate": cfg["noise.rate"],
                                           "corrupted": int(corrupted.sum())}}
    train_prior = None
    if target_probs is not None:
        info["target"] = {"classes": favoured, "ratio": cfg["target.ratio"], "probs": target_probs.tolist()}
        train_prior = torch.bincount(y_train, minlength=ds.num_classes).float() / len(y_train)
    return RunData(ds, train, meta, val, test, train_idx, meta_idx, corrupted, info,
                   target_probs=target_probs, train_prior=train_prior)


def make_model(cfg: dict, num_classes: int, device: torch.device) -> torch.nn.Module:
    model = build_model(cfg["model"], num_classes, cfg["width"], cfg["depth"], cfg["batchnorm"]).to(device)
    return model.to(memory_format=torch.channels_last) if cfg["channels_last"] else model


# ----------------------------------------------------------------------------- helpers

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, cfg: dict) -> float:
    """The learning rate of `step` (0-based) out of `total` steps."""
    peak, kind = cfg["lr"], cfg["schedule"]
    if kind == "constant":
        return peak
    t = step / max(total, 1)
    warm = cfg["warmup"]
    if t < warm:
        return peak * (0.1 + 0.9 * t / warm)
    rest = (t - warm) / max(1 - warm, 1e-12)
    if kind == "onecycle":
        return peak * max(1.0 - rest, 0.0)
    return peak * 0.5 * (1 + math.cos(math.pi * rest))             # cosine


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DeviceLoader) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) over a whole split, in eval mode."""
    was_training = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for batch in loader.epoch(0):
        logits = model(batch.x)
        loss += F.cross_entropy(logits, batch.y, reduction="sum").item()
        correct += (logits.argmax(1) == batch.y).sum().item()
        n += len(batch.y)
    model.train(was_training)
    return correct / max(n, 1), loss / max(n, 1)


@torch.no_grad()
def target_accuracy(model: torch.nn.Module, loader: DeviceLoader, probs: torch.Tensor,
                    train_prior: torch.Tensor) -> tuple[float, float]:
    """Expected accuracy under a target class distribution `probs` (C,): sum_c probs_c * acc_c,
    from the per-class accuracies acc_c on a (balanced) test split. Returns (as trained, with
    the free prior correction: logits + log(probs / train_prior), Bayes' rule for a label shift)."""
    was_training = model.training
    model.eval()
    c = len(probs)
    shift = (probs / train_prior.cpu().clamp_min(1e-12)).log().to(loader.y.device)
    hits = torch.zeros(2, c, device=loader.y.device)
    counts = torch.zeros(c, device=loader.y.device)
    for batch in loader.epoch(0):
        logits = model(batch.x)
        counts += torch.bincount(batch.y, minlength=c)
        for row, out in enumerate((logits, logits + shift)):
            hits[row] += torch.bincount(batch.y, weights=(out.argmax(1) == batch.y).float(), minlength=c)
    model.train(was_training)
    acc = (hits / counts.clamp_min(1)).cpu() @ probs
    return float(acc[0]), float(acc[1])


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS"


def check_finite(metrics: dict, step: int) -> None:
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise NonFiniteError(f"step {step}: {key} is {value} — the run diverged "
                                 f"(try a lower lr); stopped instead of training on")


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the loop

def train(method: Method, model: torch.nn.Module, data: RunData, cfg: dict, *, seed: int = 0,
          out_dir: str | Path | None = None, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None, desc: str | None = None) -> dict:
    """Train `model` with `method` for cfg['epochs'] epochs of data.train. Returns a dict with
    metrics, history and cost (seconds per step, peak memory).

    With `out_dir`, a checkpoint is written every cfg['checkpoint_every'] steps to
    out_dir/checkpoint.pt, and a run that finds one (same config and seed) resumes from it and
    ends with the same numbers as an uninterrupted run. `on_step(step, metrics)` is called after
    every step (tests use it to interrupt a run).
    """
    import warnings

    from tqdm import TqdmWarning
    with warnings.catch_warnings():          # without ipywidgets, tqdm.auto falls back to text
        warnings.simplefilter("ignore", TqdmWarning)
        from tqdm.auto import tqdm

    device = next(model.parameters()).device
    spe = len(data.train)
    if spe == 0:
        raise ValueError(f"the train split ({len(data.train.y)} images) is smaller than one batch "
                         f"({data.train.batch_size})")
    total = max(1, math.ceil(cfg["epochs"] * spe))
    eval_steps = max(1, round(cfg["eval_every"] * spe))
    method.setup(model, data, cfg)

    step, history, elapsed, step_times = 0, [], 0.0, []
    running = {"loss": 0.0, "acc": 0.0, "n": 0}
    ckpt_path = Path(out_dir) / "checkpoint.pt" if out_dir else None
    if ckpt_path and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ck["config"] != _comparable(cfg) or ck["seed"] != seed or ck["method"] != method.name:
            raise ValueError(f"{ckpt_path} belongs to another run (config, seed or method differ); "
                             f"delete it or choose another --out")
        model.load_state_dict(ck["model"])
        method.load_state_dict(ck["method_state"])
        step, history, elapsed, step_times = ck["step"], ck["history"], ck["elapsed"], ck["step_times"]
        running = ck["running"]
        torch.set_rng_state(ck["rng"])
        if device.type == "cuda" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"].cpu(), device)
    else:
        seed_everything(seed)

    stopped = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TqdmWarning)
        bar = tqdm(total=total, initial=step, desc=desc or method.name, disable=not progress,
                   mininterval=2.0, leave=True)
    model.train()
    while step < total:
        epoch, b = divmod(step, spe)
        batch = next(data.train.epoch(epoch, start=b))
        meta_batch = _meta_batch_at(data.meta, step) if method.uses_meta else None
        lr = lr_at(step, total, cfg)
        _sync(device)
        t0 = time.perf_counter()
        metrics = method.step(batch, meta_batch, lr)
        _sync(device)
        dt = time.perf_counter() - t0
        check_finite(metrics, step)
        elapsed += dt
        step_times.append(dt)
        step += 1
        running["loss"] += metrics.get("loss", 0.0)
        running["acc"] += metrics.get("acc", 0.0)
        running["n"] += 1
        bar.update(1)
        if step % eval_steps == 0 or step == total:
            history.append(_eval_row(model, data, step, spe, lr, running, elapsed, metrics))
            running = {"loss": 0.0, "acc": 0.0, "n": 0}
            bar.set_postfix(test_acc=f"{history[-1]['test_acc']:.3f}")
        if on_step:
            on_step(step, metrics)
        if ckpt_path and cfg["checkpoint_every"] and step % cfg["checkpoint_every"] == 0 and step < total:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            _save_atomic({"config": _comparable(cfg), "seed": seed, "method": method.name, "step": step,
                          "model": model.state_dict(), "method_state": method.state_dict(),
                          "history": history, "elapsed": elapsed, "step_times": step_times,
                          "running": running, "rng": torch.get_rng_state(),
                          "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                         ckpt_path)
        if cfg["time_budget_s"] and elapsed >= cfg["time_budget_s"] and step < total:
            history.append(_eval_row(model, data, step, spe, lr, running, elapsed, metrics))
            stopped = f"time budget of {cfg['time_budget_s']} s reached at step {step} of {total}"
            break
    bar.close()

    final = history[-1]
    if ckpt_path and ckpt_path.exists():
        ckpt_path.unlink()
        if not any(ckpt_path.parent.iterdir()):
            ckpt_path.parent.rmdir()
    warm = step_times[min(5, len(step_times) - 1):]          # the first steps include warm-up
    peak, peak_kind = peak_memory_bytes(device)
    return {
        "metrics": {"test_acc": final["test_acc"], "val_acc": final["val_acc"],
                    "test_loss": final["test_loss"], "train_loss": final["train_loss"],
                    **{k: final[k] for k in ("target_acc", "target_acc_prior") if k in final}},
        "history": history,
        "cost": {"steps": step, "epochs": step / spe, "train_seconds": elapsed,
                 "seconds_per_step": float(np.median(warm)), "seconds_per_step_mean": float(np.mean(warm)),
                 "peak_memory_bytes": peak, "peak_memory_kind": peak_kind},
        "stopped_early": stopped,
    }


def _meta_batch_at(loader: DeviceLoader, step: int) -> Batch:
    """The meta batch of a step is a function of the step alone (so resume replays it exactly)."""
    epoch, b = divmod(step, len(loader))
    return next(loader.epoch(epoch, start=b))


def _eval_row(model, data, step, spe, lr, running, elapsed, metrics) -> dict:
    test_acc, test_loss = evaluate(model, data.test)
    val_acc, _ = evaluate(model, data.val) if len(data.val.y) else (float("nan"), None)
    n = max(running["n"], 1)
    row = {"step": step, "epoch": step / spe, "lr": lr, "train_loss": running["loss"] / n,
           "train_acc": running["acc"] / n, "val_acc": val_acc, "test_acc": test_acc,
           "test_loss": test_loss, "elapsed_s": elapsed}
    if data.target_probs is not None:
        row["target_acc"], row["target_acc_prior"] = target_accuracy(model, data.test, data.target_probs,
                                                                     data.train_prior)
    row.update({k: v for k, v in metrics.items() if k not in ("loss", "acc") and isinstance(v, float)})
    return row


def _comparable(cfg: dict) -> dict:
    """The config keys that must match for a checkpoint to be resumed."""
    return {k: v for k, v in cfg.items() if k not in ("checkpoint_every",)}


# ----------------------------------------------------------------------------- arms and seeds

def run_arms(chapter: str, method_arm: str, arms: dict, cfg: dict, seeds: list[int], *,
             out_dir=None, progress: bool = True, dataset: Dataset | None = None,
             same_time_for: str | None = None, arm_configs: dict | None = None,
             reference: str = "baseline") -> dict:
    """Run every arm (name -> factory(cfg) returning a Method) for every seed, same data and budget.

    `method_arm` names the chapter's own method (its metrics become the record's `metrics`);
    `arms[reference]` (normally 'baseline') must exist: every arm's `step_cost_ratio` is its
    seconds per step over the reference's, measured in this same run. `arm_configs` may change keys for one arm (e.g. a
    reference model). With `same_time_for=NAME`, the baseline is also run for the wall-clock that
    arm NAME used (arm `baseline_same_time`). Each finished (arm, seed) is saved under
    out_dir/runs/, so a killed run skips what it already did and resumes the rest from its
    checkpoint.
    """
    from .results import load_result, provenance, seed_stats, write_json

    if reference not in arms:
        raise ValueError(f"run_arms needs a {reference!r} arm: every cost is a ratio to it")
    device = pick_device(cfg["device"])
    dataset = dataset or load_dataset(cfg["dataset"])
    out = Path(out_dir) if out_dir else None
    per_arm: dict[str, list[dict]] = {name: [] for name in arms}
    data_info = None
    order = list(arms) + (["baseline_same_time"] if same_time_for else [])
    for seed in seeds:
        data = prepare_data(cfg, seed, device, dataset)
        data_info = data.info
        for name in order:
            arm_cfg = {**cfg, **(arm_configs or {}).get(name, {})}
            factory = arms.get(name, arms[reference])
            if name == "baseline_same_time":
                budget = per_arm[same_time_for][-1]["cost"]["train_seconds"]
                ref = per_arm[reference][-1]["cost"]            # its mean step time, as the budget counts it
                sps = ref["train_seconds"] / max(ref["steps"], 1)
                arm_cfg["epochs"] = max(budget / sps / len(data.train), 1 / len(data.train))
                arm_cfg["time_budget_s"] = budget
                per_arm.setdefault(name, [])
            done = out / "runs" / f"{name}-seed{seed}.json" if out else None
            if done and done.exists():
                finished, config = load_result(done), _comparable(arm_cfg)
                if finished.get("config", config) != config:
                    changed = sorted(k for k in set(finished["config"]) | set(config)
                                     if finished["config"].get(k) != config.get(k))
                    raise ValueError(f"{done} is a finished run with another config (differs in "
                                     f"{', '.join(changed)}); delete it or choose another --out")
                per_arm[name].append(finished)
                continue
            seed_everything(seed)                      # the same initial weights for every arm
            model = make_model(arm_cfg, dataset.num_classes, device)
            method = factory(arm_cfg)
            res = train(method, model, data, arm_cfg, seed=seed, progress=progress,
                        out_dir=out / "runs" / f"{name}-seed{seed}" if out else None,
                        desc=f"{name} seed {seed}")
            res["seed"] = seed
            res["config"] = _comparable(arm_cfg)         # a resumed run must have the same config
            if hasattr(method, "extras"):
                res["extras"] = method.extras()
            if out and hasattr(method, "save_artifacts"):
                method.save_artifacts(out, seed)
            per_arm[name].append(res)
            if done:
                write_json(res, done)

    base_sps = float(np.mean([r["cost"]["seconds_per_step"] for r in per_arm[reference]]))
    arms_out = {}
    for name, runs in per_arm.items():
        sps = float(np.mean([r["cost"]["seconds_per_step"] for r in runs]))
        arms_out[name] = {
            "test_acc": seed_stats([r["metrics"]["test_acc"] for r in runs]),
            "val_acc": seed_stats([r["metrics"]["val_acc"] for r in runs]),
            "seconds_per_step": sps, "step_cost_ratio": sps / base_sps,
            "steps": runs[0]["cost"]["steps"], "epochs": runs[0]["cost"]["epochs"],
            "train_seconds": seed_stats([r["cost"]["train_seconds"] for r in runs]),
            "peak_memory_bytes": max(r["cost"]["peak_memory_bytes"] for r in runs),
            "history": {str(r["seed"]): r["history"] for r in runs},
            "stopped_early": runs[0]["stopped_early"],
        }
        for key in ("target_acc", "target_acc_prior"):
            if key in runs[0]["metrics"]:
                arms_out[name][key] = seed_stats([r["metrics"][key] for r in runs])
        if "extras" in runs[0]:
            arms_out[name]["extras"] = {str(r["seed"]): r["extras"] for r in runs}
    main = per_arm[method_arm]
    return {
        "chapter": chapter, "method": method_arm, "preset": cfg["preset"], "reference_arm": reference,
        "seed": seeds[0], "seeds": list(seeds), "config": cfg, "dataset": data_info,
        "metrics": {"test_acc": arms_out[method_arm]["test_acc"]["mean"],
                    "val_acc": arms_out[method_arm]["val_acc"]["mean"],
                    "test_acc_std": arms_out[method_arm]["test_acc"]["std"]},
        "history": main[0]["history"],
        "cost": {"seconds_per_step": arms_out[method_arm]["seconds_per_step"],
                 "step_cost_ratio": arms_out[method_arm]["step_cost_ratio"],
                 "baseline_seconds_per_step": base_sps,
                 "peak_memory_bytes": arms_out[method_arm]["peak_memory_bytes"],
                 "peak_memory_kind": main[0]["cost"]["peak_memory_kind"],
                 "train_seconds": arms_out[method_arm]["train_seconds"]["mean"]},
        "arms": arms_out,
        "provenance": provenance(device),
    }
