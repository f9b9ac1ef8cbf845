"""Grad-Instructor's evaluation network (ENN), apart from the arms that use it: weights rendered as
images [R] (0.15 -> 0.15^2 of the pixels [A]), the ENN, its fitting by TD(lambda) on short target
trainings (episodes) in gi.rounds rounds (the later ones follow the current ENN, so the critic sees
the weights its own gradient leads to), episode starts along full-length runs (gi.starts =
"trajectory"), its quality, Grad-CAM saliency and its cache file. [A]: the abstract, [R]: our
reconstruction; chapter 6 derives both and measures the critic's calibration.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..models import build_model
from ..train import Context, RunError, lr_at, make_model, save_atomic

# ----------------------------------------------------------------------------- rendering

def weight_matrices(model: nn.Module) -> list[torch.Tensor]:
    """The weight matrices of the MLP's Linear layers, input to output (hidden layers, head)."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def image_size(canvas: int, resolution: float) -> int:
    """Side of a rendered weight image: round(resolution * canvas), at least 1 (0.15 * 64 -> 10)."""
    return max(1, int(round(resolution * canvas)))


@functools.lru_cache(maxsize=64)
def _pooling_matrix(n: int, canvas: int, s: int) -> torch.Tensor:
    """(s, n) float64: resizing a length-n axis to `canvas`, then to `s` (adaptive average pooling)."""
    eye = torch.eye(n, dtype=torch.float64)[:, None, :]                      # (n, 1, n)
    return F.adaptive_avg_pool1d(F.adaptive_avg_pool1d(eye, canvas), s)[:, 0, :].T.contiguous()


def render_weights(weights: list[torch.Tensor], canvas: int = 64, resolution: float = 0.15,
                   eps: float = 1e-12) -> torch.Tensor:
    """Weight matrices W_l (h, fan_in) -> the ENN's input (2L, s, s), channels [M_1, R_1, M_2, ...]:
    M = pool(W) sqrt(fan_in n_l), R = sqrt(pool(W^2) + eps) sqrt(fan_in) (n_l weights per pixel;
    both O(1) at a random init). pool = A W B^T with the separable pooling matrices (differentiable)."""
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
    """Evaluation network [R]: x (B, 2L, s, s) -> (B,) predicted accuracy in (0, 1). One tower of two
    3x3 convolutions per weight image (grouped: towers do not mix), ReLU, global average pooling,
    one linear layer over all towers, a sigmoid."""

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


def saliency(enn: ENN, x: torch.Tensor, kind: str = "grad_cam") -> torch.Tensor:
    """One map per weight image: x (B, 2L, s, s) -> (B, L, s, s). grad_cam: ReLU(sum_c alpha_c A_c)
    over each tower's channels, alpha_c = spatial mean of dE/dA_c; grad_x_input: (dE/dx) * x,
    summed over the mean and rms image."""
    b, layers, s = x.shape[0], x.shape[1] // 2, x.shape[2]
    x = x.detach().requires_grad_(kind == "grad_x_input")
    with torch.enable_grad():         # works for a frozen ENN (requires_grad off) and under no_grad
        if kind == "grad_cam":
            a = enn.features(x).detach().requires_grad_(True)          # the activations are the leaf
            (g,) = torch.autograd.grad(enn.from_features(a).sum(), a)
            a, g = a.view(b, layers, -1, s, s), g.view(b, layers, -1, s, s)
            return F.relu((g.mean(dim=(3, 4), keepdim=True) * a).sum(2)).detach()
        if kind == "grad_x_input":
            (g,) = torch.autograd.grad(enn(x).sum(), x)
            return (g * x).view(b, layers, 2, s, s).sum(2).detach()
    raise ValueError(f"unknown saliency kind {kind!r}; choose one of: grad_cam, grad_x_input")


