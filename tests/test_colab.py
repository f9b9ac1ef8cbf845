"""The Colab path (issue 17 items 4-7): runs kept in OUT_DIR resume after a killed kernel, the
recorded runs ship in the wheel, the install cell is pinned by the build and leaves torch alone,
and the build ends by saying how to execute at a real budget.

The fresh virtual environments here are made offline: a venv without pip whose site-packages
gets one .pth line naming a folder of links to this environment's installed packages (torch,
numpy, papermill, ...) minus metabook itself; pip runs from this environment (`pip --python`)
with --no-index, so nothing is downloaded and a wish to replace torch would fail.
The two tests marked `book` execute chapter 2 at `smoke` (about 3 minutes on 2 cores together).
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import venv
import zipfile
from pathlib import Path

import nbformat
import pytest

from metabook.build import (INSTALL_MARK, book_version, chapters_from_toc, next_steps_message,
                            pin_install_cells, repository_url)
from metabook.results import RESULTS_DIR, notebook_out_dir

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = chapters_from_toc(ROOT)


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _parse(source: str) -> ast.Module:
    """A code cell as Python (IPython's %magic lines become `pass`)."""
    return ast.parse(re.sub(r"^(\s*)[%!].*$", r"\1pass", source, flags=re.M))


# --------------------------------------------------------------------------------------------
# Item 4: where a chapter keeps its runs
# --------------------------------------------------------------------------------------------


def test_notebook_out_dir_prefers_the_argument_then_drive_on_colab_then_the_books_root(tmp_path, monkeypatch):
    (tmp_path / "repo" / "book").mkdir(parents=True)
    (tmp_path / "repo" / "_toc.yml").write_text("root: book/intro\n")
    (tmp_path / "drive").mkdir()
    monkeypatch.chdir(tmp_path / "repo" / "book")           # papermill's working directory: book/
    assert notebook_out_dir("02_baseline", "cpu", "elsewhere") == Path("elsewhere")
    assert notebook_out_dir("02_baseline", "cpu", colab=False) == tmp_path / "repo" / "runs" / "02_baseline-cpu"
    assert (notebook_out_dir("02_baseline", "gpu", colab=True, drive=tmp_path / "drive")
            == tmp_path / "drive" / "metabook" / "runs" / "02_baseline-gpu")
    # on Colab without Drive mounted (USE_DRIVE = False): on the VM, like anywhere else
    assert (notebook_out_dir("02_baseline", "gpu", colab=True, drive=tmp_path / "no-drive")
            == tmp_path / "repo" / "runs" / "02_baseline-gpu")
    monkeypatch.chdir(tmp_path)                                # no _toc.yml above: the working directory
    assert notebook_out_dir("07_meta_hf", "smoke", colab=False) == tmp_path / "runs" / "07_meta_hf-smoke"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_run_of_a_chapter_keeps_its_own_folder_under_out_dir(path):
    nb = nbformat.read(path, as_version=4)
    calls = [node for cell in _code(nb) for node in ast.walk(_parse(cell.source))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_chapter"]
    sources = "\n".join(c.source for c in _code(nb))
    assert "mkdtemp" not in sources, f"{path.name}: a temporary folder does not survive a disconnect"
    if not calls:                  # chapter 1: toy experiments in the notebook, nothing kept on disk
        return
    params = next(c for c in _code(nb) if "parameters" in c.metadata.get("tags", []))
    assert re.search(r"^OUT_DIR = None\b", params.source, re.M), f"{path.name}: no OUT_DIR = None parameter"
    # directly, or through metabook.display.chapter_start (the one-cell start), which calls it
    assert (f'notebook_out_dir("{path.stem}", preset, OUT_DIR)' in sources
            or re.search(rf'chapter_start\("{path.stem}", "\w+", PRESET, SEED, DATASET, OUT_DIR\)', sources)), path.name
    folders = []
    for call in calls:
        out = [k.value for k in call.keywords if k.arg == "out_dir"]
        assert out, f"{path.name}: run_chapter at line {call.lineno} keeps no out_dir (a disconnect restarts it)"
        text = ast.unparse(out[0])
        assert text.startswith("out_dir / "), f"{path.name}: out_dir={text} is not a sub-folder of OUT_DIR's"
        folders.append(text)
    assert len(set(folders)) == len(folders), f"{path.name}: two runs share a folder: {folders}"
    first = _code(nb)[0].source
    assert re.search(r"^USE_DRIVE = True\b", first, re.M) and 'drive.mount("/content/drive")' in first, path.name
    setup_md = next(c.source for c in nb.cells if c.cell_type == "markdown" and "`OUT_DIR`" in c.source)
    assert "METABOOK_CACHE" in setup_md, f"{path.name}: the setup text does not say how to keep the data on Drive"


# --------------------------------------------------------------------------------------------
# Item 6: the install cell
# --------------------------------------------------------------------------------------------


def test_the_build_pins_each_chapters_install_cell_to_the_rendering_commit():
    url = repository_url(ROOT)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    ref, note = book_version(ROOT)
    assert ref == head.stdout.strip()
    for path in CHAPTERS:
        nb = nbformat.read(path, as_version=4)
        marked = [line for c in _code(nb) for line in c.source.splitlines() if INSTALL_MARK in line]
        assert len(marked) == 1, f"{path.name}: {len(marked)} marked install lines, want 1"
        # the committed line names the same repository as _config.yml (written once, copied here)
        assert f'"metabook @ git+{url}"' in marked[0], f"{path.name}: {marked[0]!r} is not {url}"
        before = [c.source for c in nb.cells]
        assert pin_install_cells(nb, url, ref, note) == 1
        after = [c.source for c in nb.cells]
        changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
        assert len(changed) == 1, f"{path.name}: the pin changed cells {changed}"
        line = next(l for l in after[changed[0]].splitlines() if INSTALL_MARK in l)
        assert line.strip().startswith(f'%pip install -q "metabook @ git+{url}@{ref}"'), line
        assert line.startswith("    "), f"{path.name}: the pinned line lost its Colab guard: {line!r}"


def test_outside_a_git_checkout_the_install_cell_pins_the_version_tag_and_says_so(tmp_path):
    from metabook import __version__

    ref, note = book_version(tmp_path)
    assert ref == f"v{__version__}"
    assert "outside a git checkout" in note


# --------------------------------------------------------------------------------------------
# Fresh virtual environments (items 5 and 6)
# --------------------------------------------------------------------------------------------


def _fresh_venv(where: Path) -> Path:
    """A venv at `where` that sees this environment's packages except metabook; its python."""
    site = Path(sysconfig.get_paths()["purelib"])
    deps = where / "deps"
    deps.mkdir(parents=True)
    for entry in site.iterdir():
        if not entry.name.startswith(("metabook", "__editable__")) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    venv.EnvBuilder(with_pip=False).create(where / "venv")
    python = where / "venv" / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "metabook-test-deps.pth").write_text(f"{deps}\n")
    return python


def _package_copy(where: Path) -> Path:
    """The files pip needs to build metabook, copied (an in-tree build writes build/ and *.egg-info)."""
    where.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, where / name)
    shutil.copytree(ROOT / "metabook", where / "metabook",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    return where


def _build_wheel(where: Path) -> tuple[Path, str]:
    """(the wheel, pip's stderr) of metabook built offline from a copy of this checkout under `where`."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", str(_package_copy(where / "src")), "-w", str(where / "dist")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return next((where / "dist").glob("metabook-*.whl")), proc.stderr


def _pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    """pip of this environment acting on `python`'s environment, offline."""
    return subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check",
                           "--no-input", *args, "--no-index"], capture_output=True, text=True, timeout=600)


