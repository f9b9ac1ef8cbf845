"""Grad-Instructor (Ino 2024, arXiv 2406.10559): an evaluation network (ENN) steers backpropagation.

Only the paper's abstract could be read (methods.md section 5). What it says [A]: an ENN, trained
by deep reinforcement learning, predicts how well a *target* network will perform; during
backpropagation it acts as an extra evaluation function beside the task loss; the targets are
MLPs; the ENN's input is processed at 0.15^2 of its original resolution (cheap inference); the
result beats plain backprop and backprop + L1 and matches He initialisation, with a smaller
train-test gap, without more epochs; gradient magnitudes adapt to the stage of training; Grad-CAM
on the ENN shows what its evaluation rests on. Everything below that is not in that list is our
reconstruction [R], chosen to be the simplest reading that fits each sentence of the abstract.

1. Rendering [R]. The ENN sees the target MLP's *weights as images*. Each weight matrix
   W_l (h_l, w_l) of the MLP (hidden layers and head; biases are left out) becomes two images:

       mean image  M_l = D(P(W_l))                      * sqrt(fan_in_l * n_l)
       rms  image  R_l = sqrt(D(P(W_l ** 2)) + eps)     * sqrt(fan_in_l)

   P resizes the matrix to a fixed canvas (gi.canvas, default 64 x 64: the "original resolution"
   of a weight image; adaptive average pooling, which also up-samples small matrices by
   replication), D down-samples the canvas to s = round(gi.resolution * canvas) per side
   (default 0.15 -> 10 x 10, i.e. about 0.15^2 of the pixels: the abstract's number). Both are
   area averages, so they are linear and differentiable, and the ENN's gradient reaches every
   weight. Why two channels: averaging thousands of random weights into one pixel leaves almost
   nothing of a mean image (the pixel is ~ sigma / sqrt(n_l)); the rms image keeps the local
   *scale* of the weights, which is exactly what separates default init, He init and L1-shrunk
   weights. The constant factors (fan_in_l, n_l = h_l w_l / s^2 weights per pixel) make both
   images O(1) for a random init, whatever the layer's size. Input: (2L, s, s), channels ordered
   [M_1, R_1, M_2, R_2, ...] for the L weight matrices.

2. The ENN [R]. One small conv tower per weight image (grouped 3x3 convolutions, so the towers do
   not mix; Grad-CAM then gives one map per weight matrix), global average pooling, a linear head
   and a sigmoid: E_psi: (B, 2L, s, s) -> (B,) predicted accuracy in (0, 1). The sigmoid bounds
   the prediction, and its gradient shrinks where the ENN is confident the weights are good: one
   way the "gradient magnitude adapts to the stage of training" without any schedule.

3. Training the ENN by RL [R] (the abstract says "deep reinforcement learning", nothing more).
   An *episode* is a short training run of a fresh copy of the target MLP (gi.episode_steps SGD
   steps on the run's training split). The *action* of an episode is drawn by a random behaviour
   policy: the init scale (He-normal times a log-uniform gain) and the learning rate (log-uniform)
   -- the choices that decide whether the run goes well. *States* are the rendered weights at
   snapshots k = 0..K (every gi.snapshot_every steps). The *reward* after snapshot k is the
   held-out accuracy reached at snapshot k+1, scaled by (1 - gamma); the final state is absorbing
   and keeps its accuracy acc_K forever, so its value is acc_K. With these units the value

       V(s_k) = sum_{j=0}^{K-k-1} gamma^j (1 - gamma) acc_{k+1+j} + gamma^{K-k} acc_K

   is a weighted average of the accuracies still to come: gamma = 1 gives the episode's *final*
   accuracy (the Monte-Carlo target), gamma = 0 the next snapshot's accuracy. The ENN is the
   state-value function of the behaviour policy, fitted by TD(lambda) (semi-gradient, targets
   recomputed every gi.refresh iterations):

       G_K = acc_K,     G_k = r_k + gamma * [(1 - lambda) V(s_{k+1}) + lambda * G_{k+1}]

   lambda = 1 is Monte-Carlo regression, lambda = 0 is TD(0). The episodes come in gi.rounds
   rounds (approximate policy iteration): round 0 is plain SGD; in later rounds every episode
   also follows the current ENN (the Grad-Instructor update below, with a weight drawn around
   gi.weight), and the ENN is refitted on all episodes so far. Without these rounds the critic is
   never shown the weights its own gradient leads to, and gradient ascent exploits it (measured:
   with an ENN fitted on plain-SGD episodes only, the predicted accuracy of the target climbed to
   0.95 within an epoch while its real accuracy fell below plain backprop's).
   gi.enn_objective = "regression"
   instead fits the accuracy of the snapshot itself (plain supervised "accuracy from weights",
   Unterthiner et al. 2020), for comparison. During target training the ENN is used as an
   *afterstate* value (Sutton & Barto, section 6.8): the action at every target step is the
   weight update, and the ENN term moves it up the value's gradient (as a DDPG actor climbs its
   critic). So "RL" here is policy evaluation by TD(lambda) plus gradient ascent on the critic.

4. The Grad-Instructor update [R] (the review's fragment "Delta W = -l_r ..." and the abstract's
   "extra evaluation function" fit it):

       loss = CE(f_W(x), y) - w(t) * E_psi(render(W)),     w(t) = gi.weight * schedule(t / T)

   with schedule constant | linear_decay | cosine_decay; the same optimiser as every arm (SGD,
   Nesterov momentum, the loop's learning-rate schedule). The ENN is frozen during target training.

5. The comparison (the abstract's arms, same epochs and seeds): plain backprop (`baseline`, the
   MLP's default PyTorch init), backprop + L1 on the weights (`l1`, gi.l1), He initialisation
   (`he_init`, Kaiming-normal weights, zero biases), and `grad_instructor` (default init + ENN).
   Every arm reports its final train accuracy (evaluated, no augmentation) and the train-test gap.

6. Cost. The ENN is trained *once per run*, before the arms (from the first seed's training
   split; rewards on its held-out split; the test split is never used), and shared by every seed
   of the grad_instructor arm: the paper sells the ENN as reusable ("universal"), so its cost is a
   one-off, reported beside the arms (record["enn"]["seconds"], episodes, steps) and not inside
   the arm's seconds per step. With an out_dir the trained ENN is saved (enn.pt), so a resumed run
   does not train it again. Its predictive quality is measured on held-out episodes: the Spearman
   rank correlation between the prediction and the episode's actual final accuracy.

7. Explainability: `saliency(enn, x, "grad_cam")` (Selvaraju et al. 2017, on each weight image's
   last conv layer) and `"grad_x_input"`, one (s, s) map per weight matrix; `saliency_to_matrix`
   maps a map back onto the matrix's rows and columns for figures.
"""
from __future__ import annotations

