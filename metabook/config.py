"""Configuration: one flat dict of dotted keys, presets per chapter, validation with clear errors.

A run's config is resolved in three layers, each overriding the one before:

    BASE  ->  the chapter's DEFAULTS  ->  the chapter's PRESETS[preset]  ->  --set key=value

Every key must exist in BASE or in the chapter's DEFAULTS; an unknown key, preset or chapter,
or a value outside its valid range, raises ConfigError with a one-line message that lists the
valid choices. The resolved dict is stored in every result record, so a run can be repeated.
"""
from __future__ import annotations

import math

import torch

PRESET_NAMES = ("smoke", "cpu", "gpu", "paper")

# The keys every chapter shares. Chapter modules add their own in DEFAULTS.
BASE: dict = {
    "dataset": "cifar10",        # cifar10 | cifar100 | cifar100_coarse | synthetic
    "train_size": 0,             # training images used (0 = all that are not held out)
    "meta_size": 1000,           # held-out split: meta objective and validation accuracy
    "test_size": 0,              # test images used (0 = all available)
    "model": "small_cnn",        # see metabook.models.MODELS
    "width": 32,                 # channels of the first stage (CNNs) or hidden units (MLP)
    "depth": 8,                  # conv layers of plain_cnn / res_cnn, hidden layers of mlp
    "batchnorm": True,
    "epochs": 10.0,              # may be fractional
    "batch_size": 128,
    "lr": 0.1,                   # peak learning rate
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,
    "schedule": "onecycle",      # onecycle | cosine | constant
    "warmup": 0.15,              # fraction of the steps spent warming up (onecycle)
    "label_smoothing": 0.0,
    "augment": True,             # random crop (pad 4) + horizontal flip
    "noise.kind": "none",        # none | symmetric | pairflip
    "noise.rate": 0.0,           # fraction of training labels corrupted, in [0, 1)
    "target.classes": "",        # personalization: favoured classes of the target distribution, e.g. "3,5"
    "target.ratio": 4.0,         # ... each favoured class this many times as likely as the others
    "channels_last": False,
    "device": "auto",            # auto | cpu | cuda
    "eval_every": 1.0,           # epochs between evaluations
    "checkpoint_every": 200,     # steps between checkpoints (0 = never)
    "time_budget_s": 0.0,        # stop training after this many seconds (0 = no limit)
}

CHOICES: dict[str, tuple] = {
    "dataset": ("cifar10", "cifar100", "cifar100_coarse", "synthetic"),
    "model": ("small_cnn", "plain_cnn", "res_cnn", "resnet18", "mlp", "cuda_convnet"),
    "schedule": ("onecycle", "cosine", "constant"),
    "noise.kind": ("none", "symmetric", "pairflip"),
    "device": ("auto", "cpu", "cuda"),
    "ilr.mode": ("jvp", "fd"),
    "lfl.activation": ("smooth_leaky_relu", "relu"),
    "lfl.init": ("random", "cross_entropy"),
    "hf.damping_rule": ("lm", "fixed"),
    "gi.schedule": ("constant", "linear_decay", "cosine_decay"),
    "gi.enn_objective": ("rl", "regression"),
    "ll.weights": ("meta_net", "free", "equal"),
    "ll.mode": ("jvp", "fd"),
    "compare.noise_kind": ("none", "symmetric", "pairflip"),
}

