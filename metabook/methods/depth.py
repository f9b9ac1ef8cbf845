"""Chapter 2's second experiment: plain deep CNNs without skip connections against the same
layers with ResNet-style skips, at several depths, same data, epochs and seeds.

This is the problem the local-loss chapter addresses: a plain stack gets harder to train by
backprop as it deepens, while the same stack with identity shortcuts does not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import knob
from ..train import Arm, Experiment, run_experiment
from .baseline import Baseline


@dataclass
class Depths:
    """The depths compared (a key without prefix)."""
    prefix: ClassVar[str] = ""
    depths: list[int] = knob([4, 8, 16, 32], "depths of the plain and the skip nets", ">= 3")


SECTIONS = (Depths,)
DEFAULTS: dict = {"model": "plain_cnn", "width": 16}
PRESETS: dict = {
    "smoke": {"train_size": 1000, "meta_size": 200, "epochs": 1.0, "depths": [4, 10], "width": 8},
    "cpu": {"train_size": 10000, "epochs": 5.0, "depths": [4, 8, 16, 32], "channels_last": True},
    "gpu": {"train_size": 20000, "epochs": 15.0, "depths": [8, 16, 32, 56], "width": 16},
    "paper": {"epochs": 160.0, "depths": [20, 32, 56, 110], "width": 16, "schedule": "cosine", "meta_size": 0},
}


def arms(depths: list[int]) -> dict[str, Arm]:
    """`plain-D` (no skips) and `skips-D` (identity shortcuts) for every depth D."""
    return {f"{kind}-{d}": Arm(Baseline, {"depth": d, "model": model})
            for d in depths for kind, model in (("plain", "plain_cnn"), ("skips", "res_cnn"))}


def experiments(cfg: dict) -> list[Experiment]:
    """For each depth: arms `plain` (no skips) and `skips` (identity shortcuts), same budget, in
    one record whose `arms` are named like `plain-16` and `skips-16`; the shallowest plain arm is
    the cost reference."""
    depths = cfg["depths"]
    return [Experiment("depth", f"plain-{depths[-1]}", arms(depths), cfg, reference=f"plain-{depths[0]}")]


def run(cfg: dict, seeds: list[int], out_dir=None, progress: bool = True, dataset=None) -> dict:
    record = run_experiment(experiments(cfg)[0], seeds, out_dir=out_dir, progress=progress, dataset=dataset)
    record["depths"] = cfg["depths"]
    return record