import copy
import functools
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Batch
from ..models import build_model
from .baseline import Baseline, set_lr

# ----------------------------------------------------------------------------- rendering


def weight_matrices(model: nn.Module) -> list[torch.Tensor]:
    """The weight matrices of the MLP's Linear layers, input to output (hidden layers, head)."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def image_size(canvas: int, resolution: float) -> int:
    """Side of a rendered weight image: round(resolution * canvas), at least 1 (0.15 * 64 -> 10)."""
    return max(1, int(round(resolution * canvas)))


@functools.lru_cache(maxsize=64)
def _pooling_matrix(n: int, canvas: int, s: int) -> torch.Tensor:
    """(s, n) float64: row i holds the weights with which output pixel i averages the n input
    positions when a length-n axis is resized to `canvas` and then down-sampled to `s` (both
    adaptive average pooling, exactly as F.adaptive_avg_pool1d does it)."""
    eye = torch.eye(n, dtype=torch.float64)[:, None, :]                      # (n, 1, n)
    full = F.adaptive_avg_pool1d(eye, canvas)                                # (n, 1, canvas)
    return F.adaptive_avg_pool1d(full, s)[:, 0, :].T.contiguous()            # (s, n)


def render_weights(weights: list[torch.Tensor], canvas: int = 64, resolution: float = 0.15,
                   eps: float = 1e-12) -> torch.Tensor:
    """Weight matrices -> the ENN's input (2L, s, s), differentiable in every weight.

    weights: L matrices (h_l, w_l). For each: resize to (canvas, canvas), down-sample to (s, s),
    s = image_size(canvas, resolution); channels [mean image, rms image] per matrix, scaled to
    O(1) for a random init (module docstring, point 1). Adaptive average pooling is separable,
    so resize-then-down-sample of a matrix W is A W B^T with fixed pooling matrices A (s, h) and
    B (s, w): two small matmuls, forward and backward (the same numbers as two calls of
    F.adaptive_avg_pool2d, several times faster on a 256 x 3072 matrix).
    """
    s = image_size(canvas, resolution)
    images = []
    for w in weights:
        h, fan_in = w.shape
        a = _pooling_matrix(h, canvas, s).to(device=w.device, dtype=w.dtype)
        b = _pooling_matrix(fan_in, canvas, s).to(device=w.device, dtype=w.dtype)
        per_pixel = max(h * fan_in / s ** 2, 1.0)             # n_l: weights averaged into one pixel
        images.append(a @ w @ b.T * math.sqrt(fan_in * per_pixel))
        images.append(torch.sqrt(a @ (w * w) @ b.T + eps) * math.sqrt(fan_in))
    return torch.stack(images)


def render_model(model: nn.Module, cfg: dict) -> torch.Tensor:
    """render_weights of a model's weight matrices at the config's canvas and resolution."""
    return render_weights(weight_matrices(model), cfg["gi.canvas"], cfg["gi.resolution"])


# ----------------------------------------------------------------------------- the ENN


class ENN(nn.Module):
    """Evaluation network: x (B, 2L, s, s) -> (B,) predicted accuracy in (0, 1).

    One tower of two 3x3 convolutions (`channels` each) per weight image (grouped, so the L towers
    do not mix), ReLU, global average pooling, one linear layer over all towers, a sigmoid.
    """

    def __init__(self, layers: int, channels: int = 8):
        super().__init__()
        self.layers, self.channels = layers, channels
        k = layers * channels
        self.conv1 = nn.Conv2d(2 * layers, k, 3, padding=1, groups=layers)
        self.conv2 = nn.Conv2d(k, k, 3, padding=1, groups=layers)
        self.head = nn.Linear(k, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last conv layer's activations (B, L * channels, s, s): Grad-CAM's layer."""
        return F.relu(self.conv2(F.relu(self.conv1(x))))

    def from_features(self, a: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(a.mean(dim=(2, 3)))).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_features(self.features(x))


