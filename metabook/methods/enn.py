"""Grad-Instructor's evaluation network (ENN): weights rendered as images, the ENN, its training by
TD(lambda) on short target trainings (episodes), its quality, saliency, and its cache file.

Only the paper's abstract could be read (methods.md section 5); what it says is marked [A], our
reconstruction [R]. The arms that use the ENN are in grad_instructor.py; chapter 6 derives both.

1. Rendering [R]. Each weight matrix W_l (h_l, w_l) of the target MLP (biases left out) becomes a
   mean image M_l = D(P(W_l)) * sqrt(fan_in_l n_l) and an rms image R_l = sqrt(D(P(W_l^2)) + eps)
   * sqrt(fan_in_l): P resizes to a gi.canvas square, D down-samples to s = round(gi.resolution *
   canvas) per side (0.15 -> about 0.15^2 of the pixels [A]); n_l weights are averaged into one
   pixel, and the factors make both images O(1) at a random init. Input (2L, s, s), differentiable.
2. The ENN [R]: one tower of two grouped 3x3 convolutions per weight image, global average pooling,
   a linear head, a sigmoid: (B, 2L, s, s) -> (B,) predicted accuracy in (0, 1).
3. Training by RL [R] ("deep reinforcement learning" [A]): an episode is gi.episode_steps SGD steps
   of a fresh MLP under a random behaviour policy (He init x a log-uniform gain, a log-uniform lr;
   in rounds after the first also the current ENN's term); states are the rendered weights every
   gi.snapshot_every steps, rewards (1 - gamma) x the next snapshot's held-out accuracy, and the
   ENN is the state value fitted by semi-gradient TD(lambda), in gi.rounds rounds of
   collect-and-refit (approximate policy iteration), on the run's own training split; its reward
   images are the first gi.eval_size images of the held-out split. Without the later rounds the
   critic never sees the weights its own gradient leads to (measured: an ENN fitted on plain-SGD
   episodes only predicted 0.95 for the target within an epoch, whose real accuracy fell below
   plain backprop's).
4. Quality: Spearman rank correlation between prediction and final accuracy on held-out episodes.
5. Saliency: Grad-CAM (Selvaraju et al. 2017) per weight image, and grad x input.
"""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import build_model

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
    """Weight matrices -> the ENN's input (2L, s, s), channels [M_1, R_1, M_2, R_2, ...].

    Adaptive average pooling is separable, so resize-then-down-sample of W is A W B^T with fixed
    pooling matrices A (s, h) and B (s, w): two small matmuls (the same numbers as two calls of
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


def render_model(model: nn.Module, c) -> torch.Tensor:
    """render_weights of a model's weight matrices at c.canvas and c.resolution (c: the GI section)."""
    return render_weights(weight_matrices(model), c.canvas, c.resolution)


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


def make_enn(num_matrices: int, c) -> ENN:
    return ENN(num_matrices, c.enn_channels)


