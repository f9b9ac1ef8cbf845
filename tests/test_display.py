"""Tests of metabook.display: HTML tables, live listings, glued numbers, the chapters' start."""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from metabook import display
from metabook.display import GLUE_PREFIX, Listing, Table, chapter_start, glue, percent, table
from metabook.results import arms_table, format_table

RECORD = {"seeds": [0, 1], "arms": {
    "baseline": {"test_acc": {"mean": 0.566, "std": 0.025, "per_seed": [0.584, 0.548]},
                 "seconds_per_step": 0.1, "step_cost_ratio": 1.0},
    "method": {"test_acc": {"mean": 0.5895, "std": 0.018, "per_seed": [0.602, 0.577]},
               "seconds_per_step": 0.4, "step_cost_ratio": 4.0}}}


def test_table_is_real_html_with_escaped_cells_and_text_fallback():
    t = table([{"arm": "a<b", "acc": "58.9 ± 1.8"}, {"arm": "c", "acc": 1}], "cap & tion")
    html = t._repr_html_()
    assert html.startswith("<table") and html.count("<tr>") == 3 and "<th>arm</th>" in html
    assert "a&lt;b" in html and "<caption>cap &amp; tion</caption>" in html and "a<b" not in html
    assert repr(t) == "cap & tion\n" + format_table(t.rows)
    assert "(no rows)" in Table([])._repr_html_()


def test_arms_shows_the_records_arms_table():
    assert display.arms(RECORD).rows == arms_table(RECORD)
    assert display.arms(None).rows == []


def test_listing_is_the_live_source_highlighted():
    shown = Listing(display.percent)
    assert repr(shown) == inspect.getsource(display.percent)
    html = shown._repr_html_()
    assert "percent" in html and "<span" in html            # highlighted, not a plain <pre> copy


def test_glue_writes_what_myst_nb_reads(monkeypatch):
    """The output of glue(name, value) is the one myst-nb's own glue(..., display=False) writes."""
    myst_nb = pytest.importorskip("myst_nb")
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: shown.append((a, k)))
    glue("acc", 58.95)
    myst_nb.glue("acc", 58.95, display=False)
    assert shown[0] == shown[1]
    bundle, kwargs = shown[0]
    assert bundle[0] == {GLUE_PREFIX + "text/plain": "58.95"} and kwargs["metadata"]["scrapbook"]["name"] == "acc"


def test_glue_of_a_missing_value_is_nan_and_formats(monkeypatch):
    from myst_nb.core.variables import format_plain_text

    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: shown.append(a[0]))
    glue("gone", None)
    glue("three", 3)
    glue("numpy", np.float32(0.5))
    glue("count", np.int64(7))
    texts = [bundle[GLUE_PREFIX + "text/plain"] for bundle in shown]
    assert format_plain_text(texts[0], ".1f") == "nan" and format_plain_text(texts[1], ".1f") == "3.0"
    assert format_plain_text(texts[2], ".2f") == "0.50" and format_plain_text(texts[3], "d") == "7"


def test_a_glued_word_reads_as_the_word_not_its_repr(monkeypatch):
    from myst_nb.core.variables import format_plain_text

    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: shown.append(a[0]))
    glue("verdict", "not resolved")
    assert format_plain_text(shown[0][GLUE_PREFIX + "text/plain"], "") == "not resolved"


def test_percent_reads_mean_std_and_one_seed_and_is_nan_when_missing():
    assert percent(RECORD, "method") == pytest.approx(58.95)
    assert percent(RECORD, "baseline", stat="std") == pytest.approx(2.5)
    assert percent(RECORD, "baseline", seed=1) == pytest.approx(54.8)
    assert math.isnan(percent(RECORD, "absent")) and math.isnan(percent(None, "method"))
    assert math.isnan(percent(RECORD, "method", seed=7))


def test_chapter_start_resolves_preset_config_and_runs_folder(tmp_path, capsys):
    start = chapter_start("04_instance_lr", "instance_lr", "smoke", 0, "synthetic", tmp_path / "runs")
    assert start.preset == "smoke" and start.out_dir == tmp_path / "runs"
    assert start.overrides == {"dataset": "synthetic"} and start.cfg["dataset"] == "synthetic"
    out = capsys.readouterr().out
    assert "preset smoke" in out and str(tmp_path / "runs") in out
    with pytest.raises(Exception, match="smoke"):
        chapter_start("04_instance_lr", "instance_lr", "fast", show=False)


def test_chapter_start_without_an_experiment_has_no_config_and_prints_no_runs_folder(tmp_path, capsys):
    start = chapter_start("01_meta_gradients", None, "smoke", 0, out_dir=tmp_path)
    assert start.preset == "smoke" and start.cfg == {} and start.overrides == {}
    out = capsys.readouterr().out
    assert "preset smoke" in out and "runs kept" not in out


# ----------------------------------------------------------------------------- paired differences as text

def _accuracies(per_seed):
    """An arm of a record: its held-out accuracy per seed."""
    return {"heldout_acc": {"mean": float(np.mean(per_seed)), "per_seed": list(per_seed)}}