def make_enn(num_matrices: int, cfg: dict) -> ENN:
    return ENN(num_matrices, cfg["gi.enn_channels"])


def saliency(enn: ENN, x: torch.Tensor, kind: str = "grad_cam") -> torch.Tensor:
    """One saliency map per weight image: x (B, 2L, s, s) -> (B, L, s, s), >= 0 for grad_cam.

    grad_cam: ReLU(sum_c alpha_c A_c) over the channels c of each weight image's tower, alpha_c =
    the spatial mean of d E / d A_c (Selvaraju et al. 2017; the towers keep the resolution s, so
    no up-sampling is needed). grad_x_input: (d E / d x) * x, summed over the mean and rms image.
    """
    b, c, s, _ = x.shape
    layers = c // 2
    x = x.detach().requires_grad_(kind == "grad_x_input")
    with torch.enable_grad():         # works for a frozen ENN (requires_grad off) and under no_grad
        if kind == "grad_cam":
            a = enn.features(x).detach().requires_grad_(True)          # the activations are the leaf
            (g,) = torch.autograd.grad(enn.from_features(a).sum(), a)
            a, g = a.view(b, layers, -1, s, s), g.view(b, layers, -1, s, s)
            alpha = g.mean(dim=(3, 4), keepdim=True)                  # (B, L, channels, 1, 1)
            return F.relu((alpha * a).sum(2)).detach()
        if kind == "grad_x_input":
            (g,) = torch.autograd.grad(enn(x).sum(), x)
            return (g * x).view(b, layers, 2, s, s).sum(2).detach()
    raise ValueError(f"unknown saliency kind {kind!r}; choose one of: grad_cam, grad_x_input")


