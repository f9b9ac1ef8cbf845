"""Build the book (`python -m metabook build`, `make book`): copy the sources to _build/src, execute
each chapter of _toc.yml there with papermill (PRESET injected; the first failing cell stops the
build with a BuildError naming it), keep the executed copies for nbval, tag them for rendering
(solutions behind a toggle, the injected cell folded) and run `jupyter-book build -W -n`, so any
Sphinx warning fails the build; Jupyter Book executes nothing itself. Also here: the student and
solutions versions of the notebooks, whose exercises are a `scaffold` cell, a `solution` cell and a
`check` cell (metadata.exercise = "4.2"), and the generated tables of the landing page and README.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import nbformat
import yaml

PRESETS = ("smoke", "cpu", "gpu", "paper", "auto")
SOLUTION_TAG = "solution"
SCAFFOLD_TAG = "scaffold"       # the exercise cell a student completes
CHECK_TAG = "check"             # the assert cell that passes only with a correct answer
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
# What the build copies from the repository root into _build/src/ (when present).
BOOK_SOURCES = ("_config.yml", "_toc.yml", "book", "_static")
IGNORED = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "*.pyc", ".DS_Store")


class BuildError(RuntimeError):
    """The book could not be built. The message is one line saying which chapter (and cell),
    file or step failed, and what to do."""


def _one_line(text) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------
# The table of contents
# --------------------------------------------------------------------------------------------


def _toc_files(entry: dict) -> list[str]:
    """The `file:` entries of one _toc.yml node and of everything nested under it, in order."""
    files = [entry["file"]] if "file" in entry else []
    for key in ("parts", "chapters", "sections"):
        for child in entry.get(key, []) or []:
            files += _toc_files(child)
    return files


def _toc_pages(root: Path) -> list[Path]:
    """Every page in `_toc.yml` (root first), as a path with its real suffix (.md or .ipynb)."""
    toc_path = root / "_toc.yml"
    if not toc_path.exists():
        raise BuildError(f"no table of contents: {toc_path} does not exist")
    try:
        toc = yaml.safe_load(toc_path.read_text(encoding="utf-8"))
        if not isinstance(toc, dict) or "root" not in toc:
            raise ValueError("it has no `root:` entry")
        names = [toc["root"]] + _toc_files(toc)
        if not all(isinstance(n, str) for n in names):
            raise ValueError("a `root:` or `file:` entry is not a file name")
    except (yaml.YAMLError, ValueError, TypeError, AttributeError, KeyError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        if isinstance(err, yaml.YAMLError) and mark is not None:
            why = f"YAML error at line {mark.line + 1}, column {mark.column + 1}: {err.problem}"
        elif isinstance(err, ValueError):
            why = _one_line(err)
        else:
            why = f"{type(err).__name__}: {_one_line(err)}"
        raise BuildError(f"{toc_path} is not a valid table of contents ({why}); fix it: it needs "
                         f"`root: intro` and `chapters:` (or `parts:`) entries of `- file: book/NAME`") from None
    pages = []
    for name in names:
        base = root / name
        candidates = [base] if base.suffix in (".ipynb", ".md") else [
            base.with_name(base.name + ".ipynb"), base.with_name(base.name + ".md")]
        found = [p for p in candidates if p.exists()]
        if not found:
            raise BuildError(
                f"_toc.yml lists {name!r}, but none of {[str(p) for p in candidates]} exists")
        pages.append(found[0])
    return pages


def chapters_from_toc(root: str | Path = ".") -> list[Path]:
    """The notebooks listed in `root/_toc.yml`, in the order of the table of contents."""
    return [p for p in _toc_pages(Path(root)) if p.suffix == ".ipynb"]


# --------------------------------------------------------------------------------------------
# Notebook edits: render tags, student versions
# --------------------------------------------------------------------------------------------


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _add_tag(cell, tag: str) -> None:
    tags = cell.setdefault("metadata", {}).setdefault("tags", [])
    if tag not in tags:
        tags.append(tag)


def _as_dropdown(markdown: str, title: str) -> str:
    """Wrap Markdown in a MyST admonition that renders closed, behind a toggle."""
    ticks = max(map(len, re.findall("`+", markdown)), default=0)  # the fence must be longer
    fence = "`" * max(3, ticks + 1)
    header = f"{fence}{{admonition}} {title}\n:class: dropdown solution\n\n"
    return f"{header}{markdown.strip()}\n{fence}\n"


def _as_terminal_shows_it(text: str) -> str:
    """Apply carriage returns the way a terminal or Jupyter does: each '\\r' rewinds the line.

    A progress bar is hundreds of '\\r'-separated updates of one line; this keeps its final state.
    """
    lines = []
    for line in text.split("\n"):
        shown: list[str] = []
        for segment in line.split("\r"):
            shown[:len(segment)] = segment
        lines.append("".join(shown).rstrip() if "\r" in line else line)
    return "\n".join(lines)


def _tidy_streams(cell) -> None:
    """Merge consecutive stdout/stderr outputs of a cell and resolve their carriage returns."""
    merged = []
    for out in cell.get("outputs", []):
        if (out.get("output_type") == "stream" and merged
                and merged[-1].get("output_type") == "stream"
                and merged[-1].get("name") == out.get("name")):
            merged[-1]["text"] += out["text"]
        else:
            merged.append(out)
    for out in merged:
        if out.get("output_type") == "stream" and "\r" in out["text"]:
            out["text"] = _as_terminal_shows_it(out["text"])
    cell["outputs"] = merged


def tag_for_rendering(nb, solutions: bool = True) -> None:
    """Prepare an executed notebook for Jupyter Book (in place).

    solutions=False drops the cells tagged `solution` (a public book without them); the checks
    keep the outputs they had when the chapter was executed with its solutions.

    - A code cell tagged `solution` gets `hide-cell`: its source and outputs sit behind a
      "Show solution" toggle.
    - A Markdown cell tagged `solution` is wrapped in a closed dropdown admonition titled
      "Solution". (myst-nb ignores tags on Markdown cells.) Such a cell must not contain a heading.
    - The cell that papermill injects (tag `injected-parameters`) is folded away. It can still
      be opened, so a reader can see which preset produced the page.
    - Progress bars show their final line, not one line per update.
    """
    if not solutions:
        nb.cells = [c for c in nb.cells if SOLUTION_TAG not in _tags(c)]
    for cell in nb.cells:
        if cell.cell_type == "code":
            _tidy_streams(cell)
        tags = _tags(cell)
        if SOLUTION_TAG in tags and cell.cell_type == "code":
            _add_tag(cell, "hide-cell")
            cell.metadata["mystnb"] = {"code_prompt_show": "Show solution",
                                       "code_prompt_hide": "Hide solution"}
        elif SOLUTION_TAG in tags and cell.cell_type == "markdown":
            cell.source = _as_dropdown(cell.source, "Solution")
        elif INJECTED_TAG in tags:
            _add_tag(cell, "hide-cell")
            cell.metadata["mystnb"] = {
                "code_prompt_show": "Show the parameters this page was executed with",
                "code_prompt_hide": "Hide the parameters"}


def _cleared(nb):
    """A deep copy of the notebook without outputs or execution counts."""
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)
    return nb


def student_version(nb):
    """A copy of the notebook without the cells tagged `solution` and without any outputs.

    The check cells stay, tagged `raises-exception`: until the student completes the scaffold
    above a check, the check fails, and a run of the whole notebook (nbclient, papermill) goes on
    past it."""
    nb = _cleared(nb)
    nb.cells = [c for c in nb.cells if SOLUTION_TAG not in _tags(c)]
    for cell in nb.cells:
        if CHECK_TAG in _tags(cell):
            _add_tag(cell, "raises-exception")
    return nb


def solutions_version(nb):
    """The teacher's copy: every cell, the solutions included, without outputs."""
    return _cleared(nb)


