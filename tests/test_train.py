"""The training loop: learning, resume after a kill, NaN detection, schedules, the result record."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import Killed, kill_at

from metabook import chapter_config
from metabook.config import ConfigError
from metabook.data import make_synthetic
from metabook.methods.baseline import Baseline
from metabook.train import (Arm, NonFiniteError, RunError, lr_at, make_model, prepare_data, run_arms,
                            seed_everything, train)

TINY = {"dataset": "synthetic", "train_size": 640, "meta_size": 100, "batch_size": 64, "width": 8,
        "test_size": 200, "epochs": 2.0, "eval_every": 1.0}


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(2000, 400, seed=0)


def run_baseline(cfg, dataset, **kwargs):
    """run_arms of the baseline alone, seed 0, no progress bar."""
    return run_arms("baseline", "baseline", {"baseline": Arm(Baseline)}, cfg, [0], progress=False, dataset=dataset,
                    **kwargs)


def run_tiny(synthetic, overrides=None, out_dir=None, on_step=None, seed=0):
    cfg = chapter_config("baseline", "smoke", {**TINY, **(overrides or {})})
    data = prepare_data(cfg, seed, torch.device("cpu"), synthetic)
    seed_everything(seed)
    model = make_model(cfg, synthetic.num_classes, torch.device("cpu"))
    return model, train(Baseline(cfg), model, data, cfg, seed=seed, out_dir=out_dir, progress=False, on_step=on_step)


def test_baseline_learns_synthetic_data_far_above_chance(synthetic):
    _, res = run_tiny(synthetic, {"epochs": 3.0})
    assert res["metrics"]["test_acc"] > 0.5                       # chance is 0.1
    assert res["history"][-1]["train_loss"] < res["history"][0]["train_loss"]
    assert len(res["history"]) == 3 and res["cost"]["steps"] == 30


def test_killed_run_resumes_from_its_checkpoint_to_bitwise_identical_results(synthetic, tmp_path):
    overrides = {"checkpoint_every": 4}
    model_a, full = run_tiny(synthetic, overrides)

    with pytest.raises(Killed):
        run_tiny(synthetic, overrides, out_dir=tmp_path, on_step=kill_at(11))
    assert (tmp_path / "checkpoint.pt").exists()                  # written at step 8
    steps_run = []
    model_b, resumed = run_tiny(synthetic, overrides, out_dir=tmp_path,
                                on_step=lambda step, m: steps_run.append(step))
    assert steps_run[0] == 9                                      # resumed after step 8, not from 0
    assert resumed["metrics"] == full["metrics"]
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["test_acc"] for r in resumed["history"]] == [r["test_acc"] for r in full["history"]]
    assert not (tmp_path / "checkpoint.pt").exists()              # removed once the run finished


def test_checkpoint_of_another_config_is_not_resumed(synthetic, tmp_path):
    def stop(step, metrics):
        if step == 5:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_tiny(synthetic, {"checkpoint_every": 4}, out_dir=tmp_path, on_step=stop)
    with pytest.raises(RunError, match="checkpoint.pt belongs to another run"):
        run_tiny(synthetic, {"checkpoint_every": 4, "lr": 0.05}, out_dir=tmp_path)


def test_finished_arm_runs_are_reused_only_for_the_same_config(synthetic, tmp_path):
    cfg = chapter_config("baseline", "smoke", {**TINY, "epochs": 1.0})
    first = run_baseline(cfg, synthetic, out_dir=tmp_path)
    again = run_baseline(cfg, synthetic, out_dir=tmp_path)
    assert again["arms"]["baseline"]["train_seconds"] == first["arms"]["baseline"]["train_seconds"]   # loaded
    changed = chapter_config("baseline", "smoke", {**TINY, "epochs": 1.0, "lr": 0.05})
    with pytest.raises(RunError, match="another config.*lr"):
        run_baseline(changed, synthetic, out_dir=tmp_path)


def test_diverging_run_stops_with_an_error_naming_step_and_quantity(synthetic):
    with pytest.raises(NonFiniteError, match=r"step \d+: loss is (nan|inf)"):
        run_tiny(synthetic, {"model": "mlp", "batchnorm": False, "lr": 1e12, "momentum": 0.0,
                             "schedule": "constant"})


def test_time_budget_stops_training_early_and_says_so(synthetic):
    _, res = run_tiny(synthetic, {"epochs": 50.0, "time_budget_s": 0.5})
    assert res["stopped_early"] and "time budget" in res["stopped_early"]
    assert res["cost"]["steps"] < 500


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_schedules_start_low_peak_at_lr_and_end_low(schedule):
    cfg = {"lr": 0.4, "schedule": schedule, "warmup": 0.2}
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert max(lrs) == pytest.approx(0.4, rel=0.05)
    if schedule == "constant":
        assert min(lrs) == 0.4
    else:
        assert lrs[0] == pytest.approx(0.04) and lrs[-1] < 0.02 and lrs.index(max(lrs)) in range(18, 22)


def test_cli_run_writes_a_complete_result_record(tmp_path):
    args = [f"{k}={v}" for k, v in {**TINY, "epochs": 1.0}.items()]
    proc = subprocess.run([sys.executable, "-m", "metabook", "run", "baseline", "--preset", "smoke",
                           "--out", str(tmp_path), "--no-progress", "--seeds", "2",
                           *sum([["--set", a] for a in args], [])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "SYNTHETIC" in proc.stdout
    rec = json.loads((tmp_path / "result.json").read_text())
    for key in ("chapter", "method", "preset", "seed", "config", "dataset", "metrics", "history", "cost",
                "provenance", "arms"):
        assert key in rec, key
    assert rec["dataset"]["synthetic"] is True and rec["dataset"]["train_size"] == 640
    assert rec["cost"]["peak_memory_kind"] and rec["cost"]["timer"] == "perf_counter"
    assert set(rec["provenance"]) >= {"metabook", "torch", "python", "device", "git_commit", "date"}
    arm = rec["arms"]["baseline"]
    per_seed = arm["test_acc"]["per_seed"]
    assert len(per_seed) == 2 and rec["history"][-1]["test_acc"] == per_seed[0]       # seed 0's last evaluation
    assert rec["metrics"]["test_acc"] == pytest.approx(sum(per_seed) / 2)
    assert rec["config"]["lr"] == 0.1 and rec["config"]["preset"] == "smoke"


def test_target_meta_split_follows_the_target_distribution_and_stays_out_of_training(synthetic):
    cfg = chapter_config("baseline", "smoke", {"dataset": "synthetic", "train_size": 1000, "meta_size": 300,
                                               "target.classes": "3,5", "target.ratio": 2.0})
    data = prepare_data(cfg, 0, torch.device("cpu"), synthetic)
    counts = torch.bincount(data.dataset.y_train[data.meta_idx], minlength=10)
    assert counts.tolist() == [25, 25, 25, 50, 25, 50, 25, 25, 25, 25]     # twice as likely: 1/6 vs 1/12
    assert not set(data.meta_idx.tolist()) & set(data.train_idx.tolist())
    assert torch.allclose(data.target_probs[[3, 5]], torch.tensor(1 / 6))


def test_target_accuracy_weights_per_class_accuracy_by_the_target_distribution(synthetic):
    from metabook.train import target_accuracy

    cfg = chapter_config("baseline", "smoke", {"dataset": "synthetic", "train_size": 1000, "meta_size": 200,
                                               "target.classes": "3", "target.ratio": 7.0})
    data = prepare_data(cfg, 0, torch.device("cpu"), synthetic)

    class AlwaysClass(torch.nn.Module):           # predicts class 0, but class 3 is a close second
        def forward(self, x):
            logits = torch.zeros(len(x), 10)
            logits[:, 0], logits[:, 3] = 1.0, 0.5
            return logits

    as_trained, corrected = target_accuracy(AlwaysClass(), data.test, data.target_probs, data.train_prior)
    assert as_trained == pytest.approx(data.target_probs[0].item())     # right exactly on class 0
    assert corrected == pytest.approx(data.target_probs[3].item())      # log(7) > 0.5 moves it to class 3


def test_unknown_target_class_is_a_clear_error(synthetic):
    from metabook.config import ConfigError
    cfg = chapter_config("baseline", "smoke", {"dataset": "synthetic", "train_size": 1000, "meta_size": 200,
                                               "target.classes": "3,12"})
    with pytest.raises(ConfigError, match="0..9"):
        prepare_data(cfg, 0, torch.device("cpu"), synthetic)


def test_latest_recorded_picks_the_newest_record_whose_config_matches(tmp_path):
    from metabook.results import latest_recorded, write_result
    for name, kind, date in [("a", "symmetric", "2026-11-01"), ("b", "pairflip", "2026-11-02"),
                             ("c", "symmetric", "2026-11-03"), ("d", "pairflip", "2026-10-01")]:
        write_result({"chapter": "instance_lr", "preset": "cpu", "name": name, "config": {"noise.kind": kind},
                      "provenance": {"date": date}}, tmp_path / name)
    assert latest_recorded("instance_lr", "cpu", tmp_path)["name"] == "c"
    assert latest_recorded("instance_lr", "cpu", tmp_path, where={"noise.kind": "pairflip"})["name"] == "b"
    assert latest_recorded("instance_lr", "cpu", tmp_path, where={"noise.kind": "none"}) is None
    assert latest_recorded("instance_lr", "gpu", tmp_path) is None


def test_the_shown_log_names_the_records_a_page_reads_and_only_those(tmp_path, monkeypatch):
    from metabook.results import SHOWN_LOG, latest_recorded, load_result, recorded_runs, write_result
    for name, kind, date in [("a", "symmetric", "2026-11-01"), ("b", "pairflip", "2026-11-02"),
                             ("c", "symmetric", "2026-11-03")]:
        write_result({"chapter": "instance_lr", "preset": "cpu", "name": name, "config": {"noise.kind": kind},
                      "provenance": {"date": date}}, tmp_path / "records" / name)
    write_result({"chapter": "baseline", "preset": "cpu", "provenance": {"date": "2026-11-04"}}, tmp_path / "records" / "e")
    log = tmp_path / "read.txt"
    monkeypatch.setenv(SHOWN_LOG, str(log))
    read = lambda: [Path(p).parent.name for p in log.read_text().split()] if log.exists() else []
    latest_recorded("instance_lr", "cpu", tmp_path / "records", where={"noise.kind": "pairflip"})
    assert read() == ["b"]                        # the answer only, not every record it looked at
    latest_recorded("instance_lr", "gpu", tmp_path / "records")
    assert read() == ["b"]
    recorded_runs("baseline", tmp_path / "records")
    load_result(tmp_path / "records" / "a")
    assert read() == ["b", "e", "a"]
    write_result({"chapter": "baseline", "preset": "cpu", "seeds": [0, 1], "provenance": {"date": "2026-11-05"}},
                 tmp_path / "records" / "f")
    assert recorded_runs("baseline", tmp_path / "records", "cpu", seeds=1) == []
    assert recorded_runs("baseline", tmp_path / "records", "gpu") == []
    assert read() == ["b", "e", "a"]              # a record the filter leaves out is not read
    assert len(recorded_runs("baseline", tmp_path / "records", "cpu", seeds=2)) == 1
    assert read() == ["b", "e", "a", "f"]


def test_a_probe_record_is_found_only_when_asked_for(tmp_path, synthetic):
    """A run with --set overrides keeps them in its record; without a `where` the chapter's record
    at the preset stays the newest run of the preset as it is."""
    from metabook import run_chapter
    from metabook.results import latest_recorded, write_result

    probe = run_chapter("baseline", "smoke", seeds=[0], overrides={**TINY, "lr": "0.02", "same_time_steps": "7"},
                        progress=False, dataset=synthetic)
    assert probe["overrides"]["lr"] == 0.02 and probe["overrides"]["dataset"] == "synthetic"
    assert "same_time_steps" not in probe["overrides"] and probe["config"]["same_time_steps"] == [7]   # a replay, not a probe
    write_result({"chapter": "baseline", "preset": "smoke", "name": "main", "config": {"lr": 0.1},
                  "provenance": {"date": "2026-11-01"}}, tmp_path / "main")
    write_result({**probe, "name": "probe", "provenance": {"date": "2026-11-02"}}, tmp_path / "probe")
    assert latest_recorded("baseline", "smoke", tmp_path)["name"] == "main"
    assert latest_recorded("baseline", "smoke", tmp_path, where={"lr": 0.02})["name"] == "probe"


# ----------------------------------------------------------------------------- the runner's contract and meters

class FakeClock:
    """Stands in for the runner's `time` module: seconds pass only when someone sleeps."""
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def process_time(self):                 # the fake sleeps are busy: CPU time is the clock's
        return self.now

    def sleep(self, seconds):
        self.now += seconds


