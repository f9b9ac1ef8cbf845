"""The runner: the method contract (`Method`, `Context`, `Arm`), the one training loop (`train`) and
arms x seeds (`run_arms`); the README's "Layout and the method contract" is the guide to it.

A method sees a `Context` (the model, its batch streams, the step schedule, class and example
counts), never the run's whole data or config. The loop owns batch order (named, seeded streams,
replayed exactly on resume), the lr schedule, evaluation, timing (CUDA events on a GPU), NaN
checks, checkpoints, resume and the one memory meter (`bench.peak_step_bytes`).
"""
from __future__ import annotations

import base64
import contextvars
import math
import os
import random
import signal
import socket
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError, pick_device
from .data import (Batch, Dataset, DeviceLoader, class_skewed_weights, corrupt_labels, dataset_fingerprint,
                   load_dataset, parse_classes, split_train_meta, target_subset)
from .models import build_model


class NonFiniteError(FloatingPointError):
    """A loss or meta-gradient became NaN/inf. The message names the step and the quantity."""


class RunError(RuntimeError):
    """A run cannot start or go on because of its state on disk (a checkpoint or finished run of
    another config, a corrupt state file, an unwritable or locked output folder, a full disk).
    The message is one line naming the file and the fix."""


# The planner prices the GPUs from FLOPs and launches it counts wherever it runs. A method whose step
# takes another path on a GPU than on this CPU (meta_hf.GaussNewton linearizes its products on a
# slow CPU) asks gpu_path(device) which to take; plan.counted sets COUNTING_FOR_GPU while it counts.
COUNTING_FOR_GPU = contextvars.ContextVar("COUNTING_FOR_GPU", default=False)


def gpu_path(device: torch.device) -> bool:
    """Whether a step on `device` takes a GPU's path: on CUDA, and wherever the planner counts."""
    return device.type == "cuda" or COUNTING_FOR_GPU.get()


# ----------------------------------------------------------------------------- the contract

class Streams:
    """The batches a method may draw, owned by the loop. `batch(name, i)` is a pure function of
    (name, i), so a resumed run replays every stream exactly, whatever a method drew before.

    'train' is the training order (shuffled, augmented) and 'meta' the held-out split (shuffled,
    not augmented): the loop's own streams. Any other name is an independent shuffle of the split
    named by `split` ('train' by default), e.g. batch('offline', i) for a one-off stage.
    `examples` and `take` give examples without augmentation, for diagnostics and for methods
    that pick examples themselves; `corrupted` (N_train,) says which training labels the run
    corrupted (diagnostics only: a method must not train on it).
    """

    def __init__(self, train: DeviceLoader, meta: DeviceLoader, test: DeviceLoader | None = None,
                 corrupted: torch.Tensor | None = None):
        self.loaders = {"train": train, "meta": meta, "test": test}       # None where a toy has no images
        self.corrupted = corrupted if corrupted is not None else torch.zeros(len(train.y), dtype=torch.bool)

    def batch(self, name: str, i: int, split: str | None = None) -> Batch:
        """The i-th batch (0-based) of stream `name` over `split` (default: 'meta' for the
        stream 'meta', else 'train')."""
        split = split or ("meta" if name == "meta" else "train")
        loader = self.loaders[split]
        if len(loader) == 0:
            raise ConfigError(f"stream {name!r}: the {split} split ({len(loader.y)} images) is smaller than one "
                              f"batch ({loader.batch_size}); lower batch_size or enlarge that split")
        epoch, b = divmod(i, len(loader))
        if name not in ("train", "meta"):        # far from the training epochs (< 1000), one range per name
            epoch += 1000 * (1 + zlib.crc32(name.encode()))
        return next(loader.epoch(epoch, start=b))

    def take(self, split: str, idx: torch.Tensor) -> Batch:
        """The examples `idx` (positions in the split) as stored, normalised, not augmented."""
        loader = self.loaders[split]
        idx = idx.to(loader.y.device)
        return Batch(loader.normalise(loader.x[idx]), loader.y[idx], idx)

    def examples(self, split: str, start: int = 0, stop: int | None = None) -> Batch:
        """Examples start..stop of a split in stored order, normalised, not augmented."""
        stop = self.size(split) if stop is None else min(stop, self.size(split))
        return self.take(split, torch.arange(start, stop))

    def in_order(self, split: str, stop: int | None = None, chunk: int = 500):
        """The examples 0..stop of a split in stored order, not augmented, as batches of `chunk`
        (for train.per_example)."""
        stop = self.size(split) if stop is None else min(stop, self.size(split))
        return (self.examples(split, s, min(s + chunk, stop)) for s in range(0, stop, chunk))

    def size(self, split: str) -> int:
        return len(self.loaders[split].y)

    def batch_size(self, split: str = "train") -> int:
        return self.loaders[split].batch_size


@dataclass
class Context:
    """What a method sees of a run."""
    model: torch.nn.Module
    streams: Streams
    total_steps: int              # steps the loop will run
    steps_per_epoch: int
    num_classes: int
    num_train: int                # examples in the training split (batch.idx indexes them)
    seed: int = 0                 # the run's seed (a method seeds its own generators from it)
    cache_dir: Path | None = None  # where prepare() may keep results to reuse (None: do not cache)


