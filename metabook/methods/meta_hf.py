"""Hessian-free optimisation from scratch (Martens 2010) and MLHF, its meta-learned variant.

MLHF (Chen, Lu, Fokoue 2018, arXiv 1805.08462) keeps Martens' Hessian-free (HF) framework and
replaces two hand-tuned parts of it, the damping rule and the preconditioner, by recurrent nets.
The first part of this file is that framework, every equation below one function; the section
"MLHF" near the end adds the two nets, their meta-training with experience replay, and says
exactly what its meta-gradient is the gradient of.

Objective on a mini-batch (x, y) of B examples, with weight decay (L2) wd as in the other arms:

    f(theta) = 1/B sum_i CE(z_i(theta), y_i) + wd/2 ||theta||^2,     z_i: the logits (C,)

Quadratic model at theta, with Tikhonov damping lambda (Martens 2010):

    q(d) = f + g^T d + 1/2 d^T (G + lambda I) d,       g = grad f,   G = J^T H_L J + wd I

J = dz/dtheta is the Jacobian of all logits (B*C rows), H_L the Hessian of the loss in the logits.
For cross-entropy it is block diagonal, one block per example:

    H_L = 1/B blockdiag(diag(p_i) - p_i p_i^T),   p_i = softmax(z_i)

G is never formed: G v = J^T (H_L (J v)) costs one forward-mode pass (J v, `torch.func.jvp`) and
one reverse pass (J^T u, `torch.func.vjp`), on a curvature sub-batch of the gradient batch.
G is positive semi-definite (H_L is), so q has a minimum, which preconditioned conjugate gradient
(CG) approaches; CG stops on Martens' relative-progress rule: at iteration i, with
phi(x) = q(x) - f and k = max(10, 0.1 i),

    stop when  i > k,  phi(x_i) < 0  and  (phi(x_i) - phi(x_{i-k})) / phi(x_i) < k * eps.

Preconditioner (Martens 2010), diagonal, with xi = 0.75:

    M = (diag(sum_i grad l_i (.) grad l_i) / m + wd + lambda) ^ xi

Here the per-example gradients grad l_i come from the curvature sub-batch of m examples, through
the same reverse pass as J^T (one cotangent per example or per chunk of examples, see
`GaussNewton.fisher_diagonal`).

CG is warm-started from 0.95 times the previous step's final CG solution. Among the CG iterates
saved at iterations ceil(1.3^j), "CG backtracking" picks the one with the lowest f, searching back
from the last. Levenberg-Marquardt adjusts lambda from the reduction ratio

    rho = (f(theta + d) - f(theta)) / (q(d) - q(0))     (our choice: q without the lambda term)
    rho < 1/4: lambda <- 3/2 lambda,    rho > 3/4: lambda <- 2/3 lambda,

and a backtracking line search (Armijo condition, c = 0.01, alpha shrunk by 0.8 per trial, as we
read Martens & Sutskever 2012) sets the step size alpha:

    theta <- theta + alpha d.

Representation: parameters are a dict name -> tensor (`metabook.meta.model_params`); every
vector of the optimiser (g, d, G v, the preconditioner) is ONE flat 1-D tensor of length P, the
parameters concatenated in that dict's order (`flatten` / `unflatten`). CG is then plain linear
algebra on 1-D tensors.

BatchNorm: all the extra forward passes (G v, f at trial points) run on copies of the buffers
(`metabook.meta.forward`), so only the step's one real forward updates the running statistics, as
in a plain SGD step. Train-mode batch statistics are used throughout, so G is the Gauss-Newton
matrix of the batch-statistics network (examples are coupled through the batch mean and variance).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch.func import jvp, vjp

from ..config import knob, section
from ..data import Batch
from ..meta import Params, forward, model_params
from ..train import Arm, Context, Method, NonFiniteError
from .baseline import Baseline

Vector = torch.Tensor          # a flat (P,) vector in the parameter dict's order

# Constants of the method that a reader rarely changes (Martens 2010; Martens & Sutskever 2012).
LM_DROP, LM_BOOST = 2 / 3, 3 / 2          # lambda multipliers when rho > 3/4 / rho < 1/4
RHO_LOW, RHO_HIGH = 0.25, 0.75
BACKTRACK_GAMMA = 1.3                     # CG iterates saved at iterations ceil(1.3^j)
LS_C, LS_SHRINK, LS_TRIES = 1e-2, 0.8, 12  # Armijo constant, step shrink, trials before alpha = 0
DAMPING_MIN, DAMPING_MAX = 1e-8, 1e8       # keep lambda representable on long runs


# ----------------------------------------------------------------------------- flat vectors

def flatten(tensors) -> Vector:
    """A dict or sequence of tensors -> one (P,) vector (dict order)."""
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return torch.cat([t.reshape(-1) for t in values])


def unflatten(vec: Vector, like: Params) -> Params:
    """(P,) vector -> dict of views shaped like `like` (the inverse of `flatten`)."""
    out, i = {}, 0
    for name, t in like.items():
        out[name] = vec[i:i + t.numel()].view_as(t)
        i += t.numel()
    return out


# ----------------------------------------------------------------------------- Gauss-Newton products

def ce_hessian_product(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """H_L u for the mean cross-entropy: row i is (p_i * u_i - p_i <p_i, u_i>) / B.
    probs, u: (B, C). Returns (B, C)."""
    return (probs * u - probs * (probs * u).sum(1, keepdim=True)) / len(probs)


class GaussNewton:
    """The curvature of f on one (sub-)batch at fixed parameters: G v = J^T H_L J v + wd v.

    The reverse pass (J^T) is set up once here and reused by every product, so a CG iteration
    costs one `jvp` (a forward pass with tangents) and one backward pass.
    params: dict of (detached) tensors; x: (m, ...) inputs; y: (m,) labels.
    """

    def __init__(self, model: torch.nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor,
                 weight_decay: float = 0.0):
        self.params = {k: p.detach() for k, p in params.items()}
        self.logits_of = lambda p: forward(model, p, x)          # buffers cloned: no stat updates
        self.logits, self._pullback = vjp(self.logits_of, self.params)   # (m, C), J^T
        self.probs = F.softmax(self.logits.detach(), dim=1)      # (m, C)
        self.y, self.weight_decay = y, weight_decay

    def jv(self, v: Vector) -> torch.Tensor:
        """J v: the change of the logits along v, (m, C)."""
        with warnings.catch_warnings():   # torch warns about its own jit use when forward AD first loads
            warnings.simplefilter("ignore", FutureWarning)
            return jvp(self.logits_of, (self.params,), (unflatten(v, self.params),))[1]

    def jtu(self, u: torch.Tensor) -> Vector:
        """J^T u for a cotangent u on the logits, (m, C) -> (P,)."""
        return flatten(self._pullback(u)[0])

    def __call__(self, v: Vector) -> Vector:
        """G v, (P,) -> (P,)."""
        return self.jtu(ce_hessian_product(self.probs, self.jv(v))) + self.weight_decay * v

    def fisher_diagonal(self, chunk: int = 1) -> Vector:
        """diag of the empirical Fisher, 1/m sum_i grad l_i (.) grad l_i, (P,).

        grad l_i = J^T e_i (p_i - onehot(y_i)) reuses the pass of J^T. chunk=1 is exact (m
        backward passes); chunk=s squares the gradient g_c of the mean loss of each group of s
        examples and averages s g_c^2 (m/s backward passes). That keeps the per-example variance
        but adds (s - 1) times the squared mean gradient, a cheap approximation that Martens'
        rule (ξ < 1, + lambda) tolerates.
        """
        m = len(self.y)
        residual = self.probs - F.one_hot(self.y, self.probs.shape[1]).to(self.probs.dtype)   # (m, C)
        total = torch.zeros_like(flatten(self.params))
        for start in range(0, m, chunk):
            u = torch.zeros_like(residual)
            s = min(chunk, m - start)
            u[start:start + s] = residual[start:start + s] / s
            total += s * s * self.jtu(u) ** 2          # weight s/m of the estimate s g_c^2
        return total / m


# ----------------------------------------------------------------------------- conjugate gradient

@dataclass
class CGResult:
    x: Vector                                   # the final iterate (P,)
    iters: int                                  # CG iterations run
    phi: float                                  # phi(x) = 1/2 x^T A x - b^T x at the final iterate
    iterates: list = field(default_factory=list)   # [(i, x_i, phi_i)] at i = ceil(1.3^j) and the last
    stop: str = ""                              # why CG stopped


def pcg(Av: Callable[[Vector], Vector], b: Vector, precond: Vector | None = None,
        x0: Vector | None = None, max_iters: int = 250, tol: float = 5e-4,
        rtol: float = 1e-10) -> CGResult:
    """Minimise phi(x) = 1/2 x^T A x - b^T x (i.e. solve A x = b) by preconditioned CG.

    Av: x -> A x for a symmetric positive definite A; precond: the diagonal M (P,) of the
    preconditioner (None = identity), applied as z = r / M. Stops at max_iters, on Martens'
    relative progress rule with eps = tol (tol = 0 turns it off), when the residual falls to
    rtol * ||b||, or on non-positive curvature p^T A p <= 0 (then returns the last good iterate).
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - Av(x) if x0 is not None else b.clone()
    z = r / precond if precond is not None else r
    p = z.clone()
    rz = torch.dot(r, z)
    phis = [-0.5 * torch.dot(x, b + r).item()]               # phi(x) = -1/2 x^T (b + r)
    save = {math.ceil(BACKTRACK_GAMMA ** j) for j in range(int(math.log(max(max_iters, 2), BACKTRACK_GAMMA)) + 2)}
    iterates = []
    b_norm, stop, i = b.norm().item(), "max_iters", 0
    for i in range(1, max_iters + 1):
        Ap = Av(p)
        curvature = torch.dot(p, Ap)
        if curvature <= 0:
            stop, i = "non-positive curvature", i - 1
            break
        alpha = rz / curvature
        x = x + alpha * p
        r = r - alpha * Ap
        phis.append(-0.5 * torch.dot(x, b + r).item())
        if i in save:
            iterates.append((i, x, phis[-1]))
        k = max(10, math.ceil(0.1 * i))
        if tol > 0 and i > k and phis[-1] < 0 and (phis[-1] - phis[-1 - k]) / phis[-1] < k * tol:
            stop = "relative progress"
            break
        if r.norm().item() <= rtol * b_norm:
            stop = "residual"
            break
        z = r / precond if precond is not None else r
        rz_new = torch.dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    if not iterates or iterates[-1][0] != i:
        iterates.append((i, x, phis[-1]))
    return CGResult(x, i, phis[-1], iterates, stop)