def saliency(enn: ENN, x: torch.Tensor, kind: str = "grad_cam") -> torch.Tensor:
    """One saliency map per weight image: x (B, 2L, s, s) -> (B, L, s, s), >= 0 for grad_cam.

    grad_cam: ReLU(sum_c alpha_c A_c) over the channels c of each weight image's tower, alpha_c =
    the spatial mean of d E / d A_c (the towers keep the resolution s, so no up-sampling is
    needed). grad_x_input: (d E / d x) * x, summed over the mean and rms image.
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


# ----------------------------------------------------------------------------- RL: returns and fitting


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
                snapshot_every: int, c, enn: ENN | None = None, enn_weight: float = 0.0):
    """Train `model` (already initialised) on `batches` (SGD, Nesterov momentum 0.9, constant lr)
    on CE - enn_weight * enn(render(W)) (plain CE without an ENN). Returns (states (K+1, 2L, s, s),
    accs (K+1,)) at steps 0, snapshot_every, ..., or None if the loss or the weights became NaN/inf.
    c: the GI section (the rendering's canvas and resolution)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    states, accs = [render_model(model, c).detach()], [accuracy(model, x_eval, y_eval)]
    for t, batch in enumerate(batches, start=1):
        loss = F.cross_entropy(model(batch.x), batch.y)
        if not torch.isfinite(loss):
            return None
        if enn is not None and enn_weight > 0:
            loss = loss - enn_weight * enn(render_model(model, c)[None])[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if t % snapshot_every == 0:
            states.append(render_model(model, c).detach())
            accs.append(accuracy(model, x_eval, y_eval))
    if not all(torch.isfinite(s).all() for s in states):
        return None
    return torch.stack(states), torch.tensor(accs)


def collect_episodes(c, width: int, depth: int, streams, x_eval, y_eval, num_classes: int, n: int, seed: int,
                     enn: ENN | None = None, round_: int = 0) -> Episodes:
    """Run n episodes of the policy (c: the GI section): fresh MLPs of the target's architecture
    (width, depth), He-normal init times a log-uniform gain in [gi.gain_min, gi.gain_max], a
    log-uniform learning rate in [gi.lr_min, gi.lr_max], gi.episode_steps steps on batches of the
    run's stream f"episode-{round_}-{e}".
    With an `enn` (rounds after the first) each episode follows it with a weight gi.weight *
    10^U(-1, 1), so the ENN also sees, and is corrected on, the weights its own guidance produces."""
    device = x_eval.device
    g = torch.Generator().manual_seed(seed * 1000 + round_)
    log_uniform = lambda lo, hi: math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand((), generator=g).item())
    states, accs, actions, diverged = [], [], [], 0
    for e in range(n):
        gain, lr = log_uniform(c.gain_min, c.gain_max), log_uniform(c.lr_min, c.lr_max)
        w = c.weight * log_uniform(0.1, 10.0) if enn is not None else 0.0
        model = build_model("mlp", num_classes, width, depth).to(device)
        he_init_(model, gain, generator=g)
        batches = (streams.batch(f"episode-{round_}-{e}", i) for i in range(c.episode_steps))
        out = run_episode(model, batches, x_eval, y_eval, lr=lr, snapshot_every=c.snapshot_every,
                          c=c, enn=enn, enn_weight=w)
        if out is None:
            diverged += 1
            continue
        states.append(out[0])
        accs.append(out[1])
        actions.append(torch.tensor([gain, lr, w]))
    if len(states) < 2:
        raise FloatingPointError(f"{diverged} of {n} ENN episodes diverged; lower gi.lr_max or gi.gain_max")
    return Episodes(torch.stack(states), torch.stack(accs).to(device), torch.stack(actions),
                    torch.full((len(states),), round_), diverged, n * c.episode_steps)


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


def episodes_per_round(c) -> list[int]:
    """gi.episodes split over gi.rounds (ConfigError if a round would get fewer than 2)."""
    from ..config import ConfigError

    n, rounds = c.episodes, c.rounds
    if n < 2 * rounds:
        raise ConfigError(f"gi.episodes={n} is too few for gi.rounds={rounds}; it must be >= 2 * gi.rounds "
                          f"(each round fits on some and holds out some)")
    return [n // rounds + (1 if r < n % rounds else 0) for r in range(rounds)]


def train_enn(c, streams, num_classes: int, seed: int = 0, *, width: int, depth: int) -> tuple[ENN, dict]:
    """The ENN of one run (its seed's split; c: the GI section; width, depth: the target MLP's),
    in gi.rounds rounds (approximate policy iteration): collect episodes on the training split
    (rewards: accuracy on the first gi.eval_size images of the held-out split) -- round 0 plain
    SGD, later rounds guided by the current ENN -- and fit
    the ENN (warm-started) on all episodes so far except the held-out ones (the last gi.holdout
    of every round), on which its quality is measured at the end. Episodes and init are seeded by
    seed + gi.enn_seed. Returns the frozen ENN and an info dict (cost, quality, the episodes'
    actions and final accuracies for the chapter's figures)."""
    per_round = episodes_per_round(c)
    enn_seed = seed + c.enn_seed
    reward = streams.examples("meta", 0, c.eval_size)
    device = reward.y.device
    t0 = time.perf_counter()
    parts, held_parts, trace, enn = [], [], [], None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(enn_seed)
        for r, n in enumerate(per_round):
            eps = collect_episodes(c, width, depth, streams, reward.x, reward.y, num_classes, n, enn_seed,
                                   enn=enn, round_=r)
            n_held = max(1, round(c.holdout * len(eps.accs)))
            keep = torch.arange(len(eps.accs)) < len(eps.accs) - n_held
            parts.append(Episodes(eps.states[keep], eps.accs[keep], eps.actions[keep], eps.rounds[keep],
                                  eps.diverged, eps.steps))
            held_parts.append(eps.select(~keep))
            fit = Episodes.cat(parts)
            if enn is None:
                enn = make_enn(fit.states.shape[2] // 2, c).to(device)
            enn.requires_grad_(True).train()
            trace += fit_enn(enn, fit.states, fit.accs, objective=c.enn_objective, gamma=c.gamma, lam=c.lam,
                             iters=c.enn_iters, lr=c.enn_lr, batch=c.enn_batch, refresh=c.refresh,
                             seed=enn_seed + r, init_bias=r == 0)
            enn.requires_grad_(False).eval()
    held = Episodes.cat(held_parts)
    everything = Episodes.cat([fit, held])
    quality = enn_quality(enn, held) if len(held.accs) >= 2 else {}
    info = {"seconds": time.perf_counter() - t0, "episodes": c.episodes, "rounds": len(per_round),
            "diverged": fit.diverged, "fit_episodes": len(fit.accs), "episode_steps": c.episode_steps,
            "sgd_steps": fit.steps, "objective": c.enn_objective, "image_size": image_size(c.canvas, c.resolution),
            "fit_loss": trace[:: max(1, len(trace) // 100)] + trace[-1:], **quality,
            "actions": everything.actions.tolist(), "episode_round": everything.rounds.tolist(),
            "final_accs": everything.accs[:, -1].tolist(), "initial_accs": everything.accs[:, 0].tolist(),
            "heldout": [False] * len(fit.accs) + [True] * len(held.accs)}
    return enn, info


# ----------------------------------------------------------------------------- the cache file

ARM_KEYS = ("gi.schedule", "gi.l1", "gi.same_time")      # gi.* keys the ENN does not depend on


def enn_config_key(cfg: dict) -> dict:
    """The config keys a run's ENN depends on (its data, the target's shape, the gi.* knobs of the
    episodes and the fit): a cached ENN is reused only for the same key and seed."""
    data = ("dataset", "train_size", "meta_size", "batch_size", "augment", "width", "depth",
            "noise.kind", "noise.rate", "target.classes", "target.ratio")
    return {k: v for k, v in cfg.items() if k in data or (k.startswith("gi.") and k not in ARM_KEYS)}


def save_enn(path: Path, enn: ENN, key: dict, seed: int, info: dict) -> None:
    """torch.save to path.tmp, then rename (a killed write leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": key, "seed": seed, "layers": enn.layers, "enn": enn.state_dict(), "info": info}, tmp)
    os.replace(tmp, path)


def load_enn(path: Path, device="cpu") -> tuple[ENN, dict]:
    """(the frozen ENN, the saved dict: key, info and seed) of a file of save_enn or a recorded
    enn.pt (those have no seed). A file that cannot be read raises RunError naming it."""
    from ..train import RunError

    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        enn = ENN(saved["layers"], saved["enn"]["conv1.weight"].shape[0] // saved["layers"])
        enn.load_state_dict(saved["enn"])
    except Exception as err:      # torch raises several types for a truncated or foreign file
        raise RunError(f"{path} is corrupt ({type(err).__name__}); delete it to train that ENN again") from None
    return enn.to(device).requires_grad_(False).eval(), saved


def load_or_train_enn(c, key: dict, streams, num_classes: int, seed: int, cache_dir=None, *, width: int,
                      depth: int) -> tuple[ENN, dict]:
    """train_enn(c, ...), or the ENN saved in cache_dir/enn-seed{seed}.pt by a run with the same
    `key` (enn_config_key of the run's config; then on the CPU, and its info says where it was
    loaded from)."""
    path = Path(cache_dir) / f"enn-seed{seed}.pt" if cache_dir else None
    if path and path.exists():
        enn, saved = load_enn(path)
        if saved["key"] == key and saved.get("seed") == seed:
            return enn, {**saved["info"], "loaded_from": str(path)}
    enn, info = train_enn(c, streams, num_classes, seed, width=width, depth=depth)
    if path:
        save_enn(path, enn, key, seed, info)
    return enn, info
