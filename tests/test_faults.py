"""Fault injection through the command line: every bad input or fault ends in one clear line.

Each case in CASES runs `python -m metabook ARGV` in its own tmp folder (also its working
directory), with a small environment: METABOOK_CACHE in that folder, download mirrors on a local
port where nothing listens (never the network), one thread, and whatever the case's setup adds
(a crafted data file, a broken _toc.yml, ...). Every case must end with:

- a non-zero exit code,
- exactly one line on stderr (empty lines and progress bars aside) holding the expected words,
- no "Traceback",
- no result.json anywhere in the tmp folder.

Adding a case is one line in CASES: (id, argv, setup, words). `argv` and `words` may use {tmp}
(the case's folder); `setup(tmp)` prepares files there and returns extra environment variables
(or None). Data files are tiny (64 training images), so every case takes a few seconds, most of
them Python and torch starting up: the selected cases run side by side, a few at a time, before
the first of them is checked (`fault_runs`).
"""
import concurrent.futures
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

# A run that would train for a second or two on the tiny data files below, were nothing wrong.
RUN = ("run baseline --preset smoke --no-progress --out {tmp}/out "
       "--set train_size=32 --set meta_size=10 --set batch_size=16 --set epochs=1")


# ----------------------------------------------------------------------------- setups

def _arrays(**changes):
    """A tiny valid cifar10.npz's arrays (64 training, 20 test images); None drops a key."""
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), y_train=np.arange(64) % 10,
                  x_test=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), y_test=np.arange(20) % 10)
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


