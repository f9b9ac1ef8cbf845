"""The one-step-lookahead meta-gradient: finite differences, a closed form, BatchNorm safety."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import tiny_bn_net, weighted_problem
from metabook.meta import forward, lookahead_params, meta_gradient, model_params


def outer_after_step(model, w, x, y, xm, ym, lr):
    """The outer loss as a plain function of the example weights w (no meta machinery)."""
    params = model_params(model)
    inner = (w * F.cross_entropy(forward(model, params, x), y, reduction="none")).sum()
    grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
    fast = lookahead_params(params, grads, lr)
    return F.cross_entropy(forward(model, fast, xm), ym)


def test_meta_gradient_matches_central_finite_differences_in_float64():
    model, lr = tiny_bn_net(), 0.3
    x, y, xm, ym = weighted_problem()
    w = torch.full((8,), 1 / 8, dtype=torch.float64, requires_grad=True)
    grads, info = meta_gradient(
        model, lambda p: (w * F.cross_entropy(forward(model, p, x), y, reduction="none")).sum(),
        lambda p: F.cross_entropy(forward(model, p, xm), ym), [w], lr)
    h, fd = 1e-6, torch.zeros(8, dtype=torch.float64)
    for i in range(8):
        e = torch.zeros(8, dtype=torch.float64)
        e[i] = h
        with torch.enable_grad():
            fd[i] = (outer_after_step(model, w.detach() + e, x, y, xm, ym, lr)
                     - outer_after_step(model, w.detach() - e, x, y, xm, ym, lr)) / (2 * h)
    # tolerance: relative 1e-6 of the gradient's scale (central differences are O(h^2) ~ 1e-12)
    assert torch.allclose(grads[0], fd, rtol=1e-6, atol=1e-9 * fd.abs().max().item())
    assert fd.abs().max() > 1e-4                                  # the check is not vacuous


def test_meta_gradient_of_a_loss_network_matches_finite_differences():
    """Meta-parameters inside a module (as in learned-loss methods), not only example weights."""
    model, lr = tiny_bn_net(), 0.2
    x, y, xm, ym = weighted_problem()
    torch.manual_seed(3)
    loss_net = nn.Sequential(nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 1)).double()
    inner = lambda p: loss_net(F.softmax(forward(model, p, x), 1) * F.one_hot(y, 3)).mean()
    outer = lambda p: F.cross_entropy(forward(model, p, xm), ym)
    phi = list(loss_net.parameters())
    grads, _ = meta_gradient(model, inner, outer, phi, lr)
    target, h = phi[0], 1e-6
    for idx in [(0, 0), (2, 1), (3, 2)]:
        with torch.no_grad():
            target[idx] += h
        up = _outer_value(model, inner, outer, lr)
        with torch.no_grad():
            target[idx] -= 2 * h
        down = _outer_value(model, inner, outer, lr)
        with torch.no_grad():
            target[idx] += h
        assert abs(grads[0][idx].item() - (up - down) / (2 * h)) < 1e-7 + 1e-6 * abs(grads[0][idx].item())


def _outer_value(model, inner, outer, lr):
    params = model_params(model)
    g = torch.autograd.grad(inner(params), list(params.values()))
    return outer(lookahead_params(params, g, lr)).item()


def test_meta_gradient_matches_the_closed_form_for_linear_regression():
    """inner = 1/B sum_i w_i (x_i.theta - y_i)^2 / 2, outer = 1/M sum_j (x'_j.theta' - y'_j)^2 / 2:
    d outer / d w_i = -lr / B * r_i * <v, x_i>,  r_i = x_i.theta - y_i,  v = grad outer(theta')."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    xm, ym = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    w = torch.rand(10, dtype=torch.float64, requires_grad=True)
    lr = 0.1
    inner = lambda p: (w * (forward(model, p, x).squeeze(1) - y) ** 2).mean() / 2
    outer = lambda p: ((forward(model, p, xm).squeeze(1) - ym) ** 2).mean() / 2
    grads, _ = meta_gradient(model, inner, outer, [w], lr)

    theta = model.weight.detach().flatten()
    r = x @ theta - y
    theta_new = theta - lr * (w.detach() * r) @ x / 10
    v = ((xm @ theta_new - ym) @ xm) / 7
    closed = -lr / 10 * r * (x @ v)
    assert torch.allclose(grads[0], closed, rtol=1e-12, atol=1e-14)


def test_virtual_step_leaves_batchnorm_running_stats_and_weights_untouched():
    model = tiny_bn_net()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y, xm, ym = weighted_problem()
    w = torch.ones(8, dtype=torch.float64, requires_grad=True)
    meta_gradient(model, lambda p: (w * F.cross_entropy(forward(model, p, x), y, reduction="none")).mean(),
                  lambda p: F.cross_entropy(forward(model, p, xm), ym), [w], 0.1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    model(x)                                               # a real forward does update them
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])


def test_first_order_finite_difference_approximates_the_exact_meta_gradient():
    model, lr = tiny_bn_net(), 0.3
    x, y, xm, ym = weighted_problem()
    w = torch.full((8,), 1 / 8, dtype=torch.float64, requires_grad=True)
    inner = lambda p: (w * F.cross_entropy(forward(model, p, x), y, reduction="none")).sum()
    outer = lambda p: F.cross_entropy(forward(model, p, xm), ym)
    exact, _ = meta_gradient(model, inner, outer, [w], lr)
    approx, _ = meta_gradient(model, inner, outer, [w], lr, first_order=True, fd_eps=1e-4)
    cos = F.cosine_similarity(exact[0], approx[0], dim=0)
    assert cos > 0.999
    assert torch.allclose(exact[0], approx[0], rtol=1e-3, atol=1e-6)


def test_zero_inner_learning_rate_gives_zero_meta_gradient():
    model = tiny_bn_net()
    x, y, xm, ym = weighted_problem()
    w = torch.ones(8, dtype=torch.float64, requires_grad=True)
    grads, _ = meta_gradient(model, lambda p: (w * F.cross_entropy(forward(model, p, x), y, reduction="none")).mean(),
                             lambda p: F.cross_entropy(forward(model, p, xm), ym), [w], 0.0)
    assert torch.count_nonzero(grads[0]) == 0


def test_forward_mode_example_weight_gradient_equals_the_double_backward():
    """-lr * J_l v computed by one JVP must equal the exact meta-gradient (float64, BatchNorm)."""
    from metabook.meta import example_weight_meta_gradient
    model, lr = tiny_bn_net(), 0.3
    x, y, xm, ym = weighted_problem()
    eps = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    (exact,), _ = meta_gradient(model, lambda p: (eps * F.cross_entropy(forward(model, p, x), y, reduction="none")).sum(),
                                lambda p: F.cross_entropy(forward(model, p, xm), ym), [eps], lr)
    params = model_params(model)
    v = torch.autograd.grad(F.cross_entropy(forward(model, params, xm), ym), list(params.values()))
    jvp, losses = example_weight_meta_gradient(model, params, x, y, v, lr, mode="jvp")
    assert torch.allclose(jvp, exact, rtol=1e-10, atol=1e-14)
    assert losses.requires_grad                                    # reusable for the real step
    fd, _ = example_weight_meta_gradient(model, params, x, y, v, lr, mode="fd", fd_eps=1e-6)
    assert torch.allclose(fd, exact, rtol=1e-4, atol=1e-8)


def test_reweighting_step_modes_take_the_same_step():
    from metabook.meta import reweighting_step
    x, y, xm, ym = weighted_problem()
    results = {}
    for mode in ("exact", "jvp"):
        model = tiny_bn_net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        out = reweighting_step(model, opt, x, y, xm, ym, lr=0.1, mode=mode)
        results[mode] = (out["weights"], [p.detach().clone() for p in model.parameters()],
                         model[1].running_mean.clone())
    assert torch.allclose(results["exact"][0], results["jvp"][0], atol=1e-12)
    for a, b in zip(results["exact"][1], results["jvp"][1]):
        assert torch.allclose(a, b, atol=1e-12)
    assert torch.allclose(results["exact"][2], results["jvp"][2])  # running stats updated once, alike
    assert results["jvp"][2].abs().sum() > 0


def test_reweighting_gives_corrupted_examples_less_weight():
    """Behaviour: on separable data with flipped labels, the meta step down-weights the flips."""
    from metabook.meta import reweighting_step
    torch.manual_seed(0)
    centers = torch.randn(3, 5, dtype=torch.float64) * 3
    y = torch.arange(60) % 3
    x = centers[y] + 0.3 * torch.randn(60, 5, dtype=torch.float64)
    flipped = torch.arange(60) < 15
    y_noisy = torch.where(flipped, (y + 1) % 3, y)
    ym = torch.arange(30) % 3
    xm = centers[ym] + 0.3 * torch.randn(30, 5, dtype=torch.float64)
    model = tiny_bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = torch.zeros(60, dtype=torch.float64)
    for _ in range(10):
        w += reweighting_step(model, opt, x, y_noisy, xm, ym, lr=0.1)["weights"]
    assert w[flipped].mean() < 0.25 * w[~flipped].mean()


def test_meta_gradients_stay_full_precision_inside_bf16_autocast():
    """A mixed-precision loop may wrap a meta step in autocast: meta_gradient and the forward-mode
    example-weight meta-gradient must then give exactly their full-precision float32 numbers (the
    first matches float64 central finite differences), while an unguarded forward in the same context is
    visibly bf16."""
    from metabook.meta import example_weight_meta_gradient

    model64, lr = tiny_bn_net(), 0.3
    x64, y, xm64, ym = weighted_problem()
    model, x, xm = model64.float(), x64.float(), xm64.float()
    model64 = tiny_bn_net()

    params = model_params(model)
    v = torch.autograd.grad(F.cross_entropy(forward(model, params, xm), ym), list(params.values()))

    def both():
        w = torch.full((8,), 1 / 8, requires_grad=True)
        (g,), _ = meta_gradient(model, lambda p: (w * F.cross_entropy(forward(model, p, x), y, reduction="none")).sum(),
                                lambda p: F.cross_entropy(forward(model, p, xm), ym), [w], lr)
        jvp, _ = example_weight_meta_gradient(model, params, x, y, v, lr, mode="jvp")
        return g, jvp

    plain = both()
    with torch.autocast("cpu", torch.bfloat16):
        inside = both()
        unguarded = forward(model, params, x)
    assert unguarded.dtype == torch.bfloat16                        # the context is live
    for a, b in zip(plain, inside):
        assert torch.equal(a, b)
    h, fd = 1e-6, torch.zeros(8, dtype=torch.float64)
    w = torch.full((8,), 1 / 8, dtype=torch.float64)
    for i in range(8):
        e = torch.zeros(8, dtype=torch.float64)
        e[i] = h
        fd[i] = (outer_after_step(model64, w + e, x64, y, xm64, ym, lr)
                 - outer_after_step(model64, w - e, x64, y, xm64, ym, lr)) / (2 * h)
    assert torch.allclose(inside[0].double(), fd, rtol=1e-3, atol=1e-5 * fd.abs().max().item())