# (test, phrase) pairs: the phrase completes "must be ..." in the error message.
RANGES: dict[str, tuple] = {
    "lr": (lambda v: v > 0, "> 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "noise.rate": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "epochs": (lambda v: v > 0, "> 0"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "train_size": (lambda v: v >= 0, ">= 0 (0 = all)"),
    "meta_size": (lambda v: v >= 0, ">= 0"),
    "test_size": (lambda v: v >= 0, ">= 0 (0 = all)"),
    "width": (lambda v: v >= 1, ">= 1"),
    "depth": (lambda v: v >= 1, ">= 1"),
    "warmup": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "eval_every": (lambda v: v > 0, "> 0"),
    "checkpoint_every": (lambda v: v >= 0, ">= 0 (0 = never)"),
    "time_budget_s": (lambda v: v >= 0, ">= 0 (0 = no limit)"),
    "ilr.meta_lr": (lambda v: v >= 0, ">= 0"),
    "target.ratio": (lambda v: v > 0, "> 0"),
    "lfl.hidden": (lambda v: v >= 1, ">= 1"),
    "lfl.beta": (lambda v: v > 0, "> 0"),
    "lfl.leak": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lfl.meta_lr": (lambda v: v >= 0, ">= 0"),
    "lfl.offline_steps": (lambda v: v >= 0, ">= 0"),
    "lfl.offline_horizon": (lambda v: v >= 1, ">= 1"),
    "lfl.offline_meta_lr": (lambda v: v >= 0, ">= 0"),
    "lfl.offline_lr": (lambda v: v >= 0, ">= 0 (0 = the peak lr)"),
    "lfl.snapshot_every": (lambda v: v > 0, "> 0"),
    "hf.damping": (lambda v: v > 0, "> 0"),
    "hf.cg_iters": (lambda v: v >= 1, ">= 1"),
    "hf.cg_tol": (lambda v: v >= 0, ">= 0 (0 = no relative-progress stop)"),
    "hf.precond_exponent": (lambda v: 0 <= v <= 1, "in [0, 1] (0 = no preconditioner)"),
    "hf.fisher_chunk": (lambda v: v >= 1, ">= 1"),
    "hf.gn_batch_size": (lambda v: v >= 1, ">= 1"),
    "hf.warm_start": (lambda v: 0 <= v <= 1, "in [0, 1] (0 = CG from zero)"),
    "hf.mlhf_cg_iters": (lambda v: v >= 1, ">= 1"),
    "hf.mlhf_hidden": (lambda v: v >= 1, ">= 1"),
    "hf.mlhf_meta_steps": (lambda v: v >= 0, ">= 0 (0 = untrained nets)"),
    "hf.mlhf_unroll": (lambda v: v >= 1, ">= 1"),
    "hf.mlhf_meta_lr": (lambda v: v >= 0, ">= 0"),
    "hf.mlhf_replay_size": (lambda v: v >= 0, ">= 0 (0 = every episode from a fresh initialisation)"),
    "hf.mlhf_fresh_prob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "adam.lr": (lambda v: v > 0, "> 0"),
    "gi.weight": (lambda v: v >= 0, ">= 0"),
    "gi.canvas": (lambda v: v >= 1, ">= 1"),
    "gi.resolution": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "gi.l1": (lambda v: v >= 0, ">= 0"),
    "gi.gamma": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "gi.lam": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "gi.episodes": (lambda v: v >= 3, ">= 3 (some are held out)"),
    "gi.holdout": (lambda v: 0 < v < 1, "in (0, 1)"),
    "gi.episode_steps": (lambda v: v >= 1, ">= 1"),
    "gi.snapshot_every": (lambda v: v >= 1, ">= 1"),
    "gi.eval_size": (lambda v: v >= 1, ">= 1"),
    "gi.gain_min": (lambda v: v > 0, "> 0"),
    "gi.gain_max": (lambda v: v > 0, "> 0"),
    "gi.lr_min": (lambda v: v > 0, "> 0"),
    "gi.lr_max": (lambda v: v > 0, "> 0"),
    "gi.enn_channels": (lambda v: v >= 1, ">= 1"),
    "gi.enn_iters": (lambda v: v >= 1, ">= 1"),
    "gi.enn_lr": (lambda v: v > 0, "> 0"),
    "gi.enn_batch": (lambda v: v >= 1, ">= 1"),
    "gi.refresh": (lambda v: v >= 1, ">= 1"),
    "gi.rounds": (lambda v: v >= 1, ">= 1"),
    "ll.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "ll.cv_folds": (lambda v: v >= 0, ">= 0 (0 or 1 = no cross-validation loop)"),
    "ll.cv_every": (lambda v: v > 0, "> 0"),
    "ll.meta_lr": (lambda v: v >= 0, ">= 0"),
    "ll.hidden": (lambda v: v >= 1, ">= 1"),
    "ll.ema": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "ll.head_pool": (lambda v: v >= 1, ">= 1"),
    "compare.noise_rate": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


class ConfigError(ValueError):
    """A bad chapter, preset, key or value. The message is one line and lists the valid choices."""


def _coerce(key: str, value, default):
    """Parse a --set string (or any value) to the type of the key's default.

    An integer key takes whole numbers only ("1e3" is 1000; "1.5" is refused, not truncated).
    """
    if isinstance(value, str) and not isinstance(default, str):
        text = value.strip()
        if isinstance(default, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}={value!r}: expected a boolean (true/false)")
        try:
            value = float(text) if isinstance(default, int) else type(default)(text)
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected a {type(default).__name__}") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"{key}={value!r} is not valid; it must be a whole number")
        return int(value)
    return value


def validate(cfg: dict) -> dict:
    for key, value in cfg.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} is not valid; it must be a finite number")
    for key, options in CHOICES.items():
        if key in cfg and cfg[key] not in options:
            raise ConfigError(f"{key}={cfg[key]!r} is not valid; choose one of: {', '.join(options)}")
    for key, (ok, phrase) in RANGES.items():
        if key in cfg and not ok(cfg[key]):
            raise ConfigError(f"{key}={cfg[key]!r} is not valid; it must be {phrase}")
    return cfg


def check_seeds(first: int, count: int = 1) -> list[int]:
    """The seeds first, first+1, ..., first+count-1, or ConfigError: numpy takes 0 .. 2**32-1."""
    if count < 1:
        raise ConfigError(f"--seeds {count} is not valid; it must be >= 1")
    if first < 0 or first + count - 1 > 2**32 - 1:
        raise ConfigError(f"--seed {first} is not valid; seeds must be in 0 .. {2**32 - 1}")
    return list(range(first, first + count))


def resolve_preset(preset: str) -> str:
    """`auto` is `gpu` when CUDA is available, else `cpu`."""
    if preset == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if preset not in PRESET_NAMES:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: auto, {', '.join(PRESET_NAMES)}")
    return preset


def parse_overrides(pairs: list[str] | None) -> dict:
    """['lr=0.1', 'noise.kind=symmetric'] -> {'lr': '0.1', 'noise.kind': 'symmetric'}."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value
    return out


def make_config(defaults: dict, presets: dict, preset: str, overrides: dict | None = None) -> dict:
    """Resolve BASE + chapter defaults + preset + overrides into one validated flat dict.

    `defaults` are the chapter's own keys (may also change BASE values); `presets` maps each
    preset name to the keys it changes. The result also records `preset`.
    """
    preset = resolve_preset(preset)
    cfg = {**BASE, **defaults}
    valid = sorted(cfg)
    for source in (presets.get(preset, {}), overrides or {}):
        for key, value in source.items():
            if key not in cfg:
                raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
            cfg[key] = _coerce(key, value, cfg[key])
    cfg["preset"] = preset
    return validate(cfg)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but CUDA is not available; choose one of: auto, cpu")
    return torch.device(name)
