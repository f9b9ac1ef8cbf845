"""Per-instance learning rates: the meta-gradient, the behaviour under label noise, the ROC-AUC."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import tiny_bn_net, weighted_problem
from metabook.meta import forward, lookahead_params, model_params
from metabook.methods.instance_lr import instance_lr_meta_gradient
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


def test_corrupted_examples_end_with_lower_learning_rates():
    """Behaviour: train a small net on separable data with 25% flipped labels; the rates of the
    flipped examples must fall below those of the clean ones (AUC well above chance)."""
    from metabook import chapter_config
    from metabook.data import Batch
    from metabook.methods.instance_lr import InstanceLR
    from metabook.train import Context, Streams
    torch.manual_seed(0)
    centers = torch.randn(3, 5) * 2
    y = torch.arange(240) % 3
    x = centers[y] + 0.5 * torch.randn(240, 5)
    flipped = torch.rand(240) < 0.25
    y_noisy = torch.where(flipped, (y + 1) % 3, y)
    ym = torch.arange(60) % 3
    xm = centers[ym] + 0.5 * torch.randn(60, 5)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
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
            "test_size": 200, "epochs": 1.0}
    rec = run_chapter("instance_lr", "smoke", seeds=[0], out_dir=tmp_path, overrides=tiny, progress=False)
    assert set(rec["arms"]) == {"baseline", "instance_lr", "l2rw", "baseline_same_time"}
    assert "loss_auc" in rec["arms"]["baseline_same_time"]["extras"]["0"]     # the free detector of plain SGD
    assert rec["dataset"]["noise"]["kind"] == "symmetric" and rec["dataset"]["noise"]["corrupted"] > 100
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
    with pytest.raises(ConfigError, match="choose from: baseline, instance_lr, l2rw"):
        chapter_config("instance_lr", "smoke", {"ilr.arms": "baseline,mwn"})
    with pytest.raises(ConfigError, match="baseline and instance_lr are required"):
        run_chapter("instance_lr", "smoke", overrides={"ilr.arms": "baseline,l2rw", "dataset": "synthetic"},
                    progress=False)