def default_book_dir() -> Path:
    """The chapters' folder: ./book if it exists, else the book/ beside the installed package
    (a checkout with an editable install)."""
    return Path("book") if Path("book").is_dir() else Path(__file__).resolve().parent.parent / "book"


def write_student_versions(src_dir: str | Path, out_dir: str | Path,
                           solutions_dir: str | Path | None = None) -> list[Path]:
    """Write the exercise version of every notebook in `src_dir` into `out_dir`, and, if
    `solutions_dir` is given, the solutions set there (every notebook with its solutions, no
    outputs). The two folders must differ, so that the student folder can be handed out.

    Cells tagged `solution` are dropped and outputs are cleared (the recorded runs that chapters
    display ship with the package, metabook/records/). Returns the paths of the student notebooks.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    notebooks = sorted(src_dir.glob("*.ipynb"))
    if not notebooks:
        raise BuildError(f"no notebooks in {src_dir}; pass the book's folder with --src (the repository's book/)")
    if solutions_dir is not None and Path(solutions_dir).resolve() == out_dir.resolve():
        raise BuildError(f"the solutions folder is the student folder ({out_dir}); choose another --solutions")
    written = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if solutions_dir is not None:
            Path(solutions_dir).mkdir(parents=True, exist_ok=True)
        for path in notebooks:
            try:
                nb = nbformat.read(path, as_version=4)
            except ValueError as err:                    # not JSON, not a notebook
                raise BuildError(f"{path} is not a readable notebook ({_one_line(err)[:200]})") from None
            target = out_dir / path.name
            nbformat.write(student_version(nb), target)
            written.append(target)
            if solutions_dir is not None:
                nbformat.write(solutions_version(nb), Path(solutions_dir) / path.name)
    except (OSError, shutil.Error) as err:
        raise BuildError(f"cannot write the student notebooks to {out_dir} ({type(err).__name__}: "
                         f"{_one_line(getattr(err, 'strerror', None) or err)}); choose a folder "
                         f"you can write to") from None
    return written


# --------------------------------------------------------------------------------------------
# The install cell: the repository URL from _config.yml, pinned to the commit that renders
# --------------------------------------------------------------------------------------------

INSTALL_MARK = "# metabook-install"     # ends the one %pip line of a chapter that the build pins
_INSTALL_LINE = re.compile(r'^(?P<indent>[ \t]*)%pip install -q "metabook @ [^"]*"[^\n]*' + re.escape(INSTALL_MARK)
                           + r"[^\n]*$", re.M)


def repository_url(root: str | Path = ".") -> str:
    """`repository.url` of root/_config.yml: the one place the repository's address is written."""
    path = Path(root) / "_config.yml"
    try:
        url = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("repository", {}).get("url")
    except (OSError, yaml.YAMLError, AttributeError) as err:
        raise BuildError(f"cannot read repository.url from {path} ({type(err).__name__}: "
                         f"{_one_line(err)}); it needs `repository:` with `url: https://...`") from None
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise BuildError(f"{path} has no usable repository.url (found {url!r}); set it to the "
                         f"repository's https address")
    return url.rstrip("/")


