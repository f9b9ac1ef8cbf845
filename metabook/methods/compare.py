"""All five methods side by side (`python -m metabook bench`): the same data, budget and seeds;
accuracy against cost. Each method keeps its chapter's setting at the preset, the bench makes the
images, epochs and batch size equal (SHARED_KEYS), and each method runs in one experiment with its
chapter's baseline and that baseline at the method's wall-clock, so every ratio (step cost, total
time with one-off stages, step memory by run_arms' one meter) is measured in the same run.
instance_lr and its baseline train under compare.noise_kind and compare.noise_rate, the others on clean
labels. Records go to OUT/<method>/arms.json, finished runs to OUT/<method>/runs/ (a killed bench
resumes there).
"""
from __future__ import annotations

from pathlib import Path

from dataclasses import dataclass
from typing import ClassVar

from ..config import NOISE_KINDS, ConfigError, knob
from ..results import RecordError, device_label, format_difference

MIN_SEEDS = 3          # a converged record's verdict counts from this many seeds on (issue 19)
# Row name -> (chapter, the method arm, the control arm that isolates the paper's claim, the claim).
# The control is what the method is credited against beside plain SGD: MLHF against Hessian-free
# without meta-learning, AdaLFL (the authors' loss network) against the same loss frozen after the
# same offline stage, local losses' learned weights against equal weights with the same dropout and
# cross-validation loop, per-instance rates against SGD that also trains on the clean meta images the
# method reads. None: the baseline is the control. The order is the book's.
METHODS: dict = {
    "local_losses": ("local_losses", "meta", "equal_dropout_cv", "meta-learned weights of local losses train a "
                     "deep plain net"),
    "instance_lr": ("instance_lr", "instance_lr", "baseline_clean", "per-instance learning rates resist label "
                    "noise"),
    "online_loss": ("online_loss", "online_authors", "offline_authors", "a loss learned online beats cross-entropy "
                    "and the loss learned offline"),
    "grad_instructor": ("grad_instructor", "grad_instructor", None, "a learned critic's gradient improves an MLP"),
    "meta_hf": ("meta_hf", "mlhf", "hf", "meta-learned damping and preconditioning improve Hessian-free"),
}
# The keys the bench sets for every method alike (its budget); everything else is the chapter's.
SHARED_KEYS = ("dataset", "train_size", "meta_size", "test_size", "epochs", "batch_size", "device",
               "eval_every", "checkpoint_every", "augment")


@dataclass
class Compare:
    """The bench's own knobs (keys compare.*)."""
    prefix: ClassVar[str] = "compare"
    methods: list[str] = knob(list(METHODS), "the methods in the table", choices=tuple(METHODS))
    noise_kind: str = knob("uniform", "label noise for the noise-targeting methods and their baseline "
                           "(uniform: MW-Net's convention, as chapter 4)",
                           choices=NOISE_KINDS)
    noise_rate: float = knob(0.4, "its rate", "in [0, 1)")


SECTIONS = (Compare,)
DEFAULTS: dict = {}
PRESETS: dict = {
    # CI: seconds per method (8 steps per arm), each method at its chapter's smoke setting.
    "smoke": {"train_size": 1000, "meta_size": 200, "test_size": 500, "epochs": 1.0, "checkpoint_every": 50},
    # 2 CPU cores: 2,000 images x 3 epochs = 45 steps per arm, so that the method, its baseline, its
    # control and the same-time baseline of all five rows fit 20 minutes of one CPU thread (3,000
    # images planned 17.6 min before the controls; 5,000, 25.4). The one-off stages and the same-time
    # baselines dominate, and so did evaluations: the table reads only the last one, so the cpu bench
    # evaluates once every 3 epochs (the same-time baselines' 15-45 epochs evaluated every epoch made
    # the plan 20.5 min). A short budget: the table is about the start of training (said where shown).
    "cpu": {"train_size": 2000, "epochs": 3.0, "eval_every": 3.0},
    # One T4: 20,000 images x 7 epochs. At 10 epochs the planner put the five rows at 35.9 min on a
    # T4 (the same-time baselines and HF/MLHF's steps dominate; the one-off stages are ~4 min).
    "gpu": {"train_size": 20000, "epochs": 7.0},
    "paper": {"epochs": 100.0},
}


