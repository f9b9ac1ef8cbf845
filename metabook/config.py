"""Configuration: typed knobs declared once (`knob` fields of small dataclasses: type, default, valid
range, one-line meaning), presets per chapter, and one flat dict of dotted keys, resolved as the
sections' defaults -> the chapter's DEFAULTS -> PRESETS[preset] -> --set key=value. A method reads
its part back with `section(cfg, ILR)`; a bad key or value raises ConfigError naming the valid
choices; `python -m metabook config CHAPTER` prints every key. Plain dataclasses, not pydantic or
tyro: the knobs are flat scalars and short lists, and Colab would have to install either.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch

PRESET_NAMES = ("smoke", "cpu", "converged", "gpu", "paper")
# `converged`: the budget the verdicts rest on (issue 19): at least 20,000 training images, enough
# epochs that the baseline has converged (the record checks it: arm <reference>_double_epochs),
# run with 3-5 seeds on CPU cores in the background (hours); only the method chapters have it.


class ConfigError(ValueError):
    """A bad chapter, preset, key or value. The message is one line and lists the valid choices."""


def knob(default, meaning: str, rule: str = "", choices=()):
    """A config field. `rule` is the valid range as text, e.g. '> 0', '>= 1 (0 = all)',
    'in [0, 1)': its leading comparison or interval is checked, the rest is a note; '' means any
    finite value. `choices` are the allowed values (of every element, for a list)."""
    meta = {"meaning": meaning, "rule": rule, "choices": tuple(choices)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- the shared knobs

@dataclass
class Run:
    """What every chapter shares: data, model, budget, optimiser, schedule, run control."""
    prefix: ClassVar[str] = ""
    dataset: str = knob("cifar10", "the images", choices=("cifar10", "cifar100", "cifar100_coarse", "synthetic"))
    train_size: int = knob(0, "training images used", ">= 0 (0 = all that are not held out)")
    meta_size: int = knob(1000, "images split off for meta batches (the meta arms train on them)", ">= 0")
    val_size: int = knob(0, "images split off for validation (tuning, val_acc): nothing trains on them",
                         ">= 0 (0 = as many as meta_size)")
    heldout_size: int = knob(10000, "images of the fixed held-out split evaluated at the end of a run "
                             "(heldout_acc: the verdicts' split; metabook.data.heldout_indices)",
                             ">= 0 (at most what the data holds; the record says how many)")
    test_size: int = knob(0, "test images used", ">= 0 (0 = all available)")
    model: str = knob("small_cnn", "the network (metabook.models)",
                      choices=("small_cnn", "plain_cnn", "res_cnn", "resnet18", "mlp", "cuda_convnet"))
    width: int = knob(32, "channels of the first stage (CNNs) or hidden units (MLP)", ">= 1")
    depth: int = knob(8, "conv layers of plain_cnn / res_cnn, hidden layers of mlp", ">= 1")
    batchnorm: bool = knob(True, "BatchNorm after every conv layer")
    epochs: float = knob(10.0, "passes over the training images (may be fractional)", "> 0")
    steps: int = knob(0, "training steps, if set (replaces epochs)", ">= 0 (0 = from epochs)")
    batch_size: int = knob(128, "images per training step", ">= 1")
    lr: float = knob(0.1, "peak learning rate", "> 0")
    momentum: float = knob(0.9, "SGD momentum", "in [0, 1)")
    nesterov: bool = knob(True, "Nesterov momentum")
    weight_decay: float = knob(5e-4, "L2 weight decay", ">= 0")
    schedule: str = knob("onecycle", "learning-rate schedule", choices=("onecycle", "cosine", "constant"))
    warmup: float = knob(0.15, "fraction of the steps spent warming up", "in [0, 1)")
    label_smoothing: float = knob(0.0, "label smoothing of the cross-entropy", "in [0, 1)")
    augment: bool = knob(True, "random crop (pad 4) + horizontal flip")
    channels_last: bool = knob(False, "NHWC memory format (faster convolutions on some CPUs)")
    device: str = knob("auto", "where to train", choices=("auto", "cpu", "cuda"))
    amp: str = knob("auto", "mixed precision of the arms whose step has no meta-gradient (baselines, Adam, "
                    "equal-weight local losses, a frozen learned loss, Grad-Instructor; meta steps stay fp32): "
                    "auto = bf16 on a GPU that has it, else fp16 with a grad scaler, off on the CPU",
                    choices=("auto", "bf16", "fp16", "off"))
    eval_every: float = knob(1.0, "epochs between evaluations", "> 0")
    checkpoint_every: int = knob(200, "steps between checkpoints", ">= 0 (0 = never)")
    on_diverge: str = knob("stop", "when a loss or meta-gradient turns NaN/inf: stop (an error naming the step) "
                           "or record (that arm and seed ends there, is evaluated as it stands and the "
                           "record marks it diverged: a collapse is a result; the converged preset)",
                           choices=("stop", "record"))
    time_budget_s: float = knob(0.0, "stop training after this many seconds of steps", ">= 0 (0 = no limit)")
    check_convergence: bool = knob(False, "also train the reference arm for twice the epochs (arm "
                                   "<reference>_double_epochs): results.convergence says whether this budget has "
                                   "converged (the baseline reaches >= 97% of its accuracy at twice the epochs)")
    same_time_steps: list[int] = knob([], "replay baseline_same_time with these steps per seed (a record's "
                                      "steps_per_seed) instead of measuring the other arm's wall-clock", ">= 1")


NOISE_KINDS = ("none", "symmetric", "uniform", "pairflip")      # data.corrupt_labels makes each


@dataclass
class Noise:
    """Label noise on the training split."""
    prefix: ClassVar[str] = "noise"
    kind: str = knob("none", "symmetric: a uniformly drawn other class; uniform: a label drawn from all "
                     "classes (MW-Net's convention); pairflip: the next class",
                     choices=NOISE_KINDS)
    rate: float = knob(0.0, "fraction of training labels corrupted", "in [0, 1)")


@dataclass
class Target:
    """Personalisation: the meta split follows a target class distribution."""
    prefix: ClassVar[str] = "target"
    classes: list[int] = knob([], "favoured classes of the target distribution, e.g. 3,5 (empty: none)", ">= 0")
    ratio: float = knob(4.0, "each favoured class this many times as likely as the others", "> 0")


SHARED = (Run, Noise, Target)


def keys_of(cls) -> dict[str, dataclasses.Field]:
    """Flat key -> field of a section."""
    return {(f"{cls.prefix}.{f.name}" if cls.prefix else f.name): f for f in dataclasses.fields(cls)}


def section(cfg: dict, cls):
    """A section's typed object from a resolved flat config, e.g. section(cfg, ILR).meta_lr."""
    return cls(**{f.name: cfg[key] for key, f in keys_of(cls).items()})


