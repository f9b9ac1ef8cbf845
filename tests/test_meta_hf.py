"""Hessian-free optimisation: Gauss-Newton products against the explicit matrix, CG, damping,
one HF step against SGD, bitwise resume, config errors; MLHF: its meta-gradient against central
finite differences, meta-training on a tiny problem, the untrained nets = HF with Levenberg-Marquardt
damping, the learned damping bounded by LM's direction and MLHF's ceiling, deployment = the
meta-training unroll, meta-training batches from their own stream, NaN handling, bitwise resume
(also from the checkpoint written after meta-training), the chapter's arms; the ablation arms
(hf_same_cg, mlhf_untrained) and the official code's MLHF: its solve, its two meta-gradients
against finite differences, its meta split, replay and resume."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import jacrev

from helpers import Killed, kill_at, same_time_budget, tiny_bn_net, weighted_problem
from metabook import ConfigError, chapter_config
from metabook.config import make_config
from metabook.data import Batch, make_synthetic
from metabook.meta import forward, model_params
from metabook.methods.baseline import Baseline
from metabook.methods import meta_hf
from metabook.methods.meta_hf import (DAMPING_MIN, MLHF, MLHF_DAMPING_MAX, DampingRNN, GaussNewton, HessianFree,
                                      MetaTrainConfig, MLHFNets, MLHFSettings, OptState, flatten, fresh_theta,
                                      lm_damping, meta_train, mlhf_features, mlhf_step, pcg, unflatten, unroll)
from metabook.train import Context, NonFiniteError, make_model, prepare_data, seed_everything, train


def context(model, streams=None, n=64):
    """A Context for driving a method by hand on a tiny problem (no loop, no data set)."""
    return Context(model, streams, total_steps=100, steps_per_epoch=10, num_classes=3, num_train=n)


def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def explicit_gauss_newton(model, x, y, weight_decay=0.0):
    """G = J^T H J + wd I as a (P, P) matrix: J (B*C, P) from jacrev, H block-diagonal."""
    params = {k: p.detach() for k, p in model_params(model).items()}
    jac = jacrev(lambda p: forward(model, p, x))(params)                     # name -> (B, C, *shape)
    B, C = len(y), 3
    J = torch.cat([j.reshape(B * C, -1) for j in jac.values()], dim=1)        # (B*C, P)
    p = F.softmax(forward(model, params, x), 1).detach()
    H = torch.block_diag(*[torch.diag(p[i]) - torch.outer(p[i], p[i]) for i in range(B)]) / B
    return J.T @ H @ J + weight_decay * torch.eye(J.shape[1], dtype=J.dtype)


@pytest.mark.parametrize("linear", [True, False], ids=["linearized", "jvp"])
@pytest.mark.parametrize("make", [tiny_mlp, tiny_bn_net])
def test_gauss_newton_product_equals_the_explicit_gauss_newton_matrix_times_v(make, linear):
    model = make()
    x, y, _, _ = weighted_problem()
    params = model_params(model)
    before = {k: b.clone() for k, b in model.named_buffers()}
    G = explicit_gauss_newton(model, x, y, weight_decay=0.01)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        v = torch.randn(G.shape[0], generator=g, dtype=torch.float64)
        gv = GaussNewton(model, params, x, y, weight_decay=0.01, linear=linear)(v)
        assert (gv - G @ v).abs().max() < 1e-10 * max(1.0, (G @ v).abs().max().item())
    assert (G - 0.01 * torch.eye(len(G), dtype=G.dtype)).abs().max() > 1e-3     # not vacuous
    for k, b in model.named_buffers():                                         # BatchNorm untouched
        assert torch.equal(before[k], b), k


def test_linearized_gauss_newton_products_are_the_jvp_products_bitwise_and_differentiable_in_v():
    """The linearized J v (traced once, then no forward pass) gives the numbers of a `jvp` per
    product, to the bit, on the chapter's CUDA-convnet (LRN, max-pooling) in float32, and passes
    gradients to v as MLHF's unroll needs."""
    from metabook.models import CudaConvnet

    torch.manual_seed(0)
    model = CudaConvnet(num_classes=10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    params = model_params(model)
    lin, ref = GaussNewton(model, params, x, y, 5e-4, linear=True), GaussNewton(model, params, x, y, 5e-4, linear=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(sum(p.numel() for p in params.values()), generator=g)
        assert torch.equal(lin(v), ref(v)) and lin(v).abs().max() > 0
    v1, v2 = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    grads = [torch.autograd.grad(G.jv(w).square().sum(), w)[0] for G, w in ((lin, v1), (ref, v2))]
    assert torch.equal(*grads) and grads[0].abs().max() > 0


def test_gauss_newton_linearizes_only_after_a_slow_second_product_and_never_under_a_graph(monkeypatch):
    """Products are timed `jvp`s; a slow second one (slower than LINEARIZE_AFTER_S) makes the rest
    linearized, a fast one keeps `jvp` (a trace would cost a small net more than it saves), and a
    product that autograd must see through is always a `jvp`."""
    from metabook.methods import meta_hf

    model = tiny_mlp()
    x, y, _, _ = weighted_problem()
    v = torch.ones(sum(p.numel() for p in model_params(model).values()), dtype=torch.float64)
    fast = GaussNewton(model, model_params(model), x, y)
    for _ in range(3):
        fast(v)
    assert fast.trace is False and fast._linear is None
    monkeypatch.setattr(meta_hf, "LINEARIZE_AFTER_S", -1.0)          # every jvp counts as slow
    slow = GaussNewton(model, model_params(model), x, y)
    first = slow(v)
    assert slow.trace is None and slow._linear is None                 # one jvp decides nothing
    slow(v.requires_grad_(True))                                       # under a graph: a jvp, not counted
    assert slow._jvps == 1
    v = v.detach()
    slow(v)
    assert slow.trace is True and slow._linear is None
    assert torch.equal(slow(v), first) and slow._linear is not None


def test_the_planner_counts_gauss_newton_products_on_a_gpus_path_wherever_it_runs(monkeypatch):
    """A slow product is linearized on the CPU, a GPU keeps `jvp`s; the planner's FLOPs and launches
    price only the GPUs, so while it counts (plan.counted) a product is a `jvp` on any device, and
    the CPU's own path comes back afterwards."""
    from metabook.plan import counted

    monkeypatch.setattr(meta_hf, "LINEARIZE_AFTER_S", -1.0)          # every jvp counts as slow
    model = tiny_mlp()
    x, y, _, _ = weighted_problem()
    v = torch.ones(sum(p.numel() for p in model_params(model).values()), dtype=torch.float64)

    def products(linear=None):
        G = GaussNewton(model, model_params(model), x, y, linear=linear)
        for _ in range(4):
            G(v)
        return G

    jvps, linearized, planned = counted(lambda: products(False)), counted(lambda: products(True)), counted(products)
    assert (planned.flops, planned.launches) == (jvps.flops, jvps.launches)
    assert linearized.launches != jvps.launches                        # the two paths differ in what they count
    assert products().trace is True and products()._linear is not None  # not counting: the CPU's path


def test_gauss_newton_equals_the_hessian_for_linear_softmax_regression():
    """Logits linear in theta: the Gauss-Newton matrix is the exact Hessian (checks H_L itself)."""
    torch.manual_seed(1)
    model = nn.Linear(5, 3).double()
    x, y, _, _ = weighted_problem()
    params = {k: p.detach() for k, p in model_params(model).items()}
    shapes = {k: p.shape for k, p in params.items()}

    def loss(flat):
        return F.cross_entropy(forward(model, unflatten(flat, params), x), y)

    H = torch.func.hessian(loss)(flatten(params))
    G = torch.stack([GaussNewton(model, params, x, y)(e) for e in torch.eye(len(H), dtype=torch.float64)], 1)
    assert torch.allclose(G, H, atol=1e-12) and H.abs().max() > 1e-2
    assert {k: v.shape for k, v in unflatten(flatten(params), params).items()} == shapes


def test_gauss_newton_is_symmetric_positive_semidefinite_on_a_batchnorm_net():
    model = tiny_bn_net()
    x, y, _, _ = weighted_problem()
    G = GaussNewton(model, model_params(model), x, y)
    g = torch.Generator().manual_seed(3)
    P = len(flatten(G.params))
    for _ in range(5):
        u, v = torch.randn(2, P, generator=g, dtype=torch.float64)
        assert abs(u @ G(v) - v @ G(u)) < 1e-12 * (1 + abs(u @ G(v)))
        assert v @ G(v) >= -1e-14
    assert torch.linalg.eigvalsh(explicit_gauss_newton(model, x, y)).min() > -1e-12


def test_fisher_diagonal_with_chunk_one_is_the_mean_of_squared_per_example_gradients():
    model = tiny_bn_net()
    x, y, _, _ = weighted_problem()
    params = model_params(model)
    losses = F.cross_entropy(forward(model, params, x), y, reduction="none")
    per_example = torch.stack([flatten(torch.autograd.grad(losses[i], list(params.values()), retain_graph=True))
                               for i in range(len(y))])                        # (B, P), BN-coupled
    G = GaussNewton(model, params, x, y)
    assert torch.allclose(G.fisher_diagonal(1), (per_example ** 2).mean(0), atol=1e-14)
    # chunks of 4: 4 * (mean gradient of the chunk)^2, averaged
    chunks = per_example.view(2, 4, -1).mean(1)
    assert torch.allclose(G.fisher_diagonal(4), 4 * (chunks ** 2).mean(0), atol=1e-14)


def spd(n, seed, scales=None):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = Q @ Q.T / n + 0.5 * torch.eye(n, dtype=torch.float64)
    if scales is not None:
        A = scales[:, None] * A * scales[None, :]
    return A, torch.randn(n, generator=g, dtype=torch.float64)


def test_pcg_solves_a_small_spd_system_and_keeps_backtracking_iterates():
    A, b = spd(30, 0)
    res = pcg(lambda v: A @ v, b, max_iters=200, tol=0.0, rtol=1e-12)
    assert res.stop == "residual" and res.iters <= 60
    assert torch.allclose(res.x, torch.linalg.solve(A, b), atol=1e-9)
    assert res.phi == pytest.approx((0.5 * res.x @ A @ res.x - b @ res.x).item(), rel=1e-10)
    saved = [i for i, _, _ in res.iterates]
    assert saved[:5] == [1, 2, 3, 4, 5] and saved[-1] == res.iters and saved == sorted(set(saved))
    phis = [phi for _, _, phi in res.iterates]
    assert all(a >= b - 1e-12 for a, b in zip(phis, phis[1:])) and phis[0] > phis[-1]   # CG decreases phi
    # warm start from the solution: nothing left to do
    assert pcg(lambda v: A @ v, b, x0=res.x, max_iters=5, tol=0.0, rtol=1e-8).iters <= 1


def test_diagonal_preconditioner_needs_fewer_iterations_on_a_badly_scaled_system():
    scales = torch.logspace(-2, 2, 40, dtype=torch.float64)
    A, b = spd(40, 1, scales)
    plain = pcg(lambda v: A @ v, b, max_iters=1000, tol=0.0, rtol=1e-8)
    pre = pcg(lambda v: A @ v, b, precond=torch.diagonal(A).clone(), max_iters=1000, tol=0.0, rtol=1e-8)
    assert pre.stop == "residual" and pre.iters < plain.iters / 2
    assert torch.allclose(pre.x, torch.linalg.solve(A, b), rtol=1e-5)


def test_martens_rule_stops_cg_once_relative_progress_stalls():
    """An ill-conditioned diagonal system (condition number 1e4): CG needs ~1,000 iterations to
    converge; the rule stops once 10 iterations gain < 0.5% of phi, with most of the decrease made."""
    A, b = torch.diag(torch.logspace(-4, 0, 400, dtype=torch.float64)), torch.ones(400, dtype=torch.float64)
    full = pcg(lambda v: A @ v, b, max_iters=2000, tol=0.0, rtol=1e-12)
    early = pcg(lambda v: A @ v, b, max_iters=2000, tol=5e-4, rtol=0.0)
    assert early.stop == "relative progress" and 10 < early.iters < full.iters / 4
    assert early.phi < 0 and early.phi <= 0.95 * full.phi                   # most of the decrease made


def test_levenberg_marquardt_raises_damping_on_bad_and_lowers_it_on_good_predictions():
    assert lm_damping(1.0, 0.1) == pytest.approx(1.5)
    assert lm_damping(1.0, -1.0) == pytest.approx(1.5)
    assert lm_damping(1.0, 0.9) == pytest.approx(2 / 3)
    assert lm_damping(1.0, 0.5) == 1.0


def knobs(values: dict) -> dict:
    """A full config, every knob at its default except `values` (checked): a method reads its
    whole typed section, so a hand-made config names the values that matter and defaults the rest."""
    return make_config(meta_hf.SECTIONS, {}, {}, "cpu", values)


HF_CFG = knobs({"hf.damping": 1e-3, "hf.damping_rule": "lm", "hf.cg_iters": 50, "hf.cg_tol": 5e-4,
                "hf.precond_exponent": 0.75, "hf.fisher_chunk": 1, "hf.gn_batch_size": 64, "hf.warm_start": 0.95,
                "hf.backtrack": True, "hf.line_search": True, "weight_decay": 0.0})


def softmax_regression_problem(e=0.0):
    """64 examples of 3 overlapping Gaussian classes in 5-D, the features scaled by 10^-e ... 10^e
    (e=1: two orders of magnitude apart, a badly conditioned loss)."""
    g = torch.Generator().manual_seed(4)
    centers = torch.randn(3, 5, generator=g, dtype=torch.float64)
    y = torch.arange(64) % 3
    x = (centers[y] + torch.randn(64, 5, generator=g, dtype=torch.float64))
    x = x * torch.logspace(-e, e, 5, dtype=torch.float64)
    return Batch(x, y, torch.arange(64))


def loss_after_one_step(method, batch):
    """Linear softmax regression from zero weights (loss log 3); the loss after one step."""
    model = nn.Linear(5, 3).double()
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    method.setup(context(model))
    out = method.step(batch, None, 1.0)
    with torch.no_grad():
        return out, F.cross_entropy(model(batch.x), batch.y).item(), model


class SGD(Baseline):
    """Plain SGD (no momentum) at a fixed learning rate, through the baseline's code."""

    def __init__(self, lr):
        super().__init__({"label_smoothing": 0.0, "lr": lr, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0})
        self.lr = lr

    def step(self, batch, meta_batch, _):
        return super().step(batch, meta_batch, self.lr)


def test_one_hf_step_decreases_a_convex_loss_more_than_the_best_sgd_step():
    """On badly scaled features one HF step beats SGD at the best of 15 learning rates (0.01 to
    30) by far, and lands almost where it lands on well-scaled features (Newton's step does not
    care about the scale of the coordinates; SGD's does)."""
    batch = softmax_regression_problem(e=1.0)
    out, hf_loss, model = loss_after_one_step(HessianFree(HF_CFG), batch)
    f0 = torch.log(torch.tensor(3.0, dtype=torch.float64)).item()
    assert out["loss"] == pytest.approx(f0) and out["cg_iters"] >= 2 and out["step_size"] == 1.0
    # rho = (f(d) - f(0)) / (g^T d + 1/2 d^T H d), recomputed here with the exact Hessian at 0
    zero = torch.zeros(18, dtype=torch.float64)
    loss = lambda flat: F.cross_entropy(batch.x @ flat[:15].view(3, 5).T + flat[15:], batch.y)
    g, H = torch.func.grad(loss)(zero), torch.func.hessian(loss)(zero)
    d = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    assert out["rho"] == pytest.approx((hf_loss - f0) / (g @ d + 0.5 * d @ H @ d).item(), rel=1e-9)
    assert out["rho"] > 0.25
    best_sgd = min(loss_after_one_step(SGD(lr), batch)[1] for lr in torch.logspace(-2, 1.5, 15).tolist())
    assert hf_loss < 0.6 * best_sgd, (hf_loss, best_sgd)
    _, hf_well_scaled, _ = loss_after_one_step(HessianFree(HF_CFG), softmax_regression_problem(e=0.0))
    assert abs(hf_loss - hf_well_scaled) < 0.05 and hf_loss < 0.5


def test_hf_step_updates_batchnorm_statistics_exactly_once():
    """Many extra forward passes (G v, trial points), but only the real one touches the buffers."""
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    reference = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    reference.load_state_dict(model.state_dict())
    batch = softmax_regression_problem()
    method = HessianFree({**HF_CFG, "hf.gn_batch_size": 16, "hf.fisher_chunk": 4})
    method.setup(context(model))
    method.step(batch, None, 0.1)
    reference(batch.x)                                                        # one plain forward
    assert model[1].num_batches_tracked.item() == 1
    assert torch.equal(model[1].running_mean, reference[1].running_mean)
    assert torch.equal(model[1].running_var, reference[1].running_var)


TINY = {"dataset": "synthetic", "model": "small_cnn", "train_size": 192, "meta_size": 64, "batch_size": 32, "width": 4,
        "test_size": 100, "epochs": 2.0, "eval_every": 1.0, "hf.cg_iters": 8, "hf.gn_batch_size": 8,
        "hf.fisher_chunk": 4, "checkpoint_every": 3}


def run_hf(overrides=None, out_dir=None, on_step=None, method_class=None):
    """Train the tiny smoke setting with HessianFree (or `method_class`) on synthetic data."""
    cfg = chapter_config("meta_hf", "smoke", {**TINY, **(overrides or {})})
    dataset = make_synthetic(400, 100, seed=0)
    data = prepare_data(cfg, 0, torch.device("cpu"), dataset)
    seed_everything(0)
    model = make_model(cfg, dataset.num_classes, torch.device("cpu"))
    method = (method_class or HessianFree)(cfg)
    res = train(method, model, data, cfg, seed=0, out_dir=out_dir, progress=False, on_step=on_step)
    return model, method, res


def test_killed_hf_run_resumes_bitwise(tmp_path):
    model_a, method_a, full = run_hf()

    with pytest.raises(Killed):
        run_hf(out_dir=tmp_path, on_step=kill_at(8))
    steps = []
    model_b, method_b, resumed = run_hf(out_dir=tmp_path, on_step=lambda s, m: steps.append(s))
    assert steps[0] == 7                                                      # from the step-6 checkpoint
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    sa, sb = method_a.state_dict(), method_b.state_dict()
    assert sa["damping"] == sb["damping"] and torch.equal(sa["prev"], sb["prev"]) and sa["steps"] == sb["steps"] == 12
    timeless = lambda history: [{k: v for k, v in row.items() if k != "elapsed_s"} for row in history]
    assert timeless(resumed["history"]) == timeless(full["history"])
    assert sa["prev"].abs().max() > 0 and sa["damping"] != 1.0       # the state is really used


@pytest.mark.parametrize("key, value, phrase", [("hf.damping_rule", "adaptive", "lm, fixed"),
                                                ("hf.precond_exponent", 2.0, "in [0, 1]"),
                                                ("hf.cg_iters", 0, ">= 1"),
                                                ("hf.mlhf_unroll", 0, ">= 1"),
                                                ("hf.mlhf_fresh_prob", 1.5, "in [0, 1]"),
                                                ("model", "cuda-convnet", "cuda_convnet")])
def test_bad_hf_config_values_raise_config_errors_naming_the_valid_choices(key, value, phrase):
    with pytest.raises(ConfigError, match=rf"{key}.*{phrase}".replace("[", r"\[").replace("]", r"\]")):
        chapter_config("meta_hf", "smoke", {key: value})


def test_chapter_run_records_all_arms_and_the_baseline_at_mlhf_wall_clock(tmp_path):
    """The chapter's run at the smoke preset (shrunk: synthetic data, cuda_convnet at width 4)."""
    import math

    from metabook import run_chapter
    tiny = {**TINY, "model": "cuda_convnet", "train_size": 128, "epochs": 1.0, "hf.cg_iters": 4,
            "hf.mlhf_cg_iters": 3, "hf.mlhf_meta_steps": 2, "hf.mlhf_unroll": 2, "hf.official_meta_steps": 2,
            "hf.official_unroll": 2, "hf.official_cg_iters": 2}
    rec = run_chapter("meta_hf", "smoke", seeds=[0], out_dir=tmp_path, overrides=tiny, progress=False)
    assert set(rec["arms"]) == {"baseline", "adam", "hf", "hf_same_cg", "mlhf_untrained", "mlhf", "mlhf_official",
                                "baseline_same_time"} and rec["method"] == "mlhf"
    assert rec["arms"]["hf_same_cg"]["extras"]["0"]["cg_iters_mean"] == 3.0          # MLHF's K
    assert rec["arms"]["mlhf_untrained"]["extras"]["0"]["meta_episodes"] == 0
    assert rec["arms"]["mlhf_official"]["extras"]["0"]["meta_episodes"] == 2
    assert rec["arms"]["mlhf_official"]["one_off_seconds"]["mean"] > rec["arms"]["mlhf_untrained"]["one_off_seconds"]["mean"]
    # an (ML)HF step holds more than an SGD step (the tensor meter: deterministic, unlike 4 steps' timing)
    peak = {a: rec["arms"][a]["peak_memory_bytes"] for a in ("baseline", "hf", "mlhf")}
    assert peak["hf"] > peak["baseline"] and peak["mlhf"] > peak["baseline"]
    extras = rec["arms"]["hf"]["extras"]["0"]
    assert 1 <= extras["cg_iters_mean"] <= 4 and extras["final_damping"] > 0
    mlhf = rec["arms"]["mlhf"]
    assert math.isfinite(mlhf["test_acc"]["mean"]) and math.isfinite(rec["metrics"]["test_acc"])
    assert all(math.isfinite(row["train_loss"]) for row in mlhf["history"]["0"])
    e = mlhf["extras"]["0"]
    assert e["meta_episodes"] == 2 and e["final_damping"] > 0 and e["meta_loss_first"] is not None
    # meta-training is mlhf's one-off stage (the other arms have none), recorded as meta_train_seconds
    assert mlhf["one_off_seconds"]["mean"] > 0.01 > rec["arms"]["hf"]["one_off_seconds"]["mean"]
    assert rec["cost"]["meta_train_seconds"] == mlhf["one_off_seconds"]["mean"]
    assert "meta_train_seconds" not in mlhf["history"]["0"][0]              # no per-step timing metric
    # the baseline at mlhf's time, meta-training included: the steps that time buys at the step-cost
    # ratio timed side by side (not the two runs' own wall-clocks, which differ under load)
    bought, trained, ratio = same_time_budget(tmp_path, "mlhf")
    assert ratio > 1 and trained == pytest.approx(bought, rel=1e-9)
    assert (tmp_path / "result.json").exists()


@pytest.mark.parametrize("make", [tiny_mlp, tiny_bn_net])
def test_unrolled_pcg_is_differentiable_in_damping_and_preconditioner(make):
    """Groundwork of MLHF: K unrolled CG iterations with G held constant (its products use detached
    parameters); the meta loss after the step must have exact gradients in lambda and in the
    diagonal preconditioner P, the two things MLHF's recurrent nets output."""
    model = make()
    x, y, xm, ym = weighted_problem()
    params = model_params(model)
    g = flatten(torch.autograd.grad(F.cross_entropy(forward(model, params, x), y), list(params.values())))
    G = GaussNewton(model, params, x, y)
    theta = flatten(params).detach()

    def meta_loss(lam, P):
        d = pcg(lambda v: G(v) + lam * v, -g, precond=P, max_iters=5, tol=0.0, rtol=0.0).x
        return F.cross_entropy(forward(model, unflatten(theta + d, params), xm), ym)

    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    P = ((G.fisher_diagonal(1) + 0.3) ** 0.75).requires_grad_(True)
    g_lam, g_P = torch.autograd.grad(meta_loss(lam, P), [lam, P])
    direction = torch.randn(len(P), generator=torch.Generator().manual_seed(5), dtype=torch.float64) * P.detach()
    h = 1e-6
    with torch.no_grad():
        fd_lam = (meta_loss(lam + h, P) - meta_loss(lam - h, P)) / (2 * h)
        fd_P = (meta_loss(lam, P + h * direction) - meta_loss(lam, P - h * direction)) / (2 * h)
    assert abs(fd_lam) > 1e-3 and abs(fd_P) > 1e-4                           # not vacuous
    assert g_lam.item() == pytest.approx(fd_lam.item(), rel=1e-6)
    assert (g_P @ direction).item() == pytest.approx(fd_P.item(), rel=1e-6)


# ----------------------------------------------------------------------------- MLHF

def mlhf_settings(**changes):
    base = dict(cg_iters=4, precond_exponent=0.75, fisher_chunk=1, gn_batch=8, warm_start=0.95,
                weight_decay=0.01, hidden_damping=3, hidden_precond=2, damping0=0.3)
    return MLHFSettings(**{**base, **changes})


def random_nets(s, seed=3):
    """Nets with all weights random (the output layers start at zero, which would make the
    gradients of the GRU weights vanish and the check vacuous)."""
    nets = MLHFNets(s.hidden_damping, s.hidden_precond).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in nets.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return nets


def episode_batches(T, seed=1, n=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(3, (n,), generator=g))
            for _ in range(T + 1)]


def meta_loss_along(nets, direction, h, fn):
    """fn() with the nets' flat weights shifted by h * direction (restored afterwards)."""
    def shift(sign):
        with torch.no_grad():
            i = 0
            for p in nets.parameters():
                p.add_(sign * h * direction[i:i + p.numel()].view_as(p))
                i += p.numel()
    shift(1)
    try:
        return fn()                       # may need autograd itself (the episode's first gradient)
    finally:
        shift(-1)


@pytest.mark.parametrize("make, T", [(tiny_mlp, 1), (tiny_bn_net, 3)])
def test_mlhf_meta_gradient_matches_central_finite_differences(make, T):
    """float64. T = 1: nothing is truncated, so the gradient must be that of the true function
    phi -> log f(theta_1(phi); B_1), checked by differencing the whole episode. T = 3 (BatchNorm
    net, warm-started CG, recurrent states carried over 3 steps): the gradient of the surrogate
    with g_t, G_t, the Fisher diagonal, the features and the CG start held at their recorded
    values (`unroll(..., frozen=records)`), as the docstring of meta_hf's MLHF section defines it."""
    model = make()
    s = mlhf_settings()
    like = {k: p.detach() for k, p in model_params(model).items()}
    theta0 = flatten(like)
    state = OptState.fresh(len(theta0), s.hidden_damping, s.hidden_precond, s.damping0, theta0)
    nets = random_nets(s)
    batches = episode_batches(T)
    loss, _, end, records = unroll(nets, model, like, theta0, state, batches, s)
    grads = torch.autograd.grad(loss, list(nets.parameters()))
    flat = flatten(grads)
    frozen = records if T > 1 else None
    episode = lambda: unroll(nets, model, like, theta0, state, batches, s, frozen=frozen)[0].item()
    assert episode() == pytest.approx(loss.item(), rel=1e-12)                  # the replay is the same function
    h = 1e-6
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        direction = torch.randn(len(flat), generator=gen, dtype=torch.float64)
        fd = (meta_loss_along(nets, direction, h, episode) - meta_loss_along(nets, direction, -h, episode)) / (2 * h)
        assert abs(fd) > 1e-4                                                   # not vacuous
        assert (flat @ direction).item() == pytest.approx(fd, rel=1e-6, abs=1e-10)
    named = dict(zip([n for n, _ in nets.named_parameters()], grads))
    for name in ("damping.cell.weight_ih", "precond.cell.weight_ih", "damping.out.weight", "precond.out.weight"):
        assert named[name].abs().max() > 1e-6, name                             # both nets are in the graph
    assert end.age == T and end.h_precond.shape == (len(theta0), s.hidden_precond)


def test_untrained_mlhf_first_step_is_k_iterations_of_hf_pcg_at_the_initial_damping():
    """The nets' output layers start at zero and a fresh run has no rho yet: lambda is hf.damping
    and P is exactly (F + wd + lambda)^xi, so the direction is K iterations of HF's own PCG.
    (Later steps follow LM: see the next test.)"""
    model = tiny_bn_net()
    s = mlhf_settings()
    x, y, _, _ = weighted_problem()
    params = model_params(model)
    theta = flatten(params).detach()
    g = flatten(torch.autograd.grad(F.cross_entropy(forward(model, params, x), y), list(params.values())))
    g = g + s.weight_decay * theta
    G = GaussNewton(model, params, x, y, s.weight_decay)
    fisher = G.fisher_diagonal(1)
    state = OptState.fresh(len(theta), s.hidden_damping, s.hidden_precond, s.damping0, theta)
    u, X, v = mlhf_features(state, g)
    assert u.shape == (4,) and X.shape == (len(theta), 3) and torch.equal(v, g * g)
    f0 = F.cross_entropy(forward(model, params, x), y).item() + 0.005 * theta.dot(theta).item()
    step, end, _, _ = mlhf_step(MLHFNets(3, 2).double(), state, model, params, x, y, g, f0, s)
    assert end.log_damping.exp().item() == pytest.approx(0.3, rel=1e-12)
    reference = pcg(lambda w: G(w) + 0.3 * w, -g, (fisher + 0.01 + 0.3) ** 0.75, max_iters=4, tol=0.0, rtol=0.0)
    assert torch.allclose(step.d, reference.x, rtol=1e-10, atol=1e-14) and step.cg.iters == 4


def mlhf_cfg(damping, line_search=True, hidden=3):
    """An MLHF plug-in config for the tiny float64 problems: K = 3, no meta-training."""
    return knobs({"hf.mlhf_cg_iters": 3, "hf.precond_exponent": 0.75, "hf.fisher_chunk": 4, "hf.gn_batch_size": 16,
                  "hf.warm_start": 0.95, "weight_decay": 0.0, "hf.mlhf_hidden": hidden, "hf.damping": damping,
                  "hf.mlhf_meta_steps": 0, "hf.mlhf_unroll": 2, "hf.mlhf_meta_lr": 1e-2, "hf.mlhf_replay_size": 2,
                  "hf.mlhf_fresh_prob": 0.5, "hf.mlhf_line_search": line_search})


def deploy_mlhf(method, steps, seed=5):
    """MLHF trains a tiny tanh MLP (float64) on `steps` fresh batches of separable_problem.
    Returns the model, the batches and the step outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    method.setup(context(model))
    gen = torch.Generator().manual_seed(seed)
    batches = [separable_problem(gen) for _ in range(steps + 1)]
    outs = [method.step(Batch(x, y, torch.arange(len(y))), None, None) for x, y in batches[:steps]]
    return model, batches, outs


def test_untrained_mlhf_damping_follows_levenberg_marquardt_step_by_step():
    """Output layers at zero: the deployed MLHF's damping is lm_damping applied to its own rho
    sequence, from hf.damping, step by step (the run sees rho < 1/4, > 3/4 and in between)."""
    method = MLHF(mlhf_cfg(0.1))
    _, _, outs = deploy_mlhf(method, 12)
    lams, rhos = [float(o["damping"]) for o in outs], [o["rho"] for o in outs]
    assert lams[0] == pytest.approx(0.1, rel=1e-12)
    for t in range(1, len(lams)):
        assert lams[t] == pytest.approx(lm_damping(lams[t - 1], rhos[t - 1]), rel=1e-12), t
    assert method.extras(None)["final_damping"] == pytest.approx(lams[-1], rel=1e-12)     # the last one used
    moves = {(b > a) - (b < a) for a, b in zip(lams, lams[1:])}
    assert moves == {-1, 0, 1}, (lams, rhos)                                  # all three LM cases occur


def random_damping_net(hidden, seed, bias=None):
    net = DampingRNN(hidden).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(2.0 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        if bias is not None:
            net.out.bias.fill_(bias)
    return net


@pytest.mark.parametrize("bias", [100.0, -100.0])
def test_learned_damping_never_overturns_lm_direction_and_stays_within_mlhf_bounds(bias):
    """Whatever the net outputs (its tanh saturated either way by an output bias of +-100, or any
    random weights and inputs), rho > 3/4 lowers lambda, rho < 1/4 raises it, in between it moves
    by at most 1.4 either way, and lambda stays in [DAMPING_MIN, MLHF_DAMPING_MAX]."""
    sign = 1.0 if bias > 0 else -1.0
    net = random_damping_net(4, seed=0, bias=bias)
    g = torch.Generator().manual_seed(1)
    u, h = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    ratio = lambda rho, lam=1.0: (net(u, h, torch.tensor(math.log(lam), dtype=torch.float64), rho)[0].exp() / lam).item()
    assert ratio(0.9) == pytest.approx(2 / 3 * 1.4 ** sign, rel=1e-12) and ratio(0.9) < 1
    assert ratio(0.1) == pytest.approx(3 / 2 * 1.4 ** sign, rel=1e-12) and ratio(0.1) > 1
    assert ratio(-5.0) > 1 and ratio(50.0) < 1                            # rho of failed / lucky steps
    assert ratio(0.5) == pytest.approx(1.4 ** sign, rel=1e-12)
    assert ratio(None) == pytest.approx(1.4 ** sign, rel=1e-12)           # first step: no LM change
    # at the bounds: the ceiling holds against rho < 1/4 and a net pushing up, the floor likewise
    top, bottom = ratio(0.1, MLHF_DAMPING_MAX) * MLHF_DAMPING_MAX, ratio(0.9, DAMPING_MIN) * DAMPING_MIN
    assert top == pytest.approx(MLHF_DAMPING_MAX, rel=1e-12) and bottom == pytest.approx(DAMPING_MIN, rel=1e-12)
    assert MLHF_DAMPING_MAX <= 1e4
    # random nets, inputs, states and rho: a long chain never leaves the bounds nor LM's direction
    lam, gen = torch.tensor(0.0, dtype=torch.float64), torch.Generator().manual_seed(2)
    for k in range(300):
        net_k = random_damping_net(4, seed=100 + k % 7, bias=bias if k % 2 else None)
        rho = [0.9, 0.1, 0.5, -3.0, 7.0][k % 5]
        new, _ = net_k(3 * torch.randn(4, generator=gen, dtype=torch.float64),
                       3 * torch.randn(4, generator=gen, dtype=torch.float64), lam, rho)
        assert math.log(DAMPING_MIN) - 1e-9 <= new.item() <= math.log(MLHF_DAMPING_MAX) + 1e-9, k
        if rho > 0.75:
            assert new < lam or new.item() == pytest.approx(math.log(DAMPING_MIN)), k
        elif rho < 0.25:
            assert new > lam or new.item() == pytest.approx(math.log(MLHF_DAMPING_MAX)), k
        else:
            assert abs(new.item() - lam.item()) <= math.log(1.4) + 1e-12, k
        lam = new if k % 50 else torch.tensor(math.log([1e3, 1e-6][k // 50 % 2]), dtype=torch.float64)


@pytest.mark.parametrize("bias", [100.0, -100.0])
def test_deployed_mlhf_with_saturated_damping_net_still_moves_lambda_in_lms_direction(bias):
    """End to end, the deployed plug-in: the damping net's output bias at +-100 (it asks for 1.4x
    more or less damping at every step); lambda still falls after every rho > 3/4 and rises after
    every rho < 1/4."""
    method = MLHF(mlhf_cfg(0.1))
    real_setup = method.setup

    def setup(ctx):
        real_setup(ctx)
        with torch.no_grad():
            method.nets.damping.out.bias.fill_(bias)
    method.setup = setup
    _, _, outs = deploy_mlhf(method, 12)
    lams, rhos = [float(o["damping"]) for o in outs], [o["rho"] for o in outs]
    sign = 1.0 if bias > 0 else -1.0
    assert lams[0] == pytest.approx(0.1 * 1.4 ** sign, rel=1e-12)
    for t in range(1, len(lams)):
        expected = lm_damping(lams[t - 1], rhos[t - 1]) * 1.4 ** sign
        assert lams[t] == pytest.approx(expected, rel=1e-12), t
        if rhos[t - 1] > 0.75:
            assert lams[t] < lams[t - 1], t
        elif rhos[t - 1] < 0.25:
            assert lams[t] > lams[t - 1], t
    assert any(r > 0.75 for r in rhos[:-1]) and any(r < 0.25 for r in rhos[:-1]), rhos


def test_deployed_mlhf_takes_the_same_steps_and_dampings_as_the_meta_training_unroll():
    """With random nets (so the learned terms are not zero) and no line search, training with the
    MLHF plug-in and one meta-training episode over the same batches run the same rule: the same
    rho at every step, the same damping, the same final parameters."""
    method = MLHF(mlhf_cfg(0.1, line_search=False))
    real_setup = method.setup

    def setup(ctx):
        real_setup(ctx)
        method.nets = random_nets(method.s)
        method.theta0 = flatten(model_params(ctx.model)).detach().clone()
    method.setup = setup
    T = 6
    model, batches, outs = deploy_mlhf(method, T)
    like = {k: p.detach() for k, p in model_params(model).items()}
    state = OptState.fresh(len(method.theta0), 3, 3, 0.1, method.theta0)
    _, theta_T, end, records = unroll(method.nets, model, like, method.theta0, state, batches, method.s)
    for t, (o, rec) in enumerate(zip(outs, records)):
        assert o["rho"] == pytest.approx(rec["rho"], rel=1e-9, abs=1e-12), t
    assert end.log_damping.item() == pytest.approx(method.state.log_damping.item(), rel=1e-9)
    assert torch.allclose(theta_T, flatten(model_params(model)).detach(), rtol=1e-9, atol=1e-12)
    lams = [float(o["damping"]) for o in outs]
    assert max(lams) / min(lams) > 1.5 and len(set(lams)) == T                # the damping really moves


def separable_problem(gen, n=32):
    """3 Gaussian classes in 5-D, centres fixed (seed 4), examples from `gen`: float64 (x, y)."""
    centers = 2 * torch.randn(3, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.randint(3, (n,), generator=gen)
    return centers[y] + torch.randn(n, 5, generator=gen, dtype=torch.float64), y


def held_out_episodes(nets, model, s, episodes=6, T=4):
    """Mean meta-loss of `episodes` fixed episodes (fresh initialisations and batches not used in
    meta-training) and the damping at their end."""
    like = {k: p.detach() for k, p in model_params(model).items()}
    gen, total, dampings = torch.Generator().manual_seed(99), 0.0, []
    for e in range(episodes):
        theta0 = fresh_theta(model, 10_000 + e)
        state = OptState.fresh(len(theta0), s.hidden_damping, s.hidden_precond, s.damping0, theta0)
        loss, _, end, _ = unroll(nets, model, like, theta0, state, [separable_problem(gen) for _ in range(T + 1)], s)
        total += loss.item() / episodes
        dampings.append(end.log_damping.exp().item())
    return total, dampings


def test_meta_training_lowers_too_large_damping_and_held_out_episode_loss():
    """Tiny MLP on separable classes, initial damping 10 (far too large: the HF steps are short).
    Untrained, MLHF's damping is LM's, which comes down only by 2/3 per step (10 -> 2.96 in the 4
    held-out steps). Meta-training (20 episodes with replay) must make the net lower it further,
    below 1 (the fastest the bounded correction allows is 10 / 1.4 * (2/3 / 1.4)^3 = 0.77), and
    lower the meta-loss on held-out episodes; the replay buffer must hold states older than one
    episode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    s = mlhf_settings(cg_iters=5, fisher_chunk=4, gn_batch=16, weight_decay=0.0, hidden_damping=4,
                      hidden_precond=4, damping0=10.0)
    torch.manual_seed(1)
    nets = MLHFNets(4, 4).double()
    before, damping_before = held_out_episodes(nets, model, s)
    assert damping_before == pytest.approx([10.0 * (2 / 3) ** 3] * 6)       # untrained: LM, rho > 3/4 at steps 1-3
    gen = torch.Generator().manual_seed(5)
    stats = meta_train(nets, model, lambda i: separable_problem(gen), s,
                       MetaTrainConfig(steps=20, unroll=3, lr=3e-2, replay_size=8, fresh_prob=0.3, seed=0))
    after, damping_after = held_out_episodes(nets, model, s)
    assert max(damping_after) < 1.0, damping_after
    assert after < before - 0.15, (before, after)
    assert len(stats["meta_losses"]) == 20
    assert 1 <= stats["fresh_episodes"] < 20 and stats["replay_age_max"] > 3   # chained episodes