class Method:
    """The contract (see the module docstring). Subclasses override what they need."""

    name = "method"
    uses_meta = False             # does step() need the loop's meta batch?
    # The config key that counts the repeated units of prepare() (its cost is about linear in it),
    # and a small value of it: the planner measures prepare() at that value and at twice it. Or
    # several such (key, small) pairs, when the cost is linear in each (plan._one_off).
    one_off_units: tuple | None = None

    def setup(self, ctx: Context) -> None:
        self.ctx, self.model = ctx, ctx.model

    def prepare(self) -> None:
        """A one-off stage before the first step (nothing by default)."""

    def uses_amp(self) -> bool:
        """Does step() run in mixed precision on a GPU (cfg['amp'])? Full precision by default."""
        return False

    def step(self, batch: Batch, meta_batch: Batch | None, lr: float) -> dict:
        raise NotImplementedError

    def diagnostics(self, streams: Streams) -> dict[str, float]:
        return {}

    def extras(self, streams: Streams) -> dict:
        return {}

    def artifacts(self) -> dict[str, np.ndarray]:
        """Per-training-example arrays to save beside the record (run_arms adds the examples'
        dataset indices, labels and corruption mask)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass(frozen=True)
class Arm:
    """One arm of a chapter: the method's factory (factory(cfg) -> Method) and the config keys
    this arm changes."""
    factory: Callable[[dict], Method]
    changes: dict = field(default_factory=dict)


@dataclass
class Experiment:
    """What one call of run_arms trains: a chapter's arms on one config. A chapter's
    `experiments(cfg)` lists them; `run` runs them and the planner (plan.py) costs them."""
    chapter: str
    method_arm: str                       # the chapter's own method: its metrics are the record's
    arms: dict[str, Arm]
    cfg: dict
    same_time_for: str | None = None      # also run the reference arm for this arm's time
    reference: str = "baseline"           # the arm every cost is a ratio to
    label: str = ""                       # which experiment of the chapter (compare: the method)

    def __post_init__(self):
        """With cfg['check_convergence'], the reference arm is also trained for twice the epochs
        (arm `<reference>_double_epochs`), so the record can show whether its budget converged."""
        if self.cfg.get("check_convergence"):
            ref = self.arms[self.reference]
            base = {**self.cfg, **ref.changes}
            self.arms = {**self.arms, f"{self.reference}_double_epochs": Arm(
                ref.factory, {**ref.changes, "epochs": 2 * base["epochs"], "steps": 2 * base["steps"]})}


def run_experiment(exp: Experiment, seeds: list[int], **kwargs) -> dict:
    """run_arms on an Experiment (kwargs: out_dir, progress, dataset)."""
    return run_arms(exp.chapter, exp.method_arm, exp.arms, exp.cfg, seeds, same_time_for=exp.same_time_for,
                    reference=exp.reference, **kwargs)


# ----------------------------------------------------------------------------- data for one run

@dataclass
class RunData:
    dataset: Dataset
    train: DeviceLoader          # shuffled, augmented
    meta: DeviceLoader           # the meta split, shuffled, not augmented (meta batches)
    val: DeviceLoader            # the validation split, in order (val_acc): nothing trains on it
    test: DeviceLoader
    heldout: DeviceLoader        # the first heldout_size images of the dataset's fixed held-out split
    train_idx: torch.Tensor      # positions of the train split in dataset.x_train
    meta_idx: torch.Tensor
    corrupted: torch.Tensor      # (len(train_idx),) bool: which training labels were corrupted
    info: dict = field(default_factory=dict)
    target_probs: torch.Tensor | None = None   # (C,) target class distribution (personalization)
    train_prior: torch.Tensor | None = None    # (C,) class frequencies of the (noisy) training labels

    def streams(self) -> Streams:
        """The batch streams a method may draw from (see Streams)."""
        return Streams(self.train, self.meta, self.test, self.corrupted)

    def context(self, model, total_steps: int, seed: int = 0, cache_dir=None) -> Context:
        """The Context of a method that trains `model` for `total_steps` on this data."""
        return Context(model, self.streams(), total_steps, len(self.train), self.dataset.num_classes,
                       len(self.train.y), seed, Path(cache_dir) if cache_dir else None)

    def total_steps(self, cfg: dict) -> int:
        """cfg['steps'] if set, else ceil(epochs x batches per epoch)."""
        return cfg["steps"] or max(1, math.ceil(cfg["epochs"] * len(self.train)))


def prepare_data(cfg: dict, seed: int, device: torch.device, dataset: Dataset | None = None) -> RunData:
    """Load the dataset, split train/meta by seed, corrupt training labels if asked, build loaders."""
    ds = dataset or load_dataset(cfg["dataset"])
    val_size = cfg["val_size"] or cfg["meta_size"]
    train_idx, meta_idx, val_idx = split_train_meta(ds.y_train, cfg["meta_size"], cfg["train_size"], seed, val_size)
    favoured = parse_classes(cfg["target.classes"], ds.num_classes)
    target_probs = None
    if favoured:      # personalization: the meta split follows the target distribution instead
        target_probs = class_skewed_weights(ds.num_classes, favoured, cfg["target.ratio"])
        is_taken = torch.zeros(len(ds.y_train), dtype=torch.bool)
        is_taken[train_idx] = True
        is_taken[val_idx] = True
        pool = torch.nonzero(~is_taken).flatten()
        meta_idx = pool[target_subset(ds.y_train[pool], target_probs, cfg["meta_size"], seed)]
    y_train, corrupted = corrupt_labels(ds.y_train[train_idx], cfg["noise.kind"], cfg["noise.rate"],
                                        ds.num_classes, seed)
    n_test = min(cfg["test_size"] or len(ds.y_test), len(ds.y_test))     # what is used, not what was asked
    common = dict(device=device, channels_last=cfg["channels_last"])
    bs = cfg["batch_size"]
    train = DeviceLoader(ds.x_train[train_idx], y_train, bs, train=True, seed=seed,
                         augment=cfg["augment"], **common)
    meta = DeviceLoader(ds.x_train[meta_idx], ds.y_train[meta_idx], min(bs, max(len(meta_idx), 1)),
                        train=True, seed=seed + 7919, augment=False, **common)
    val = DeviceLoader(ds.x_train[val_idx], ds.y_train[val_idx], 500, train=False, **common)
    test = DeviceLoader(ds.x_test[:n_test], ds.y_test[:n_test], 500, train=False, **common)
    n_held = min(cfg["heldout_size"], len(ds.y_heldout))          # at most what the data holds: recorded
    heldout = DeviceLoader(ds.x_heldout[:n_held], ds.y_heldout[:n_held], 500, train=False, **common)
    info = {**ds.describe(), "train_size": len(train_idx), "meta_size": len(meta_idx), "val_size": len(val_idx),
            "heldout_size": n_held, "test_size": n_test, "test_size_requested": cfg["test_size"] or None, "noise": {"kind": cfg["noise.kind"], "rate": cfg["noise.rate"],
                                           "corrupted": int(corrupted.sum())}}
    if cfg["test_size"] and cfg["test_size"] > n_test:
        import warnings
        warnings.warn(f"test_size={cfg['test_size']} asked for, but the data holds {n_test} test images: "
                      f"all {n_test} are used and recorded")
    info["fingerprint"] = dataset_fingerprint(ds)
    train_prior = None
    if target_probs is not None:
        info["target"] = {"classes": favoured, "ratio": cfg["target.ratio"], "probs": target_probs.tolist()}
        train_prior = torch.bincount(y_train, minlength=ds.num_classes).float() / len(y_train)
    return RunData(ds, train, meta, val, test, heldout, train_idx, meta_idx, corrupted, info,
                   target_probs=target_probs, train_prior=train_prior)


def make_model(cfg: dict, num_classes: int, device: torch.device) -> torch.nn.Module:
    model = build_model(cfg["model"], num_classes, cfg["width"], cfg["depth"], cfg["batchnorm"]).to(device)
    return model.to(memory_format=torch.channels_last) if cfg["channels_last"] else model


# ----------------------------------------------------------------------------- small helpers

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
def per_example(model: torch.nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct (N,) bool, cross-entropy (N,) float), on the CPU, of every example of `batches`:
    a DeviceLoader of an evaluation split (its stored order) or any iterable of Batch, e.g.
    Streams.in_order('train'). Eval mode; the chunked evaluation every diagnostic uses."""
    was_training = model.training
    model.eval()
    correct, losses = [], []
    for batch in (batches.epoch(0) if isinstance(batches, DeviceLoader) else batches):
        logits = model(batch.x)
        losses.append(F.cross_entropy(logits, batch.y, reduction="none"))
        correct.append(logits.argmax(1) == batch.y)
    model.train(was_training)
    if not correct:
        return torch.zeros(0, dtype=torch.bool), torch.zeros(0)
    return torch.cat(correct).cpu(), torch.cat(losses).cpu()