def parse_methods(names: list[str]) -> list[str]:
    """The methods of compare.methods in the book's order; at least one."""
    if not names:
        raise ConfigError(f"compare.methods is empty; choose one or more of {', '.join(METHODS)}")
    return [n for n in METHODS if n in names]


def method_config(name: str, cfg: dict) -> dict:
    """The chapter's config at the bench's preset, with the bench's budget and noise imposed."""
    from . import chapter_config, chapter_module

    chapter = METHODS[name][0]
    noisy = getattr(chapter_module(chapter), "TARGETS_LABEL_NOISE", False)     # the chapter declares it
    return chapter_config(chapter, cfg["preset"], {
        **{k: cfg[k] for k in SHARED_KEYS},
        "noise.kind": cfg["compare.noise_kind"] if noisy else "none",
        "noise.rate": cfg["compare.noise_rate"] if noisy else 0.0})


def method_arms(name: str) -> dict:
    """The row's arms, as its chapter declares them: the baseline, the method and its control."""
    from . import chapter_module

    chapter, arm, control, _ = METHODS[name]
    arms = chapter_module(chapter).ARMS
    return {n: arms[n] for n in ("baseline", arm, control) if n}


def experiments(cfg: dict) -> list:
    """One train.Experiment per method of cfg['compare.methods']: its baseline, the method and the
    baseline at the method's wall-clock, on the method's chapter config with the bench's budget."""
    from ..train import Experiment

    exps = []
    for name in parse_methods(cfg["compare.methods"]):
        chapter, arm, _, _ = METHODS[name]
        exps.append(Experiment(chapter, arm, method_arms(name), method_config(name, cfg), same_time_for=arm,
                               label=name))
    return exps


def run(cfg: dict, seeds: list[int], out_dir=None, progress: bool = True, dataset=None) -> dict:
    """Every method of cfg['compare.methods'] against its baseline and its baseline at equal
    wall-clock, same budget and seeds; the record's `rows` hold the table (see `table`)."""
    from ..config import pick_device
    from ..data import load_dataset
    from ..results import provenance, write_json
    from ..train import run_experiment

    exps = experiments(cfg)
    names = [e.label for e in exps]
    dataset = dataset or load_dataset(cfg["dataset"])
    out = Path(out_dir) if out_dir else None
    rows, sub_records = {}, {}
    for name, exp in zip(names, exps):
        mcfg = exp.cfg
        sub = out / name if out else None
        rec = run_experiment(exp, seeds, out_dir=sub, progress=progress, dataset=dataset)
        if sub:          # arms.json, not result.json: the chapters' own record finders must not pick it up
            write_json(rec, sub / "arms.json")
        rows[name] = summarise(name, rec)
        sub_records[name] = {"config": mcfg, "dataset": rec["dataset"]}
    first = sub_records[names[0]]["dataset"]
    return {"chapter": "compare", "method": "compare", "preset": cfg["preset"], "seed": seeds[0],
            "seeds": list(seeds), "config": cfg, "dataset": first, "rows": rows,
            "method_configs": {n: r["config"] for n, r in sub_records.items()},
            "metrics": {f"{n}_delta": r["versus"]["baseline"]["mean"] for n, r in rows.items()},
            "provenance": provenance(pick_device(cfg["device"]))}