def saliency_to_matrix(saliency_map: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A (s, s) map spread back over a weight matrix of `shape` (h, w): each weight gets the value
    of the pixel it was averaged into (nearest), for heat-maps and saliency-based pruning."""
    return F.interpolate(saliency_map[None, None].float(), size=tuple(shape), mode="nearest")[0, 0]


# ----------------------------------------------------------------------------- RL: returns and targets


def episode_rewards(accs: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out accuracies at snapshots (E, K+1) -> rewards r_k = (1 - gamma) acc_{k+1}, (E, K),
    and the absorbing final state's value acc_K, (E,)."""
    return (1.0 - gamma) * accs[:, 1:], accs[:, -1]


def lambda_returns(rewards: torch.Tensor, next_values: torch.Tensor, terminal: torch.Tensor,
                   gamma: float, lam: float) -> torch.Tensor:
    """TD(lambda) targets (E, K+1) for the states s_0..s_K of E episodes.

    rewards (E, K): r_k after state k; next_values (E, K): V(s_{k+1}) from the current critic (the
    last column is ignored: s_K's value is `terminal` (E,), known). Recursion from the end:
    G_K = terminal, G_k = r_k + gamma * ((1 - lam) * v_{k+1} + lam * G_{k+1}).
    """
    e, k = rewards.shape
    values = torch.cat([next_values[:, :-1], terminal[:, None]], dim=1)   # v_1..v_K, v_K known
    out = torch.empty(e, k + 1, dtype=rewards.dtype, device=rewards.device)
    out[:, k] = terminal
    for i in range(k - 1, -1, -1):
        out[:, i] = rewards[:, i] + gamma * ((1 - lam) * values[:, i] + lam * out[:, i + 1])
    return out


def spearman(a, b) -> float:
    """Spearman rank correlation of two sequences (average ranks for ties; nan if one is constant)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)

    def ranks(x):
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        return (np.bincount(inverse, weights=r) / counts)[inverse]

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def fit_enn(enn: ENN, states: torch.Tensor, accs: torch.Tensor, *, objective: str = "rl",
            gamma: float = 1.0, lam: float = 0.8, iters: int = 300, lr: float = 3e-3,
            batch: int = 64, refresh: int = 25, seed: int = 0, init_bias: bool = True) -> list[float]:
    """Fit the ENN on E episodes: states (E, K+1, C, s, s), accuracies (E, K+1).

    objective "rl": semi-gradient TD(lambda) on the returns of `episode_rewards` (targets recomputed
    with the current ENN every `refresh` iterations; lam = 1 is Monte-Carlo); "regression": the
    snapshot's own accuracy. Adam on the mean squared error over random minibatches of states.
    Returns the loss of every iteration.
    """
    e, k1 = accs.shape
    flat = states.flatten(0, 1)                                          # (E (K+1), C, s, s)
    g = torch.Generator().manual_seed(seed)
    rewards, terminal = episode_rewards(accs, gamma)
    if objective == "regression":
        targets = accs
    elif objective == "rl":
        targets = lambda_returns(rewards, torch.zeros_like(rewards), terminal, gamma, 1.0)   # MC start
    else:
        raise ValueError(f"unknown ENN objective {objective!r}; choose one of: rl, regression")
    if init_bias:                              # start the head at the mean target (logit)
        with torch.no_grad():
            m = targets.mean().clamp(1e-3, 1 - 1e-3)
            enn.head.bias.fill_(float(torch.log(m / (1 - m))))
    opt = torch.optim.Adam(enn.parameters(), lr=lr)
    trace = []
    for it in range(iters):
        if objective == "rl" and lam < 1 and it % refresh == 0 and it > 0:
            with torch.no_grad():
                v = enn(flat).view(e, k1)
            targets = lambda_returns(rewards, v[:, 1:], terminal, gamma, lam)
        pick = torch.randint(len(flat), (min(batch, len(flat)),), generator=g).to(flat.device)
        loss = F.mse_loss(enn(flat[pick]), targets.flatten()[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        trace.append(loss.item())
    return trace


# ----------------------------------------------------------------------------- episodes


@dataclass
class Episodes:
    states: torch.Tensor     # (E, K+1, 2L, s, s) rendered weights at the snapshots
    accs: torch.Tensor       # (E, K+1) held-out accuracy at each snapshot
    actions: torch.Tensor    # (E, 3) the policy's action: (init gain, learning rate, ENN weight)
    rounds: torch.Tensor     # (E,) the round that collected each episode
    diverged: int = 0        # episodes dropped because their loss became NaN/inf
    steps: int = 0           # SGD steps run in all episodes

    def select(self, keep: torch.Tensor) -> "Episodes":
        return Episodes(self.states[keep], self.accs[keep], self.actions[keep], self.rounds[keep])

    @staticmethod
    def cat(parts: list["Episodes"]) -> "Episodes":
        return Episodes(*(torch.cat([getattr(p, f) for p in parts]) for f in ("states", "accs", "actions", "rounds")),
                        diverged=sum(p.diverged for p in parts), steps=sum(p.steps for p in parts))


EPISODE_EPOCH = 2_000_000      # episode e of round r trains on the shuffles of epochs EPISODE_EPOCH + 1000 (e + 1000 r), + 1, ...


def he_init_(model: nn.Module, gain: float = 1.0, generator: torch.Generator | None = None) -> nn.Module:
    """Kaiming-normal weights (fan_in, ReLU: std sqrt(2 / fan_in)) times `gain`, zero biases."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                std = gain * math.sqrt(2.0 / m.weight.shape[1])
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator, dtype=m.weight.dtype)
                               .to(m.weight.device) * std)
                m.bias.zero_()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def run_episode(model: nn.Module, batches, x_eval: torch.Tensor, y_eval: torch.Tensor, *, lr: float,
                steps: int, snapshot_every: int, cfg: dict, enn: ENN | None = None, enn_weight: float = 0.0):
    """Train `model` (already initialised) for `steps` SGD steps (Nesterov momentum 0.9, constant
    lr) on CE - enn_weight * enn(render(W)) (plain CE without an ENN). Returns (states (K+1, 2L, s, s),
    accs (K+1,)) at steps 0, snapshot_every, ..., or None if the loss or the weights became NaN/inf."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    states, accs = [render_model(model, cfg).detach()], [accuracy(model, x_eval, y_eval)]
    for t, batch in enumerate(itertools.islice(batches, steps), start=1):
        loss = F.cross_entropy(model(batch.x), batch.y)
        if not torch.isfinite(loss):
            return None
        if enn is not None and enn_weight > 0:
            loss = loss - enn_weight * enn(render_model(model, cfg)[None])[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if t % snapshot_every == 0:
            states.append(render_model(model, cfg).detach())
            accs.append(accuracy(model, x_eval, y_eval))
    if not all(torch.isfinite(s).all() for s in states):
        return None
    return torch.stack(states), torch.tensor(accs)


def collect_episodes(cfg: dict, train_loader, x_eval, y_eval, num_classes: int, n: int, seed: int,
                     enn: ENN | None = None, round_: int = 0, progress: bool = False) -> Episodes:
    """Run n episodes of the policy: fresh MLPs of the target's architecture, He-normal init times
    a log-uniform gain in [gi.gain_min, gi.gain_max], a log-uniform learning rate in [gi.lr_min,
    gi.lr_max], gi.episode_steps steps on the training split. With an `enn` (rounds after the
    first) each episode follows it with a weight gi.weight * 10^U(-1, 1), so the ENN also sees, and
    is corrected on, the weights its own guidance produces."""
    from tqdm.auto import tqdm

    device = x_eval.device
    g = torch.Generator().manual_seed(seed * 1000 + round_)
    log_uniform = lambda lo, hi: math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand((), generator=g).item())
    states, accs, actions, diverged = [], [], [], 0
    for e in tqdm(range(n), desc=f"ENN episodes, round {round_}", disable=not progress, mininterval=2.0):
        gain, lr = log_uniform(cfg["gi.gain_min"], cfg["gi.gain_max"]), log_uniform(cfg["gi.lr_min"], cfg["gi.lr_max"])
        w = cfg["gi.weight"] * log_uniform(0.1, 10.0) if enn is not None else 0.0
        model = build_model("mlp", num_classes, cfg["width"], cfg["depth"]).to(device)
        he_init_(model, gain, generator=g)
        out = run_episode(model, train_loader.forever(EPISODE_EPOCH + 1000 * (e + 1000 * round_)), x_eval, y_eval,
                          lr=lr, steps=cfg["gi.episode_steps"], snapshot_every=cfg["gi.snapshot_every"], cfg=cfg,
                          enn=enn, enn_weight=w)
        if out is None:
            diverged += 1
            continue
        states.append(out[0])
        accs.append(out[1])
        actions.append(torch.tensor([gain, lr, w]))
    if len(states) < 2:
        raise FloatingPointError(f"{diverged} of {n} ENN episodes diverged; lower gi.lr_max or gi.gain_max")
    return Episodes(torch.stack(states), torch.stack(accs).to(device), torch.stack(actions),
                    torch.full((len(states),), round_), diverged, n * cfg["gi.episode_steps"])


def enn_quality(enn: ENN, episodes: Episodes) -> dict:
    """How well the ENN ranks held-out episodes by their actual final accuracy (Spearman):
    from the initial weights alone (`spearman_initial`), from every snapshot (`spearman_all`),
    and the mean absolute error of its prediction of the final accuracy."""
    with torch.no_grad():
        e, k1 = episodes.accs.shape
        pred = enn(episodes.states.flatten(0, 1)).view(e, k1).cpu()
    final = episodes.accs[:, -1].cpu()
    return {"spearman_initial": spearman(pred[:, 0], final),
            "spearman_all": spearman(pred.flatten(), final[:, None].expand(e, k1).flatten()),
            "final_mae": float((pred - final[:, None]).abs().mean()),
            "heldout_episodes": e}


def train_enn(cfg: dict, data, num_classes: int, progress: bool = False) -> tuple[ENN, dict]:
    """Phase A, once per run, in gi.rounds rounds (approximate policy iteration): collect episodes
    on data.train (rewards: accuracy on the first gi.eval_size images of the held-out split) --
    round 0 plain SGD, later rounds guided by the current ENN -- and fit the ENN (warm-started) on
    all episodes so far except the held-out ones (the last gi.holdout of every round), on which
    its quality is measured at the end. Returns the frozen ENN and an info dict (costs, quality,
    the episodes' actions and final accuracies for the chapter's figures)."""
    from ..config import ConfigError

    device = data.train.y.device
    t0 = time.perf_counter()
    rounds = cfg["gi.rounds"]
    if cfg["gi.episodes"] < 2 * rounds:
        raise ConfigError(f"gi.episodes={cfg['gi.episodes']} is too few for gi.rounds={rounds}; "
                          f"it must be >= 2 * gi.rounds (each round fits on some and holds out some)")
    per_round = [cfg["gi.episodes"] // rounds + (1 if r < cfg["gi.episodes"] % rounds else 0) for r in range(rounds)]
    parts, held_parts, trace, enn = [], [], [], None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg["gi.enn_seed"])
        n_eval = min(cfg["gi.eval_size"], len(data.val.y))
        x_eval, y_eval = data.val.normalise(data.val.x[:n_eval]), data.val.y[:n_eval]
        for r, n in enumerate(per_round):
            eps = collect_episodes(cfg, data.train, x_eval, y_eval, num_classes, n, cfg["gi.enn_seed"],
                                   enn=enn, round_=r, progress=progress)
            n_held = max(1, round(cfg["gi.holdout"] * len(eps.accs)))
            keep = torch.arange(len(eps.accs)) < len(eps.accs) - n_held
            parts.append(Episodes(eps.states[keep], eps.accs[keep], eps.actions[keep], eps.rounds[keep],
                                  eps.diverged, eps.steps))
            held_parts.append(eps.select(~keep))
            fit = Episodes.cat(parts)
            if enn is None:
                enn = make_enn(fit.states.shape[2] // 2, cfg).to(device)
            enn.requires_grad_(True).train()
            trace += fit_enn(enn, fit.states, fit.accs, objective=cfg["gi.enn_objective"], gamma=cfg["gi.gamma"],
                             lam=cfg["gi.lam"], iters=cfg["gi.enn_iters"], lr=cfg["gi.enn_lr"],
                             batch=cfg["gi.enn_batch"], refresh=cfg["gi.refresh"], seed=cfg["gi.enn_seed"] + r,
                             init_bias=r == 0)
            enn.requires_grad_(False).eval()
    seconds = time.perf_counter() - t0
    held = Episodes.cat(held_parts)
    everything = Episodes.cat([fit, held])
    quality = enn_quality(enn, held) if len(held.accs) >= 2 else {}
    info = {"seconds": seconds, "episodes": cfg["gi.episodes"], "rounds": rounds, "diverged": fit.diverged,
            "fit_episodes": len(fit.accs), "episode_steps": cfg["gi.episode_steps"], "sgd_steps": fit.steps,
            "objective": cfg["gi.enn_objective"], "image_size": image_size(cfg["gi.canvas"], cfg["gi.resolution"]),
            "fit_loss": trace[:: max(1, len(trace) // 100)] + trace[-1:], **quality,
            "actions": everything.actions.tolist(), "episode_round": everything.rounds.tolist(),
            "final_accs": everything.accs[:, -1].tolist(), "initial_accs": everything.accs[:, 0].tolist(),
            "heldout": [False] * len(fit.accs) + [True] * len(held.accs)}
    return enn, info


# ----------------------------------------------------------------------------- arms for the loop


def weight_schedule(kind: str, t: float) -> float:
    """The ENN term's multiplier at training progress t in [0, 1]."""
    if kind == "constant":
        return 1.0
    if kind == "linear_decay":
        return max(1.0 - t, 0.0)
    if kind == "cosine_decay":
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    raise ValueError(f"unknown gi.schedule {kind!r}; choose one of: {', '.join(SCHEDULES)}")


