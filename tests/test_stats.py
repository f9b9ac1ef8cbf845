"""Paired statistics of a record: the interval, the method behind it and the verdict word."""
import numpy as np
import pytest
import torch

from metabook.results import RecordError, paired_difference
from metabook.train import pack_bits


def record(per_seed_a, per_seed_b, bits_a=None, bits_b=None):
    def arm(acc, bits):
        out = {"heldout_acc": {"per_seed": list(acc)}, "test_acc": {"per_seed": list(acc)}}
        if bits is not None:
            out["heldout_correct"] = {str(s): pack_bits(torch.as_tensor(b)) for s, b in enumerate(bits)}
        return out
    n = len(bits_a[0]) if bits_a is not None else 0
    return {"dataset": {"heldout_size": n}, "arms": {"m": arm(per_seed_a, bits_a), "b": arm(per_seed_b, bits_b)}}


def test_five_seeds_get_a_t_interval_by_hand():
    a, b = [0.60, 0.62, 0.61, 0.63, 0.59], [0.58, 0.59, 0.60, 0.60, 0.58]
    d = np.subtract(a, b)
    half = 2.776 * d.std(ddof=1) / np.sqrt(5)                      # t(0.975, 4) = 2.776
    res = paired_difference(record(a, b), "m", "b")
    assert res["method"].startswith("t-interval over 5")
    assert res["lo"] == pytest.approx(d.mean() - half, abs=1e-4) and res["hi"] == pytest.approx(d.mean() + half, abs=1e-4)
    assert res["verdict"] == "ahead"
    assert paired_difference(record(b, a), "m", "b")["verdict"] == "behind"


def test_two_seeds_without_images_are_not_resolved_by_a_wide_t_interval():
    res = paired_difference(record([0.60, 0.64], [0.58, 0.60]), "m", "b")       # +2, +4 points
    assert res["method"] == "t-interval over 2 seeds" and res["lo"] < 0 < res["hi"]
    assert res["verdict"] == "not resolved"


def test_two_seeds_with_images_use_the_paired_bootstrap():
    rng = np.random.default_rng(0)
    base = [rng.random(4000) < 0.5 for _ in range(2)]
    better = [b | (rng.random(4000) < 0.2) for b in base]           # right wherever base was, and more
    accs = lambda bits: [float(np.mean(x)) for x in bits]            # noqa: E731
    res = paired_difference(record(accs(better), accs(base), better, base), "m", "b")
    assert res["method"].startswith("bootstrap over 2 seeds and 4,000 held-out images") and res["verdict"] == "ahead"
    assert res["lo"] > 0.05 and res["mean"] == pytest.approx(np.mean([np.mean(x) - np.mean(y) for x, y in zip(better, base)]))
    few = [b.copy() for b in base]
    for f in few:
        f[:3] = ~f[:3]                                               # 3 images of 4000 differ
    res = paired_difference(record(accs(few), accs(base), few, base), "m", "b")
    assert res["lo"] <= 0 <= res["hi"] and res["verdict"] == "not resolved"


def test_one_seed_gets_the_images_interval_and_no_verdict():
    rng = np.random.default_rng(0)
    base = [rng.random(4000) < 0.5]
    better = [base[0] | (rng.random(4000) < 0.2)]                   # +10 points on the images
    res = paired_difference(record([float(better[0].mean())], [float(base[0].mean())], better, base), "m", "b")
    assert res["lo"] > 0.05 and res["method"].endswith("one seed: no verdict")
    assert res["verdict"] == "not resolved"


def test_a_metric_the_record_lacks_is_named():
    rec = record([0.5], [0.4])
    del rec["arms"]["m"]["heldout_acc"]
    with pytest.raises(RecordError, match="heldout_acc is not in arms 'm' and 'b'"):
        paired_difference(rec, "m", "b")


def test_convergence_applies_the_97_percent_rule_to_the_doubled_budget():
    from metabook.results import convergence

    def rec(acc, acc2):
        return {"reference_arm": "baseline", "arms": {
            "baseline": {"epochs": 20.0, "heldout_acc": {"per_seed": acc}},
            "baseline_double_epochs": {"epochs": 40.0, "heldout_acc": {"per_seed": acc2}}}}
    check = convergence(rec([0.80, 0.82], [0.82, 0.84]))
    assert check["converged"] and check["ratio"] == pytest.approx(0.81 / 0.83)
    assert check["double_epochs"] == 40.0 and len(check["per_seed_ratio"]) == 2
    assert not convergence(rec([0.70, 0.72], [0.80, 0.80]))["converged"]          # 0.89 < 0.97
    with pytest.raises(RecordError, match="no baseline_double_epochs arm.*check_convergence"):
        convergence({"reference_arm": "baseline", "arms": {"baseline": {}}})


def test_check_convergence_adds_the_reference_arm_at_twice_the_epochs():
    from metabook import chapter_config
    from metabook.methods import chapter_module

    cfg = chapter_config("instance_lr", "converged")
    exp, = chapter_module("instance_lr").experiments(cfg)
    double = exp.arms["baseline_double_epochs"]
    assert double.factory is exp.arms["baseline"].factory and double.changes["epochs"] == 2 * cfg["epochs"]
    assert "baseline_double_epochs" not in chapter_module("instance_lr").experiments(
        chapter_config("instance_lr", "cpu"))[0].arms


def test_the_convergence_check_trains_right_after_the_reference_arm(monkeypatch):
    """Each seed trains the reference and its double-epochs arm before the method's arms, so a budget
    that has not converged shows after two arms, not after the costly ones; the record keeps its order."""
    from metabook import chapter_config, train
    from metabook.data import make_synthetic
    from metabook.methods import chapter_module

    cfg = chapter_config("instance_lr", "converged", {"dataset": "synthetic", "train_size": 320, "meta_size": 50,
                                                      "heldout_size": 50, "batch_size": 32, "epochs": 0.2})
    exp, = chapter_module("instance_lr").experiments(cfg)
    trained, real = [], train.run_arm_seed
    monkeypatch.setattr(train, "run_arm_seed", lambda name, *a, **k: trained.append(name) or real(name, *a, **k))
    rec = train.run_experiment(exp, [0], progress=False, dataset=make_synthetic(600, 200, seed=0))
    assert trained[:2] == ["baseline", "baseline_double_epochs"] and trained[-1] == "baseline_same_time"
    assert set(trained) == set(rec["arms"]) and list(rec["arms"])[:2] == list(exp.arms)[:2]


def test_converged_presets_meet_the_issues_minimums():
    """Issue 19: at least 20,000 training images, the 10,000 held-out images, the convergence
    check, diverged seeds kept; a chapter without one says so in one line."""
    from metabook import chapter_config
    from metabook.config import ConfigError
    from metabook.methods import CHAPTERS

    have = [c for c, m in CHAPTERS.items() if "converged" in m.PRESETS]
    assert {"instance_lr", "meta_hf", "local_losses", "grad_instructor"} <= set(have)
    for chapter in have:
        cfg = chapter_config(chapter, "converged")
        assert cfg["train_size"] >= 20000 and cfg["heldout_size"] == 10000, chapter
        assert cfg["check_convergence"] and cfg["on_diverge"] == "record", chapter
    with pytest.raises(ConfigError, match="'depth' has no converged preset.*chapters that have one: .*instance_lr"):
        chapter_config("depth", "converged")