def book_version(root: str | Path = ".") -> tuple[str, str]:
    """(ref, note): the git commit that is rendering the book (`git rev-parse HEAD` in root), or,
    outside a git checkout, the package version's tag (v0.1.0) with a note saying so."""
    from . import __version__

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=root, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if re.fullmatch(r"[0-9a-f]{40}", commit):
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=root, timeout=10).stdout.strip()
        return commit, (f"pinned to commit {commit[:12]}, the one that rendered this page"
                        + (" (plus uncommitted changes to it)" if dirty else ""))
    return (f"v{__version__}", f"pinned to the tag v{__version__} (the package version): this page was "
                               f"built outside a git checkout, so its commit is unknown")


def pin_install_cells(nb, url: str, ref: str, note: str) -> int:
    """Rewrite the marked install line of `nb` (in place) to install metabook from `url` at
    `ref`, with `note` as its comment. Returns the number of lines rewritten."""
    line = f'%pip install -q "metabook @ git+{url}@{ref}"  {INSTALL_MARK}: {note}'
    count = 0
    for cell in nb.cells:
        if cell.cell_type == "code" and INSTALL_MARK in cell.source:
            cell.source, n = _INSTALL_LINE.subn(lambda m: m["indent"] + line, cell.source)
            count += n
    return count