SCHEDULES = ("constant", "linear_decay", "cosine_decay")


@torch.no_grad()
def train_test_gap(model: nn.Module, data, n: int = 5000) -> dict:
    """Accuracy on the first n training images (no augmentation, eval mode) and on the test split."""
    from ..train import evaluate

    was = model.training
    model.eval()
    hits = 0
    n = min(n, len(data.train.y))
    for s in range(0, n, 500):
        x = data.train.normalise(data.train.x[s:min(s + 500, n)])
        hits += (model(x).argmax(1) == data.train.y[s:min(s + 500, n)]).sum().item()
    model.train(was)
    test_acc, _ = evaluate(model, data.test)
    return {"train_acc_eval": hits / max(n, 1), "test_acc": test_acc, "gap": hits / max(n, 1) - test_acc}


class PlainBP(Baseline):
    """Plain backprop (the `baseline` arm): the MLP's default init, cross-entropy, SGD. Reports the
    final train-test gap (the abstract's second claim)."""

    def setup(self, model, data, cfg):
        super().setup(model, data, cfg)
        self.data = data

    def extras(self) -> dict:
        return train_test_gap(self.model, self.data)


class HeInit(PlainBP):
    """Backprop from He (Kaiming-normal, fan_in, ReLU) initial weights, zero biases."""

    name = "he_init"

    def setup(self, model, data, cfg):
        he_init_(model)             # the global RNG: run_arms seeds it before every arm
        super().setup(model, data, cfg)


