"""Local losses balanced by meta-learning: meta-gradients against finite differences, where local
gradients go, minibatch-wise dropout, the cross-validation loop, a behavioural test, resume, config."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from helpers import Killed, kill_at, same_time_budget
from metabook import chapter_config
from metabook.config import ConfigError
from metabook.data import Batch, make_synthetic
from metabook.meta import forward, lookahead_params, model_params
from metabook.methods.local_losses import (LL, PRESETS, Balancer, LocalLosses, LocalNet, balancer_meta_gradient,
                                           fold_of_examples, free_weights, layer_features, layer_losses,
                                           layer_weight_meta_gradient, output_features)
from metabook.models import DeepCNN
from metabook.train import Context, make_model, prepare_data, seed_everything, train

TINY = {"dataset": "synthetic", "train_size": 256, "meta_size": 64, "test_size": 100, "batch_size": 32,
        "width": 4, "depth": 4, "epochs": 1.0, "ll.dropout": 0.0, "ll.cv_folds": 0}


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(800, 200, seed=0)


def tiny_net():
    """A float64 plain DeepCNN (depth 4, width 2, 3 classes) with 3 local heads, for 8x8 images."""
    torch.manual_seed(0)
    return LocalNet(DeepCNN(depth=4, width=2, num_classes=3), num_classes=3).double()


def tiny_batches():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(3, (8,), generator=g)
    xm, ym = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(3, (6,), generator=g)
    return x, y, xm, ym


def meta_loss_after_step(net, lam, mask, x, y, xm, ym, lr, detach):
    """L_G(theta'; meta) as a plain function of the layer weights (no meta machinery)."""
    params = model_params(net.body)
    buffers = {k: b.clone() for k, b in net.named_buffers()}
    outs = functional_call(net, {**buffers, **{f"body.{k}": p for k, p in params.items()}}, (x,),
                           {"detach": detach})
    losses = layer_losses(outs, y)
    grads = torch.autograd.grad(losses[-1] + (mask * lam * losses[:-1]).sum(), list(params.values()))
    return F.cross_entropy(forward(net.body, lookahead_params(params, grads, lr), xm), ym).item()


@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("mode, rtol", [("jvp", 1e-6), ("fd", 1e-3)])
def test_layer_weight_meta_gradient_matches_finite_differences_in_float64(detach, mode, rtol):
    net, lr = tiny_net(), 0.5
    x, y, xm, ym = tiny_batches()
    lam = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)         # layer 2 dropped this step
    losses = layer_losses(net(x, detach=detach), y)
    if detach and mode == "fd":                 # loss values cannot be detached: refused, not wrong
        with pytest.raises(ConfigError, match="ll.mode=jvp"):
            layer_weight_meta_gradient(net, losses, x, y, xm, ym, lam, mask, lr, detach=True, mode="fd")
        return
    g, grads, info = layer_weight_meta_gradient(net, losses, x, y, xm, ym, lam, mask, lr, detach=detach,
                                                mode=mode, fd_eps=1e-6, retain_graph=True)
    fd = torch.zeros(3, dtype=torch.float64)
    for l in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[l] = 1e-6
        fd[l] = (meta_loss_after_step(net, lam + e, mask, x, y, xm, ym, lr, detach)
                 - meta_loss_after_step(net, lam - e, mask, x, y, xm, ym, lr, detach)) / 2e-6
    assert fd[[0, 2]].abs().min() > 1e-5                              # the check is not vacuous
    assert g[1] == 0 and abs(fd[1]) < 1e-9                              # a dropped loss: no meta-gradient
    assert torch.allclose(g, fd, rtol=rtol, atol=rtol * fd.abs().max().item())
    assert abs(info["meta_loss"] - meta_loss_after_step(net, lam, mask, x, y, xm, ym, lr, detach)) < 1e-12
    # grads is the gradient of the weighted inner loss for body and heads (the real step reuses it)
    params = list(model_params(net.body).values()) + list(net.heads.parameters())
    ref = torch.autograd.grad(losses[-1] + (mask * lam * losses[:-1]).sum(), params)
    assert all(torch.allclose(a, b) for a, b in zip(grads, ref))


