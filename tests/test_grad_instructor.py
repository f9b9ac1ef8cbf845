"""Grad-Instructor: the weight rendering (shapes, exactness, finite differences), the ENN term in
the target's update, TD(lambda) returns, a behavioural test of the ENN's ranking, Grad-CAM, the
per-seed ENN of prepare() and its cache, resume, config errors, and the chapter's record."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from helpers import Killed, kill_at
from metabook import ConfigError, chapter_config
from metabook.config import section
from metabook.data import Batch, make_synthetic
from metabook.methods import enn as en
from metabook.methods import grad_instructor as gi
from metabook.models import MLP
from metabook.results import RESULTS_DIR
from metabook.train import Context, RunError, make_model, prepare_data, seed_everything, train

TINY = {"dataset": "synthetic", "train_size": 320, "meta_size": 100, "batch_size": 32, "width": 8,
        "test_size": 100, "epochs": 2.0, "gi.weight": 1.0, "gi.episodes": 6, "gi.rounds": 2,
        "gi.episode_steps": 4, "gi.snapshot_every": 2, "gi.enn_iters": 10, "gi.eval_size": 50}


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(600, 200, seed=0)


def tiny_mlp_and_enn():
    """MLP 12 -> 6 -> 6 -> 3 and an ENN for its 3 weight images, float64, fixed weights."""
    torch.manual_seed(0)
    mlp = MLP(num_classes=3, width=6, depth=2, in_dim=12).double()
    enn = en.ENN(layers=3, channels=4).double()
    return mlp, enn


def test_rendering_has_the_default_015_resolution_and_one_mean_and_one_rms_image_per_matrix():
    assert en.image_size(64, 0.15) == 10 and en.image_size(64, 0.5) == 32 and en.image_size(4, 0.1) == 1
    mlp = MLP(10, width=256, depth=2)
    x = en.render_weights(en.weight_matrices(mlp))                 # canvas 64, resolution 0.15
    assert x.shape == (6, 10, 10)                                   # 3 matrices x (mean, rms)
    assert (x[1::2] > 0).all()                                      # rms images
    # the scaling makes a random init O(1) whatever the layer's size (default init: rms sqrt(1/3))
    assert torch.allclose(x[1::2].mean(dim=(1, 2)), torch.full((3,), 3 ** -0.5), rtol=0.05)
    assert x[0::2].std() < 1.5


def test_rendering_equals_resize_then_downsample_by_adaptive_average_pooling():
    torch.manual_seed(1)
    for shape in [(256, 3072), (10, 256), (7, 5)]:
        w = torch.randn(shape, dtype=torch.float64)
        down = lambda a: F.adaptive_avg_pool2d(F.adaptive_avg_pool2d(a[None, None], (64, 64)), (10, 10))[0, 0]
        mean_img, rms_img = en.render_weights([w])
        per_pixel = max(shape[0] * shape[1] / 100, 1.0)
        assert torch.allclose(mean_img, down(w) * math.sqrt(shape[1] * per_pixel), atol=1e-12)
        assert torch.allclose(rms_img, torch.sqrt(down(w * w) + 1e-12) * math.sqrt(shape[1]), atol=1e-12)


def test_enn_gradient_through_the_rendering_matches_finite_differences_in_float64():
    mlp, enn = tiny_mlp_and_enn()
    weights = en.weight_matrices(mlp)

    def value():
        return enn(en.render_weights(weights, canvas=8, resolution=0.5)[None])[0]

    grads = torch.autograd.grad(value(), weights)
    theta = parameters_to_vector(weights).detach()
    fd = torch.zeros_like(theta)
    with torch.no_grad():
        for i in range(len(theta)):
            for sign in (1, -1):
                shifted = theta.clone()
                shifted[i] += sign * 1e-6
                vector_to_parameters(shifted, weights)
                fd[i] += sign * value().item() / 2e-6
        vector_to_parameters(theta, weights)
    g = torch.cat([t.flatten() for t in grads])
    assert fd.abs().max() > 1e-4                                    # the check is not vacuous
    assert torch.allclose(g, fd, rtol=1e-6, atol=1e-6 * fd.abs().max().item())
    assert all(t.abs().sum() > 0 for t in grads)                    # every matrix gets a gradient


def step_cfg(weight=0.5, schedule="constant"):
    return {**chapter_config("grad_instructor", "smoke", {"gi.weight": weight, "gi.schedule": schedule,
                                                          "momentum": 0.0, "gi.canvas": 8, "gi.resolution": 0.5}),
            "epochs": 1.0}


def test_the_enn_term_reaches_the_mlp_weights_in_the_update():
    """One SGD step (no momentum): the Grad-Instructor update minus the plain update must be
    exactly lr * w * grad_W E(render(W)) on the weight matrices, and zero on the biases."""
    cfg, lr = step_cfg(weight=0.5), 0.1
    c = section(cfg, gi.GI)
    mlp, enn = tiny_mlp_and_enn()
    g = torch.Generator().manual_seed(2)
    batch = Batch(torch.randn(8, 12, generator=g, dtype=torch.float64), torch.randint(3, (8,), generator=g),
                  torch.arange(8))
    names = [n for n, _ in mlp.named_parameters() if n.endswith("weight")]
    g_enn = dict(zip(names, torch.autograd.grad(enn(en.render_model(mlp, c)[None])[0], en.weight_matrices(mlp))))
    plain, guided = [MLP(3, 6, 2, 12).double() for _ in range(2)]
    for m in (plain, guided):
        m.load_state_dict(mlp.state_dict())
    base = gi.PlainBP(cfg)
    base.setup(Context(plain, None, total_steps=10, steps_per_epoch=10, num_classes=3, num_train=8))
    base.step(batch, None, lr)
    method = gi.GradInstructor(cfg, enn)
    method.setup(Context(guided, None, total_steps=10, steps_per_epoch=10, num_classes=3, num_train=8))
    metrics = method.step(batch, None, lr)
    for (name, p), q in zip(guided.named_parameters(), plain.parameters()):
        expected = lr * 0.5 * g_enn[name] if name in g_enn else torch.zeros_like(p)
        assert torch.allclose(p - q, expected, rtol=1e-10, atol=1e-15), name
    assert all(g.abs().sum() > 0 for g in g_enn.values())
    assert metrics["gi_weight"] == 0.5 and not metrics["enn_value"].requires_grad
    assert metrics["enn_value"].item() == enn(en.render_model(mlp, c)[None])[0].item()   # at the weights before


def test_gi_arms_choose_the_arms_and_require_the_baseline_and_the_method():
    cfg = chapter_config("grad_instructor", "smoke", {"gi.arms": "baseline,grad_instructor"})
    exp, = gi.experiments(cfg)
    assert list(exp.arms) == ["baseline", "grad_instructor"] and exp.same_time_for == "grad_instructor"
    assert list(gi.experiments(chapter_config("grad_instructor", "smoke"))[0].arms) == list(gi.ARMS)
    with pytest.raises(ConfigError, match="baseline and grad_instructor are required"):
        gi.experiments(chapter_config("grad_instructor", "smoke", {"gi.arms": "baseline,l1"}))


def test_weight_schedules():
    assert gi.weight_schedule("constant", 0.7) == 1.0
    assert gi.weight_schedule("linear_decay", 0.25) == 0.75
    assert gi.weight_schedule("cosine_decay", 0.5) == pytest.approx(0.5)
    assert gi.weight_schedule("cosine_decay", 1.0) == pytest.approx(0.0)


def run_arm(synthetic, factory, overrides=None, out_dir=None, on_step=None, seed=0):
    """train() of one arm on TINY; with out_dir, the run's folder is out_dir/runs/arm-seedS and
    its cache (prepare()'s ENN) out_dir/cache, as in run_arms."""
    cfg = chapter_config("grad_instructor", "smoke", {**TINY, **(overrides or {})})
    data = prepare_data(cfg, seed, torch.device("cpu"), synthetic)
    seed_everything(seed)
    model = make_model(cfg, synthetic.num_classes, torch.device("cpu"))
    method = factory(cfg)
    res = train(method, model, data, cfg, seed=seed, progress=False, on_step=on_step,
                out_dir=out_dir / "runs" / f"arm-seed{seed}" if out_dir else None,
                cache_dir=out_dir / "cache" if out_dir else None)
    res["extras"] = method.extras(data.streams())
    return model, res


def fixed_enn(layers=3):
    torch.manual_seed(5)
    return en.ENN(layers, channels=2)


def test_with_weight_zero_the_grad_instructor_arm_is_plain_backprop_bitwise(synthetic):
    """Also with its ENN trained in prepare(): that stage draws from its own streams and RNG."""
    model_a, res_a = run_arm(synthetic, gi.PlainBP)
    model_b, res_b = run_arm(synthetic, gi.GradInstructor, {"gi.weight": 0.0})
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert res_a["metrics"] == res_b["metrics"]
    assert res_b["extras"]["enn"]["fit_episodes"] > 0 and res_b["cost"]["one_off_seconds"] > 0
    assert all(row["enn_grad_ratio"] == 0 for row in res_b["history"])
    model_c, res_c = run_arm(synthetic, lambda c: gi.GradInstructor(c, fixed_enn()), {"gi.weight": 1.0})
    assert not torch.equal(model_a.hidden[0].weight, model_c.hidden[0].weight)   # and with w > 0 it is not
    assert all(row["enn_grad_ratio"] > 0 for row in res_c["history"])
    assert res_c["cost"]["one_off_seconds"] < res_b["cost"]["one_off_seconds"]    # a given ENN is not trained


def cache_files(tmp_path, seed):
    return sorted((tmp_path / "cache").glob(f"enn-seed{seed}-*.pt"))


def test_each_seed_trains_its_own_enn_and_a_second_run_loads_it_from_the_cache(synthetic, tmp_path):
    _, first = run_arm(synthetic, gi.GradInstructor, out_dir=tmp_path)
    [path] = cache_files(tmp_path, 0)
    assert "loaded_from" not in first["extras"]["enn"]
    _, again = run_arm(synthetic, gi.GradInstructor, out_dir=tmp_path)
    assert again["extras"]["enn"]["loaded_from"] == str(path)
    assert again["metrics"] == first["metrics"] and again["extras"]["enn_value_initial"] == first["extras"]["enn_value_initial"]
    _, seed1 = run_arm(synthetic, gi.GradInstructor, out_dir=tmp_path, seed=1)      # another split, another ENN
    assert len(cache_files(tmp_path, 1)) == 1 and "loaded_from" not in seed1["extras"]["enn"]
    assert seed1["extras"]["enn"]["final_accs"] != first["extras"]["enn"]["final_accs"]
    assert seed1["extras"]["enn"]["split"] != first["extras"]["enn"]["split"]       # the key names the split
    _, same = run_arm(synthetic, gi.GradInstructor, {"gi.schedule": "linear_decay"}, out_dir=tmp_path)  # an arm knob
    assert "loaded_from" in same["extras"]["enn"]
    _, other = run_arm(synthetic, gi.GradInstructor, {"gi.enn_iters": 11}, out_dir=tmp_path)  # another ENN config
    assert "loaded_from" not in other["extras"]["enn"] and len(cache_files(tmp_path, 0)) == 2   # side by side
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match=f"{path}.*delete it"):
        run_arm(synthetic, gi.GradInstructor, out_dir=tmp_path)