def _write(path, content):
    """Write `content` (bytes, or a dict of arrays for np.savez) to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        with open(path, "wb") as f:
            np.savez(f, **content)


def _valid_npz_bytes(cut=0):
    """The bytes of a valid tiny cifar10.npz, without its last `cut` bytes."""
    import io
    buf = io.BytesIO()
    np.savez(buf, **_arrays())
    data = buf.getvalue()
    return data[:len(data) - cut]


def data(content=None, **changes):
    """METABOOK_DATA -> {tmp}/data holding cifar10.npz: `content` bytes, or the tiny arrays with `changes`."""
    def setup(tmp):
        _write(tmp / "data" / "cifar10.npz", content if content is not None else _arrays(**changes))
        return {"METABOOK_DATA": str(tmp / "data")}
    return setup


def cached(content=None, **changes):
    """No METABOOK_DATA; the cache holds cifar10.npz (`content` bytes, or arrays with `changes`)."""
    def setup(tmp):
        _write(tmp / "cache" / "cifar10.npz", content if content is not None else _arrays(**changes))
    return setup


def env(**variables):
    """Extra environment variables; values may use {tmp}. Creates {tmp}/file and {tmp}/empty."""
    def setup(tmp):
        (tmp / "file").write_text("a file, not a folder")
        (tmp / "empty").mkdir()
        return {k: v.format(tmp=tmp) for k, v in variables.items()}
    return setup


def toc(text):
    """A book source in {tmp}: `text` as _toc.yml."""
    def setup(tmp):
        (tmp / "_toc.yml").write_text(text)
    return setup


def notebooks_and_file(tmp):
    """{tmp}/book with one notebook, and {tmp}/file: a file where an output folder should go."""
    import nbformat
    (tmp / "book").mkdir()
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), tmp / "book" / "a.ipynb")
    (tmp / "file").write_text("a file, not a folder")


def _locked(tmp):
    """A valid data file, and a lock on {tmp}/out held by a live process (this test process)."""
    (tmp / "out").mkdir()
    (tmp / "out" / ".lock").write_text(f"{os.getpid()} {socket.gethostname()}")
    return data()(tmp)


def _state_file(rel, content=b"\x00 not a state file"):
    """A valid data file, and `content` at {tmp}/REL (a corrupt or foreign state file)."""
    def setup(tmp):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(content)
        return data()(tmp)
    return setup


def _file_and_data(tmp):
    (tmp / "file").write_text("a file, not a folder")
    return data()(tmp)


f32 = np.float32
CASES = [
    # -- the data file (issue 20 #1): checked, refused in one line naming the file
    ("float-images", RUN, data(x_train=np.random.default_rng(0).random((64, 32, 32, 3), f32)), ["{tmp}/data/cifar10.npz", "x_train has dtype float32", "uint8"]),
    ("nan-pixels", RUN, data(x_test=np.full((20, 32, 32, 3), np.nan)), ["{tmp}/data/cifar10.npz", "x_test has dtype float64"]),
    ("nchw-images", RUN, data(x_train=np.zeros((64, 3, 32, 32), np.uint8)), ["x_train has shape (64, 3, 32, 32)", "(N, 32, 32, 3)"]),
    ("no-images", RUN, data(x_train=np.zeros((0, 32, 32, 3), np.uint8), y_train=np.zeros(0, int)), ["x_train holds no images"]),
    ("train-lengths", RUN, data(y_train=np.arange(60) % 10), ["y_train has 60 labels for the 64 images"]),
    ("test-lengths", RUN, data(y_test=np.arange(19) % 10), ["y_test has 19 labels for the 20 images"]),
    ("label-out-of-range", RUN, data(y_train=np.arange(64) % 12), ["labels from 0 to 11", "10 classes"]),
    ("float-labels", RUN, data(y_train=(np.arange(64) % 10).astype(f32)), ["y_train", "integer class labels"]),
    ("missing-key", RUN, data(y_test=None), ["has no y_test", "x_train, y_train, x_test, y_test"]),
    ("class-names", RUN, data(class_names=np.array(["cat", "dog"])), ["has 2 class names", "10 classes"]),
    ("not-a-zip", RUN, data(b"this is not a numpy file"), ["{tmp}/data/cifar10.npz", "cannot be read as an .npz"]),
    ("truncated-npz", RUN, data(_valid_npz_bytes(cut=2000)), ["{tmp}/data/cifar10.npz", "cannot be read as an .npz"]),
    ("pickled-array", RUN, data(**_arrays(), class_names=np.array([{"a": 1}] * 10, dtype=object)), ["cannot be read as an .npz"]),
    # -- a corrupt cached file is named, with the fix
    ("corrupt-cache", RUN, cached(_valid_npz_bytes(cut=500)), ["{tmp}/cache/cifar10.npz", "delete it"]),
    ("cache-bad-labels", RUN, cached(y_train=np.arange(64) % 12), ["{tmp}/cache/cifar10.npz", "labels from 0 to 11", "delete it"]),
    # -- METABOOK_DATA without the expected file (#13): never a silent download
    ("data-is-a-file", RUN, env(METABOOK_DATA="{tmp}/file"), ["METABOOK_DATA={tmp}/file is a file, not a folder", "cifar10.npz"]),
    ("data-without-file", RUN, env(METABOOK_DATA="{tmp}/empty"), ["METABOOK_DATA={tmp}/empty has no cifar10.npz"]),
    ("data-does-not-exist", RUN, env(METABOOK_DATA="{tmp}/nowhere"), ["METABOOK_DATA={tmp}/nowhere does not exist"]),
    # -- downloads and the cache folder (#8, #10)
    ("download-fails", RUN, None, ["could not download cifar-10-python.tar.gz", "http://127.0.0.1:", "METABOOK_DATA"]),
    ("cache-is-a-file", RUN, env(METABOOK_CACHE="{tmp}/file"), ["cache folder {tmp}/file", "METABOOK_CACHE"]),
    # -- config values (#7, #12) and arguments (#8); unknown chapter, preset, key: test_config.py
    ("lr-inf", RUN + " --set lr=inf", data(), ["lr=inf", "finite"]),
    ("epochs-inf", RUN + " --set epochs=inf", data(), ["epochs=inf", "finite"]),
    ("batch-fraction", RUN + " --set batch_size=1.5", data(), ["batch_size=1.5", "whole number"]),
    ("train-size-fraction", RUN + " --set train_size=-0.5", data(), ["train_size=-0.5", "whole number"]),
    ("negative-seed", RUN + " --seed -1", data(), ["--seed -1", "0 .. 4294967295"]),
    ("zero-seeds", RUN + " --seeds 0", data(), ["--seeds 0", ">= 1"]),
    ("seed-not-a-number", RUN + " --seed abc", data(), ["--seed", "invalid int value: 'abc'", "--help"]),
    ("unknown-option", RUN + " --sed 3", data(), ["unrecognized arguments: --sed 3"]),
    ("set-without-equals", RUN + " --set lr", data(), ["--set expects key=value, got 'lr'"]),
    ("unknown-dataset", RUN + " --set dataset=mnist", data(), ["dataset='mnist'", "choose one of"]),
    ("config-lr-inf", "config baseline --preset smoke --set lr=inf", None, ["lr=inf", "finite"]),
    ("bench-negative-seed", "bench --preset smoke --seed -1 --out {tmp}/out", data(), ["--seed -1"]),
    # -- config that only the data can refute
    ("meta-size-too-large", RUN + " --set meta_size=60", data(), ["meta_size=60", "exceeds the 54 training images"]),
    ("target-class-12", RUN + " --set target.classes=12", data(), ["target.classes=[12]", "0..9"]),
    ("batch-larger-than-data", RUN + " --set batch_size=64", data(), ["batch", "32 images"]),
    # -- the run folder (#3, #6, #9) and a combination only the arms can refute (#5)
    ("out-is-a-file", RUN.replace("{tmp}/out", "{tmp}/file"), _file_and_data, ["--out {tmp}/file is a file, not a folder"]),
    ("out-in-use", RUN, _locked, ["{tmp}/out is in use by another run (pid", "another --out"]),
    ("corrupt-checkpoint", RUN, _state_file("out/runs/baseline-seed0/checkpoint.pt"), ["checkpoint.pt is corrupt", "delete it"]),
    ("corrupt-finished-run", RUN, _state_file("out/runs/baseline-seed0.json"), ["baseline-seed0.json is corrupt", "delete it"]),
    ("finished-run-other-config", RUN, _state_file("out/runs/baseline-seed0.json", b'{"config": {"lr": 5}}'), ["finished run with another config", "delete it or choose another --out"]),
    ("meta-size-zero", RUN.replace("run baseline", "run instance_lr").replace("meta_size=10", "meta_size=0"), data(), ["'instance_lr' needs meta batches but meta_size=0"]),
    # -- a run that diverges stops at the step, in one line (#8)
    ("nan-stop", RUN + " --set lr=1e30", data(), ["step", "nan", "lower lr"]),
    # -- the book: build and student (#8)
    ("toc-bad-yaml", "build --preset smoke", toc("root: intro\nchapters:\n  - file: [oops\n"), ["_toc.yml is not a valid table of contents", "YAML error at line"]),
    ("toc-no-root", "build --preset smoke", toc("- file: a\n- file: b\n"), ["_toc.yml", "no `root:` entry"]),
    ("toc-missing-page", "build --preset smoke", toc("root: intro\n"), ["_toc.yml lists 'intro'"]),
    ("student-into-a-file", "student {tmp}/file", notebooks_and_file, ["cannot write the student notebooks to {tmp}/file"]),
    ("student-src-without-notebooks", "student {tmp}/out --src {tmp}/empty", lambda tmp: (tmp / "empty").mkdir(),
     ["no notebooks in {tmp}/empty", "--src"]),
]


# ----------------------------------------------------------------------------- the check

def base_env(tmp, mirror):
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp), "PYTHONPATH": str(REPO),
            "METABOOK_CACHE": str(tmp / "cache"), "METABOOK_CIFAR_MIRRORS": mirror,
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


PROGRESS = re.compile(r"\r|\d+%\||\d+it \[")


def stderr_lines(text):
    """The lines of stderr that are neither empty nor progress bars."""
    return [line for line in text.splitlines() if line.strip() and not PROGRESS.search(line)]


def assert_one_clear_line(proc, tmp, words):
    lines = stderr_lines(proc.stderr)
    assert proc.returncode != 0, f"exit 0; stdout: {proc.stdout[-500:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{proc.stderr[-3000:]}"
    for word in words:
        assert word.format(tmp=tmp) in lines[0], lines[0]
    assert not list(tmp.rglob("result.json")), "a result.json was written"


def run_case(argv, setup, tmp, mirror):
    """`python -m metabook ARGV` in tmp after the case's setup: the CompletedProcess."""
    extra = (setup(tmp) if setup else None) or {}
    return subprocess.run([sys.executable, "-m", "metabook", *shlex.split(argv.format(tmp=tmp))],
                          cwd=tmp, env={**base_env(tmp, mirror), **extra},
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def fault_runs(request, tmp_path_factory):
    """The cases this session selected, run side by side (one more than the cores, at most 4):
    case id -> (its tmp folder, its CompletedProcess)."""
    selected = {item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_fault_ends_in_one_line"}
    with socket.socket() as s:             # a mirror that refuses at once (conftest's dead_mirror)
        s.bind(("127.0.0.1", 0))
        mirror = f"http://127.0.0.1:{s.getsockname()[1]}/"

    def one(case):
        name, argv, setup, _ = case
        tmp = tmp_path_factory.mktemp(name)
        return name, (tmp, run_case(argv, setup, tmp, mirror))

    with concurrent.futures.ThreadPoolExecutor(min(4, (os.cpu_count() or 1) + 1)) as pool:
        return dict(pool.map(one, [c for c in CASES if c[0] in selected]))


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_fault_ends_in_one_line(case, fault_runs):
    tmp, proc = fault_runs[case]
    assert_one_clear_line(proc, tmp, next(c[3] for c in CASES if c[0] == case))


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["foreground", "started-with-sigint-ignored"])
def test_ctrl_c_during_a_download_ends_in_one_line_with_exit_130(tmp_path, inherited):
    """SIGINT while the download waits for a mirror's answer: exit 130, one line, no .part left;
    also for a process started with SIGINT ignored (a job that a non-interactive shell put in the
    background with `&`), which Python alone would leave uninterruptible."""
    with socket.socket() as mirror:
        mirror.bind(("127.0.0.1", 0))
        mirror.listen(1)
        mirror.settimeout(60)
        url = f"http://127.0.0.1:{mirror.getsockname()[1]}/"
        proc = subprocess.Popen([sys.executable, "-m", "metabook", *shlex.split(RUN.format(tmp=tmp_path))],
                                cwd=tmp_path, env=base_env(tmp_path, url), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, inherited))
        try:
            conn, _ = mirror.accept()                 # the client connected ...
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:     # ... and sent its request: it now waits
                    request += conn.recv(4096)
                proc.send_signal(signal.SIGINT)
                stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert b"GET /cifar-10-python.tar.gz" in request
    assert proc.returncode == 130
    assert_one_clear_line(subprocess.CompletedProcess(proc.args, 130, stdout, stderr), tmp_path,
                          ["interrupted (Ctrl-C)", "run the same command again"])
    assert not list((tmp_path / "cache").glob("*.part"))