# ----------------------------------------------------------------------------- parsing and checking

_COMPARE = {">": lambda v, b: v > b, ">=": lambda v, b: v >= b, "<": lambda v, b: v < b, "<=": lambda v, b: v <= b}


def _in_range(value, rule: str) -> bool:
    m = re.match(r"(>=|>|<=|<) (-?[\d.e+-]+)", rule)
    if m:
        return _COMPARE[m[1]](value, float(m[2]))
    m = re.match(r"in ([\[(])(-?[\d.e+-]+), (-?[\d.e+-]+)([\])])", rule)
    if m:
        lo, hi = float(m[2]), float(m[3])
        return (value >= lo if m[1] == "[" else value > lo) and (value <= hi if m[4] == "]" else value < hi)
    return True


def _scalar(key: str, kind: str, value):
    """One value of type `kind` (bool, int, float, str) from a --set string or a Python value."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={value!r}: expected a boolean (true/false)")
    if kind == "str":
        return str(value)
    article = "an" if kind == "int" else "a"
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected {article} {kind}")
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: expected {article} {kind}") from None
    if kind == "int":
        if not number.is_integer():
            raise ConfigError(f"{key}={number!r} is not valid; it must be a whole number")
        return int(number)
    if not math.isfinite(number):
        raise ConfigError(f"{key}={number!r} is not valid; it must be a finite number")
    return number


def parse_value(key: str, f: dataclasses.Field, value):
    """A key's value of its field's type, checked against its range and choices."""
    kind = str(f.type)
    if kind.startswith("list["):
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
        try:
            out = [_scalar(key, kind[5:-1], v.strip() if isinstance(v, str) else v) for v in items]
        except ConfigError as err:                   # name the whole list, then the bad element
            raise ConfigError(f"{key}={value!r}: {str(err).split(': ', 1)[1]} in every place") from None
    else:
        out = _scalar(key, kind, value)
    for v in out if isinstance(out, list) else [out]:
        choices = f.metadata["choices"]
        if choices and v not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose {'from' if isinstance(out, list) else 'one of'}: "
                              f"{', '.join(map(str, choices))}")
        if not isinstance(v, (bool, str)) and not _in_range(v, f.metadata["rule"]):
            raise ConfigError(f"{key}={out!r} is not valid; it must be {f.metadata['rule']}")
    return out


def all_keys(sections) -> dict[str, dataclasses.Field]:
    """Flat key -> field over the shared sections and a chapter's own."""
    out = {}
    for cls in (*SHARED, *sections):
        out.update(keys_of(cls))
    return out