def test_the_recorded_enn_file_still_loads():
    """metabook/records/grad_instructor-cpu/enn.pt (written before the per-seed cache) is what chapter
    6's Grad-CAM figure uses."""
    path = RESULTS_DIR / "grad_instructor-cpu" / "enn.pt"
    if not path.exists():
        pytest.skip("no recorded cpu run")
    enn, saved = en.load_enn(path)
    key = en.enn_config_key(chapter_config("grad_instructor", "cpu"))
    assert enn.layers == 3 and enn.channels == 8 and "seed" not in saved
    assert set(saved["key"]) < set(key)       # the old key had fewer keys; the notebook compares those,
    assert all(key[k] == v for k, v in saved["key"].items())    # and at `cpu` they match: the figure uses it
    assert 0 < enn(torch.zeros(1, 6, 10, 10)).item() < 1


def test_the_critics_episodes_start_from_the_baseline_arms_weights_at_the_stated_steps(synthetic):
    """gi.starts=trajectory: the saved states are the `baseline` arm's own weights (same seed, initial
    weights, batches and schedule) at round(k T / gi.start_points); every episode's first state is
    the rendering of one of them (or, with start -1, a fresh He init)."""
    from metabook.train import Arm, fresh_method, lr_at, probe_step
    cfg = chapter_config("grad_instructor", "smoke", {**TINY, "gi.start_points": 3, "gi.init_share": 0.3,
                                                       "gi.episodes": 12})
    c, seed = section(cfg, gi.GI), 1
    data = prepare_data(cfg, seed, torch.device("cpu"), synthetic)
    base = fresh_method(Arm(gi.PlainBP), cfg, data, seed)
    total, streams = base.ctx.total_steps, data.streams()
    reward = en.reward_examples(c, streams)
    init = {k: v.clone() for k, v in base.model.state_dict().items()}
    traj = en.replay_trajectory(cfg, streams, 10, total, 3, reward.x, reward.y, init, seed)
    assert traj.steps == [0, round(total / 3), round(2 * total / 3)] and traj.total == total == 20
    for i in range(traj.steps[-1] + 1):
        if i in traj.steps:
            saved = traj.states[traj.steps.index(i)]
            assert all(torch.equal(saved[k], v) for k, v in base.model.state_dict().items()), f"step {i}"
        probe_step(base, i, cfg)
    assert not torch.equal(traj.states[0]["hidden.0.weight"], traj.states[1]["hidden.0.weight"])
    eps = en.collect_episodes(c, cfg["width"], cfg["depth"], streams, reward.x, reward.y, 10, 12, seed,
                              trajectory=traj)
    starts = eps.actions[:, 3].long().tolist()
    assert set(starts) <= {-1, *traj.steps} and -1 in starts and len(set(starts) - {-1}) >= 2
    for state, start in zip(eps.states[:, 0], starts):
        if start >= 0:
            mlp = MLP(num_classes=10, width=cfg["width"], depth=cfg["depth"])
            mlp.load_state_dict(traj.states[traj.steps.index(start)])
            assert torch.equal(state, en.render_model(mlp, c))
        else:                                       # a fresh He init: the rms images sit near sqrt(2) * gain
            assert not any(torch.equal(state, en.render_weights([s[k] for k in s if k.endswith("weight")],
                                                                c.canvas, c.resolution)) for s in traj.states)
    with pytest.raises(ConfigError, match="gi.starts=init"):
        en.train_enn(c, streams, 10, seed, width=cfg["width"], depth=cfg["depth"])
    # later rounds replay the run guided by the current ENN: at gi.weight 0 it is the baseline's run bit for
    # bit, at gi.weight > 0 it leaves it, and it records the guiding ENN's prediction at every saved state
    enn = fixed_enn()
    same = en.replay_trajectory({**cfg, "gi.weight": 0.0}, streams, 10, total, 3, reward.x, reward.y, init, seed, enn=enn)
    assert same.kind == "guided" and all(torch.equal(a[k], b[k]) for a, b in zip(same.states, traj.states) for k in a)
    guided = en.replay_trajectory({**cfg, "gi.weight": 5.0}, streams, 10, total, 3, reward.x, reward.y, init, seed, enn=enn)
    assert not torch.equal(guided.states[-1]["hidden.0.weight"], traj.states[-1]["hidden.0.weight"])
    start = MLP(num_classes=10, width=cfg["width"], depth=cfg["depth"])
    start.load_state_dict(init)
    with torch.no_grad():
        assert len(guided.preds) == 3 and guided.preds[0] == pytest.approx(enn(en.render_model(start, c)[None]).item())


