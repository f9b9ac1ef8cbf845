"""The bench (chapter `compare`): every method against its baseline under one budget, and the
memory measurement its table uses."""
import pytest
import torch

from metabook.bench import peak_tensor_bytes
from metabook.config import ConfigError
from metabook.data import make_synthetic

TINY = {"dataset": "synthetic", "train_size": 256, "meta_size": 64, "test_size": 100, "batch_size": 32,
        "epochs": 2.0, "compare.methods": "instance_lr,meta_hf"}


def test_peak_tensor_bytes_counts_temporaries_alive_together_once():
    a = torch.randn(256, 256)                           # exists before: not counted
    mib = a.numel() * a.element_size()

    def three_temporaries_two_alive():
        b = a * 2
        c = b + 1
        del b
        return c * 3

    assert peak_tensor_bytes(three_temporaries_two_alive) == 2 * mib
    assert peak_tensor_bytes(lambda: a.view(-1)) == mib   # a view is seen once, at its storage's size
    assert peak_tensor_bytes(lambda: [a * 2 for _ in range(3)]) == 3 * mib


def test_peak_tensor_bytes_skips_the_fake_tensors_that_linearize_traces_with():
    """torch.func.linearize (the Gauss-Newton products of chapter 7 on a CPU) traces its function
    with FakeTensors, which hold no memory; reading their data pointer warns (and is to become an
    error, which the meter would have turned into counting their full size)."""
    import warnings

    x, v = torch.randn(1 << 18), torch.ones(1 << 18)
    f = lambda x: torch.tanh(x * 2).sum()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Accessing the data pointer of FakeTensor")
        warnings.filterwarnings("ignore", "Attempted to insert a get_attr Node", UserWarning)   # torch's own constants
        linearized = peak_tensor_bytes(lambda: torch.func.linearize(f, x)[1](v))
    assert linearized < 8 * x.numel() * x.element_size()    # real tensors only: a handful of x-sized ones


def test_peak_tensor_bytes_sees_inside_torch_func_transforms():
    from torch.func import functional_call, vjp

    layer = torch.nn.Linear(64, 32)
    x = torch.randn(128, 64)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def pullback():
        out, pb = vjp(lambda p: functional_call(layer, p, (x,)), params)
        return pb(torch.ones_like(out))

    assert peak_tensor_bytes(pullback) >= 128 * 32 * 4 + (64 * 32 + 32) * 4    # output + gradients


@pytest.fixture(scope="module")
def bench_record(tmp_path_factory):
    from metabook import run_chapter

    out = tmp_path_factory.mktemp("bench")
    dataset = make_synthetic(400, 100, seed=0)
    rec = run_chapter("compare", "smoke", seeds=[0], out_dir=out, overrides=TINY, progress=False, dataset=dataset)
    return rec, out, dataset


def test_bench_pairs_each_method_with_its_baseline_under_one_budget(bench_record):
    rec, out, _ = bench_record
    assert list(rec["rows"]) == ["instance_lr", "meta_hf"]               # the book's order
    for name, row in rec["rows"].items():
        mcfg = rec["method_configs"][name]
        assert all(mcfg[k] == rec["config"][k] for k in ("train_size", "meta_size", "test_size", "epochs",
                                                            "batch_size", "dataset"))
        assert row["metric"] == "heldout_acc"                            # the verdicts' split
        assert row["versus"]["baseline"]["diffs"][0] == pytest.approx(
            row["acc"]["per_seed"][0] - row["baseline_acc"]["per_seed"][0])
        for d in row["versus"].values():
            if d:
                assert d["lo"] <= d["mean"] <= d["hi"] and d["method"].startswith("bootstrap over 1 seed and")
                assert d["verdict"] == "not resolved"                        # one seed: no verdict, whatever the images say
        assert row["total_time_ratio"] == pytest.approx(
            (row["train_seconds"] + row["one_off_seconds"]) / row["baseline_train_seconds"])
        assert (out / name / "arms.json").exists() and not (out / name / "result.json").exists()
    # the noise-targeting method and its baseline train on noisy labels, the others on clean ones
    assert rec["method_configs"]["instance_lr"]["noise.kind"] == "uniform"
    assert rec["method_configs"]["instance_lr"]["noise.rate"] == 0.4
    assert rec["method_configs"]["meta_hf"]["noise.kind"] == "none"
    # each method keeps its chapter's model
    assert rec["rows"]["meta_hf"]["model"] == "cuda_convnet" and rec["rows"]["instance_lr"]["model"] == "small_cnn"
    # an MLHF step (CG over Gauss-Newton products, the nets' state) holds more than an SGD step; its
    # meta-training is a one-off stage, not in the step (1.29x measured here by the tensor meter)
    assert rec["rows"]["meta_hf"]["memory_ratio"] > 1.2
    # MLHF is credited against Hessian-free without meta-learning, in the same run
    assert rec["rows"]["meta_hf"]["control"] == "hf" and rec["rows"]["instance_lr"]["control"] == "baseline_clean"
    assert rec["rows"]["meta_hf"]["control_acc"]["per_seed"] != rec["rows"]["meta_hf"]["acc"]["per_seed"]