def _clean_env() -> dict[str, str]:
    """The environment without anything that would point python at this checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _ask(python: Path, code: str, cwd: Path) -> dict:
    out = subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True, env=_clean_env(),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


TORCH = "import json, os, torch; print(json.dumps({'version': torch.__version__, 'file': os.path.realpath(torch.__file__)}))"


def test_installing_like_the_install_cell_leaves_the_preinstalled_torch_alone(tmp_path):
    python = _fresh_venv(tmp_path)
    before = _ask(python, TORCH, tmp_path)
    # as the install cell does (no --no-deps: pip sees the dependencies satisfied), from a local copy
    proc = _pip(python, "install", "-q", "--no-build-isolation", str(_package_copy(tmp_path / "src")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _ask(python, TORCH, tmp_path) == before
    where = _ask(python, "import json, metabook; print(json.dumps(metabook.__file__))", tmp_path)
    assert where.startswith(str(tmp_path / "venv")), where


def test_the_package_builds_without_deprecation_warnings_and_names_its_licence(tmp_path):
    """setuptools stops building deprecated metadata (a `project.license` table) in 2027; the
    wheel must build without its warnings and carry the licence as an SPDX expression and file."""
    built, stderr = _build_wheel(tmp_path)
    assert "Warning" not in stderr, stderr[-3000:]
    with zipfile.ZipFile(built) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata.splitlines()
    assert any(n.endswith("licenses/LICENSE") for n in names), names


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """A fresh venv with metabook installed from a wheel built from this checkout. Its python."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheel, _ = _build_wheel(tmp)
    python = _fresh_venv(tmp)
    proc = _pip(python, "install", "-q", "--no-deps", str(wheel))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return python


