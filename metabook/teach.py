"""The teaching kit's numbers: how long a chapter takes to read and to run (`chapter_times`, in each
chapter's top cell). Reading: the chapter's words, solutions excluded, at WORDS_PER_MINUTE, rounded
up to 5 minutes (not shown where the notebook file is not at hand, as on Colab). Running: per
preset, the written plan's seconds for one seed of the chapter's training runs
(metabook/plans.json), not its toys and figures; the execution statistics page has whole-chapter
times measured by the build.
"""
from __future__ import annotations

import math
from pathlib import Path

WORDS_PER_MINUTE = 150                    # technical prose with maths and code: slower than 200-250
SOLUTION_TAG = "solution"
# The devices a table shows, as the plan names them, with their column titles.
TIME_DEVICES = {"cpu": "one CPU thread (measured)", "t4": "a T4 GPU (estimated)"}


def chapter_words(nb) -> int:
    """Words a student reads in a notebook (an nbformat object): every Markdown and code cell's
    source split on whitespace, except the cells tagged `solution`."""
    return sum(len(c.source.split()) for c in nb.cells
               if SOLUTION_TAG not in c.get("metadata", {}).get("tags", []))


def reading_minutes(words: int) -> int:
    """Minutes to read `words` at WORDS_PER_MINUTE, rounded up to a multiple of 5 (at least 5)."""
    return max(5, 5 * math.ceil(words / WORDS_PER_MINUTE / 5))


def duration(seconds: float) -> str:
    """A duration as the book prints it: "< 1 s", "45 s", "12 min", "2.5 h"."""
    if seconds < 1:
        return "< 1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def run_seconds(rows: list[dict], chapter: str) -> dict[str, dict[str, float]]:
    """{preset: {device: seconds per seed}} of a book chapter ("04_instance_lr") from written plan
    rows: summed over its experiments' rows (plan.BOOK_CHAPTERS). A preset appears only when every
    experiment of the chapter has rows at it, and a device only when every such row has it."""
    from .config import PRESET_NAMES
    from .plan import BOOK_CHAPTERS

    if chapter not in BOOK_CHAPTERS:
        return {}
    experiments = BOOK_CHAPTERS[chapter]
    out = {}
    for preset in PRESET_NAMES:
        mine = [r for r in rows if r["preset"] == preset and r["chapter"] in experiments]
        if not mine or {r["chapter"] for r in mine} != set(experiments):
            continue
        out[preset] = {d: sum(r["seconds"][d] for r in mine)
                       for d in TIME_DEVICES if all(d in r["seconds"] for r in mine)}
    return out


def chapter_times_markdown(chapter: str, rows: list[dict], nb=None) -> str:
    """The Markdown of a chapter's time table: reading time (from the notebook `nb`, if given) and
    the planned run time at each preset (from plan `rows`)."""
    lines = []
    if nb is not None:
        words = chapter_words(nb)
        lines.append(f"**Reading:** about {reading_minutes(words)} min ({words:,} words at "
                     f"{WORDS_PER_MINUTE} words a minute, rounded up to 5 min).")
    else:
        lines.append("**Reading:** the notebook file is not here to count its words (the book's page "
                     "shows the reading time).")
    per_preset = run_seconds(rows, chapter)
    if not per_preset:
        lines.append("\n**Running:** this chapter trains no CIFAR-10 experiment, so the plan has no rows "
                     "for it; the book's execution statistics give the time the build measured.")
        return "\n".join(lines)
    lines += ["", "**Running** (the planner's estimate per seed for the chapter's training runs: every arm "
              "and one-off stage; toys and figures not included):", "",
              "| preset | " + " | ".join(TIME_DEVICES.values()) + " |",
              "|---|" + "---:|" * len(TIME_DEVICES)]
    for preset, secs in per_preset.items():
        lines.append(f"| `{preset}` | " + " | ".join(duration(secs[d]) if d in secs else "-" for d in TIME_DEVICES)
                     + " |")
    return "\n".join(lines)


def _find_notebook(chapter: str, book_dir=None):
    import nbformat

    for folder in ([Path(book_dir)] if book_dir else []) + [Path.cwd(), Path.cwd() / "book"]:
        path = folder / f"{chapter}.ipynb"
        if path.is_file():
            return nbformat.read(path, as_version=4)
    return None


def chapter_times(chapter: str, book_dir=None):
    """Display a chapter's reading and running times (an IPython Markdown object).

    chapter: the notebook's stem, e.g. "04_instance_lr"; book_dir: where to look for the notebook
    (default: the working directory, which is the notebook's folder in Jupyter and in the build)."""
    from IPython.display import Markdown

    from .plan import read_plan

    return Markdown(chapter_times_markdown(chapter, read_plan(), _find_notebook(chapter, book_dir)))