class Sleepy(Baseline):
    """Steps of 10 ms, a one-off stage of 0.3 s and diagnostics of 0.2 s, on a clock."""
    prepared, clock = 0, None

    def prepare(self):
        Sleepy.prepared += 1
        self.clock.sleep(0.3)

    def step(self, batch, meta_batch, lr):
        self.clock.sleep(0.01)
        return super().step(batch, meta_batch, lr)

    def diagnostics(self, streams):
        self.clock.sleep(0.2)
        return {"slow_diagnostic": 1.0}


@pytest.fixture
def clock(monkeypatch):
    import metabook.train as runner

    Sleepy.clock, Sleepy.prepared = FakeClock(), 0
    monkeypatch.setattr(runner, "time", Sleepy.clock)
    return Sleepy.clock


def test_one_off_stage_and_diagnostics_stay_outside_the_step_time(synthetic, clock):
    cfg = chapter_config("baseline", "smoke", {**TINY, "epochs": 2.0, "eval_every": 0.5})
    data = prepare_data(cfg, 0, torch.device("cpu"), synthetic)
    seed_everything(0)
    res = train(Sleepy(cfg), make_model(cfg, 10, torch.device("cpu")), data, cfg, progress=False)
    assert res["cost"]["one_off_seconds"] == pytest.approx(0.3)
    assert res["cost"]["train_seconds"] == pytest.approx(20 * 0.01)     # 4 evaluations x 0.2 s are not in it
    assert res["cost"]["seconds_per_step"] == pytest.approx(0.01)
    assert res["cost"]["train_cpu_seconds"] == pytest.approx(20 * 0.01)     # the CPU meter: the same steps
    assert res["cost"]["one_off_cpu_seconds"] == pytest.approx(0.3)
    assert [row["slow_diagnostic"] for row in res["history"]] == [1.0] * 4
    assert clock.now == pytest.approx(0.3 + 0.2 + 4 * 0.2)


