"""Seconds per step of each arm of a chapter, timed in interleaved rounds (metabook.bench).

    python benchmarks/step_costs.py instance_lr [--preset cpu] [--steps 20] [--arms baseline,instance_lr]
                                                [--out FILE.json]

A recorded run's `step_cost_ratio` compares arms that trained one after another; this measures
them side by side on the same batches, so a machine whose load changes hits every arm alike.
"""
import argparse

from metabook import chapter_config
from metabook.train import interleaved_step_costs
from metabook.config import pick_device
from metabook.methods import CHAPTERS
from metabook.results import provenance, write_json

if __name__ == "__main__":
    with_arms = [name for name, mod in CHAPTERS.items() if hasattr(mod, "ARMS")]
    p = argparse.ArgumentParser()
    p.add_argument("chapter")
    p.add_argument("--preset", default="auto")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--arms", help="comma-separated arms to time (default: all; the baseline is always timed)")
    p.add_argument("--out")
    a = p.parse_args()
    if a.chapter not in with_arms:
        raise SystemExit(f"error: {a.chapter!r} has no ARMS table; choose one of: {', '.join(with_arms)}")
    arms = CHAPTERS[a.chapter].ARMS
    chosen = ["baseline"] + [n for n in (a.arms or ",".join(arms)).split(",") if n != "baseline"]
    if unknown := [n for n in chosen if n not in arms]:
        raise SystemExit(f"error: {a.chapter} has no arm {unknown[0]!r}; choose from: {', '.join(arms)}")
    cfg = chapter_config(a.chapter, a.preset)
    costs = interleaved_step_costs({n: arms[n] for n in chosen}, cfg, steps=a.steps)
    for name, c in costs.items():
        print(f"{name:12s} {1e3 * c['seconds_per_step']:7.1f} ms per step  {c['ratio']:.2f}x")
    if a.out:
        write_json({"chapter": a.chapter + "-step-costs", "preset": cfg["preset"], "steps": a.steps,
                    "costs": costs, "provenance": provenance(pick_device(cfg["device"]))}, a.out)