def saliency_to_matrix(saliency_map: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A (s, s) map spread back (nearest) over a weight matrix of `shape` (h, w)."""
    return F.interpolate(saliency_map[None, None].float(), size=tuple(shape), mode="nearest")[0, 0]


# ----------------------------------------------------------------------------- RL: returns and fitting

def episode_rewards(accs: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out accuracies at snapshots (E, K+1) -> rewards r_k = (1 - gamma) acc_{k+1}, (E, K),
    and the absorbing final state's value acc_K, (E,)."""
    return (1.0 - gamma) * accs[:, 1:], accs[:, -1]


def lambda_returns(rewards: torch.Tensor, next_values: torch.Tensor, terminal: torch.Tensor,
                   gamma: float, lam: float) -> torch.Tensor:
    """TD(lambda) targets (E, K+1) of the states s_0..s_K: rewards (E, K), next_values (E, K) =
    V(s_{k+1}) (the last column ignored: s_K's value is `terminal` (E,)). G_K = terminal,
    G_k = r_k + gamma * ((1 - lam) * v_{k+1} + lam * G_{k+1})."""
    e, k = rewards.shape
    values = torch.cat([next_values[:, :-1], terminal[:, None]], dim=1)   # v_1..v_K, v_K known
    out = torch.empty(e, k + 1, dtype=rewards.dtype, device=rewards.device)
    out[:, k] = terminal
    for i in range(k - 1, -1, -1):
        out[:, i] = rewards[:, i] + gamma * ((1 - lam) * values[:, i] + lam * out[:, i + 1])
    return out


def spearman(a, b) -> float:
    """Spearman rank correlation of two sequences (average ranks for ties; nan if one is constant)."""

    def ranks(x):
        x = np.asarray(x, dtype=float)
        r = np.empty(len(x))
        r[np.argsort(x, kind="mergesort")] = np.arange(len(x), dtype=float)
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        return (np.bincount(inverse, weights=r) / counts)[inverse]

    ra, rb = ranks(a), ranks(b)
    return float("nan") if ra.std() == 0 or rb.std() == 0 else float(np.corrcoef(ra, rb)[0, 1])


def fit_enn(enn: ENN, states: torch.Tensor, accs: torch.Tensor, *, objective: str = "rl",
            gamma: float = 1.0, lam: float = 0.8, iters: int = 300, lr: float = 3e-3,
            batch: int = 64, refresh: int = 25, seed: int = 0, init_bias: bool = True,
            conservative: float = 0.0, conservative_step: float = 0.1) -> list[float]:
    """Fit the ENN on states (E, K+1, C, s, s) with accuracies (E, K+1) by Adam on the MSE over random
    minibatches; targets: "rl" TD(lambda) returns (recomputed by the current ENN every `refresh`
    iterations; lam = 1 is Monte-Carlo), "regression" the snapshot's accuracy. Returns the losses.
    conservative = alpha > 0 adds alpha (mean E(x') - mean E(x)) to each minibatch's loss, where x' is
    the state x moved one step along the ENN's own gradient, of conservative_step times |x|: a
    conservative critic in the manner of COMs (Trabucco et al. 2021) [R], which gets no credit for
    states off its data in the direction a target climbing it would go."""
    e, k1 = accs.shape
    flat = states.flatten(0, 1)                                          # (E (K+1), C, s, s)
    g = torch.Generator().manual_seed(seed)
    rewards, terminal = episode_rewards(accs, gamma)
    if objective not in ("rl", "regression"):
        raise ValueError(f"unknown ENN objective {objective!r}; choose one of: rl, regression")
    targets = accs if objective == "regression" else lambda_returns(rewards, torch.zeros_like(rewards), terminal,
                                                                    gamma, 1.0)              # rl: a MC start
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
        x = flat[pick]
        pred = enn(x)
        loss = F.mse_loss(pred, targets.flatten()[pick])
        if conservative > 0:
            loss = loss + conservative * (enn(ascent_step(enn, x, conservative_step)).mean() - pred.mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        trace.append(loss.item())
    return trace


def ascent_step(enn: ENN, x: torch.Tensor, step: float) -> torch.Tensor:
    """States x (B, C, s, s) moved along the ENN's gradient, each by step * |x| (the norm over one
    state), detached: where a target climbing this ENN would go next."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(enn(x).sum(), x)
    norm = lambda t: t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))
    return (x + step * norm(x) * grad / norm(grad).clamp_min(1e-12)).detach()


# ----------------------------------------------------------------------------- episodes

@dataclass
class Episodes:
    states: torch.Tensor     # (E, K+1, 2L, s, s) rendered weights at the snapshots
    accs: torch.Tensor       # (E, K+1) held-out accuracy at each snapshot
    actions: torch.Tensor    # (E, 4) the policy's action: (init gain, learning rate, ENN weight, start step;
                             #        start step -1: a fresh initialisation, else a trajectory point)
    rounds: torch.Tensor     # (E,) the round that collected each episode
    diverged: int = 0        # episodes dropped because their loss became NaN/inf
    steps: int = 0           # SGD steps run in all episodes

    def select(self, keep: torch.Tensor) -> "Episodes":
        return Episodes(self.states[keep], self.accs[keep], self.actions[keep], self.rounds[keep],
                        self.diverged, self.steps)

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


def run_episode(model: nn.Module, batches, x_eval, y_eval, lr: float, c, enn: ENN | None = None,
                enn_weight: float = 0.0):
    """Train `model` on `batches` (SGD, Nesterov momentum 0.9, constant lr) on CE - enn_weight *
    enn(render(W)). Returns (states (K+1, 2L, s, s), accs (K+1,)) at steps 0, c.snapshot_every, ...,
    or None if the loss or the weights became NaN/inf."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    accuracy = torch.no_grad()(lambda: (model(x_eval).argmax(1) == y_eval).float().mean().item())
    states, accs = [render_model(model, c).detach()], [accuracy()]
    for t, batch in enumerate(batches, start=1):
        loss = F.cross_entropy(model(batch.x), batch.y)
        if not torch.isfinite(loss):
            return None
        if enn is not None and enn_weight > 0:
            loss = loss - enn_weight * enn(render_model(model, c)[None])[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if t % c.snapshot_every == 0:
            states.append(render_model(model, c).detach())
            accs.append(accuracy())
    finite = all(torch.isfinite(s).all() for s in states)
    return (torch.stack(states), torch.tensor(accs)) if finite else None


@dataclass
class Trajectory:
    """One full-length run of the target: its weights (state_dicts) saved at `steps` of `total`, the
    reward split's accuracy there and, for a run guided by an ENN, that ENN's prediction there.
    The critic's episodes start from these weights."""
    steps: list[int]
    states: list[dict]
    accs: list[float]
    total: int
    kind: str = "baseline"             # "baseline" or "guided" (Grad-Instructor's update with the given ENN)
    preds: list[float] | None = None    # the guiding ENN's prediction at each saved state
    seconds: float = 0.0


def trajectory_steps(total: int, points: int) -> list[int]:
    """The saved steps of a trajectory: round(k * total / points), k = 0..points-1 (0 = the initial
    weights; distinct steps only, so fewer when total < points)."""
    return sorted({round(k * total / points) for k in range(points)})


def replay_trajectory(cfg: dict, streams, num_classes: int, total: int, points: int, x_eval, y_eval,
                      init_state: dict, seed: int = 0, enn: ENN | None = None) -> Trajectory:
    """The target's run, replayed from its initial weights `init_state` on the loop's "train" stream with
    the loop's schedule lr_at(t, total): without `enn` the `baseline` arm's method (bit for bit its
    weights), with one the `grad_instructor` arm's update guided by that ENN at cfg's gi.weight,
    frozen (no online refit, whatever gi.refit_every says); the weights, the reward accuracy (and
    the ENN's prediction) at trajectory_steps(total, points). Steps after the last saved one are
    not run."""
    from .baseline import Baseline            # imported here: both import this module
    from .grad_instructor import GradInstructor
    device = x_eval.device
    model = make_model(cfg, num_classes, device)
    model.load_state_dict(init_state)
    # a guided replay never refits its critic (gi.refit_every is the target arm's, not the ENN's training)
    method = Baseline(cfg) if enn is None else GradInstructor({**cfg, "gi.refit_every": 0}, enn=enn)
    method.setup(Context(model, streams, total, 0, num_classes, streams.size("train"), seed))
    save = trajectory_steps(total, points)
    accuracy = torch.no_grad()(lambda: (model(x_eval).argmax(1) == y_eval).float().mean().item())
    t0, states, accs, preds = time.perf_counter(), [], [], []
    for t in range(max(save) + 1):
        if t in save:
            was = model.training
            model.eval()
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            accs.append(accuracy())
            if enn is not None:
                preds.append(method.value())
            model.train(was)
            if t == save[-1]:
                break
        loss = method.step(streams.batch("train", t), None, lr_at(t, total, cfg))["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the ENN's {'guided' if enn else 'baseline'} trajectory diverged at step {t} "
                                     f"of {total}; lower lr or gi.weight")
    return Trajectory(save, states, accs, total, "baseline" if enn is None else "guided", preds or None,
                      time.perf_counter() - t0)


def collect_episodes(c, width: int, depth: int, streams, x_eval, y_eval, num_classes: int, n: int, seed: int,
                     enn: ENN | None = None, round_: int = 0, trajectory: Trajectory | None = None) -> Episodes:
    """n episodes of the behaviour policy [R]: each starts either from a fresh MLP (width, depth),
    He init x a log-uniform gain (always without a `trajectory`; with one, with probability
    gi.init_share), or from the weights of a trajectory point drawn uniformly; then a log-uniform lr,
    gi.episode_steps steps on the stream f"episode-{round_}-{e}"; with an `enn` (later rounds) also
    its term at a weight gi.weight * 10^U(-1, 1)."""
    device = x_eval.device
    g = torch.Generator().manual_seed(seed * 1000 + round_)
    uniform = lambda: torch.rand((), generator=g).item()
    log_uniform = lambda lo, hi: math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * uniform())
    outs, diverged = [], 0
    for e in range(n):
        fresh = trajectory is None or uniform() < c.init_share
        point = None if fresh else int(torch.randint(len(trajectory.steps), (), generator=g))
        gain = log_uniform(c.gain_min, c.gain_max) if fresh else 1.0
        lr = log_uniform(c.lr_min, c.lr_max)
        w = c.weight * log_uniform(0.1, 10.0) if enn is not None else 0.0
        model = build_model("mlp", num_classes, width, depth).to(device)
        if fresh:
            he_init_(model, gain, generator=g)
        else:
            model.load_state_dict(trajectory.states[point])
        batches = (streams.batch(f"episode-{round_}-{e}", i) for i in range(c.episode_steps))
        out = run_episode(model, batches, x_eval, y_eval, lr, c, enn=enn, enn_weight=w)
        if out is None:
            diverged += 1
        else:
            start = -1 if fresh else trajectory.steps[point]
            outs.append((*out, torch.tensor([gain, lr, w, float(start)])))
    if len(outs) < 2:
        raise FloatingPointError(f"{diverged} of {n} ENN episodes diverged; lower gi.lr_max or gi.gain_max")
    states, accs, actions = map(torch.stack, zip(*outs))
    return Episodes(states, accs.to(device), actions, torch.full((len(outs),), round_), diverged, n * c.episode_steps)


def enn_quality(enn: ENN, episodes: Episodes) -> dict:
    """How well the ENN ranks held-out episodes by their final accuracy (Spearman), from the initial
    weights alone and from every snapshot, and its mean absolute error on the final accuracy."""
    with torch.no_grad():
        e, k1 = episodes.accs.shape
        pred = enn(episodes.states.flatten(0, 1)).view(e, k1).cpu()
    final = episodes.accs[:, -1].cpu()
    return {"spearman_initial": spearman(pred[:, 0], final),
            "spearman_all": spearman(pred.flatten(), final[:, None].expand(e, k1).flatten()),
            "final_mae": float((pred - final[:, None]).abs().mean()), "heldout_episodes": e}


def episodes_per_round(c) -> list[int]:
    """gi.episodes split over gi.rounds (ConfigError if a round would get fewer than 2)."""
    n, rounds = c.episodes, c.rounds
    if n < 2 * rounds:
        raise ConfigError(f"gi.episodes={n} is too few for gi.rounds={rounds}; it must be >= 2 * gi.rounds "
                          f"(each round fits on some and holds out some)")
    return [n // rounds + (1 if r < n % rounds else 0) for r in range(rounds)]


def reward_examples(c, streams):
    """The critic's reward images: the first gi.eval_size of the run's meta split (never the
    validation, held-out or test split)."""
    return streams.examples("meta", 0, c.eval_size)


def train_enn(c, streams, num_classes: int, seed: int = 0, *, width: int, depth: int,
              target_cfg: dict | None = None, total_steps: int | None = None,
              init_state: dict | None = None) -> tuple[ENN, dict]:
    """The frozen ENN of one run (c: the GI section; width, depth: the target MLP's) and its info. With
    gi.starts = "trajectory" each round first replays a full-length run of this seed's target
    (target_cfg: the run's config, init_state: its initial weights, total_steps: its length) and saves
    gi.start_points states along it, the round's episode starts (replay_trajectory): round 0 the
    baseline arm's run, later rounds the run guided by the current ENN (on-policy: where the target
    goes when it climbs this critic). Each round collects episodes (rewards:
    reward_examples, on the meta split), holds out the last gi.holdout of them and refits the ENN on all
    others so far. Seeded by seed + gi.enn_seed."""
    per_round = episodes_per_round(c)
    enn_seed = seed + c.enn_seed
    reward = reward_examples(c, streams)
    device = reward.y.device
    if c.starts == "trajectory" and (target_cfg is None or not total_steps or init_state is None):
        raise ConfigError("gi.starts=trajectory needs the target's config, initial weights and total steps "
                          "(train_enn(..., target_cfg=cfg, total_steps=T, init_state=...)); or set gi.starts=init")
    t0 = time.perf_counter()
    parts, held_parts, trace, enn, trajectory, trajectories = [], [], [], None, None, []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(enn_seed)
        for r, n in enumerate(per_round):
            if c.starts == "trajectory":
                trajectory = replay_trajectory({**target_cfg, "width": width, "depth": depth}, streams, num_classes,
                                               total_steps, c.start_points, reward.x, reward.y, init_state, seed,
                                               enn=enn)
                trajectories.append(trajectory)
            eps = collect_episodes(c, width, depth, streams, reward.x, reward.y, num_classes, n, enn_seed,
                                   enn=enn, round_=r, trajectory=trajectory)
            keep = torch.arange(len(eps.accs)) < len(eps.accs) - max(1, round(c.holdout * len(eps.accs)))
            parts.append(eps.select(keep))
            held_parts.append(eps.select(~keep))
            fit = Episodes.cat(parts)
            if enn is None:
                enn = ENN(fit.states.shape[2] // 2, c.enn_channels).to(device)
            enn.requires_grad_(True).train()
            trace += fit_enn(enn, fit.states, fit.accs, objective=c.enn_objective, gamma=c.gamma, lam=c.lam,
                             iters=c.enn_iters, lr=c.enn_lr, batch=c.enn_batch, refresh=c.refresh,
                             seed=enn_seed + r, init_bias=r == 0, conservative=c.conservative,
                             conservative_step=c.conservative_step)
            enn.requires_grad_(False).eval()
    held = Episodes.cat(held_parts)
    every = Episodes.cat([fit, held])
    quality = enn_quality(enn, held) if len(held.accs) >= 2 else {}
    replayed = sum(tr.steps[-1] for tr in trajectories)
    starts = {"kind": c.starts} if not trajectories else {
        "kind": c.starts, "steps": trajectories[0].steps, "total": total_steps, "sgd_steps": replayed,
        "seconds": sum(tr.seconds for tr in trajectories),
        "rounds": [{"kind": tr.kind, "accs": tr.accs, "preds": tr.preds, "seconds": tr.seconds} for tr in trajectories]}
    info = {"seconds": time.perf_counter() - t0, "episodes": c.episodes, "rounds": len(per_round),
            "starts": starts, "reward": {"split": "meta", "images": len(reward.y)},
            "diverged": fit.diverged, "fit_episodes": len(fit.accs), "episode_steps": c.episode_steps,
            "sgd_steps": fit.steps + replayed, "objective": c.enn_objective, "image_size": image_size(c.canvas, c.resolution),
            "fit_loss": trace[:: max(1, len(trace) // 100)] + trace[-1:], **quality,
            "actions": every.actions.tolist(), "episode_round": every.rounds.tolist(),
            "final_accs": every.accs[:, -1].tolist(), "initial_accs": every.accs[:, 0].tolist(),
            "start_steps": every.actions[:, 3].long().tolist(),
            "heldout": [False] * len(fit.accs) + [True] * len(held.accs)}
    return enn, info


# ----------------------------------------------------------------------------- the cache file

def enn_config_key(cfg: dict) -> dict:
    """The config keys a run's ENN depends on (its data, the target's shape and training, which the
    baseline trajectory replays, and the gi.* knobs other than the arms'): a cached ENN is reused only
    for the same key, seed and split (split_fingerprint)."""
    data = ("dataset", "train_size", "meta_size", "val_size", "batch_size", "augment", "width", "depth", "model",
            "noise.kind", "noise.rate", "target.classes", "target.ratio")
    training = ("epochs", "steps", "lr", "schedule", "warmup", "momentum", "nesterov", "weight_decay",
                "label_smoothing")
    arm_keys = ("gi.schedule", "gi.l1", "gi.same_time", "gi.refit_every", "gi.refit_episodes", "gi.refit_iters")
    return {k: v for k, v in cfg.items()
            if k in data or k in training or (k.startswith("gi.") and k not in arm_keys)}


def split_fingerprint(streams, c) -> str:
    """sha1 (16 hex digits) of what the ENN's training reads of the run's data: the training split's
    images and labels and the reward images and labels. Seeds with different splits differ."""
    h = hashlib.sha1()
    reward = reward_examples(c, streams)
    for t in (streams.loaders["train"].x, streams.loaders["train"].y, reward.x, reward.y):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def enn_cache_path(cache_dir, key: dict, seed: int) -> Path:
    """cache_dir/enn-seed{seed}-{sha1 of the key, 10 digits}.pt: arms with different ENN configs (e.g.
    another gi.starts) keep their own files side by side."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Path(cache_dir) / f"enn-seed{seed}-{digest}.pt"


def load_enn(path: Path, device="cpu") -> tuple[ENN, dict]:
    """(the frozen ENN, the saved dict: key, info and seed) of a cache file or a recorded enn.pt
    (those have no seed). A file that cannot be read raises RunError naming it."""
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        enn = ENN(saved["layers"], saved["enn"]["conv1.weight"].shape[0] // saved["layers"])
        enn.load_state_dict(saved["enn"])
    except Exception as err:      # torch raises several types for a truncated or foreign file
        raise RunError(f"{path} is corrupt ({type(err).__name__}); delete it to train that ENN again") from None
    return enn.to(device).requires_grad_(False).eval(), saved


def load_or_train_enn(c, key: dict, streams, num_classes: int, seed: int, cache_dir=None, *, width: int,
                      depth: int, target_cfg: dict | None = None, total_steps: int | None = None,
                      init_state: dict | None = None) -> tuple[ENN, dict]:
    """train_enn(...), or the ENN cached in enn_cache_path(cache_dir, key, seed) if saved there (on the
    CPU) for the same `key` (enn_config_key plus the split's fingerprint) and seed. A new ENN is saved
    to .tmp, then renamed (no half file if killed)."""
    key = {**key, "split": split_fingerprint(streams, c)}
    path = enn_cache_path(cache_dir, key, seed) if cache_dir else None
    if path and path.exists():
        enn, saved = load_enn(path)
        if saved["key"] == key and saved.get("seed") == seed:
            return enn, {**saved["info"], "loaded_from": str(path)}
    enn, info = train_enn(c, streams, num_classes, seed, width=width, depth=depth, target_cfg=target_cfg,
                          total_steps=total_steps, init_state=init_state)
    info["split"] = key["split"]
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic({"key": key, "seed": seed, "layers": enn.layers, "enn": enn.state_dict(), "info": info}, path)
    return enn, info