def test_killed_run_resumes_after_its_one_off_stage_without_repeating_it(synthetic, tmp_path, clock):
    cfg = chapter_config("baseline", "smoke", {**TINY, "checkpoint_every": 100})
    data = prepare_data(cfg, 0, torch.device("cpu"), synthetic)
    with pytest.raises(Killed):
        seed_everything(0)
        train(Sleepy(cfg), make_model(cfg, 10, torch.device("cpu")), data, cfg, out_dir=tmp_path,
              progress=False, on_step=kill_at(3))
    seed_everything(0)
    res = train(Sleepy(cfg), make_model(cfg, 10, torch.device("cpu")), data, cfg, out_dir=tmp_path, progress=False)
    assert Sleepy.prepared == 1                                  # resumed from the checkpoint after prepare()
    assert res["cost"]["one_off_seconds"] == pytest.approx(0.3)  # and its cost is kept


class NanAt(Baseline):
    """Reports a NaN loss at one step (1-based), or poisons the weights after the last step."""
    bad_step, poison_last = 7, False

    def step(self, batch, meta_batch, lr):
        out = super().step(batch, meta_batch, lr)
        self.t = getattr(self, "t", 0) + 1
        if self.t == self.bad_step:
            out["loss"] = torch.tensor(float("nan"))
        if self.poison_last and self.t == self.ctx.total_steps:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return out