def evaluate(model: torch.nn.Module, loader: DeviceLoader) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) over a whole split, in eval mode."""
    correct, losses = per_example(model, loader)
    n = max(len(correct), 1)
    return correct.sum().item() / n, losses.double().sum().item() / n


def pack_bits(mask: torch.Tensor) -> str:
    """A bool vector as text (base64 of its bits): a record's per-image correctness."""
    return base64.b64encode(np.packbits(mask.numpy().astype(np.uint8)).tobytes()).decode()


def unpack_bits(text: str, n: int) -> np.ndarray:
    """pack_bits' inverse: the first n bits as a bool array."""
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(bool)


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


# ----------------------------------------------------------------------------- records

@dataclass
class Cost:
    """What one (arm, seed) run cost. Seconds are the method's steps alone (`timer` says how they
    were read); the one-off stage is timed apart; memory is the first two steps' peak."""
    steps: int
    epochs: float
    train_seconds: float
    one_off_seconds: float
    seconds_per_step: float            # median after the first 5 steps (warm-up)
    seconds_per_step_mean: float
    timer: str                         # "cuda events" | "perf_counter"
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    train_cpu_seconds: float | None = None     # the process's CPU seconds in the steps (CPU runs only)
    one_off_cpu_seconds: float | None = None


@dataclass
class ArmRun:
    """One (arm, seed) run: what train() returns and run_arms saves as runs/<arm>-seed<S>.json."""
    metrics: dict                      # final test_acc, val_acc, test_loss, train_loss (+ target_acc)
    history: list                      # one row per evaluation
    cost: Cost
    stopped_early: str | None = None   # why, when a time budget stopped it
    diverged: str | None = None        # with on_diverge=record: the NonFiniteError that ended it
    seed: int = 0
    config: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)
    heldout_correct: str = ""          # pack_bits of which held-out images it got right (paired statistics)


@dataclass
class ArmSummary:
    """One arm over the seeds, as the record's `arms[name]` holds it."""
    test_acc: dict                     # seed_stats: mean, std, per_seed
    val_acc: dict
    seconds_per_step: float
    step_cost_ratio: float             # over the reference arm's, same run
    steps: int
    epochs: float
    steps_per_seed: list
    train_seconds: dict
    one_off_seconds: dict
    peak_memory_bytes: int
    peak_memory_kind: str
    history: dict                      # seed -> rows
    stopped_early: str | None
    diverged: dict = field(default_factory=dict)      # seed -> the error that ended it (on_diverge=record)


# ----------------------------------------------------------------------------- timing, checks, files

