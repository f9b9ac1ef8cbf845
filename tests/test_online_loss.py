"""Online loss-function learning: meta-gradients against finite differences, the shape of the
learned loss, the online/offline wiring, resume, config errors, and the chapter's record."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from helpers import Killed, kill_at, tiny_bn_net, weighted_problem
from metabook import ConfigError, chapter_config
from metabook.data import make_synthetic
from metabook.meta import forward, lookahead_params, model_params
from metabook.methods import online_loss as lfl
from metabook.methods.online_loss import (LossNet, OfflineLoss, OnlineLoss, loss_curve, loss_value,
                                          offline_init, online_meta_step, unrolled_meta_loss)
from metabook.train import make_model, prepare_data, seed_everything, train

TINY = {"dataset": "synthetic", "train_size": 320, "meta_size": 100, "batch_size": 32, "width": 4,
        "test_size": 100, "epochs": 2.0, "lfl.offline_steps": 3, "lfl.hidden": 8}


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(600, 200, seed=0)


def tiny_loss_net(seed=0, activation="smooth_leaky_relu", net="chapter"):
    torch.manual_seed(seed)
    loss_net = LossNet(hidden=4, activation=activation, net=net).double()
    if net == "authors":           # its default init is small (|w| < 1/sqrt(fan_in)): a meta-gradient
        with torch.no_grad():      # far above finite differences' rounding needs larger weights
            for w in loss_net.parameters():
                w.mul_(4)
    return loss_net


NET_VARIANTS = [("smooth_leaky_relu", "chapter"), ("relu", "chapter"), ("smooth_leaky_relu", "authors")]


def finite_difference(fn, loss_net, eps=1e-6):
    """Central differences of fn() in every parameter of loss_net (float64)."""
    phi = parameters_to_vector(loss_net.parameters()).detach()
    out = torch.zeros_like(phi)
    for i in range(len(phi)):
        for sign in (1, -1):
            shifted = phi.clone()
            shifted[i] += sign * eps
            vector_to_parameters(shifted, loss_net.parameters())
            out[i] += sign * fn() / (2 * eps)
    vector_to_parameters(phi, loss_net.parameters())
    return out


def assert_matches(grads, fd, rtol=1e-6):
    g = torch.cat([t.flatten() for t in grads])
    assert fd.abs().max() > 1e-4                                     # the check is not vacuous
    assert torch.allclose(g, fd, rtol=rtol, atol=rtol * fd.abs().max().item())


@pytest.mark.parametrize("activation, net", NET_VARIANTS)
def test_online_meta_gradient_through_the_virtual_step_matches_finite_differences(activation, net):
    model, loss_net, lr = tiny_bn_net(), tiny_loss_net(activation=activation, net=net), 0.5
    x, y, xm, ym = weighted_problem()

    def meta_after_virtual_step():
        params = model_params(model)
        inner = loss_value(loss_net, forward(model, params, x), y)
        grads = torch.autograd.grad(inner, list(params.values()))
        return F.cross_entropy(forward(model, lookahead_params(params, grads, lr), xm), ym).item()

    g_theta, g_phi, info = online_meta_step(model, loss_net, x, y, xm, ym, lr)
    assert_matches(g_phi, finite_difference(meta_after_virtual_step, loss_net))
    assert float(info["meta_loss"]) == pytest.approx(meta_after_virtual_step(), rel=1e-12)
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in info.values())   # no host sync
    # the real step's gradient is the learned loss's gradient at theta
    params = model_params(model)
    expected = torch.autograd.grad(loss_value(loss_net, forward(model, params, x), y), list(params.values()))
    for a, b in zip(g_theta, expected):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14) and not a.requires_grad


@pytest.mark.parametrize("net", ["chapter", "authors"])
def test_offline_unroll_meta_gradient_matches_finite_differences_for_horizon_two(net):
    model, loss_net, lr = tiny_bn_net(), tiny_loss_net(seed=1, net=net), 0.5
    x, y, xm, ym = weighted_problem()
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    params = {k: p.detach().clone().requires_grad_(True) for k, p in model_params(model).items()}

    def meta(horizon=2):
        return unrolled_meta_loss(model, params, loss_net, batches[:horizon], (xm, ym), lr)

    grads = torch.autograd.grad(meta(), list(loss_net.parameters()))
    assert_matches(grads, finite_difference(lambda: meta().item(), loss_net))
    one = torch.autograd.grad(meta(horizon=1), list(loss_net.parameters()))
    assert not torch.allclose(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in one]))


@pytest.mark.parametrize("activation", ["smooth_leaky_relu", "relu"])
def test_learned_loss_is_non_negative_for_any_weights_and_extreme_logits(activation):
    g = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(64, 10, generator=g), 50 * torch.randn(64, 10, generator=g)])
    y = torch.randint(10, (128,), generator=g)
    for seed in range(5):
        loss_net = LossNet(hidden=8, activation=activation)
        torch.manual_seed(seed)
        for p in loss_net.parameters():                              # weights far from the init too
            p.data = 3 * torch.randn_like(p)
        pairs = torch.rand(500, 2)
        assert (loss_net(pairs) >= 0).all()
        assert (loss_value(loss_net, logits, y, reduction="none") >= 0).all()
        assert (loss_curve(loss_net, 10) >= 0).all()


def test_authors_loss_net_is_bias_free_signed_and_cross_entropy_plus_the_class_mean():
    """lfl.net=authors: three bias-free linear layers (2->h->h->1), no output activation (the
    per-class term takes both signs), and per example M = CE + (1/C) sum_c l(p_c, y_c), checked
    against a hand computation; the chapter net differs in each respect, so the checks can fail."""
    torch.manual_seed(0)
    net = LossNet(hidden=8, net="authors").double()
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [(8, 2), (8, 8), (1, 8)]                               # weights only
    assert len(list(LossNet(hidden=8).parameters())) == 6                  # the chapter net has biases
    pairs = torch.rand(2000, 2, dtype=torch.float64)
    pairs[:, 1] = (pairs[:, 1] < 0.5).double()
    lows, highs = [], []
    for seed in range(5):                                                  # no softplus on the output:
        torch.manual_seed(seed)                                            # both signs occur
        with torch.no_grad():
            values = LossNet(hidden=8, net="authors").double()(pairs)
        lows.append(values.min().item())
        highs.append(values.max().item())
    assert min(lows) < 0 < max(highs)
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(64, 10, generator=g)).double()
    y = torch.randint(10, (64,), generator=g)
    probs, onehot = logits.softmax(1), F.one_hot(y, 10).double()
    w1, w2, w3 = (p.detach() for p in net.parameters())
    act = lambda z: 0.75 * F.softplus(z, beta=2.0) + 0.25 * z
    by_hand = (act(act(torch.stack([probs, onehot], -1) @ w1.T) @ w2.T) @ w3.T).squeeze(-1)   # (64, 10)
    ce = -torch.log(probs[torch.arange(64), y])
    expected = ce + by_hand.sum(1) / 10
    got = loss_value(net, logits, y, reduction="none")
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, ce + by_hand.sum(1), rtol=1e-3)          # the mean, not the sum
    assert torch.allclose(loss_value(net, logits, y), expected.mean(), rtol=1e-12)
    # the slice adds cross-entropy too: -log p_true + mean_c l
    curve = loss_curve(net, 10)
    p = lfl.P_GRID.double()
    others = torch.stack([(1 - p) / 9, torch.zeros_like(p)], -1)
    true = torch.stack([p, torch.ones_like(p)], -1)
    with torch.no_grad():
        slice_by_hand = -p.log() + (net(true) + 9 * net(others)) / 10
    assert torch.allclose(curve, slice_by_hand, rtol=1e-10)


def test_authors_loss_net_fitted_to_cross_entropy_is_cross_entropy_and_monotone_needs_the_chapter_net():
    """init=cross_entropy on the authors' net fits the learned term to 0 (it adds CE itself)."""
    from metabook.methods.online_loss import fit_to_cross_entropy
    torch.manual_seed(0)
    net = LossNet(hidden=40, net="authors")
    g = torch.Generator().manual_seed(1)
    logits, y = 2 * torch.randn(256, 10, generator=g), torch.randint(10, (256,), generator=g)
    before = (loss_value(net, logits, y) - F.cross_entropy(logits, y)).abs().item()
    assert fit_to_cross_entropy(net) < 1e-3
    after = (loss_value(net, logits, y) - F.cross_entropy(logits, y)).abs().item()
    assert after < 0.05 < before
    with pytest.raises(ValueError, match="monotone=True needs net='chapter'"):
        LossNet(monotone=True, net="authors")
    with pytest.raises(ConfigError, match="lfl.monotone=true needs lfl.net=chapter"):
        OnlineLoss(chapter_config("online_loss", "smoke", {"lfl.monotone": "true", "lfl.net": "authors"}))


