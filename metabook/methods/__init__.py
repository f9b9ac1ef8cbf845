"""Chapters by name. Each module has SECTIONS (the typed config sections it adds), DEFAULTS (its
values for shared keys), PRESETS, ARMS (name -> train.Arm; the method chapters and the baseline)
and run(cfg, seeds, ...).

`run_chapter` is the one entry point: the command line and the notebooks both call it, so the
same seed gives the same numbers from either.
"""
from __future__ import annotations

from ..config import ConfigError, make_config
from . import baseline, compare, depth, grad_instructor, instance_lr, local_losses, meta_hf, online_loss

CHAPTERS = {"baseline": baseline, "depth": depth, "instance_lr": instance_lr, "online_loss": online_loss,
            "meta_hf": meta_hf, "grad_instructor": grad_instructor, "local_losses": local_losses,
            "compare": compare}


def chapter_module(name: str):
    if name not in CHAPTERS:
        raise ConfigError(f"unknown chapter {name!r}; choose one of: {', '.join(CHAPTERS)}")
    return CHAPTERS[name]


def chapter_config(chapter: str, preset: str = "auto", overrides: dict | None = None) -> dict:
    """The resolved, validated config of a chapter at a preset, with --set style overrides."""
    mod = chapter_module(chapter)
    if preset == "converged" and "converged" not in mod.PRESETS:
        have = [c for c, m in CHAPTERS.items() if "converged" in m.PRESETS]
        raise ConfigError(f"chapter {chapter!r} has no converged preset (the verdicts' record budget); "
                          f"chapters that have one: {', '.join(have)}")
    return make_config(mod.SECTIONS, mod.DEFAULTS, mod.PRESETS, preset, overrides)


def preset_differences(chapter: str, preset: str = "gpu", reference: str = "paper") -> list[dict]:
    """What `preset` changes from `reference` (by default: what the gpu preset leaves out of the
    paper's setting), one row per key: {key, preset, reference}."""
    a, b = chapter_config(chapter, preset), chapter_config(chapter, reference)
    return [{"key": k, preset: a[k], reference: b[k]} for k in a if k != "preset" and a[k] != b[k]]


def run_chapter(chapter: str, preset: str = "auto", seeds=(0,), out_dir=None,
                overrides: dict | None = None, progress: bool = True, dataset=None) -> dict:
    """Run a chapter's experiment; writes out_dir/result.json when out_dir is given. The record
    keeps the overrides (`overrides`: key -> parsed value): a run with any is a probe of the
    preset, which results.latest_recorded returns only when asked for by a `where`. The one
    exception is `same_time_steps`, a replay of the same-time arm's budget: the preset's own
    experiment, the steps it replays kept in the record's config."""
    from ..results import write_result

    cfg = chapter_config(chapter, preset, overrides)
    record = chapter_module(chapter).run(cfg, list(seeds), out_dir=out_dir, progress=progress, dataset=dataset)
    record["overrides"] = {k: cfg[k] for k in sorted(overrides or {}) if k != "same_time_steps"}   # a replay is no probe
    if out_dir:
        write_result(record, out_dir)
    return record
