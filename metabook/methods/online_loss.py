"""Online loss-function learning (AdaLFL; Raymond, Chen, Xue, Zhang, arXiv 2301.13247 / TMLR 2025).

The base network trains on a learned loss M_phi(y, f(x)) built from a small net l_phi applied to
each class's (p_c, y_c), in two forms (`lfl.net`: "chapter", ours, or "authors", the authors'
later code; see LossNet). `OnlineLoss` learns phi offline first (ML^3, in its prepare()), then by
one Adam step after every real step, down the meta batch's cross-entropy one plain-SGD step ahead;
`OfflineLoss` freezes phi after the offline stage. Chapter 5 derives both and lists what is the
paper's and what is ours.
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

from ..config import ConfigError, knob, section
from ..data import Batch
from ..meta import Params, forward, lookahead_params, model_params
from ..train import Arm, Experiment, NonFiniteError, lr_at, run_experiment
from .baseline import Baseline, set_lr

# ----------------------------------------------------------------------------- the loss network

NETS = ("chapter", "authors")            # lfl.net: the two forms of M_phi (module docstring)


class SmoothLeakyReLU(nn.Module):
    """a(x) = (1 - leak) softplus(x; beta) + leak x, softplus(x; beta) = log(1 + e^{beta x}) / beta:
    smooth, with asymptotic slopes `leak` (x -> -inf) and 1 (x -> +inf)."""

    def __init__(self, beta: float = 2.0, leak: float = 0.25):
        super().__init__()
        self.beta, self.leak = beta, leak

    def forward(self, x):
        return (1 - self.leak) * F.softplus(x, beta=self.beta) + self.leak * x


class LossNet(nn.Module):
    """l_phi(p_c, y_c): (..., 2) -> (...,), two hidden layers with `activation` "smooth_leaky_relu"
    (AdaLFL) or "relu" (ML^3's, which the paper says gives flat losses).

    net="chapter": Kaiming-normal weights, zero biases, a softplus on the output (>= 0);
    loss_value sums it over classes. net="authors" (the authors' NPBML LearnedLossNetwork): no
    biases, PyTorch's default init, no output activation (any sign); loss_value averages it over
    classes and adds cross-entropy.

    monotone=True (lfl.monotone; ours): l_phi is non-increasing in p for the target and
    non-decreasing for the other classes, whatever phi: the net sees q = |p - y| and the weights on
    q's path enter as |w| (so l_phi is increasing and convex in q, as -log p is). An unconstrained
    l_phi learns to reward moving probability away from the target on CIFAR (cpu run, seed 0).
    """

    def __init__(self, hidden: int = 40, activation: str = "smooth_leaky_relu", beta: float = 2.0,
                 leak: float = 0.25, monotone: bool = False, net: str = "chapter"):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"net={net!r} is not valid; choose one of: {', '.join(NETS)}")
        if monotone and net != "chapter":
            raise ValueError("monotone=True needs net='chapter' (its construction uses the biases and the softplus)")
        self.monotone, self.kind = monotone, net
        bias = net == "chapter"
        act = (lambda: SmoothLeakyReLU(beta, leak)) if activation == "smooth_leaky_relu" else nn.ReLU
        self.net = nn.Sequential(nn.Linear(2, hidden, bias=bias), act(), nn.Linear(hidden, hidden, bias=bias),
                                 act(), nn.Linear(hidden, 1, bias=bias))
        if net == "chapter":
            for layer in self.net:
                if isinstance(layer, nn.Linear):           # as ML^3 in the authors' EvoMAL code
                    nn.init.kaiming_normal_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        if self.kind == "authors":
            return self.net(pairs).squeeze(-1)
        if not self.monotone:
            return F.softplus(self.net(pairs)).squeeze(-1)
        p, y = pairs.unbind(-1)
        h = torch.stack([(p - y).abs(), y], dim=-1)
        first, act1, second, act2, last = self.net
        w1 = torch.stack([first.weight[:, 0].abs(), first.weight[:, 1]], dim=1)
        h = act2(F.linear(act1(F.linear(h, w1, first.bias)), second.weight.abs(), second.bias))
        return F.softplus(F.linear(h, last.weight.abs(), last.bias)).squeeze(-1)


def loss_of_probs(loss_net: LossNet, probs: torch.Tensor, onehot: torch.Tensor,
                  log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """M_phi per example: probs, onehot (B, C) -> (B,). "chapter": sum_c l_phi(p_c, y_c);
    "authors": -sum_c y_c log p_c + mean_c l_phi(p_c, y_c) (log_probs, if given, is log p)."""
    terms = loss_net(torch.stack([probs, onehot], dim=-1))                          # (B, C)
    if loss_net.kind == "chapter":
        return terms.sum(dim=1)
    log_probs = probs.log() if log_probs is None else log_probs
    return -(onehot * log_probs).sum(dim=1) + terms.mean(dim=1)


def loss_value(loss_net: LossNet, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean"):
    """The learned loss: logits (B, C), y (B,) -> the batch mean, or (B,) with reduction="none"."""
    log_probs = logits.log_softmax(dim=1)
    probs = log_probs.exp()
    per_example = loss_of_probs(loss_net, probs, F.one_hot(y, logits.shape[1]).to(probs.dtype), log_probs)
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


def fit_to_cross_entropy(loss_net: LossNet, steps: int = 1000, lr: float = 1e-2, seed: int = 0) -> float:
    """Warm start (ours): regress l_phi(p, y) with Adam so that M_phi is close to cross-entropy:
    onto -y log p ("chapter"), onto 0 ("authors", which adds cross-entropy itself); p half
    uniform, half log-uniform in [1e-3, 1] (close, not exact: the chapter net's curve turns up
    near p = 1). Returns the last MSE."""
    g = torch.Generator().manual_seed(seed)
    param = next(loss_net.parameters())
    opt = torch.optim.Adam(loss_net.parameters(), lr=lr)
    for _ in range(steps):
        u = torch.rand(512, generator=g)
        p = torch.cat([u[:256] * 0.999 + 1e-3, torch.exp(u[256:] * math.log(1e-3))])         # (512,) in [1e-3, 1]
        y = (torch.rand(512, generator=g) < 0.5).to(p.dtype)
        target = -y * p.log() if loss_net.kind == "chapter" else torch.zeros_like(p)
        err = F.mse_loss(loss_net(torch.stack([p, y], dim=1).to(param)), target.to(param))
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
    one_off_units = ("lfl.offline_steps", 5)
    uses_meta = True       # its offline stage needs the meta split (run_arms checks meta_size early)

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.c = c = section(cfg, LFL)
        if c.monotone and c.net != "chapter":
            raise ConfigError(f"lfl.monotone=true needs lfl.net=chapter (got lfl.net={c.net}); "
                              f"set lfl.monotone=false for the authors' network")
        self.offline = dict(steps=c.offline_steps, horizon=c.offline_horizon,
                            lr=c.offline_lr or lr_at(0, 1, cfg), meta_lr=c.offline_meta_lr)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        param, c = next(ctx.model.parameters()), self.c
        self.loss_net = LossNet(c.hidden, c.activation, c.beta, c.leak, c.monotone, c.net)
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
        """A plain step on the frozen M_phi (the network's forward in mixed precision when cfg['amp']
        asks, the loss network in fp32); `loss` is cross-entropy (comparable across arms)."""
        with self.autocast():
            logits = self.model(batch.x)
        logits = logits.float()
        learned = loss_value(self.loss_net, logits, batch.y)
        self.descend(learned, inputs=list(self.model.parameters()))
        with torch.no_grad():
            return {"loss": F.cross_entropy(logits, batch.y), "learned_loss": learned.detach(),
                    "acc": (logits.argmax(1) == batch.y).float().mean()}

    def diagnostics(self, streams) -> dict:
        self.snapshot()
        return {}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "loss_net": self.loss_net.state_dict(),      # opt (and grad scaler)
                "meta_opt": self.meta_opt.state_dict(), "steps": self.steps,
                "offline_trace": list(self.offline_trace), "offline_seconds": self.offline_seconds,
                "snapshots": list(self.snapshots)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
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
    autocasts = False      # its real step uses the fp32 gradient of the meta step's unroll

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
    net: str = knob("chapter", "the loss network: chapter (softplus output, biases, sum over classes) or "
                    "authors (CE + mean over classes of a bias-free net, no output activation) [S]",
                    choices=NETS)
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
    offline_meta_lr: float = knob(1e-3, "Adam step size on phi in the offline stage [S: EvoMAL's ML^3]", ">= 0")
    offline_lr: float = knob(0.0, "alpha of the unrolled offline steps [R]", ">= 0 (0 = the schedule's first lr)")
    monotone: bool = knob(False, "ours: l_phi monotone in p for each y (lfl.net=chapter only; false = unconstrained)")
    arms: list[str] = knob(["baseline", "offline_loss", "online_loss", "offline_authors", "online_authors"],
                           "arms to run: baseline and an online arm are required; the method is online_loss "
                           "when it runs, else online_authors",
                           choices=("baseline", "offline_loss", "online_loss", "offline_authors", "online_authors"))
    same_time: bool = knob(True, "also run the baseline for the method's wall-clock")


SECTIONS = (LFL,)
# The base optimiser of every preset and arm, as the authors' EvoMAL CIFAR configs [S]: SGD, lr
# 0.01, Nesterov momentum 0.9, weight decay 5e-4, no warm-up. They decay the lr 10x at 2/3 and
# again at 9/10 of the run; our loop's nearest schedule is cosine (a listed deviation).
DEFAULTS: dict = {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
                  "schedule": "cosine", "warmup": 0.0}
PRESETS: dict = {
    # CI: 14 steps per arm on 1,000 images, 5 offline steps.
    "smoke": {"train_size": 1000, "meta_size": 500, "test_size": 500, "epochs": 2.0, "checkpoint_every": 50,
              "lfl.init": "cross_entropy", "lfl.offline_steps": 5},
    # 2 cores: 312 steps per arm (6 epochs, 468 steps, planned 24.5 min of one CPU thread: over
    # the cpu preset's 20); an online step costs about 3.5x a plain one. 100 offline steps cannot
    # shape a random chapter net on CIFAR (measured: flat curve), so the chapter net is
    # warm-started at cross-entropy; the authors' arms start random.
    "cpu": {"train_size": 10000, "epochs": 4.0, "lfl.init": "cross_entropy", "lfl.offline_steps": 100},
    # The verdict's record (issue 19): the authors' loss network online and frozen from the same offline
    # stage (500 steps, as gpu), cross-entropy, the baseline at the online arm's wall-clock and at twice
    # the epochs; 20,000 images for 20 epochs (3,120 steps). 3 seeds, hours.
    "converged": {"train_size": 20000, "epochs": 20.0, "lfl.offline_steps": 500,
                  "lfl.arms": ["baseline", "offline_authors", "online_authors"]},
    # A T4 in about half an hour for the five arms (python -m metabook plan online_loss --preset gpu).
    "gpu": {"train_size": 20000, "epochs": 15.0, "model": "resnet18", "width": 16, "lfl.offline_steps": 500},
    # 150,000 steps of batch 128 on 45,000 images (10% held out), as the EvoMAL configs.
    "paper": {"epochs": 427.0, "meta_size": 5000, "model": "resnet18", "width": 64, "lfl.offline_steps": 2500},
}
# The authors' network starts from a random phi, as the paper (its cross-entropy term is the warm start).
AUTHORS = {"lfl.net": "authors", "lfl.init": "random"}
ARMS = {"baseline": Arm(Baseline), "offline_loss": Arm(OfflineLoss), "online_loss": Arm(OnlineLoss),
        "offline_authors": Arm(OfflineLoss, AUTHORS), "online_authors": Arm(OnlineLoss, AUTHORS)}


def run(cfg: dict, seeds: list[int], out_dir=None, progress: bool = True, dataset=None) -> dict:
    """Arms at equal epochs: baseline (cross-entropy), offline_loss (ML^3 init, frozen),
    online_loss (AdaLFL), and the same two with the authors' loss network (offline_authors,
    online_authors; each pair shares its offline stage exactly); and, with lfl.same_time, the
    baseline at online_loss's wall-clock (offline init included)."""
    return run_experiment(experiments(cfg)[0], seeds, out_dir=out_dir, progress=progress, dataset=dataset)


def experiments(cfg: dict) -> list[Experiment]:
    names = cfg["lfl.arms"]
    online = [n for n in ("online_loss", "online_authors") if n in names]
    if "baseline" not in names or not online:
        raise ConfigError(f"lfl.arms={','.join(names)}: baseline and online_loss or online_authors are required")
    return [Experiment("online_loss", online[0], {n: ARMS[n] for n in ARMS if n in names}, cfg,
                       same_time_for=online[0] if cfg["lfl.same_time"] else None)]
