"""The planner: what a chapter costs before it runs (`python -m metabook plan`).

For every arm and one-off stage of a chapter's experiments at a preset: its steps, FLOPs
(torch.utils.flop_counter, per real-size step, plus the evaluations), peak memory (the runner's
own meter, train.step_peak_bytes) and seconds: measured here as one thread's CPU time (`cpu`), and
estimated for the GPUs of DEVICES from FLOPs and kernel launches, counted on a GPU's code path
(train.gpu_path). One-off stages are measured at two small sizes and extrapolated linearly. The
README compares the plan with real runs; benchmarks/gpu_check.py compares its GPU rows on a GPU.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .config import PRESET_NAMES, pick_device
from .data import load_dataset
from .train import COUNTING_FOR_GPU, Method, eval_row, fresh_method, per_example, prepare_data, probe_step, step_peak_bytes


PLAN_FILE = Path(__file__).resolve().parent / "plans.json"     # the book's plan, shipped with the package


@dataclass(frozen=True)
class Device:
    fp32_flops_per_s: float     # effective throughput assumed for these small CIFAR models, full precision
    amp_flops_per_s: float      # the same for an arm whose step autocasts (Method.uses_amp)
    launch_s: float             # seconds per kernel launch assumed (eager PyTorch, one op per kernel)
    assumes: str


# Assumptions, not measurements: benchmarks/gpu_check.py measures them when a GPU is at hand.
# Peak figures are NVIDIA's data-sheet numbers (dense); "effective" is the share a small CIFAR
# network reaches in eager mode, a guess until gpu_check.py replaces it.
DEVICES = {
    "t4": Device(4e12, 16e12, 10e-6, "T4: 4 TFLOP/s effective in fp32 (8.1 peak), 16 with fp16 autocast "
                                     "(65 peak); 10 us a kernel"),
    "a100": Device(20e12, 60e12, 6e-6, "A100: 20 TFLOP/s effective in fp32/TF32 (19.5/156 peak), 60 with bf16 "
                                       "autocast (312 peak); 6 us a kernel"),
    "h100": Device(40e12, 150e12, 5e-6, "H100 SXM: 40 TFLOP/s effective in fp32/TF32 (67/495 peak), 150 with "
                                        "bf16 autocast (989 peak); 5 us a kernel"),
}


@dataclass
class Cost:
    """The cost of one unit of work (a step, an evaluation, a one-off stage)."""
    flops: float = 0.0
    launches: int = 0           # kernels a GPU would launch (operators that are not views)
    cpu_s: float = 0.0          # measured here
    amp: bool = False           # runs in mixed precision on a GPU

    def __add__(self, other: Cost) -> Cost:
        """The FLOPs, launches and CPU time of both (for GPU seconds of parts in different
        precisions, add their seconds: _sum_seconds)."""
        return Cost(self.flops + other.flops, self.launches + other.launches, self.cpu_s + other.cpu_s,
                    self.amp and other.amp)

    def __mul__(self, k: float) -> Cost:
        return Cost(self.flops * k, round(self.launches * k), self.cpu_s * k, self.amp)

    def seconds(self) -> dict[str, float]:
        """device -> seconds; no "cpu" when this machine's time was not measured (count_only)."""
        here = {} if math.isnan(self.cpu_s) else {"cpu": self.cpu_s}
        rate = lambda d: d.amp_flops_per_s if self.amp else d.fp32_flops_per_s
        return {**here, **{name: self.flops / rate(d) + self.launches * d.launch_s for name, d in DEVICES.items()}}


@dataclass
class PlanRow:
    chapter: str
    preset: str
    arm: str
    stage: str                  # "train" (the arm's steps and evaluations) or "one_off"
    steps: int
    flops: float
    launches: int
    peak_bytes: int
    peak_kind: str
    seconds: dict[str, float]   # device -> estimated seconds per seed ("cpu": measured here)
    eval_seconds: dict[str, float] = field(default_factory=dict)   # the part of `seconds` that evaluates
    experiment: str = ""        # which experiment of the chapter (chapter 8: the method)
    config_sha: str = ""        # of the arm's config: a written plan is stale when it changes
    units: str = ""             # one-off: what `steps` counts (the config key)
    notes: list[str] = field(default_factory=list)