# ----------------------------------------------------------------------------- damping and step size

def lm_factor(rho: float | None) -> float:
    """The Levenberg-Marquardt multiplier of lambda for reduction ratio rho: 3/2 when the model
    over-promised (rho < 1/4), 2/3 when it predicted well (rho > 3/4), 1 in between and when there
    is no rho yet (None: before the first step)."""
    if rho is None:
        return 1.0
    if rho < RHO_LOW:
        return LM_BOOST
    if rho > RHO_HIGH:
        return LM_DROP
    return 1.0


def lm_damping(damping: float, rho: float) -> float:
    """Levenberg-Marquardt: more damping when the model over-promised (rho < 1/4), less when it
    predicted well (rho > 3/4), unchanged in between."""
    return min(max(damping * lm_factor(rho), DAMPING_MIN), DAMPING_MAX)


def cg_backtrack(f: Callable[[Vector], float], iterates: list) -> tuple[int, float]:
    """Martens' CG backtracking: from the last saved CG iterate, step back while f keeps falling.
    iterates: [(i, x_i, phi_i)]. Returns (index into iterates, f at that iterate)."""
    best, f_best = len(iterates) - 1, f(iterates[-1][1])
    for j in range(len(iterates) - 2, -1, -1):
        f_j = f(iterates[j][1])
        if f_j >= f_best:
            break
        best, f_best = j, f_j
    return best, f_best