class StepTimer:
    """Seconds of each timed region. On CUDA: a pair of events per region, read once per window
    (no synchronisation per step); elsewhere perf_counter, and the process's CPU seconds in the
    regions (`cpu`: what the planner's cpu column estimates, less moved by other jobs than wall-clock)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.kind = "cuda events" if self.cuda else "perf_counter"
        self.pending: list = []
        self.cpu = 0.0

    def start(self):
        if self.cuda:
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._t0, self._c0 = time.perf_counter(), time.process_time()

    def stop(self):
        if self.cuda:
            t1 = torch.cuda.Event(enable_timing=True)
            t1.record()
            self.pending.append((self._t0, t1))
        else:
            self.pending.append(time.perf_counter() - self._t0)
            self.cpu += time.process_time() - self._c0

    def collect(self) -> list[float]:
        """The seconds of the regions timed since the last collect (synchronises once on CUDA)."""
        if self.cuda and self.pending:
            self.pending[-1][1].synchronize()
            out = [a.elapsed_time(b) / 1000 for a, b in self.pending]
        else:
            out = list(self.pending)
        self.pending = []
        return out


def check_window(window: list[tuple[int, dict]]) -> dict[str, list[float]]:
    """The window's per-step metrics as floats by key, after checking that all are finite: the
    first non-finite one raises NonFiniteError naming its step (1-based) and the quantity."""
    sums: dict[str, list[float]] = {}
    if not window:
        return sums
    for key in window[0][1]:
        values = torch.stack([torch.as_tensor(m[key], dtype=torch.float64).detach().cpu().reshape(())
                              for _, m in window if key in m])
        bad = ~torch.isfinite(values)
        if bad.any():
            step = [s for s, m in window if key in m][int(bad.nonzero()[0])]
            raise NonFiniteError(f"step {step}: {key} is {values[bad][0].item()}: the run diverged "
                                 f"(try a lower lr); stopped instead of training on")
        sums[key] = values.tolist()
    return sums


def save_atomic(obj, path: Path) -> None:
    """torch.save to path.tmp, then rename: a killed write never leaves half a file; a failed
    write (a full disk) removes the .tmp and raises RunError naming the file."""
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        full = "No space left" in str(err) or getattr(err, "errno", None) == 28
        raise RunError(f"could not write {path}: {'the disk is full' if full else err}; "
                       f"free some space and run again (the previous checkpoint is kept)") from None


def load_state(path: Path, device) -> dict:
    """torch.load of a checkpoint (weights only); a corrupt file raises RunError naming it."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:      # torch raises several types for a truncated or foreign file
        raise RunError(f"{path} is corrupt ({type(err).__name__}); delete it to start that run "
                       f"afresh") from None


def _comparable(cfg: dict) -> dict:
    """The config keys that must match for a checkpoint or a finished run to be reused: all but how
    often to checkpoint and `same_time_steps`, which sets only baseline_same_time's own `steps` (a
    replayed budget must not invalidate the other arms' finished runs; that arm's steps still count)."""
    return {k: v for k, v in cfg.items() if k not in ("checkpoint_every", "same_time_steps")}


class StopRequest:
    """Turns SIGINT into a flag the loop reads between steps (main thread only), so Ctrl-C
    saves a checkpoint after the step in flight and then raises KeyboardInterrupt. A second
    SIGINT stops at once, unless it comes within a second of the first: one Ctrl-C can reach a
    sweep's worker twice, from the terminal and passed on by the sweep (sweep.LocalEngine)."""

    def __init__(self):
        self.flag, self.old, self.first = False, None, 0.0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        if self.flag and time.monotonic() - self.first > 1.0:     # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        if not self.flag:
            self.flag, self.first = True, time.monotonic()

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


# ----------------------------------------------------------------------------- the loop

