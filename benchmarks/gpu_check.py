"""Time one `gpu`-preset step of every arm of every chapter on this GPU, against the planner.

    python benchmarks/gpu_check.py [--preset gpu] [--steps 5] [--budget 420] [--out gpu_check.json]

For each chapter and arm (the experiments `run` trains): a fresh model and method at the preset,
two warm-up steps, then `--steps` steps timed with CUDA events (train.StepTimer); the same step's
FLOPs and kernel launches counted (metabook.plan); the planner's per-step estimate for the device
row that matches this GPU's name (t4, a100, h100; all rows when none matches); and the peak memory
the runner records (train.step_peak_bytes: the allocator). One-off stages are not run (their units
are planned from the same per-step costs). The measured effective FLOP/s per arm is what
plan.DEVICES should assume. Stops starting new arms after `--budget` seconds (default 7 minutes),
so the whole check stays under 8 minutes; writes a JSON record with provenance. Runs on the CPU
too (`--device cpu`, for a dry run of the script itself).
"""
import argparse
import json
import time

import torch

from metabook import chapter_config
from metabook.config import pick_device
from metabook.data import load_dataset
from metabook.methods import CHAPTERS, chapter_module
from metabook.plan import DEVICES, counted
from metabook.results import provenance
from metabook.train import StepTimer, fresh_method, prepare_data, probe_step, step_peak_bytes


def device_row(name: str) -> list[str]:
    """The DEVICES rows that describe a GPU called `name` (all of them when none matches)."""
    mine = [key for key in DEVICES if key.split("_")[0] in name.lower().replace(" ", "")]
    return mine or list(DEVICES)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="gpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--budget", type=float, default=420.0, help="seconds after which no new arm starts")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--chapters", nargs="*", default=[c for c in CHAPTERS if c != "compare"],
                   help="default: every chapter (compare's arms are the method chapters')")
    p.add_argument("--out", default="gpu_check.json")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; run on a GPU machine (or --device cpu for a dry run)")
    torch.backends.cudnn.benchmark = True
    device = pick_device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows_for = device_row(name)
    t_start, results, skipped = time.perf_counter(), [], []
    dataset = None
    for chapter in a.chapters:
        cfg = chapter_config(chapter, a.preset, {"device": a.device})
        dataset = dataset if dataset and dataset.name == cfg["dataset"] else load_dataset(cfg["dataset"])
        data = prepare_data(cfg, 0, device, dataset)
        for exp in chapter_module(chapter).experiments(cfg):
            for arm_name, arm in exp.arms.items():
                if time.perf_counter() - t_start > a.budget:
                    skipped.append(f"{chapter}:{arm_name}")
                    continue
                acfg = {**exp.cfg, **arm.changes}
                method = fresh_method(arm, acfg, data, 0)
                probe_step(method, 0, acfg)
                step = counted(lambda: probe_step(method, 1, acfg))
                step.amp = method.uses_amp()          # as the planner costs it: mixed-precision rate
                timer = StepTimer(device)
                for i in range(2, 4 + a.steps):
                    timer.start()
                    probe_step(method, i, acfg)
                    timer.stop()
                seconds = sorted(timer.collect()[2:])[a.steps // 2]      # median after two more warm-ups
                del method
                peak, kind = step_peak_bytes(arm, acfg, data, 0)
                planned = {d: step.seconds()[d] for d in rows_for}
                results.append({"chapter": chapter, "arm": arm_name, "experiment": exp.label,
                                "measured_s_per_step": seconds, "planned_s_per_step": planned,
                                "ratio_planned_to_measured": {d: s / seconds for d, s in planned.items()},
                                "flops_per_step": step.flops, "launches_per_step": step.launches,
                                "effective_flops_per_s": step.flops / seconds,
                                "peak_bytes": peak, "peak_kind": kind})
                r = results[-1]
                print(f"{chapter:16s} {arm_name:20s} {1e3 * seconds:8.1f} ms measured  " +
                      "  ".join(f"{d} {1e3 * s:8.1f} ms" for d, s in planned.items()) +
                      f"  {r['effective_flops_per_s'] / 1e12:6.2f} TFLOP/s  {peak / 2**30:5.2f} GiB", flush=True)
    record = {"preset": a.preset, "device": name, "device_rows": rows_for, "steps_timed": a.steps,
              "seconds": time.perf_counter() - t_start, "arms": results, "not_timed_budget": skipped,
              "provenance": provenance(device)}
    with open(a.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {a.out} ({len(results)} arms, {len(skipped)} left out by the budget, "
          f"{record['seconds']:.0f} s)")