def line_search(f: Callable[[float], float], f0: float, slope: float, f1: float) -> tuple[float, float]:
    """Backtracking (Armijo) line search on alpha -> f(theta + alpha d), starting at alpha = 1
    whose value f1 is known. slope = g^T d. Returns (alpha, f(alpha)); alpha = 0 when no trial
    decreases f enough (then the step is skipped)."""
    alpha, f_alpha = 1.0, f1
    for _ in range(LS_TRIES):
        if f_alpha <= f0 + LS_C * alpha * slope:
            return alpha, f_alpha
        alpha *= LS_SHRINK
        f_alpha = f(alpha)
    return 0.0, f0


# ----------------------------------------------------------------------------- one HF step
#
# HF, MLHF and MLHF's meta-training unroll take the same step: `hf_gradient` (the step's one real
# forward and backward; the unroll differentiates its own functional objective instead),
# `hf_direction` (the Gauss-Newton operator on the curvature sub-batch, the damped PCG solve, the
# chosen iterate, f(theta + d) and rho) and `hf_apply` (the line search and theta += alpha d; the
# unroll takes theta + d, differentiably). They differ in how lambda, P and the CG budget are set.

@dataclass
class HFSettings:
    """The per-step settings of HF and MLHF."""
    cg_iters: int                  # most CG iterations (MLHF: K, fixed and unrolled)
    precond_exponent: float        # xi of the base preconditioner (0 = none)
    fisher_chunk: int              # examples per gradient in the Fisher diagonal
    gn_batch: int                  # curvature sub-batch: the first gn_batch examples
    warm_start: float              # CG starts from this times the previous solution
    weight_decay: float


@dataclass
class HFStep:
    """What `hf_direction` computed at theta on one batch."""
    G: GaussNewton
    fisher: Vector | None                # (P,) Fisher diagonal of the curvature sub-batch
    cg: CGResult
    chosen: int                          # index into cg.iterates of the step d
    d: Vector                            # (P,) the step (carries the graph of lambda and P, if any)
    f1: float                            # f(theta + d)
    rho: float                           # reduction ratio of d (-1: no predicted decrease)
    f_at: Callable[[Vector], float]      # d -> f(theta + d) on the step's batch


def objective(model, params: Params, x, y, weight_decay: float) -> float:
    """f at `params` on (x, y): mean cross-entropy + wd/2 ||theta||^2, buffers untouched."""
    with torch.no_grad():
        loss = F.cross_entropy(forward(model, params, x), y)
        return loss.item() + 0.5 * weight_decay * sum((p * p).sum() for p in params.values()).item()


def hf_gradient(model, batch: Batch, weight_decay: float):
    """The step's one real forward (BatchNorm statistics update here) and backward.
    Returns (params, loss (), logits (B, C), g = grad f (P,), f0 = f(theta))."""
    params = model_params(model)
    theta = flatten(params).detach()                                              # (P,)
    logits = model(batch.x)
    loss = F.cross_entropy(logits, batch.y)
    g = flatten(torch.autograd.grad(loss, list(params.values()))).detach() + weight_decay * theta
    f0 = loss.item() + 0.5 * weight_decay * theta.dot(theta).item()
    return params, loss, logits, g, f0


def hf_direction(model, params: Params, x, y, g: Vector, f0: float, lam, s: HFSettings, *,
                 factor: Vector | None = None, x0: Vector | None = None, tol: float = 5e-4,
                 rtol: float = 1e-10, backtrack: bool = False, curvature: tuple | None = None) -> HFStep:
    """The shared core of one HF step at `params` on (x (B, ...), y (B,)).

    G on the first s.gn_batch examples and its Fisher diagonal (or `curvature` = (G, fisher)
    given); PCG from x0 on (G + lam I) d = -g with Martens' preconditioner (F + wd + lam)^xi,
    times `factor` (P,) if given; the last CG iterate, or the one CG backtracking picks; f(theta + d)
    and rho. lam: a float, or a 0-d tensor whose graph (and factor's) then reaches d.
    """
    wd = s.weight_decay
    if curvature is None:
        m = min(s.gn_batch, len(y))
        G = GaussNewton(model, params, x[:m], y[:m], wd)
        fisher = G.fisher_diagonal(s.fisher_chunk) if s.precond_exponent > 0 else None
    else:
        G, fisher = curvature
    precond = (fisher + wd + lam) ** s.precond_exponent if s.precond_exponent > 0 else None
    if factor is not None:
        precond = factor if precond is None else precond * factor
    cg = pcg(lambda v: G(v) + lam * v, -g, precond, x0=x0, max_iters=s.cg_iters, tol=tol, rtol=rtol)
    f_at = lambda d: objective(model, {k: p.detach() + v for (k, p), v in
                                       zip(params.items(), unflatten(d, params).values())}, x, y, wd)
    if backtrack:
        j, f1 = cg_backtrack(f_at, cg.iterates)
    else:
        j, f1 = len(cg.iterates) - 1, f_at(cg.iterates[-1][1])
    _, d, phi = cg.iterates[j]
    lam_f = lam.item() if torch.is_tensor(lam) else lam
    predicted = phi - 0.5 * lam_f * d.detach().dot(d.detach()).item()        # q(d) - q(0) without damping
    rho = (f1 - f0) / predicted if predicted < 0 else -1.0                   # no predicted decrease: failed
    return HFStep(G, fisher, cg, j, d, f1, rho, f_at)


def hf_apply(params: Params, step: HFStep, g: Vector, f0: float, search: bool) -> tuple[float, float]:
    """theta += alpha d in place, alpha from the Armijo line search (or 1). Returns (alpha, f after)."""
    d = step.d.detach()
    alpha, f_new = line_search(lambda a: step.f_at(a * d), f0, g.dot(d).item(), step.f1) if search else (1.0, step.f1)
    with torch.no_grad():
        for p, w in zip(params.values(), unflatten(alpha * d, params).values()):
            p.add_(w)
    return alpha, f_new


# ----------------------------------------------------------------------------- the optimisers