def test_nonfinite_meta_loss_raises_naming_the_episode_and_quantity():
    model = tiny_mlp()
    s = mlhf_settings()
    x, y = episode_batches(1)[0]
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="episode 0: meta_loss is nan"):
        meta_train(MLHFNets(3, 2).double(), model, lambda i: (x, y), s,
                   MetaTrainConfig(steps=2, unroll=1, lr=1e-2, replay_size=2, fresh_prob=0.5, seed=0))


MLHF_TINY = {"hf.mlhf_cg_iters": 3, "hf.mlhf_meta_steps": 3, "hf.mlhf_unroll": 2, "hf.mlhf_replay_size": 2}


def run_mlhf(out_dir=None, on_step=None):
    return run_hf(MLHF_TINY, out_dir, on_step, method_class=MLHF)


@pytest.mark.parametrize("kill, resume_at", [(2, 1), (8, 7)], ids=["after-meta-training", "mid-run"])
def test_killed_mlhf_run_resumes_bitwise_without_meta_training_again(tmp_path, monkeypatch, kill, resume_at):
    """Killed at step 2, the run resumes from the checkpoint written right after prepare()
    (meta-training); at step 8 from the step-6 one. Neither meta-trains again, and both end
    bitwise where the uninterrupted run ends."""
    model_a, method_a, full = run_mlhf()
    real, calls = meta_hf.meta_train, []
    with pytest.raises(Killed):
        run_mlhf(out_dir=tmp_path, on_step=kill_at(kill))
    monkeypatch.setattr(meta_hf, "meta_train", lambda *a, **k: calls.append(1) or real(*a, **k))
    steps = []
    model_b, method_b, resumed = run_mlhf(out_dir=tmp_path, on_step=lambda s, m: steps.append(s))
    assert steps[0] == resume_at and calls == []                # from the checkpoint, no new meta-training
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(method_a.nets.state_dict().items(), method_b.nets.state_dict().values()):
        assert torch.equal(a, b), name
    sa, sb = method_a.state.to_dict(), method_b.state.to_dict()
    for key, a in sa.items():
        assert torch.equal(a, sb[key]) if torch.is_tensor(a) else a == sb[key], key
    timeless = lambda history: [{k: v for k, v in row.items() if k != "elapsed_s"} for row in history]
    assert timeless(resumed["history"]) == timeless(full["history"])
    assert method_a.meta_stats["meta_losses"] == method_b.meta_stats["meta_losses"]
    assert len(method_a.meta_stats["meta_losses"]) == 3 and sa["age"] == 12
    assert sa["h_precond"].abs().max() > 0 and method_a.nets.damping.out.weight.abs().max() > 0   # state is used