def test_free_weights_meta_gradient_at_zero_matches_finite_differences():
    """The L2RW variant evaluates the meta-gradient at lambda = 0 (theta' = theta - lr grad L_G)."""
    net, lr = tiny_net(), 0.5
    x, y, xm, ym = tiny_batches()
    zero, ones = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    g, _, _ = layer_weight_meta_gradient(net, layer_losses(net(x), y), x, y, xm, ym, zero, ones, lr)
    fd = torch.stack([torch.tensor((meta_loss_after_step(net, zero + 1e-6 * e, ones, x, y, xm, ym, lr, False)
                                    - meta_loss_after_step(net, zero - 1e-6 * e, ones, x, y, xm, ym, lr, False))
                                   / 2e-6, dtype=torch.float64) for e in torch.eye(3, dtype=torch.float64)])
    assert fd.abs().max() > 1e-5
    assert torch.allclose(g, fd, rtol=1e-6, atol=1e-6 * fd.abs().max().item())


@pytest.mark.parametrize("inputs, norm", [("stats", "sum_k"), ("outputs", "sum_k"), ("stats", "sigmoid"),
                                          ("outputs", "sigmoid")])
def test_balancer_meta_gradient_matches_finite_differences_in_float64(inputs, norm):
    """Both of the balancer's inputs (loss statistics, shared MLP; the local heads' outputs, one MLP
    over all layers as the paper's figure draws it) and both normalisations."""
    net, lr = tiny_net(), 0.5
    x, y, xm, ym = tiny_batches()
    torch.manual_seed(2)
    outs = net(x)
    if inputs == "outputs":
        feats = output_features(outs[:-1])                             # (K=3, C=3)
        balancer = Balancer(hidden=5, features=3, layers=3, norm=norm).double()
    else:
        feats = torch.rand(3, 4, dtype=torch.float64)
        balancer = Balancer(hidden=5, norm=norm).double()
    assert torch.allclose(balancer(feats), torch.ones(3, dtype=torch.float64))   # starts at equal weights
    torch.nn.init.normal_(balancer.mlp[-1].weight)                     # leave the equal-weights start
    mask = torch.ones(3, dtype=torch.float64)
    losses = layer_losses(outs, y)
    phi_grads, lam, _, _, _ = balancer_meta_gradient(net, balancer, feats, losses, x, y, xm, ym, mask, lr)
    if norm == "sum_k":
        assert torch.allclose(lam.sum(), torch.tensor(3.0, dtype=torch.float64))     # mean weight 1
    else:
        assert ((lam > 0) & (lam < 2)).all() and not torch.allclose(lam.sum(), torch.tensor(3.0, dtype=lam.dtype))
    checked = 0
    for p, gp in zip(balancer.parameters(), phi_grads):
        flat, gflat = p.data.view(-1), gp.reshape(-1)
        for i in range(0, len(flat), 3):
            old = flat[i].item()
            flat[i] = old + 1e-6
            up = meta_loss_after_step(net, balancer(feats).detach(), mask, x, y, xm, ym, lr, False)
            flat[i] = old - 1e-6
            down = meta_loss_after_step(net, balancer(feats).detach(), mask, x, y, xm, ym, lr, False)
            flat[i] = old
            fd = (up - down) / 2e-6
            assert abs(gflat[i].item() - fd) < 1e-8 + 1e-6 * abs(fd), (p.shape, i)
            checked += abs(fd) > 1e-7
    assert checked >= 5


def test_output_features_read_the_heads_outputs_without_labels():
    """(K, C): the batch-mean of each example's sorted softmax; rows sum to 1 and fall; a confident
    head has a larger first entry than an unsure one."""
    sure, unsure = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 9.0]]), torch.zeros(2, 3)
    f = output_features([sure, unsure])
    assert f.shape == (2, 3) and torch.allclose(f.sum(1), torch.ones(2))
    assert (f[:, :-1] >= f[:, 1:]).all() and f[0, 0] > 0.99 and torch.allclose(f[1], torch.full((3,), 1 / 3))