def summarise(name: str, rec: dict) -> dict:
    """One row of the table from a method's run_arms record: accuracies on the verdicts' split
    (held-out images; test images in records made before it existed) and the method's paired
    differences with its baseline, its control and the baseline at its wall-clock, each with a
    95% interval and a verdict (results.paired_difference)."""
    from ..results import paired_difference

    chapter, arm, control, claim = METHODS[name]
    if control and control not in rec["arms"]:
        control = None                                  # a record made before the control existed
    metric = "heldout_acc" if "heldout_acc" in rec["arms"][arm] else "test_acc"
    a, b, s = rec["arms"][arm], rec["arms"]["baseline"], rec["arms"]["baseline_same_time"]
    versus = {k: paired_difference(rec, arm, ref, metric) for k, ref in
              (("baseline", "baseline"), ("control", control), ("same_time", "baseline_same_time")) if ref}
    cfg = rec["config"]
    one_off = a["one_off_seconds"]["mean"]
    return {
        "method": name, "chapter": chapter, "arm": arm, "control": control, "claim": claim, "metric": metric,
        "model": cfg["model"], "depth": cfg["depth"], "width": cfg["width"],
        "noise": f"{cfg['noise.kind']} {cfg['noise.rate']:.0%}" if cfg["noise.kind"] != "none" else "none",
        "acc": a[metric], "baseline_acc": b[metric], "same_time_acc": s[metric],
        "control_acc": rec["arms"][control][metric] if control else None,
        "versus": versus,
        "steps": a["steps"], "same_time_steps": s["steps"], "same_time_steps_per_seed": s["steps_per_seed"],
        "same_time_stopped_early": s["stopped_early"],
        "seconds_per_step": a["seconds_per_step"], "baseline_seconds_per_step": b["seconds_per_step"],
        "step_cost_ratio": a["step_cost_ratio"],
        "train_seconds": a["train_seconds"]["mean"], "baseline_train_seconds": b["train_seconds"]["mean"],
        "one_off_seconds": one_off,
        "total_time_ratio": (a["train_seconds"]["mean"] + one_off) / b["train_seconds"]["mean"],
        "memory_bytes": a["peak_memory_bytes"], "baseline_memory_bytes": b["peak_memory_bytes"],
        "memory_ratio": a["peak_memory_bytes"] / max(b["peak_memory_bytes"], 1),
        "memory_kind": a["peak_memory_kind"],
    }


def interval(d: dict | None) -> str:
    """A paired difference as text: '+1.2 [-0.3, +2.7] not resolved' (points; results.format_difference)."""
    if d is None:
        return "-"
    if d["lo"] != d["lo"]:                              # NaN: one seed, no interval
        return format_difference(d, no_interval="(one seed: not resolved)")
    return f"{format_difference(d)} {d['verdict']}"


def table(record: dict) -> list[dict]:
    """The bench's table, one row per method: accuracy (%, mean ± std over seeds), the paired
    differences in points with their 95% intervals and verdicts, and the cost ratios."""
    pm = lambda st: f"{100 * st['mean']:.1f} ± {100 * st['std']:.1f}"
    rows = []
    for r in summaries(record):
        rows.append({"method": r["method"], "model": r["model"], "noise": r["noise"], "acc": pm(r["acc"]),
                     "vs baseline": interval(r["versus"]["baseline"]),
                     "vs control": (f"{r['control']}: " + interval(r["versus"]["control"])) if r["control"] else "-",
                     "vs baseline, same time": interval(r["versus"]["same_time"]),
                     "time/step": f"{r['step_cost_ratio']:.2f}x", "total time": f"{r['total_time_ratio']:.2f}x",
                     "memory": f"{r['memory_ratio']:.2f}x"})
    return rows


def summaries(record: dict) -> list[dict]:
    """The record's rows as `summarise` makes them (older records' rows converted)."""
    return [r if "versus" in r else summarise_old(r) for r in record["rows"].values()]


BOOK_PAGES = {"local_losses": "03_local_losses", "instance_lr": "04_instance_lr", "online_loss": "05_online_loss",
              "grad_instructor": "06_grad_instructor", "meta_hf": "07_meta_hf"}