def test_nan_inside_an_evaluation_window_is_named_by_its_own_step(synthetic):
    cfg = chapter_config("baseline", "smoke", {**TINY, "eval_every": 2.0})       # one window of 20 steps
    data = prepare_data(cfg, 0, torch.device("cpu"), synthetic)
    with pytest.raises(NonFiniteError, match=r"^step 7: loss is nan"):
        train(NanAt(cfg), make_model(cfg, 10, torch.device("cpu")), data, cfg, progress=False)


def test_a_run_whose_final_evaluation_is_nan_is_not_recorded(synthetic):
    cfg = chapter_config("baseline", "smoke", TINY)
    data = prepare_data(cfg, 0, torch.device("cpu"), synthetic)
    method = NanAt(cfg)
    method.bad_step, method.poison_last = -1, True
    with pytest.raises(NonFiniteError, match="final test_loss"):
        train(method, make_model(cfg, 10, torch.device("cpu")), data, cfg, progress=False)


def test_on_diverge_record_keeps_the_diverged_seed_and_stability_counts_it(synthetic):
    from metabook.results import stability

    cfg = chapter_config("baseline", "smoke", {**TINY, "epochs": 2.0, "on_diverge": "record"})
    rec = run_arms("baseline", "baseline", {"baseline": Arm(Baseline), "nan": Arm(NanAt)}, cfg, [0, 1],
                   progress=False, dataset=synthetic)
    nan = rec["arms"]["nan"]
    assert set(nan["diverged"]) == {"0", "1"} and nan["diverged"]["0"].startswith("step 7: loss is nan")
    total = rec["arms"]["baseline"]["steps"]
    assert all(7 <= s < total for s in nan["steps_per_seed"])        # ended at the window that saw it
    assert len(nan["heldout_acc"]["per_seed"]) == 2                   # and evaluated as it stood
    assert rec["arms"]["baseline"]["diverged"] == {}
    report = stability(rec)
    assert report["nan"]["failed"] == 2 and report["nan"]["text"].startswith("2 of 2 seeds diverged (seed 0: step 7")
    assert report["baseline"]["text"] == "all 2 seeds trained"


def test_a_seed_at_chance_is_reported_collapsed():
    from metabook.results import stability

    arm = {"test_acc": {"per_seed": [0.6, 0.11, 0.62]}, "heldout_acc": {"per_seed": [0.61, 0.12, 0.6]}}
    report = stability({"seeds": [0, 1, 2], "dataset": {"num_classes": 10}, "arms": {"m": arm}})
    assert report["m"]["collapsed"] == ["1"] and report["m"]["text"] == "1 of 3 seeds collapsed to chance (seed 1)"


def test_peak_memory_is_measured_per_arm_not_inherited_from_a_heavier_one(synthetic):
    cfg = chapter_config("baseline", "smoke", {**TINY, "epochs": 0.2})
    arms = {"wide": Arm(Baseline, {"width": 64}), "baseline": Arm(Baseline, {"width": 4})}
    rec = run_arms("baseline", "baseline", arms, cfg, [0], progress=False, dataset=synthetic)
    wide, narrow = rec["arms"]["wide"]["peak_memory_bytes"], rec["arms"]["baseline"]["peak_memory_bytes"]
    assert narrow < wide / 4                     # a process-lifetime peak would give narrow >= wide
    assert "tensor" in rec["cost"]["peak_memory_kind"]


