"""Result records: one JSON file per run, with everything needed to trust and repeat the numbers.

A record holds chapter, method, preset, seeds, the full resolved config, the dataset (and whether
it was synthetic), the metrics, per-epoch history, costs, the comparison `arms`, and provenance
(package versions, device, git commit, date). Chapters display the recorded runs that ship with the
package as data (metabook/records/), so an installed wheel shows them too.
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import platform
import subprocess
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import torch

# The recorded runs, package data (pyproject: [tool.setuptools.package-data]); found through
# importlib.resources so that a wheel installed anywhere finds them. A plain path: notebooks join it.
RESULTS_DIR = Path(str(resources.files("metabook") / "records"))


def provenance(device: torch.device | str = "cpu") -> dict:
    from . import __version__

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        n = torch.get_num_threads()
        name = f"cpu ({platform.processor() or platform.machine()}, {n} thread{'s' if n > 1 else ''})"
    return {"metabook": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": name, "git_commit": git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def device_label(record: dict) -> str:
    """The record's device; records written before the fix say "1 threads" and read as "1 thread"."""
    return str(record.get("provenance", {}).get("device", "")).replace(" 1 threads)", " 1 thread)")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def seed_stats(values: list[float]) -> dict:
    """{'mean', 'std', 'per_seed'}; std is the sample standard deviation (0 for one seed)."""
    arr = np.asarray(values, dtype=float)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "per_seed": [float(v) for v in arr]}


def paired_difference(record: dict, arm: str, reference: str, metric: str = "heldout_acc",
                      level: float = 0.95, boot: int = 2000, seed: int = 0) -> dict:
    """`arm` minus `reference` in a run_arms record, paired by seed (same data, same initial
    weights) and, where the record kept which held-out images each run got right, by image.

    The interval: with 5 or more seeds, a t-interval over the per-seed differences; with fewer,
    a bootstrap over seeds and images (both resampled; the images are shared by the seeds, so one
    draw serves every seed) when the record has per-image correctness, else a t-interval over
    the seeds (very wide for 2-3 seeds: an honest "not resolved"). `verdict` follows from the
    interval: "ahead" above zero, "behind" below, else "not resolved"; with one seed it is always
    "not resolved" (the images' interval says nothing of another training run).
    Returns {diffs, mean, lo, hi, n_seeds, n_images, method, metric, verdict}."""
    a, b = record["arms"][arm], record["arms"][reference]
    if metric not in a or metric not in b:
        raise RecordError(f"{metric} is not in arms {arm!r} and {reference!r} of this record "
                          f"(recorded: {', '.join(k for k in b if k.endswith('_acc'))})")
    diffs = np.subtract(a[metric]["per_seed"], b[metric]["per_seed"])
    n, mean = len(diffs), float(diffs.mean())
    n_images = (record.get("dataset") or {}).get("heldout_size", 0)
    bits = metric == "heldout_acc" and n_images and "heldout_correct" in a and "heldout_correct" in b
    if n >= 5 or (n >= 2 and not bits):
        half = _t_quantile((1 + level) / 2, n - 1) * diffs.std(ddof=1) / np.sqrt(n)
        lo, hi, how = mean - half, mean + half, f"t-interval over {n} seeds"
    elif bits:
        seeds = list(a["heldout_correct"])
        lo, hi = _bootstrap(tuple(a["heldout_correct"][s] for s in seeds),
                            tuple(b["heldout_correct"][s] for s in seeds), n_images, level, boot, seed)
        how = f"bootstrap over {n} seed{'s' if n > 1 else ''} and {n_images:,} held-out images ({boot:,} draws)"
    else:
        lo, hi, how = float("nan"), float("nan"), "one seed, no per-image record: no interval"
    verdict = "ahead" if lo > 0 else "behind" if hi < 0 else "not resolved"
    if n == 1 and lo == lo:      # one seed: the interval covers the images, not a second training run
        verdict, how = "not resolved", how + "; one seed: no verdict"
    return {"diffs": [float(x) for x in diffs], "mean": mean, "lo": float(lo), "hi": float(hi), "n_seeds": n,
            "n_images": int(n_images) if bits else None, "method": how, "metric": metric, "verdict": verdict}