def resolve_preset(preset: str) -> str:
    """`auto` is `gpu` when CUDA is available, else `cpu`."""
    if preset == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if preset not in PRESET_NAMES:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: auto, {', '.join(PRESET_NAMES)}")
    return preset


def check_seeds(first: int, count: int = 1) -> list[int]:
    """The seeds first, first+1, ..., first+count-1, or ConfigError: numpy takes 0 .. 2**32-1."""
    if count < 1:
        raise ConfigError(f"--seeds {count} is not valid; it must be >= 1")
    if first < 0 or first + count - 1 > 2**32 - 1:
        raise ConfigError(f"--seed {first} is not valid; seeds must be in 0 .. {2**32 - 1}")
    return list(range(first, first + count))


def parse_overrides(pairs: list[str] | None) -> dict:
    """['lr=0.1', 'noise.kind=symmetric'] -> {'lr': '0.1', 'noise.kind': 'symmetric'}."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value
    return out


SHARED_PRESETS = {"smoke": {"heldout_size": 2000},     # every chapter's preset, before its own
                  "converged": {"check_convergence": True, "on_diverge": "record"}}


def make_config(sections, defaults: dict, presets: dict, preset: str, overrides: dict | None = None) -> dict:
    """Resolve the shared and the chapter's sections, the chapter's defaults, a preset and
    overrides into one checked flat dict of dotted keys (with `preset` recorded)."""
    preset = resolve_preset(preset)
    fields = all_keys(sections)
    cfg = {key: (f.default_factory() if f.default is dataclasses.MISSING else f.default) for key, f in fields.items()}
    for source in (defaults, SHARED_PRESETS.get(preset, {}), presets.get(preset, {}), overrides or {}):
        for key, value in source.items():
            if key not in fields:
                raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(fields))}")
            cfg[key] = parse_value(key, fields[key], value)
    cfg["preset"] = preset
    return cfg


def describe(sections, cfg: dict) -> list[dict]:
    """One row per key: key, type, value (as resolved in cfg), default, valid, meaning."""
    rows = []
    for key, f in all_keys(sections).items():
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        valid = (", ".join(map(str, f.metadata["choices"])) or f.metadata["rule"]
                 or {"bool": "true, false", "str": "any text"}.get(str(f.type), "any finite value"))
        rows.append({"key": key, "type": str(f.type), "value": cfg[key], "default": default, "valid": valid,
                     "meaning": f.metadata["meaning"]})
    return rows


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but CUDA is not available; choose one of: auto, cpu")
    return torch.device(name)