@pytest.mark.parametrize("preset", ["smoke", "cpu", "gpu", "paper"])
def test_every_preset_uses_the_authors_base_optimiser_and_the_modules_meta_learning_rates(preset):
    """SGD lr 0.01, Nesterov momentum 0.9, weight decay 5e-4, no warm-up (the EvoMAL CIFAR
    configs), Adam 1e-3 on phi offline and online; read from the resolved config and from the
    optimisers a method builds, so putting lr 0.1 or offline meta-lr 1e-2 back fails here."""
    cfg = chapter_config("online_loss", preset)
    assert (cfg["lr"], cfg["momentum"], cfg["nesterov"], cfg["weight_decay"]) == (0.01, 0.9, True, 5e-4)
    assert (cfg["schedule"], cfg["warmup"]) == ("cosine", 0.0)
    assert cfg["lfl.offline_meta_lr"] == 1e-3 and cfg["lfl.meta_lr"] == 1e-3
    from metabook.train import lr_at
    assert lr_at(0, 100, cfg) == 0.01                                # the offline alpha (lfl.offline_lr = 0)
    method = OnlineLoss(cfg)
    assert method.offline["meta_lr"] == 1e-3 and method.offline["lr"] == 0.01


def test_the_arms_build_the_configured_optimisers(synthetic):
    _, method, _ = tiny_run(synthetic, OnlineLoss, {"epochs": 0.1})
    group = method.opt.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 5e-4)
    assert method.meta_opt.param_groups[0]["lr"] == 1e-3
    assert method.loss_net.kind == "chapter"
    for name in ("online_authors", "offline_authors"):
        assert lfl.ARMS[name].changes["lfl.net"] == "authors"