@functools.lru_cache(maxsize=256)      # a page asks for one pair up to three times; each takes ~1 s
def _bootstrap(a_bits: tuple, b_bits: tuple, n_images: int, level: float, boot: int, seed: int) -> tuple:
    """paired_difference's bootstrap interval over seeds and images, from each seed's packed
    per-image correctness of the two arms: (lo, hi)."""
    from .train import unpack_bits

    n = len(a_bits)
    d = np.stack([unpack_bits(x, n_images).astype(np.int8) - unpack_bits(y, n_images).astype(np.int8)
                  for x, y in zip(a_bits, b_bits)])                                          # (S, N)
    rng, draws = np.random.default_rng(seed), []
    for start in range(0, boot, 250):
        k = min(250, boot - start)
        images = rng.multinomial(n_images, np.full(n_images, 1 / n_images), size=k)      # (k, N)
        seed_w = rng.multinomial(n, np.full(n, 1 / n), size=k)                             # (k, S)
        draws.append(((d @ images.T).T * seed_w).sum(1) / (n * n_images))
    return tuple(np.quantile(np.concatenate(draws), [(1 - level) / 2, (1 + level) / 2]))


def format_difference(d: dict, unit: str = "", no_interval: str = "", mean: bool = True) -> str:
    """A paired_difference `d` as text, in points: '+1.2 [-0.3, +2.7]' (the mean, then `unit`, then
    the 95% interval), or only '[-0.3, +2.7]' without the `mean`. Where there is no interval (NaN:
    one seed without per-image records), `no_interval` stands in the interval's place
    ('+1.2 no interval'; '' leaves the mean alone). The one place a paired interval becomes text."""
    text = f"[{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]" if d["lo"] == d["lo"] else no_interval
    return f"{100 * d['mean']:+.1f}{unit} {text}".rstrip() if mean else text


def convergence(record: dict, metric: str = "heldout_acc", threshold: float = 0.97) -> dict:
    """Whether a record's budget has converged: the reference arm at its epochs against the same
    arm at twice the epochs (`<reference>_double_epochs`, which cfg check_convergence adds), seed
    by seed. Converged when the mean accuracy at the budget is at least `threshold` of the mean at
    twice the epochs (issue 19's rule). Returns {arm, epochs, double_epochs, acc, double_acc,
    ratio, per_seed_ratio, threshold, converged}."""
    ref = record.get("reference_arm", "baseline")
    double = f"{ref}_double_epochs"
    if double not in record["arms"]:
        raise RecordError(f"this record has no {double} arm (it was run without check_convergence); "
                          f"run it at the converged preset or with --set check_convergence=true")
    a, b = record["arms"][ref], record["arms"][double]
    if metric not in a or metric not in b:
        raise RecordError(f"{metric} is not in arms {ref!r} and {double!r} of this record")
    acc, acc2 = np.asarray(a[metric]["per_seed"]), np.asarray(b[metric]["per_seed"])
    ratio = float(acc.mean() / acc2.mean())
    return {"arm": ref, "epochs": a["epochs"], "double_epochs": b["epochs"], "acc": float(acc.mean()),
            "double_acc": float(acc2.mean()), "ratio": ratio, "per_seed_ratio": [float(r) for r in acc / acc2],
            "threshold": threshold, "converged": ratio >= threshold, "metric": metric}


def stability(record: dict, metric: str = "heldout_acc", margin: float = 0.05) -> dict:
    """How often each arm's seeds failed, as issue 19 asks the chapters to report it: `diverged`
    (seed -> the NaN/inf error that ended it; recorded with on_diverge=record) and `collapsed` (the
    seeds that ended within `margin` of chance, 1 / num_classes: training failed without a NaN).
    Returns arm -> {seeds, diverged, collapsed, failed, text}; text reads e.g. "1 of 5 seeds
    diverged (seed 3: step 812: ...)" or "all 5 seeds trained"."""
    chance = 1.0 / (record.get("dataset") or {}).get("num_classes", 10)
    seeds = [str(s) for s in record["seeds"]]
    out = {}
    for name, arm in record["arms"].items():
        values = arm.get(metric, arm["test_acc"])["per_seed"]
        diverged = dict(arm.get("diverged", {}))
        collapsed = [s for s, v in zip(seeds, values) if v < chance + margin and s not in diverged]
        parts = [f"{len(diverged)} of {len(seeds)} seeds diverged ("
                 + "; ".join(f"seed {s}: {msg}" for s, msg in diverged.items()) + ")"] if diverged else []
        if collapsed:
            parts.append(f"{len(collapsed)} of {len(seeds)} seeds collapsed to chance (seed "
                         + ", ".join(collapsed) + ")")
        out[name] = {"seeds": len(seeds), "diverged": diverged, "collapsed": collapsed,
                     "failed": len(diverged) + len(collapsed),
                     "text": "; ".join(parts) or (f"all {len(seeds)} seeds trained" if len(seeds) > 1 else "its one seed trained")}
    return out