_FIRST_USE: dict = {}


class LazyCache(Baseline):
    """A baseline whose first step in the process builds a 4 MiB cache that outlives it."""
    def step(self, batch, meta_batch, lr):
        _FIRST_USE.setdefault("table", torch.zeros(1 << 20))
        return super().step(batch, meta_batch, lr)


def test_a_first_use_cache_is_not_charged_to_the_arm_that_goes_first(synthetic):
    from metabook.train import step_peak_bytes

    cfg = chapter_config("baseline", "smoke", {**TINY, "epochs": 0.2})
    data = prepare_data(cfg, 0, torch.device("cpu"), synthetic)
    _FIRST_USE.clear()
    first = step_peak_bytes(Arm(LazyCache), cfg, data, 0)[0]
    assert "table" in _FIRST_USE                                   # the cache was built, outside the meter
    assert first == step_peak_bytes(Arm(LazyCache), cfg, data, 0)[0]


def test_ctrl_c_saves_a_checkpoint_and_the_rerun_ends_as_an_uninterrupted_run(synthetic, tmp_path):
    import os
    import signal

    overrides = {"checkpoint_every": 1000}
    _, full = run_tiny(synthetic, overrides)

    def interrupt(step, _):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="stopped at step 6"):
        run_tiny(synthetic, overrides, out_dir=tmp_path, on_step=interrupt)
    steps = []
    _, resumed = run_tiny(synthetic, overrides, out_dir=tmp_path, on_step=lambda s, m: steps.append(s))
    assert steps[0] == 7 and resumed["metrics"] == full["metrics"]


def test_a_full_disk_during_a_checkpoint_is_named_and_leaves_no_temporary_file(synthetic, tmp_path, monkeypatch):
    import metabook.train as runner

    real_save, calls = torch.save, []

    def save(obj, path):
        calls.append(path)
        if len(calls) == 2:                       # the second checkpoint hits a full disk
            raise OSError(28, "No space left on device")
        return real_save(obj, path)
    monkeypatch.setattr(runner.torch, "save", save)
    with pytest.raises(RunError, match="checkpoint.pt: the disk is full"):
        run_tiny(synthetic, {"checkpoint_every": 4}, out_dir=tmp_path)
    assert not (tmp_path / "checkpoint.tmp").exists()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4    # the previous one is kept


def test_corrupt_state_files_are_named_with_the_fix(synthetic, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match=r"checkpoint.pt is corrupt.*delete it"):
        run_tiny(synthetic, out_dir=tmp_path)
    cfg = chapter_config("baseline", "smoke", {**TINY, "epochs": 0.2})
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "baseline-seed0.json").write_text('{"metrics": {"test_acc": 0.')
    with pytest.raises(RunError, match=r"baseline-seed0.json is corrupt.*delete it"):
        run_baseline(cfg, synthetic, out_dir=tmp_path)


def test_two_runs_never_share_an_output_folder(synthetic, tmp_path):
    import subprocess as sp

    cfg = chapter_config("baseline", "smoke", {**TINY, "epochs": 0.2})
    other = sp.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(f"{other.pid} {__import__('socket').gethostname()}")
        with pytest.raises(RunError, match=rf"in use by another run \(pid {other.pid}\)"):
            run_baseline(cfg, synthetic, out_dir=tmp_path)
    finally:
        other.kill()
        other.wait()
    rec = run_baseline(cfg, synthetic, out_dir=tmp_path)             # the lock of a dead process is taken over
    assert rec["arms"]["baseline"]["steps"] == 2 and not (tmp_path / ".lock").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(RunError, match="is a file, not a folder"):
        run_baseline(cfg, synthetic, out_dir=tmp_path / "file")


def test_a_lock_whose_process_was_killed_but_not_reaped_is_taken_over(tmp_path):
    """A killed worker whose parent is gone stays a zombie where init does not reap (containers):
    its pid still answers kill(pid, 0), yet it holds no lock."""
    import socket
    import subprocess as sp

    from metabook.train import OutLock, process_alive

    zombie = sp.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z" and time.time() < deadline:
        time.sleep(0.02)                                             # ended, not yet waited for: a zombie
    try:
        assert not process_alive(zombie.pid) and process_alive(1)
        (tmp_path / ".lock").write_text(f"{zombie.pid} {socket.gethostname()}")
        with OutLock(tmp_path):
            assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
    finally:
        zombie.wait()


def test_impossible_budgets_fail_before_anything_trains(synthetic):
    from metabook.config import ConfigError
    from metabook.methods.instance_lr import ARMS

    cfg = chapter_config("instance_lr", "smoke", {**TINY, "meta_size": 0, "epochs": 0.2})
    with pytest.raises(ConfigError, match="'instance_lr' needs meta batches but meta_size=0"):
        run_arms("instance_lr", "instance_lr", ARMS, cfg, [0], progress=False, dataset=synthetic)
    with pytest.raises(ConfigError, match="smaller than one batch"):
        run_tiny(synthetic, {"batch_size": 1000})