def _check_parameters_cell(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    n = sum(PARAMETERS_TAG in _tags(c) for c in nb.cells if c.cell_type == "code")
    if n != 1:
        raise BuildError(f"{path.name}: needs exactly one code cell tagged "
                         f"'{PARAMETERS_TAG}' (it defines PRESET), found {n}")


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------


def _copy_sources(root: Path, src: Path) -> None:
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for name in BOOK_SOURCES:
        path = root / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=IGNORED)
        elif path.is_file():
            shutil.copy2(path, src / name)


def _select(chapters: list[Path], wanted) -> list[Path]:
    """The chapters named in `wanted` (file stems such as '02_baseline', or paths), or all."""
    if wanted is None:
        return chapters
    stems = {p.stem: p for p in chapters}
    selected = []
    for name in wanted:
        stem = Path(name).stem
        if stem not in stems:
            raise BuildError(f"unknown chapter {name!r}; the chapters are: {', '.join(stems)}")
        selected.append(stems[stem])
    return [p for p in chapters if p in selected]


def default_jobs(preset: str) -> int:
    """Chapters executed at once: at `smoke`, one per core (at most 4), each kernel with its share
    of the cores; at a real budget one, so that the costs a chapter measures share the machine
    with nothing else."""
    return min(os.cpu_count() or 1, 4) if preset == "smoke" else 1


def expected_seconds(stems: list[str], preset: str, last_report: dict | None = None) -> dict[str, float]:
    """Each chapter's expected execution seconds, to start the longest first: what the last build
    at this preset measured (`last_report`), else the written plan's training time of one CPU
    thread at the preset (0 for a chapter without rows: chapters 1 and 9 train nothing)."""
    if last_report and last_report.get("preset") == preset:
        measured = {c["chapter"]: c["seconds"] for c in last_report.get("chapters", [])
                    if isinstance(c.get("seconds"), (int, float))}
        if set(stems) <= set(measured):
            return {s: float(measured[s]) for s in stems}
    from .plan import read_plan
    from .teach import run_seconds

    rows = read_plan()
    return {s: float(run_seconds(rows, s).get(preset, {}).get("cpu", 0.0)) for s in stems}


def _execute_timed(nb_path: Path, parameters: dict, kernel_name: str, name: str, failed_dir: Path) -> float:
    """_execute in a worker process of the build's pool; returns its wall-clock seconds."""
    t0 = time.perf_counter()
    _execute(nb_path, parameters, kernel_name, name, failed_dir)
    return time.perf_counter() - t0


def _execute(nb_path: Path, parameters: dict, kernel_name: str, name: str, failed_dir: Path) -> None:
    """Execute one notebook in place with papermill, or raise BuildError naming the cell."""
    import papermill  # imported here: `import metabook.build` stays cheap

    try:
        papermill.execute_notebook(
            str(nb_path), str(nb_path), parameters=parameters,
            kernel_name=kernel_name, cwd=str(nb_path.parent),
            progress_bar=False, log_output=False)
    except papermill.PapermillExecutionError as err:
        failed_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(nb_path, failed_dir / nb_path.name)  # papermill saved it with the error
        first_line = (err.source or "").strip().splitlines()[:1]
        raise BuildError(
            f"chapter {name} failed in cell In [{err.exec_count}] "
            f"({first_line[0] if first_line else 'empty cell'!r}): {err.ename}: {_one_line(err.evalue)}; "
            f"the executed notebook with the traceback: {failed_dir / nb_path.name}") from err
    except Exception as err:  # the kernel died, could not start, timed out, ...
        raise BuildError(f"chapter {name} could not be executed: "
                         f"{type(err).__name__}: {_one_line(err)}") from err