class HessianFree(Method):
    """Martens' HF as a plug-in of the training loop (name "hf"); ignores the loop's learning
    rate (damping and the line search set the step). State: lambda, the previous CG solution and
    counters, all restored exactly by load_state_dict."""

    name = "hf"

    def __init__(self, cfg: dict):
        self.c = c = section(cfg, HF)
        self.s = HFSettings(c.cg_iters, c.precond_exponent, c.fisher_chunk, c.gn_batch_size, c.warm_start,
                            cfg["weight_decay"])

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.damping = float(self.c.damping)
        self.prev = torch.zeros_like(flatten(model_params(self.model))).detach()
        self.steps, self.skipped, self.cg_total = 0, 0, 0

    def step(self, batch: Batch, meta_batch, lr: float) -> dict:
        """One HF iteration on batch (x (B, ...), y (B,)); `lr` is not used."""
        s, lam = self.s, self.damping
        params, loss, logits, g, f0 = hf_gradient(self.model, batch, s.weight_decay)
        x0 = s.warm_start * self.prev if s.warm_start > 0 else None
        step = hf_direction(self.model, params, batch.x, batch.y, g, f0, lam, s, x0=x0, tol=self.c.cg_tol,
                            backtrack=self.c.backtrack)
        self.prev = step.cg.x.detach()
        if self.c.damping_rule == "lm":
            self.damping = lm_damping(lam, step.rho)
        alpha, f_new = hf_apply(params, step, g, f0, self.c.line_search)
        self.steps += 1
        self.skipped += alpha == 0.0
        self.cg_total += step.cg.iters
        return {"loss": loss.detach(), "acc": (logits.argmax(1) == batch.y).float().mean(),
                "damping": lam, "rho": float(step.rho), "cg_iters": float(step.cg.iters),
                "cg_chosen": float(step.cg.iterates[step.chosen][0]), "step_size": alpha, "f_after": f_new}

    def state_dict(self) -> dict:
        return {"damping": self.damping, "prev": self.prev, "steps": self.steps,
                "skipped": self.skipped, "cg_total": self.cg_total}

    def load_state_dict(self, state: dict) -> None:
        self.damping, self.steps = state["damping"], state["steps"]
        self.skipped, self.cg_total = state["skipped"], state["cg_total"]
        self.prev = state["prev"].clone()

    def extras(self, streams) -> dict:
        return {"final_damping": self.damping, "cg_iters_mean": self.cg_total / max(self.steps, 1),
                "skipped_steps": self.skipped}


class AdamArm(Baseline):
    """Adam (L2 weight decay, the same objective as the other arms) on the loop's schedule,
    rescaled so that its peak is adam.lr."""

    name = "adam"

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.adam_lr = section(cfg, Adam).lr
        self.scale = self.adam_lr / cfg["lr"]

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.adam_lr,
                                    weight_decay=self.opt_cfg["weight_decay"])

    def step(self, batch: Batch, meta_batch, lr: float) -> dict:
        return super().step(batch, meta_batch, lr * self.scale)


# ----------------------------------------------------------------------------- MLHF: learned damping and preconditioner
#
# MLHF (Chen, Lu, Fokoue 2018) keeps the HF step above and lets two recurrent nets output the
# damping lambda_t and the diagonal preconditioner P_t of CG. What the paper establishes (methods.md
# 6.2): two RNNs, one for the damping and one for the preconditioner; coordinate-wise weight
# sharing; experience replay; a special treatment of the gradient with respect to the curvature;
# CUDA-convnet on CIFAR-10. The paper gives no formula for either net. Everything else below is our
# reconstruction [R] (methods.md 6.4), namely:
#
#   damping net (one GRU cell, H_d units, input u_t (4,), shared state h_t (H_d,)):
#       u_t = [clip(rho_{t-1}, -1, 2), clip(loss change_{t-1}, -1, 1), log10(lambda_{t-1}) / 4,
#              log10(||g_t||) / 4]
#       log lambda_t = clamp(log LM(lambda_{t-1}, rho_{t-1}) + C tanh(w_d^T h_t + b_d),
#                            log DAMPING_MIN, log MLHF_DAMPING_MAX),      C = log 1.4
#   i.e. a learned, bounded correction of the Levenberg-Marquardt rule (`lm_factor`: x3/2 when
#   rho < 1/4, x2/3 when rho > 3/4, x1 in between and at a target run's first step, which has no
#   rho yet). Since e^C = 1.4 < 3/2, the net can never overturn LM's direction: with rho > 3/4
#   lambda always falls (by a factor in [2/3 / 1.4, 2/3 * 1.4] = [0.48, 0.93]), with rho < 1/4 it
#   always rises (by [1.07, 2.1]); in between the net alone moves it, by at most 1.4 either way.
#   The net modulates how much LM moves, not which way. The ceiling MLHF_DAMPING_MAX = 1e4 (HF's
#   is 1e8) keeps the steps from shrinking to where rho is float32 rounding noise that the net
#   would be fed back. (An earlier version had a free rule, log lambda_t = log lambda_{t-1} +
#   tanh(.), no LM term, ceiling 1e8: meta-trained on 3-step episodes it learned "raise lambda"
#   and, deployed for 156 steps on CIFAR, raised it to 1e8; book/results/meta_hf-cpu.)
#   rho_{t-1} enters only through the LM factor and the features: a stop-gradient constant.
#   preconditioner net (one GRU cell, H_p units, shared by all P coordinates; input X_t (P, 3),
#   state (P, H_p)), per coordinate i:
#       X_ti = [clip(g_i / sqrt(v_i), -5, 5), (log v_i - mean_j log v_j) / 5,
#               clip(d_{t-1,i} / rms(d_{t-1}), -5, 5)],       v = EMA_0.95 of g^2 over HF steps
#       P_ti = (F_ii + wd + lambda_t)^xi * exp(PRECOND_RANGE * tanh(w_p^T h_ti + b_p))
#   i.e. a learned, bounded correction of Martens' preconditioner (F: the empirical Fisher diagonal of
#   the curvature batch; hf.precond_exponent = 0 leaves the net's factor alone).
#   The output layers start at zero: before meta-training MLHF is HF with Levenberg-Marquardt
#   damping (from hf.damping) and Martens' preconditioner, run for exactly K CG iterations.
#   step: d_t = PCG_K(G_t + lambda_t I, -g_t; P_t, x0 = warm * d_{t-1}),  theta_{t+1} = theta_t + d_t
#   (no CG backtracking; at deployment the Armijo line search of HF may shorten the step,
#   hf.mlhf_line_search; in meta-training alpha = 1).
#
# Meta-gradient. One meta-training episode starts from a replayed state (theta_0, optimiser state)
# and unrolls T HF steps on training batches B_0..B_{T-1}; its meta-loss is
#
#       L(phi) = 1/T sum_{t=1..T} log f(theta_t; B_t)        (B_T: one more batch)
#
# (the log weighs early states, loss ~2.3, and late ones, loss ~0.3, alike). `unroll` returns the
# EXACT gradient of L with respect to the nets' parameters phi under these stop-gradients:
#   g_t, G_t (its products use detached parameters), the Fisher diagonal F_t, the features u_t and
#   X_t, the CG start x0 = warm * d_{t-1} and rho_{t-1} (so LM's factor) are constants (computed
#   at the detached theta_t).
# What is differentiated: phi -> the recurrent states h_t and log lambda_t (through all t) ->
# lambda_t, P_t -> the K unrolled CG iterations -> d_t -> theta_{t+1} = theta_t + d_t (so theta_t
# carries the graph of all earlier steps) -> f(theta_t; B_t). This drops the terms in which
# theta_t changes g_t and G_t (second and third derivatives of f), like L2L-by-GD's
# "d grad / d phi = 0"; treating G as a constant is our reading of the paper's "gradient calculation
# of H". For T = 1 nothing is dropped: the gradient is the exact one of f(theta_1(phi); B_1).
# `unroll(..., frozen=records)` re-evaluates L with those constants taken from a recorded pass
# (rho included, so the piecewise LM factor is the same on both sides), so a finite difference of
# it checks the gradient exactly (tests/test_meta_hf.py).
#
# Experience replay. Meta-training keeps a buffer of hf.mlhf_replay_size optimiser states
# (theta, lambda, the nets' hidden states, v, d_{t-1}, rho, loss change, age = HF steps since its
# fresh initialisation). Each episode starts from a fresh initialisation of the target net with
# probability hf.mlhf_fresh_prob (always while the buffer is empty), else from a uniformly drawn
# buffer entry; its end state goes back into the buffer (replacing a random entry once full). So
# episodes chain into long target runs, and the buffer holds early and late training states side by
# side (their ages are reported). A replayed state keeps the nets' hidden states as they were when
# it was stored, i.e. computed with older weights of the nets. Meta-training is the `mlhf`
# arm's prepare(): it runs once before training, on the batches of the stream "mlhf_episodes" (the
# arm's own training split, shuffled apart from training's order); the loop times it as the arm's
# one_off_seconds (in the budget of the baseline at its wall-clock, not in its step cost).