class _Counter(TorchDispatchMode):
    """FLOPs of the operators that run (torch.utils.flop_counter's formulas: matmuls,
    convolutions, attention; forward and backward) and how many ran, views excluded (about the
    kernels a GPU would launch). One plain dispatch mode: unlike FlopCounterMode it adds no
    module hooks, so the memory meter around it sees only the step's own tensors."""

    def __init__(self):
        super().__init__()
        self.flops, self.launches = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.launches += not func.is_view
        if func.overloadpacket in flop_registry:
            self.flops += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def counted(fn) -> Cost:
    """FLOPs and launches of one call of fn(), on a GPU's path (train.gpu_path) wherever it runs:
    they price only the GPUs."""
    token = COUNTING_FOR_GPU.set(True)
    try:
        with _Counter() as counter:
            fn()
    finally:
        COUNTING_FOR_GPU.reset(token)
    return Cost(float(counter.flops), counter.launches)


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    """Median seconds of `repeats` calls of fn() (NaN for none): on CUDA the wall-clock; on the
    CPU this process's CPU time, which other jobs on the machine change far less (with one thread
    it is the wall-clock of an idle machine; with more it is their sum, a safe upper bound)."""
    if repeats == 0:
        return float("nan")
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = clock()
        fn()
        _sync(device)
        times.append(clock() - t0)
    return float(np.median(times))


def _sum_seconds(*costs: Cost) -> dict[str, float]:
    """device -> the seconds of several costs together (each at its own precision)."""
    parts = [c.seconds() for c in costs]
    return {d: sum(p[d] for p in parts) for d in parts[0]}


# Keys that decide which arms a chapter runs, or what happens after a divergence, but not what one
# arm's training costs: an arm's plan row stays valid when they change (the coverage test checks
# that every arm that runs has its row). The older ilr.arms, ll.arms and hf.arms are of this kind
# too but are still hashed: taking them out would make every written row stale at once, so they
# join at the next full re-plan.
ARM_SET_KEYS = ("check_convergence", "on_diverge", "lfl.arms", "gi.arms")


def config_sha(cfg: dict) -> str:
    """The hash of an arm's config that its plan rows carry, to tell when they went stale."""
    cost = {k: v for k, v in cfg.items() if k not in ARM_SET_KEYS}
    return hashlib.sha256(json.dumps(cost, sort_keys=True, default=str).encode()).hexdigest()[:12]


def evaluation_count(total: int, steps_per_epoch: int, eval_every: float) -> int:
    """How many times the loop evaluates in `total` steps (train.train's rule)."""
    every = max(1, round(eval_every * steps_per_epoch))
    return total // every + (total % every != 0)


def _step_and_eval(method: Method, cfg: dict, data, timed_steps: int) -> tuple[Cost, Cost, Cost]:
    """(one step, one evaluation, the final held-out evaluation) of a fresh method: steps 0 and 1
    counted (their mean), steps 2.. timed; then one evaluation (test, validation, diagnostics) and
    the held-out one, counted and timed."""
    device = data.train.y.device
    step = counted(lambda: [probe_step(method, i, cfg) for i in (0, 1)]) * 0.5
    step.amp = method.uses_amp()
    i = iter(range(2, 10**9))
    step.cpu_s = timed(lambda: probe_step(method, next(i), cfg), device, timed_steps)
    streams, spe = method.ctx.streams, method.ctx.steps_per_epoch

    def one_eval():
        with torch.no_grad():
            eval_row(method, method.model, data, streams, 1, spe, cfg["lr"], {"n": 0}, 0.0, {})
    evaluation = counted(one_eval)
    evaluation.cpu_s = timed(one_eval, device, min(timed_steps, 1))
    heldout = counted(lambda: per_example(method.model, data.heldout))
    heldout.cpu_s = timed(lambda: per_example(method.model, data.heldout), device, min(timed_steps, 1))
    return step, evaluation, heldout


