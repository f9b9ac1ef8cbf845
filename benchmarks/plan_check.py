"""The planner against reality on this machine: plan a chapter, run it, compare.

    python benchmarks/plan_check.py CHAPTER [CHAPTER ...] [--preset cpu] [--out DIR]

For each chapter: the planner's rows (python -m metabook plan), then the chapter's run at the same
preset, seed 0, in DIR/CHAPTER, then the chapter's planned total (steps, evaluations, one-off
stages) against the run's CPU time (this process's, like the planner's `cpu` column: with one
thread it is the wall-clock of an idle machine, and other jobs hardly change it) and wall-clock;
and per arm the planned training seconds (steps and one-off, no evaluations) against the run's
measured train_seconds + one_off_seconds (wall-clock: comparable only on an idle machine). Run it
with OMP_NUM_THREADS=1 and a fresh DIR (a resumed run's CPU time is only its last part). Writes
DIR/plan_check.json (appending chapters) with provenance.
"""
import argparse
import json
import time
from pathlib import Path

from metabook.methods import run_chapter
from metabook.plan import as_json, plan_chapter
from metabook.results import provenance


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("chapters", nargs="+")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--out", default="runs/plan_check")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "plan_check.json"
    results = json.loads(path.read_text()) if path.exists() else {"chapters": {}}
    for chapter in a.chapters:
        t0 = time.perf_counter()
        rows = plan_chapter(chapter, a.preset)
        plan_s = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        record = run_chapter(chapter, a.preset, seeds=[0], out_dir=out / chapter, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        arms = []
        for r in (x for x in rows if x.stage == "train"):
            key = f"{r.experiment}:{r.arm}" if r.experiment else r.arm
            one_off = sum(x.seconds["cpu"] for x in rows if x.stage == "one_off" and x.arm == r.arm
                          and x.experiment == r.experiment)
            planned = r.seconds["cpu"] - r.eval_seconds["cpu"] + one_off
            sub = record["arms"] if not r.experiment else json.loads(
                (out / chapter / r.experiment / "arms.json").read_text())["arms"]
            s = sub[r.arm]
            measured = s["train_seconds"]["mean"] + s["one_off_seconds"]["mean"]
            arms.append({"arm": key, "planned_s": planned, "measured_s": measured, "ratio": planned / measured})
            print(f"{chapter:16s} {key:32s} planned {planned:8.1f} s  measured {measured:8.1f} s  "
                  f"ratio {planned / measured:5.2f}")
        total = sum(r.seconds["cpu"] for r in rows)
        print(f"{chapter:16s} {'(whole run)':32s} planned {total:8.1f} s  CPU time {cpu:8.1f} s  "
              f"ratio {total / cpu:5.2f}  (wall {wall:.0f} s; planning took {plan_s:.0f} s)")
        results["chapters"][chapter] = {"preset": a.preset, "arms": arms, "planned_total_s": total,
                                        "cpu_s": cpu, "ratio": total / cpu, "wall_s": wall,
                                        "planning_s": plan_s, "rows": as_json(rows)}
        results["provenance"] = provenance("cpu")
        path.write_text(json.dumps(results, indent=1) + "\n")