PRECOND_RANGE = 3.0            # the learned factor of P lies in [e^-3, e^3]
DAMPING_CORRECTION = math.log(1.4)   # C: the net multiplies LM's lambda by [1/1.4, 1.4]; must stay < log 3/2
MLHF_DAMPING_MAX = 1e4         # MLHF's damping ceiling (HF's DAMPING_MAX is 1e8)
SQ_GRAD_DECAY = 0.95           # EMA of g^2 (the preconditioner net's v)
META_GRAD_CLIP = 1.0           # norm clip of the meta-gradient (a stabiliser)
N_DAMPING_FEATURES, N_COORD_FEATURES = 4, 3


class DampingRNN(torch.nn.Module):
    """u_t (4,), h (H,), log lambda_{t-1} (), rho_{t-1} (float, None before the first step)
    -> (log lambda_t (), h_t (H,)): LM's update of lambda_{t-1} times the net's factor
    exp(C tanh(.)) in [1/1.4, 1.4], clamped to [DAMPING_MIN, MLHF_DAMPING_MAX]."""

    def __init__(self, hidden: int):
        super().__init__()
        self.cell = torch.nn.GRUCell(N_DAMPING_FEATURES, hidden)
        self.out = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.out.weight), torch.nn.init.zeros_(self.out.bias)

    def forward(self, u, h, log_damping, rho: float | None = None):
        h = self.cell(u[None], h[None])[0]
        correction = DAMPING_CORRECTION * torch.tanh(self.out(h)[0])
        log_lm = log_damping + math.log(lm_factor(rho))                 # rho: a constant (stop-gradient)
        return (log_lm + correction).clamp(math.log(DAMPING_MIN), math.log(MLHF_DAMPING_MAX)), h


class PrecondRNN(torch.nn.Module):
    """Coordinate-wise: X (P, 3), h (P, H) -> (log factor (P,) in [-3, 3], h_t (P, H)); the same
    weights for every coordinate: 3H (3 + H) + 6H + H + 1 parameters, whatever P is."""

    def __init__(self, hidden: int):
        super().__init__()
        self.cell = torch.nn.GRUCell(N_COORD_FEATURES, hidden)
        self.out = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.out.weight), torch.nn.init.zeros_(self.out.bias)

    def forward(self, X, h):
        h = self.cell(X, h)
        return PRECOND_RANGE * torch.tanh(self.out(h)[:, 0]), h


class MLHFNets(torch.nn.Module):
    """The meta-learned parameters phi: the damping net and the preconditioner net."""

    def __init__(self, hidden_damping: int, hidden_precond: int):
        super().__init__()
        self.damping = DampingRNN(hidden_damping)
        self.precond = PrecondRNN(hidden_precond)


@dataclass
class OptState:
    """MLHF's state in one target run (P parameters). Tensors are detached except, inside an
    unroll, h_damping, log_damping and h_precond (they carry the graph from phi)."""
    log_damping: torch.Tensor      # ()
    h_damping: torch.Tensor        # (H_d,)
    h_precond: torch.Tensor        # (P, H_p)
    sq_grad: torch.Tensor          # (P,) EMA of g^2 (zeros before the first step)
    prev_update: torch.Tensor      # (P,) the previous CG solution d_{t-1}
    rho: float = 0.5               # previous reduction ratio (0.5: LM's neutral zone at the start)
    loss_change: float = 0.0       # previous (f(theta + d) - f(theta)) / f(theta) on its batch
    age: int = 0                   # HF steps since the target net's initialisation

    @staticmethod
    def fresh(P: int, hidden_damping: int, hidden_precond: int, damping: float, like: torch.Tensor):
        z = lambda *shape: torch.zeros(*shape, dtype=like.dtype, device=like.device)
        return OptState(torch.tensor(math.log(damping), dtype=like.dtype, device=like.device),
                        z(hidden_damping), z(P, hidden_precond), z(P), z(P))

    @property
    def last_rho(self) -> float | None:
        """rho of the previous step, for LM's factor; None at a target run's first step."""
        return self.rho if self.age > 0 else None

    def detached(self) -> "OptState":
        return OptState(self.log_damping.detach(), self.h_damping.detach(), self.h_precond.detach(),
                        self.sq_grad, self.prev_update, self.rho, self.loss_change, self.age)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class MLHFSettings(HFSettings):
    """The per-step settings shared by meta-training and deployment (cg_iters is K)."""
    hidden_damping: int
    hidden_precond: int
    damping0: float