def _jupyter_book(src: Path, out: Path) -> subprocess.CompletedProcess:
    """Run `jupyter-book build SRC --path-output OUT -W -n --keep-going` with this Python.

    jupyter-book 1.x has no `python -m jupyter_book` entry point, so call its CLI function in a
    child process of the same interpreter (the same venv, whatever PATH says).
    """
    cmd = [sys.executable, "-c",
           "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
           "build", str(src), "--path-output", str(out), "-W", "-n", "--keep-going"]
    return subprocess.run(cmd, capture_output=True, text=True)


def kernel_environment(root: str | Path, kernels: int = 1) -> dict[str, str]:
    """os.environ as the chapter kernels need it, whatever their working directory.

    `root` goes first on PYTHONPATH (so `import metabook` works from a checkout that is not
    pip-installed), and a relative METABOOK_DATA is made absolute (against the current
    directory) because kernels run in the notebook's folder. With `kernels` > 1 running side by
    side, each gets its share of the cores (OMP_NUM_THREADS), unless the caller set it.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(root).resolve()),
                                                      env.get("PYTHONPATH")]))
    if env.get("METABOOK_DATA"):
        env["METABOOK_DATA"] = os.path.abspath(env["METABOOK_DATA"])
    if kernels > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // kernels))
    return env


@contextlib.contextmanager
def temporary_environ(env: dict[str, str]):
    """Temporarily replace os.environ (papermill's kernels inherit it)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --------------------------------------------------------------------------------------------
# After the build: how to execute at a real budget, and how long that takes (the planner's table)
# --------------------------------------------------------------------------------------------

PLANS = "plans.json"      # the planner's estimates, package data: metabook/plans.json
# Which of the planner's devices each preset is meant for (name prefixes of its `seconds` keys).
PRESET_DEVICES = {"cpu": ("cpu",), "gpu": ("t4",)}


def next_steps_message(plans: str | Path | None = None) -> str:
    """What `make book` prints last: how to execute the chapters at `cpu` or `gpu`, with the
    planner's estimated time for each (seconds per seed, as the chapters run one seed, summed over
    every arm and one-off stage of every chapter), read from metabook/plans.json: {"rows": [...]}
    or a bare list of rows {chapter, preset, arm, steps, flops, peak_bytes, seconds: {device: s}}.
    Without that file it names the command that prints the estimates."""
    from importlib import resources

    from .teach import duration

    path = Path(plans) if plans is not None else Path(str(resources.files("metabook") / PLANS))
    head = "To execute the chapters at a real budget (the prose discusses the recorded cpu runs either way):"
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        rows = rows.get("rows") if isinstance(rows, dict) else rows
        assert isinstance(rows, list) and all(isinstance(r, dict) for r in rows)
    except (OSError, ValueError, AssertionError):
        return (f"{head}\n  make book PRESET=cpu     # a laptop, no GPU\n  make book PRESET=gpu     # one CUDA GPU\n"
                f"How long each takes: python -m metabook plan --preset cpu   (and --preset gpu)")
    lines = [head]
    for preset, prefixes in PRESET_DEVICES.items():
        totals: dict[str, dict[str, float]] = {}          # device -> chapter -> seconds
        for row in (r for r in rows if r.get("preset") == preset):
            for device, sec in (row.get("seconds") or {}).items():
                if device.startswith(prefixes) and isinstance(sec, (int, float)):
                    per = totals.setdefault(device, {})
                    per[str(row.get("chapter"))] = per.get(str(row.get("chapter")), 0.0) + sec
        if not totals:
            lines.append(f"  make book PRESET={preset:4s}   # no {preset} estimate in {path.name}: "
                         f"python -m metabook plan --preset {preset}")
            continue
        for device, per in totals.items():
            slowest = max(per, key=per.get)
            lines.append(f"  make book PRESET={preset:4s}   # planned on {device}: {duration(sum(per.values()))} "
                         f"in all; longest: {slowest}, {duration(per[slowest])}")
    lines.append("Per chapter and arm: python -m metabook plan --preset cpu   (or gpu)")
    return "\n".join(lines)


STATS_PAGE = "book/execution_statistics.md"     # a placeholder in the repository; the build writes it
# The device whose seconds the statistics page shows for a preset (the plan's `seconds` keys).
STATS_DEVICE = {"smoke": "cpu", "cpu": "cpu", "converged": "t4", "gpu": "t4", "paper": "t4"}
_DEVICE_WORDS = {"cpu": "one CPU thread, measured", "t4": "T4, estimated"}


def execution_statistics_markdown(report: dict, rows: list[dict]) -> str:
    """The execution-statistics page (Markdown) from a build report (build_report.json: the preset,
    the seconds and status per chapter) and the written plan's rows (plan.read_plan): one table,
    a row per chapter, with the seconds this build took and the planner's seconds per seed at
    each preset it has rows for (on one CPU thread for smoke and cpu, on a T4 for the others)."""
    from .teach import duration, run_seconds

    chapters = report.get("chapters", [])
    planned = {c["chapter"]: run_seconds(rows, c["chapter"]) for c in chapters}
    presets = [p for p in STATS_DEVICE if any(p in per for per in planned.values())]
    preset = report.get("preset", "?")
    head = ["chapter", f"this build (`{preset}`)"] + [
        f"plan: `{p}` ({_DEVICE_WORDS[STATS_DEVICE[p]]})" for p in presets]
    lines = ["# Execution statistics", "",
             f"This build executed the chapters at the `{preset}` preset on {report.get('started', '?')} "
             f"(Python {report.get('python', '?')}, {report.get('platform', '?')}). The first column is each "
             f"whole chapter's wall-clock time in this build; a chapter marked *reused* kept its outputs from "
             f"an earlier build. The other columns are the planner's seconds for one seed of the chapter's "
             f"training runs (every arm and one-off stage; not its toys and figures), from the written plan "
             f"`metabook/plans.json` (`python -m metabook plan --summary`). `-`: the plan has no such "
             f"estimate.", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    total = 0.0
    for c in chapters:
        if c.get("status") == "executed" and isinstance(c.get("seconds"), (int, float)):
            built = duration(c["seconds"])
            total += c["seconds"]
        else:
            built = f"*{c.get('status', '?')}*"
        cells = [f"{{doc}}`{c['chapter']}`", built]
        for p in presets:
            sec = planned[c["chapter"]].get(p, {}).get(STATS_DEVICE[p])
            cells.append(duration(sec) if sec is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    jobs = report.get("jobs", 1)
    together = (f" They executed {jobs} at a time, each kernel with its share of the cores, so a chapter's "
                f"time includes the machine's sharing, and the build took {duration(report['execution_seconds'])} "
                f"of wall-clock." if jobs > 1 and "execution_seconds" in report else "")
    lines += ["", f"The chapters executed in this build took {duration(total)} in all.{together}"]
    return "\n".join(lines) + "\n"


def write_execution_statistics(src: Path, report: dict, rows: list[dict] | None = None) -> Path | None:
    """Write the statistics page into the build's copy of the sources (src/STATS_PAGE), if the
    book has that page (_toc.yml lists it; the repository holds a placeholder). Returns its path."""
    from .plan import read_plan

    page = Path(src) / STATS_PAGE
    if not page.exists():
        return None
    page.write_text(execution_statistics_markdown(report, read_plan() if rows is None else rows),
                    encoding="utf-8")
    return page


GENERATED_PAGES = ("book/intro.md", "README.md")


def generated_tables() -> dict[tuple[str, str], Callable[[], str]]:
    """The tables that the committed pages show between `<!-- NAME start -->` and `<!-- NAME end -->`,
    each made from the records and the written plan when called, as {(page, NAME): make}. Tests
    check that the pages show them; `python -m metabook tables` writes them after a record lands."""
    from .methods.compare import verdicts_markdown
    from .plan import plan_check_markdown, read_plan, summary_markdown
    from .results import latest_recorded

    chapters = ("local_losses", "instance_lr", "online_loss", "grad_instructor", "meta_hf")
    converged = lambda: [r for c in chapters if (r := latest_recorded(c, "converged")) is not None]
    return {("book/intro.md", "verdicts"): lambda: verdicts_markdown(latest_recorded("compare", "cpu")),
            ("README.md", "plan-check"): lambda: plan_check_markdown(converged(), read_plan()),
            ("README.md", "plan-table"): lambda: summary_markdown(read_plan())}


def write_generated_tables(root: str | Path = ".") -> list[Path]:
    """Write generated_tables() into the pages under `root`; returns the pages that changed."""
    changed = []
    for page in GENERATED_PAGES:
        path = Path(root) / page
        text = new = path.read_text(encoding="utf-8")
        for (where, name), make in generated_tables().items():
            start, end = f"<!-- {name} start -->\n", f"<!-- {name} end -->"
            if where == page:
                head, rest = new.split(start, 1)
                new = head + start + make().strip("\n") + "\n" + end + rest.split(end, 1)[1]
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


def _read_report(path: Path) -> dict | None:
    """The last build's report, or None where there is none (or it cannot be read)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def build_book(preset: str = "auto", root: str | Path = ".", build_dir: str | Path = "_build",
               chapters=None, kernel_name: str = "python3", parameters: dict | None = None,
               solutions: bool = True, jobs: int | None = None) -> Path:
    """Execute the chapters at `preset` and render the book. Returns the path of index.html.

    `build_dir` is taken relative to `root` unless it is absolute. Layout:
    `src/` (the executed sources), `executed/<chapter>.ipynb` (for nbval), `html/` (the book),
    `build_report.json` (the preset and seconds per chapter), `jupyter-book.log`.

    `chapters` (stems like "02_baseline") executes only those chapters. The others reuse the
    notebook from the last build in `executed/` if there is one, else they render without
    outputs. `parameters` are injected next to PRESET (e.g. {"DATASET": "synthetic"}).
    `auto` is resolved here (gpu with CUDA, else cpu), so the report names the real preset.
    solutions=False renders the book without the solution cells (they are still executed, so the
    exercise checks run against them). `jobs` chapters execute at once (default: `default_jobs`),
    the longest first (`expected_seconds`); a chapter that fails stops the ones not started yet
    and the build.
    """
    if preset not in PRESETS:
        raise BuildError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    from .config import resolve_preset

    preset = resolve_preset(preset)
    parameters = {"PRESET": preset, **(parameters or {})}
    root = Path(root).resolve()
    build_dir = Path(build_dir)
    build_dir = (build_dir if build_dir.is_absolute() else root / build_dir).resolve()
    src, executed = build_dir / "src", build_dir / "executed"

    all_chapters = chapters_from_toc(root)
    selected = _select(all_chapters, chapters)
    for path in selected:
        _check_parameters_cell(path)
    try:
        _copy_sources(root, src)
        executed.mkdir(parents=True, exist_ok=True)
    except (OSError, shutil.Error) as err:
        raise BuildError(f"cannot write the build folder {build_dir} ({type(err).__name__}: "
                         f"{_one_line(getattr(err, 'strerror', None) or err)}); choose another "
                         f"--build-dir") from None
    shutil.rmtree(build_dir / "failed", ignore_errors=True)
    if chapters is None:  # a full build: no stale executed notebooks for nbval to pick up
        for old in executed.glob("*.ipynb"):
            old.unlink()

    report = {"preset": preset, "parameters": parameters,
              "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "metabook_data": kernel_environment(root).get("METABOOK_DATA"),
              "python": platform.python_version(), "platform": platform.platform(),
              "chapters": []}
    report_path = build_dir / "build_report.json"

    last_report = _read_report(report_path)
    todo = []
    for i, path in enumerate(all_chapters, start=1):
        entry = {"chapter": path.stem, "notebook": str(path.relative_to(root))}
        report["chapters"].append(entry)
        if path in selected:
            todo.append((i, path, entry))
        else:
            if (executed / path.name).exists():
                shutil.copy2(executed / path.name, src / path.relative_to(root))
                entry.update(status="reused", seconds=None)
            else:
                entry.update(status="not executed", seconds=None)
            print(f"[{i}/{len(all_chapters)}] {path.stem} ... {entry['status']}", flush=True)

    if jobs is not None and jobs < 1:
        raise BuildError(f"jobs must be 1 or more (got {jobs}); leave it out for the default ({default_jobs(preset)})")
    jobs = max(1, min(jobs or default_jobs(preset), len(todo) or 1))
    if jobs > 1:      # the longest first, so that no long chapter starts last (the report keeps TOC order)
        expected = expected_seconds([path.stem for _, path, _ in todo], preset, last_report)
        todo.sort(key=lambda t: -expected[t[1].stem])
    env = kernel_environment(root, kernels=jobs)
    report["jobs"] = jobs
    t_all = time.perf_counter()
    failure = None
    with temporary_environ(env), concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        running = {}
        while todo or running:
            while todo and len(running) < jobs and failure is None:     # a failure starts nothing new
                i, path, entry = todo.pop(0)
                running[pool.submit(_execute_timed, src / path.relative_to(root), parameters, kernel_name,
                                    path.stem, build_dir / "failed")] = (i, path, entry)
            if not running:
                break
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                i, path, entry = running.pop(future)
                try:
                    seconds = future.result()
                except BuildError as err:
                    print(f"[{i}/{len(all_chapters)}] {path.stem} ... FAILED", flush=True)
                    entry.update(status="failed", error=str(err))
                    failure = failure or err
                    continue
                entry.update(status="executed", seconds=round(seconds, 1))
                print(f"[{i}/{len(all_chapters)}] {path.stem} ... {seconds:.1f} s", flush=True)
                shutil.copy2(src / path.relative_to(root), executed / path.name)
    for _, _, entry in todo:
        entry.update(status="not executed", seconds=None)
    if failure is not None:
        _write_report(report_path, report)
        raise failure
    report["execution_seconds"] = round(time.perf_counter() - t_all, 1)

    pin = None            # (url, ref, note), read once the first marked install cell needs it
    for path in all_chapters:
        nb_path = src / path.relative_to(root)
        nb = nbformat.read(nb_path, as_version=4)
        if any(c.cell_type == "code" and INSTALL_MARK in c.source for c in nb.cells):
            pin = pin or (repository_url(root), *book_version(root))
            pin_install_cells(nb, *pin)
            report["install"] = {"url": pin[0], "ref": pin[1]}
        tag_for_rendering(nb, solutions=solutions)
        nbformat.write(nb, nb_path)
    report["solutions"] = solutions
    write_execution_statistics(src, report)

    print("[book] jupyter-book build -W -n --keep-going ...", end=" ", flush=True)
    t0 = time.perf_counter()
    jb_out = build_dir / "jb"
    proc = _jupyter_book(src, jb_out)
    log = build_dir / "jupyter-book.log"
    log.write_text(proc.stdout + "\n" + proc.stderr, encoding="utf-8")
    report["jupyter_book_seconds"] = round(time.perf_counter() - t0, 1)
    report["jupyter_book_returncode"] = proc.returncode
    _write_report(report_path, report)
    if proc.returncode != 0:
        print("FAILED", flush=True)
        problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                    if "WARNING" in line or "ERROR" in line or "Error" in line]
        raise BuildError("jupyter-book build failed (warnings count as errors): "
                         + " | ".join(_one_line(p) for p in problems[:40]) + f"; full log: {log}")
    print(f"{report['jupyter_book_seconds']:.1f} s", flush=True)

    html = build_dir / "html"
    if html.exists():
        shutil.rmtree(html)
    os.replace(jb_out / "_build" / "html", html)
    index = html / "index.html"
    print(f"[book] {index}", flush=True)
    if preset == "smoke":
        print(next_steps_message(), flush=True)
    return index