def verdicts_markdown(record: dict, results_dir=None) -> str:
    """The landing page's table of the five verdicts: per method its claim, the measured effect
    against the baseline and, on a second row, against the claim's control where it has one (a
    control can be weaker than the baseline), each with its 95% interval and verdict, and what it
    rests on: the chapter's newest converged record where there is one (issue 19's budget), else
    the row of the bench `record` (a short budget: the start of training)."""
    from ..results import RESULTS_DIR, convergence, latest_recorded

    cfg, ds = record["config"], record["dataset"]
    bench = (f"{record['preset']} bench: {ds['train_size']:,} images, {cfg['epochs']:g} epochs, "
             f"{len(record['seeds'])} seeds, {ds.get('heldout_size') or ds['test_size']:,} "
             f"{'held-out' if ds.get('heldout_size') else 'test'} images ({record['provenance'].get('date', '')[:10]}; "
             f"start of training)")
    rows = {r["method"]: (r, bench) for r in summaries(record)}
    for name, (chapter, *_) in METHODS.items():
        rec = latest_recorded(chapter, "converged", results_dir or RESULTS_DIR)
        if rec is None:
            continue
        if len(rec["seeds"]) < MIN_SEEDS and name in rows:      # a record still being made
            r, basis = rows[name]
            rows[name] = (r, basis + f"; its converged record has {len(rec['seeds'])} of {MIN_SEEDS} seeds so far")
            continue
        r = summarise(name, rec)
        try:
            c = convergence(rec, r["metric"])
            conv = f"baseline {'converged' if c['converged'] else 'NOT converged'}: {c['ratio']:.3f} of twice the epochs"
        except RecordError:
            conv = "no convergence check"
        rd = rec["dataset"]
        rows[name] = (r, f"converged record: {rd['train_size']:,} images, {rec['config']['epochs']:g} epochs, "
                         f"{len(rec['seeds'])} seeds, {rd.get('heldout_size', 0):,} held-out images "
                         f"({rec['provenance'].get('date', '')[:10]}; {conv})")
    lines = ["| method | claim | against | effect (points, 95% interval) | verdict | rests on |",
             "|---|---|---|---|---|---|"]
    for name in METHODS:
        if name not in rows:
            continue
        r, basis = rows[name]
        # the baseline, then the control where the claim has one: a control weaker than the baseline
        # must not stand alone
        for against, d in (("baseline", r["versus"]["baseline"]), (r["control"], r["versus"].get("control"))):
            if against:
                lines.append(f"| [{name}]({BOOK_PAGES[name]}.ipynb) | {METHODS[name][3]} | {against} | "
                             f"{format_difference(d)} | {d['verdict']} | {basis} |")
    return "\n".join(lines) + "\n"


def seeds_phrase(seeds: list[int], sep: str = ", ") -> str:
    """'seed 0' or 'seeds 0, 1, 2' (sep between them)."""
    return f"seed{'s' if len(seeds) > 1 else ''} {sep.join(map(str, seeds))}"


def in_progress(record: dict) -> str:
    """For a converged record with fewer than MIN_SEEDS seeds: 'in progress: 2 of at least 3
    seeds; its verdicts may still change' (what a chapter prints beside its verdicts); else ''."""
    n = len(record["seeds"])
    return f"in progress: {n} of at least {MIN_SEEDS} seeds; its verdicts may still change" if n < MIN_SEEDS else ""


def convergence_checks(tried: list[tuple[dict | None, str]]) -> str:
    """The convergence rule (results.convergence) budget by budget, as a Markdown paragraph, or ""
    when none of them is recorded. tried: (record or None, what it is, or "") per budget tried;
    each check names the seeds it rests on (a probe has seed 0, the preset's own record more)."""
    from ..results import convergence

    def one(rec, what):
        c = convergence(rec)
        return (f"{c['epochs']:g} epochs on {seeds_phrase(rec['seeds'])}, "
                f"{100 * c['acc']:.1f}% against {100 * c['double_acc']:.1f}%: "
                f"{c['ratio']:.3f}{'' if c['converged'] else ', fails'}" + (f" ({what})" if what else ""))

    checks = "; ".join(one(rec, what) for rec, what in tried if rec)
    return f"The rule, budget by budget: {checks}.\n\n" if checks else ""