# ----------------------------------------------------------------------------- recorded runs (#14)

def _record(folder, chapter="baseline", date="2026-01-01", content=None):
    """folder/result.json: a small valid record, or `content` (str or bytes) as it is."""
    import json
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "result.json"
    if content is None:
        content = json.dumps({"chapter": chapter, "preset": "cpu", "provenance": {"date": date}, "config": {}})
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("content", [b'{"chapter": "baseline", "pres', b"", b"[1, 2]", b"\xff\xfe{"],
                         ids=["truncated", "empty", "not-an-object", "not-utf8"])
def test_a_corrupt_record_is_skipped_with_a_warning_naming_it(content, tmp_path):
    from metabook.results import latest_recorded, recorded_runs
    _record(tmp_path / "a", date="2026-01-01")
    bad = _record(tmp_path / "b", content=content)
    _record(tmp_path / "c", date="2026-02-01")
    with pytest.warns(UserWarning) as caught:
        runs = recorded_runs("baseline", tmp_path)
    assert [r["provenance"]["date"] for r in runs] == ["2026-02-01", "2026-01-01"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and str(bad) in messages[0] and "\n" not in messages[0]
    with pytest.warns(UserWarning, match="skipped a recorded run"):
        assert latest_recorded("baseline", "cpu", tmp_path)["provenance"]["date"] == "2026-02-01"


def test_load_result_on_a_corrupt_file_names_it(tmp_path):
    from metabook.results import RecordError, load_result
    bad = _record(tmp_path / "run", content='{"chapter": ')
    for where in (bad, bad.parent):
        with pytest.raises(RecordError) as err:
            load_result(where)
        assert str(err.value).startswith(f"{bad} is not a readable result record")
        assert "delete it" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError):
        load_result(tmp_path / "missing.json")