def test_a_run_folder_is_not_resumed_on_other_data(synthetic, tmp_path):
    import dataclasses

    changed = dataclasses.replace(synthetic, x_train=synthetic.x_train.clone())
    changed.x_train[0, 0, 0, 0] += 1                                 # one pixel
    with pytest.raises(Killed):
        run_tiny(synthetic, {"checkpoint_every": 4}, out_dir=tmp_path, on_step=kill_at(5))
    with pytest.raises(RunError, match="checkpoint.pt belongs to another run \\(data differ"):
        run_tiny(changed, {"checkpoint_every": 4}, out_dir=tmp_path)
    cfg = chapter_config("baseline", "smoke", {**TINY, "epochs": 0.2})
    run_baseline(cfg, synthetic, out_dir=tmp_path / "arms")
    with pytest.raises(RunError, match="another config \\(differs in data\\)"):
        run_baseline(cfg, changed, out_dir=tmp_path / "arms")


def test_the_record_says_how_many_test_images_were_used(synthetic):
    cfg = chapter_config("baseline", "smoke", {**TINY, "epochs": 0.2, "test_size": 5000})
    with pytest.warns(UserWarning, match="test_size=5000 asked for, but the data holds 400"):
        rec = run_baseline(cfg, synthetic)
    assert rec["dataset"]["test_size"] == 400 and rec["dataset"]["test_size_requested"] == 5000


def test_the_same_time_baseline_records_its_steps_and_replays_them_exactly(synthetic):
    from metabook.methods.instance_lr import ARMS

    cfg = chapter_config("instance_lr", "smoke", {**TINY, "epochs": 0.5, "ilr.arms": "baseline,instance_lr"})
    measured = run_arms("instance_lr", "instance_lr", {k: ARMS[k] for k in ("baseline", "instance_lr")}, cfg,
                        [0, 1], progress=False, dataset=synthetic, same_time_for="instance_lr")
    steps = measured["arms"]["baseline_same_time"]["steps_per_seed"]
    assert all(s >= 5 for s in steps)               # a meta step costs more than a plain one
    replay = {**cfg, "same_time_steps": steps}
    twice = [run_arms("instance_lr", "instance_lr", {k: ARMS[k] for k in ("baseline", "instance_lr")}, replay,
                      [0, 1], progress=False, dataset=synthetic, same_time_for="instance_lr")["arms"]["baseline_same_time"]
             for _ in range(2)]
    assert twice[0]["steps_per_seed"] == twice[1]["steps_per_seed"] == steps
    assert twice[0]["test_acc"] == twice[1]["test_acc"] and twice[0]["stopped_early"] is None
    with pytest.raises(ConfigError, match="same_time_steps has 3 values for 2 seeds"):
        run_arms("instance_lr", "instance_lr", ARMS, {**cfg, "same_time_steps": [5, 6, 7]}, [0, 1],
                 progress=False, dataset=synthetic, same_time_for="instance_lr")


def test_a_replayed_same_time_budget_retrains_only_the_same_time_arm(synthetic, tmp_path):
    """A record whose same-time budget was measured badly is mended by replaying that arm with
    `same_time_steps` in the same --out: every other finished run is reused as it is, and the old
    same-time runs, of another budget, are refused by name rather than reused."""
    from metabook.methods.instance_lr import ARMS

    arms = {k: ARMS[k] for k in ("baseline", "instance_lr")}
    cfg = chapter_config("instance_lr", "smoke", {**TINY, "epochs": 0.5, "ilr.arms": "baseline,instance_lr"})
    first = run_arms("instance_lr", "instance_lr", arms, cfg, [0, 1], out_dir=tmp_path, progress=False,
                     dataset=synthetic, same_time_for="instance_lr")
    kept = {p.name: p.read_bytes() for p in (tmp_path / "runs").glob("*.json") if "same_time" not in p.name}
    replay = {**cfg, "same_time_steps": [s + 3 for s in first["arms"]["baseline_same_time"]["steps_per_seed"]]}
    with pytest.raises(RunError, match="baseline_same_time-seed0.json is a finished run with another config"):
        run_arms("instance_lr", "instance_lr", arms, replay, [0, 1], out_dir=tmp_path, progress=False,
                 dataset=synthetic, same_time_for="instance_lr")
    for old in (tmp_path / "runs").glob("baseline_same_time-seed*.json"):
        old.unlink()
    again = run_arms("instance_lr", "instance_lr", arms, replay, [0, 1], out_dir=tmp_path, progress=False,
                     dataset=synthetic, same_time_for="instance_lr")
    assert again["arms"]["baseline_same_time"]["steps_per_seed"] == replay["same_time_steps"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "runs").glob("*.json") if "same_time" not in p.name} == kept
    for arm in arms:
        assert again["arms"][arm]["train_seconds"] == first["arms"][arm]["train_seconds"]     # read back, not retrained


