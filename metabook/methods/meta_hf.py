"""Hessian-free optimisation from scratch (Martens 2010), the hand-tuned baseline of MLHF.

MLHF (Chen, Lu, Fokoue 2018, arXiv 1805.08462) keeps Martens' Hessian-free (HF) framework and
replaces two hand-tuned parts of it, the damping rule and the preconditioner, by recurrent nets.
This file is the framework those nets plug into; every equation below is one function.

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
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import jvp, vjp

from ..data import Batch
from ..meta import Params, forward, model_params
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


def gnvp(model: torch.nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, v: Vector,
         weight_decay: float = 0.0) -> Vector:
    """G v of the mean cross-entropy of (x, y) at `params`: v (P,) -> (P,). One-off convenience;
    an optimiser builds a `GaussNewton` once per step and calls it many times."""
    return GaussNewton(model, params, x, y, weight_decay)(v)


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

def lm_damping(damping: float, rho: float) -> float:
    """Levenberg-Marquardt: more damping when the model over-promised (rho < 1/4), less when it
    predicted well (rho > 3/4), unchanged in between."""
    if rho < RHO_LOW:
        damping *= LM_BOOST
    elif rho > RHO_HIGH:
        damping *= LM_DROP
    return min(max(damping, DAMPING_MIN), DAMPING_MAX)


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


# ----------------------------------------------------------------------------- the optimiser

class HessianFree:
    """Martens' HF as a plug-in of the training loop (name "hf"); ignores the loop's learning
    rate (damping and the line search set the step). State: lambda, the previous CG solution and
    counters, all restored exactly by load_state_dict."""

    name = "hf"
    uses_meta = False

    def __init__(self, cfg: dict):
        self.damping0 = cfg["hf.damping"]
        self.rule = cfg["hf.damping_rule"]
        self.cg_iters, self.cg_tol = cfg["hf.cg_iters"], cfg["hf.cg_tol"]
        self.xi, self.chunk = cfg["hf.precond_exponent"], cfg["hf.fisher_chunk"]
        self.gn_batch, self.decay = cfg["hf.gn_batch_size"], cfg["hf.warm_start"]
        self.backtrack, self.search = cfg["hf.backtrack"], cfg["hf.line_search"]
        self.weight_decay = cfg["weight_decay"]

    def setup(self, model, data, cfg):
        self.model = model
        self.damping = float(self.damping0)
        self.prev = torch.zeros_like(flatten(model_params(model))).detach()
        self.steps, self.skipped, self.cg_total = 0, 0, 0

    def objective(self, params: Params, x, y) -> float:
        """f at `params` on (x, y): mean cross-entropy + wd/2 ||theta||^2, buffers untouched."""
        with torch.no_grad():
            loss = F.cross_entropy(forward(self.model, params, x), y)
            return loss.item() + 0.5 * self.weight_decay * sum((p * p).sum() for p in params.values()).item()

    def step(self, batch: Batch, meta_batch, lr: float) -> dict:
        """One HF iteration on batch (x (B, ...), y (B,)); `lr` is not used."""
        model, wd = self.model, self.weight_decay
        params = model_params(model)
        theta = flatten(params).detach()                                          # (P,)
        # 1. gradient on the whole batch (the one real forward: BatchNorm statistics update here)
        logits = model(batch.x)
        loss = F.cross_entropy(logits, batch.y)
        g = flatten(torch.autograd.grad(loss, list(params.values()))).detach() + wd * theta
        f0 = loss.item() + 0.5 * wd * theta.dot(theta).item()
        # 2. curvature on a sub-batch, preconditioner, CG on (G + lambda I) d = -g
        m = min(self.gn_batch, len(batch.y))
        G = GaussNewton(model, params, batch.x[:m], batch.y[:m], wd)
        lam = self.damping
        precond = (G.fisher_diagonal(self.chunk) + wd + lam) ** self.xi if self.xi > 0 else None
        cg = pcg(lambda v: G(v) + lam * v, -g, precond, x0=self.decay * self.prev if self.decay > 0 else None,
                 max_iters=self.cg_iters, tol=self.cg_tol)
        self.prev = cg.x.detach()
        # 3. choose a CG iterate, judge the model (rho), adapt lambda, search the step size
        f_at = lambda d: self.objective({k: p.detach() + v for (k, p), v in
                                          zip(params.items(), unflatten(d, params).values())}, batch.x, batch.y)
        if self.backtrack:
            j, f1 = cg_backtrack(f_at, cg.iterates)
        else:
            j, f1 = len(cg.iterates) - 1, f_at(cg.iterates[-1][1])
        _, d, phi = cg.iterates[j]
        predicted = phi - 0.5 * lam * d.dot(d).item()            # q(d) - q(0) without the damping term
        rho = (f1 - f0) / predicted if predicted < 0 else -1.0   # no predicted decrease: a failed step
        if self.rule == "lm":
            self.damping = lm_damping(lam, rho)
        alpha, f_new = line_search(lambda a: f_at(a * d), f0, g.dot(d).item(), f1) if self.search else (1.0, f1)
        with torch.no_grad():
            for p, v in zip(params.values(), unflatten(alpha * d, params).values()):
                p.add_(v)
        self.steps += 1
        self.skipped += alpha == 0.0
        self.cg_total += cg.iters
        return {"loss": loss.item(), "acc": (logits.argmax(1) == batch.y).float().mean().item(),
                "damping": lam, "rho": float(rho), "cg_iters": float(cg.iters),
                "cg_chosen": float(cg.iterates[j][0]), "step_size": alpha, "f_after": f_new}

    def state_dict(self) -> dict:
        return {"damping": self.damping, "prev": self.prev, "steps": self.steps,
                "skipped": self.skipped, "cg_total": self.cg_total}

    def load_state_dict(self, state: dict) -> None:
        self.damping, self.steps = state["damping"], state["steps"]
        self.skipped, self.cg_total = state["skipped"], state["cg_total"]
        self.prev = state["prev"].clone()

    def extras(self) -> dict:
        return {"final_damping": self.damping, "cg_iters_mean": self.cg_total / max(self.steps, 1),
                "skipped_steps": self.skipped}


class AdamArm(Baseline):
    """Adam (L2 weight decay, the same objective as the other arms) on the loop's schedule,
    rescaled so that its peak is adam.lr."""

    name = "adam"

    def setup(self, model, data, cfg):
        self.model = model
        self.scale = cfg["adam.lr"] / cfg["lr"]
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg["adam.lr"], weight_decay=cfg["weight_decay"])

    def step(self, batch: Batch, meta_batch, lr: float) -> dict:
        return super().step(batch, meta_batch, lr * self.scale)


# ----------------------------------------------------------------------------- chapter config and run

DEFAULTS: dict = {
    "hf.damping": 1.0,            # initial Tikhonov damping lambda
    "hf.damping_rule": "lm",      # lm (Levenberg-Marquardt) | fixed
    "hf.cg_iters": 50,            # most CG iterations per step (Martens: 250)
    "hf.cg_tol": 5e-4,            # eps of Martens' relative-progress stopping rule
    "hf.precond_exponent": 0.75,  # xi of the diagonal preconditioner (0 = none)
    "hf.fisher_chunk": 8,         # examples per gradient in the preconditioner's diagonal (1 = exact)
    "hf.gn_batch_size": 32,       # curvature sub-batch (the first examples of each batch)
    "hf.warm_start": 0.95,        # CG starts from this times the previous solution (0 = from zero)
    "hf.backtrack": True,         # CG backtracking over the saved iterates
    "hf.line_search": True,       # Armijo line search on the chosen direction
    "adam.lr": 1e-3,              # peak learning rate of the Adam arm
}
# The paper trains CUDA-convnet (conv5x5-64, pool, LRN, conv5x5-64, LRN, pool, FC-384, FC-192);
# metabook.models has no such model yet, so every preset uses the small CNN for now.
PRESETS: dict = {
    # CI, about a minute on one core for all four arms (30 steps each).
    "smoke": {"train_size": 2000, "meta_size": 200, "test_size": 1000, "epochs": 2.0, "width": 8,
              "eval_every": 0.5, "hf.cg_iters": 10, "hf.gn_batch_size": 16, "checkpoint_every": 20},
    # 2 CPU cores: 234 steps per arm; an HF step costs about 10-15 SGD steps at these settings.
    "cpu": {"train_size": 10000, "epochs": 3.0, "width": 16, "eval_every": 0.5, "checkpoint_every": 20},
    "gpu": {"epochs": 30.0, "batch_size": 512, "hf.gn_batch_size": 128, "hf.cg_iters": 100},
    "paper": {"epochs": 100.0, "batch_size": 1000, "hf.gn_batch_size": 250, "hf.cg_iters": 250},
}


def run(cfg: dict, seeds: list[int], out_dir=None, progress: bool = True, dataset=None) -> dict:
    """Arms at equal epochs: baseline (SGD with Nesterov momentum), adam, hf; and the baseline at
    hf's wall-clock. (MLHF, the meta-learned damping and preconditioner, is to come.)"""
    from ..train import run_arms

    return run_arms("meta_hf", "hf", {"baseline": Baseline, "adam": AdamArm, "hf": HessianFree},
                    cfg, seeds, out_dir=out_dir, progress=progress, dataset=dataset, same_time_for="hf")