def test_loss_net_fitted_to_cross_entropy_falls_in_p_true_and_pushes_logits_like_cross_entropy():
    from metabook.methods.online_loss import fit_to_cross_entropy
    torch.manual_seed(0)
    loss_net = LossNet(hidden=40)
    assert fit_to_cross_entropy(loss_net) < 0.05
    curve = loss_curve(loss_net, 10)[:40]                            # p_true in [0.01, 0.8]
    assert (curve[1:] < curve[:-1]).all()
    g = torch.Generator().manual_seed(1)
    logits = (2 * torch.randn(256, 10, generator=g)).requires_grad_(True)
    y = torch.randint(10, (256,), generator=g)
    (learned,) = torch.autograd.grad(loss_value(loss_net, logits, y), logits)
    (ce,) = torch.autograd.grad(F.cross_entropy(logits, y), logits)
    assert F.cosine_similarity(learned.flatten(), ce.flatten(), dim=0) > 0.8
    assert 0.5 < learned.norm() / ce.norm() < 2


def separable_batches(n, centers, seed):
    """Endless batches of a 3-class, 5-feature problem whose classes are well separated."""
    from metabook.data import Batch
    g = torch.Generator().manual_seed(seed)
    while True:
        y = torch.randint(3, (n,), generator=g)
        yield Batch(centers[y] + 0.7 * torch.randn(n, 5, generator=g), y, torch.arange(n))