def test_meta_training_draws_its_own_stream_of_the_training_split(monkeypatch):
    """prepare() meta-trains on batches i = 0, 1, ... of the stream 'mlhf_episodes' (training
    split, augmented, not the training order) and nothing else; step() works without it."""
    cfg = chapter_config("meta_hf", "smoke", {**TINY, **MLHF_TINY})
    data = prepare_data(cfg, 0, torch.device("cpu"), make_synthetic(400, 100, seed=0))
    streams = data.streams()
    seed_everything(0)
    model = make_model(cfg, 10, torch.device("cpu"))
    seen = []
    real = meta_hf.meta_train

    def spy(nets, model, batch_at, *rest):
        return real(nets, model, lambda i: seen.append(i) or batch_at(i), *rest)
    monkeypatch.setattr(meta_hf, "meta_train", spy)
    method = MLHF(cfg)
    method.setup(Context(model, streams, 12, 6, 10, len(data.train.y), seed=0))
    method.prepare()
    assert seen == list(range(3 * 3)) and len(method.meta_stats["meta_losses"]) == 3     # 3 episodes of T + 1
    x, _ = (lambda b: (b.x, b.y))(streams.batch("mlhf_episodes", 4))
    assert not torch.equal(x, streams.batch("train", 4).x)
    assert torch.isfinite(method.step(streams.batch("train", 0), None, 0.1)["loss"])


