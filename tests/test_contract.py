"""The method contract, one test per promise over every arm of every chapter: a killed run resumes
bitwise; a bad value of a chapter's own knob fails in one line naming the valid values; a run's
record holds the contract's fields."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from helpers import Killed, kill_at

from metabook import CHAPTERS, ConfigError, chapter_config, run_chapter
from metabook.data import make_synthetic
from metabook.train import make_model, prepare_data, seed_everything, train

TINY = {"dataset": "synthetic", "train_size": 256, "meta_size": 64, "test_size": 100, "batch_size": 32,
        "epochs": 1.0, "eval_every": 0.5, "checkpoint_every": 3}
WITH_ARMS = [name for name, mod in CHAPTERS.items() if hasattr(mod, "ARMS")]
ALL_ARMS = [(chapter, arm) for chapter in WITH_ARMS for arm in CHAPTERS[chapter].ARMS]


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(600, 200, seed=0)


def run_arm(synthetic, chapter, arm, out_dir=None, on_step=None):
    spec = CHAPTERS[chapter].ARMS[arm]
    cfg = {**chapter_config(chapter, "smoke", TINY), **spec.changes}
    data = prepare_data(cfg, 0, torch.device("cpu"), synthetic)
    seed_everything(0)
    model = make_model(cfg, synthetic.num_classes, torch.device("cpu"))
    res = train(spec.factory(cfg), model, data, cfg, out_dir=out_dir, progress=False, on_step=on_step,
                cache_dir=None)
    return model, res


@pytest.mark.parametrize("chapter, arm", ALL_ARMS, ids=[f"{c}-{a}" for c, a in ALL_ARMS])
def test_a_killed_run_resumes_bitwise(synthetic, tmp_path, chapter, arm):
    model_a, full = run_arm(synthetic, chapter, arm)
    with pytest.raises(Killed):
        run_arm(synthetic, chapter, arm, out_dir=tmp_path, on_step=kill_at(5))      # after the step-3 checkpoint
    model_b, resumed = run_arm(synthetic, chapter, arm, out_dir=tmp_path)
    timeless = lambda history: [{k: v for k, v in row.items() if k != "elapsed_s"} for row in history]
    assert timeless(resumed["history"]) == timeless(full["history"])
    assert resumed["metrics"] == full["metrics"]
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


def _bad_value(field):
    """A value that the knob must refuse, or None."""
    if field.metadata["choices"]:
        return "not-a-choice"
    rule = field.metadata["rule"]
    if rule.startswith((">", "in")):
        return "-1e9"
    return None


OWN_KNOBS = [(name, f"{cls.prefix}.{f.name}" if cls.prefix else f.name, f)
             for name, mod in CHAPTERS.items() for cls in mod.SECTIONS for f in dataclasses.fields(cls)]
OWN_KNOBS = [(c, k, f) for c, k, f in OWN_KNOBS if _bad_value(f) is not None]


@pytest.mark.parametrize("chapter, key, field", OWN_KNOBS, ids=[f"{c}-{k}" for c, k, _ in OWN_KNOBS])
def test_a_bad_value_of_a_chapters_own_knob_fails_in_one_line_naming_the_valid_values(chapter, key, field):
    with pytest.raises(ConfigError) as err:
        chapter_config(chapter, "smoke", {key: _bad_value(field)})
    message = str(err.value)
    assert "\n" not in message and message.startswith(key)
    expected = field.metadata["choices"][0] if field.metadata["choices"] else field.metadata["rule"]
    assert str(expected) in message


def test_every_method_chapter_declares_its_knobs(synthetic):
    assert {name for name, _, _ in OWN_KNOBS} >= {"instance_lr", "online_loss", "meta_hf", "grad_instructor",
                                                  "local_losses", "compare"}


CONTRACT_ARM_FIELDS = {"test_acc", "val_acc", "seconds_per_step", "step_cost_ratio", "steps", "epochs",
                       "train_seconds", "one_off_seconds", "peak_memory_bytes", "peak_memory_kind", "history"}


@pytest.mark.parametrize("chapter", [c for c in WITH_ARMS if c != "baseline"])
def test_a_chapter_record_holds_the_contract_fields(synthetic, chapter):
    rec = run_chapter(chapter, "smoke", seeds=[0], overrides={**TINY, "epochs": 0.25}, progress=False,
                      dataset=synthetic)
    assert rec["chapter"] == chapter and rec["seeds"] == [0] and rec["dataset"]["fingerprint"]
    assert rec["method"] in rec["arms"] and rec["reference_arm"] in rec["arms"]
    for name, arm in rec["arms"].items():
        assert CONTRACT_ARM_FIELDS <= set(arm), (name, CONTRACT_ARM_FIELDS - set(arm))
        assert arm["peak_memory_bytes"] > 0 and "tensor" in arm["peak_memory_kind"]
        assert arm["steps"] == 2 or name == "baseline_same_time"
    assert rec["cost"]["timer"] == "perf_counter"
    assert {"git_commit", "date", "device", "torch"} <= set(rec["provenance"])


@pytest.mark.parametrize("chapter, arm", ALL_ARMS, ids=[f"{c}-{a}" for c, a in ALL_ARMS])
def test_an_arm_computes_in_bf16_exactly_when_it_says_it_autocasts(synthetic, chapter, arm):
    """amp=bf16 on the CPU: the network's layers compute in bf16 in a step of every arm whose
    uses_amp() says so (what the planner prices at the mixed-precision rate), and in fp32 in every
    other. An autocast step's update points where the fp32 step's does (cosine > 0.98 on the same
    weights and batch; measured 0.986 for Adam's first step, above 0.993 for every SGD arm); any
    other arm's update is bitwise the fp32 one."""
    from metabook.train import fresh_method, probe_step

    spec = CHAPTERS[chapter].ARMS[arm]
    updates = {}
    for amp in ("bf16", "off"):
        cfg = {**chapter_config(chapter, "smoke", {**TINY, "amp": amp}), **spec.changes}
        data = prepare_data(cfg, 0, torch.device("cpu"), synthetic)
        method = fresh_method(spec, cfg, data, 0)
        before = [p.detach().clone() for p in method.model.parameters()]
        dtypes = set()
        hooks = [m.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
                 for m in method.model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        probe_step(method, 0, cfg)
        for h in hooks:
            h.remove()
        updates[amp] = torch.cat([(p.detach() - b).flatten() for p, b in zip(method.model.parameters(), before)])
        if amp == "bf16":
            assert (torch.bfloat16 in dtypes) == method.uses_amp(), dtypes
            autocasts = method.uses_amp()
        else:
            assert dtypes == {torch.float32} and not method.uses_amp()
    if autocasts:
        assert updates["off"].norm() > 0
        assert F.cosine_similarity(updates["bf16"], updates["off"], 0) > 0.98     # rounding, not another update
    else:
        assert torch.equal(updates["bf16"], updates["off"])


def _autocasts(chapter, arm):
    spec = CHAPTERS[chapter].ARMS[arm]
    return spec.factory({**chapter_config(chapter, "smoke", {**TINY, "amp": "bf16"}), **spec.changes}).uses_amp()


AMP_ARMS = [(c, a) for c, a in ALL_ARMS if _autocasts(c, a)]


@pytest.mark.parametrize("chapter, arm", AMP_ARMS, ids=[f"{c}-{a}" for c, a in AMP_ARMS])
def test_an_autocasting_arm_checkpoints_its_grad_scaler(synthetic, chapter, arm):
    """fp16 on a GPU keeps a loss scale that grows and shrinks along the run: an arm that autocasts
    saves it with its checkpoint and a resumed run starts from it (not from the initial scale)."""
    from metabook.train import fresh_method, probe_step

    spec = CHAPTERS[chapter].ARMS[arm]
    cfg = {**chapter_config(chapter, "smoke", {**TINY, "amp": "bf16"}), **spec.changes}
    data = prepare_data(cfg, 0, torch.device("cpu"), synthetic)
    saved, resumed = fresh_method(spec, cfg, data, 0), fresh_method(spec, cfg, data, 0)
    for m in (saved, resumed):            # the scale doubles after every step with finite gradients
        m.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    for i in range(2):
        probe_step(saved, i, cfg)
    assert saved.scaler.get_scale() == 2.0 ** 12
    resumed.load_state_dict(saved.state_dict())
    probe_step(resumed, 2, cfg)
    assert resumed.scaler.get_scale() == 2.0 ** 13