def test_lambda_returns_of_a_hand_made_episode():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    v_next = torch.tensor([[4.0, 4.0, 99.0]])           # V(s_1), V(s_2), (V(s_3) ignored: terminal)
    term = torch.tensor([10.0])
    # lambda = 1 (Monte-Carlo), gamma = 0.5: G3 = 10, G2 = 3 + 5 = 8, G1 = 2 + 4 = 6, G0 = 1 + 3 = 4
    assert en.lambda_returns(r, v_next, term, 0.5, 1.0).tolist() == [[4.0, 6.0, 8.0, 10.0]]
    # lambda = 0 (TD(0)): G2 = 3 + 0.5 * 10 (terminal known), G1 = 2 + 0.5 * 4, G0 = 1 + 0.5 * 4
    assert en.lambda_returns(r, v_next, term, 0.5, 0.0).tolist() == [[3.0, 4.0, 8.0, 10.0]]
    # lambda = 0.5: G1 = 2 + 0.5 * (0.5 * 4 + 0.5 * 8) = 5, G0 = 1 + 0.5 * (0.5 * 4 + 0.5 * 5) = 3.25
    assert en.lambda_returns(r, v_next, term, 0.5, 0.5).tolist() == [[3.25, 5.0, 8.0, 10.0]]
    # accuracies as rewards: gamma = 1 -> every state's return is the final accuracy,
    # gamma = 0 -> the next snapshot's accuracy
    accs = torch.tensor([[0.1, 0.2, 0.4, 0.3]])
    rew, final = en.episode_rewards(accs, 1.0)
    assert en.lambda_returns(rew, torch.zeros(1, 3), final, 1.0, 1.0)[0].tolist() == pytest.approx([0.3] * 4)
    rew, final = en.episode_rewards(accs, 0.0)
    assert en.lambda_returns(rew, torch.zeros(1, 3), final, 0.0, 0.7)[0].tolist() == pytest.approx([0.2, 0.4, 0.3, 0.3])