def train(method: Method, model: torch.nn.Module, data: RunData, cfg: dict, *, seed: int = 0,
          out_dir: str | Path | None = None, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None, desc: str | None = None,
          cache_dir: str | Path | None = None) -> dict:
    """Train `model` with `method` for cfg['epochs'] epochs of data.train. Returns a dict with
    metrics, history and cost (one-off seconds, seconds per step, training seconds).

    With `out_dir`, a checkpoint is written after the one-off stage and every
    cfg['checkpoint_every'] steps to out_dir/checkpoint.pt; a run that finds one (same config,
    seed, method and data) resumes from it and ends with the same numbers as an uninterrupted
    run. `on_step(step, metrics)` is called after every step (tests use it to interrupt a run).
    `cache_dir` is where the method's prepare() may keep results to reuse (run_arms: OUT/cache).
    """
    import warnings

    from tqdm import TqdmWarning
    with warnings.catch_warnings():          # without ipywidgets, tqdm.auto falls back to text
        warnings.simplefilter("ignore", TqdmWarning)
        from tqdm.auto import tqdm

    device = next(model.parameters()).device
    spe = len(data.train)
    if spe == 0:
        raise ConfigError(f"the train split ({len(data.train.y)} images) is smaller than one batch "
                          f"(batch_size={data.train.batch_size}); lower batch_size or raise train_size")
    total = data.total_steps(cfg)
    eval_steps = max(1, round(cfg["eval_every"] * spe))
    ctx = data.context(model, total, seed, cache_dir)
    streams = ctx.streams
    method.setup(ctx)

    step, history, elapsed, step_times, one_off = 0, [], 0.0, [], 0.0
    cpu = {"train": 0.0, "one_off": 0.0}          # process CPU seconds of the steps and the stage (CPU runs)
    running: dict[str, float] = {"n": 0}
    identity = {"config": _comparable(cfg), "seed": seed, "method": method.name, "data": data.info.get("fingerprint")}
    ckpt_path = Path(out_dir) / "checkpoint.pt" if out_dir else None

    def save(step_done: int):
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic({**identity, "step": step_done, "model": model.state_dict(),
                      "method_state": method.state_dict(), "history": history, "elapsed": elapsed, "cpu": cpu,
                      "one_off": one_off, "step_times": step_times, "running": running,
                      "rng": torch.get_rng_state(),
                      "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                     ckpt_path)

    if ckpt_path and ckpt_path.exists():
        ck = load_state(ckpt_path, device)
        ck["config"] = _comparable(ck.get("config") or {})       # as saved by older code too
        differs = [k for k in identity if ck.get(k) != identity[k]]
        if differs:
            raise RunError(f"{ckpt_path} belongs to another run ({', '.join(differs)} differ); delete it "
                           f"or choose another --out")
        model.load_state_dict(ck["model"])
        method.load_state_dict(ck["method_state"])
        step, history, elapsed, step_times = ck["step"], ck["history"], ck["elapsed"], ck["step_times"]
        cpu = ck.get("cpu", {"train": float("nan"), "one_off": float("nan")})    # older checkpoints: unknown
        one_off, running = ck["one_off"], ck["running"]
        torch.set_rng_state(ck["rng"])
        if device.type == "cuda" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"].cpu(), device)
    else:
        seed_everything(seed)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            method.prepare()                 # the one-off stage: its own RNG, its own clock
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        one_off, cpu["one_off"] = time.perf_counter() - t0, time.process_time() - c0
        if ckpt_path and type(method).prepare is not Method.prepare:     # never redo a one-off stage
            save(0)

    timer = StepTimer(device)
    window: list[tuple[int, dict]] = []
    stopped, lr = None, lr_at(step, total, cfg)

    last: dict = {}

    def flush():
        """Read the timer and check and sum the window's metrics (one host sync per window)."""
        nonlocal elapsed, last
        times = timer.collect()
        step_times.extend(times)
        elapsed += sum(times)
        cpu["train"] += timer.cpu
        timer.cpu = 0.0
        for key, values in check_window(window).items():
            for v in values:                  # in step order, as a running Python sum
                running[key] = running.get(key, 0.0) + v
        running["n"] += len(window)
        if window:
            last = window[-1][1]
        window.clear()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TqdmWarning)
        bar = tqdm(total=total, initial=step, desc=desc or method.name, disable=not progress,
                   mininterval=2.0, leave=True)
    model.train()
    diverged = None
    with StopRequest() as stop_request:
        try:
            while step < total:
                batch = streams.batch("train", step)
                meta_batch = streams.batch("meta", step) if method.uses_meta else None
                lr = lr_at(step, total, cfg)
                timer.start()
                metrics = method.step(batch, meta_batch, lr)
                timer.stop()
                step += 1
                window.append((step, metrics))
                bar.update(1)
                budget_hit = False
                if cfg["time_budget_s"]:          # the baseline given another arm's wall-clock
                    flush()
                    budget_hit = elapsed >= cfg["time_budget_s"] and step < total
                if step % eval_steps == 0 or step == total or budget_hit:
                    flush()
                    history.append(eval_row(method, model, data, streams, step, spe, lr, running, elapsed, last))
                    running = {"n": 0}
                    bar.set_postfix(test_acc=f"{history[-1]['test_acc']:.3f}")
                if on_step:
                    on_step(step, metrics)
                due = ckpt_path and cfg["checkpoint_every"] and step % cfg["checkpoint_every"] == 0 and step < total
                if due or (stop_request.flag and ckpt_path):
                    flush()
                    save(step)
                if stop_request.flag:
                    bar.close()
                    raise KeyboardInterrupt(f"stopped at step {step}" + (f"; {ckpt_path} resumes it" if ckpt_path else ""))
                if budget_hit:
                    stopped = f"time budget of {cfg['time_budget_s']} s reached at step {step} of {total}"
                    break
        except NonFiniteError as err:
            if cfg["on_diverge"] != "record":
                raise
            diverged, window[:] = str(err), []      # the net as it stands is this seed's result
            history.append(eval_row(method, model, data, streams, step, spe, lr, running, elapsed, last))
    bar.close()

    final = history[-1]
    for key in ("test_loss", "train_loss"):
        if not diverged and (final[key] is None or not math.isfinite(final[key])):
            msg = f"step {step}: the final {key} is {final[key]}: the run diverged at its end (try a lower lr)"
            if cfg["on_diverge"] != "record":
                raise NonFiniteError(msg + "; no result is recorded")
            diverged = msg
    if ckpt_path and ckpt_path.exists():
        ckpt_path.unlink()
        if not any(ckpt_path.parent.iterdir()):
            ckpt_path.parent.rmdir()
    warm = step_times[min(5, len(step_times) - 1):]          # the first steps include warm-up
    metrics = {k: final[k] for k in ("test_acc", "val_acc", "test_loss", "train_loss", "target_acc",
                                     "target_acc_prior") if k in final}
    correct, losses = per_example(model, data.heldout)          # the verdicts' split, once, untimed
    if len(correct):
        metrics.update(heldout_acc=correct.double().mean().item(), heldout_loss=losses.double().mean().item())
    cost = Cost(steps=step, epochs=step / spe, train_seconds=elapsed, one_off_seconds=one_off,
                seconds_per_step=float(np.median(warm)), seconds_per_step_mean=float(np.mean(warm)),
                timer=timer.kind, **({} if timer.cuda else {"train_cpu_seconds": cpu["train"],
                                                             "one_off_cpu_seconds": cpu["one_off"]}))
    return asdict(ArmRun(metrics=metrics, history=history, cost=cost, stopped_early=stopped, diverged=diverged,
                         heldout_correct=pack_bits(correct) if len(correct) else ""))


def eval_row(method, model, data, streams, step, spe, lr, running, elapsed, last: dict) -> dict:
    """One history row: the window's mean training loss/accuracy, validation and test accuracy,
    the method's last-step metrics and its diagnostics (all outside the timed region)."""
    test_acc, test_loss = evaluate(model, data.test)
    val_acc, _ = evaluate(model, data.val) if len(data.val.y) else (float("nan"), None)
    n = max(running["n"], 1)
    row = {"step": step, "epoch": step / spe, "lr": lr, "train_loss": running.get("loss", 0.0) / n,
           "train_acc": running.get("acc", 0.0) / n, "val_acc": val_acc, "test_acc": test_acc,
           "test_loss": test_loss, "elapsed_s": elapsed}
    if data.target_probs is not None:
        row["target_acc"], row["target_acc_prior"] = target_accuracy(model, data.test, data.target_probs,
                                                                     data.train_prior)
    row.update({k: float(v) for k, v in last.items() if k not in ("loss", "acc") and torch.as_tensor(v).numel() == 1})
    with torch.no_grad():
        row.update(method.diagnostics(streams))
    return row


# ----------------------------------------------------------------------------- arms and seeds

class OutLock:
    """An exclusive lock on a run folder (out/.lock holds the owner's pid and host): two runs
    never write the same records. A lock whose process is gone is taken over."""

    def __init__(self, out: Path | None):
        self.path = out / ".lock" if out else None

    def __enter__(self):
        if self.path is None:
            return self
        out = self.path.parent
        if out.exists() and not out.is_dir():
            raise RunError(f"--out {out} is a file, not a folder; choose another --out")
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = self.path.read_text().split()
            pid, host = (int(owner[0]), owner[1]) if len(owner) == 2 and owner[0].isdigit() else (0, "")
            if host == socket.gethostname() and pid and process_alive(pid):
                raise RunError(f"{out} is in use by another run (pid {pid}); wait for it or choose another "
                               f"--out") from None
            self.path.unlink(missing_ok=True)        # a stale lock: its process is gone
            return self.__enter__()
        except OSError as err:
            raise RunError(f"--out {out} is not writable ({err.strerror}); choose another --out") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}")
        return self

    def __exit__(self, *exc):
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs. A zombie (killed, not yet reaped: where a container's init
    does not reap, it stays one) holds no lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        state = ""
    return pid != os.getpid() and state != "Z"


