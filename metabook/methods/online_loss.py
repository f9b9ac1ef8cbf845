"""Online loss-function learning (AdaLFL; Raymond, Chen, Xue, Zhang, arXiv 2301.13247 / TMLR 2025);
the derivations are in book/05_online_loss.ipynb.

The base network trains on a learned loss M_phi(y, f(x)) = sum_c l_phi(p_c, y_c) (p = softmax,
y one-hot; l_phi: R^2 -> R, two hidden layers, smooth leaky ReLU), averaged over the batch.
phi is learned in two stages: an offline initialisation (ML^3, Bechtle et al.; the paper's
Algorithm 1: Adam steps on phi down the cross-entropy of a meta batch after K plain SGD steps on
M_phi from a fresh model), then online adaptation (the paper's Algorithm 2): after every real
step with g_t = grad_theta M_{phi_t}, one Adam step on phi down the meta batch's cross-entropy at
theta' = theta_t - alpha_t g_t(phi) (chapter 1's lookahead; the real step reuses g_t).

What is the paper's and what is ours (methods.md section 4; [V] = read in the paper's text,
[R] = our reconstruction):
  [V] the output-wise loss network with 2 hidden layers of 40 units and the smooth leaky ReLU;
      offline ML^3 initialisation (S_init = 2500, one inner step) then online updates after
      every base step by unrolled differentiation through that step; task loss = cross-entropy.
  [R] inputs are softmax probabilities and one-hot targets (as in the authors' sibling code);
      a softplus on the output keeps the loss non-negative; we *sum* over classes (the scale of
      cross-entropy; the paper averages, a factor 1/C that the meta learning absorbs);
      gamma = 0.25, beta = 2 (the authors' sibling code); Kaiming-normal weights and zero biases
      (ML^3 in the authors' EvoMAL code); Adam on phi with lr 1e-3; meta batches from the held-out
      split; the virtual step is plain SGD while the real step uses Nesterov momentum and weight
      decay (with `higher`'s differentiable Nesterov the meta-gradient only scales by 1 + mu,
      which Adam ignores); offline alpha = the schedule's first lr (lfl.offline_lr overrides).
  ours: lfl.init = "cross_entropy" first regresses l_phi onto cross-entropy (a warm start for
      short offline budgets); lfl.monotone (see LossNet).

Methods: `OnlineLoss` (AdaLFL) and `OfflineLoss` (the same offline init, then frozen: the
short-horizon ML^3 baseline the paper argues against); the offline stage is their prepare().
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import knob, section
from ..data import Batch
from ..meta import Params, forward, lookahead_params, model_params
from ..train import Arm, NonFiniteError, lr_at
from .baseline import Baseline, set_lr

# ----------------------------------------------------------------------------- the loss network


class SmoothLeakyReLU(nn.Module):
    """a(x) = (1 - leak) softplus(x; beta) + leak x, softplus(x; beta) = log(1 + e^{beta x}) / beta:
    smooth, with asymptotic slopes `leak` (x -> -inf) and 1 (x -> +inf)."""

    def __init__(self, beta: float = 2.0, leak: float = 0.25):
        super().__init__()
        self.beta, self.leak = beta, leak

    def forward(self, x):
        return (1 - self.leak) * F.softplus(x, beta=self.beta) + self.leak * x


class LossNet(nn.Module):
    """l_phi(p_c, y_c): (..., 2) -> (...,) >= 0 (a softplus on the output), two hidden layers with
    `activation` "smooth_leaky_relu" (AdaLFL) or "relu" (ML^3's, which the paper says gives flat losses).

    monotone=True (lfl.monotone; ours): l_phi is non-increasing in p for the target and
    non-decreasing for the other classes, whatever phi: the net sees q = |p - y| and the weights on
    q's path enter as |w| (so l_phi is increasing and convex in q, as -log p is). An unconstrained
    l_phi learns to reward moving probability away from the target on CIFAR (cpu run, seed 0).
    """

    def __init__(self, hidden: int = 40, activation: str = "smooth_leaky_relu", beta: float = 2.0,
                 leak: float = 0.25, monotone: bool = False):
        super().__init__()
        self.monotone = monotone
        act = (lambda: SmoothLeakyReLU(beta, leak)) if activation == "smooth_leaky_relu" else nn.ReLU
        self.net = nn.Sequential(nn.Linear(2, hidden), act(), nn.Linear(hidden, hidden), act(),
                                 nn.Linear(hidden, 1))
        for layer in self.net:
            if isinstance(layer, nn.Linear):           # as ML^3 in the authors' EvoMAL code
                nn.init.kaiming_normal_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        if not self.monotone:
            return F.softplus(self.net(pairs)).squeeze(-1)
        p, y = pairs.unbind(-1)
        h = torch.stack([(p - y).abs(), y], dim=-1)
        first, act1, second, act2, last = self.net
        w1 = torch.stack([first.weight[:, 0].abs(), first.weight[:, 1]], dim=1)
        h = act2(F.linear(act1(F.linear(h, w1, first.bias)), second.weight.abs(), second.bias))
        return F.softplus(F.linear(h, last.weight.abs(), last.bias)).squeeze(-1)


def loss_of_probs(loss_net: nn.Module, probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """M_phi per example: probs, onehot (B, C) -> (B,), the sum over classes of l_phi(p_c, y_c)."""
    return loss_net(torch.stack([probs, onehot], dim=-1)).sum(dim=1)


def loss_value(loss_net: nn.Module, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean"):
    """The learned loss: logits (B, C), y (B,) -> the batch mean, or (B,) with reduction="none"."""
    probs = logits.softmax(dim=1)
    per_example = loss_of_probs(loss_net, probs, F.one_hot(y, logits.shape[1]).to(probs.dtype))
    return per_example if reduction == "none" else per_example.mean()


P_GRID = torch.linspace(0.01, 0.99, 50)


@torch.no_grad()
def loss_curve(loss_net: nn.Module, num_classes: int, p_true: torch.Tensor = P_GRID) -> torch.Tensor:
    """M_phi against the true class's probability p_true (G,) -> (G,), the other classes sharing
    1 - p_true equally (cross-entropy would give -log p_true)."""
    param = next(loss_net.parameters())
    p = p_true.to(device=param.device, dtype=param.dtype)
    probs = ((1 - p) / (num_classes - 1)).unsqueeze(1).repeat(1, num_classes)       # (G, C)
    probs[:, 0] = p
    onehot = torch.zeros_like(probs)
    onehot[:, 0] = 1
    return loss_of_probs(loss_net, probs, onehot)


def fit_to_cross_entropy(loss_net: nn.Module, steps: int = 1000, lr: float = 1e-2, seed: int = 0) -> float:
    """Warm start (ours): regress l_phi(p, y) onto -y log p with Adam, p half uniform, half
    log-uniform in [1e-3, 1] (close, not exact: the curve turns up near p = 1). Returns the last MSE."""
    g = torch.Generator().manual_seed(seed)
    param = next(loss_net.parameters())
    opt = torch.optim.Adam(loss_net.parameters(), lr=lr)
    for _ in range(steps):
        u = torch.rand(512, generator=g)
        p = torch.cat([u[:256] * 0.999 + 1e-3, torch.exp(u[256:] * math.log(1e-3))])         # (512,) in [1e-3, 1]
        y = (torch.rand(512, generator=g) < 0.5).to(p.dtype)
        err = F.mse_loss(loss_net(torch.stack([p, y], dim=1).to(param)), (-y * p.log()).to(param))
        opt.zero_grad(set_to_none=True)
        err.backward()
        opt.step()
    return err.item()


# ----------------------------------------------------------------------------- online step (AdaLFL)

def online_meta_step(model: nn.Module, loss_net: nn.Module, x, y, x_meta, y_meta, lr: float):
    """One AdaLFL step's gradients at (theta_t, phi_t) -> (g_theta, g_phi, info).

    g_theta (detached, one per model parameter) = grad_theta M_phi on (x, y), for the real step;
    g_phi = grad_phi of cross-entropy on (x_meta, y_meta) at theta' = theta - lr g_theta(phi).
    info (0-d tensors): loss (M_phi), ce, meta_loss (at theta'), acc, and grad_ratio =
    ||dM/dlogits|| / ||dCE/dlogits|| (the learned loss's implicit lr scale). The forward on x is
    the real one (BatchNorm running stats update once).
    """
    params = model_params(model)
    logits = model(x)                                                                # (B, C)
    inner = loss_value(loss_net, logits, y)
    g_logits, *g_theta = torch.autograd.grad(inner, [logits, *params.values()], create_graph=True)
    fast = lookahead_params(params, g_theta, lr)                                     # theta'(phi)
    meta = F.cross_entropy(forward(model, fast, x_meta), y_meta)
    g_phi = torch.autograd.grad(meta, list(loss_net.parameters()))
    with torch.no_grad():           # 0-d tensors: no host sync
        ce_grad = (logits.softmax(1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)) / len(y)
        info = {"loss": inner.detach(), "ce": F.cross_entropy(logits, y), "meta_loss": meta.detach(),
                "grad_ratio": g_logits.norm() / ce_grad.norm().clamp_min(1e-12),
                "acc": (logits.argmax(1) == y).float().mean()}
    return [g.detach() for g in g_theta], list(g_phi), info


# ----------------------------------------------------------------------------- offline init (ML^3)

def unrolled_meta_loss(model: nn.Module, params: Params, loss_net: nn.Module, batches, meta_batch,
                       lr: float) -> torch.Tensor:
    """Cross-entropy on meta_batch (x, y) after plain SGD steps on M_phi from `params`, one per
    (x, y) in `batches`; differentiable in phi (and params). Buffers are copied (running stats kept)."""
    fast = params
    for x, y in batches:
        inner = loss_value(loss_net, forward(model, fast, x), y)
        grads = torch.autograd.grad(inner, list(fast.values()), create_graph=True)
        fast = lookahead_params(fast, grads, lr)
    x_meta, y_meta = meta_batch
    return F.cross_entropy(forward(model, fast, x_meta), y_meta)


def offline_init(model: nn.Module, loss_net: nn.Module, train_batches, meta_batches, *, steps: int,
                 horizon: int, lr: float, meta_lr: float) -> list[float]:
    """ML^3: `steps` Adam steps on phi, each unrolling `horizon` SGD steps at rate `lr` from a fresh
    initialisation of a copy of `model` (global RNG; `model` is unchanged). train_batches /
    meta_batches: iterators of Batch. Returns the meta loss of every step."""
    template = copy.deepcopy(model)
    opt = torch.optim.Adam(loss_net.parameters(), lr=meta_lr)
    trace = []
    for i in range(steps):
        for m in template.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        params = {k: p.detach().clone().requires_grad_(True) for k, p in model_params(template).items()}
        batches = [(b.x, b.y) for b in (next(train_batches) for _ in range(horizon))]
        mb = next(meta_batches)
        meta = unrolled_meta_loss(template, params, loss_net, batches, (mb.x, mb.y), lr)
        if not torch.isfinite(meta):
            raise NonFiniteError(f"offline init step {i}: meta_loss is {meta.item()} — "
                                 f"lower lfl.offline_meta_lr or lfl.offline_lr")
        opt.zero_grad(set_to_none=True)
        meta.backward(inputs=list(loss_net.parameters()))
        opt.step()
        trace.append(meta.item())
    return trace


# ----------------------------------------------------------------------------- methods for the loop

class OfflineLoss(Baseline):
    """ML^3-style: the offline stage (prepare), then plain steps on the frozen loss. Keeps the
    offline meta-loss trace and seconds, and the loss curve at every evaluation (`snapshots`)."""

    name = "offline_loss"
    uses_meta = True       # its offline stage needs the meta split (run_arms checks meta_size early)

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.c = c = section(cfg, LFL)
        self.offline = dict(steps=c.offline_steps, horizon=c.offline_horizon,
                            lr=c.offline_lr or lr_at(0, 1, cfg), meta_lr=c.offline_meta_lr)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        param, c = next(ctx.model.parameters()), self.c
        self.loss_net = LossNet(c.hidden, c.activation, c.beta, c.leak, c.monotone)
        self.loss_net.to(device=param.device, dtype=param.dtype)
        self.meta_opt = torch.optim.Adam(self.loss_net.parameters(), lr=c.meta_lr)   # OnlineLoss's
        self.steps, self.offline_trace, self.offline_seconds, self.snapshots = 0, [], 0.0, []

    def prepare(self) -> None:
        """The offline stage (after the optional fit to cross-entropy) on the streams 'offline'
        (training split) and 'offline_meta' (meta split); then the first snapshot."""
        t0, streams = time.perf_counter(), self.ctx.streams
        if self.c.init == "cross_entropy":
            fit_to_cross_entropy(self.loss_net, seed=self.ctx.seed)
        self.offline_trace = offline_init(
            self.model, self.loss_net, (streams.batch("offline", i) for i in itertools.count()),
            (streams.batch("offline_meta", i, split="meta") for i in itertools.count()), **self.offline)
        self.offline_seconds = time.perf_counter() - t0
        self.snapshot()

    def snapshot(self) -> None:
        self.snapshots.append({"step": self.steps, "epoch": self.steps / self.ctx.steps_per_epoch,
                               "loss": loss_curve(self.loss_net, self.ctx.num_classes).tolist()})

    def step(self, batch: Batch, meta_batch: Batch, lr: float) -> dict:
        set_lr(self.opt, lr)
        self.steps += 1
        return self.update(batch, meta_batch, lr)

    def update(self, batch, meta_batch, lr) -> dict:
        """A plain step on the frozen M_phi; `loss` is cross-entropy (comparable across arms)."""
        logits = self.model(batch.x)
        learned = loss_value(self.loss_net, logits, batch.y)
        self.opt.zero_grad(set_to_none=True)
        learned.backward(inputs=list(self.model.parameters()))
        self.opt.step()
        with torch.no_grad():
            return {"loss": F.cross_entropy(logits, batch.y), "learned_loss": learned.detach(),
                    "acc": (logits.argmax(1) == batch.y).float().mean()}

    def diagnostics(self, streams) -> dict:
        self.snapshot()
        return {}

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "loss_net": self.loss_net.state_dict(),
                "meta_opt": self.meta_opt.state_dict(), "steps": self.steps,
                "offline_trace": list(self.offline_trace), "offline_seconds": self.offline_seconds,
                "snapshots": list(self.snapshots)}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.loss_net.load_state_dict(state["loss_net"])
        self.meta_opt.load_state_dict(state["meta_opt"])
        self.steps, self.snapshots = state["steps"], list(state["snapshots"])
        self.offline_trace, self.offline_seconds = list(state["offline_trace"]), state["offline_seconds"]

    def extras(self, streams) -> dict:
        """The loss curves (after the offline stage, at every evaluation, at the end) and the
        offline stage's meta-loss trace and seconds."""
        if not self.snapshots or self.snapshots[-1]["step"] != self.steps:
            self.snapshot()
        return {"p_true": P_GRID.tolist(), "num_classes": self.ctx.num_classes, "curves": self.snapshots,
                "offline_meta_loss": self.offline_trace, "offline_seconds": self.offline_seconds}


class OnlineLoss(OfflineLoss):
    """AdaLFL: the same offline stage, then phi is updated after every base step."""

    name = "online_loss"

    def update(self, batch, meta_batch, lr) -> dict:
        g_theta, g_phi, info = online_meta_step(self.model, self.loss_net, batch.x, batch.y,
                                                meta_batch.x, meta_batch.y, lr)
        for p, g in zip(model_params(self.model).values(), g_theta):   # real step with phi_t
            p.grad = g
        self.opt.step()
        for p, g in zip(self.loss_net.parameters(), g_phi):            # then phi_t -> phi_{t+1}
            p.grad = g
        self.meta_opt.step()
        return {"loss": info["ce"], "learned_loss": info["loss"], "meta_loss": info["meta_loss"],
                "grad_ratio": info["grad_ratio"], "acc": info["acc"]}


# ----------------------------------------------------------------------------- config and the chapter

@dataclass
class LFL:
    """The learned loss and its two stages (keys lfl.*); [V] the paper's, [R] our reconstruction."""
    prefix: ClassVar[str] = "lfl"
    hidden: int = knob(40, "units in each of the loss network's 2 hidden layers [V]", ">= 1")
    init: str = knob("random", "phi before the offline stage: random [V] or cross_entropy (l_phi fitted to CE; ours)",
                     choices=("random", "cross_entropy"))
    activation: str = knob("smooth_leaky_relu", "hidden activation: smooth_leaky_relu (AdaLFL) or relu (ML^3)",
                           choices=("smooth_leaky_relu", "relu"))
    beta: float = knob(2.0, "smoothness beta of the smooth leaky ReLU [R]", "> 0")
    leak: float = knob(0.25, "its leak gamma: slope as x -> -inf [R]", "in [0, 1)")
    meta_lr: float = knob(1e-3, "Adam step size on phi in the online stage [R]", ">= 0")
    offline_steps: int = knob(2500, "S_init: Adam steps on phi in the offline (ML^3) stage [V]", ">= 0")
    offline_horizon: int = knob(1, "SGD steps unrolled per offline step [V: 1]", ">= 1")
    offline_meta_lr: float = knob(1e-3, "Adam step size on phi in the offline stage [R]", ">= 0")
    offline_lr: float = knob(0.0, "alpha of the unrolled offline steps [R]", ">= 0 (0 = the schedule's first lr)")
    monotone: bool = knob(False, "ours: l_phi monotone in p for each y (false = the paper's net)")
    same_time: bool = knob(True, "also run the baseline for online_loss's wall-clock")


SECTIONS = (LFL,)
DEFAULTS: dict = {}
PRESETS: dict = {
    # CI: about a minute on 2 cores (31 steps per arm, 10 offline steps).
    "smoke": {"train_size": 2000, "meta_size": 500, "epochs": 2.0, "checkpoint_every": 50,
              "lfl.init": "cross_entropy", "lfl.offline_steps": 10, "lfl.offline_meta_lr": 1e-2},
    # 2 cores, about 11 minutes for the four arms: 468 steps per arm; an online step and an
    # offline (ML^3) step cost about 4.5x a plain step. 100 offline steps cannot shape a random
    # loss network on CIFAR (measured: flat curve), so the cpu run warm-starts it at cross-entropy.
    "cpu": {"train_size": 10000, "epochs": 6.0, "lfl.init": "cross_entropy", "lfl.offline_steps": 100,
            "lfl.offline_meta_lr": 1e-2},
    # Not measured yet on a GPU.
    "gpu": {"epochs": 20.0, "model": "resnet18", "width": 64, "lfl.offline_steps": 500},
    # 150,000 steps of batch 128 on 45,000 images (10% held out); lr 0.01 as in the EvoMAL configs
    # (which decay it 10x at 100k and 135k steps; our loop's nearest schedule is cosine).
    "paper": {"epochs": 427.0, "meta_size": 5000, "model": "resnet18", "width": 64, "lr": 0.01,
              "schedule": "cosine", "warmup": 0.0, "lfl.offline_steps": 2500},
}
ARMS = {"baseline": Arm(Baseline), "offline_loss": Arm(OfflineLoss), "online_loss": Arm(OnlineLoss)}


def run(cfg: dict, seeds: list[int], out_dir=None, progress: bool = True, dataset=None) -> dict:
    """Arms at equal epochs: baseline (cross-entropy), offline_loss (ML^3 init, frozen),
    online_loss (AdaLFL); and, with lfl.same_time, the baseline at online_loss's wall-clock (offline
    init included)."""
    from ..train import run_arms

    return run_arms("online_loss", "online_loss", ARMS, cfg, seeds, out_dir=out_dir, progress=progress,
                    dataset=dataset, same_time_for="online_loss" if cfg["lfl.same_time"] else None)