def test_the_wheel_ships_every_recorded_run(wheel_venv, tmp_path):
    code = ("import json, metabook\n"
            "from metabook.results import RESULTS_DIR, latest_recorded\n"
            "files = sorted(str(p.relative_to(RESULTS_DIR)) for p in RESULTS_DIR.rglob('*') if p.is_file())\n"
            "print(json.dumps({'package': metabook.__file__, 'files': files,\n"
            "                  'cpu': {c: latest_recorded(c, 'cpu') is not None for c in metabook.CHAPTERS}}))")
    got = _ask(wheel_venv, code, tmp_path)           # run outside the repository
    assert got["package"].startswith(str(wheel_venv.parents[1])), got["package"]
    shipped = sorted(str(p.relative_to(RESULTS_DIR)) for p in RESULTS_DIR.rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts)
    assert got["files"] == shipped
    assert got["cpu"] and all(got["cpu"].values()), f"chapters whose recorded cpu run is missing: {got['cpu']}"


# --------------------------------------------------------------------------------------------
# Chapter 2 executed at smoke from outside the repository, killed mid-run and run again
# --------------------------------------------------------------------------------------------

TIMING = ("elapsed_s", "seconds_per_step", "step_cost_ratio", "train_seconds", "one_off_seconds")


def _numbers(record: dict) -> dict:
    """What a run computes (accuracies, losses, steps, histories), without its timings."""
    def drop(obj):
        if isinstance(obj, dict):
            return {k: drop(v) for k, v in obj.items() if k not in TIMING}
        if isinstance(obj, list):
            return [drop(v) for v in obj]
        return obj
    return drop({"metrics": record["metrics"], "history": record["history"],
                 "arms": {name: {k: arm[k] for k in ("test_acc", "val_acc", "steps", "epochs", "history")}
                          for name, arm in record["arms"].items()}})


def _papermill(python: Path, notebook: Path, out: Path, cwd: Path, params: dict) -> subprocess.Popen:
    args = [str(python), "-m", "papermill", str(notebook), str(out), "--cwd", str(cwd), "-k", "python3",
            "--no-progress-bar"]
    for key, value in params.items():
        args += ["-p", key, str(value)]
    return subprocess.Popen(args, cwd=cwd, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.book
def test_chapter_killed_mid_run_resumes_with_the_same_numbers_and_shows_the_records(wheel_venv, tmp_path):
    from metabook import run_chapter

    params = {"PRESET": "smoke"} if os.environ.get("METABOOK_DATA") else {"PRESET": "smoke", "DATASET": "synthetic"}
    overrides = {} if os.environ.get("METABOOK_DATA") else {"dataset": "synthetic"}
    work = tmp_path / "reader"                       # outside the repository, no _toc.yml above it
    work.mkdir()
    notebook = work / "02_baseline.ipynb"
    shutil.copy2(ROOT / "book" / "02_baseline.ipynb", notebook)
    runs = work / "runs" / "02_baseline-smoke"       # the default OUT_DIR there
    checkpoint = runs / "baseline" / "runs" / "baseline-seed0" / "checkpoint.pt"

    proc = _papermill(wheel_venv, notebook, work / "killed.ipynb", work, params)
    deadline = time.monotonic() + 400
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists(), f"no checkpoint appeared at {checkpoint}: {proc.communicate()[0][-2000:] if proc.poll() is not None else 'timeout'}"
    pid = int((runs / "baseline" / ".lock").read_text().split()[0])   # the kernel that runs the experiment
    os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=120) != 0, "papermill finished although its kernel was killed"
    assert not (runs / "baseline" / "result.json").exists(), "killed too late: the run had finished"

    proc = _papermill(wheel_venv, notebook, work / "resumed.ipynb", work, params)
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log[-4000:]

    reference = tmp_path / "uninterrupted"          # the same calls as the chapter's cells, never killed
    for chapter in ("baseline", "depth"):
        want = run_chapter(chapter, "smoke", seeds=[0], overrides=overrides, out_dir=reference / chapter,
                           progress=False)
        got = json.loads((runs / chapter / "result.json").read_text())
        assert _numbers(got) == _numbers(json.loads(json.dumps(want))), f"{chapter}: the resumed record differs"

    executed = nbformat.read(work / "resumed.ipynb", as_version=4)
    text = "\n".join(o.get("text", "") for c in _code(executed) for o in c.get("outputs", []))
    assert "no recorded" not in text, "a recorded-run cell found no record in the installed package"
    assert "recorded cpu run: test accuracy" in text
    assert f"runs kept in {runs}" in text