def _one_off(arm, cfg: dict, data, seed: int, time_it: bool = True) -> tuple[Cost, int, str, int, str, str] | None:
    """(cost, units, unit key, peak bytes, peak kind, how it was measured) of the arm's prepare(),
    or None if it has none. Method.one_off_units names the config keys its cost is about linear
    in, each with a small value: prepare() is measured with every key at its small value and once
    more per key at twice it, and extrapolated linearly in each key to the configured values (a
    key configured at most twice its small value is measured as configured)."""
    from .bench import peak_step_bytes

    method = arm.factory(cfg)
    if type(method).prepare is Method.prepare:
        return None
    device = data.train.y.device
    spec = method.one_off_units or ()
    pairs = [spec] if spec and isinstance(spec[0], str) else list(spec)
    scaled = [(k, small) for k, small in pairs if cfg[k] > 2 * small]
    base = {**cfg, **dict(scaled)}
    costs, peaks = [], []
    for c in [base] + [{**base, k: 2 * small} for k, small in scaled]:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            method, box = fresh_method(arm, c, data, seed), {}
            peak, kind = peak_step_bytes(lambda: box.setdefault("cost", counted(method.prepare)), device)
            cost = box["cost"]
            cost.cpu_s = timed(fresh_method(arm, c, data, seed).prepare, device) if time_it else float("nan")
        costs.append(cost)
        peaks.append(peak)
    key = pairs[0][0] if pairs else ""
    units = cfg[key] if key else 1
    if not scaled:
        return costs[0], units, key, peaks[0], kind, "measured"
    total, a = costs[0], costs[0]
    for (k, small), b in zip(scaled, costs[1:]):
        per_unit = Cost(max(b.flops - a.flops, 0.0), max(b.launches - a.launches, 0), max(b.cpu_s - a.cpu_s, 0.0)) * (1 / small)
        total = total + per_unit * (cfg[k] - small)
    how = "; ".join(f"{k}: measured at {small:g} and {2 * small:g}, extrapolated linearly to {cfg[k]:g}" for k, small in scaled)
    return total, units, key, max(peaks), kind, how