def test_bench_table_shows_every_method_with_ratios(bench_record):
    from metabook.methods.compare import table

    rows = table(bench_record[0])
    assert [r["method"] for r in rows] == ["instance_lr", "meta_hf"]
    assert all(r["time/step"].endswith("x") and "±" in r["acc"] for r in rows)
    assert rows[1]["vs control"].startswith("hf: ") and rows[0]["vs control"].startswith("baseline_clean: ")
    assert all(r["vs baseline"].split("]")[-1].strip() in ("ahead", "behind", "not resolved") for r in rows)


def test_a_record_from_before_the_paired_statistics_gets_t_intervals_over_its_seeds():
    from metabook.methods.compare import table
    from metabook.results import latest_recorded

    rec = latest_recorded("compare", "cpu")
    assert rec is not None and "versus" not in next(iter(rec["rows"].values()))
    rows = table(rec)
    assert len(rows) == len(rec["rows"])
    row = rec["rows"]["instance_lr"]
    d = [a - b for a, b in zip(row["test_acc"]["per_seed"], row["baseline_acc"]["per_seed"])]
    assert rows[1]["vs baseline"].startswith(f"{100 * sum(d) / len(d):+.1f} [")   # 2 seeds: a wide t-interval


def test_bench_resumes_from_finished_runs(bench_record):
    from metabook import run_chapter

    rec, out, dataset = bench_record
    again = run_chapter("compare", "smoke", seeds=[0], out_dir=out, overrides=TINY, progress=False, dataset=dataset)
    for name, row in rec["rows"].items():
        assert again["rows"][name]["acc"] == row["acc"]                          # loaded, not retrained
        assert again["rows"][name]["train_seconds"] == row["train_seconds"]


def test_bench_rejects_an_unknown_method_naming_the_choices():
    from metabook import chapter_config
    from metabook.methods.compare import parse_methods

    with pytest.raises(ConfigError, match="local_losses, instance_lr, online_loss, grad_instructor, meta_hf"):
        chapter_config("compare", "smoke", {"compare.methods": "instance_lr,l2rw"})
    with pytest.raises(ConfigError, match="compare.methods is empty"):
        parse_methods([])
    assert parse_methods(["meta_hf", "instance_lr"]) == ["instance_lr", "meta_hf"]     # the book's order
    with pytest.raises(ConfigError, match="symmetric"):
        chapter_config("compare", "smoke", {"compare.noise_kind": "gaussian"})


def test_bench_command_line_reports_a_bad_method(capsys):
    from metabook.__main__ import main

    assert main(["bench", "--preset", "smoke", "--set", "compare.methods=nope"]) == 2
    assert "compare.methods='nope' is not valid; choose from: local_losses" in capsys.readouterr().err


def test_the_landing_page_shows_the_verdicts_the_records_give():
    from pathlib import Path

    from metabook.build import generated_tables

    page = (Path(__file__).resolve().parents[1] / "book" / "intro.md").read_text()
    shown = page.split("<!-- verdicts start -->\n")[1].split("<!-- verdicts end -->")[0]
    assert shown == generated_tables()[("book/intro.md", "verdicts")](), "stale: run python -m metabook tables"
    rows = [line for line in shown.splitlines() if line.startswith("| [")]
    assert len({row.split("](")[1].split(")")[0] for row in rows}) == 5 and "not resolved" in shown    # five chapters


