"""Per-instance learning rates: the meta-gradient, the behaviour under label noise, the ROC-AUC,
and the controls (baseline_clean, mean_rate, MW-Net)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import tiny_bn_net, weighted_problem
from metabook.meta import forward, lookahead_params, model_params
from metabook.methods.instance_lr import instance_lr_meta_gradient, mwn_meta_gradient, weight_net
from metabook.results import roc_auc


def meta_loss_of_sigma(model, sigma, x, y, xm, ym, lr):
    params = model_params(model)
    inner = (sigma.exp() * F.cross_entropy(forward(model, params, x), y, reduction="none")).mean()
    grads = torch.autograd.grad(inner, list(params.values()))
    return F.cross_entropy(forward(model, lookahead_params(params, grads, lr), xm), ym).item()


@pytest.mark.parametrize("mode, rtol", [("jvp", 1e-6), ("fd", 1e-3)])
def test_instance_lr_meta_gradient_matches_finite_differences_in_float64(mode, rtol):
    model, lr = tiny_bn_net(), 0.5
    x, y, xm, ym = weighted_problem()
    sigma = torch.linspace(-0.5, 0.5, 8, dtype=torch.float64)
    grad, losses, _ = instance_lr_meta_gradient(model, model_params(model), x, y, xm, ym, sigma, lr, mode=mode)
    fd = torch.zeros(8, dtype=torch.float64)
    for i in range(8):
        e = torch.zeros(8, dtype=torch.float64)
        e[i] = 1e-6
        fd[i] = (meta_loss_of_sigma(model, sigma + e, x, y, xm, ym, lr)
                 - meta_loss_of_sigma(model, sigma - e, x, y, xm, ym, lr)) / 2e-6
    assert fd.abs().max() > 1e-4
    assert torch.allclose(grad, fd, rtol=rtol, atol=rtol * fd.abs().max().item())
    assert losses.requires_grad


def flipped_toy():
    """Separable 3-class data (240 examples, 5 features) with 25% of the labels flipped to the
    next class, a clean meta set of 60 and a small net: (x, y_noisy, flipped, x_meta, y_meta, model)."""
    torch.manual_seed(0)
    centers = torch.randn(3, 5) * 2
    y = torch.arange(240) % 3
    x = centers[y] + 0.5 * torch.randn(240, 5)
    flipped = torch.rand(240) < 0.25
    y_noisy = torch.where(flipped, (y + 1) % 3, y)
    ym = torch.arange(60) % 3
    xm = centers[ym] + 0.5 * torch.randn(60, 5)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    return x, y_noisy, flipped, xm, ym, model


def test_corrupted_examples_end_with_lower_learning_rates():
    """Behaviour: train a small net on separable data with 25% flipped labels; the rates of the
    flipped examples must fall below those of the clean ones (AUC well above chance)."""
    from metabook import chapter_config
    from metabook.data import Batch
    from metabook.methods.instance_lr import InstanceLR
    from metabook.train import Context, Streams
    x, y_noisy, flipped, xm, ym, model = flipped_toy()
    cfg = chapter_config("instance_lr", "smoke", {"lr": 0.1, "weight_decay": 0.0, "ilr.meta_lr": 300.0})
    method = InstanceLR(cfg)
    streams = Streams(None, None, corrupted=flipped)        # a toy without images: only the noise mask
    method.setup(Context(model, streams, total_steps=90, steps_per_epoch=6, num_classes=3, num_train=240))
    for epoch in range(15):
        for b in torch.randperm(240).split(40):
            method.step(Batch(x[b], y_noisy[b], b), Batch(xm, ym, torch.arange(60)), lr=0.1)
    assert roc_auc(-method.sigma, flipped) > 0.8
    summary = method.diagnostics(streams)                       # what the history records at evaluation
    assert summary["rate_auc"] == roc_auc(-method.sigma, flipped)
    assert summary["rate_corrupted"] < summary["rate_clean"]


def test_roc_auc_of_known_cases():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert roc_auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    assert roc_auc([3, 2, 1], [1, 0, 0]) == 1.0
    with pytest.raises(ValueError):
        roc_auc([1, 2], [1, 1])


def test_chapter_run_records_noise_auc_rates_and_all_arms(tmp_path):
    import numpy as np
    from metabook import run_chapter
    tiny = {"dataset": "synthetic", "train_size": 512, "meta_size": 100, "batch_size": 64, "width": 8,
            "test_size": 200, "epochs": 1.0, "ilr.arms": "baseline,instance_lr,l2rw,baseline_clean,mean_rate,mwn",
            "ilr.same_time": True}
    rec = run_chapter("instance_lr", "smoke", seeds=[0], out_dir=tmp_path, overrides=tiny, progress=False)
    assert set(rec["arms"]) == {"baseline", "instance_lr", "l2rw", "baseline_clean", "mean_rate", "mwn",
                                "baseline_same_time"}
    # every equal-epoch arm takes the baseline's steps (baseline_clean too: epochs of the noisy split)
    assert len({rec["arms"][a]["steps"] for a in ("baseline", "baseline_clean", "mean_rate", "mwn")}) == 1
    curve = rec["arms"]["mwn"]["extras"]["0"]["weight_curve"]
    assert len(curve["loss"]) == len(curve["weight"]) and all(0 < w < 1 for w in curve["weight"])
    assert set(rec["arms"]["mwn"]["extras"]["0"]) >= {"weight_auc", "loss_auc"}
    assert "loss_auc" in rec["arms"]["baseline_same_time"]["extras"]["0"]     # the free detector of plain SGD
    assert rec["dataset"]["noise"]["kind"] == "uniform" and rec["dataset"]["noise"]["corrupted"] > 100
    saved = np.load(tmp_path / "instance_lr-seed0.npz")
    assert saved["rate"].shape == saved["train_index"].shape == saved["corrupted"].shape == (512,)
    assert saved["label"].shape == (512,) and saved["label"].max() < 10
    assert saved["corrupted"].sum() == rec["dataset"]["noise"]["corrupted"]
    # the recorded AUC is the one of the saved rates and mask (a low rate flags a corrupted label)
    assert rec["metrics"]["noise_auc"] == pytest.approx(roc_auc(-np.log(saved["rate"]), saved["corrupted"]), abs=1e-6)
    assert (tmp_path / "result.json").exists()


def test_personalization_run_reports_accuracy_on_the_target_distribution(tmp_path):
    from metabook import run_chapter
    tiny = {"dataset": "synthetic", "train_size": 512, "meta_size": 100, "batch_size": 64, "width": 8,
            "test_size": 200, "epochs": 1.0, "noise.kind": "none", "noise.rate": 0.0,
            "target.classes": "3,5", "ilr.arms": "baseline,instance_lr", "ilr.same_time": False}
    rec = run_chapter("instance_lr", "smoke", seeds=[0], overrides=tiny, progress=False)
    assert set(rec["arms"]) == {"baseline", "instance_lr"}
    assert all("target_acc_prior" in arm for arm in rec["arms"].values())
    assert rec["metrics"]["target_acc"] == rec["arms"]["instance_lr"]["target_acc"]["mean"]
    assert rec["dataset"]["target"]["classes"] == [3, 5]


def test_arms_without_the_method_or_unknown_names_are_refused(tmp_path):
    from metabook import chapter_config, run_chapter
    from metabook.config import ConfigError
    with pytest.raises(ConfigError, match="choose from: baseline, instance_lr, l2rw, baseline_clean, mean_rate, mwn"):
        chapter_config("instance_lr", "smoke", {"ilr.arms": "baseline,mwnet"})
    with pytest.raises(ConfigError, match="baseline and instance_lr are required"):
        run_chapter("instance_lr", "smoke", overrides={"ilr.arms": "baseline,l2rw", "dataset": "synthetic"},
                    progress=False)


def mwn_meta_loss(model, vnet, x, y, xm, ym, lr):
    """L_M(theta'(phi)) by the definition: weights from vnet on the detached losses, one virtual step."""
    params = model_params(model)
    losses = F.cross_entropy(forward(model, params, x), y, reduction="none")
    w = vnet(losses.detach().unsqueeze(1)).squeeze(1)
    grads = torch.autograd.grad((w * losses).mean(), list(params.values()), create_graph=True)
    return F.cross_entropy(forward(model, lookahead_params(params, grads, lr), xm), ym)


@pytest.mark.parametrize("mode, rtol", [("jvp", 1e-6), ("fd", 3e-2)])   # fd: its error sums over the batch
def test_mwn_meta_gradient_matches_finite_differences_in_float64(mode, rtol):
    """The weighting network's meta-gradient (one JVP, then the chain rule through the network)
    against central differences of the lookahead meta loss in every parameter of the network, and
    against the double backward of the general engine."""
    from metabook.meta import meta_gradient
    model, lr = tiny_bn_net(), 0.5
    x, y, xm, ym = weighted_problem()
    torch.manual_seed(3)
    vnet = weight_net(4).double()
    grads, losses, _ = mwn_meta_gradient(model, model_params(model), vnet, x, y, xm, ym, lr, mode=mode)
    exact = torch.cat([g.flatten() for g in grads])
    fd = torch.zeros_like(exact)
    k = 0
    for p in vnet.parameters():
        flat = p.data.view(-1)
        for j in range(len(flat)):
            old = flat[j].item()
            flat[j] = old + 1e-6
            plus = mwn_meta_loss(model, vnet, x, y, xm, ym, lr).item()
            flat[j] = old - 1e-6
            minus = mwn_meta_loss(model, vnet, x, y, xm, ym, lr).item()
            flat[j] = old
            fd[k] = (plus - minus) / 2e-6
            k += 1
    assert fd.abs().max() > 1e-5
    assert torch.allclose(exact, fd, rtol=rtol, atol=rtol * fd.abs().max().item())
    params = model_params(model)
    inner = lambda p: (vnet(F.cross_entropy(forward(model, p, x), y, reduction="none").detach().unsqueeze(1)).squeeze(1)
                       * F.cross_entropy(forward(model, p, x), y, reduction="none")).mean()
    engine, _ = meta_gradient(model, inner, lambda p: F.cross_entropy(forward(model, p, xm), ym),
                              list(vnet.parameters()), lr, params=params)
    assert torch.allclose(exact, torch.cat([g.flatten() for g in engine]), rtol=rtol, atol=rtol * fd.abs().max().item())
    assert losses.requires_grad


def _toy_method(cls, overrides, n=64, seed=0):
    """A method on a tiny float32 net (no momentum, no weight decay) and a toy batch stream."""
    from metabook import chapter_config
    from metabook.train import Context, Streams
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    cfg = chapter_config("instance_lr", "smoke", {"lr": 0.1, "weight_decay": 0.0, "momentum": 0.0, **overrides})
    method = cls(cfg)
    method.setup(Context(model, Streams(None, None, corrupted=torch.zeros(n, dtype=torch.bool)), total_steps=10,
                         steps_per_epoch=2, num_classes=3, num_train=n, seed=seed))
    return method


def _toy_batches(n=64):
    from metabook.data import Batch
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(n, 5, generator=g), torch.randint(3, (n,), generator=g)
    xm, ym = torch.randn(32, 5, generator=g), torch.randint(3, (32,), generator=g)
    return [Batch(x[b], y[b], b) for b in torch.arange(n).split(32)], Batch(xm, ym, torch.arange(32))


def test_mean_rate_is_the_method_bit_for_bit_when_the_rates_of_a_batch_are_equal():
    from metabook.methods.instance_lr import InstanceLR, MeanRate
    batches, meta = _toy_batches()
    a, b = _toy_method(InstanceLR, {"ilr.meta_lr": 0.0}), _toy_method(MeanRate, {"ilr.meta_lr": 0.0})
    for _ in range(3):
        for batch in batches:
            a.step(batch, meta, lr=0.1)
            b.step(batch, meta, lr=0.1)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_mean_rate_keeps_the_method_rates_but_steps_with_their_batch_mean():
    """From the same state: the same updated rates as the method; the real step is plain SGD at
    lr * mean(r) (not the method's step, whose rates differ per example)."""
    from metabook.methods.instance_lr import InstanceLR, MeanRate
    batches, meta = _toy_batches()
    a, b = _toy_method(InstanceLR, {"ilr.meta_lr": 300.0}), _toy_method(MeanRate, {"ilr.meta_lr": 300.0})
    spread = torch.linspace(-1, 1, 64)
    a.sigma.copy_(spread)
    b.sigma.copy_(spread)
    batch = batches[0]
    ref = {k: v.detach().clone() for k, v in b.model.named_parameters()}
    b.model.train()
    plain = F.cross_entropy(b.model(batch.x), batch.y)       # the loss at the step's start (BN in train mode)
    g = torch.autograd.grad(plain, list(b.model.parameters()))
    a.step(batch, meta, lr=0.1)
    b.step(batch, meta, lr=0.1)
    assert torch.equal(a.sigma, b.sigma) and not torch.equal(a.sigma, spread)   # the same meta step moved them
    r_bar = b.sigma[batch.idx].exp().mean()
    for (k, p), gk in zip(b.model.named_parameters(), g):
        assert torch.allclose(p, ref[k] - 0.1 * r_bar * gk, atol=1e-6)
    assert not all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_baseline_clean_steps_on_the_noisy_batch_and_the_clean_meta_batch_together():
    from metabook.data import Batch
    from metabook.methods.instance_lr import BaselineClean, NoisyBaseline
    batches, meta = _toy_batches()
    clean, union, alone = (_toy_method(BaselineClean, {}), _toy_method(NoisyBaseline, {}),
                           _toy_method(NoisyBaseline, {}))
    assert clean.uses_meta
    batch = batches[0]
    clean.step(batch, meta, lr=0.1)
    union.step(Batch(torch.cat([batch.x, meta.x]), torch.cat([batch.y, meta.y]), batch.idx), None, lr=0.1)
    alone.step(batch, None, lr=0.1)
    assert all(torch.equal(p, q) for p, q in zip(clean.model.parameters(), union.model.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(clean.model.parameters(), alone.model.parameters()))


def test_mwn_gives_flipped_labels_lower_weights_on_the_toy():
    """Behaviour: on the toy of the rates test, MW-Net's weights of the flipped examples (from the
    final model's losses) fall below the clean ones' (AUC well above chance); the weighting network
    moved from its start."""
    from metabook import chapter_config
    from metabook.data import Batch
    from metabook.methods.instance_lr import MetaWeightNet
    from metabook.train import Context, Streams
    x, y_noisy, flipped, xm, ym, model = flipped_toy()
    cfg = chapter_config("instance_lr", "smoke", {"lr": 0.1, "weight_decay": 0.0, "ilr.mwn_lr": 1e-2})
    method = MetaWeightNet(cfg)
    method.setup(Context(model, Streams(None, None, corrupted=flipped), total_steps=90, steps_per_epoch=6,
                         num_classes=3, num_train=240))
    start = [p.detach().clone() for p in method.vnet.parameters()]
    for epoch in range(15):
        for b in torch.randperm(240).split(40):
            method.step(Batch(x[b], y_noisy[b], b), Batch(xm, ym, torch.arange(60)), lr=0.1)
    assert not all(torch.equal(p, q) for p, q in zip(start, method.vnet.parameters()))
    model.eval()
    with torch.no_grad():
        losses = F.cross_entropy(model(x), y_noisy, reduction="none")
    assert roc_auc(-method.weights(losses), flipped) > 0.8


class _Scores(nn.Module):
    """A stand-in weighting network: w(l) = sign * l, strictly monotone in the loss."""

    def __init__(self, sign: float):
        super().__init__()
        self.sign = sign

    def forward(self, losses):
        return self.sign * losses


def test_mwn_weight_auc_counts_a_low_weight_as_a_corrupted_label():
    """The recorded weight_auc detects corrupted labels by *low* weight: a network that weighs high
    losses low ranks the examples as the loss does (weight_auc = loss_auc), one that weighs them
    high reverses it (1 - loss_auc)."""
    from metabook import chapter_config
    from metabook.data import make_synthetic
    from metabook.methods.instance_lr import ARMS
    from metabook.train import fresh_method, prepare_data
    cfg = chapter_config("instance_lr", "smoke", {"dataset": "synthetic", "train_size": 300, "meta_size": 50,
                                                  "test_size": 100, "width": 8, "noise.rate": 0.4})
    data = prepare_data(cfg, 0, torch.device("cpu"), make_synthetic(600, 200, seed=0))
    method = fresh_method(ARMS["mwn"], cfg, data, 0)
    aucs = {}
    for sign in (-1.0, 1.0):
        method.vnet = _Scores(sign)
        aucs[sign] = method.extras(data.streams())
    assert 0.05 < aucs[-1.0]["loss_auc"] < 0.95                      # the ranking is not trivial
    assert aucs[-1.0]["weight_auc"] == pytest.approx(aucs[-1.0]["loss_auc"], abs=1e-9)
    assert aucs[1.0]["weight_auc"] == pytest.approx(1 - aucs[1.0]["loss_auc"], abs=1e-9)