class L1Reg(PlainBP):
    """Backprop + L1 on the weight matrices: loss = CE + gi.l1 * sum_l |W_l|_1."""

    name = "l1"

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.l1 = cfg["gi.l1"]

    def step(self, batch: Batch, meta_batch, lr: float) -> dict:
        set_lr(self.opt, lr)
        logits = self.model(batch.x)
        ce = F.cross_entropy(logits, batch.y, label_smoothing=self.label_smoothing)
        penalty = sum(w.abs().sum() for w in weight_matrices(self.model))
        self.opt.zero_grad(set_to_none=True)
        (ce + self.l1 * penalty).backward()
        self.opt.step()
        return {"loss": ce.item(), "l1_norm": penalty.item(),
                "acc": (logits.argmax(1) == batch.y).float().mean().item()}


class GradInstructor(PlainBP):
    """Backprop with the ENN as an extra evaluation function: loss = CE - w(t) E(render(W)).

    The two gradients are taken separately, so their ratio is logged (`enn_grad_ratio`,
    ||w(t) grad E|| / ||grad CE|| over the weight matrices), then p.grad = grad CE - w(t) grad E.
    The ENN is frozen; `enn_info` (its cost and quality) is copied into the arm's extras.
    """

    name = "grad_instructor"

    def __init__(self, cfg: dict, enn: ENN, enn_info: dict | None = None):
        super().__init__(cfg)
        self.enn, self.enn_info = enn, enn_info or {}
        self.weight, self.schedule = cfg["gi.weight"], cfg["gi.schedule"]
        self.render_cfg = {k: cfg[k] for k in ("gi.canvas", "gi.resolution")}

    def setup(self, model, data, cfg):
        super().setup(model, data, cfg)
        p = next(model.parameters())
        self.enn = self.enn.to(device=p.device, dtype=p.dtype).requires_grad_(False).eval()
        self.total = max(1, math.ceil(cfg["epochs"] * len(data.train)))
        self.steps, self.values, self.ratios = 0, [], []

    def step(self, batch: Batch, meta_batch, lr: float) -> dict:
        set_lr(self.opt, lr)
        params = list(self.model.parameters())
        weights = weight_matrices(self.model)
        logits = self.model(batch.x)
        ce = F.cross_entropy(logits, batch.y, label_smoothing=self.label_smoothing)
        g_ce = torch.autograd.grad(ce, params)
        value = self.enn(render_model(self.model, self.render_cfg)[None])[0]
        g_enn = dict(zip(map(id, weights), torch.autograd.grad(value, weights)))
        w = self.weight * weight_schedule(self.schedule, self.steps / self.total)
        for p, g in zip(params, g_ce):
            p.grad = g - w * g_enn[id(p)] if id(p) in g_enn else g
        self.opt.step()
        with torch.no_grad():
            n_ce = torch.sqrt(sum((g * g).sum() for p, g in zip(params, g_ce) if id(p) in g_enn))
            n_enn = torch.sqrt(sum((g * g).sum() for g in g_enn.values())) * w
            ratio = (n_enn / n_ce.clamp_min(1e-30)).item()
        self.steps += 1
        if self.steps == 1 or self.steps % 50 == 0:
            self.values.append(value.item())
            self.ratios.append(ratio)
        return {"loss": ce.item(), "enn_value": value.item(), "gi_weight": w, "enn_grad_ratio": ratio,
                "acc": (logits.argmax(1) == batch.y).float().mean().item()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "enn": self.enn.state_dict(), "steps": self.steps,
                "values": list(self.values), "ratios": list(self.ratios)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.enn.load_state_dict(state["enn"])
        self.steps, self.values, self.ratios = state["steps"], list(state["values"]), list(state["ratios"])

    def extras(self) -> dict:
        with torch.no_grad():
            final_value = self.enn(render_model(self.model, self.render_cfg)[None])[0].item()
        quality = {f"enn_{k}": v for k, v in self.enn_info.items()
                   if k in ("seconds", "episodes", "sgd_steps", "spearman_initial", "spearman_all", "final_mae")}
        return {**super().extras(), "enn_value_trace": list(self.values), "enn_grad_ratio_trace": list(self.ratios),
                "enn_value_final": final_value, **quality}


# ----------------------------------------------------------------------------- config and the chapter

DEFAULTS: dict = {
    # the target: an MLP on flattened CIFAR-10 (the abstract's targets are MLPs [A]; sizes [R])
    "model": "mlp", "width": 256, "depth": 2,
    "augment": False,              # plain MLP training, so the train-test gap is visible
    "weight_decay": 0.0,           # "plain backprop": no regulariser; L1 is its own arm
    "lr": 0.05,
    "gi.weight": 0.1,              # w: the ENN term's weight in CE - w(t) E(render(W)) [R]
    "gi.schedule": "constant",     # constant | linear_decay | cosine_decay (w(t) = w * schedule(t/T))
    "gi.canvas": 64,               # a weight matrix is first resized to canvas x canvas [R]
    "gi.resolution": 0.15,         # ... then down-sampled by this factor per side (0.15^2 of the pixels [A])
    "gi.l1": 1e-5,                 # L1 coefficient of the `l1` arm [R]
    "gi.enn_objective": "rl",      # rl (TD(lambda) value of the episode's accuracies) | regression
    "gi.gamma": 1.0,               # discount: 1 = predict the final accuracy, 0 = the next snapshot's
    "gi.lam": 0.8,                 # TD(lambda): 1 = Monte-Carlo returns, 0 = TD(0)
    "gi.episodes": 160,            # short target trainings for the ENN (incl. held-out ones)
    "gi.rounds": 3,                # collect-and-fit rounds; rounds > 0 follow the current ENN
    "gi.holdout": 0.25,            # fraction of episodes held out to measure the ENN (Spearman)
    "gi.episode_steps": 40,        # SGD steps per episode
    "gi.snapshot_every": 5,        # steps between states (K = episode_steps // snapshot_every)
    "gi.eval_size": 500,           # held-out images behind each snapshot's accuracy (the reward)
    "gi.gain_min": 0.2, "gi.gain_max": 2.0,   # behaviour policy: init gain (x He std), log-uniform
    "gi.lr_min": 0.003, "gi.lr_max": 0.1,     # ... and learning rate, log-uniform
    "gi.enn_channels": 8,          # conv channels per weight image in the ENN
    "gi.enn_iters": 600,           # Adam iterations fitting the ENN
    "gi.enn_lr": 3e-3,
    "gi.enn_batch": 64,
    "gi.refresh": 25,              # iterations between TD(lambda) target refreshes
    "gi.enn_seed": 0,              # the ENN's episodes and init (one ENN per run, shared by the seeds)
    "gi.same_time": True,          # also run the baseline for grad_instructor's wall-clock
}
PRESETS: dict = {
    # CI: seconds of training (62 steps per arm) and a tiny ENN (24 episodes of 20 steps, 2 rounds).
    "smoke": {"train_size": 4000, "meta_size": 500, "width": 128, "epochs": 2.0, "checkpoint_every": 50,
              "gi.episodes": 24, "gi.rounds": 2, "gi.episode_steps": 20, "gi.enn_iters": 150},
    # 2 cores, 3 seeds: 2,340 steps per arm. Measured on one loaded core (width 256, batch 128): a
    # plain step 13-14 ms, a Grad-Instructor step 13-31 ms, an ENN episode 0.4-0.75 s. Estimate:
    # ENN 1-2 min once + per seed ~3.5 min for the five arms -> about 12-13 minutes in all.
    "cpu": {"train_size": 20000, "epochs": 15.0, "gi.episodes": 160},
    "gpu": {"width": 1024, "depth": 3, "epochs": 50.0, "gi.episodes": 1000, "gi.episode_steps": 100,
            "gi.snapshot_every": 10, "gi.enn_iters": 3000},
    "paper": {"width": 1024, "depth": 3, "epochs": 100.0, "gi.episodes": 2000, "gi.episode_steps": 200,
              "gi.snapshot_every": 20, "gi.enn_iters": 5000},
}


def _enn_key(cfg: dict) -> dict:
    """The config keys the ENN depends on (a cached enn.pt must match them)."""
    keys = ("dataset", "train_size", "meta_size", "width", "depth", "batch_size", "augment")
    return {k: v for k, v in cfg.items() if k in keys or (k.startswith("gi.") and k not in
            ("gi.weight", "gi.schedule", "gi.l1", "gi.same_time"))}


def load_or_train_enn(cfg: dict, data, num_classes: int, out_dir=None, progress: bool = False):
    """train_enn, or load out_dir/enn.pt if a previous run with the same ENN config saved one."""
    path = Path(out_dir) / "enn.pt" if out_dir else None
    if path and path.exists():
        saved = torch.load(path, map_location=data.train.y.device, weights_only=True)
        if saved["key"] == _enn_key(cfg):
            enn = make_enn(saved["layers"], cfg).to(data.train.y.device)
            enn.load_state_dict(saved["enn"])
            return enn.requires_grad_(False).eval(), {**saved["info"], "loaded_from": str(path)}
    enn, info = train_enn(cfg, data, num_classes, progress)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": _enn_key(cfg), "layers": enn.layers, "enn": enn.state_dict(), "info": info}, path)
    return enn, info


def make_arms(cfg: dict, seeds: list[int], dataset, out_dir=None, progress: bool = False) -> tuple[dict, dict]:
    """Phase A: one ENN (trained, or loaded from out_dir/enn.pt) on the first seed's split; returns
    the arms (name -> factory) and the ENN's info (its cost and quality)."""
    from ..config import pick_device
    from ..train import prepare_data

    data = prepare_data(cfg, seeds[0], pick_device(cfg["device"]), dataset)
    enn, info = load_or_train_enn(cfg, data, dataset.num_classes, out_dir, progress)
    arms = {"baseline": PlainBP, "l1": L1Reg, "he_init": HeInit,
            "grad_instructor": lambda c: GradInstructor(c, copy.deepcopy(enn), info)}
    return arms, info


def run(cfg: dict, seeds: list[int], out_dir=None, progress: bool = True, dataset=None) -> dict:
    """Phase A: one ENN for the run (episodes on the first seed's split). Phase B: the arms
    baseline, l1, he_init, grad_instructor at equal epochs and seeds (and, with gi.same_time, the
    baseline at grad_instructor's wall-clock). The ENN's cost and quality go to record["enn"]."""
    from ..data import load_dataset
    from ..train import run_arms

    dataset = dataset or load_dataset(cfg["dataset"])
    arms, info = make_arms(cfg, seeds, dataset, out_dir, progress)
    record = run_arms("grad_instructor", "grad_instructor", arms, cfg, seeds, out_dir=out_dir, progress=progress,
                      dataset=dataset, same_time_for="grad_instructor" if cfg["gi.same_time"] else None)
    record["enn"] = info
    record["cost"]["enn_seconds"] = info["seconds"]
    record["metrics"].update({f"enn_{k}": info[k] for k in ("seconds", "spearman_initial", "spearman_all")
                              if k in info})
    for name, arm in record["arms"].items():
        gaps = [e["gap"] for e in arm.get("extras", {}).values() if "gap" in e]
        if gaps:
            arm["gap"] = {"mean": float(np.mean(gaps)), "per_seed": gaps}
    return record