@pytest.fixture(scope="module")
def small_converged():
    """instance_lr at the converged preset, shrunk to seconds: 3 seeds on 320 synthetic images (the
    record of the preset as it is, which the shrinking overrides would mark as a probe). It trains
    5 steps and keeps the preset's epochs: a converged record of another budget is not the preset's."""
    from metabook.methods import run_chapter

    small = {"dataset": "synthetic", "train_size": 320, "meta_size": 64, "val_size": 64, "heldout_size": 100,
             "test_size": 100, "batch_size": 32, "width": 8, "steps": 5, "eval_every": 0.5}
    rec = run_chapter("instance_lr", "converged", [0, 1, 2], None, small, progress=False,
                      dataset=make_synthetic(1200, 300, seed=0))
    return {**rec, "overrides": {}}          # it stands for the preset's own record, not a probe of it


def test_a_chapters_converged_report_shows_the_check_the_intervals_and_the_failed_seeds(small_converged):
    from metabook.methods.compare import converged_report
    from metabook.results import convergence, stability

    text = converged_report("instance_lr", small_converged)
    check = convergence(small_converged)
    assert f"a ratio of {check['ratio']:.3f}: **{'converged' if check['converged'] else 'not converged'}**" in text
    assert "`instance_lr` minus each reference arm, in points of held-out accuracy:" in text
    assert "| control | baseline_clean |" in text and "| same time | baseline_same_time |" in text
    for arm, s in stability(small_converged).items():
        assert f"- `{arm}`: {s['text']}" in text
    steps = " / ".join(f"{n:,}" for n in small_converged["arms"]["baseline_same_time"]["steps_per_seed"])
    arms = small_converged["arms"]
    ratios = " / ".join(f"{r:.2f}" for r in arms["baseline_same_time"]["same_time_ratio"])   # made by run_arms
    assert f"trained {steps} steps on seeds 0 / 1 / 2, budgeted in the method's steps times their cost ratio, " \
           f"timed side by side before it trained ({ratios}), one-off stage included." in text
    old = {**small_converged, "arms": {**arms, "baseline_same_time": {          # a record made before the ratio
        k: v for k, v in arms["baseline_same_time"].items() if k != "same_time_ratio"}}}
    multiples = " / ".join(f"{n / arms['instance_lr']['steps']:.2f}" for n in arms["baseline_same_time"]["steps_per_seed"])
    assert f"budgeted in CPU seconds: the method's, over the baseline's per step in another run ({multiples} " \
           f"times the method's steps)." in converged_report("instance_lr", old)
    walled = {**old, "arms": {**old["arms"], "instance_lr": {
        k: v for k, v in arms["instance_lr"].items() if k != "train_cpu_seconds"}}}
    assert "budgeted in wall-clock: the method's" in converged_report("instance_lr", walled)
    replayed = {**walled, "config": {**walled["config"], "same_time_steps": [11]}}
    assert "budgeted in replayed steps (`same_time_steps`)" in converged_report("instance_lr", replayed)


def test_the_convergence_checks_name_each_budgets_seeds_and_which_fail(small_converged):
    """A probe's check rests on seed 0, the preset's own record on all its seeds: each check says
    which, so a 3-seed record is not reported as seed 0's. A budget not recorded is left out."""
    from metabook.methods.compare import convergence_checks
    from metabook.results import convergence

    arms = small_converged["arms"]
    probe = {**small_converged, "seeds": [0], "arms": {a: {**arms[a], "heldout_acc": {
        **arms[a]["heldout_acc"], "per_seed": [acc]}} for a, acc in (("baseline", 0.80), ("baseline_double_epochs", 0.90))}}
    c = convergence(small_converged)
    text = convergence_checks([(probe, "a probe"), (None, "not recorded"), (small_converged, "")])
    assert text == (f"The rule, budget by budget: {probe['arms']['baseline']['epochs']:g} epochs on seed 0, 80.0% "
                    f"against 90.0%: 0.889, fails (a probe); {c['epochs']:g} epochs on seeds 0, 1, 2, "
                    f"{100 * c['acc']:.1f}% against {100 * c['double_acc']:.1f}%: {c['ratio']:.3f}"
                    f"{'' if c['converged'] else ', fails'}.\n\n")
    assert convergence_checks([(None, "not recorded")]) == ""