def fresh_method(arm: Arm, cfg: dict, data: RunData, seed: int, total: int | None = None) -> Method:
    """The arm's method on a fresh model (the run's initial weights for `seed`), set up for
    `total` steps (default: the config's) and not prepared: what a run starts from."""
    seed_everything(seed)
    model = make_model(cfg, data.dataset.num_classes, data.train.y.device)
    method = arm.factory(cfg)
    method.setup(data.context(model, total or data.total_steps(cfg), seed))
    return method


def probe_step(method: Method, i: int, cfg: dict) -> dict:
    """Step `i` of the run, with the batches and learning rate the loop would give it."""
    streams, total = method.ctx.streams, method.ctx.total_steps
    return method.step(streams.batch("train", i), streams.batch("meta", i) if method.uses_meta else None,
                       lr_at(i, total, cfg))


def step_peak_bytes(arm: Arm, cfg: dict, data: RunData, seed: int) -> tuple[int, str]:
    """Peak memory of an arm's first two steps, on a fresh model and method, outside any timed
    region and the run's RNG (bench.peak_step_bytes: the allocator on CUDA, the tensor meter
    elsewhere). The one-off stage is not run: its cost is its own. The same two steps run once
    before, unmetered, on another fresh copy, so that what the process builds on first use
    (lazy caches that outlive the step) is not charged to whichever arm happens to go first."""
    from .bench import peak_step_bytes

    device = data.train.y.device
    def first_two(method):
        return [probe_step(method, i, cfg) for i in range(min(2, method.ctx.total_steps))]

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        first_two(fresh_method(arm, cfg, data, seed))                 # unmetered: first-use caches
        method = fresh_method(arm, cfg, data, seed)
        return peak_step_bytes(lambda: first_two(method), device)


def _finished_run(path: Path, config: dict) -> dict | None:
    """A finished (arm, seed) run saved at `path`, if it was made with `config`."""
    import json

    if not path.exists():
        return None
    try:
        finished = json.loads(path.read_text())
    except (OSError, ValueError):
        raise RunError(f"{path} is corrupt; delete it to run that arm and seed again") from None
    finished["config"] = _comparable(finished.get("config", config))      # as saved by older code too
    if finished["config"] != config:
        changed = sorted(k for k in set(finished["config"]) | set(config)
                         if finished["config"].get(k) != config.get(k))
        raise RunError(f"{path} is a finished run with another config (differs in {', '.join(changed)}); "
                       f"delete it or choose another --out")
    return finished


def arm_seed_config(name: str, arm_cfgs: dict[str, dict], cfg: dict, seed: int, seeds: list[int],
                    steps_per_epoch: int, reference: str = "baseline", same_time_for: str | None = None,
                    target_cost: dict | None = None, ratio: float | None = None) -> dict:
    """The config arm `name` trains with at `seed` (arm_cfgs: each arm's cfg with its changes).
    `baseline_same_time` is the reference arm at a budget: replayed steps (cfg['same_time_steps']),
    or the steps that buy the time its target arm took at this seed, one-off stage included:

        steps = ratio * target steps * (1 + target one-off time / target training time)

    `target_cost` is the target's finished run's cost (CPU seconds where it kept them, else
    wall-clock: the one-off stage counted in the target's own steps, within one run) and `ratio`
    the target's step cost over the reference's, timed side by side (same_time_ratio). Two
    runs made at different times, under different loads, are never divided by one another: on
    the project's 2-core machine the same baseline step cost 0.17 CPU s in one run and 0.22 in
    another. The ratio is kept in the config (`same_time_ratio`), so a resumed arm keeps its budget."""
    arm_cfg = dict(arm_cfgs.get(name, arm_cfgs[reference]))
    if name == "baseline_same_time" and cfg["same_time_steps"]:    # a replay: fixed steps
        replay = cfg["same_time_steps"]
        arm_cfg["steps"] = replay[seeds.index(seed)] if len(replay) > 1 else replay[0]
    elif name == "baseline_same_time":
        t = target_cost
        cpu = t.get("train_cpu_seconds") is not None
        train_s, one_off_s = ((t["train_cpu_seconds"], t.get("one_off_cpu_seconds")) if cpu
                              else (t["train_seconds"], t.get("one_off_seconds")))
        steps = ratio * t["steps"] * (1 + (one_off_s or 0.0) / max(train_s, 1e-9))
        arm_cfg["epochs"] = max(steps / steps_per_epoch, 1 / steps_per_epoch)
        arm_cfg["same_time_ratio"] = ratio
    return arm_cfg


