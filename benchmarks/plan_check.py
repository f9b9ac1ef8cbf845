"""The planner against reality on this machine: run a chapter at a preset (seed 0) and compare its
CPU time with the book's written plan (metabook/plans.json), the estimate every reader sees.

    OMP_NUM_THREADS=1 python benchmarks/plan_check.py CHAPTER [CHAPTER ...] [--preset cpu] [--out DIR]

Per chapter: the whole run's CPU time (this process's: with one thread it is the wall-clock of an
idle machine, and other jobs hardly change it) against the written plan's total for the chapter
at the preset (every arm's steps and evaluations, every one-off stage); per arm (chapters whose
record has arms), plan.plan_against_run: the arm's training and one-off CPU seconds against its
rows. A resumed run's CPU time would be only its last part, so the script refuses a DIR/CHAPTER
that exists. Appends the chapter to DIR/plan_check.json, with provenance;
plan.cpu_check_markdown(json) is the README's table (metabook/records/plan_check-cpu/).
"""
import argparse
import json
import sys
import time
from pathlib import Path

from metabook.methods import run_chapter
from metabook.plan import plan_against_run, read_plan
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
    results = json.loads(path.read_text()) if path.exists() else {"preset": a.preset, "chapters": {}}
    written = read_plan()
    for chapter in a.chapters:
        if (out / chapter).exists():
            sys.exit(f"error: {out / chapter} exists; a resumed run's CPU time is only its last part: remove it first")
        rows = [r for r in written if r["chapter"] == chapter and r["preset"] == a.preset]
        if not rows or any("cpu" not in r["seconds"] for r in rows):
            sys.exit(f"error: the written plan has no cpu seconds for {chapter} at {a.preset}")
        t0, c0 = time.perf_counter(), time.process_time()
        record = run_chapter(chapter, a.preset, seeds=[0], out_dir=out / chapter, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        planned = sum(r["seconds"]["cpu"] for r in rows)
        arms = plan_against_run(record, written) if record.get("arms") else []
        for c in arms:
            print(f"{chapter:16s} {c['arm']:28s} planned {c['planned_s']:8.1f} s  measured {c['measured_s']:8.1f} s "
                  f"({c['measured_as']})  ratio {c['ratio']:5.2f}")
        print(f"{chapter:16s} {'(whole run)':28s} planned {planned:8.1f} s  CPU time {cpu:8.1f} s  "
              f"measured / planned {cpu / planned:5.2f}  (wall {wall:.0f} s)", flush=True)
        results["chapters"][chapter] = {"planned_s": planned, "cpu_s": cpu, "ratio": cpu / planned, "wall_s": wall,
                                        "arms": arms, "plan_rows": len(rows), "provenance": provenance("cpu")}
        path.write_text(json.dumps(results, indent=1) + "\n")