def test_a_record_with_odd_fields_does_not_break_the_finders(tmp_path):
    from metabook.results import latest_recorded
    _record(tmp_path / "a", content='{"chapter": "baseline", "preset": "cpu", "provenance": 3, "config": "x"}')
    assert latest_recorded("baseline", "cpu", tmp_path)["provenance"] == 3
    assert latest_recorded("baseline", "cpu", tmp_path, where={"lr": 0.1}) is None


# ----------------------------------------------------------------------------- kills during each phase
# In process: an exception stands where a kill would land; the rerun with the same folder must end
# with the record of an uninterrupted run (timings aside). online_loss has every phase: a one-off
# stage (prepare: the offline loss), steps, checkpoints, and finished runs written per arm.

KILL_TINY = {"dataset": "synthetic", "train_size": 256, "meta_size": 64, "test_size": 100, "batch_size": 32,
             "epochs": 1.0, "eval_every": 0.5, "checkpoint_every": 3, "lfl.same_time": False}


class Kill(Exception):
    pass


def _once(fn, when):
    """fn, raising Kill (before or after its effect, as `when(*args)` says) on the first call that
    `when` picks: 'before', 'after', or None to let the call through."""
    state = {"done": False}

    def wrapped(*args, **kwargs):
        moment = None if state["done"] else when(*args, **kwargs)
        if moment == "before":
            state["done"] = True
            raise Kill
        out = fn(*args, **kwargs)
        if moment == "after":
            state["done"] = True
            raise Kill
        return out
    return wrapped


