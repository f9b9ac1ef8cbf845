"""One-step-lookahead meta-gradients on torch.func.functional_call (derived in chapter 1).

`meta_gradient`: d L_outer(theta'(phi)) / d phi after one virtual SGD step, by a double backward
or (first_order) a finite difference; `directional`: forward-mode derivatives along a direction;
`reweighting_step`: Learning to Reweight as the worked example. Functional forwards run on
copies of the model's buffers, so a virtual step never changes BatchNorm's running statistics.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

Params = dict[str, torch.Tensor]


def model_params(model: torch.nn.Module) -> Params:
    """The trainable parameters by name (the tensors themselves, not copies)."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def forward(model: torch.nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """model(x) with `params` in place of the model's parameters and with copies of its buffers
    (BatchNorm running stats are left untouched; batch statistics are used in train mode)."""
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    return functional_call(model, {**buffers, **params}, (x,))


def lookahead_params(params: Params, grads, lr: float, weight_decay: float = 0.0) -> Params:
    """theta' = theta - lr * (g + weight_decay * theta), one plain SGD step, kept differentiable."""
    return {k: p - lr * (g + weight_decay * p) for (k, p), g in zip(params.items(), grads)}


def full_precision(fn):
    """Run fn with autocast off: meta-gradient arithmetic (virtual steps, directional derivatives,
    double backward) stays in the tensors' own precision even inside a mixed-precision step."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            if not torch.cuda.is_available():
                return fn(*args, **kwargs)
            with torch.autocast("cuda", enabled=False):
                return fn(*args, **kwargs)
    return wrapper


@full_precision
def meta_gradient(model: torch.nn.Module,
                  inner_loss: Callable[[Params], torch.Tensor],
                  outer_loss: Callable[[Params], torch.Tensor],
                  meta_params: list[torch.Tensor],
                  lr: float,
                  *,
                  params: Params | None = None,
                  weight_decay: float = 0.0,
                  first_order: bool = False,
                  fd_eps: float = 0.01,
                  keep_inner_graph: bool = False):
    """Gradient of the outer loss after one virtual SGD step with respect to `meta_params`.

    inner_loss(params) -> scalar, depends on meta_params (e.g. sum_i w_i * l_i(params)).
    outer_loss(params) -> scalar, the meta objective (e.g. cross-entropy on a meta batch).
    Returns (grads, info): one gradient per meta-parameter (zeros where unused), and a dict with
    `inner` (the inner loss tensor, its graph kept if keep_inner_graph so the caller can reuse
    the forward pass for the real step) and `outer` (a float).
    """
    params = model_params(model) if params is None else params
    inner = inner_loss(params)
    grads = torch.autograd.grad(inner, list(params.values()), create_graph=not first_order,
                                retain_graph=keep_inner_graph or not first_order)
    if first_order:
        grads = [g.detach() for g in grads]
    fast = lookahead_params(params, grads, lr, weight_decay)
    if first_order:
        fast = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
    outer = outer_loss(fast)
    if not first_order:
        meta_grads = torch.autograd.grad(outer, meta_params, allow_unused=True)
    else:
        meta_grads = _finite_difference_meta_grad(params, inner_loss, outer, fast, meta_params, lr, fd_eps)
    meta_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(meta_params, meta_grads)]
    return meta_grads, {"inner": inner, "outer": outer.item()}


def _finite_difference_meta_grad(params, inner_loss, outer, fast, meta_params, lr, fd_eps):
    """-lr * (grad_phi L_inner(theta + e v) - grad_phi L_inner(theta - e v)) / (2 e),
    v = grad_theta' L_outer(theta'), e = fd_eps / ||v||  (Liu et al. 2019, eq. 8)."""
    v = torch.autograd.grad(outer, list(fast.values()))
    norm = torch.sqrt(sum((g * g).sum() for g in v))
    eps = fd_eps / (norm + 1e-12)
    with torch.no_grad():
        plus = {k: p + eps * g for (k, p), g in zip(params.items(), v)}
        minus = {k: p - eps * g for (k, p), g in zip(params.items(), v)}
    g_plus = torch.autograd.grad(inner_loss(plus), meta_params, allow_unused=True)
    g_minus = torch.autograd.grad(inner_loss(minus), meta_params, allow_unused=True)
    return [None if a is None else -lr * (a - b) / (2 * eps) for a, b in zip(g_plus, g_minus)]


@full_precision
def example_weight_meta_gradient(model: torch.nn.Module, params: Params, x, y, v, lr: float,
                                 mode: str = "jvp", fd_eps: float = 1e-3, update_stats: bool = True):
    """d L_meta(theta') / d eps_i = -lr * <v, grad_theta l_i(theta)> for every example of (x, y),
    the meta-gradient of per-example weights eps_i, by `directional` along v (mode jvp or fd).

    x: (B, ...), y: (B,); v: one tensor per parameter, like params, the meta loss's gradient at
    theta'. Returns (meta_grad (B,), losses (B,)), the losses with their graph for the caller's
    real step (BatchNorm running stats update here, unless update_stats=False).
    """
    buffers = {k: (b if update_stats else b.clone()) for k, b in model.named_buffers()}
    losses, jv = directional(model, params, v, x, lambda logits: F.cross_entropy(logits, y, reduction="none"),
                             mode=mode, fd_eps=fd_eps, buffers=buffers)
    return -lr * jv.detach(), losses


@full_precision
def directional(model: torch.nn.Module, params: Params, v, x, out_fn, *, mode: str = "jvp",
                fd_eps: float = 1e-3, buffers: dict | None = None, fixed: Params | None = None,
                base: torch.Tensor | None = None, kwargs: dict | None = None):
    """(out, its derivative along v): out = out_fn(model(x)) with `params`, differentiated in the
    direction v (one tensor per entry of params) by forward mode, without a double backward.

    mode="jvp": exact, one forward pass with dual numbers (`fixed` parameters get zero tangents);
    mode="fd":  (out_fn at theta + h v - out) / h with h = fd_eps / ||v||, one extra forward
                without a graph (an approximation; cheapest); out = `base` if given.
    `buffers` default to copies of the model's (BatchNorm statistics untouched); `out` keeps
    its autograd graph, so a caller's real step can reuse this forward.
    """
    import torch.autograd.forward_ad as fwAD

    buffers = {k: b.clone() for k, b in model.named_buffers()} if buffers is None else buffers
    run = lambda p, bufs=buffers: out_fn(functional_call(model, {**bufs, **(fixed or {}), **p}, (x,), kwargs or {}))
    if mode == "jvp":
        with fwAD.dual_level():
            with warnings.catch_warnings():   # torch warns about its own jit use when forward AD first loads
                warnings.simplefilter("ignore", FutureWarning)
                dual = {k: fwAD.make_dual(p, t) for (k, p), t in zip(params.items(), v)}
                # zero tangents on the fixed parameters: a linear layer with a dual input and a
                # plain weight takes a slow path in torch (it imports the compiler stack on first use)
                dual.update({k: fwAD.make_dual(p, torch.zeros_like(p)) for k, p in (fixed or {}).items()})
            return fwAD.unpack_dual(run(dual))
    if mode == "fd":
        out = run(params) if base is None else base
        h = fd_eps / (torch.sqrt(sum((t * t).sum() for t in v)) + 1e-12)
        with torch.no_grad():
            moved = run({k: p + h * t for (k, p), t in zip(params.items(), v)},
                        {k: b.clone() for k, b in buffers.items()})
        return out, (moved - out.detach()) / h
    raise ValueError(f"unknown mode {mode!r}; choose one of: jvp, fd")


@full_precision
def reweighting_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x, y, x_meta, y_meta,
                     lr: float, mode: str = "jvp") -> dict:
    """One Learning-to-Reweight step (Ren et al. 2018): weights w = max(-d L_meta / d eps, 0) at
    eps = 0 (so theta' = theta), normalised to sum 1; the real step descends sum_i w_i l_i.
    mode="exact": the general engine, `meta_gradient` with a double backward;
    mode="jvp":   the same numbers by one forward-mode pass (example_weight_meta_gradient);
    mode="fd":    a one-sided finite difference along v (approximate, cheapest).
    x: (B, 3, 32, 32), y: (B,); x_meta, y_meta: a batch of the held-out meta split.
    """
    params = model_params(model)
    if mode == "exact":
        losses = F.cross_entropy(model(x), y, reduction="none")                  # (B,)
        eps = torch.zeros_like(losses, requires_grad=True)
        (g_eps,), info = meta_gradient(model, lambda p: (eps * losses).sum(),
                                       lambda p: F.cross_entropy(forward(model, p, x_meta), y_meta),
                                       [eps], lr, params=params, keep_inner_graph=True)
        meta_loss = info["outer"]
    else:
        meta = F.cross_entropy(forward(model, params, x_meta), y_meta)
        v = torch.autograd.grad(meta, list(params.values()))
        g_eps, losses = example_weight_meta_gradient(model, params, x, y, v, lr, mode=mode)
        meta_loss = meta.detach()
    w = torch.clamp(-g_eps.detach(), min=0)
    w = w / w.sum() if w.sum() > 0 else w
    opt.zero_grad(set_to_none=True)
    (w * losses).sum().backward()
    opt.step()
    return {"loss": losses.detach().mean(), "meta_loss": meta_loss, "weights": w, "losses": losses.detach()}
