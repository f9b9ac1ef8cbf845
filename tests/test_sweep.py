"""metabook sweep: units, their dependencies, the records they make, and faults on a local Ray instance.

Tiny synthetic configs (a unit trains for a second or two); one Ray instance for the module.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import same_time_budget
from metabook.__main__ import main
from metabook.methods import run_chapter
from metabook.sweep import (Unit, WorkerDied, parse_grid, plan_units, run_unit, schedule, slurm_parameters, sweep,
                            unit_resources)
from metabook.train import process_alive

TINY = {"dataset": "synthetic", "train_size": 256, "meta_size": 64, "batch_size": 64, "width": 4,
        "test_size": 100, "heldout_size": 100, "epochs": 1.0, "eval_every": 1.0}
ILR = {**TINY, "ilr.arms": "baseline,instance_lr", "ilr.same_time": "true"}
# baseline on an MLP: a few milliseconds a step; lr=1e12 makes it diverge at once
MLP = {**TINY, "model": "mlp", "batchnorm": "false", "momentum": "0", "epochs": 30.0, "checkpoint_every": 4}


def sets(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


def accuracies(record: dict) -> dict:
    """Per arm, the per-seed test accuracies and held-out correctness: what must not change."""
    return {name: (arm["test_acc"]["per_seed"], arm.get("heldout_correct"))
            for name, arm in record["arms"].items() if name != "baseline_same_time"}


# ----------------------------------------------------------------------------- units (no training)

def test_grid_and_units_of_two_chapters_with_dependencies(tmp_path):
    assert parse_grid(["lr=0.1,0.05", "noise.rate=0.2"]) == [{"lr": "0.1", "noise.rate": "0.2"},
                                                              {"lr": "0.05", "noise.rate": "0.2"}]
    assert parse_grid([]) == [{}]
    records = plan_units(["baseline", "grad_instructor"], "smoke", [0, 1], {}, parse_grid(["lr=0.1,0.05"]), tmp_path)
    assert [(r.chapter, r.out) for r in records] == [
        ("baseline", tmp_path / "baseline" / "lr=0.1"), ("baseline", tmp_path / "baseline" / "lr=0.05"),
        ("grad_instructor", tmp_path / "grad_instructor" / "lr=0.1"),
        ("grad_instructor", tmp_path / "grad_instructor" / "lr=0.05")]
    assert [u.name for u in records[0].units] == ["baseline/lr=0.1/baseline-seed0", "baseline/lr=0.1/baseline-seed1"]
    gi = {u.name.split("/")[-1]: u for u in records[2].units}
    stages = sorted(n for n in gi if n.startswith("stage-"))
    assert len(stages) == 4              # one ENN per seed for each of the two ENN configs (gi.starts differs)
    for seed in (0, 1):
        arm, control = gi[f"grad_instructor-seed{seed}"], gi[f"gi_init_critic-seed{seed}"]
        assert len(arm.after) == 1 and arm.after[0].endswith(f"-seed{seed}") and "stage-enn-" in arm.after[0]
        assert control.after != arm.after and gi[arm.after[0].split("/")[-1]].stage_arm == "grad_instructor"
        assert gi[f"baseline-seed{seed}"].after == ()
        same = gi[f"baseline_same_time-seed{seed}"]
        assert [a.split("/")[-1] for a in same.after] == [f"grad_instructor-seed{seed}"]
    order = [u.name for u in records[2].units]          # a unit comes after what it waits for
    assert all(order.index(a) < order.index(u.name) for u in records[2].units for a in u.after)
    compare = plan_units(["compare"], "smoke", [0], {}, [{}], tmp_path)[0]     # its own run folder per method
    assert compare.out == tmp_path / "compare" and {Path(u.out).parent for u in compare.units} == {compare.out}
    assert {u.label for u in compare.units} == {Path(u.out).name for u in compare.units} and len(
        {u.label for u in compare.units}) > 1


def test_resources_from_the_written_plan_and_the_slurm_job_it_would_submit(tmp_path):
    submitit = pytest.importorskip("submitit", reason="submitit is an optional dependency (pip install metabook[sweep])")
    from metabook.plan import config_sha
    from metabook.methods import chapter_config

    unit = plan_units(["baseline"], "smoke", [0], {}, [{}], tmp_path)[0].units[0]
    sha = config_sha(chapter_config("baseline", "smoke"))
    rows = [{"chapter": "baseline", "preset": "smoke", "arm": "baseline", "experiment": "", "config_sha": sha,
             "peak_bytes": 3 << 30}]
    res = unit_resources(unit, cpus=2, plan_rows=rows)
    assert res == {"cpus": 2, "gpus": 0, "memory": (2 << 30) + (3 << 30)}
    assert unit_resources(unit, plan_rows=[{**rows[0], "config_sha": "stale"}])["memory"] is None
    gpu = plan_units(["baseline"], "gpu", [0], {}, [{}], tmp_path)[0].units[0]
    assert unit_resources(gpu, plan_rows=[])["gpus"] == 1
    spec = slurm_parameters(unit, res, timeout_min=30, partition="gpu")
    assert spec == {"name": "baseline.baseline-seed0", "timeout_min": 30, "nodes": 1, "tasks_per_node": 1,
                    "cpus_per_task": 2, "gpus_per_node": 0, "slurm_signal_delay_s": 120, "mem_gb": 5,
                    "slurm_partition": "gpu"}
    ex = submitit.AutoExecutor(folder=tmp_path / "slurm", cluster="debug")
    ex.update_parameters(**spec)              # submitit checks every name against its Slurm executor's
    with pytest.raises(NameError):
        ex.update_parameters(slurm_gpus_per_unit=1)


class ScriptedEngine:
    """An engine whose units end as a script says: per unit name, a list of outcomes, one per
    submission ("died", "error" or "ok")."""

    def __init__(self, script):
        self.script, self.submitted = script, []

    def submit(self, unit, res):
        self.submitted.append(unit.name)
        return unit

    def wait(self, handles):
        unit = handles[0]
        outcome = self.script.get(unit.name, ["ok"]).pop(0) if self.script.get(unit.name) else "ok"
        if outcome == "died":
            return [(unit, WorkerDied("killed"))]
        if outcome == "error":
            return [(unit, {"unit": unit.name, "error": "NonFiniteError: step 3: loss is nan"})]
        return [(unit, {"unit": unit.name, "seconds": 1.0, "resumed_from": None})]


def test_schedule_retries_dead_workers_and_skips_what_waits_for_a_failure(tmp_path):
    base = dict(chapter="c", preset="smoke", overrides=(), point="", label="", out=str(tmp_path), seeds=(0,))
    a, b = Unit(**base, arm="a", seed=0), Unit(**base, arm="b", seed=0)
    same = Unit(**base, arm="baseline_same_time", seed=0, after=(a.name, b.name))
    res_of = {u.name: {"cpus": 1, "gpus": 0, "memory": None} for u in (a, b, same)}
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "b-seed0.json").write_text("{}")             # finished: never submitted
    engine = ScriptedEngine({a.name: ["died", "died", "ok"]})
    res = schedule([a, b, same], engine, res_of, retries=2, log=lambda *_: None)
    assert engine.submitted == [a.name, a.name, a.name, same.name] and not res["failed"]
    assert res["skipped"] == [b.name]
    engine = ScriptedEngine({a.name: ["died", "died", "died"]})             # more deaths than retries
    res = schedule([a, b, same], engine, res_of, retries=2, log=lambda *_: None)
    assert res["failed"] == {a.name: "WorkerDied: killed", same.name: f"not run: {a.name} failed"}
    engine = ScriptedEngine({a.name: ["error"]})                             # never retried
    res = schedule([a, b, same], engine, res_of, retries=2, log=lambda *_: None)
    assert engine.submitted == [a.name] and res["failed"][a.name].startswith("NonFiniteError")


@pytest.mark.parametrize("argv, words", [
    (["sweep", "baseline", "--out", "o", "--engine", "mpi"], "unknown engine 'mpi'; choose one of: local, ray, slurm"),
    (["sweep", "nochapter", "--out", "o"], "unknown chapter 'nochapter'; choose from: baseline"),
    (["sweep", "baseline", "--out", "o", "--grid", "lr"], "--grid expects key=value1,value2"),
    (["sweep", "baseline", "--out", "o", "--grid", "nokey=1,2"], "nokey"),
])
def test_bad_input_is_one_line_and_exit_2(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--preset", "smoke"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and words in err
    assert not (tmp_path / "o").exists()


def test_an_engine_whose_package_is_missing_is_one_line_naming_the_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)          # as if not installed: import fails
    assert main(["sweep", "baseline", "--preset", "smoke", "--out", str(tmp_path / "o"), "--engine", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --engine slurm needs submitit, which is not installed: pip install 'metabook[sweep]' "
                   "(or use --engine local)")


# ----------------------------------------------------------------------------- the records

def test_local_sweep_of_two_chapters_writes_the_records_run_writes(tmp_path):
    """baseline and instance_lr (with the baseline at instance_lr's time), one seed, on a
    process pool: the same accuracies, bit for bit, as `run`; the same-time arm got its budget
    from its target's finished unit."""
    res = sweep(["baseline", "instance_lr"], "smoke", [0], tmp_path / "sw", ILR, engine="local", workers=2,
                log=lambda *_: None)
    assert not res["failed"] and len(res["done"]) == 1 + 3
    for chapter, overrides in (("baseline", TINY), ("instance_lr", ILR)):     # ilr.* keys: instance_lr only
        ran = json.loads((tmp_path / "sw" / chapter / "result.json").read_text())
        ref = run_chapter(chapter, "smoke", [0], tmp_path / f"ref-{chapter}", overrides, progress=False)
        assert accuracies(ran) == accuracies(ref)
        assert ran["arms"].keys() == ref["arms"].keys()
    bought, trained, ratio = same_time_budget(tmp_path / "sw" / "instance_lr", "instance_lr")   # ratio: timed in the unit's worker
    assert ratio > 1 and trained == pytest.approx(bought, rel=1e-9)


def test_a_shared_stage_unit_makes_the_enn_its_arm_loads(tmp_path):
    gi = {"dataset": "synthetic", "train_size": 320, "meta_size": 100, "batch_size": 32, "width": 8,
          "test_size": 100, "heldout_size": 100, "epochs": 1.0, "gi.weight": 1.0, "gi.episodes": 4,
          "gi.rounds": 1, "gi.episode_steps": 4, "gi.snapshot_every": 2, "gi.enn_iters": 5, "gi.eval_size": 50}
    units = {u.name.split("/")[-1]: u for u in plan_units(["grad_instructor"], "smoke", [0], gi, [{}], tmp_path)[0].units}
    arm = units["grad_instructor-seed0"]
    stage = units[arm.after[0].split("/")[-1]]
    assert "error" not in run_unit(stage)
    assert [p.name.startswith("enn-seed0-") for p in (tmp_path / "grad_instructor" / "cache").iterdir()] == [True]
    assert "error" not in run_unit(arm)
    run = json.loads((tmp_path / "grad_instructor" / "runs" / "grad_instructor-seed0.json").read_text())
    assert "cache" in run["extras"]["enn"]["loaded_from"]          # trained once, by the stage
    stage_run = json.loads((tmp_path / "grad_instructor" / "runs" / f"{stage.arm}-seed0.json").read_text())
    assert run["cost"]["one_off_seconds"] == stage_run["one_off_seconds"] > 0    # ... and charged to the arm
    assert run["cost"]["one_off_cpu_seconds"] == stage_run["one_off_cpu_seconds"] > 0


# ----------------------------------------------------------------------------- faults, on Ray

@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray", reason="Ray is an optional dependency (pip install metabook[sweep])")
    for attempt in range(2):       # Ray gives its node 30 s to start: a loaded machine may need a second go
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception as err:
            ray.shutdown()
            if attempt or "timed out during startup" not in str(err):
                raise
    yield ray
    ray.shutdown()


def kill_when_checkpointed(run_dir: Path, arm: str, seed: int, stop: threading.Event) -> list:
    """Watch run_dir until (arm, seed) has a checkpoint, then SIGKILL the worker that trains it
    (the pid in its unit lock). Returns [pid] once killed."""
    killed = []
    ckpt = run_dir / "runs" / f"{arm}-seed{seed}" / "checkpoint.pt"
    lock = run_dir / ".units" / f"{arm}-seed{seed}" / ".lock"

    def watch():
        while not stop.is_set() and not killed:
            if ckpt.exists() and lock.exists():
                pid = int(lock.read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.02)
    threading.Thread(target=watch, daemon=True).start()
    return killed


def test_ray_faults_killed_worker_unfixable_unit_and_a_stopped_sweep(ray, tmp_path, capsys):
    """A worker killed mid-unit is retried from its checkpoint (same accuracies as `run`); the
    diverging grid point fails with its error, does not stop the others, and the sweep exits 1
    naming it in one line; the same command again runs only what is not finished."""
    out = tmp_path / "sw"
    argv = ["sweep", "baseline", "--preset", "smoke", "--seeds", "2", "--out", str(out), "--engine", "ray",
            "--grid", "lr=0.05,1e12", *sets(MLP)]
    good = out / "baseline" / "lr=0.05"
    stop = threading.Event()
    killed = kill_when_checkpointed(good, "baseline", 0, stop)
    assert main(argv) == 1
    stop.set()
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: unit baseline/lr=1e12/baseline-seed") and \
        "NonFiniteError" in err[0] and "and 1 more" in err[0]
    assert killed, "the unit finished before its worker could be killed"
    assert "done baseline/lr=0.05/baseline-seed0" in captured.out and "resumed from step" in captured.out
    assert not (out / "baseline" / "lr=1e12" / "result.json").exists()
    ran = json.loads((good / "result.json").read_text())
    ref = run_chapter("baseline", "smoke", [0, 1], tmp_path / "ref", {**MLP, "lr": "0.05"}, progress=False)
    assert accuracies(ran) == accuracies(ref)

    (good / "runs" / "baseline-seed1.json").unlink()          # a sweep stopped before this unit finished
    kept = (good / "runs" / "baseline-seed0.json").stat().st_mtime_ns
    assert main(argv) == 1                                     # the diverging point fails again, alone
    captured = capsys.readouterr()
    assert "done baseline/lr=0.05/baseline-seed1" in captured.out
    assert "lr=0.05/baseline-seed0" not in captured.out        # finished: never submitted again
    assert (good / "runs" / "baseline-seed0.json").stat().st_mtime_ns == kept
    assert accuracies(json.loads((good / "result.json").read_text())) == accuracies(ref)


# ----------------------------------------------------------------------------- faults, on the local engine

def test_local_engine_retries_a_worker_killed_mid_unit(tmp_path, capsys):
    """SIGKILL the pool's worker once the unit has a checkpoint: the pool breaks, the unit is
    submitted again to a new pool and resumes from its checkpoint, with the accuracies of `run`."""
    out = tmp_path / "sw"
    argv = ["sweep", "baseline", "--preset", "smoke", "--seeds", "1", "--out", str(out), "--engine", "local",
            "--workers", "1", *sets(MLP)]
    stop = threading.Event()
    killed = kill_when_checkpointed(out / "baseline", "baseline", 0, stop)
    assert main(argv) == 0
    stop.set()
    printed = capsys.readouterr().out
    assert killed, "the unit finished before its worker could be killed"
    assert "retry baseline/baseline-seed0" in printed and "resumed from step" in printed
    ref = run_chapter("baseline", "smoke", [0], tmp_path / "ref", MLP, progress=False)
    assert accuracies(json.loads((out / "baseline" / "result.json").read_text())) == accuracies(ref)


@contextlib.contextmanager
def two_endless_units(tmp_path, stderr=subprocess.DEVNULL, engine="local", checkpoint_every=4):
    """A sweep on `engine` (its own process group) of two units that would take hours, on two
    workers, once both have a checkpoint: yields (driver, worker pids, checkpoints, unit locks),
    and on the way out SIGKILLs whatever of them is still alive."""
    out = tmp_path / "sw"
    argv = ["sweep", "baseline", "--preset", "smoke", "--seeds", "2", "--out", str(out), "--engine", engine,
            "--workers", "2", *sets({**MLP, "epochs": 1e6, "checkpoint_every": checkpoint_every})]
    runs, units = out / "baseline" / "runs", out / "baseline" / ".units"
    ckpts = [runs / f"baseline-seed{s}" / "checkpoint.pt" for s in (0, 1)]
    locks = [units / f"baseline-seed{s}" / ".lock" for s in (0, 1)]
    proc = subprocess.Popen([sys.executable, "-m", "metabook", *argv], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    workers = []
    try:
        deadline = time.time() + 300           # a loaded machine can take minutes to start torch twice
        while not all(c.exists() for c in ckpts) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        workers = [int(lock.read_text().split()[0]) for lock in locks]
        yield proc, workers, ckpts, locks
    finally:
        for pid in workers:
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def wait_until_gone(pids: list[int], seconds: float) -> bool:
    """Whether every process in `pids` has ended within `seconds`."""
    deadline = time.time() + seconds
    while any(process_alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    return not any(process_alive(pid) for pid in pids)


def test_a_sigint_to_the_sweep_process_alone_stops_every_unit_at_a_checkpoint(tmp_path):
    """SIGINT to the driver only (`kill -INT`, a notebook's interrupt), while two workers train
    units that would take hours: the sweep passes it on, each unit checkpoints and stops, the
    workers end, and the driver exits 130 with one line, soon, not once the units are done."""
    with two_endless_units(tmp_path, stderr=subprocess.PIPE) as (proc, workers, ckpts, _):
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err[-2000:]
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: interrupted (Ctrl-C)"), err[-2000:]
        assert wait_until_gone(workers, 30), "a worker goes on training after the sweep stopped"
    assert all(c.exists() for c in ckpts) and not list(ckpts[0].parent.parent.glob("*.json"))


def test_a_sigint_to_a_ray_sweep_cancels_its_tasks_and_each_unit_stops_at_a_checkpoint(tmp_path):
    """The same on Ray: the sweep cancels its tasks in flight, each unit writes a checkpoint
    after the step it stopped at (not only the periodic one it had, 1,000 steps apart), and the
    driver waits for them before it exits 130."""
    pytest.importorskip("ray", reason="Ray is an optional dependency (pip install metabook[sweep])")
    step = lambda ckpt: torch.load(ckpt, weights_only=True)["step"]
    with two_endless_units(tmp_path, subprocess.PIPE, "ray", checkpoint_every=1000) as (proc, _, ckpts, _):
        before = [step(c) for c in ckpts]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 130, err[-2000:]
        assert err.strip().splitlines()[-1].startswith("error: interrupted (Ctrl-C)"), err[-2000:]
    after = [step(c) for c in ckpts]
    assert all(a > b for a, b in zip(after, before)), f"checkpoints at steps {before}, then {after} after the stop"


def test_workers_whose_sweep_is_killed_alone_checkpoint_and_exit_instead_of_training_on(tmp_path):
    """SIGKILL the driver only (out of memory, kill -9 of its pid) while two workers train units
    that would take hours: each worker checkpoints, releases its unit's lock and exits."""
    with two_endless_units(tmp_path) as (proc, workers, ckpts, locks):
        proc.kill()
        assert proc.wait(timeout=60) == -signal.SIGKILL
        assert wait_until_gone(workers, 60), "a worker trains on after its sweep was killed"
    assert all(c.exists() for c in ckpts) and not any(lock.exists() for lock in locks)


def test_a_sweep_whose_driver_is_killed_continues_where_it_stopped(tmp_path, capsys):
    """Kill the whole sweep (driver and workers, SIGKILL) after seed 0 finished and while seed 1
    trains; the same command again skips seed 0 and resumes seed 1 from its checkpoint."""
    out = tmp_path / "sw"
    argv = ["sweep", "baseline", "--preset", "smoke", "--seeds", "2", "--out", str(out), "--engine", "local",
            "--workers", "1", *sets(MLP)]
    runs = out / "baseline" / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "metabook", *argv], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if (runs / "baseline-seed0.json").exists() and (runs / "baseline-seed1" / "checkpoint.pt").exists():
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the sweep finished before it could be killed"
    worker = int((out / "baseline" / ".units" / "baseline-seed1" / ".lock").read_text().split()[0])
    deadline = time.time() + 30                # SIGKILL is delivered, not awaited: let the worker go
    while process_alive(worker) and time.time() < deadline:
        time.sleep(0.05)
    assert not (out / "baseline" / "result.json").exists()
    kept = (runs / "baseline-seed0.json").stat().st_mtime_ns

    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "baseline/baseline-seed0" not in printed                # finished: never submitted again
    assert "done baseline/baseline-seed1" in printed and "resumed from step" in printed
    assert (runs / "baseline-seed0.json").stat().st_mtime_ns == kept
    ref = run_chapter("baseline", "smoke", [0, 1], tmp_path / "ref", MLP, progress=False)
    assert accuracies(json.loads((out / "baseline" / "result.json").read_text())) == accuracies(ref)