def _half_written(path_arg):
    """A torch.save/json write that leaves half a temporary file, then dies."""
    def write(obj, path, *a, **k):
        Path(path).write_bytes(b"\x80half")
        raise Kill
    return write


def _timeless(record):
    return {name: ([{k: v for k, v in row.items() if k != "elapsed_s"} for row in arm["history"]["0"]],
                   arm["test_acc"], arm["steps"]) for name, arm in record["arms"].items()}


@pytest.fixture(scope="module")
def uninterrupted():
    from metabook import run_chapter
    from metabook.data import make_synthetic

    ds = make_synthetic(600, 200, seed=0)
    return ds, run_chapter("online_loss", "smoke", seeds=[0], overrides=KILL_TINY, progress=False, dataset=ds)


def _kills(monkeypatch):
    import metabook.methods.online_loss as lfl
    import metabook.results as results
    import metabook.train as runner

    steps = {"n": 0}

    def fifth_step(*a, **k):
        steps["n"] += 1
        return "after" if steps["n"] == 5 else None

    saves = {"n": 0}

    def second_checkpoint(obj, path, *a, **k):
        saves["n"] += 1
        return "half" if saves["n"] == 2 else None

    real_save = runner.torch.save
    return {
        "data loading": lambda: monkeypatch.setattr(runner, "prepare_data",
                                                    _once(runner.prepare_data, lambda *a, **k: "before")),
        "one-off stage": lambda: monkeypatch.setattr(lfl, "offline_init", _once(lfl.offline_init, lambda *a, **k: "after")),
        "a step": lambda: monkeypatch.setattr(lfl.OnlineLoss, "step", _once(lfl.OnlineLoss.step, fifth_step)),
        "checkpoint write": lambda: monkeypatch.setattr(
            runner.torch, "save",
            lambda obj, path, *a, **k: _half_written(path)(obj, path) if second_checkpoint(obj, path) else real_save(obj, path, *a, **k)),
        "record write": lambda: monkeypatch.setattr(
            results, "write_json",
            _once(results.write_json, lambda obj, path: "before" if "online_loss-seed0" in str(path) else None)),
    }