# --------------------------------------------------------------------------------------------
# Item 7: what `make book` says at the end
# --------------------------------------------------------------------------------------------


def test_the_build_says_how_long_cpu_and_gpu_take_from_the_planners_file(tmp_path):
    row = {"flops": 1, "peak_bytes": 1, "steps": 1}
    plans = [{**row, "chapter": "baseline", "preset": "cpu", "arm": "baseline", "seconds": {"cpu": 600.0, "t4": 9.0}},
             {**row, "chapter": "depth", "preset": "cpu", "arm": "plain-4", "seconds": {"cpu": 300.0, "t4": 9.0}},
             {**row, "chapter": "meta_hf", "preset": "gpu", "arm": "mlhf", "seconds": {"cpu": 9e4, "t4": 1500.0}}]
    (tmp_path / "plans.json").write_text(json.dumps(plans))
    lines = next_steps_message(tmp_path / "plans.json").splitlines()
    cpu = next(l for l in lines if "PRESET=cpu" in l)
    gpu = next(l for l in lines if "PRESET=gpu" in l)
    assert "15 min in all" in cpu and "baseline, 10 min" in cpu, cpu
    assert "t4" in gpu and "25 min in all" in gpu, gpu
    (tmp_path / "written.json").write_text(json.dumps({"provenance": {}, "rows": plans}))   # plan --write's shape
    assert next_steps_message(tmp_path / "written.json").splitlines() == lines
    missing = next_steps_message(tmp_path / "absent.json")
    assert "python -m metabook plan --preset cpu" in missing and "make book PRESET=cpu" in missing


def test_a_build_outside_git_renders_the_install_cell_pinned_to_the_version_tag(tmp_path):
    from metabook import __version__
    from metabook.build import build_book

    url = "https://github.com/someone/metabook"
    (tmp_path / "book").mkdir()
    (tmp_path / "_config.yml").write_text(f'title: tiny\nonly_build_toc_files: true\nexecute:\n  execute_notebooks: "off"\n'
                                          f"repository:\n  url: {url}\nsphinx:\n  config:\n    html_extra_path: []\n")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: book/01_tiny\n")
    (tmp_path / "book" / "intro.md").write_text("# Tiny\n")
    first = ('import sys\nif "google.colab" in sys.modules:\n'
             f'    %pip install -q "metabook @ git+{url}"  {INSTALL_MARK}: the build pins this line')
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# Tiny chapter"), nbformat.v4.new_code_cell(first),
        nbformat.v4.new_code_cell('PRESET = "auto"', metadata={"tags": ["parameters"]})],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, tmp_path / "book" / "01_tiny.ipynb")
    build_book(preset="smoke", root=tmp_path, build_dir=tmp_path / "_build")
    pinned = f'%pip install -q "metabook @ git+{url}@v{__version__}"'
    rendered = nbformat.read(tmp_path / "_build" / "src" / "book" / "01_tiny.ipynb", as_version=4)
    assert pinned in rendered.cells[1].source and "outside a git checkout" in rendered.cells[1].source
    assert "the build pins this line" in nbformat.read(tmp_path / "book" / "01_tiny.ipynb", as_version=4).cells[1].source
    report = json.loads((tmp_path / "_build" / "build_report.json").read_text())
    assert report["install"] == {"url": url, "ref": f"v{__version__}"}