def test_free_weights_sum_to_one_so_no_layer_gets_more_than_one():
    """L2RW's normalisation: the helpful layers share a total weight of 1 (normalised to sum K, the
    one helpful layer here would get weight 3)."""
    assert free_weights(torch.tensor([0.3, -0.2, 0.1])).tolist() == [0.0, 1.0, 0.0]
    w = free_weights(torch.tensor([-0.1, -0.3, 0.2]))
    assert torch.allclose(w, torch.tensor([0.25, 0.75, 0.0])) and w.max() <= 1
    assert free_weights(torch.tensor([0.1, 0.2, 0.3])).tolist() == [0.0, 0.0, 0.0]


def block_grad_norms(net, loss):
    grads = torch.autograd.grad(loss, [p for b in net.body.blocks for p in b.parameters()], allow_unused=True,
                                retain_graph=True)
    per_block, i = [], 0
    for b in net.body.blocks:
        n = len(list(b.parameters()))
        per_block.append(sum(0.0 if g is None else g.abs().sum().item() for g in grads[i:i + n]))
        i += n
    return per_block


def test_detached_blocks_route_each_local_loss_to_its_own_block_only():
    net = tiny_net()
    x, y, _, _ = tiny_batches()
    losses = layer_losses(net(x, detach=True), y)
    for l in range(3):
        norms = block_grad_norms(net, losses[l])
        assert norms[l] > 0 and all(n == 0 for i, n in enumerate(norms) if i != l), (l, norms)
    norms = block_grad_norms(net, losses[-1])                          # the global loss: last block only
    assert norms[-1] > 0 and all(n == 0 for n in norms[:-1])


def test_deep_supervision_routes_each_local_loss_to_all_blocks_below():
    net = tiny_net()
    x, y, _, _ = tiny_batches()
    losses = layer_losses(net(x, detach=False), y)
    for l in range(3):
        norms = block_grad_norms(net, losses[l])
        assert all(n > 0 for n in norms[:l + 1]) and all(n == 0 for n in norms[l + 1:]), (l, norms)
    assert all(n > 0 for n in block_grad_norms(net, losses[-1]))


def test_the_net_with_heads_computes_the_plain_models_output_and_refuses_other_models():
    net = tiny_net()
    x = tiny_batches()[0]
    net.eval()
    for detach in (False, True):
        outs = net(x, detach=detach)
        assert len(outs) == 4 and all(o.shape == (8, 3) for o in outs)
        assert torch.equal(outs[-1], net.body(x))
    with pytest.raises(ConfigError, match="plain_cnn"):
        LocalNet(DeepCNN(depth=4, width=2, skips=True), 3)


def make_method(synthetic, overrides, cls=LocalLosses):
    cfg = chapter_config("local_losses", "smoke", {**TINY, **overrides})
    data = prepare_data(cfg, 0, torch.device("cpu"), synthetic)
    seed_everything(0)
    model = make_model(cfg, synthetic.num_classes, torch.device("cpu"))
    method = cls(cfg)
    return cfg, data, model, method


def context(model, data, cfg, seed=0):
    """The Context that train() gives a method, for driving its steps by hand."""
    spe = len(data.train)
    return Context(model, data.streams(), round(cfg["epochs"] * spe), spe, data.dataset.num_classes,
                   len(data.train.y), seed)