_trapezoid = getattr(np, "trapezoid", None) or np.trapz      # numpy 2 renamed it


def _t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom: bisection on its CDF, the density
    integrated numerically (no scipy)."""
    def cdf(t):
        x = np.linspace(0, abs(t), 20001)
        pdf = (1 + x ** 2 / df) ** (-(df + 1) / 2)
        norm = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
        return 0.5 + math.copysign(norm * _trapezoid(pdf, x), t)
    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of `scores` for telling labels==True from False (ties count
    half): the probability that a random positive scores higher than a random negative."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    labels = torch.as_tensor(labels, dtype=torch.bool).flatten()
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("roc_auc needs at least one positive and one negative example")
    _, inverse, counts = torch.unique(torch.cat([pos, neg]), return_inverse=True, return_counts=True)
    mean_rank = torch.cumsum(counts, 0).double() - (counts.double() - 1) / 2     # ties share their mean rank
    ranks = mean_rank[inverse]
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _clean(obj):
    """JSON-safe: NaN/inf become None, tensors and numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(obj: dict, path: str | Path) -> Path:
    """Write JSON atomically (a killed run never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=1))
    os.replace(tmp, path)
    return path


def write_result(record: dict, out_dir: str | Path) -> Path:
    return write_json(record, Path(out_dir) / "result.json")


class RecordError(ValueError):
    """A result record (result.json or runs/*.json) that cannot be read. The message is one line
    naming the file and the fix."""


def load_result(path: str | Path) -> dict:
    """The record in `path` (a result.json, or a folder holding one). A file that is not a JSON
    object raises RecordError naming it; a missing one, FileNotFoundError."""
    path = Path(path)
    path = path / "result.json" if path.is_dir() else path
    record = _read_record(path)
    _note_shown([path])
    return record


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:       # JSONDecodeError is a ValueError
        raise RecordError(f"{path} is not a readable result record ({type(err).__name__}: "
                          f"{' '.join(str(err).split())}); delete it or move it aside, and run "
                          f"again to record it afresh") from None
    if not isinstance(record, dict):
        raise RecordError(f"{path} is not a result record (it holds a JSON {type(record).__name__}, "
                          f"not an object); delete it or move it aside, and run again to record it afresh")
    return record


# When this environment variable names a file, every record that a page reads (through load_result,
# recorded_runs or latest_recorded's answer) is appended to it, one result.json path a line: the
# book's build sets it, and a test checks that each committed record is read by some page.
SHOWN_LOG = "METABOOK_SHOWN_RECORDS"


def _note_shown(paths) -> None:
    if log := os.environ.get(SHOWN_LOG):
        with open(log, "a") as f:
            f.writelines(f"{Path(p).resolve()}\n" for p in paths)


def _recorded_runs(chapter: str, results_dir: str | Path) -> list[tuple[Path, dict]]:
    """(path, record) of each of a chapter's recorded runs, newest first (see recorded_runs)."""
    runs = []
    for p in sorted(Path(results_dir).glob("**/result.json")):
        try:
            runs.append((p, _read_record(p)))
        except (RecordError, OSError) as err:
            warnings.warn(f"skipped a recorded run: {err}", stacklevel=3)
    runs = [(p, r) for p, r in runs if r.get("chapter") == chapter]
    return sorted(runs, key=lambda pr: str(_field(pr[1], "provenance").get("date", "")), reverse=True)


def recorded_runs(chapter: str, results_dir: str | Path = RESULTS_DIR, preset: str | None = None,
                  seeds: int | None = None) -> list[dict]:
    """The recorded result.json files of a chapter under metabook/records/, newest first: all of them,
    or those of one preset and/or with that many seeds (only these count as read by the page).
    A record that cannot be read is skipped with a one-line warning naming it."""
    runs = [(p, r) for p, r in _recorded_runs(chapter, results_dir) if preset in (None, r.get("preset"))
            and seeds in (None, len(r.get("seeds") or ()))]
    _note_shown(p for p, _ in runs)
    return [r for _, r in runs]


def _field(record: dict, key: str) -> dict:
    """record[key] if it is a dict, else {} (a hand-edited record must not break a chapter)."""
    value = record.get(key)
    return value if isinstance(value, dict) else {}


def latest_recorded(chapter: str, preset: str, results_dir: str | Path = RESULTS_DIR,
                    where: dict | None = None) -> dict | None:
    """The newest recorded run of a chapter at a preset whose config has the `where` values
    (e.g. {"noise.kind": "pairflip"}), or None. Without a `where`, only runs of the preset as it
    is: a probe (a run whose record keeps --set overrides) is found only by a `where`, and so is a
    converged record of a budget the preset no longer trains (one that failed the convergence rule)."""
    budget = None
    if where is None and preset == "converged":
        from .config import ConfigError
        from .methods import chapter_config
        try:
            budget = chapter_config(chapter, preset)["epochs"]
        except ConfigError:       # a chapter without a converged preset has no such record
            return None
    runs = [(p, r) for p, r in _recorded_runs(chapter, results_dir) if r.get("preset") == preset
            and all(_as_text(_field(r, "config").get(k)) == _as_text(v) for k, v in (where or {}).items())
            and (where or not r.get("overrides")) and budget in (None, _field(r, "config").get("epochs"))]
    _note_shown(p for p, _ in runs[:1])
    return runs[0][1] if runs else None


def _as_text(value):
    """A list config value as older records stored it, a comma-separated string ([3, 5] -> '3,5')."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def arms_table(record: dict) -> list[dict]:
    """One row per arm: name, test accuracy mean ± std, seconds per step, ratio to the baseline."""
    rows = []
    for name, arm in record.get("arms", {}).items():
        acc = arm["test_acc"]
        rows.append({"arm": name, "test_acc": f"{100 * acc['mean']:.1f} ± {100 * acc['std']:.1f}",
                     "seeds": len(acc["per_seed"]), "s/step": round(arm["seconds_per_step"], 4),
                     "cost ratio": round(arm.get("step_cost_ratio", float("nan")), 2)})
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table (monospace), for notebooks and the command line."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    width = {c: max(len(str(c)), *(len(str(r[c])) for r in rows)) for c in cols}
    line = lambda r: "  ".join(str(r[c]).ljust(width[c]) for c in cols)
    return "\n".join([line({c: c for c in cols}), "  ".join("-" * width[c] for c in cols)] + [line(r) for r in rows])


# ----------------------------------------------------------------------------- where a notebook keeps its runs

DRIVE = Path("/content/drive/MyDrive")     # where Colab mounts Google Drive (drive.mount("/content/drive"))


def on_colab() -> bool:
    """True in a Google Colab kernel (its `google.colab` module is importable)."""
    import importlib.util

    try:
        return importlib.util.find_spec("google.colab") is not None
    except ModuleNotFoundError:           # no `google` package at all
        return False


def notebook_out_dir(name: str, preset: str, out_dir: str | Path | None = None, *,
                     drive: str | Path = DRIVE, colab: bool | None = None) -> Path:
    """The folder where a chapter notebook keeps its runs (checkpoints, finished arms, records),
    so that running the chapter again after a disconnect or a kill resumes instead of starting over.

    `out_dir` if given. Else, on Colab with Google Drive mounted at `drive`:
    drive/metabook/runs/<name>-<preset> (it outlives the VM). Else runs/<name>-<preset> under the
    book's root: the nearest folder at or above the working directory that holds _toc.yml (a
    notebook runs with its own folder, book/, as working directory), or the working directory.
    """
    if out_dir is not None and str(out_dir) != "":
        return Path(out_dir)
    colab = on_colab() if colab is None else colab
    if colab and Path(drive).is_dir():
        return Path(drive) / "metabook" / "runs" / f"{name}-{preset}"
    here = Path.cwd().resolve()
    root = next((p for p in (here, *here.parents) if (p / "_toc.yml").is_file()), here)
    return root / "runs" / f"{name}-{preset}"