@pytest.mark.parametrize("phase", ["data loading", "one-off stage", "a step", "checkpoint write", "record write"])
def test_a_kill_in_any_phase_and_a_rerun_give_the_uninterrupted_record(phase, uninterrupted, tmp_path, monkeypatch):
    from metabook import run_chapter

    ds, full = uninterrupted
    with monkeypatch.context() as m:
        _kills(m)[phase]()
        with pytest.raises(Kill):
            run_chapter("online_loss", "smoke", seeds=[0], out_dir=tmp_path, overrides=KILL_TINY, progress=False,
                        dataset=ds)
    assert not (tmp_path / "result.json").exists()
    again = run_chapter("online_loss", "smoke", seeds=[0], out_dir=tmp_path, overrides=KILL_TINY, progress=False,
                        dataset=ds)
    assert _timeless(again) == _timeless(full)
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / ".lock").exists()


def test_ctrl_c_during_training_saves_a_checkpoint_and_exits_130_in_one_line(tmp_path, dead_mirror):
    """A real SIGINT while the loop trains: the step in flight finishes, a checkpoint is written,
    one line names the step and the checkpoint, exit 130; the same command then resumes."""
    import time

    env = {**base_env(tmp_path, dead_mirror), **data()(tmp_path)}
    argv = shlex.split((RUN + " --set epochs=5000 --set checkpoint_every=100000").format(tmp=tmp_path))
    argv.remove("--no-progress")               # the progress bar says when training has begun
    run_dir, err_path = tmp_path / "out" / "runs" / "baseline-seed0", tmp_path / "stderr.txt"
    with open(err_path, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "metabook", *argv], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=err_file, text=True)
        deadline = time.time() + 300           # a loaded machine can take minutes to start torch
        while (not re.search(r"[1-9]\d*/\d+ \[", err_path.read_text()) and proc.poll() is None
               and time.time() < deadline):     # wait for a step done, however long the start takes
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    err = err_path.read_text()
    assert proc.returncode == 130, err
    lines = stderr_lines(err)
    assert len(lines) == 1 and re.search(r"stopped at step \d+; .*checkpoint.pt resumes it", lines[0]), lines
    assert "Traceback" not in err and (run_dir / "checkpoint.pt").exists()


def test_one_ctrl_c_that_arrives_twice_is_one_stop_request_and_a_later_second_stops_at_once():
    """A sweep's worker gets a terminal's Ctrl-C and the sweep's copy of it within milliseconds:
    that must still checkpoint (one request), while a second Ctrl-C a second later stops at once."""
    import time

    from metabook.train import StopRequest

    with StopRequest() as stop:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)                   # the handler runs in the main thread, between bytecodes
        except KeyboardInterrupt:
            pytest.fail("the second copy of one Ctrl-C stopped the loop at once, without a checkpoint")
        assert stop.flag
        time.sleep(1.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)


def test_ctrl_c_is_live_before_torch_loads_also_when_started_with_sigint_ignored():
    """`python -m metabook` installs its Ctrl-C handler before it imports torch (seconds of a
    start), so a background job (SIGINT ignored) interrupted while it starts still stops: the
    handler in force when torch is first imported must be Python's KeyboardInterrupt."""
    import textwrap

    code = textwrap.dedent("""
        import runpy, signal, sys
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        class Spy:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    print("torch sees the handler:", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
                    sys.meta_path.remove(self)
                return None
        sys.meta_path.insert(0, Spy())
        sys.argv = ["metabook", "config", "baseline", "--preset", "smoke"]
        runpy.run_module("metabook", run_name="__main__", alter_sys=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "torch sees the handler: True" in proc.stdout, proc.stdout[-500:] + proc.stderr[-500:]