def test_a_converged_record_takes_its_methods_row_of_the_landing_table(small_converged, tmp_path):
    from metabook.methods.compare import summarise, verdicts_markdown
    from metabook.results import latest_recorded, write_result

    bench = latest_recorded("compare", "cpu")
    before = verdicts_markdown(bench, results_dir=tmp_path)
    write_result(small_converged, tmp_path / "instance_lr-converged")
    after = verdicts_markdown(bench, results_dir=tmp_path)
    rows = [line for line in after.splitlines() if "[instance_lr](" in line]
    assert len(rows) == 2                      # against the baseline, then against the control
    versus = summarise("instance_lr", small_converged)["versus"]
    for row, against, d in zip(rows, ("baseline", "baseline_clean"), (versus["baseline"], versus["control"])):
        assert f"| {against} | {100 * d['mean']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] | {d['verdict']} |" in row
    row = rows[0]
    from metabook import chapter_config

    epochs = chapter_config("instance_lr", "converged")["epochs"]
    assert f"converged record: 320 images, {epochs:g} epochs, 3 seeds, 100 held-out images" in row
    others = lambda text: [line for line in text.splitlines() if "[instance_lr](" not in line]
    assert others(after) == others(before) and before != after


def test_a_converged_record_of_a_budget_the_preset_no_longer_trains_is_found_only_by_a_where(small_converged, tmp_path):
    from metabook.methods.compare import converged_report
    from metabook.results import latest_recorded, write_result

    shorter = {**small_converged, "config": {**small_converged["config"], "epochs": 7.0}}    # a budget given up
    write_result(shorter, tmp_path / "instance_lr-converged-epochs7")
    assert latest_recorded("instance_lr", "converged", tmp_path) is None
    assert latest_recorded("instance_lr", "converged", tmp_path, where={"epochs": 7.0})["config"]["epochs"] == 7.0
    assert converged_report("instance_lr", results_dir=tmp_path).startswith("No converged record of this chapter yet")
    write_result(small_converged, tmp_path / "instance_lr-converged")
    assert latest_recorded("instance_lr", "converged", tmp_path)["config"] == small_converged["config"]


def test_a_converged_record_with_too_few_seeds_is_shown_but_decides_nothing(small_converged, tmp_path):
    from metabook.methods.compare import MIN_SEEDS, converged_report, in_progress, verdicts_markdown
    from metabook.results import latest_recorded, write_result

    one = {**small_converged, "seeds": [0]}                      # as if only seed 0 had landed
    assert MIN_SEEDS > 1
    bench = latest_recorded("compare", "cpu")
    write_result(one, tmp_path / "instance_lr-converged")
    row = next(line for line in verdicts_markdown(bench, results_dir=tmp_path).splitlines() if "[instance_lr](" in line)
    assert "cpu bench" in row and f"its converged record has 1 of {MIN_SEEDS} seeds so far" in row
    assert f"**In progress: 1 of at least {MIN_SEEDS} seeds; its verdicts may still change.**" in \
        converged_report("instance_lr", one)
    assert in_progress(one) and not in_progress({**small_converged, "seeds": list(range(MIN_SEEDS))})


def test_a_chapter_without_a_converged_record_says_so_with_the_command(tmp_path):
    from metabook.methods.compare import converged_report

    text = converged_report("meta_hf", results_dir=tmp_path)          # a folder with no records
    assert text.startswith("No converged record of this chapter yet")
    assert "`python -m metabook run meta_hf --preset converged --seeds 3`" in text


def test_a_bench_cell_is_the_difference_its_interval_and_verdict_or_says_one_seed():
    from metabook.methods.compare import interval

    assert interval({"mean": 0.012, "lo": 0.003, "hi": 0.027, "verdict": "ahead"}) == "+1.2 [+0.3, +2.7] ahead"
    one_seed = {"mean": -0.004, "lo": float("nan"), "hi": float("nan"), "verdict": "not resolved"}
    assert interval(one_seed) == "-0.4 (one seed: not resolved)"
    assert interval(None) == "-"