def test_dropout_drops_the_expected_fraction_and_a_dropped_loss_moves_nothing(synthetic):
    cfg, data, model, method = make_method(synthetic, {"ll.dropout": 0.3, "depth": 6})
    method.setup(context(model, data, cfg))
    torch.manual_seed(0)
    masks = torch.stack([method.draw_mask() for _ in range(2000)])        # (2000, K=5)
    assert masks.shape == (2000, 5) and set(masks.unique().tolist()) == {0.0, 1.0}
    assert abs((1 - masks.mean()).item() - 0.3) < 0.02                      # 3 sigma = 0.019
    assert 0.25 < (1 - masks.mean(0)).min() and (1 - masks.mean(0)).max() < 0.35   # every layer alike
    for weights in ("meta_net", "equal", "free"):
        cfg, data, model, method = make_method(synthetic, {"ll.weights": weights, "depth": 6, "momentum": 0.0,
                                                           "weight_decay": 0.0})
        method.setup(context(model, data, cfg))
        method.draw_mask = lambda: torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
        before = [p.detach().clone() for p in method.net.heads.parameters()]
        streams = data.streams()
        metrics = method.step(streams.batch("train", 0), streams.batch("meta", 0), 0.1)
        assert all(torch.is_tensor(v) and not v.requires_grad for v in metrics.values()), metrics
        moved = [not torch.equal(a, b) for a, b in zip(before, method.net.heads.parameters())]
        assert moved[4:6] == [False, False], weights                  # head 3's weight and bias
        if weights != "free":                                          # (free weights may be 0 by themselves)
            assert all(moved[:4] + moved[6:]), weights


def test_cross_validation_loop_rotates_folds_and_never_meta_trains_on_the_step_batch(synthetic):
    fold = fold_of_examples(103, 4, seed=0)
    assert sorted(torch.bincount(fold).tolist()) == [25, 26, 26, 26]
    cfg, data, model, method = make_method(synthetic, {"ll.cv_folds": 4, "ll.cv_every": 0.25, "epochs": 2.0})
    assert not method.uses_meta                                  # meta batches come from the folds
    seen = []

    def record(step, metrics):
        t = step - 1
        f = method.held_out_fold(t)
        seen.append((t, f, method.last_train_idx.clone(), method.last_meta_idx.clone()))
    train(method, model, data, cfg, progress=False, on_step=record)
    assert method.cv_steps == 2 and len(seen) == 16
    for t, f, train_idx, meta_idx in seen:
        assert (method.fold[meta_idx] == f).all() and len(meta_idx) == len(meta_idx.unique())
        assert (method.fold[train_idx] != f).all() and 16 <= len(train_idx) < 32
        assert not set(train_idx.tolist()) & set(meta_idx.tolist())
    folds = [f for t, f, *_ in seen]
    assert folds == [0, 0, 1, 1, 2, 2, 3, 3] * 2                 # rotates every cv_every epochs
    assert not torch.equal(seen[0][3], seen[1][3])               # fresh meta batches within a period


def test_equal_dropout_cv_arm_trains_on_the_meta_arms_examples_with_its_masks_and_weight_one(synthetic):
    """meta vs equal_dropout_cv isolates the learned weights: both drop the held-out fold from every
    batch (the same examples train, step by step) and both mask local losses with ll.dropout;
    equal_dropout_cv draws no meta batch and keeps every weight at 1."""
    from metabook.methods.local_losses import ARMS
    overrides = {"ll.cv_folds": 4, "ll.cv_every": 0.25, "epochs": 2.0, "ll.dropout": 0.5}
    seen = {}
    for arm in ("meta", "equal_dropout_cv"):
        cfg, data, model, method = make_method(synthetic, {**overrides, **ARMS[arm].changes})
        steps = seen[arm] = []
        train(method, model, data, cfg, progress=False,
              on_step=lambda step, metrics: steps.append((method.last_train_idx.clone(), method.last_meta_idx)))
        seen[arm + "_extras"] = method.extras(None)
    assert len(seen["meta"]) == len(seen["equal_dropout_cv"]) == 16
    for (idx_meta, meta_idx), (idx_equal, none) in zip(seen["meta"], seen["equal_dropout_cv"]):
        assert torch.equal(idx_meta, idx_equal) and len(idx_equal) < 32      # a fold held out of each batch
        assert meta_idx is not None and none is None
    extras = seen["equal_dropout_cv_extras"]
    assert extras["cv_folds"] == 4 and extras["weights_mode"] == "equal"
    assert all(w == [1.0] * 3 for w in extras["trace"]["weights"])
    assert 0.2 < sum(extras["trace"]["kept"]) / len(extras["trace"]["kept"]) < 0.8   # dropout 0.5 applied