def test_a_checkpoint_saved_with_a_same_time_replay_in_its_config_resumes(synthetic, tmp_path):
    """Checkpoints of older code keep `same_time_steps` in their config; it is not part of a run's identity."""
    overrides = {"checkpoint_every": 4}
    _, full = run_tiny(synthetic, overrides)
    with pytest.raises(Killed):
        run_tiny(synthetic, overrides, out_dir=tmp_path, on_step=kill_at(6))
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    ck["config"]["same_time_steps"] = [123]
    torch.save(ck, tmp_path / "checkpoint.pt")
    steps_run = []
    _, resumed = run_tiny(synthetic, overrides, out_dir=tmp_path, on_step=lambda step, m: steps_run.append(step))
    assert steps_run[0] == 5 and resumed["metrics"] == full["metrics"]


def test_the_same_time_budget_is_the_targets_steps_times_their_side_by_side_cost_ratio():
    """steps = ratio x target steps x (1 + one-off / training time), both times from the target's
    own run (CPU seconds where it kept them, else wall-clock): no time of the reference's run, which
    may have shared the cores with other jobs, enters the budget; it is a count of steps."""
    from metabook.train import arm_seed_config

    cfg = chapter_config("instance_lr", "smoke", TINY)
    arm_cfgs = {"baseline": cfg, "instance_lr": cfg}
    budget = lambda cost, ratio: arm_seed_config("baseline_same_time", arm_cfgs, cfg, 0, [0], 10, "baseline",
                                                 "instance_lr", cost, ratio)
    on_cpu = budget({"train_seconds": 900.0, "one_off_seconds": 500.0, "steps": 100,
                     "train_cpu_seconds": 300.0, "one_off_cpu_seconds": 100.0}, 3.0)
    assert on_cpu["epochs"] == pytest.approx(40.0)     # 3 x 100 steps x (1 + 100/300): 400 steps of 10 an epoch
    assert on_cpu["same_time_ratio"] == 3.0 and not on_cpu["time_budget_s"]
    on_gpu = budget({"train_seconds": 400.0, "one_off_seconds": 200.0, "steps": 100, "train_cpu_seconds": None}, 2.0)
    assert on_gpu["epochs"] == pytest.approx(30.0) and not on_gpu["time_budget_s"]     # 2 x 100 x 1.5


def test_the_same_time_ratio_is_timed_side_by_side_unless_the_arm_has_begun(synthetic, tmp_path, monkeypatch):
    """Measured: the meta step's cost over SGD's, timed in one process. An arm that has a
    checkpoint or a finished run in --out keeps the ratio it started with (else its config, and
    so the resume, would change), and read back, a finished record has the same budget."""
    import metabook.train as train_mod
    from metabook.methods.instance_lr import ARMS

    cfg = chapter_config("instance_lr", "smoke", {**TINY, "epochs": 0.5, "ilr.arms": "baseline,instance_lr"})
    arms = {k: ARMS[k] for k in ("baseline", "instance_lr")}
    assert train_mod.same_time_ratio(arms, cfg, "instance_lr", "baseline", 0, synthetic) > 1.5
    rec = run_arms("instance_lr", "instance_lr", arms, cfg, [0], out_dir=tmp_path / "run", progress=False,
                   dataset=synthetic, same_time_for="instance_lr")
    ratio = rec["arms"]["baseline_same_time"]["same_time_ratio"]
    monkeypatch.setattr(train_mod, "interleaved_step_costs", lambda *a, **k: pytest.fail("timed again"))
    again = run_arms("instance_lr", "instance_lr", arms, cfg, [0], out_dir=tmp_path / "run", progress=False,
                     dataset=synthetic, same_time_for="instance_lr")
    assert again["arms"]["baseline_same_time"]["same_time_ratio"] == ratio
    assert again["arms"]["baseline_same_time"]["steps_per_seed"] == rec["arms"]["baseline_same_time"]["steps_per_seed"]
    ckpt = tmp_path / "begun" / "runs" / "baseline_same_time-seed0" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"config": {"same_time_ratio": 2.5}}, ckpt)
    assert train_mod.same_time_ratio(arms, cfg, "instance_lr", "baseline", 0, synthetic, tmp_path / "begun") == 2.5


def test_baseline_steps_in_bf16_when_asked_and_in_full_precision_otherwise(synthetic):
    """amp=bf16 runs the baseline's forward in bf16 on the CPU (other numbers than fp32, still
    learning); amp=auto on the CPU is bitwise amp=off; an arm with its own step never autocasts."""
    from metabook.methods.instance_lr import InstanceLR

    runs = {amp: run_tiny(synthetic, {"amp": amp})[1] for amp in ("off", "auto", "bf16")}
    loss = {amp: [h["train_loss"] for h in r["history"]] for amp, r in runs.items()}
    assert loss["auto"] == loss["off"]
    assert loss["bf16"] != loss["off"]
    assert loss["bf16"][-1] < loss["bf16"][0] and runs["bf16"]["metrics"]["test_acc"] > 0.2
    cfg = chapter_config("instance_lr", "smoke", {**TINY, "amp": "bf16"})
    assert Baseline(cfg).uses_amp() and not InstanceLR(cfg).uses_amp()