@pytest.mark.parametrize("seed", [0, 1])
def test_offline_init_turns_a_flat_random_loss_into_one_that_falls_as_p_true_rises(seed):
    """ML^3 on a separable problem: the meta loss after one step falls, and the learned loss
    becomes much lower at p_true = 0.99 than at 0.01 or 0.5 (like cross-entropy), from an
    initial curve that is nearly flat."""
    import torch.nn as nn
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    loss_net = LossNet(hidden=40)
    before = loss_curve(loss_net, 3)
    centers = 2 * torch.randn(3, 5)
    trace = offline_init(model, loss_net, separable_batches(32, centers, seed),
                         separable_batches(32, centers, seed + 100), steps=150, horizon=1, lr=0.1, meta_lr=1e-2)
    after = loss_curve(loss_net, 3)
    drop_before = (before[0] - before[-1]).abs().item()
    assert sum(trace[-20:]) / 20 < 0.8 * sum(trace[:20]) / 20
    assert after[-1] < after[0] - 10 * max(drop_before, 0.1)
    assert after[-1] < after[len(after) // 2]


def tiny_run(synthetic, method_cls, overrides=None, out_dir=None, on_step=None, seed=0):
    cfg = chapter_config("online_loss", "smoke", {**TINY, **(overrides or {})})
    data = prepare_data(cfg, seed, torch.device("cpu"), synthetic)
    seed_everything(seed)
    model = make_model(cfg, synthetic.num_classes, torch.device("cpu"))
    method = method_cls(cfg)
    res = train(method, model, data, cfg, seed=seed, out_dir=out_dir, progress=False,
                on_step=lambda step, m: on_step(step, m, method) if on_step else None)
    return model, method, res


@pytest.mark.parametrize("method_cls", [OnlineLoss, OfflineLoss])
def test_online_loss_moves_phi_every_step_while_offline_loss_keeps_it_fixed(synthetic, method_cls):
    seen = []

    def record_phi(step, metrics, method):
        seen.append(parameters_to_vector(method.loss_net.parameters()).clone())

    _, method, res = tiny_run(synthetic, method_cls, on_step=record_phi)
    assert len(seen) == res["cost"]["steps"] == 20
    assert len(method.offline_trace) == 3                          # the offline init ran once, 3 steps
    moved = [not torch.equal(a, b) for a, b in zip(seen, seen[1:])]
    assert all(moved) if method_cls is OnlineLoss else not any(moved)
    curves = method.extras(method.ctx.streams)["curves"]
    assert [c["step"] for c in curves] == [0, 10, 20]              # after prepare, then every evaluation
    assert (curves[0]["loss"] != curves[-1]["loss"]) == (method_cls is OnlineLoss)


SHORT = {"epochs": 1.0, "train_size": 80, "batch_size": 8, "meta_size": 40, "test_size": 40,
         "lfl.init": "random"}                    # 10 steps; no 1000-step fit to cross-entropy


def trajectory(synthetic, method_cls, overrides):
    """A 10-step tiny run (1 epoch of batch 8): per step, the metrics and the model and loss-net
    parameters after it."""
    steps = []

    def record(step, metrics, method):
        steps.append((dict(metrics), [p.detach().clone() for p in method.model.parameters()],
                      [p.detach().clone() for p in method.loss_net.parameters()]))

    model, method, _ = tiny_run(synthetic, method_cls, {**SHORT, **overrides}, on_step=record)
    return model, method, steps


@pytest.fixture(scope="module")
def trajectories(synthetic):
    """online and offline at lfl.meta_lr = 0, offline with the lr 1e-6 higher (relatively),
    online at lfl.meta_lr = 1e-3 (OfflineLoss never reads lfl.meta_lr)."""
    lr = chapter_config("online_loss", "smoke", TINY)["lr"]
    authors = {**lfl.AUTHORS, "lfl.meta_lr": 0.0}
    return {"online": trajectory(synthetic, OnlineLoss, {"lfl.meta_lr": 0.0}),
            "offline": trajectory(synthetic, OfflineLoss, {"lfl.meta_lr": 0.0}),
            "offline_lr": trajectory(synthetic, OfflineLoss, {"lfl.meta_lr": 0.0, "lr": lr * (1 + 1e-6)}),
            "online_learning": trajectory(synthetic, OnlineLoss, {"lfl.meta_lr": 1e-3}),
            "online_authors": trajectory(synthetic, OnlineLoss, authors),
            "offline_authors": trajectory(synthetic, OfflineLoss, authors),
            "offline_authors_lr": trajectory(synthetic, OfflineLoss, {**authors, "lr": lr * (1 + 1e-6)}),
            "online_authors_learning": trajectory(synthetic, OnlineLoss, {**lfl.AUTHORS, "lfl.meta_lr": 1e-3})}


def same_tensors(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("suffix", ["", "_authors"])
def test_online_loss_with_meta_lr_zero_is_bitwise_the_frozen_offline_loss(trajectories, suffix):
    """With lfl.meta_lr = 0 the online arm's real step is the offline arm's plain step on M_phi:
    same offline init, batches, lr and loss network, so after every one of 10 steps the model
    parameters, the BN statistics and the loss-net parameters are bit-for-bit equal, and phi is
    still the offline init's. A perturbed arm (lr 1e-6 higher, relatively) is not equal, so
    the comparison can fail."""
    (model_on, on, steps_on), (model_off, off, steps_off) = trajectories["online" + suffix], trajectories["offline" + suffix]
    assert on.loss_net.kind == off.loss_net.kind == ("authors" if suffix else "chapter")
    assert len(steps_on) == len(steps_off) == 10
    assert on.offline_trace == off.offline_trace and len(on.offline_trace) == 3
    assert on.snapshots[0] == off.snapshots[0]                      # phi right after the init
    for t, ((m_on, th_on, phi_on), (m_off, th_off, phi_off)) in enumerate(zip(steps_on, steps_off)):
        assert same_tensors(th_on, th_off), f"model parameters differ after step {t + 1}"
        assert same_tensors(phi_on, phi_off), f"loss-net parameters differ after step {t + 1}"
        assert m_on["loss"] == m_off["loss"] and m_on["learned_loss"] == m_off["learned_loss"]
    for (name, a), b in zip(model_on.state_dict().items(), model_off.state_dict().values()):
        assert torch.equal(a, b), name                                # running stats too
    assert same_tensors(steps_on[0][2], steps_on[-1][2])            # phi never moved
    assert not same_tensors(steps_on[0][1], steps_on[-1][1])        # the model did
    # the comparison is sharp: a 1e-6 relative change of the lr breaks the equality
    perturbed = trajectories["offline_authors_lr" if suffix else "offline_lr"]
    assert not same_tensors(perturbed[2][-1][1], steps_off[-1][1])


@pytest.mark.parametrize("suffix", ["", "_authors"])
def test_online_loss_with_positive_meta_lr_changes_phi_and_then_the_model(trajectories, suffix):
    """The companion of the bitwise test: with lfl.meta_lr > 0 the loss net moves at the first
    online step and keeps moving, and the model parts from the frozen-loss trajectory: after step
    1 it is still equal (both steps used phi_0), from step 2 on it is not (phi_1 != phi_0)."""
    (_, on, steps_on), (_, off, steps_off) = (trajectories["online" + suffix + "_learning"],
                                              trajectories["offline" + suffix])
    assert on.offline_trace == off.offline_trace
    assert not same_tensors(steps_on[0][2], steps_off[0][2])        # phi_1 != phi_0
    assert all(not same_tensors(a[2], b[2]) for a, b in zip(steps_on, steps_on[1:]))
    assert same_tensors(steps_on[0][1], steps_off[0][1])            # step 1 used phi_0 in both
    assert not same_tensors(steps_on[1][1], steps_off[1][1])        # step 2 used phi_1 online


def test_monotone_loss_net_never_rewards_moving_probability_away_from_the_target():
    """lfl.monotone: for any weights, l(p, 1) does not increase and l(p, 0) does not decrease in
    p, and M falls as p_true rises; the default (unconstrained) net violates this for some
    weights, so the check can fail."""
    p = torch.linspace(0, 1, 201, dtype=torch.float64)
    violated = []
    for monotone in (True, False):
        for seed in range(5):
            torch.manual_seed(seed)
            net = LossNet(hidden=8, monotone=monotone).double()
            for q in net.parameters():
                q.data = 3 * torch.randn_like(q)
            with torch.no_grad():
                pos = net(torch.stack([p, torch.ones_like(p)], 1))
                neg = net(torch.stack([p, torch.zeros_like(p)], 1))
            ok = bool((pos.diff() <= 1e-12).all() and (neg.diff() >= -1e-12).all()
                      and (loss_curve(net, 10).diff() <= 1e-12).all())
            if monotone:
                assert ok, seed
            else:
                violated.append(not ok)
    assert any(violated)
    assert chapter_config("online_loss", "smoke", {"lfl.monotone": "true"})["lfl.monotone"] is True
    assert chapter_config("online_loss", "smoke")["lfl.monotone"] is False


def test_killed_online_run_resumes_from_the_checkpoint_after_prepare_bitwise_without_redoing_it(
        synthetic, tmp_path, monkeypatch):
    """Killed at step 3 with no periodic checkpoint: the run resumes from the checkpoint the loop
    wrote after prepare() (the offline stage is not run again) and ends bit-for-bit as an
    uninterrupted run."""
    overrides = {"checkpoint_every": 0}
    model_a, method_a, full = tiny_run(synthetic, OnlineLoss, overrides)

    with pytest.raises(Killed):
        tiny_run(synthetic, OnlineLoss, overrides, out_dir=tmp_path, on_step=kill_at(3))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 0
    calls = []
    monkeypatch.setattr(lfl, "offline_init", lambda *a, **k: calls.append(1) or [])
    model_b, method_b, resumed = tiny_run(synthetic, OnlineLoss, overrides, out_dir=tmp_path)
    assert calls == []                                              # restored, not recomputed
    assert resumed["metrics"] == full["metrics"]
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(method_a.loss_net.parameters(), method_b.loss_net.parameters()):
        assert torch.equal(a, b)
    ea, eb = method_a.extras(method_a.ctx.streams), method_b.extras(method_b.ctx.streams)
    assert ea["curves"] == eb["curves"] and ea["offline_meta_loss"] == eb["offline_meta_loss"]


@pytest.mark.parametrize("overrides, needle", [
    ({"lfl.activation": "tanh"}, "lfl.activation='tanh' is not valid; choose one of: smooth_leaky_relu, relu"),
    ({"lfl.offline_horizon": "0"}, "lfl.offline_horizon=0 is not valid; it must be >= 1"),
    ({"lfl.leak": "1.5"}, "it must be in [0, 1)"),
    ({"lfl.init": "ce"}, "choose one of: random, cross_entropy"),
    ({"lfl.net": "paper"}, "lfl.net='paper' is not valid; choose one of: chapter, authors"),
    ({"lfl.hiden": "8"}, "valid keys:"),
])
def test_bad_config_values_raise_config_error_naming_the_choices(overrides, needle):
    with pytest.raises(ConfigError) as err:
        chapter_config("online_loss", "smoke", overrides)
    assert needle in str(err.value)


def test_chapter_run_records_all_arms_cost_ratio_and_learned_loss_curves(synthetic, tmp_path):
    from metabook import run_chapter
    rec = run_chapter("online_loss", "smoke", seeds=[0], out_dir=tmp_path, overrides={**TINY, "epochs": 1.0},
                      progress=False, dataset=synthetic)
    assert set(rec["arms"]) == {"baseline", "offline_loss", "online_loss", "offline_authors", "online_authors",
                                "baseline_same_time"}
    assert rec["method"] == "online_loss"
    peak = {a: rec["arms"][a]["peak_memory_bytes"] for a in ("baseline", "offline_loss", "online_loss")}
    assert peak["online_loss"] > peak["offline_loss"]       # the online step keeps a second graph (meta-gradient)
    extras = rec["arms"]["online_loss"]["extras"]["0"]
    assert len(extras["curves"]) >= 2 and len(extras["curves"][0]["loss"]) == len(extras["p_true"])
    assert len(extras["offline_meta_loss"]) == 3
    # each pair (frozen, online) starts from the same offline stage; the two networks' stages differ
    ex = {a: rec["arms"][a]["extras"]["0"] for a in ("offline_loss", "online_loss", "offline_authors", "online_authors")}
    assert ex["offline_loss"]["offline_meta_loss"] == ex["online_loss"]["offline_meta_loss"]
    assert ex["offline_authors"]["offline_meta_loss"] == ex["online_authors"]["offline_meta_loss"]
    assert ex["offline_authors"]["curves"][0] == ex["online_authors"]["curves"][0]
    assert ex["offline_loss"]["offline_meta_loss"] != ex["offline_authors"]["offline_meta_loss"]
    # the offline stage is the arms' one-off cost, timed by the loop, never inside a step
    assert rec["arms"]["online_loss"]["one_off_seconds"]["mean"] >= extras["offline_seconds"]
    assert rec["arms"]["baseline"]["one_off_seconds"]["mean"] < extras["offline_seconds"]
    assert "grad_ratio" in rec["arms"]["online_loss"]["history"]["0"][-1]
    assert (tmp_path / "result.json").exists()
