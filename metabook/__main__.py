"""metabook's command line (`python -m metabook COMMAND --help`). The notebooks call the same
functions, so both give the same numbers.

An expected failure (bad input, a bad data file, no download, a diverged or interrupted run, a
broken book source) ends in one line on stderr, `error: <cause>; <fix>`, and exit code 2 for bad
input (config, arguments, data), 1 for the others, 130 for Ctrl-C. Anything else is a bug and
shows its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (not the usage block) naming --help."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _one_line(err) -> str:
    return " ".join(str(err).split())


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m metabook", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a chapter's experiment and write DIR/result.json")
    run.add_argument("chapter")
    bench = sub.add_parser("bench", help="run the baseline and every method under the same budget and seeds "
                                         "(chapter `compare`) and print one table")
    for cmd, chapter in ((run, "CHAPTER"), (bench, "compare")):
        cmd.add_argument("--preset", default="auto")
        cmd.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
        cmd.add_argument("--seeds", type=int, default=1, help="number of seeds: seed, seed+1, ... (default 1)")
        cmd.add_argument("--out", default=None, help=f"output directory (default runs/{chapter}-PRESET)")
        cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key" + (", e.g. compare.methods=instance_lr,meta_hf"
                                                        if cmd is bench else ""))
        cmd.add_argument("--no-progress", action="store_true")
    cfg = sub.add_parser("config", help="print a chapter's keys: type, value, default, valid values, meaning")
    cfg.add_argument("chapter")
    cfg.add_argument("--preset", default="auto")
    cfg.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    cfg.add_argument("--json", action="store_true", help="print the resolved values as JSON")
    plan = sub.add_parser("plan", help="what each arm and one-off stage of a chapter costs at a preset: steps, "
                                       "FLOPs, peak memory, seconds here (measured) and on GPUs (estimated)")
    plan.add_argument("chapters", nargs="*", metavar="CHAPTER", help="default: every chapter")
    plan.add_argument("--summary", action="store_true",
                      help="print the written plan (metabook/plans.json) as a Markdown table; plans nothing")
    plan.add_argument("--preset", default="cpu")
    plan.add_argument("--seeds", type=int, default=1, help="seeds the totals count (default 1)")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--json", action="store_true", help="print one JSON object per (chapter, arm or stage)")
    plan.add_argument("--count-only", action="store_true",
                      help="FLOPs and memory only, no timing here (quicker for the gpu and paper presets)")
    plan.add_argument("--write", metavar="FILE", help="also merge the rows into FILE (JSON), replacing that "
                                                      "chapter and preset's rows (the book's plan: metabook/plans.json)")
    sw = sub.add_parser("sweep", help="run chapters' arms x seeds (x grid points) as independent units on a "
                                      "process pool, Ray or Slurm; writes the records `run` writes")
    sw.add_argument("chapters", nargs="+", metavar="CHAPTER")
    sw.add_argument("--preset", default="auto")
    sw.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    sw.add_argument("--seeds", type=int, default=1, help="number of seeds (default 1)")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="one record per value (several --grid: their product), in OUT/CHAPTER/KEY=V/")
    sw.add_argument("--out", required=True, help="sweep folder: OUT/CHAPTER[/KEY=V,...]/result.json")
    sw.add_argument("--engine", default="local", help="local (a process pool), ray or slurm (submitit)")
    sw.add_argument("--workers", type=int, default=None, help="local: processes (default: CPU count)")
    sw.add_argument("--address", default=None, help="ray: a running cluster's address (default: start one here)")
    sw.add_argument("--retries", type=int, default=2, help="re-runs of a unit whose worker died (default 2)")
    sw.add_argument("--cpus-per-unit", type=int, default=1)
    sw.add_argument("--gpus-per-unit", type=int, default=None,
                    help="default: 1 at the gpu and paper presets (device auto) or device=cuda, else 0")
    sw.add_argument("--timeout-min", type=int, default=240, help="slurm: each job's time limit")
    sw.add_argument("--partition", default=None, help="slurm: the partition")
    build = sub.add_parser("build", help="execute every chapter with papermill and render the book")
    build.add_argument("--preset", default="auto")
    build.add_argument("--build-dir", default="_build")
    build.add_argument("--no-solutions", action="store_true",
                       help="render the book without the solution cells (they still run, so the checks are tested)")
    build.add_argument("--jobs", type=int, default=None,
                       help="chapters executed at once (default: one per core, at most 4, at smoke; else 1)")
    student = sub.add_parser("student", help="write student versions of the notebooks (no solutions, the "
                                             "exercise checks kept) and, separately, the solutions set")
    student.add_argument("out_dir")
    student.add_argument("--src", default=None, help="the chapters' folder (default: ./book, else the book/ "
                                                     "beside the installed package)")
    student.add_argument("--solutions", default=None, metavar="DIR",
                         help="where the solutions set goes (default: OUT_DIR-solutions, beside OUT_DIR)")
    sub.add_parser("tables", help="rewrite the generated tables of book/intro.md and README.md from the records")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt as err:
        where = f" ({err})" if str(err) else ""
        print(f"error: interrupted (Ctrl-C){where}; run the same command again to go on (a run resumes "
              "from the last checkpoint in its --out folder)", file=sys.stderr)
        return 130


def _main(args) -> int:
    from .build import BuildError
    from .config import ConfigError, check_seeds, parse_overrides, resolve_preset
    from .data import DataError
    from .download import DownloadError
    from .results import RecordError
    from .train import NonFiniteError, RunError

    try:
        if args.command == "bench":
            args.chapter = "compare"
        if args.command in ("run", "bench"):
            from .methods import run_chapter
            from .results import format_table, arms_table

            seeds = check_seeds(args.seed, args.seeds)
            preset = resolve_preset(args.preset)
            out = Path(args.out or f"runs/{args.chapter}-{preset}")
            record = run_chapter(args.chapter, preset, seeds, out, parse_overrides(args.set),
                                 progress=not args.no_progress)
            ds = record["dataset"]
            print(f"{record['chapter']} @ {record['preset']} on {ds['name']}"
                  f"{' (SYNTHETIC data)' if ds['synthetic'] else ''}: train {ds['train_size']}, "
                  f"test {ds['test_size']} images; seeds {record['seeds']}")
            if record["chapter"] == "compare":
                from .methods.compare import table

                print(format_table(table(record)))
            else:
                print(format_table(arms_table(record)))
            print(f"wrote {out / 'result.json'}")
        elif args.command == "config":
            from .config import describe
            from .methods import chapter_config, chapter_module
            from .results import format_table

            cfg = chapter_config(args.chapter, args.preset, parse_overrides(args.set))
            if args.json:
                print(json.dumps(cfg, indent=1))
            else:
                print(f"{args.chapter} @ {cfg['preset']}: every key, its type, its value here, default, "
                      f"valid values and meaning (--json: the resolved values only)")
                print(format_table(describe(chapter_module(args.chapter).SECTIONS, cfg)))
        elif args.command == "plan":
            from .methods import CHAPTERS
            from .plan import as_json, format_plan, plan_chapter, read_plan, summary_markdown, write_plan

            if args.summary:
                print(summary_markdown(read_plan()))
                return 0

            preset = resolve_preset(args.preset)
            check_seeds(0, args.seeds)
            unknown = [c for c in args.chapters if c not in CHAPTERS]
            if unknown:
                raise ConfigError(f"unknown chapter {unknown[0]!r}; choose from: {', '.join(CHAPTERS)}")
            rows = []
            for chapter in args.chapters or list(CHAPTERS):
                print(f"planning {chapter} @ {preset} ...", file=sys.stderr)
                rows += plan_chapter(chapter, preset, parse_overrides(args.set), timed_steps=0 if args.count_only else 3)
            print(json.dumps(as_json(rows), indent=1) if args.json else format_plan(rows, args.seeds))
            if args.write:
                write_plan(rows, args.write)
                print(f"wrote {args.write}", file=sys.stderr)
        elif args.command == "sweep":
            from .sweep import overhead_line, sweep

            preset = resolve_preset(args.preset)
            res = sweep(args.chapters, preset, check_seeds(args.seed, args.seeds), args.out,
                        parse_overrides(args.set), args.grid, args.engine, args.workers, args.address,
                        args.retries, args.cpus_per_unit, args.gpus_per_unit, args.timeout_min, args.partition)
            print(overhead_line(res))
            if res["failed"]:
                first, error = next(iter(res["failed"].items()))
                more = f" and {len(res['failed']) - 1} more (listed above)" if len(res["failed"]) > 1 else ""
                print(f"error: unit {first} failed ({error}){more}; the other units finished; fix it and run "
                      f"the same command to go on", file=sys.stderr)
                return 1
        elif args.command == "build":
            from .build import build_book

            index = build_book(preset=args.preset, build_dir=args.build_dir, solutions=not args.no_solutions,
                               jobs=args.jobs)
            print(f"book: {index}")
        elif args.command == "student":
            from .build import default_book_dir, write_student_versions

            out = Path(args.out_dir)
            solutions = Path(args.solutions) if args.solutions else out.parent / f"{out.name}-solutions"
            for path in write_student_versions(args.src or default_book_dir(), out, solutions):
                print(path)
            print(f"solutions set (keep it apart from the student copies): {solutions}")
        elif args.command == "tables":
            from .build import write_generated_tables

            changed = write_generated_tables()
            print("\n".join(f"updated {p}" for p in changed) or "the tables are up to date")
    except (ConfigError, DataError, FileNotFoundError) as err:          # bad input
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (DownloadError, RecordError, NonFiniteError, RunError, BuildError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Ctrl-C (SIGINT) stops every command cleanly, exit 130, whatever the shell started us with: a
    # job started with `&` by a non-interactive shell inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt, so a download or a build could not be interrupted, although
    # the training loop (which installs its own handler) could. `kill -INT` pauses any run.
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