class HarmfulLayer(LocalLosses):
    """The local loss of layer 2 (of 3) is *minus* cross-entropy: descending it removes class
    information from blocks 1-2 (deep supervision), so it works against the global loss and the
    meta-learner should turn it off."""

    @staticmethod
    def loss_fn(outs, y):
        return torch.stack([-F.cross_entropy(o, y) if l == 1 else F.cross_entropy(o, y) for l, o in enumerate(outs)])


def tiny_images(n_train=240, n_meta=60, seed=0):
    """3 classes of 8x8 colour patterns plus noise: (x, y) to train on, (xm, ym) a meta batch."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(3, 3, 8, 8, generator=g)
    y, ym = torch.arange(n_train) % 3, torch.arange(n_meta) % 3
    return (patterns[y] + 1.5 * torch.randn(n_train, 3, 8, 8, generator=g), y,
            patterns[ym] + 1.5 * torch.randn(n_meta, 3, 8, 8, generator=g), ym)


def toy_method(cls, weights, epochs, seed=0, **overrides):
    """The method on a depth-4 DeepCNN for 8x8 images, driven by hand (no streams: no CV loop)."""
    cfg = chapter_config("local_losses", "smoke", {"ll.weights": weights, "ll.meta_lr": 0.005, "ll.dropout": 0.0,
                                                   "ll.cv_folds": 0, "epochs": float(epochs), "lr": 0.05,
                                                   **overrides})
    torch.manual_seed(seed)
    model = DeepCNN(depth=4, width=4, num_classes=3)
    method = cls(cfg)
    method.setup(Context(model, None, total_steps=6 * epochs, steps_per_epoch=6, num_classes=3, num_train=240))
    return method


def weight_trace(cls, weights, epochs=10, seed=0):
    x, y, xm, ym = tiny_images(seed=seed)
    method = toy_method(cls, weights, epochs, seed)
    meta = Batch(xm, ym, torch.arange(len(ym)))
    for epoch in range(epochs):
        for b in torch.randperm(len(y)).split(40):
            method.step(Batch(x[b], y[b], b), meta, 0.05)
    trace = torch.tensor(method.extras(None)["trace"]["weights"])      # (rows, K=3)
    return trace[len(trace) // 2:].mean(0)                               # mean over the second half


def weight_range(meta_lr, epochs=5, **overrides):
    """Smallest and largest weight any step of a short toy run (30 steps) gave a layer."""
    x, y, xm, ym = tiny_images()
    method = toy_method(LocalLosses, "meta_net", epochs, **{"ll.meta_lr": meta_lr, **overrides})
    meta, lo, hi = Batch(xm, ym, torch.arange(len(ym))), 1.0, 1.0
    for epoch in range(epochs):
        for b in torch.randperm(len(y)).split(40):
            metrics = method.step(Batch(x[b], y[b], b), meta, 0.05)
            lo, hi = min(lo, metrics["w_min"].item()), max(hi, metrics["w_max"].item())
    return lo, hi


@pytest.mark.parametrize("balancer_in", ["stats", "outputs"])
def test_weights_move_at_the_chosen_step_size_and_not_at_the_old_one(balancer_in):
    """Issue 18: at ll.meta_lr = 0.001 the weights never left about [0.9, 1.1] on CIFAR. At the
    presets' step size they leave [0.95, 1.05] within 30 toy steps, for both balancer inputs; at
    0.001 the loss-statistics balancer's do not. (The outputs balancer, with K*C inputs, already
    leaves that band at 0.001 on the toy: 0.92-1.05.)"""
    chosen = LL().meta_lr
    assert all(PRESETS[p].get("ll.meta_lr", chosen) == chosen for p in ("smoke", "cpu", "gpu", "paper"))
    lo, hi = weight_range(chosen, **{"ll.balancer_in": balancer_in})
    assert lo < 0.95 or hi > 1.05, (chosen, lo, hi)
    if balancer_in == "stats":
        lo, hi = weight_range(1e-3, **{"ll.balancer_in": balancer_in})
        assert 0.95 <= lo and hi <= 1.05, (lo, hi)


def test_weight_trace_rows_are_window_means_and_diagnostics_close_the_open_window():
    x, y, xm, ym = tiny_images()
    method = toy_method(LocalLosses, "equal", epochs=50, **{"ll.dropout": 0.5})    # 300 steps: windows of 3
    masks, draw = [], method.draw_mask
    method.draw_mask = lambda: masks.append(draw()) or masks[-1]
    meta = Batch(xm, ym, torch.arange(len(ym)))
    for s in range(4):
        method.step(Batch(x[40 * s:40 * s + 40], y[40 * s:40 * s + 40], torch.arange(40 * s, 40 * s + 40)), meta, 0.05)
    assert method.trace["step"] == [] and len(method.rows) == 1             # nothing read out in step()
    diag = method.diagnostics(None)
    trace = method.trace
    assert trace["step"] == [3, 4] and trace["epoch"] == [0.5, 4 / 6]        # the open window closed at 4
    kept = torch.stack(masks).mean(1)
    assert trace["kept"] == pytest.approx([kept[:3].mean().item(), kept[3].item()], abs=1e-6)
    assert trace["weights"] == [[1.0] * 3] * 2 and diag["kept"] == trace["kept"][-1]
    assert method.diagnostics(None) == diag and len(trace["step"]) == 2      # no new step: no new row


def test_meta_learned_weight_of_a_harmful_local_loss_goes_to_zero():
    """Behaviour: the same run with layer 2's local loss clean and harmful (HarmfulLayer).
    (The free L2RW weights, summing to 1, fail this test, measured: second-half means 0.13, 0.05,
    0.59 with the harmful loss: it gets the least, but the useful ones stay far below 0.5.)"""
    clean, harmful = weight_trace(LocalLosses, "meta_net"), weight_trace(HarmfulLayer, "meta_net")
    assert clean[1] > 0.5, clean.tolist()                              # a useful loss keeps its weight
    assert harmful[1] < 0.1 and harmful[[0, 2]].min() > 0.5, harmful.tolist()


def test_killed_run_resumes_bitwise(synthetic, tmp_path):
    overrides = {"ll.dropout": 0.3, "ll.cv_folds": 3, "ll.cv_every": 0.5, "epochs": 2.0, "checkpoint_every": 4}

    def run(out_dir=None, on_step=None):
        cfg, data, model, method = make_method(synthetic, overrides)
        res = train(method, model, data, cfg, out_dir=out_dir, progress=False, on_step=on_step)
        return model, method, res

    model_a, method_a, full = run()

    with pytest.raises(Killed):
        run(tmp_path, kill_at(10))
    assert (tmp_path / "checkpoint.pt").exists()
    model_b, method_b, resumed = run(tmp_path)
    assert resumed["metrics"] == full["metrics"]
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(method_a.net.heads.parameters(), method_b.net.heads.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(method_a.balancer.parameters(), method_b.balancer.parameters()):
        assert torch.equal(a, b)
    assert method_a.extras(None) == method_b.extras(None)
    assert resumed["history"] == [{**r, "elapsed_s": s["elapsed_s"]} for r, s in zip(full["history"], resumed["history"])]


def test_bad_config_values_name_the_valid_choices():
    with pytest.raises(ConfigError, match="meta_net, free, equal"):
        chapter_config("local_losses", "smoke", {"ll.weights": "learned"})
    with pytest.raises(ConfigError, match="jvp, fd"):
        chapter_config("local_losses", "smoke", {"ll.mode": "exact"})
    with pytest.raises(ConfigError, match="ll.mode=jvp"):
        LocalLosses(chapter_config("local_losses", "smoke", {"ll.detach": True, "ll.mode": "fd"}))
    with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
        chapter_config("local_losses", "smoke", {"ll.dropout": 1.0})
    with pytest.raises(ConfigError, match="sum_k, sigmoid"):
        chapter_config("local_losses", "smoke", {"ll.norm": "softmax"})
    with pytest.raises(ConfigError, match="stats, outputs"):
        chapter_config("local_losses", "smoke", {"ll.balancer_in": "features"})
    with pytest.raises(ConfigError, match="ll.arms=.*baseline, skips, equal, equal_dropout_cv, free, meta, .*meta_detached$") as err:
        chapter_config("local_losses", "smoke", {"ll.arms": "baseline,meta,mwn"})
    assert "\n" not in str(err.value)
    assert chapter_config("local_losses", "smoke", {"ll.arms": "meta, baseline"})["ll.arms"] == ["meta", "baseline"]
    assert chapter_config("local_losses", "smoke", {"ll.arms": ["meta", "baseline"]})["ll.arms"] == ["meta", "baseline"]
    from metabook.methods import local_losses
    with pytest.raises(ConfigError, match="baseline and meta are required"):     # before any arm runs
        local_losses.run(chapter_config("local_losses", "smoke", {"ll.arms": "baseline,equal"}), [0], progress=False)


def test_chapter_run_records_all_arms_weight_traces_and_cost(synthetic, tmp_path):
    from metabook import run_chapter
    rec = run_chapter("local_losses", "smoke", seeds=[0], out_dir=tmp_path, progress=False, dataset=synthetic,
                      overrides={**TINY, "ll.dropout": 0.25, "ll.cv_folds": 4, "ll.meta_lrs": [0.03]})
    learned = ("equal", "equal_dropout_cv", "free", "meta", "meta_outputs", "meta_sigmoid", "meta_nodrop",
               "meta_nocv", "equal_detached", "meta_detached", "meta_lr=0.03")
    assert set(rec["arms"]) == {"baseline", "skips", *learned, "baseline_same_time"}
    assert rec["method"] == "meta" and rec["reference_arm"] == "baseline"
    arms = rec["arms"]
    bought, trained, ratio = same_time_budget(tmp_path, "meta")      # meta's time at the side-by-side ratio
    assert ratio > 1 and trained == pytest.approx(bought, rel=1e-9)
    assert rec["arm_configs"]["skips"] == {"model": "res_cnn"}
    assert rec["arm_configs"]["meta_lr=0.03"] == {"ll.weights": "meta_net", "ll.meta_lr": 0.03}
    assert set(rec["meta_gap"]) == set(rec["arms"])
    for arm in learned:
        extras = rec["arms"][arm]["extras"]["0"]
        weights = torch.tensor(extras["trace"]["weights"])                 # (steps, layers)
        assert weights.shape == (8, 3), arm
        if arm == "free":                                                  # L2RW: sum 1, or 0 on a step
            assert (weights.sum(1) <= 1 + 1e-6).all(), arm                 # where no layer helps
        elif arm == "meta_sigmoid":
            assert ((weights > 0) & (weights < 2)).all(), arm
        else:
            assert torch.allclose(weights.mean(1), torch.ones(8)), arm
    assert arms["meta_lr=0.03"]["extras"]["0"]["meta_lr"] == 0.03
    assert arms["meta_outputs"]["extras"]["0"]["balancer_in"] == "outputs"
    assert rec["arms"]["meta"]["extras"]["0"]["cv_folds"] == 4
    assert rec["arms"]["equal_dropout_cv"]["extras"]["0"]["cv_folds"] == 4
    assert rec["arms"]["meta_nocv"]["extras"]["0"]["cv_folds"] == 0
    assert rec["arms"]["meta_detached"]["extras"]["0"]["detach"] is True
    assert (tmp_path / "result.json").exists()