def test_an_update_through_the_grad_scaler_is_the_plain_update(synthetic):
    """fp16's path (a GPU's): descend() scales the loss by 2^10, unscales the gradients before the
    step and keeps the scale when they are finite; the update equals the unscaled one, also when
    the backward is restricted to some inputs (OfflineLoss's frozen loss network)."""
    from metabook.train import fresh_method, probe_step

    cfg = chapter_config("baseline", "smoke", {**TINY, "amp": "off"})
    data = prepare_data(cfg, 0, torch.device("cpu"), synthetic)
    updates = []
    for scaled in (False, True):
        method = fresh_method(Arm(Baseline), cfg, data, 0)
        if scaled:
            method.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        before = [p.detach().clone() for p in method.model.parameters()]
        for i in range(2):
            probe_step(method, i, cfg)
        updates.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(method.model.parameters(), before)]))
    assert method.scaler.get_scale() == 2.0 ** 10 and updates[0].norm() > 0
    torch.testing.assert_close(updates[1], updates[0], rtol=1e-4, atol=1e-7)
    only_head = list(method.model.parameters())[-2:]
    frozen = [p.detach().clone() for p in method.model.parameters()]
    batch = method.ctx.streams.batch("train", 2)
    method.descend(torch.nn.functional.cross_entropy(method.model(batch.x), batch.y), inputs=only_head)
    moved = [not torch.equal(p, f) for p, f in zip(method.model.parameters(), frozen)]
    assert moved[-2:] == [True, True] and not any(moved[:-2])


def test_fp16_on_the_cpu_is_refused_in_one_line(synthetic):
    with pytest.raises(ConfigError, match="amp=fp16 needs a CUDA device"):
        run_tiny(synthetic, {"amp": "fp16"})


def test_validation_split_is_disjoint_from_meta_and_heldout_is_the_fixed_split(synthetic):
    cfg = chapter_config("baseline", "smoke", {**TINY, "val_size": 60, "heldout_size": 150})
    a, b = prepare_data(cfg, 0, torch.device("cpu"), synthetic), prepare_data(cfg, 1, torch.device("cpu"), synthetic)
    for d in (a, b):
        rows = lambda x: {bytes(r) for r in x.cpu().numpy().reshape(len(x), -1)}     # noqa: E731
        assert len(d.val.y) == 60 and not rows(d.val.x) & rows(d.meta.x) and not rows(d.val.x) & rows(d.train.x)
        assert d.info["heldout_size"] == 150 and torch.equal(d.heldout.y, synthetic.y_heldout[:150])
        assert rows(d.heldout.x) == rows(synthetic.x_heldout[:150].permute(0, 3, 1, 2).contiguous())
    assert not torch.equal(a.val.y, b.val.y) or not torch.equal(a.val.x, b.val.x)     # val is per seed, held-out is not


def test_the_record_holds_heldout_accuracy_and_which_images_were_right(synthetic):
    from metabook.train import per_example, unpack_bits

    cfg = chapter_config("baseline", "smoke", {**TINY, "heldout_size": 300})
    rec = run_baseline(cfg, synthetic)
    arm = rec["arms"]["baseline"]
    bits = unpack_bits(arm["heldout_correct"]["0"], rec["dataset"]["heldout_size"])
    assert rec["dataset"]["heldout_size"] == 300 and len(bits) == 300
    assert abs(bits.mean() - arm["heldout_acc"]["mean"]) < 1e-9 and rec["metrics"]["heldout_acc"] == arm["heldout_acc"]["mean"]
    assert 0.3 < bits.mean() < 1.0                          # learned, and not every image right
    model, res = run_tiny(synthetic, {"heldout_size": 300})
    data = prepare_data(chapter_config("baseline", "smoke", {**TINY, "heldout_size": 300}), 0, torch.device("cpu"), synthetic)
    assert res["metrics"]["heldout_acc"] == per_example(model, data.heldout)[0].double().mean().item()


def test_a_cpu_run_records_the_cpu_seconds_of_its_steps(synthetic):
    """The planner's cpu column is CPU time; the record keeps the CPU seconds of the same steps
    (so the two compare on a loaded machine). One thread: they cannot exceed the wall-clock by
    more than the timer's resolution."""
    rec, res = run_tiny(synthetic, {"epochs": 1.0})
    cost = res["cost"]
    assert 0 < cost["train_cpu_seconds"] <= cost["train_seconds"] * torch.get_num_threads() + 0.05
    assert cost["one_off_cpu_seconds"] is not None