def plan_experiment(exp, preset: str, seed: int = 0, dataset=None, timed_steps: int = 3) -> list[PlanRow]:
    """The rows of one train.Experiment: every arm's training (and its one-off stage), and the
    reference arm at the same-time arm's wall-clock when the experiment has one. timed_steps=0
    counts FLOPs and memory only (no "cpu" seconds: quicker for presets meant for a GPU)."""
    device = pick_device(exp.cfg["device"])
    dataset = dataset or load_dataset(exp.cfg["dataset"])
    data = prepare_data(exp.cfg, seed, device, dataset)
    rows, totals, per_step = [], {}, {}
    for name, arm in exp.arms.items():
        cfg = {**exp.cfg, **arm.changes}
        total = data.total_steps(cfg)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            step, evaluation, heldout = _step_and_eval(fresh_method(arm, cfg, data, seed), cfg, data, timed_steps)
        # the runner's own number, on this machine's path: on a CPU, HF's linearized Gauss-Newton
        # products hold more than a GPU's jvps (189 MB against 130 for three, CUDA-convnet, batch 128)
        peak, kind = step_peak_bytes(arm, cfg, data, seed)
        n_eval = evaluation_count(total, len(data.train), cfg["eval_every"])
        train_cost = step * total + evaluation * n_eval + heldout
        seconds = _sum_seconds(step * total, evaluation * n_eval + heldout)
        per_step[name] = (step, evaluation)
        base = dict(chapter=exp.chapter, preset=preset, arm=name, peak_kind=kind, experiment=exp.label,
                    config_sha=config_sha(cfg))
        rows.append(PlanRow(**base, stage="train", steps=total, flops=train_cost.flops,
                            launches=train_cost.launches, peak_bytes=peak, seconds=seconds,
                            eval_seconds=(evaluation * n_eval + heldout).seconds(),
                            notes=[f"{n_eval} evaluations of {len(data.test.y)} test + {len(data.val.y)} "
                                   f"validation images, one of {len(data.heldout.y)} held-out images"]))
        totals[name] = seconds
        one_off = _one_off(arm, cfg, data, seed, time_it=timed_steps > 0)
        if one_off:
            cost, units, key, opeak, okind, how = one_off
            rows.append(PlanRow(**{**base, "peak_kind": okind}, stage="one_off", steps=units, flops=cost.flops,
                                launches=cost.launches, peak_bytes=opeak, seconds=cost.seconds(), units=key,
                                notes=[how]))
            totals[name] = {d: totals[name][d] + s for d, s in cost.seconds().items()}
    if exp.same_time_for:        # the reference arm for the target arm's wall-clock, on each device
        step, evaluation = per_step[exp.reference]
        budget = totals[exp.same_time_for]
        here = "cpu" if "cpu" in budget else "t4"
        steps = max(1, math.floor(budget[here] / max(step.seconds()[here], 1e-12)))
        n_eval = evaluation_count(steps, len(data.train), exp.cfg["eval_every"])
        ref_row = next(r for r in rows if r.arm == exp.reference and r.stage == "train")
        cost = step * steps + evaluation * n_eval
        rows.append(PlanRow(chapter=exp.chapter, preset=preset, arm=f"{exp.reference}_same_time", stage="train",
                            steps=steps, flops=cost.flops, launches=cost.launches, peak_bytes=ref_row.peak_bytes,
                            peak_kind=ref_row.peak_kind, experiment=exp.label, config_sha=ref_row.config_sha,
                            seconds={d: budget[d] + (evaluation * n_eval).seconds()[d] for d in budget},
                            eval_seconds=(evaluation * n_eval).seconds(),
                            notes=[f"{exp.same_time_for}'s time on each device (steps: as on {here})"]))
    return rows


def plan_chapter(chapter: str, preset: str, overrides: dict | None = None, seed: int = 0,
                 dataset=None, timed_steps: int = 3) -> list[PlanRow]:
    """Every row of a chapter's experiments at a preset."""
    from .methods import chapter_config, chapter_module

    cfg = chapter_config(chapter, preset, overrides)
    rows = []
    for exp in chapter_module(chapter).experiments(cfg):
        for row in plan_experiment(exp, cfg["preset"], seed, dataset, timed_steps):
            row.chapter = chapter          # chapter 8's experiments are the method chapters' arms
            rows.append(row)
    return rows


def chapter_seconds(rows: list[dict], chapter: str, preset: str, device: str = "cpu") -> float:
    """A chapter's estimated seconds per seed on `device` (rows as written: dicts)."""
    return sum(r["seconds"][device] for r in rows if r["chapter"] == chapter and r["preset"] == preset)


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def format_plan(rows: list[PlanRow], seeds: int = 1) -> str:
    """A text table of the rows (per seed), a total per chapter (times `seeds`), and what each
    device's estimate assumes."""
    devices = [d for d in ("cpu", *DEVICES) if all(d in r.seconds for r in rows)]
    head = f"{'chapter':16s} {'arm':28s} {'stage':8s} {'steps':>7s} {'TFLOP':>8s} {'peak':>9s} " + \
        " ".join(f"{d:>9s}" for d in devices)
    lines = [head, "-" * len(head)]
    for chapter in dict.fromkeys(r.chapter for r in rows):
        mine = [r for r in rows if r.chapter == chapter]
        for r in mine:
            arm = f"{r.experiment}:{r.arm}" if r.experiment else r.arm
            lines.append(f"{chapter:16s} {arm:28s} {r.stage:8s} {r.steps:7d} {r.flops / 1e12:8.2f} "
                         f"{r.peak_bytes / 2**20:7.0f}Mi " + " ".join(f"{_fmt_s(r.seconds[d]):>9s}" for d in devices))
        total = {d: seeds * sum(r.seconds[d] for r in mine) for d in devices}
        peak = max(r.peak_bytes for r in mine)
        lines.append(f"{chapter:16s} {'TOTAL x' + str(seeds) + ' seed(s)':28s} {'':8s} {'':7s} {'':8s} "
                     f"{peak / 2**20:7.0f}Mi " + " ".join(f"{_fmt_s(total[d]):>9s}" for d in devices))
    lines.append("")
    lines.append(f"cpu: measured on this machine, CPU time with {torch.get_num_threads()} thread(s); peak: "
                 f"{rows[0].peak_kind if rows else ''}")
    lines += [f"{name}: {d.assumes}" for name, d in DEVICES.items()]
    return "\n".join(lines)