PAIRED = {"seeds": [0, 1, 2], "dataset": {}, "config": {"noise.kind": "uniform", "noise.rate": 0.4},
          "arms": {"baseline": _accuracies([0.50, 0.52, 0.51]), "method": _accuracies([0.53, 0.56, 0.54]),
                   "flat": _accuracies([0.52, 0.51, 0.52])}}


def test_format_difference_shows_the_mean_and_the_interval_in_points_or_what_stands_for_it():
    from metabook.results import format_difference

    d = {"mean": 0.012, "lo": -0.003, "hi": 0.027}
    assert format_difference(d) == "+1.2 [-0.3, +2.7]"
    assert format_difference(d, " points") == "+1.2 points [-0.3, +2.7]"
    assert format_difference(d, mean=False) == "[-0.3, +2.7]"
    one_seed = {"mean": -0.004, "lo": math.nan, "hi": math.nan}
    assert format_difference(one_seed) == "-0.4"
    assert format_difference(one_seed, no_interval="(no interval)") == "-0.4 (no interval)"
    assert format_difference(one_seed, " points", "no interval") == "-0.4 points no interval"
    assert format_difference(one_seed, no_interval="no interval", mean=False) == "no interval"


def test_claims_and_comparisons_show_the_paired_difference_and_its_verdict():
    from metabook.display import claim, comparisons
    from metabook.results import format_difference, paired_difference

    d = paired_difference(PAIRED, "method", "baseline")
    assert d["verdict"] == "ahead"                                  # three seeds, each +2 to +4 points
    row = claim("beats SGD", "equal epochs", PAIRED, "method", "baseline")
    assert row["measured"] == (f"{format_difference(d, ' points')} ({d['method']}), heldout_acc, uniform 40% noise")
    assert row["verdict"] == "method against baseline: ahead"
    rows = {r["comparison"]: r for r in comparisons(PAIRED, "method")}
    assert rows["method - baseline"]["95% interval"] == format_difference(d, mean=False)
    assert rows["method - flat"]["verdict"] == paired_difference(PAIRED, "method", "flat")["verdict"]


def test_a_claim_without_its_record_arm_or_metric_is_not_tested():
    from metabook.display import claim

    for row in (claim("c", "t", None, "method", "baseline"), claim("c", "t", PAIRED, "method", "absent"),
                claim("c", "t", PAIRED, "method", "baseline", metric="gap")):
        assert row["measured"] == "not run" and row["verdict"] == "not tested"
    measured = claim("c", "t", PAIRED, "method", "baseline", metric="heldout_acc")["measured"]
    assert ", heldout_acc, " in measured


def test_glue_difference_glues_the_paired_interval_in_points_and_its_verdict_or_nan_without_a_record(monkeypatch):
    from metabook.display import glue_difference
    from metabook.results import paired_difference

    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: shown.append(
        (k["metadata"]["scrapbook"]["name"], a[0][GLUE_PREFIX + "text/plain"])))
    glue_difference("m", PAIRED, "method", "baseline")
    glue_difference("gone", None, "method", "baseline")
    d = paired_difference(PAIRED, "method", "baseline")
    assert dict(shown[:4]) == {"m_mean": repr(100 * d["mean"]), "m_lo": repr(100 * d["lo"]),
                               "m_hi": repr(100 * d["hi"]), "m_verdict": d["verdict"]}
    assert d["verdict"] == "ahead" and 2 < 100 * d["mean"] < 4
    assert dict(shown[4:]) == {"gone_mean": "nan", "gone_lo": "nan", "gone_hi": "nan", "gone_verdict": "nan"}


def test_glue_of_a_function_glues_its_value_or_nan_where_the_record_lacks_it(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: shown.append(a[0]))
    rec = {"arms": {"a": {"x": 0.25}}}
    glue("there", lambda: 100 * rec["arms"]["a"]["x"])
    glue("absent", lambda: rec["arms"]["b"]["x"])
    missing = None
    glue("no record", lambda: missing["arms"])
    glue("empty", lambda: min([]))
    assert [bundle[GLUE_PREFIX + "text/plain"] for bundle in shown] == ["25.0", "nan", "nan", "nan"]
    with pytest.raises(NameError):                                   # a bug in the chapter still stops it
        glue("typo", lambda: undefined_name)                         # noqa: F821


def test_provenance_counts_threads_in_the_singular_for_one_and_old_records_read_so(monkeypatch):
    import torch

    from metabook.plots import provenance_label
    from metabook.results import provenance

    for n, words in ((1, "1 thread)"), (2, "2 threads)")):
        monkeypatch.setattr(torch, "get_num_threads", lambda n=n: n)
        assert provenance("cpu")["device"].endswith(words)
    old = {"preset": "cpu", "seeds": [0], "provenance": {"device": "cpu (x86_64, 1 threads)",
                                                         "git_commit": "abc1234", "date": "2026-11-23T10:00"}}
    assert provenance_label(old) == "preset cpu, 1 seed, cpu (x86_64, 1 thread), commit abc1234, 2026-11-23"
    old["provenance"]["device"] = "cpu (x86_64, 11 threads)"
    assert "11 threads)" in provenance_label(old)
