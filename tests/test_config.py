"""Config resolution and the command line's answers to bad input."""
import subprocess
import sys

import pytest

from metabook import ConfigError, chapter_config


def test_preset_overrides_base_and_set_overrides_preset():
    cfg = chapter_config("baseline", "smoke", {"lr": "0.05", "noise.kind": "pairflip", "augment": "false"})
    from metabook.methods.baseline import PRESETS
    assert cfg["train_size"] == PRESETS["smoke"]["train_size"] != chapter_config("baseline", "cpu")["train_size"]
    assert cfg["lr"] == 0.05 and isinstance(cfg["lr"], float)
    assert cfg["noise.kind"] == "pairflip" and cfg["augment"] is False
    assert cfg["preset"] == "smoke"


def test_auto_preset_is_cpu_without_cuda():
    import torch
    assert chapter_config("baseline", "auto")["preset"] == ("gpu" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("overrides, needle", [
    ({"foo": "1"}, "valid keys: amp, augment"),
    ({"lr": "-0.1"}, "lr=-0.1 is not valid; it must be > 0"),
    ({"noise.rate": "1"}, "it must be in [0, 1)"),
    ({"noise.kind": "gaussian"}, "choose one of: none, symmetric, uniform, pairflip"),
    ({"model": "vgg"}, "choose one of: small_cnn"),
    ({"epochs": "ten"}, "expected a float"),
    ({"augment": "maybe"}, "expected a boolean"),
])
def test_bad_values_raise_config_error_naming_the_choices(overrides, needle):
    with pytest.raises(ConfigError, match=None) as err:
        chapter_config("baseline", "smoke", overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset_and_chapter_list_the_choices():
    with pytest.raises(ConfigError, match="choose one of: auto, smoke, cpu, converged, gpu, paper"):
        chapter_config("baseline", "fast")
    with pytest.raises(ConfigError, match="choose one of: baseline"):
        chapter_config("nope", "smoke")


@pytest.mark.parametrize("args, needle", [
    (["run", "nope"], "unknown chapter 'nope'"),
    (["run", "baseline", "--preset", "fast"], "unknown preset 'fast'"),
    (["run", "baseline", "--preset", "smoke", "--set", "lr=-1"], "lr=-1.0 is not valid"),
    (["run", "baseline", "--preset", "smoke", "--set", "noise.rate=1.5"], "noise.rate=1.5 is not valid"),
    (["run", "baseline", "--preset", "smoke", "--set", "bogus=1"], "unknown config key 'bogus'"),
])
def test_cli_rejects_bad_input_with_one_line_and_no_traceback(args, needle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "metabook", *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("overrides, needle", [
    ({"lr": "inf"}, "lr=inf is not valid; it must be a finite number"),
    ({"epochs": "inf"}, "epochs=inf is not valid; it must be a finite number"),
    ({"weight_decay": "nan"}, "weight_decay=nan is not valid; it must be a finite number"),
    ({"lr": float("-inf")}, "lr=-inf is not valid; it must be a finite number"),
    ({"batch_size": "1.5"}, "batch_size=1.5 is not valid; it must be a whole number"),
    ({"train_size": "-0.5"}, "train_size=-0.5 is not valid; it must be a whole number"),
    ({"batch_size": 2.5}, "batch_size=2.5 is not valid; it must be a whole number"),
    ({"width": "inf"}, "width=inf is not valid; it must be a whole number"),
])
def test_non_finite_floats_and_fractional_integers_are_rejected_not_truncated(overrides, needle):
    with pytest.raises(ConfigError) as err:
        chapter_config("baseline", "smoke", overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_whole_numbers_in_float_notation_are_accepted_for_integer_keys():
    cfg = chapter_config("baseline", "smoke", {"batch_size": "1e2", "train_size": "64.0"})
    assert cfg["batch_size"] == 100 and isinstance(cfg["batch_size"], int)
    assert cfg["train_size"] == 64


def test_check_seeds_accepts_numpys_range_only():
    from metabook.config import check_seeds
    assert check_seeds(3, 2) == [3, 4]
    for first, count in ((-1, 1), (2**32, 1), (2**32 - 1, 2)):
        with pytest.raises(ConfigError, match="seeds must be in 0 .. 4294967295"):
            check_seeds(first, count)
    with pytest.raises(ConfigError, match="--seeds 0 is not valid"):
        check_seeds(0, 0)


def test_lists_are_real_lists_parsed_from_the_command_line_and_checked_element_by_element():
    cfg = chapter_config("instance_lr", "smoke", {"ilr.arms": "baseline, instance_lr", "target.classes": "5,3"})
    assert cfg["ilr.arms"] == ["baseline", "instance_lr"] and cfg["target.classes"] == [5, 3]
    assert chapter_config("depth", "smoke", {"depths": [4, 6]})["depths"] == [4, 6]
    with pytest.raises(ConfigError, match=r"depths=\[4, 2\] is not valid; it must be >= 3"):
        chapter_config("depth", "smoke", {"depths": "4,2"})
    with pytest.raises(ConfigError, match="target.classes='3,x': expected an int in every place"):
        chapter_config("baseline", "smoke", {"target.classes": "3,x"})


def test_every_key_of_every_chapter_has_a_type_a_meaning_and_a_range_or_choices():
    from metabook import CHAPTERS
    from metabook.config import describe

    for name, mod in CHAPTERS.items():
        rows = describe(mod.SECTIONS, chapter_config(name, "smoke"))
        assert len({r["key"] for r in rows}) == len(rows), name
        for r in rows:
            assert r["meaning"] and r["type"] in ("bool", "int", "float", "str", "list[int]", "list[float]", "list[str]"), (name, r)
            if r["type"] in ("int", "float", "list[int]", "list[float]") and r["valid"] == "any finite value":
                assert r["key"] in ("ilr.sigma_min", "ilr.sigma_max"), f"{name}: {r['key']} has no range"


def test_config_command_explains_every_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "metabook", "config", "instance_lr", "--preset", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith("ilr.meta_lr "))
    assert "float" in line and "100.0" in line and ">= 0" in line and "step size on sigma" in line
    proc = subprocess.run([sys.executable, "-m", "metabook", "config", "instance_lr", "--preset", "cpu", "--json"],
                          capture_output=True, text=True, timeout=120)
    import json
    assert json.loads(proc.stdout)["ilr.arms"] == ["baseline", "instance_lr", "baseline_clean", "mean_rate", "mwn"]
