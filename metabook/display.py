"""What the chapters show: their one-cell start (`chapter_start`), recorded tables as HTML (`table`),
live code listings (`listing`) and numbers glued into the prose from the records (`glue`).
`glue` writes the output myst-nb's `glue(..., display=False)` writes, so the build (papermill,
then Jupyter Book with execution off) fills the prose from the executed notebook, while the
chapters need neither myst-nb nor pandas (Colab has neither pinned).
"""
from __future__ import annotations

import html
import inspect
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

from .results import arms_table, format_difference, format_table, paired_difference

GLUE_PREFIX = "application/papermill.record/"    # myst-nb's (and scrapbook's) glue mime prefix


# ----------------------------------------------------------------------------- the chapter's start


@dataclass
class Start:
    """What a chapter's first cell sets up. cfg: the chapter's resolved config at `preset`;
    overrides: the --set style overrides the chapter's runs pass on (the dataset, if asked for);
    out_dir: where the chapter keeps its runs (they resume)."""
    preset: str
    cfg: dict
    overrides: dict
    out_dir: Path


def chapter_start(name: str, chapter: str | None, preset: str, seed: int = 0, dataset: str | None = None,
                  out_dir=None, *, show: bool = True) -> Start:
    """Resolve the preset (auto: gpu with CUDA, else cpu), the chapter's config and its runs'
    folder, seed torch, and print one provenance line (and the runs' folder) when `show`.

    name: the notebook's stem ("04_instance_lr"); chapter: the method's name ("instance_lr"), or
    None for a chapter without an experiment of its own (chapter 1: cfg is {}, no runs' folder
    is printed)."""
    import torch

    from . import __version__
    from .config import resolve_preset
    from .methods import chapter_config
    from .results import notebook_out_dir

    preset = resolve_preset(preset)
    overrides = {"dataset": dataset} if dataset else {}
    start = Start(preset=preset, cfg=chapter_config(chapter, preset, overrides) if chapter else {}, overrides=overrides,
                  out_dir=notebook_out_dir(name, preset, out_dir))
    torch.manual_seed(seed)
    if show:
        print(f"metabook {__version__}, torch {torch.__version__}, preset {preset}, "
              f"{torch.get_num_threads()} CPU threads, CUDA: {torch.cuda.is_available()}")
        if chapter:
            print(f"runs kept in {start.out_dir} (run the chapter again to resume)")
    return start


# ----------------------------------------------------------------------------- tables


class Table:
    """Rows (a list of dicts with the same keys) shown as an HTML table in a notebook or a book
    page, and as the monospace `format_table` text where HTML is not shown (a terminal, print)."""

    def __init__(self, rows: list[dict], caption: str = ""):
        self.rows, self.caption = list(rows), caption

    def __repr__(self) -> str:
        return (self.caption + "\n" if self.caption else "") + format_table(self.rows)

    def _repr_html_(self) -> str:
        if not self.rows:
            return "<p>(no rows)</p>"
        cell = lambda tag, v: f"<{tag}>{html.escape(str(v))}</{tag}>"
        cols = list(self.rows[0])
        head = "<tr>" + "".join(cell("th", c) for c in cols) + "</tr>"
        body = "".join("<tr>" + "".join(cell("td", r.get(c, "")) for c in cols) + "</tr>" for r in self.rows)
        caption = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        return (f'<table class="table metabook-table">{caption}<thead>{head}</thead>'
                f"<tbody>{body}</tbody></table>")


def table(rows: list[dict], caption: str = "") -> Table:
    """An HTML table of `rows` (see Table); the last expression of a cell, or display(table(...))."""
    return Table(rows, caption)


def arms(record: dict | None, caption: str = "") -> Table:
    """The recorded arms of `record` (results.arms_table: test accuracy, seeds, cost) as a table."""
    return Table(arms_table(record) if record else [], caption)


def _paired(record: dict, arm: str, other: str, metric: str | None) -> tuple[str, dict]:
    """(metric, results.paired_difference): the held-out split where the record has it, else test."""
    key = metric or ("heldout_acc" if "heldout_acc" in record["arms"][arm] else "test_acc")
    return key, paired_difference(record, arm, other, metric=key)


def comparisons(record: dict, arm: str, metric: str | None = None) -> list[dict]:
    """One row per other arm of `record`: the paired difference arm - other on `metric` (default:
    the held-out split where the record has it, else the test split), with its 95% interval and
    verdict word from results.paired_difference, never typed."""
    rows = []
    for other in record["arms"]:
        if other == arm:
            continue
        key, d = _paired(record, arm, other, metric)
        rows.append({"comparison": f"{arm} - {other}", "metric": key, "seeds": len(d["diffs"]),
                     "difference (points)": f"{100 * d['mean']:+.1f}",
                     "95% interval": format_difference(d, no_interval="no interval", mean=False),
                     "verdict": d["verdict"]})
    return rows