def toy_episodes(n, seed, k=4):
    """A family where the final accuracy is a known, peaked function of the weights' scale c:
    acc_final = 0.1 + 0.8 exp(-(log c)^2) (best at c = 1, i.e. He scale); the states are fresh
    random weights of scale c at every snapshot; the accuracy climbs linearly to acc_final."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 48), (16, 16), (3, 16)]
    c = torch.exp((torch.rand(n, generator=g) * 2 - 1) * 1.5)
    final = 0.1 + 0.8 * torch.exp(-c.log() ** 2)
    states = torch.stack([torch.stack([
        en.render_weights([c[e] * torch.randn(s, generator=g) * math.sqrt(2 / s[1]) for s in shapes],
                          canvas=8, resolution=0.5) for _ in range(k + 1)]) for e in range(n)])
    accs = 0.1 + (final[:, None] - 0.1) * torch.linspace(0, 1, k + 1)
    return states, accs


def test_the_td_lambda_trained_enn_ranks_held_out_episodes_by_their_final_accuracy():
    """Behaviour: on the toy family the ENN (TD(lambda), gamma = 1) must rank 24 held-out episodes
    by their final accuracy from the *initial* weights alone, Spearman > 0.8 (measured 0.95-0.98)."""
    torch.manual_seed(0)
    states, accs = toy_episodes(48, seed=0)
    enn = en.ENN(layers=3, channels=4)
    trace = en.fit_enn(enn, states, accs, objective="rl", gamma=1.0, lam=0.8, iters=300, lr=1e-2, batch=64)
    assert trace[-1] < trace[0]
    held_states, held_accs = toy_episodes(24, seed=1)
    quality = en.enn_quality(enn, en.Episodes(held_states, held_accs, torch.zeros(24, 3), torch.zeros(24)))
    assert quality["spearman_initial"] > 0.8, quality


def test_spearman_of_known_cases():
    assert en.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert en.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert en.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert math.isnan(en.spearman([1, 1, 1], [1, 2, 3]))


def test_saliency_gives_one_map_per_weight_image():
    mlp, enn = tiny_mlp_and_enn()
    x = torch.stack([en.render_weights(en.weight_matrices(mlp), canvas=8, resolution=0.5)] * 2)   # (2, 6, 4, 4)
    cam = en.saliency(enn, x, "grad_cam")
    gxi = en.saliency(enn, x, "grad_x_input")
    assert cam.shape == gxi.shape == (2, 3, 4, 4)
    assert (cam >= 0).all() and gxi.abs().sum() > 0
    assert en.saliency_to_matrix(cam[0, 0], (6, 12)).shape == (6, 12)
    with pytest.raises(ValueError, match="grad_cam, grad_x_input"):
        en.saliency(enn, x, "lime")


def test_saliency_of_a_frozen_enn_equals_that_of_a_trainable_one():
    """train_enn returns the ENN frozen (requires_grad off); Grad-CAM must still work, also under no_grad."""
    mlp, enn = tiny_mlp_and_enn()
    x = torch.stack([en.render_weights(en.weight_matrices(mlp), canvas=8, resolution=0.5)] * 2)
    expected = {k: en.saliency(enn, x, k) for k in ("grad_cam", "grad_x_input")}
    enn.requires_grad_(False)
    with torch.no_grad():
        for kind, want in expected.items():
            assert torch.allclose(en.saliency(enn, x, kind), want), kind


def test_he_init_arm_starts_from_kaiming_normal_weights():
    torch.manual_seed(0)
    mlp = MLP(10, width=256, depth=2)
    en.he_init_(mlp)
    for w in en.weight_matrices(mlp):
        assert w.std().item() == pytest.approx(math.sqrt(2 / w.shape[1]), rel=0.1)
    assert all((layer.bias == 0).all() for layer in mlp.hidden)


def test_killed_grad_instructor_run_resumes_bitwise(synthetic, tmp_path):
    """Killed after prepare(): the resumed run takes the ENN from the checkpoint, not the cache."""
    overrides = {"checkpoint_every": 4}
    model_a, full = run_arm(synthetic, gi.GradInstructor, overrides)

    with pytest.raises(Killed):
        run_arm(synthetic, gi.GradInstructor, overrides, out_dir=tmp_path, on_step=kill_at(11))
    [cached] = cache_files(tmp_path, 0)
    cached.unlink()
    steps_run = []
    model_b, resumed = run_arm(synthetic, gi.GradInstructor, overrides, out_dir=tmp_path,
                               on_step=lambda step, m: steps_run.append(step))
    assert steps_run[0] == 9
    drop_time = lambda history: [{k: v for k, v in row.items() if k != "elapsed_s"} for row in history]
    assert resumed["metrics"] == full["metrics"] and drop_time(resumed["history"]) == drop_time(full["history"])
    untimed = lambda info: {**info, "seconds": 0, "starts": {**info["starts"], "seconds": 0, "rounds": [
        {**r, "seconds": 0} for r in info["starts"]["rounds"]]}}
    assert untimed(resumed["extras"]["enn"]) == untimed(full["extras"]["enn"])
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert not cache_files(tmp_path, 0)


@pytest.mark.parametrize("key, value, match", [
    ("gi.schedule", "step", "constant, linear_decay, cosine_decay"),
    ("gi.enn_objective", "ppo", "rl, regression"),
    ("gi.resolution", 0.0, r"in \(0, 1\]"),
    ("gi.gamma", 1.5, r"in \[0, 1\]"),
    ("gi.weight", -1.0, ">= 0"),
    ("gi.episodes", 2, ">= 3"),
    ("gi.holdout", 1.0, r"in \(0, 1\)"),
    ("gi.enn_seed", -1, ">= 0"),
    ("gi.starts", "replay", "trajectory, init"),
    ("gi.start_points", 0, ">= 1"),
    ("gi.init_share", 1.5, r"in \[0, 1\]"),
    ("gi.refit_every", -1, ">= 0"),
    ("gi.refit_episodes", 1, ">= 2"),
    ("gi.same_time", "maybe", "true/false"),
    ("gi.bogus", 1, "valid keys"),
])
def test_bad_config_values_name_the_valid_choices(key, value, match):
    with pytest.raises(ConfigError, match=match) as err:
        chapter_config("grad_instructor", "smoke", {key: value})
    assert "\n" not in str(err.value)


def test_every_gi_key_is_declared_once_with_a_meaning_and_the_chapter_sets_only_shared_keys():
    from metabook.config import describe
    rows = {r["key"]: r for r in describe(gi.SECTIONS, chapter_config("grad_instructor", "cpu"))}
    assert all(r["meaning"] for r in rows.values())
    assert {k for k in rows if k.startswith("gi.")} == {f"gi.{f.name}" for f in dataclasses.fields(gi.GI)}
    assert not any(k.startswith("gi.") for k in gi.DEFAULTS)


def test_chapter_run_records_all_arms_the_cost_ratio_and_one_enn_per_seed(synthetic, tmp_path):
    from metabook import run_chapter
    rec = run_chapter("grad_instructor", "smoke", seeds=[0, 1], out_dir=tmp_path, overrides=TINY, progress=False,
                      dataset=synthetic)
    assert set(rec["arms"]) == {"baseline", "l1", "he_init", "grad_instructor", "gi_init_critic", "baseline_same_time"}
    arm = rec["arms"]["grad_instructor"]
    assert rec["cost"]["enn_seconds"] == arm["one_off_seconds"]["mean"] == rec["metrics"]["enn_seconds"]
    assert rec["arms"]["baseline"]["one_off_seconds"]["mean"] < 0.1 * arm["one_off_seconds"]["mean"]  # no ENN
    assert set(rec["enn"]) == {"0", "1"} and rec["enn"]["0"]["final_accs"] != rec["enn"]["1"]["final_accs"]
    for seed, enn in rec["enn"].items():
        total = arm["steps"]                                     # the baseline trajectory: one full-length run
        assert enn["starts"]["total"] == total and enn["starts"]["steps"] == en.trajectory_steps(total, 8)
        assert enn["episodes"] == 6 and enn["rounds"] == 2 and enn["sgd_steps"] == 6 * 4 + 2 * enn["starts"]["steps"][-1]
        assert [r["kind"] for r in enn["starts"]["rounds"]] == ["baseline", "guided"]
        assert enn["starts"]["rounds"][0]["preds"] is None and len(enn["starts"]["rounds"][1]["preds"]) == 8
        assert enn["reward"] == {"split": "meta", "images": 50}
        control = rec["enn_by_arm"]["gi_init_critic"][seed]
        assert control["starts"] == {"kind": "init"} and set(control["start_steps"]) == {-1}
        assert control["sgd_steps"] == 6 * 4 and control["split"] == enn["split"]
        assert len(enn["final_accs"]) == len(enn["actions"]) == 6 - enn["diverged"]
        extras = arm["extras"][seed]
        assert extras["enn_seconds"] == enn["seconds"] and "enn" not in extras
        assert len(cache_files(tmp_path, seed)) == 2             # grad_instructor's and the control's ENN
        for name in gi.GI_ARMS:
            cal = rec["calibration"][name][seed]
            assert cal["evaluations"] == len(rec["arms"][name]["history"][seed])
    assert rec["metrics"]["enn_spearman_all"] == pytest.approx(
        (rec["enn"]["0"]["spearman_all"] + rec["enn"]["1"]["spearman_all"]) / 2, nan_ok=True)
    assert all(len(arm["gap"]["per_seed"]) == 2 for arm in rec["arms"].values())
    assert all("enn_grad_ratio" in row for row in arm["history"]["0"])
    assert (tmp_path / "result.json").exists()
    with pytest.raises(ConfigError, match="2 \\* gi.rounds"):
        run_chapter("grad_instructor", "smoke", overrides={**TINY, "gi.episodes": 3}, progress=False,
                    dataset=synthetic)


def test_the_critics_reward_images_are_meta_split_images_never_validation_heldout_or_test(synthetic):
    """Issue 18: the reward was val[:500], the split readers tune on. It is the meta split's first
    gi.eval_size images now, and the meta split shares no image with the validation split."""
    from metabook.data import split_train_meta
    cfg = chapter_config("grad_instructor", "smoke", TINY)
    c, seed = section(cfg, gi.GI), 1
    data = prepare_data(cfg, seed, torch.device("cpu"), synthetic)
    reward = en.reward_examples(c, data.streams())
    _, meta_idx, val_idx = split_train_meta(synthetic.y_train, cfg["meta_size"], cfg["train_size"], seed,
                                            cfg["val_size"] or cfg["meta_size"])
    assert len(reward.y) == c.eval_size == 50 and len(val_idx) == cfg["meta_size"] == 100
    assert not set(meta_idx.tolist()) & set(val_idx.tolist())
    as_rows = lambda x: {bytes(r) for r in x.reshape(len(x), -1).numpy()}
    raw = data.meta.x[:c.eval_size].permute(0, 2, 3, 1)                       # stored (N, 3, 32, 32) -> (N, 32, 32, 3)
    assert torch.equal(reward.x, data.meta.normalise(data.meta.x[:c.eval_size]))
    assert as_rows(raw) <= as_rows(synthetic.x_train[meta_idx])
    for other in (synthetic.x_train[val_idx], synthetic.x_heldout, synthetic.x_test):
        assert not as_rows(raw) & as_rows(other)


def test_an_ascent_step_moves_each_state_by_its_share_of_its_norm_and_raises_the_critic():
    torch.manual_seed(0)
    states, _ = toy_episodes(6, seed=2)
    x = states.flatten(0, 1)
    enn = en.ENN(layers=3, channels=4)
    moved = en.ascent_step(enn, x, 0.01)
    dist = (moved - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    assert torch.allclose(dist, torch.full_like(dist, 0.01), rtol=1e-4)
    with torch.no_grad():
        assert (enn(moved) > enn(x)).all()              # a small step up the gradient raises the prediction


def test_a_conservative_fit_gives_less_credit_off_the_data_and_still_ranks_episodes():
    """gi.conservative: fitted with alpha > 0, the ENN's rise one step up its own gradient (the
    states a target climbing it reaches next) is smaller than the plain fit's on the same data and
    seed, while it still ranks held-out episodes by their final accuracy."""
    states, accs = toy_episodes(48, seed=0)
    held_states, held_accs = toy_episodes(24, seed=1)
    x = held_states.flatten(0, 1)
    rise, rank = {}, {}
    for alpha in (0.0, 0.1):
        torch.manual_seed(0)
        enn = en.ENN(layers=3, channels=4)
        en.fit_enn(enn, states, accs, objective="rl", gamma=1.0, lam=0.8, iters=300, lr=1e-2, batch=64,
                   conservative=alpha, conservative_step=0.2)
        with torch.no_grad():
            rise[alpha] = (enn(en.ascent_step(enn, x, 0.2)) - enn(x)).mean().item()
        rank[alpha] = en.enn_quality(enn, en.Episodes(held_states, held_accs, torch.zeros(24, 3), torch.zeros(24)))
    assert rise[0.1] < 0.6 * rise[0.0], rise                  # measured 0.068 against 0.153
    assert rank[0.1]["spearman_initial"] > 0.9, rank[0.1]     # measured 0.95 (plain: 0.98)


def overrated_enn(layers=3):
    """An ENN that predicts about 0.98 everywhere: the exploited critic of chapter 6 in caricature."""
    enn = fixed_enn(layers)
    with torch.no_grad():
        enn.head.weight.zero_()
        enn.head.bias.fill_(4.0)
    return enn


def test_an_online_refit_brings_the_critic_near_the_real_accuracy_where_the_target_is(synthetic):
    """gi.refit_every: every that many steps the critic is refitted on episodes from the current
    weights; an over-rating critic comes down to within a few points of the reward accuracy there."""
    refit = {"gi.refit_every": 6, "gi.refit_episodes": 4, "gi.refit_iters": 60, "gi.enn_lr": 0.05}
    _, res = run_arm(synthetic, lambda c: gi.GradInstructor(c, overrated_enn()), refit)
    logs = res["extras"]["enn_refits"]
    assert [r["step"] for r in logs] == [6, 12, 18]              # 20 steps: never at step 0
    first = logs[0]
    assert first["pred_before"] > 0.95 and 0.2 < first["real"] < 0.9
    assert abs(first["pred_after"] - first["real"]) < 0.3 * abs(first["pred_before"] - first["real"])
    _, frozen = run_arm(synthetic, lambda c: gi.GradInstructor(c, overrated_enn()))
    assert "enn_refits" not in frozen["extras"]
    assert frozen["extras"]["enn_value_final"] > 0.95 > res["extras"]["enn_value_final"]


def test_a_killed_run_with_online_refits_resumes_bitwise(synthetic, tmp_path):
    """Killed between two refits: the resumed run refits at the same steps with the same episodes."""
    overrides = {"checkpoint_every": 4, "gi.refit_every": 6, "gi.refit_episodes": 3, "gi.refit_iters": 5}
    model_a, full = run_arm(synthetic, gi.GradInstructor, overrides)
    with pytest.raises(Killed):
        run_arm(synthetic, gi.GradInstructor, overrides, out_dir=tmp_path, on_step=kill_at(11))
    model_b, resumed = run_arm(synthetic, gi.GradInstructor, overrides, out_dir=tmp_path)
    untimed = lambda logs: [{**r, "seconds": 0} for r in logs]
    assert untimed(resumed["extras"]["enn_refits"]) == untimed(full["extras"]["enn_refits"])
    assert len(full["extras"]["enn_refits"]) == 3 and resumed["metrics"] == full["metrics"]
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_critics_training_is_the_same_with_or_without_online_refits(synthetic):
    """gi.refit_every belongs to the target's run: the guided replays inside train_enn keep their
    critic frozen, so the prepared ENN (and its cache key) do not depend on it."""
    from metabook.train import Arm, fresh_method
    enns = []
    for refit in (0, 3):
        cfg = chapter_config("grad_instructor", "smoke", {**TINY, "gi.refit_every": refit, "gi.refit_iters": 5})
        data = prepare_data(cfg, 0, torch.device("cpu"), synthetic)
        arm = fresh_method(Arm(gi.GradInstructor), cfg, data, 0)
        enn, info = en.train_enn(arm.c, data.streams(), 10, 0, width=cfg["width"], depth=cfg["depth"], target_cfg=cfg,
                                 total_steps=arm.ctx.total_steps, init_state=arm.model.state_dict())
        enns.append(enn.state_dict())
        assert info["starts"]["rounds"][1]["kind"] == "guided" and max(info["starts"]["steps"]) >= 3
    assert all(torch.equal(enns[0][k], enns[1][k]) for k in enns[0])
    assert en.enn_config_key({**cfg, "gi.refit_every": 0}) == en.enn_config_key(cfg)


def test_calibration_of_known_rows():
    """mean |ENN prediction - reward accuracy| over the rows that have both, and over the later half."""
    rows = [{"enn_now": 0.5, "reward_acc": 0.1}, {"step": 3}, {"enn_now": 0.2, "reward_acc": 0.4},
            {"enn_now": 0.3, "reward_acc": 0.2}, {"enn_now": 0.6, "reward_acc": 0.7}]
    cal = gi.calibration(rows)
    assert cal["evaluations"] == 4 and (cal["final_pred"], cal["final_real"]) == (0.6, 0.7)
    assert cal["mae"] == pytest.approx(0.2) and cal["late_mae"] == pytest.approx(0.1)
    assert cal["bias"] == pytest.approx(0.05)
    assert gi.calibration([{"step": 1}]) == {}