def same_time_ratio(arms: dict, cfg: dict, target: str, reference: str, seed: int, dataset=None,
                    out: Path | None = None) -> float:
    """baseline_same_time's step-cost ratio at `seed`: the target arm's seconds per step over the
    reference arm's, timed side by side now (interleaved_step_costs: one step of each per round,
    20 rounds, on this device under this load), outside any timed region. An arm already begun or
    finished in `out` (its checkpoint's or its run's config) keeps the ratio it started with."""
    import json

    if out is not None:
        done, ckpt = out / "runs" / f"baseline_same_time-seed{seed}.json", \
            out / "runs" / f"baseline_same_time-seed{seed}" / "checkpoint.pt"
        try:
            begun = (json.loads(done.read_text()).get("config", {}) if done.exists() else
                     torch.load(ckpt, weights_only=True).get("config", {}) if ckpt.exists() else {})
        except (OSError, ValueError, RuntimeError):
            begun = {}         # unreadable: run_arm_seed names the file and the fix
        if begun.get("same_time_ratio"):
            return float(begun["same_time_ratio"])
    costs = interleaved_step_costs({n: arms[n] for n in (target, reference)}, cfg, seed=seed, dataset=dataset,
                                   reference=reference)
    return costs[target]["ratio"]


def run_arm_seed(name: str, arm: Arm, arm_cfg: dict, data: RunData, seed: int, out: Path | None,
                 progress: bool = True, one_off: dict | None = None) -> dict:
    """One (arm, seed): trained with `arm_cfg` on `data` (resumed from out/runs/<name>-seed<S>/
    checkpoint.pt if there), or read back if out/runs/<name>-seed<S>.json holds it finished with
    the same config. A new run is saved there (and its per-example arrays beside it). Returns the run.
    `one_off` ({"one_off_seconds", "one_off_cpu_seconds"}): what its one-off stage cost where
    another process ran it and left it in out/cache (a sweep's shared stage), recorded in place of
    the time prepare() took to load it."""
    from .results import write_json

    config = {**_comparable(arm_cfg), "data": data.info.get("fingerprint")}
    done = out / "runs" / f"{name}-seed{seed}.json" if out else None
    finished = _finished_run(done, config) if done else None
    if finished is not None:
        return finished
    peak, peak_kind = step_peak_bytes(arm, arm_cfg, data, seed)
    seed_everything(seed)                      # the same initial weights for every arm
    model = make_model(arm_cfg, data.dataset.num_classes, data.train.y.device)
    method = arm.factory(arm_cfg)
    res = train(method, model, data, arm_cfg, seed=seed, progress=progress,
                out_dir=out / "runs" / f"{name}-seed{seed}" if out else None,
                desc=f"{name} seed {seed}", cache_dir=out / "cache" if out else None)
    res["cost"].update(peak_memory_bytes=peak, peak_memory_kind=peak_kind)
    if one_off is not None:
        res["cost"].update({k: v for k, v in one_off.items() if k in res["cost"]})
    res["seed"], res["config"] = seed, config      # a resumed run must have the same config
    with torch.no_grad():
        res["extras"] = method.extras(data.streams())
        arrays = method.artifacts()
    if out and arrays:     # per-example arrays, with the examples they belong to
        np.savez_compressed(out / f"{name}-seed{seed}.npz", **arrays,
                            train_index=data.train_idx.cpu().numpy(), label=data.train.y.cpu().numpy(),
                            corrupted=data.corrupted.cpu().numpy())
    if done:
        write_json(res, done)
    return res