def converged_report(name: str, record: dict | None = None, results_dir=None) -> str:
    """What a method chapter shows of its converged record (issue 19), as Markdown: the budget and
    provenance, the convergence check (results.convergence), the method's paired differences with
    its baseline, its control and the baseline at its wall-clock, and each arm's seeds that
    diverged or collapsed (results.stability). Without a record (by default the chapter's newest
    at the converged preset): says so, with the planned cost and the command that makes it."""
    from ..plan import chapter_seconds, read_plan
    from ..results import RESULTS_DIR, convergence, latest_recorded, stability

    chapter = METHODS[name][0]
    record = record or latest_recorded(chapter, "converged", results_dir or RESULTS_DIR)
    if record is None:
        planned = chapter_seconds(read_plan(), chapter, "converged")
        cost = f" (planned: {3 * planned / 3600:.1f} h of one CPU thread for 3 seeds)" if planned else ""
        return (f"No converged record of this chapter yet{cost}. `python -m metabook run {chapter} --preset "
                f"converged --seeds 3` makes it; until one is recorded, this chapter's verdicts rest on the "
                f"short records above, which show the start of training.\n")
    row = summarise(name, record)
    cfg, ds, prov = record["config"], record["dataset"], record.get("provenance", {})
    lines = [f"Converged record: {ds['train_size']:,} training images, {cfg['epochs']:g} epochs, "
             f"{seeds_phrase(record['seeds'])}, "
             f"{ds.get('heldout_size', 0):,} held-out images "
             f"({device_label(record)}, commit {prov.get('git_commit')}, {str(prov.get('date', ''))[:10]}).", ""]
    if in_progress(record):
        lines += [f"**{in_progress(record).capitalize()}.** The landing page keeps the short bench's row "
                  f"until it has {MIN_SEEDS}.", ""]
    try:
        c = convergence(record, row["metric"])
        lines.append(f"Convergence check: the baseline reaches {100 * c['acc']:.1f}% at {c['epochs']:g} epochs and "
                     f"{100 * c['double_acc']:.1f}% at {c['double_epochs']:g}, a ratio of {c['ratio']:.3f}: "
                     + ("**converged** (at least 0.97)." if c["converged"] else
                        "**not converged** (below 0.97): this budget is still the start of training."))
        if c["double_acc"] < c["acc"]:
            lines.append("Twice the epochs *lowers* the baseline's accuracy here (it over-trains), so the baseline "
                         "given the method's wall-clock, which trains for more epochs still, is a weaker reference "
                         "than the baseline at equal epochs.")
    except RecordError as err:
        lines.append(f"Convergence check: not in this record ({err}).")
    lines += ["", f"`{row['arm']}` minus each reference arm, in points of {'held-out' if row['metric'] == 'heldout_acc' else 'test'} accuracy:", "",
              "| reference | its arm | difference (points, 95% interval) | verdict | how |", "|---|---|---|---|---|"]
    for key, ref in (("baseline", "baseline"), ("control", row["control"]), ("same_time", "baseline_same_time")):
        d = row["versus"].get(key)
        if d:
            lines.append(f"| {key.replace('_', ' ')} | {ref} | {format_difference(d, no_interval='(no interval)')} | "
                         f"{d['verdict']} | {d['method']} |")
    lines.append("")
    same = record["arms"].get("baseline_same_time")
    if same:
        method = record["arms"].get(record.get("method"), {})
        if cfg.get("same_time_steps"):
            how = ("replayed steps (`same_time_steps`), a budget measured outside this run: the record's "
                   "PROVENANCE says how.")
        elif same.get("same_time_ratio"):
            how = (f"the method's steps times their cost ratio, timed side by side before it trained "
                   f"({' / '.join(f'{r:.2f}' for r in same['same_time_ratio'])}), one-off stage included.")
        else:                  # records made before the side-by-side ratio (code before it)
            multiples = " / ".join(f"{n / method['steps']:.2f}" for n in same["steps_per_seed"]) if method else "?"
            how = (f"{'CPU seconds' if 'train_cpu_seconds' in method else 'wall-clock'}: the method's, over the "
                   f"baseline's per step in another run ({multiples} times the method's steps). Those two "
                   f"runs were made at different times, and a load that differed between them moves the budget.")
        lines += [f"The baseline at the method's time trained {' / '.join(f'{s:,}' for s in same['steps_per_seed'])} "
                  f"steps on {seeds_phrase(record['seeds'], ' / ')}, budgeted in {how}", ""]
    lines += [f"- `{arm}`: {s['text']}" for arm, s in stability(record, row["metric"]).items()]
    return "\n".join(lines) + "\n"


def summarise_old(row: dict) -> dict:
    """A row of a record made before the paired statistics (test_acc per seed, no control): the
    same fields, its differences as t-intervals over the seeds."""
    from ..results import paired_difference

    arms = {"m": {"test_acc": row["test_acc"]}, "b": {"test_acc": row["baseline_acc"]},
            "s": {"test_acc": row["same_time_acc"]}}
    rec = {"arms": arms, "dataset": {}}
    return {**row, "acc": row["test_acc"], "control": None, "metric": "test_acc",
            "versus": {"baseline": paired_difference(rec, "m", "b", "test_acc"), "control": None,
                       "same_time": paired_difference(rec, "m", "s", "test_acc")}}