def claim(claim: str, test: str, record: dict | None, arm: str, other: str, related: str = "not obtained",
          metric: str | None = None) -> dict:
    """One row of a claims table: what was measured (the paired difference arm - other, with its
    interval, metric and setting) and the verdict word of results.paired_difference; "not run" /
    "not tested" when the record, an arm or the metric is missing."""
    arms = record["arms"] if record is not None else {}
    if arm not in arms or other not in arms or any(metric and metric not in arms[a] for a in (arm, other)):
        return {"claim": claim, "test": test, "measured": "not run", "related number": related,
                "verdict": "not tested"}
    key, d = _paired(record, arm, other, metric)
    c = record["config"]
    where = (f"target classes {c['target.classes']}" if c.get("target.classes") else
             f"{c['noise.kind']} {c['noise.rate']:.0%} noise" if c.get("noise.kind", "none") != "none"
             else "clean labels")
    return {"claim": claim, "test": test,
            "measured": f"{format_difference(d, ' points', 'no interval')} ({d['method']}), {key}, {where}",
            "related number": related, "verdict": f"{arm} against {other}: {d['verdict']}"}


# ----------------------------------------------------------------------------- listings


class Listing:
    """The live source of a function or class, highlighted as Python in HTML, plain in text."""

    def __init__(self, obj):
        self.name = getattr(obj, "__qualname__", str(obj))
        self.source = inspect.getsource(obj)

    def __repr__(self) -> str:
        return self.source

    def _repr_html_(self) -> str:
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import PythonLexer

        return highlight(self.source, PythonLexer(), HtmlFormatter(cssclass="highlight", noclasses=True))


def listing(*objs):
    """Show the live source of each of `objs` (functions, classes or methods), in order, so the
    text a chapter shows is the code that runs and cannot drift from it."""
    from IPython.display import display

    for obj in objs:
        display(Listing(obj))


# ----------------------------------------------------------------------------- glued numbers


MISSING = (TypeError, KeyError, ValueError, IndexError, ZeroDivisionError, AttributeError)


def glue(name: str, value) -> None:
    """Make `value` available to the page's prose as {glue:text}`name:.1f` (or {glue}`name`),
    without showing it here. A number is glued as a float, a string as its text (a verdict word:
    {glue:text}`name` reads "ahead", not "'ahead'"); None becomes nan (the prose then
    reads "nan": a missing record is visible, and the build does not stop). Numpy scalars are
    glued as plain floats (myst-nb formats the repr, and np.float32(0.5) would not parse).
    `value` may be a function of no arguments that reads a record, glue("x", lambda: rec["a"]["b"]):
    its result is glued, or nan where it raises one of MISSING (the record lacks what it reads)."""
    from IPython.display import display

    if callable(value):
        try:
            value = value()
        except MISSING:
            value = None
    if value is None:
        value = float("nan")
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)      # numpy scalars too
    text = repr(float(value)) if number else value if isinstance(value, str) else repr(value)
    display({GLUE_PREFIX + "text/plain": text}, raw=True,
            metadata={"scrapbook": {"name": name, "mime_prefix": GLUE_PREFIX}})


def percent(record: dict | None, arm: str, metric: str = "test_acc", stat: str = "mean",
            seed: int | None = None) -> float:
    """100 x an arm's recorded metric: its mean or std over seeds, or one seed's value (the
    seed's position in the record's seeds). nan when the record or the value is missing."""
    try:
        m = record["arms"][arm][metric]
        value = m["per_seed"][record["seeds"].index(seed)] if seed is not None else m[stat]
        return 100 * float(value)
    except (TypeError, KeyError, ValueError, IndexError):
        return math.nan


def glue_percents(prefix: str, record: dict | None, arms: list[str], metric: str = "test_acc") -> None:
    """Glue prefix_ARM (mean, %) and prefix_ARM_std for each arm, and prefix_ARM_sK for each seed K."""
    for arm in arms:
        glue(f"{prefix}_{arm}", percent(record, arm, metric))
        glue(f"{prefix}_{arm}_std", percent(record, arm, metric, "std"))
        for seed in (record or {}).get("seeds", []):
            glue(f"{prefix}_{arm}_s{seed}", percent(record, arm, metric, seed=seed))


def glue_difference(key: str, record: dict | None, arm: str, reference: str) -> None:
    """Glue key_mean, key_lo, key_hi (points) and key_verdict of `arm` minus `reference` in the
    record (results.paired_difference on the held-out images); nan where the record is missing."""
    d = paired_difference(record, arm, reference) if record else None
    for part in ("mean", "lo", "hi"):
        glue(f"{key}_{part}", 100 * d[part] if d else None)
    glue(f"{key}_verdict", d["verdict"] if d else None)