def run_arms(chapter: str, method_arm: str, arms: dict[str, Arm], cfg: dict, seeds: list[int], *,
             out_dir=None, progress: bool = True, dataset: Dataset | None = None,
             same_time_for: str | None = None, reference: str = "baseline") -> dict:
    """Run every arm (name -> Arm) for every seed, on the same data and budget; returns the record.

    `method_arm` names the chapter's own method (its metrics become the record's `metrics`);
    every arm's `step_cost_ratio` is its seconds per step over the `reference` arm's, measured in
    this same run. With `same_time_for=NAME`, the reference arm is also run for the time
    that arm NAME used, one-off stage included (arm `baseline_same_time`: NAME's steps times their
    step-cost ratio timed side by side, arm_seed_config): a measured budget, so two runs differ;
    its steps and ratio per seed are recorded, and `same_time_steps` replays the steps exactly. Each finished (arm, seed) is saved under
    out_dir/runs/, so a killed run skips what it already did and resumes the rest from its
    checkpoint; out_dir is locked while the run lasts.
    """
    from .results import provenance, seed_stats

    if reference not in arms:
        raise ConfigError(f"run_arms needs a {reference!r} arm: every cost is a ratio to it")
    device = pick_device(cfg["device"])
    if device.type == "cuda":      # fastest convolution algorithms for these fixed shapes
        torch.backends.cudnn.benchmark = True
    dataset = dataset or load_dataset(cfg["dataset"])
    out = Path(out_dir) if out_dir else None
    arm_cfgs = {name: {**cfg, **arm.changes} for name, arm in arms.items()}
    for name, arm in arms.items():              # bad combinations fail here, before anything trains
        method = arm.factory(arm_cfgs[name])
        if method.uses_meta and cfg["meta_size"] < 1:
            raise ConfigError(f"arm {name!r} needs meta batches but meta_size={cfg['meta_size']}; "
                              f"set meta_size >= 1 or leave that arm out")
    per_arm: dict[str, list[dict]] = {name: [] for name in arms}
    if same_time_for:
        per_arm["baseline_same_time"] = []
        if cfg["same_time_steps"] and len(cfg["same_time_steps"]) not in (1, len(seeds)):
            raise ConfigError(f"same_time_steps has {len(cfg['same_time_steps'])} values for {len(seeds)} seeds; "
                              f"give one per seed, or one for all")
    data_info = None
    first = [reference] + [n for n in arms if n == f"{reference}_double_epochs"]    # the convergence check first
    order = first + [n for n in arms if n not in first] + (["baseline_same_time"] if same_time_for else [])
    with OutLock(out):
        for seed in seeds:
            data = prepare_data(cfg, seed, device, dataset)
            data_info = data.info
            for name in order:
                arm = arms.get(name, arms[reference])
                same_time = name == "baseline_same_time" and not cfg["same_time_steps"]
                arm_cfg = arm_seed_config(
                    name, arm_cfgs, cfg, seed, seeds, len(data.train), reference, same_time_for,
                    per_arm[same_time_for][-1]["cost"] if same_time else None,
                    same_time_ratio(arms, cfg, same_time_for, reference, seed, dataset, out) if same_time else None)
                per_arm[name].append(run_arm_seed(name, arm, arm_cfg, data, seed, out, progress))

    base_sps = float(np.mean([r["cost"]["seconds_per_step"] for r in per_arm[reference]]))
    arms_out = {}
    for name, runs in per_arm.items():
        sps = float(np.mean([r["cost"]["seconds_per_step"] for r in runs]))
        arms_out[name] = asdict(ArmSummary(
            test_acc=seed_stats([r["metrics"]["test_acc"] for r in runs]),
            val_acc=seed_stats([r["metrics"]["val_acc"] for r in runs]),
            seconds_per_step=sps, step_cost_ratio=sps / base_sps,
            steps=runs[0]["cost"]["steps"], epochs=runs[0]["cost"]["epochs"],
            steps_per_seed=[r["cost"]["steps"] for r in runs],
            train_seconds=seed_stats([r["cost"]["train_seconds"] for r in runs]),
            one_off_seconds=seed_stats([r["cost"].get("one_off_seconds", 0.0) for r in runs]),
            peak_memory_bytes=max(r["cost"]["peak_memory_bytes"] for r in runs),
            peak_memory_kind=runs[0]["cost"]["peak_memory_kind"],
            history={str(r["seed"]): r["history"] for r in runs},
            stopped_early=runs[0]["stopped_early"],
            diverged={str(r["seed"]): r["diverged"] for r in runs if r.get("diverged")}))
        for key in ("heldout_acc", "heldout_loss", "target_acc", "target_acc_prior"):
            if all(key in r["metrics"] for r in runs):
                arms_out[name][key] = seed_stats([r["metrics"][key] for r in runs])
        for key in ("train_cpu_seconds", "one_off_cpu_seconds"):     # CPU runs: what the planner's cpu column estimates
            if all(r["cost"].get(key) is not None for r in runs):
                arms_out[name][key] = seed_stats([r["cost"][key] for r in runs])
        if all(r.get("config", {}).get("same_time_ratio") for r in runs):     # the same-time arm's budgets
            arms_out[name]["same_time_ratio"] = [r["config"]["same_time_ratio"] for r in runs]
        if all(r.get("heldout_correct") for r in runs):
            arms_out[name]["heldout_correct"] = {str(r["seed"]): r["heldout_correct"] for r in runs}
        if any(r.get("extras") for r in runs):
            arms_out[name]["extras"] = {str(r["seed"]): r.get("extras", {}) for r in runs}
    main = per_arm[method_arm]
    return {
        "chapter": chapter, "method": method_arm, "preset": cfg["preset"], "reference_arm": reference,
        "seed": seeds[0], "seeds": list(seeds), "config": cfg, "dataset": data_info,
        "metrics": {"test_acc": arms_out[method_arm]["test_acc"]["mean"],
                    "val_acc": arms_out[method_arm]["val_acc"]["mean"],
                    **({"heldout_acc": arms_out[method_arm]["heldout_acc"]["mean"]}
                       if "heldout_acc" in arms_out[method_arm] else {}),
                    "test_acc_std": arms_out[method_arm]["test_acc"]["std"]},
        "history": main[0]["history"],
        "cost": {"seconds_per_step": arms_out[method_arm]["seconds_per_step"],
                 "step_cost_ratio": arms_out[method_arm]["step_cost_ratio"],
                 "baseline_seconds_per_step": base_sps,
                 "one_off_seconds": arms_out[method_arm]["one_off_seconds"]["mean"],
                 "peak_memory_bytes": arms_out[method_arm]["peak_memory_bytes"],
                 "peak_memory_kind": arms_out[method_arm]["peak_memory_kind"],
                 "timer": main[0]["cost"].get("timer"),
                 "train_seconds": arms_out[method_arm]["train_seconds"]["mean"]},
        "arms": arms_out,
        "provenance": provenance(device),
    }


def interleaved_step_costs(arms: dict, cfg: dict, steps: int = 20, seed: int = 0, dataset=None,
                           reference: str = "baseline", warmup: int = 3) -> dict:
    """Seconds per step of each arm of a chapter (name -> train.Arm, as its ARMS declares them),
    timed in interleaved rounds: every round gives each arm one step on the same batch and meta
    batch, so a change of the machine's load during the measurement hits every arm alike (a
    run's own `step_cost_ratio` compares arms trained one after another). One-off stages are not
    run (their cost is their own). Medians over `steps` rounds after `warmup`; `ratio` is each
    arm's median over the reference arm's."""
    device = pick_device(cfg["device"])
    data = prepare_data(cfg, seed, device, dataset)
    streams, total = data.streams(), warmup + steps
    methods = {name: fresh_method(arm, {**cfg, **arm.changes}, data, seed, total) for name, arm in arms.items()}
    timers = {name: StepTimer(device) for name in arms}
    for step in range(total):
        batch, meta_batch, lr = streams.batch("train", step), streams.batch("meta", step), lr_at(step, total, cfg)
        for name, method in methods.items():
            timers[name].start()
            method.step(batch, meta_batch if method.uses_meta else None, lr)
            timers[name].stop()
    median = {name: float(np.median(t.collect()[warmup:])) for name, t in timers.items()}
    return {name: {"seconds_per_step": median[name], "ratio": median[name] / median[reference]}
            for name in arms}