def mlhf_features(state: OptState, g: Vector) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Constants of one step (stop-gradient): u (4,), X (P, 3) and the updated EMA v (P,)."""
    v = g * g if state.age == 0 else SQ_GRAD_DECAY * state.sq_grad + (1 - SQ_GRAD_DECAY) * g * g
    tiny = torch.finfo(g.dtype).tiny ** 0.5
    log10 = lambda t: math.log10(max(float(t), 1e-30))
    u = torch.tensor([min(max(state.rho, -1.0), 2.0), min(max(state.loss_change, -1.0), 1.0),
                      float(state.log_damping.detach()) / math.log(10) / 4, log10(g.norm()) / 4], dtype=g.dtype, device=g.device)
    log_v = (v + tiny).log()
    d = state.prev_update
    X = torch.stack([(g / (v + tiny).sqrt()).clamp(-5, 5), (log_v - log_v.mean()) / 5,
                     (d / (d.pow(2).mean().sqrt() + tiny)).clamp(-5, 5)], dim=1)
    return u, X, v


def mlhf_step(nets: MLHFNets, state: OptState, model, params: Params, x, y, g: Vector, f0: float,
              s: MLHFSettings, consts: dict | None = None):
    """One MLHF step at `params` on (x, y), for deployment (under no_grad) and the unroll alike:
    the features of (state, g), the nets' lambda_t and preconditioner factor, then `hf_direction`
    with exactly K CG iterations and no backtracking.

    Returns (HFStep, the next OptState, the step's constants, log factor (P,)). The constants (g,
    f0, G and the Fisher diagonal, the features, the CG start, rho, loss change) are the step's
    stop-gradients; pass them back as `consts` to redo the step with them held (g is then unused).
    """
    if consts is None:
        u, X, v = mlhf_features(state, g)
        x0 = s.warm_start * state.prev_update if s.warm_start > 0 and state.age > 0 else None
        c = {"g": g, "f0": f0, "u": u, "X": X, "v": v, "x0": x0, "curvature": None}
    else:
        c = consts
    log_lam, h_d = nets.damping(c["u"], state.h_damping, state.log_damping, state.last_rho)
    log_factor, h_p = nets.precond(c["X"], state.h_precond)
    step = hf_direction(model, params, x, y, c["g"], c["f0"], log_lam.exp(), s, factor=log_factor.exp(),
                        x0=c["x0"], tol=0.0, rtol=0.0, curvature=c["curvature"])
    if consts is None:                  # rho and the loss change: the next step's LM factor and features
        c.update(curvature=(step.G, step.fisher), rho=step.rho,
                 change=(step.f1 - c["f0"]) / max(abs(c["f0"]), 1e-12))
    new = OptState(log_lam, h_d, h_p, c["v"], step.d.detach(), c["rho"], c["change"], state.age + 1)
    return step, new, c, log_factor


def _objective(model, theta: Vector, like: Params, x, y, wd: float) -> torch.Tensor:
    """f(theta) = mean CE + wd/2 ||theta||^2 on (x, y), differentiable in theta (P,), buffers copied."""
    return F.cross_entropy(forward(model, unflatten(theta, like), x), y) + 0.5 * wd * theta.dot(theta)


def unroll(nets: MLHFNets, model, like: Params, theta0: Vector, state: OptState, batches: list,
           s: MLHFSettings, frozen: list | None = None):
    """One meta-training episode: T = len(batches) - 1 MLHF steps from theta0 (P,) and `state`.

    batches: [(x, y)] * (T + 1); step t uses batches[t] for g_t and G_t (its first s.gn_batch
    examples), the meta-loss term after it uses batches[t + 1]. Returns (meta-loss L (), theta_T
    (P,) detached, the end state detached, records): records[t] holds the step's constants (see
    `mlhf_step` and the section comment); pass them back as `frozen` to re-evaluate L with them.
    """
    T = len(batches) - 1
    theta, records, terms = theta0.detach(), [], []
    wd = s.weight_decay
    f_theta = g = f0 = None
    for t in range(T):
        x, y = batches[t]
        if frozen is None:
            if f_theta is None:                                     # the episode's first f and g
                th = theta.detach().requires_grad_(True)
                f_theta = _objective(model, th, like, x, y, wd)
                g = torch.autograd.grad(f_theta, th)[0]
            else:
                g = torch.autograd.grad(f_theta, theta, retain_graph=True)[0]   # f_theta: the last term
            f0 = f_theta.item()
        step, state, rec, _ = mlhf_step(nets, state, model, unflatten(theta.detach(), like), x, y, g, f0, s,
                                        None if frozen is None else frozen[t])
        records.append(rec)
        theta = theta + step.d
        xn, yn = batches[t + 1]
        f_theta = _objective(model, theta, like, xn, yn, wd)
        terms.append(f_theta.log())
    return torch.stack(terms).mean(), theta.detach(), state.detached(), records


def fresh_theta(model: torch.nn.Module, seed: int) -> Vector:
    """The flat parameters (P,) of a fresh initialisation of `model`'s architecture (its modules'
    own reset_parameters, seeded; the global RNG is left as it was)."""
    import copy

    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in clone.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return flatten(model_params(clone)).detach()


@dataclass
class MetaTrainConfig:
    steps: int                     # meta-iterations (episodes)
    unroll: int                    # T, HF steps per episode
    lr: float                      # Adam on phi
    replay_size: int
    fresh_prob: float
    seed: int


def meta_train(nets: MLHFNets, model, batch_at: Callable[[int], tuple], s: MLHFSettings, m: MetaTrainConfig) -> dict:
    """Meta-train `nets` in place on episodes of MLHF training of `model`'s architecture (see the
    section comment: meta-loss, stop-gradients, replay). batch_at(i) -> (x, y), the i-th training
    batch (episode e uses batches e (T + 1) ... e (T + 1) + T). Returns statistics: the meta-loss
    per episode, how many episodes started fresh, the ages of the replayed states."""
    like = {k: p.detach() for k, p in model_params(model).items()}
    P = sum(p.numel() for p in like.values())
    ref = next(iter(like.values()))
    opt = torch.optim.Adam(nets.parameters(), lr=m.lr)
    rng = torch.Generator().manual_seed(m.seed)
    replay: list[tuple[Vector, OptState]] = []
    losses, fresh = [], 0
    for it in range(m.steps):
        if not replay or torch.rand((), generator=rng).item() < m.fresh_prob:
            theta0 = fresh_theta(model, m.seed * 7919 + it).to(ref)
            state = OptState.fresh(P, s.hidden_damping, s.hidden_precond, s.damping0, ref)
            fresh += 1
        else:
            theta0, state = replay[int(torch.randint(len(replay), (), generator=rng))]
        batches = [batch_at(it * (m.unroll + 1) + j) for j in range(m.unroll + 1)]
        loss, theta_end, state_end, _ = unroll(nets, model, like, theta0, state, batches, s)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"MLHF meta-training episode {it}: meta_loss is {loss.item()} "
                                 f"(start state age {state.age}); stopped instead of training on")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(nets.parameters(), META_GRAD_CLIP)
        if not torch.isfinite(norm):
            raise NonFiniteError(f"MLHF meta-training episode {it}: the meta-gradient norm is {norm.item()}; "
                                 f"stopped instead of training on")
        opt.step()
        losses.append(loss.item())
        entry = (theta_end, state_end)
        if len(replay) < m.replay_size:
            replay.append(entry)
        elif m.replay_size > 0:
            replay[int(torch.randint(len(replay), (), generator=rng))] = entry
    ages = [st.age for _, st in replay] or [0]
    return {"meta_losses": losses, "fresh_episodes": fresh,
            "replay_age_mean": sum(ages) / len(ages), "replay_age_max": max(ages)}


class MLHF(Method):
    """MLHF as a plug-in of the training loop (name "mlhf"). prepare() meta-trains the nets
    (hf.mlhf_meta_steps episodes, 0 = keep the initial nets, i.e. HF with LM damping); every step
    then runs the learned HF step on the real model. The loop's learning rate is not used. State:
    the nets' weights, the optimiser state (OptState) and the meta-training statistics, all
    restored by load_state_dict, so a resumed run does not meta-train again."""

    name = "mlhf"

    def __init__(self, cfg: dict):
        self.c = c = section(cfg, HF)
        self.s = MLHFSettings(c.mlhf_cg_iters, c.precond_exponent, c.fisher_chunk, c.gn_batch_size, c.warm_start,
                              cfg["weight_decay"], c.mlhf_hidden, c.mlhf_hidden, c.damping)
        self.meta = dict(steps=c.mlhf_meta_steps, unroll=c.mlhf_unroll, lr=c.mlhf_meta_lr,
                         replay_size=c.mlhf_replay_size, fresh_prob=c.mlhf_fresh_prob)

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        like = flatten(model_params(self.model)).detach()
        self.meta_seed = int(torch.randint(2 ** 31 - 1, ()))   # from the global RNG, seeded by the caller
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.meta_seed)
            self.nets = MLHFNets(self.s.hidden_damping, self.s.hidden_precond).to(like)
        self.state = OptState.fresh(len(like), self.s.hidden_damping, self.s.hidden_precond, self.s.damping0, like)
        self.meta_stats = {"meta_losses": [], "fresh_episodes": 0, "replay_age_mean": 0.0, "replay_age_max": 0}
        self.steps, self.skipped = 0, 0

    def prepare(self) -> None:
        """Meta-train the nets on batches of the stream 'mlhf_episodes' (the training split)."""
        if self.meta["steps"] > 0:
            def batch_at(i):
                b = self.ctx.streams.batch("mlhf_episodes", i)
                return b.x, b.y

            self.meta_stats = meta_train(self.nets, self.model, batch_at, self.s,
                                         MetaTrainConfig(seed=self.meta_seed, **self.meta))

    def step(self, batch: Batch, meta_batch, lr: float) -> dict:
        """One learned HF step on batch (x (B, ...), y (B,))."""
        params, loss, logits, g, f0 = hf_gradient(self.model, batch, self.s.weight_decay)
        with torch.no_grad():
            step, self.state, _, log_factor = mlhf_step(self.nets, self.state, self.model, params,
                                                        batch.x, batch.y, g, f0, self.s)
        alpha, f_new = hf_apply(params, step, g, f0, self.c.mlhf_line_search)
        self.steps += 1
        self.skipped += alpha == 0.0
        return {"loss": loss.detach(), "acc": (logits.argmax(1) == batch.y).float().mean(),
                "damping": self.state.log_damping.exp(), "rho": float(step.rho), "step_size": alpha,
                "f_after": f_new, "precond_factor_min": log_factor.min().exp(),
                "precond_factor_max": log_factor.max().exp()}

    def state_dict(self) -> dict:
        return {"nets": self.nets.state_dict(), "opt_state": self.state.to_dict(), "meta_stats": self.meta_stats,
                "steps": self.steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.nets.load_state_dict(state["nets"])
        o = state["opt_state"]
        self.state = OptState(**{k: v.clone() if torch.is_tensor(v) else v for k, v in o.items()})
        self.meta_stats = dict(state["meta_stats"])
        self.steps, self.skipped = state["steps"], state["skipped"]

    def extras(self, streams) -> dict:
        ms = self.meta_stats
        losses = ms["meta_losses"]
        k = max(1, len(losses) // 5)
        return {"meta_episodes": len(losses),
                "meta_loss_first": sum(losses[:k]) / k if losses else None,
                "meta_loss_last": sum(losses[-k:]) / k if losses else None,
                "fresh_episodes": ms["fresh_episodes"], "replay_age_mean": ms["replay_age_mean"],
                "replay_age_max": ms["replay_age_max"], "final_damping": math.exp(float(self.state.log_damping)),
                "skipped_steps": self.skipped,
                "meta_params": sum(p.numel() for p in self.nets.parameters())}


# ----------------------------------------------------------------------------- chapter config and run

@dataclass
class HF:
    """Hessian-free (the `hf` arm) and MLHF (the `mlhf` arm, keys hf.mlhf_*; hf.damping is its initial
    damping, hf.precond_exponent its base xi, hf.fisher_chunk / gn_batch_size / warm_start as for hf)."""
    prefix: ClassVar[str] = "hf"
    damping: float = knob(1.0, "initial Tikhonov damping lambda", "> 0")
    damping_rule: str = knob("lm", "how lambda moves: lm (Levenberg-Marquardt) or fixed", choices=("lm", "fixed"))
    cg_iters: int = knob(50, "most CG iterations per step (Martens: 250)", ">= 1")
    cg_tol: float = knob(5e-4, "eps of Martens' relative-progress stopping rule",
                         ">= 0 (0 = no relative-progress stop)")
    precond_exponent: float = knob(0.75, "xi of the diagonal preconditioner", "in [0, 1] (0 = no preconditioner)")
    fisher_chunk: int = knob(8, "examples per gradient in the preconditioner's Fisher diagonal (1 = exact)", ">= 1")
    gn_batch_size: int = knob(32, "curvature sub-batch: the first examples of each batch", ">= 1")
    warm_start: float = knob(0.95, "CG starts from this times the previous solution", "in [0, 1] (0 = CG from zero)")
    backtrack: bool = knob(True, "CG backtracking over the saved iterates")
    line_search: bool = knob(True, "Armijo line search on the chosen direction")
    mlhf_cg_iters: int = knob(10, "K: MLHF's CG iterations per step, fixed and unrolled", ">= 1")
    mlhf_hidden: int = knob(8, "GRU units of each of MLHF's two nets", ">= 1")
    mlhf_meta_steps: int = knob(30, "meta-training episodes before training", ">= 0 (0 = untrained nets)")
    mlhf_unroll: int = knob(4, "T: HF steps per meta-training episode", ">= 1")
    mlhf_meta_lr: float = knob(1e-2, "Adam step size on the nets' weights", ">= 0")
    mlhf_replay_size: int = knob(16, "replay buffer of optimiser states",
                                 ">= 0 (0 = every episode from a fresh initialisation)")
    mlhf_fresh_prob: float = knob(0.2, "probability that an episode starts from a fresh initialisation", "in [0, 1]")
    mlhf_line_search: bool = knob(True, "Armijo line search on MLHF's learned step at deployment")


@dataclass
class Adam:
    """The Adam arm (keys adam.*)."""
    prefix: ClassVar[str] = "adam"
    lr: float = knob(1e-3, "peak learning rate of the Adam arm (the loop's schedule, rescaled)", "> 0")


SECTIONS = (HF, Adam)
DEFAULTS: dict = {}
# The paper trains "CUDA-convnet" on CIFAR-10; `cuda_convnet` is Krizhevsky's layers-18pct-sized net
# (conv5x5 32/32/64, three pools, linear; 89,578 parameters at width 32), see metabook.models.
PRESETS: dict = {
    # CI, about a minute on one core for all five arms (30 steps each; mlhf meta-trains for 6
    # episodes of 3 steps first, about 5 s of one core at width 8).
    "smoke": {"train_size": 2000, "meta_size": 200, "test_size": 1000, "epochs": 2.0, "model": "cuda_convnet",
              "width": 8, "eval_every": 0.5, "lr": 0.03, "hf.cg_iters": 10, "hf.gn_batch_size": 16, "checkpoint_every": 20,
              "hf.mlhf_cg_iters": 5, "hf.mlhf_meta_steps": 6, "hf.mlhf_unroll": 3},
    # 2 CPU cores: 156 steps per arm. Measured on one core at width 32, batch 128: an SGD step
    # ~0.2 s, an HF step ~2 s, an MLHF step ~1.4 s, one meta-training episode (T = 3) ~7 s.
    # Plain SGD needs lr 0.03 on this BatchNorm-free net: at the global 0.1 it stayed at chance (10.3%,
    # measured); 0.03 beat 0.01 on validation accuracy (37.9% vs 29.9% after 2 epochs).
    "cpu": {"train_size": 10000, "epochs": 2.0, "model": "cuda_convnet", "width": 32, "eval_every": 0.5, "lr": 0.03,
            "checkpoint_every": 20, "hf.mlhf_meta_steps": 20, "hf.mlhf_unroll": 3},
    # The ResNet-18 for the GPU presets (BatchNorm in train mode: the Gauss-Newton products
    # differentiate through the batch statistics; checked to run on a tiny ResNet, not measured on a GPU).
    "gpu": {"epochs": 30.0, "model": "resnet18", "width": 64, "batch_size": 512, "hf.gn_batch_size": 128,
            "hf.cg_iters": 100},
    "paper": {"epochs": 100.0, "model": "resnet18", "width": 64, "batch_size": 1000, "hf.gn_batch_size": 250,
              "hf.cg_iters": 250},
}



ARMS = {"baseline": Arm(Baseline), "adam": Arm(AdamArm), "hf": Arm(HessianFree), "mlhf": Arm(MLHF)}


def run(cfg: dict, seeds: list[int], out_dir=None, progress: bool = True, dataset=None) -> dict:
    """Arms at equal epochs: baseline (SGD with Nesterov momentum), adam, hf, mlhf (the chapter's
    method: its metrics are the record's); and the baseline at mlhf's wall-clock, which includes
    mlhf's meta-training (its one-off stage, also recorded as cost.meta_train_seconds)."""
    from ..train import run_arms

    record = run_arms("meta_hf", "mlhf", ARMS, cfg, seeds, out_dir=out_dir, progress=progress, dataset=dataset,
                      same_time_for="mlhf")
    record["cost"]["meta_train_seconds"] = record["arms"]["mlhf"]["one_off_seconds"]["mean"]
    return record
