"""Learning to balance local losses (after Yoa, Jeon, Oh, Kim, IEEE Access 9, 2021,
doi 10.1109/ACCESS.2021.3113934).

A plain deep CNN (no skip connections; `DeepCNN(skips=False)`, blocks 1..L) gets a small local
classifier a_l on each of its first K = L-1 blocks; the network's own classifier is the L-th:

    z_l = h_l(z_{l-1}),     L_l = CE(a_l(z_l), y)  (l = 1..K),     L_G = CE(f(x), y)   (global)

Every step, a meta-learner sets per-layer weights lambda_t in R^K_{>=0} (mean 1 over the K local
losses), a mask m_t ~ Bernoulli(1 - p)^K drops local losses for this minibatch, and the network
takes one optimiser step on

    L_inner(theta; lambda, m) = L_G + sum_l m_l lambda_l L_l.

lambda is learned by the one-step lookahead of chapter 1 on a meta batch (plain SGD virtual step
with the current learning rate alpha_t; the real step uses Nesterov momentum and weight decay):

    theta'(lambda) = theta - alpha_t grad_theta L_inner(theta; lambda, m)
    dL_G(theta'; B_meta) / d lambda_l = -alpha_t m_l <v, grad_theta L_l(theta; B_tr)>,   v = grad L_G(theta'; B_meta)

theta' is linear in lambda, so the meta-gradient of all K weights is one directional derivative
of the K local losses along v: a forward-mode pass (`ll.mode=jvp`, exact) or a finite difference
(`ll.mode=fd`, one extra forward), with no double backward. Only the body's parameters move in the
virtual step (the heads do not change the meta loss, the global loss at theta').

Where the local gradients go (`ll.detach`):
  False: deep supervision (Lee et al. 2015): L_l reaches blocks 1..l and head l.
  True:  detached blocks (Nokland & Eidnes 2019, DGL, InfoPro): the input of every block is
         detached, so L_l trains block l and head l only and lambda_l is a per-layer learning
         rate; the global loss trains only block L and the classifier. The meta loss is still
         computed without detaching (it is just the network's loss), so every lambda_l gets a
         meta-gradient through z_{L-1}.

Who sets lambda (`ll.weights`):
  meta_net: a balancer MLP g_phi, shared across layers, maps a feature vector per layer
            s_l = (L_l / log C, EMA_l / log C, (L_l - L_l^prev) / log C, l / L) to a score;
            lambda = K softmax(g(s)) (its last layer starts at zero, so lambda starts equal). phi
            takes one Adam step per iteration down d L_G(theta'(lambda(phi))) / d phi. The real
            step uses lambda(phi_t), the weights of the virtual step, so it reuses the virtual
            step's gradient (AdaLFL's order; Meta-Weight-Net recomputes the weights with phi_{t+1},
            which costs one more backward pass: about 25% of a meta step here).
  free:     L2RW-style (Ren et al. 2018), no memory: eps = 0, g = dL_G(theta'(eps))/d eps,
            lambda = K max(0, -g) / sum max(0, -g) (all zero if no layer helps this step).
  equal:    lambda = 1 (fixed; no meta batch, no lookahead).

Minibatch-wise dropout (`ll.dropout` = p): a fresh mask per step; a dropped local loss gets no
weight in the virtual or the real step (no rescaling by 1/(1-p): the mask acts on the training
signal, and nothing of it is used at test time).

Cross-validation loop (`ll.cv_folds` = K_cv > 1): the *training* split is cut into K_cv folds
(fixed by the run's seed); fold (period mod K_cv) is held out for `ll.cv_every` epochs: the meta
batches are drawn from it (not augmented) and its examples are removed from the training batches
of that period, so a meta batch never shares an example with the step's training batch. Then the
loop's held-out meta split is not used for meta batches at all, and `val_acc` (accuracy on that
split) is a held-out accuracy no arm optimised for. Without the CV loop (`ll.cv_folds=0`) meta
batches come from the held-out meta split, as in MW-Net, and `val_acc - test_acc` measures
meta-overfitting.

What is the paper's and what is ours (methods.md section 2; the paper's full text could not be
read, so everything but the [A] items is reconstruction [R]):
  [A] local losses from local blocks on every hidden layer; a meta-learner sets a dynamic weight
      per layer at every iteration to optimise the global loss; minibatch-wise dropout and a
      cross-validation loop against meta-overfitting; the claim that plain nets without skip
      connections become trainable.
  [R] the heads (adaptive average pool to ll.head_pool x ll.head_pool, then a linear layer: cheap,
      weaker than Nokland's conv3x3 heads); the balancer's inputs, size and softmax-times-K
      normalisation; the free L2RW variant; both gradient routings; the one-step lookahead with a
      plain-SGD virtual step; dropout as a mask on the loss terms; CV folds cut from the training
      split, rotated every ll.cv_every epochs; the update order (the real step reuses lambda_t).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..config import ConfigError, knob, section
from ..data import Batch
from ..meta import forward, lookahead_params, model_params
from ..models import DeepCNN
from ..train import Arm, Context
from .baseline import Baseline, set_lr

# ----------------------------------------------------------------------------- heads and the net


class LocalHead(nn.Module):
    """(B, C, H, W) -> adaptive average pool to (B, C, pool, pool) -> flatten -> linear -> (B, classes)."""

    def __init__(self, channels: int, num_classes: int, pool: int = 2):
        super().__init__()
        self.pool = pool
        self.linear = nn.Linear(channels * pool * pool, num_classes)

    def forward(self, z):
        return self.linear(F.adaptive_avg_pool2d(z, self.pool).flatten(1))


class LocalNet(nn.Module):
    """A plain DeepCNN (`body`, the loop's model: evaluation and checkpoints see only it) with a
    LocalHead on each of its first K = L-1 blocks. forward(x, detach) -> list of L logits
    (B, classes): the K local heads on body.features(x, detach), then the body's own classifier
    (the global output)."""

    def __init__(self, body: nn.Module, num_classes: int, pool: int = 2):
        super().__init__()
        if not isinstance(body, DeepCNN) or body.skips:
            raise ConfigError(f"local_losses needs model 'plain_cnn' (a DeepCNN without skips), "
                              f"got {type(body).__name__}{' with skips' if getattr(body, 'skips', False) else ''}")
        self.body = body
        self.heads = nn.ModuleList(LocalHead(c, num_classes, pool) for c in body.channels[:-1])

    def forward(self, x, detach: bool = False) -> list[torch.Tensor]:
        feats = self.body.features(x, detach=detach)
        return [head(z) for head, z in zip(self.heads, feats)] + [self.body.head(feats[-1].mean(dim=(2, 3)))]


def layer_losses(outs: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """(L,) cross-entropy of every output: L_1..L_K (local heads), then L_G (global)."""
    return torch.stack([F.cross_entropy(o, y) for o in outs])


# ----------------------------------------------------------------------------- the meta-gradient


def net_params(net: LocalNet) -> list[torch.Tensor]:
    """The body's parameters (model_params order), then the heads'."""
    return list(model_params(net.body).values()) + list(net.heads.parameters())


def layer_weight_meta_gradient(net: LocalNet, losses, x, y, x_meta, y_meta, lam, mask, lr: float, *,
                               detach: bool = False, mode: str = "jvp", fd_eps: float = 1e-3,
                               loss_fn=layer_losses, retain_graph: bool = False):
    """d L_G(theta'(lambda); meta) / d lambda for the K local-loss weights of one step.

    losses: (L,) L_1..L_K, L_G at theta on (x (B, 3, H, W), y (B,)), with their graph:
    loss_fn(net(x, detach), y), the step's real forward. x_meta, y_meta: the meta batch;
    lam, mask: (K,), no graph.
        theta' = theta - lr * grad_body [L_G + sum_l mask_l lam_l L_l]   (plain SGD, body only)
    Returns (g (K,), grads, info): `grads` is grad [L_G + sum_l mask_l lam_l L_l] for every
    parameter of `net` (a list in net_params order): the real step can use
    it when it keeps these lam (retain_graph=True keeps the forward's graph for another backward);
    info has meta_loss and meta_acc (global loss and accuracy on the meta batch at theta', tensors).
    """
    inner = losses[-1] + (mask * lam * losses[:-1]).sum()
    params = model_params(net.body)                    # the virtual step moves only the body
    grads = torch.autograd.grad(inner, net_params(net), retain_graph=retain_graph)
    fast = lookahead_params(params, grads[:len(params)], lr)                      # theta'(lambda)
    logits = forward(net.body, fast, x_meta)
    meta = F.cross_entropy(logits, y_meta)
    v = torch.autograd.grad(meta, list(fast.values()))
    d = directional_derivative(net, params, v, x, y, losses[:-1].detach(), detach=detach, mode=mode,
                               fd_eps=fd_eps, loss_fn=loss_fn)                      # <v, grad L_l>
    info = {"meta_loss": meta.detach(), "meta_acc": (logits.argmax(1) == y_meta).float().mean()}
    return -lr * mask * d, grads, info


FD_DETACHED = ("ll.mode=fd cannot be used with ll.detach=true: a finite difference of loss values sees "
               "every block below a head, not only its own; choose ll.mode=jvp")


def directional_derivative(net: LocalNet, params: dict, v, x, y, local_losses, *, detach: bool,
                           mode: str = "jvp", fd_eps: float = 1e-3, loss_fn=layer_losses) -> torch.Tensor:
    """(K,) <v, grad_body L_l(theta)> for each local loss (with the routing of `detach`).

    v: one tensor per body parameter. mode="jvp": exact, one forward with dual numbers (the
    detach() calls drop the tangents too, so the routing is respected);
    mode="fd": (L_l(theta + h v) - L_l(theta)) / h with h = fd_eps / ||v||, one plain forward
    (`local_losses` (K,) are L_l(theta)); deep supervision only (values cannot be detached).
    Both forwards run on copies of the BatchNorm buffers.
    """
    import torch.autograd.forward_ad as fwAD

    buffers = {k: b.clone() for k, b in net.named_buffers()}
    with torch.no_grad():
        if mode == "jvp":
            with fwAD.dual_level():
                with warnings.catch_warnings():   # torch warns about its own jit use when forward AD first loads
                    warnings.simplefilter("ignore", FutureWarning)
                    dual = {f"body.{k}": fwAD.make_dual(p, t) for (k, p), t in zip(params.items(), v)}
                    # heads get zero tangents: a linear layer with a dual input and a plain weight
                    # takes a slow path in torch (it imports the compiler stack on first use)
                    dual.update({f"heads.{k}": fwAD.make_dual(p, torch.zeros_like(p))
                                 for k, p in net.heads.named_parameters()})
                outs = functional_call(net, {**buffers, **dual}, (x,), {"detach": detach})
                return fwAD.unpack_dual(loss_fn(outs, y)[:-1]).tangent
        if mode == "fd":
            if detach:
                raise ConfigError(FD_DETACHED)
            norm = torch.sqrt(sum((t * t).sum() for t in v))
            h = fd_eps / (norm + 1e-12)
            shifted = {f"body.{k}": p + h * t for (k, p), t in zip(params.items(), v)}
            outs = functional_call(net, {**buffers, **shifted}, (x,), {"detach": detach})
            return (loss_fn(outs, y)[:-1] - local_losses) / h
    raise ConfigError(f"ll.mode={mode!r} is not valid; choose one of: jvp, fd")


def free_weights(g: torch.Tensor) -> torch.Tensor:
    """L2RW-style weights from the meta-gradient g (K,) at lambda = 0: K max(0, -g) / sum, mean 1
    (all zero when no local loss would lower the meta loss this step)."""
    w = torch.clamp(-g, min=0)
    total = w.sum()
    return torch.where(total > 0, w * (len(w) / total), w)      # no host sync for the test


# ----------------------------------------------------------------------------- the balancer network

N_FEATURES = 4


class Balancer(nn.Module):
    """g_phi: per-layer features s (K, 4) -> weights lambda (K,) = K softmax(MLP(s)), mean 1.
    One MLP shared by all layers (Meta-Weight-Net style); its output layer starts at zero, so the
    first weights are all 1 (the `equal` arm)."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, s):
        scores = self.mlp(s).squeeze(-1)                                             # (K,)
        return len(scores) * torch.softmax(scores, 0)


def layer_features(local_losses, ema, prev, num_classes: int) -> torch.Tensor:
    """(K, 4): current local loss, its EMA, its change since the last step (all / log C), and the
    depth fraction l / L of the layer. All inputs (K,), detached."""
    k, scale = len(local_losses), math.log(num_classes)
    depth = torch.arange(1, k + 1, device=local_losses.device, dtype=local_losses.dtype) / (k + 1)
    return torch.stack([local_losses / scale, ema / scale, (local_losses - prev) / scale, depth], 1)


def balancer_meta_gradient(net: LocalNet, balancer: Balancer, feats, losses, x, y, x_meta, y_meta, mask,
                           lr: float, **kw):
    """d L_G(theta'(lambda(phi)); meta) / d phi by the chain rule through lambda = g_phi(feats)
    (feats (K, 4); the other arguments as in layer_weight_meta_gradient).
    Returns (phi grads (one per balancer parameter), lambda (K,), g_lambda (K,), grads, info)."""
    lam = balancer(feats)
    g, grads, info = layer_weight_meta_gradient(net, losses, x, y, x_meta, y_meta, lam.detach(), mask, lr, **kw)
    phi_grads = torch.autograd.grad(lam, list(balancer.parameters()), grad_outputs=g)
    return phi_grads, lam.detach(), g, grads, info


# ----------------------------------------------------------------------------- cross-validation folds


def fold_of_examples(n: int, folds: int, seed: int) -> torch.Tensor:
    """(n,) fold number of every training example: a seeded permutation, dealt round-robin."""
    g = torch.Generator().manual_seed(2_000_003 * seed + 17)
    fold = torch.empty(n, dtype=torch.long)
    fold[torch.randperm(n, generator=g)] = torch.arange(n) % folds
    return fold


# ----------------------------------------------------------------------------- the method for the loop

TRACE_ROWS = 100        # the weight trace keeps at most about this many rows (means over windows of steps)


class LocalLosses(Baseline):
    """Local losses on a plain DeepCNN, weighted by `ll.weights` (meta_net | free | equal).

    State: the optimiser (the baseline's, plus the heads), the heads, the balancer and its Adam,
    the step count, the loss EMA / previous losses (balancer features) and the weight trace (means
    over windows of steps, summed on the device by step(), read out by diagnostics() and extras()).
    """

    name = "local_losses"

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.c = c = section(cfg, LL)
        self.cv = c.cv_folds if c.cv_folds > 1 and c.weights != "equal" else 0      # folds in use (0: no CV loop)
        self.uses_meta = c.weights != "equal" and not self.cv      # the loop's meta split feeds meta batches
        if c.detach and c.mode == "fd" and c.weights != "equal":
            raise ConfigError(FD_DETACHED)

    loss_fn = staticmethod(layer_losses)      # (outs, y) -> (L,); a test swaps it to corrupt one layer

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)                             # self.model, self.opt (the body's)
        param = next(ctx.model.parameters())
        self.num_classes = ctx.num_classes
        self.net = LocalNet(ctx.model, ctx.num_classes, self.c.head_pool).to(device=param.device, dtype=param.dtype)
        self.opt.add_param_group({"params": list(self.net.heads.parameters())})
        self.k = len(self.net.heads)
        self.balancer = Balancer(self.c.hidden).to(device=param.device, dtype=param.dtype)
        self.meta_opt = torch.optim.Adam(self.balancer.parameters(), lr=self.c.meta_lr)
        self.spe, self.window = ctx.steps_per_epoch, max(1, ctx.total_steps // TRACE_ROWS)
        if self.cv:
            self.fold = fold_of_examples(ctx.num_train, self.cv, ctx.seed).to(param.device)
            self.members = [torch.nonzero(self.fold == f).flatten() for f in range(self.cv)]
            self.cv_steps = max(1, round(self.c.cv_every * self.spe))
        self.t = 0
        self.ema = self.prev = None
        self.sums = torch.zeros(self.k + 3, device=param.device, dtype=param.dtype)  # lambda (K), kept, meta acc, loss
        self.n, self.rows = 0, []          # steps in the open window; closed windows not yet read out
        self.trace = {"step": [], "epoch": [], "weights": [], "kept": [], "meta_acc": [], "meta_loss": []}
        self.last_train_idx = self.last_meta_idx = None      # for inspection (tests)

    # -- pieces of a step
    def draw_mask(self) -> torch.Tensor:
        """(K,) 1 = keep, 0 = drop this step's local loss, each with probability ll.dropout
        (the loop saves and restores the global RNG, so a resumed run draws the same masks)."""
        if self.c.dropout == 0:
            return torch.ones(self.k)
        return (torch.rand(self.k) >= self.c.dropout).float()

    def held_out_fold(self, t: int) -> int:
        return (t // self.cv_steps) % self.cv

    def fold_meta_batch(self, t: int) -> Batch:
        """The meta batch of step t in the CV loop: examples of the held-out fold, drawn without
        replacement by a generator seeded with (run seed, t), not augmented."""
        pool = self.members[self.held_out_fold(t)]
        g = torch.Generator().manual_seed(2**40 + 1_000_003 * self.ctx.seed + t)
        idx = pool[torch.randperm(len(pool), generator=g)[:self.ctx.streams.batch_size("meta")].to(pool.device)]
        return self.ctx.streams.take("train", idx)

    def step(self, batch: Batch, meta_batch: Batch | None, lr: float) -> dict:
        set_lr(self.opt, lr)
        x, y = batch.x, batch.y
        self.last_train_idx = batch.idx
        if self.cv:                                    # train on the other folds, meta on the held-out one
            keep = self.fold[batch.idx] != self.held_out_fold(self.t)
            x, y, self.last_train_idx = x[keep], y[keep], batch.idx[keep]
            meta_batch = self.fold_meta_batch(self.t)
        self.last_meta_idx = meta_batch.idx if meta_batch is not None else None
        mask = self.draw_mask().to(device=x.device, dtype=x.dtype)
        outs = self.net(x, detach=self.c.detach)      # the one real forward (BatchNorm stats update here)
        losses = self.loss_fn(outs, y)                 # (L,): L_1..L_K, L_G
        kw = dict(detach=self.c.detach, mode=self.c.mode, loss_fn=self.loss_fn)
        info, extra = dict.fromkeys(("meta_loss", "meta_acc"), losses.new_zeros(())), {}
        if self.c.weights == "equal":
            lam = torch.ones_like(mask)
            self.opt.zero_grad(set_to_none=True)
            (losses[-1] + (mask * lam * losses[:-1]).sum()).backward()
        elif self.c.weights == "free":                   # L2RW: meta-gradient at lambda = 0, then weigh
            g, _, info = layer_weight_meta_gradient(self.net, losses, x, y, meta_batch.x, meta_batch.y,
                                                    torch.zeros_like(mask), torch.ones_like(mask), lr,
                                                    retain_graph=True, **kw)
            lam = free_weights(g)
            self.opt.zero_grad(set_to_none=True)
            (losses[-1] + (mask * lam * losses[:-1]).sum()).backward()
            extra["meta_grad_norm"] = g.norm()
        else:                                          # meta_net: lambda_t = g_phi_t(s_t)
            feats = self.features(losses[:-1].detach())
            phi_grads, lam, g, grads, info = balancer_meta_gradient(
                self.net, self.balancer, feats, losses, x, y, meta_batch.x, meta_batch.y, mask, lr, **kw)
            for p, gp in zip(net_params(self.net), grads):           # the real step reuses the
                p.grad = gp                                          # virtual step's gradient
            for p, gp in zip(self.balancer.parameters(), phi_grads):
                p.grad = gp
            self.meta_opt.step()                       # phi_t -> phi_{t+1}, used from the next step
            extra["meta_grad_norm"] = g.norm()
        self.opt.step()
        self.update_state(losses[:-1].detach(), lam.detach(), mask, info)
        acc = (outs[-1].argmax(1) == y).float().mean()
        return {"loss": losses[-1].detach(), "acc": acc, **info, **extra, "w_min": lam.min().detach(),
                "w_max": lam.max().detach()}

    def features(self, local_losses) -> torch.Tensor:
        """The balancer's input (K, 4) from this step's local losses at theta (K,), detached."""
        ema = local_losses if self.ema is None else self.ema
        prev = local_losses if self.prev is None else self.prev
        return layer_features(local_losses, ema, prev, self.num_classes)

    def update_state(self, local_losses, lam, mask, info) -> None:
        """EMA and previous losses (balancer features), the trace's sums (on the device), the step count."""
        if self.ema is None:
            self.ema = local_losses.clone()
        self.ema = self.c.ema * self.ema + (1 - self.c.ema) * local_losses
        self.prev = local_losses.clone()
        self.sums += torch.cat([lam, mask.mean()[None], info["meta_acc"][None], info["meta_loss"][None]])
        self.n += 1
        self.t += 1
        if self.t % self.window == 0:
            self.close_window()

    def close_window(self) -> None:
        """Keep the open window's means as a row (step, (K + 3,) on the device); open a new window."""
        if self.n:
            self.rows.append((self.t, self.sums / self.n))
            self.sums, self.n = torch.zeros_like(self.sums), 0

    def read_trace(self) -> dict:
        """Close the open window and move the closed rows into the trace (one host copy)."""
        self.close_window()
        if self.rows:
            steps, values = zip(*self.rows)
            for t, row in zip(steps, torch.stack(values).tolist()):      # keys: step, epoch, weights, kept, meta_*
                for key, v in zip(self.trace, (t, t / self.spe, row[:self.k], *row[self.k:])):
                    self.trace[key].append(v)
        self.rows = []
        return self.trace

    # -- diagnostics, checkpoint, extras
    def diagnostics(self, streams) -> dict:
        """At every evaluation: close the trace window; the last row's smallest and largest mean
        weight and fraction of local losses kept."""
        w, kept = self.read_trace()["weights"], self.trace["kept"]
        return {"w_mean_min": min(w[-1]), "w_mean_max": max(w[-1]), "kept": kept[-1]} if w else {}

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "heads": self.net.heads.state_dict(),
                "balancer": self.balancer.state_dict(), "meta_opt": self.meta_opt.state_dict(), "t": self.t,
                "ema": self.ema, "prev": self.prev, "sums": self.sums.clone(), "n": self.n,
                "rows": list(self.rows), "trace": {k: list(v) for k, v in self.trace.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.net.heads.load_state_dict(state["heads"])
        self.balancer.load_state_dict(state["balancer"])
        self.meta_opt.load_state_dict(state["meta_opt"])
        self.t, self.ema, self.prev = state["t"], state["ema"], state["prev"]
        self.sums, self.n, self.rows = state["sums"].clone(), state["n"], list(state["rows"])
        self.trace = {k: list(v) for k, v in state["trace"].items()}

    def extras(self, streams) -> dict:
        """The per-layer weight trace: `weights` (rows, K), the mean lambda over windows of steps
        (before the dropout mask), at `epoch` (rows,); `kept` the fraction of local losses kept;
        `meta_acc` / `meta_loss` on the meta batches at theta' (the balancer's own objective)."""
        return {"layers": self.k, "depth_fraction": [(l + 1) / (self.k + 1) for l in range(self.k)],
                "weights_mode": self.c.weights, "detach": self.c.detach, "cv_folds": self.cv,
                "trace": {k: list(v) for k, v in self.read_trace().items()}}


# ----------------------------------------------------------------------------- config and the chapter

# Every arm: its method and the config keys it changes. `meta` is the chapter's method.
ARMS: dict = {
    "baseline": Arm(Baseline),                                        # end-to-end backprop, plain net
    "skips": Arm(Baseline, {"model": "res_cnn"}),                      # the same layers with skips
    "equal": Arm(LocalLosses, {"ll.weights": "equal", "ll.dropout": 0.0, "ll.cv_folds": 0}),
    "free": Arm(LocalLosses, {"ll.weights": "free"}),
    "meta": Arm(LocalLosses, {"ll.weights": "meta_net"}),
    "meta_nodrop": Arm(LocalLosses, {"ll.weights": "meta_net", "ll.dropout": 0.0}),
    "meta_nocv": Arm(LocalLosses, {"ll.weights": "meta_net", "ll.cv_folds": 0}),
    "equal_detached": Arm(LocalLosses, {"ll.weights": "equal", "ll.dropout": 0.0, "ll.cv_folds": 0,
                                        "ll.detach": True}),
    "meta_detached": Arm(LocalLosses, {"ll.weights": "meta_net", "ll.detach": True, "ll.mode": "jvp"}),
}


@dataclass
class LL:
    """Local losses balanced by meta-learning (keys ll.*)."""
    prefix: ClassVar[str] = "ll"
    weights: str = knob("meta_net", "who sets lambda: meta_net (balancer MLP) | free (L2RW-style, per step) | "
                        "equal (fixed 1)", choices=("meta_net", "free", "equal"))
    detach: bool = knob(False, "false: deep supervision (L_l reaches blocks 1..l); true: detached blocks")
    dropout: float = knob(0.25, "p: each local loss dropped with this probability per minibatch [R]", "in [0, 1)")
    cv_folds: int = knob(5, "K_cv folds of the training split for the CV loop [R]",
                         ">= 0 (0 or 1 = no cross-validation loop)")
    cv_every: float = knob(1.0, "epochs before the held-out fold rotates [R]", "> 0")
    meta_lr: float = knob(1e-3, "Adam's learning rate on the balancer's parameters [R]", ">= 0")
    hidden: int = knob(32, "balancer hidden units [R]", ">= 1")
    ema: float = knob(0.9, "decay of the loss EMA fed to the balancer [R]", "in [0, 1)")
    head_pool: int = knob(2, "local head: average pool to head_pool x head_pool, then linear [R]", ">= 1")
    mode: str = knob("jvp", "the meta-gradient's directional derivative: jvp (exact) | fd (finite difference)",
                     choices=("jvp", "fd"))
    arms: list[str] = knob(["baseline", "skips", "equal", "free", "meta", "meta_nodrop", "meta_nocv"],
                           "arms to run (baseline and meta are required)", choices=tuple(ARMS))
    same_time: bool = knob(True, "also run the baseline for the `meta` arm's wall-clock")


SECTIONS = (LL,)
DEFAULTS: dict = {"model": "plain_cnn", "width": 16, "depth": 16}
PRESETS: dict = {
    # CI: 15 steps per arm on 2,000 images, a 6-layer plain net (5 local heads); about 26 s of CPU
    # time for the 8 arms on one core (measured on real CIFAR-10; most of it evaluation and start-up).
    "smoke": {"train_size": 2000, "meta_size": 500, "test_size": 1000, "epochs": 1.0, "depth": 6, "width": 8,
              "checkpoint_every": 50},
    # 2 cores: the depth chapter's setting (10,000 images, 5 epochs = 390 steps, width 16), at depth 16
    # where end-to-end backprop already lags the skip net (51.4% vs 59.9% there). One-thread step
    # costs measured here (loaded machine): equal 1.25x, meta 2.3x (fd; 3.2x with jvp), free 3.1x
    # a plain step; with the depth chapter's 0.14 s per plain step on 2 cores, the 7 arms and
    # baseline_same_time come to about 15 plain-step units x 390 steps x 0.14 s = 14 minutes.
    "cpu": {"train_size": 10000, "epochs": 5.0, "channels_last": True, "ll.mode": "fd"},
    # Not measured on a GPU yet.
    "gpu": {"epochs": 30.0, "depth": 32, "width": 32, "batch_size": 256},
    "paper": {"epochs": 160.0, "depth": 32, "width": 16, "schedule": "cosine", "warmup": 0.0},
}


def run(cfg: dict, seeds: list[int], out_dir=None, progress: bool = True, dataset=None) -> dict:
    """The arms of cfg['ll.arms'] at equal epochs, same data and seeds, and (cfg['ll.same_time'])
    the baseline at the `meta` arm's wall-clock. Adds `arm_configs` (what each arm changed) and
    `meta_gap` (val_acc - test_acc per arm; see the module docstring for what val_acc means)."""
    from ..train import run_arms

    names = cfg["ll.arms"]
    if not {"baseline", "meta"} <= set(names):
        raise ConfigError(f"ll.arms={','.join(names)}: baseline and meta are required")
    record = run_arms("local_losses", "meta", {n: ARMS[n] for n in names}, cfg, seeds, out_dir=out_dir,
                      progress=progress, dataset=dataset, same_time_for="meta" if cfg["ll.same_time"] else None)
    record["arm_configs"] = {n: dict(ARMS[n].changes) for n in names}
    record["meta_gap"] = {n: a["val_acc"]["mean"] - a["test_acc"]["mean"] for n, a in record["arms"].items()}
    return record