def as_json(rows: list[PlanRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def summary_markdown(rows: list[dict]) -> str:
    """A Markdown table of written rows: per chapter and preset, the steps, TFLOPs, the largest
    peak memory and the seconds per seed on every device (summed over arms and one-off stages)."""
    devices = ["cpu", *DEVICES]
    lines = ["| chapter | preset | steps | TFLOP | peak memory | " + " | ".join(devices) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(devices)]
    keys = dict.fromkeys((r["chapter"], r["preset"]) for r in rows)
    for chapter, preset in sorted(keys, key=lambda k: (PRESET_NAMES.index(k[1]), k[0])):
        mine = [r for r in rows if r["chapter"] == chapter and r["preset"] == preset]
        cells = []
        for d in devices:
            known = [r["seconds"][d] for r in mine if d in r["seconds"]]
            cells.append(_fmt_s(sum(known)) if len(known) == len(mine) else "-")
        lines.append(f"| {chapter} | {preset} | {sum(r['steps'] for r in mine if r['stage'] == 'train'):,} | "
                     f"{sum(r['flops'] for r in mine) / 1e12:,.1f} | "
                     f"{max(r['peak_bytes'] for r in mine) / 2**30:.2f} GiB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The book's chapters and the experiments (methods.CHAPTERS) each one runs at its preset.
BOOK_CHAPTERS = {"02_baseline": ("baseline", "depth"), "03_local_losses": ("local_losses",),
                 "04_instance_lr": ("instance_lr",), "05_online_loss": ("online_loss",),
                 "06_grad_instructor": ("grad_instructor",), "07_meta_hf": ("meta_hf",), "08_compare": ("compare",)}


def plan_against_run(record: dict, rows: list[dict]) -> list[dict]:
    """The planner checked against a recorded run of the same config on the CPU: per arm, the
    planned seconds of its training steps (one CPU thread, evaluations left out) and of its
    one-off stage against the run's measured ones (seed means: CPU seconds where the record kept
    them, less moved by other jobs; else wall-clock, `measured_as`), and measured / planned. Rows whose
    config hash differs from the run's arm are skipped (the plan is of another config). Knobs added
    after the run was recorded take the preset's values (the run did what their defaults do), and
    so does `same_time_steps` (a replay of the same-time arm's budget: its measured steps are read
    from the run)."""
    out = []
    from .methods import chapter_config, chapter_module

    preset = chapter_config(record["chapter"], record["preset"])
    cfg = {**preset, **record["config"],      # a replayed same-time budget changes that arm's steps only (read below)
           "same_time_steps": preset["same_time_steps"]}
    arm_cfgs = {n: {**exp.cfg, **a.changes} for exp in chapter_module(record["chapter"]).experiments(cfg)
                for n, a in exp.arms.items()}
    for name, arm in record["arms"].items():
        mine = [r for r in rows if r["chapter"] == record["chapter"] and r["preset"] == record["preset"]
                and r["arm"] == name]
        train = next((r for r in mine if r["stage"] == "train"), None)
        if train is None or "cpu" not in train["seconds"]:
            continue
        own = arm_cfgs.get(name, arm_cfgs.get(record.get("reference_arm", "baseline")))    # same-time: the reference's
        if train["config_sha"] != config_sha(own):
            continue
        planned = train["seconds"]["cpu"] - train["eval_seconds"].get("cpu", 0.0)
        cpu = "train_cpu_seconds" in arm            # CPU seconds where the run kept them, else wall-clock
        measured = arm["train_cpu_seconds" if cpu else "train_seconds"]["mean"]
        row = {"arm": name, "steps": arm["steps"], "planned_s": planned, "measured_s": measured,
               "measured_as": "cpu time" if cpu else "wall-clock",
               "ratio": measured / planned if planned else float("nan")}
        stage = next((r for r in mine if r["stage"] == "one_off"), None)
        if stage is not None:
            key = "one_off_cpu_seconds" if "one_off_cpu_seconds" in arm else "one_off_seconds"
            row.update(one_off_planned_s=stage["seconds"]["cpu"], one_off_measured_s=arm[key]["mean"])
        out.append(row)
    return out


def within_plan(ratio: float, factor: float = 1.5) -> bool:
    """Is measured / planned within `factor` either way (issue 17's check of the planner)?"""
    return 1 / factor <= ratio <= factor


def plan_check_markdown(records: list[dict], rows: list[dict]) -> str:
    """A Markdown table of plan_against_run for recorded runs: per chapter and arm, planned and
    measured seconds of the steps, their ratio, and whether it is within 1.5x either way."""
    lines = ["| chapter @ preset | arm | steps | planned (one thread) | measured | measured / planned | within 1.5x |",
             "|---|---|---:|---:|---:|---:|---|"]
    for rec in records:
        for c in plan_against_run(rec, rows):
            lines.append(f"| {rec['chapter']} @ {rec['preset']} | {c['arm']} | {c['steps']:,} | {_fmt_s(c['planned_s'])} | "
                         f"{_fmt_s(c['measured_s'])} ({c['measured_as']}) | {c['ratio']:.2f} | "
                         f"{'yes' if within_plan(c['ratio']) else 'no'} |")
    return "\n".join(lines)


def cpu_check_markdown(check: dict) -> str:
    """A Markdown table of benchmarks/plan_check.py's file: per chapter, the written plan's seconds
    of one CPU thread against the CPU time of a run of the chapter (seed 0), their ratio, and
    whether it is within 1.5x either way."""
    lines = ["| chapter @ preset | planned (one thread) | measured (CPU time) | measured / planned | within 1.5x |",
             "|---|---:|---:|---:|---|"]
    for chapter, c in check["chapters"].items():
        lines.append(f"| {chapter} @ {check['preset']} | {_fmt_s(c['planned_s'])} | {_fmt_s(c['cpu_s'])} | "
                     f"{c['ratio']:.2f} | {'yes' if within_plan(c['ratio']) else 'no'} |")
    return "\n".join(lines)


def read_plan(path=PLAN_FILE) -> list[dict]:
    """The rows of a written plan ([] if there is none)."""
    path = Path(path)
    return json.loads(path.read_text())["rows"] if path.exists() else []


def write_plan(rows: list[PlanRow], path=PLAN_FILE) -> None:
    """Merge `rows` into the plan at `path`: the (chapter, preset) pairs they cover are replaced;
    `sources` keeps the provenance of every planning run whose rows are still there."""
    from .results import provenance

    path = Path(path)
    old = json.loads(path.read_text()) if path.exists() else {}
    covered = sorted({f"{r.chapter}@{r.preset}" for r in rows})
    kept = [r for r in old.get("rows", []) if f"{r['chapter']}@{r['preset']}" not in covered]
    sources = [{**s, "covers": [c for c in s["covers"] if c not in covered]} for s in old.get("sources", [])]
    sources = [s for s in sources if s["covers"]] + [{"made": provenance(pick_device("auto")), "covers": covered}]
    path.write_text(json.dumps({"sources": sources, "devices": {
        "cpu": f"measured on this machine: CPU time with {torch.get_num_threads()} thread(s)",
        **{n: d.assumes for n, d in DEVICES.items()}}, "rows": kept + as_json(rows)}, indent=1) + "\n")