@pytest.mark.parametrize("method_class", [HessianFree, MLHF], ids=["hf", "mlhf"])
def test_hf_and_mlhf_train_the_paper_preset_batchnorm_resnet(method_class):
    """The paper preset uses ResNet-18 (BatchNorm in train mode): HF's and MLHF's steps must run
    on it, stay finite and lower the training loss (here: a width-4 ResNet-18 on synthetic data)."""
    assert chapter_config("meta_hf", "paper")["model"] == "resnet18"
    _, _, res = run_hf({"model": "resnet18", "width": 4, "epochs": 3.0, "hf.mlhf_meta_steps": 2,
                        "hf.mlhf_unroll": 2}, method_class=method_class)
    losses = [row["train_loss"] for row in res["history"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


# ----------------------------------------------------------------------------- the ablation arms and the official MLHF

def hf_cfg_k(k=3, **changes):
    """HF and MLHF on the tiny float64 problems with K = k (MLHF's CG iterations), no meta-training."""
    return knobs({**{key: v for key, v in HF_CFG.items() if key.startswith("hf.")}, "weight_decay": 0.0,
                  "hf.damping": 0.1, "hf.gn_batch_size": 16, "hf.fisher_chunk": 4, "hf.mlhf_cg_iters": k,
                  "hf.mlhf_hidden": 3, "hf.mlhf_meta_steps": 0, **changes})


def test_hf_same_cg_runs_mlhfs_cg_budget_and_is_hf_otherwise():
    """hf_same_cg = HessianFree with hf.cg_iters set to hf.mlhf_cg_iters (K = 3 here, while
    hf.cg_iters = 50): every step runs exactly K iterations (Martens' rule needs i > 10 to stop),
    and the trajectory is that of HF configured with K by hand."""
    cfg = hf_cfg_k(3)
    assert cfg["hf.cg_iters"] == 50
    same, by_hand = meta_hf.HFSameCG(cfg), HessianFree({**cfg, "hf.cg_iters": 3})
    model_a, _, outs_a = deploy_mlhf(same, 8)
    model_b, _, outs_b = deploy_mlhf(by_hand, 8)
    assert [o["cg_iters"] for o in outs_a] == [3.0] * 8
    assert same.extras(None)["cg_iters_mean"] == 3.0
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    _, _, outs_full = deploy_mlhf(HessianFree(cfg), 8)
    assert max(o["cg_iters"] for o in outs_full) > 3                          # the full HF arm does run longer


def test_mlhf_untrained_does_no_meta_training_and_is_hf_with_k_fixed_iterations(monkeypatch):
    """mlhf_untrained: even with hf.mlhf_meta_steps = 5 its prepare() never meta-trains and the arm
    declares no one-off stage; its steps are HF's with exactly K CG iterations, no stopping rule
    and no backtracking (LM damping, Martens' preconditioner, warm start, line search alike)."""
    calls = []
    monkeypatch.setattr(meta_hf, "meta_train", lambda *a, **k: calls.append(1))
    cfg = hf_cfg_k(3, **{"hf.mlhf_meta_steps": 5})
    untrained = meta_hf.MLHFUntrained(cfg)
    assert untrained.one_off_units is None and MLHF.one_off_units is not None
    model_a, _, outs_a = deploy_mlhf(untrained, 10)
    untrained.prepare()
    assert calls == [] and untrained.extras(None)["meta_episodes"] == 0
    hf = HessianFree({**cfg, "hf.cg_iters": 3, "hf.cg_tol": 0.0, "hf.backtrack": False})
    model_b, _, outs_b = deploy_mlhf(hf, 10)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert [float(o["damping"]) for o in outs_a] == pytest.approx([o["damping"] for o in outs_b], rel=1e-9)
    assert len({float(o["damping"]) for o in outs_a}) > 1                     # LM really moved lambda


def official_nets(model, seed=3):
    segments = meta_hf.param_kinds(model)
    torch.manual_seed(seed)
    return segments, meta_hf.OfficialNets({k for k, _ in segments}).double()


OFFICIAL_S = meta_hf.HFSettings(cg_iters=4, precond_exponent=0.0, fisher_chunk=1, gn_batch=8, warm_start=1.0,
                                weight_decay=0.01)


def test_param_kinds_give_one_head_pair_per_parameter_kind():
    """As the official code: conv kernels, conv biases, dense kernels, dense biases (BatchNorm
    weights) each get their own damping and preconditioner heads, shared by their coordinates."""
    cfg = chapter_config("meta_hf", "smoke", {**TINY, "model": "cuda_convnet"})
    model = make_model(cfg, 10, torch.device("cpu"))
    segments = meta_hf.param_kinds(model)
    assert {k for k, _ in segments} == {"Conv2d_weight", "Conv2d_bias", "Linear_weight", "Linear_bias"}
    assert sum(n for _, n in segments) == sum(p.numel() for p in model.parameters())
    assert {k for k, _ in meta_hf.param_kinds(tiny_bn_net())} >= {"BatchNorm1d_weight", "BatchNorm1d_bias"}
    nets = meta_hf.OfficialNets({k for k, _ in segments})
    cell = nets.heads["Conv2d_weight"]["precond"]
    assert [c.hidden_size for c in cell.cells] == [4, 4] and cell.out.out_features == 1


def test_official_step_with_many_cg_iterations_solves_the_damped_gauss_newton_system():
    """Signs and the damping per coordinate: with 80 iterations the step d (= -x) solves
    (G + diag(lambda)) d = -g, lambda = the damping heads' softplus + 2e-5 >= 2e-5, P > 0, and the
    Hessian loss is -<g, x> / sqrt(x^T (G + diag lambda) x)."""
    model = tiny_mlp()
    segments, nets = official_nets(model)
    x, y = separable_problem(torch.Generator().manual_seed(2), 16)
    params = model_params(model)
    g = flatten(torch.autograd.grad(F.cross_entropy(forward(model, params, x), y), list(params.values()))).detach()
    g = g + 0.01 * flatten(params).detach()
    state = meta_hf.OfficialState.fresh(len(g), g)
    s = meta_hf.HFSettings(80, 0.0, 1, 16, 1.0, 0.01)
    with torch.no_grad():
        step, new, _, P, lam, hessian_loss = meta_hf.official_step(nets, segments, state, model, params, x, y, g, 1.0, s)
    A = explicit_gauss_newton(model, x, y, 0.01) + torch.diag(lam)
    assert (lam >= 2e-5).all() and (P > 0).all() and lam.std() > 0                # per coordinate
    assert torch.allclose(step.d, torch.linalg.solve(A, -g), rtol=1e-6, atol=1e-10)
    xo = -step.d
    assert hessian_loss.item() == pytest.approx((-(g @ xo) / torch.sqrt(xo @ A @ xo)).item(), rel=1e-6)
    assert torch.equal(new.x_prev, xo) and new.age == 1


@pytest.mark.parametrize("make, n", [(tiny_mlp, 2), (tiny_bn_net, 4)])
def test_official_meta_gradients_match_central_finite_differences(make, n):
    """float64, both meta-objectives (the damping heads' meta_loss, the preconditioner heads'
    Hessian loss) along random directions of all of phi. n = 2 steps: the meta_loss depends on
    phi only through the first step, where nothing is held, so the check is against the true
    episode function. n = 4 (BatchNorm net, warm starts, LSTM states over 4 steps): against the
    surrogate with the official code's stop-gradients (theta_t, g_t, x_1, r_1, noise, weights) held."""
    model = make()
    segments, nets = official_nets(model)
    like = {k: p.detach() for k, p in model_params(model).items()}
    theta0 = flatten(like)
    state = meta_hf.OfficialState.fresh(len(theta0), theta0)
    batches = episode_batches(n - 1)
    run = lambda frozen=None: meta_hf.official_unroll(nets, segments, model, like, theta0, state, batches, OFFICIAL_S,
                                                      1.0, noise_seed=0, frozen=frozen)
    meta_loss, hessian_loss, _, end, records = run()
    phi = list(nets.parameters())
    gen, h = torch.Generator().manual_seed(7), 1e-6
    grads = [flatten(torch.autograd.grad(value, phi, retain_graph=True)) for value in (meta_loss, hessian_loss)]
    checks = [(0, meta_loss, None if n == 2 else records), (1, hessian_loss, records)]
    for (index, value, frozen), grad in zip(checks, grads):
        fn = lambda: run(frozen)[index].item()
        assert fn() == pytest.approx(value.item(), rel=1e-12)
        direction = torch.randn(len(grad), generator=gen, dtype=torch.float64)
        fd = (meta_loss_along(nets, direction, h, fn) - meta_loss_along(nets, direction, -h, fn)) / (2 * h)
        assert abs(fd) > 1e-6
        assert (grad @ direction).item() == pytest.approx(fd, rel=1e-5, abs=1e-11)
    assert end.age == n
    if n == 4:          # the surrogate really differs from the true function (the dropped paths are not zero)
        true = lambda: run()[1].item()
        fd_true = (meta_loss_along(nets, direction, h, true) - meta_loss_along(nets, direction, -h, true)) / (2 * h)
        assert abs(fd_true - fd) > 1e-4 * abs(fd)


def official_cfg(**changes):
    return {**TINY, "hf.official_meta_steps": 3, "hf.official_unroll": 2, "hf.official_cg_iters": 2, **changes}


def test_official_meta_training_draws_the_meta_split_only(monkeypatch):
    """prepare() meta-trains on batches 0 .. steps * unroll - 1 of the stream
    'mlhf_official_episodes' over the meta split (the split no arm trains on), nothing else."""
    cfg = chapter_config("meta_hf", "smoke", official_cfg())
    data = prepare_data(cfg, 0, torch.device("cpu"), make_synthetic(400, 100, seed=0))
    streams = data.streams()
    seen, real = [], streams.batch
    monkeypatch.setattr(streams, "batch", lambda name, i, split=None: seen.append((name, i, split)) or real(name, i, split))
    seed_everything(0)
    method = meta_hf.OfficialMLHF(cfg)
    method.setup(Context(make_model(cfg, 10, torch.device("cpu")), streams, 12, 6, 10, len(data.train.y), seed=0))
    method.prepare()
    assert seen == [("mlhf_official_episodes", i, "meta") for i in range(6)]
    e = method.extras(None)
    assert e["meta_episodes"] == 3 and e["meta_params"] > 0 and math.isfinite(e["hessian_loss_last"])
    before = flatten(model_params(method.model)).clone()
    out = method.step(streams.batch("train", 0), None, 123.0)       # the loop's lr is unused: constant lr
    assert torch.isfinite(out["loss"]) and not torch.equal(before, flatten(model_params(method.model)))


@pytest.mark.parametrize("keep_prob, replay, resets, oldest_start", [(1.0, "initial", 0, 6), (0.0, "initial", 4, 0),
                                                                   (0.0, "visited", 4, 2)])
def test_official_replay_continues_with_keep_prob_and_resets_to_what_it_stored(keep_prob, replay, resets,
                                                                               oldest_start):
    """keep_prob 1: one trajectory of 4 episodes of 2 steps (they start 0, 2, 4, 6 steps in);
    keep_prob 0: every episode ends in a reset, which with replay "initial" (the released code)
    always returns to the initial weights, and with "visited" to states reached before."""
    model = tiny_mlp()
    segments, nets = official_nets(model)
    gen = torch.Generator().manual_seed(5)
    batches = [separable_problem(gen, 16) for _ in range(8)]
    m = meta_hf.OfficialMetaConfig(steps=4, unroll=2, lr=1e-3, keep_prob=keep_prob, replay_size=3, train_lr=1.0,
                                   seed=0, replay=replay)
    before = flatten([p.detach().clone() for p in nets.parameters()])
    stats = meta_hf.official_meta_train(nets, segments, model, lambda i: batches[i], OFFICIAL_S, m)
    assert stats["resets"] == resets and len(stats["meta_losses"]) == 4
    assert not torch.equal(before, flatten([p.detach() for p in nets.parameters()]))       # Adam moved phi
    assert stats["start_age_max"] == oldest_start
    assert stats["replay_states"] == (1 if replay == "initial" or keep_prob == 1.0 else 3)     # full at replay_size


def test_official_meta_training_uses_batches_of_its_meta_batch(monkeypatch):
    """hf.official_meta_batch images per meta-training batch (the code's 64), cut from the
    stream's batches; a run whose batches are smaller uses them whole."""
    sizes = []
    real = meta_hf.official_unroll
    monkeypatch.setattr(meta_hf, "official_unroll",
                        lambda *a, **k: sizes.extend(len(y) for _, y in a[6]) or real(*a, **k))
    for meta_batch, expected in ((8, 8), (64, 32)):        # TINY's batch_size is 32
        sizes.clear()
        cfg = chapter_config("meta_hf", "smoke", official_cfg(**{"hf.official_meta_batch": meta_batch}))
        data = prepare_data(cfg, 0, torch.device("cpu"), make_synthetic(400, 100, seed=0))
        seed_everything(0)
        method = meta_hf.OfficialMLHF(cfg)
        method.setup(Context(make_model(cfg, 10, torch.device("cpu")), data.streams(), 12, 6, 10, len(data.train.y), seed=0))
        method.prepare()
        assert sizes == [expected] * 6 and method.extras(None)["meta_batch"] == expected


def test_killed_official_mlhf_run_resumes_bitwise(tmp_path):
    run = lambda **k: run_hf(official_cfg(), method_class=meta_hf.OfficialMLHF, **k)
    model_a, method_a, full = run()
    with pytest.raises(Killed):
        run(out_dir=tmp_path, on_step=kill_at(8))
    model_b, method_b, resumed = run(out_dir=tmp_path)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    sa, sb = method_a.state.to_dict(), method_b.state.to_dict()
    for key, a in sa.items():
        assert torch.equal(a, sb[key]) if torch.is_tensor(a) else a == sb[key], key
    assert sa["age"] == 12 and sa["h_precond"].abs().max() > 0
    timeless = lambda history: [{k: v for k, v in row.items() if k != "elapsed_s"} for row in history]
    assert timeless(resumed["history"]) == timeless(full["history"])


def test_hf_arms_without_mlhf_raise_a_config_error_naming_the_required_arms():
    from metabook.methods.meta_hf import experiments
    with pytest.raises(ConfigError, match="baseline and mlhf are required"):
        experiments(chapter_config("meta_hf", "smoke", {"hf.arms": ["baseline", "hf"]}))
    with pytest.raises(ConfigError, match="hf.arms.*mlhf_official"):
        chapter_config("meta_hf", "smoke", {"hf.arms": ["baseline", "mlhf", "mlhf_offical"]})
