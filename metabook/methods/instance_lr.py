"""Per-instance dynamic learning rates (after Saxena, Vyas, DeCoste 2021, arXiv 2105.13464), our
reconstruction [R] (the paper's parameterisation and update could not be read; chapter 4 derives
ours): each training example i keeps a clipped log rate sigma_i, the real step scales its gradient
by exp(sigma_i), and sigma is learned by the one-step lookahead on a clean meta batch. The control
arms `baseline_clean`, `mean_rate` and `mwn` (Meta-Weight-Net, Shu et al. 2019) take the
per-example multipliers' meta-gradient from the same `multiplier_meta_gradient`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, knob, section
from ..data import Batch
from ..meta import (example_weight_meta_gradient, forward, lookahead_params, model_params,
                    reweighting_step)
from ..results import roc_auc
from ..train import Arm, Experiment, per_example, run_experiment
from .baseline import Baseline, set_lr


def multiplier_meta_gradient(model, params, x, y, losses, x_meta, y_meta, c, lr: float,
                             mode: str = "jvp"):
    """d L_meta(theta'(c)) / d c for the virtual step theta' = theta - lr * grad_theta mean_i c_i l_i.

    losses: (B,) l_i(theta) of (x, y), with their graph (the caller's real forward); c: (B,) the
    per-example multipliers, no graph (rates exp(sigma_i), or MW-Net's weights). theta' is linear
    in c, so d L_meta / d c_i = -(lr / B) <grad L_meta(theta'), grad l_i(theta)>, one
    Jacobian-vector product for the batch. Returns (grad (B,), meta loss).
    """
    g = torch.autograd.grad((c * losses).mean(), list(params.values()), retain_graph=True)
    fast = lookahead_params(params, g, lr)                                        # theta'(c)
    meta = F.cross_entropy(forward(model, fast, x_meta), y_meta)
    v = torch.autograd.grad(meta, list(fast.values()))
    with torch.no_grad():              # only the tangents are needed here: no reverse graph
        jv, _ = example_weight_meta_gradient(model, params, x, y, v, lr, mode=mode, update_stats=False)
    return jv / len(y), meta.detach()


def instance_lr_meta_gradient(model, params, x, y, x_meta, y_meta, sigma, lr: float,
                              lookahead: bool = True, mode: str = "jvp"):
    """d L_meta(theta'(sigma)) / d sigma for one batch. sigma: (B,) log rates of the batch.

    Returns (grad (B,), losses (B,), meta loss): `losses` are l_i(theta) with their graph and
    BatchNorm statistics updated once, for the real step. lookahead=False evaluates the meta gradient at
    theta instead of theta' (cheaper: no virtual step; a first-order approximation).
    """
    r = sigma.exp()
    if lookahead:
        losses = F.cross_entropy(model(x), y, reduction="none")                   # the real forward
        dc, meta = multiplier_meta_gradient(model, params, x, y, losses, x_meta, y_meta, r, lr, mode)
        return dc * r, losses, meta                                               # chain rule: dr/dsigma = r
    meta = F.cross_entropy(forward(model, params, x_meta), y_meta)
    v = torch.autograd.grad(meta, list(params.values()))
    jv, losses = example_weight_meta_gradient(model, params, x, y, v, lr, mode=mode)
    return jv * r / len(y), losses, meta.detach()


class NoisyBaseline(Baseline):
    """Plain SGD (the `baseline` arm), reporting the free noise detector at the end: the ROC-AUC
    of its own per-example training loss for telling corrupted labels from clean ones."""

    def extras(self, streams) -> dict:
        corrupted = streams.corrupted
        if not corrupted.any() or corrupted.all():
            return {}
        return {"loss_auc": roc_auc(per_example(self.model, streams.in_order("train"))[1], corrupted.cpu())}


class InstanceLR(NoisyBaseline):
    """The method as a plug-in of the training loop. State: sigma (N_train,), the optimizer."""

    name = "instance_lr"
    uses_meta = True
    autocasts = False      # the real step backpropagates the fp32 forward of the meta-gradient

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.c = section(cfg, ILR)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.sigma = torch.zeros(ctx.num_train, device=next(ctx.model.parameters()).device)

    def step(self, batch: Batch, meta_batch: Batch, lr: float) -> dict:
        set_lr(self.opt, lr)
        params = model_params(self.model)
        sigma, c = self.sigma[batch.idx], self.c
        g_sigma, losses, meta_loss = instance_lr_meta_gradient(
            self.model, params, batch.x, batch.y, meta_batch.x, meta_batch.y, sigma, lr,
            lookahead=c.lookahead, mode=c.mode)
        sigma = (sigma - c.meta_lr * g_sigma).clamp(c.sigma_min, c.sigma_max)
        self.sigma[batch.idx] = sigma
        self.opt.zero_grad(set_to_none=True)
        (self.step_rates(sigma) * losses).mean().backward()
        self.opt.step()
        return {"loss": losses.detach().mean(), "meta_loss": meta_loss}

    def step_rates(self, sigma: torch.Tensor) -> torch.Tensor:
        """(B,) the multipliers of the real step: each example's own rate exp(sigma_i)."""
        return sigma.exp()

    def diagnostics(self, streams) -> dict:
        """Mean rate of all examples, of the clean and of the corrupted ones, and the ROC-AUC of a
        low rate for a corrupted label."""
        r, corrupted = self.sigma.exp(), streams.corrupted.to(self.sigma.device)
        out = {"mean_rate": r.mean().item()}
        if corrupted.any() and not corrupted.all():
            out.update(rate_clean=r[~corrupted].mean().item(), rate_corrupted=r[corrupted].mean().item(),
                       rate_auc=roc_auc(-self.sigma.cpu(), corrupted.cpu()))
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "sigma": self.sigma}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.sigma.copy_(state["sigma"])

    def extras(self, streams) -> dict:
        """Final rates and how well a low rate flags a corrupted label (ROC-AUC), with the free
        detector beside it (loss_auc, as for the baseline)."""
        q = torch.tensor([0.1, 0.5, 0.9], device=self.sigma.device)
        out = {"rate_quantiles": torch.quantile(self.sigma.exp(), q).tolist()}
        if streams.corrupted.any() and not streams.corrupted.all():
            out["noise_auc"] = roc_auc(-self.sigma.cpu(), streams.corrupted.cpu())
        return {**out, **super().extras(streams)}

    def artifacts(self) -> dict:
        """The final rate r_i of every training example (run_arms saves it with the split's
        indices, labels and corruption mask)."""
        return {"rate": self.sigma.exp().cpu().numpy()}


class ReweightL2RW(Baseline):
    """Learning to Reweight (Ren et al. 2018): per-step weights, no memory (metabook.meta)."""

    name = "l2rw"
    uses_meta = True
    autocasts = False      # the real step backpropagates the fp32 forward of the meta-gradient

    def step(self, batch: Batch, meta_batch: Batch, lr: float) -> dict:
        set_lr(self.opt, lr)
        out = reweighting_step(self.model, self.opt, batch.x, batch.y, meta_batch.x, meta_batch.y, lr, mode="jvp")
        return {"loss": out["loss"], "meta_loss": out["meta_loss"]}


class MeanRate(InstanceLR):
    """Control: the method's rates and meta step unchanged, but the real step gives every example
    of the batch the batch's mean rate, mean_i exp(sigma_i): plain SGD at the learning rate the
    rates imply, eta_t * mean(r), without the per-example differences. With all rates of a
    batch equal it is the method, bit for bit."""

    name = "mean_rate"

    def step_rates(self, sigma: torch.Tensor) -> torch.Tensor:
        r = sigma.exp()
        return r.mean().expand_as(r)


class BaselineClean(NoisyBaseline):
    """Control: plain SGD on the noisy training batch plus the clean meta batch the method sees at
    the same step (the loop's meta stream: same images, same order, not augmented), the loss the
    mean over all 2B examples, one forward pass. Same steps as the baseline (epochs of the noisy
    split), so each clean image enters train_size / meta_size times as often as a noisy one, as
    often as the method's meta-gradient reads it."""

    name = "baseline_clean"
    uses_meta = True

    def step(self, batch: Batch, meta_batch: Batch, lr: float) -> dict:
        x, y = torch.cat([batch.x, meta_batch.x]), torch.cat([batch.y, meta_batch.y])
        return super().step(Batch(x, y, batch.idx), None, lr)


def weight_net(hidden: int) -> nn.Module:
    """MW-Net's weighting function: per-example loss (B, 1) -> weight in (0, 1), an MLP
    1 -> hidden (ReLU) -> 1 with a sigmoid output (Shu et al. 2019)."""
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())


def mwn_meta_gradient(model, params, vnet, x, y, x_meta, y_meta, lr: float, mode: str = "jvp"):
    """d L_meta(theta'(phi)) / d phi for the weighting network's parameters phi, one batch.

    w_i = vnet(l_i) on the detached losses (the network sees a loss value, not its graph); the
    virtual step descends mean_i w_i l_i. Returns (grads like vnet.parameters(), losses (B,)
    with their graph for the real step, meta loss)."""
    losses = F.cross_entropy(model(x), y, reduction="none")
    w = vnet(losses.detach().unsqueeze(1)).squeeze(1)                             # (B,) weights
    dw, meta = multiplier_meta_gradient(model, params, x, y, losses, x_meta, y_meta, w.detach(), lr, mode)
    return torch.autograd.grad(w, list(vnet.parameters()), dw), losses, meta       # chain rule through vnet


class MetaWeightNet(NoisyBaseline):
    """Meta-Weight-Net (Shu et al. 2019) in the same loop: an Adam step on the weighting network
    from the one-step lookahead, then the real step on mean_i w_i l_i with the updated network's
    weights. State: the weighting network and its optimizer."""

    name = "mwn"
    uses_meta = True
    autocasts = False      # the real step backpropagates the fp32 forward of the meta-gradient

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.c = section(cfg, ILR)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        with torch.random.fork_rng(devices=[]):          # the other arms' random streams stay as they are
            torch.manual_seed(ctx.seed + 4049)
            self.vnet = weight_net(self.c.mwn_hidden).to(self.device)
        self.vopt = torch.optim.Adam(self.vnet.parameters(), lr=self.c.mwn_lr, weight_decay=self.c.mwn_weight_decay)
        self.last_weight = torch.zeros((), device=self.device)

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        """(N,) weights the network gives to losses (N,), no graph."""
        with torch.no_grad():
            return self.vnet(losses.detach().unsqueeze(1)).squeeze(1)

    def step(self, batch: Batch, meta_batch: Batch, lr: float) -> dict:
        set_lr(self.opt, lr)
        grads, losses, meta_loss = mwn_meta_gradient(self.model, model_params(self.model), self.vnet, batch.x,
                                                     batch.y, meta_batch.x, meta_batch.y, lr, self.c.mode)
        self.vopt.zero_grad(set_to_none=True)
        for p, g in zip(self.vnet.parameters(), grads):
            p.grad = g
        self.vopt.step()
        w = self.weights(losses)                                          # the updated network's weights
        self.opt.zero_grad(set_to_none=True)
        (w * losses).mean().backward()
        self.opt.step()
        self.last_weight = w.mean()
        return {"loss": losses.detach().mean(), "meta_loss": meta_loss}

    def diagnostics(self, streams) -> dict:
        return {"mean_weight": self.last_weight.item()}

    def extras(self, streams) -> dict:
        """The learned weighting function on a grid of losses, and the ROC-AUC of a low weight
        (of the final model's per-example training loss) for a corrupted label."""
        grid = torch.linspace(0, 6, 13, device=self.device)
        out = {"weight_curve": {"loss": grid.tolist(), "weight": self.weights(grid).tolist()}}
        corrupted = streams.corrupted
        if corrupted.any() and not corrupted.all():
            losses = per_example(self.model, streams.in_order("train"))[1]
            out["weight_auc"] = roc_auc(-self.weights(losses.to(self.device)).cpu(), corrupted.cpu())
            out["loss_auc"] = roc_auc(losses, corrupted.cpu())
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "vnet": self.vnet.state_dict(), "vopt": self.vopt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.vnet.load_state_dict(state["vnet"])
        self.vopt.load_state_dict(state["vopt"])


ARMS = {"baseline": Arm(NoisyBaseline), "instance_lr": Arm(InstanceLR), "l2rw": Arm(ReweightL2RW),
        "baseline_clean": Arm(BaselineClean), "mean_rate": Arm(MeanRate), "mwn": Arm(MetaWeightNet)}
TARGETS_LABEL_NOISE = True           # the bench runs this chapter (and its baseline) under label noise


@dataclass
class ILR:
    """Per-instance learning rates (keys ilr.*)."""
    prefix: ClassVar[str] = "ilr"
    meta_lr: float = knob(100.0, "step size on sigma (the raw meta-gradient is O(eta / B))", ">= 0")
    sigma_min: float = knob(-5.0, "lowest log rate (r_i >= exp(sigma_min))")
    sigma_max: float = knob(2.0, "highest log rate")
    lookahead: bool = knob(True, "meta-gradient at the virtual step theta' (false: at theta)")
    mode: str = knob("jvp", "meta-gradient: jvp (exact, forward mode) or fd (finite difference)",
                     choices=("jvp", "fd"))
    mwn_lr: float = knob(1e-3, "MW-Net: Adam step size of the weighting network", ">= 0")
    mwn_weight_decay: float = knob(1e-4, "MW-Net: the weighting network's weight decay", ">= 0")
    mwn_hidden: int = knob(100, "MW-Net: hidden units of the weighting network", ">= 1")
    arms: list[str] = knob(["baseline", "instance_lr", "l2rw", "baseline_clean", "mean_rate", "mwn"],
                           "arms to run (baseline and instance_lr are required)", choices=tuple(ARMS))
    same_time: bool = knob(True, "also run the baseline for instance_lr's wall-clock")


SECTIONS = (ILR,)
DEFAULTS: dict = {"noise.kind": "uniform", "noise.rate": 0.4}      # MW-Net's convention (36% of labels wrong)
_CONTROLS = "baseline,instance_lr,baseline_clean,mean_rate,mwn"
PRESETS: dict = {
    # Checks that every arm runs: 1,280 noisy images, 2 epochs (20 steps), the method and its three
    # controls (about 75 s of one CPU thread planned).
    "smoke": {"train_size": 1280, "meta_size": 500, "epochs": 2.0, "checkpoint_every": 50,
              "ilr.arms": _CONTROLS, "ilr.same_time": False},
    # 4,000 noisy training images, 10 epochs: each example's rate is updated 10 times. The method
    # and its three controls (step costs about 1, 2.1, 3.6, 3.3 and 3.4 baseline steps) plan about
    # 16 min of one CPU thread; L2RW and the baseline at the method's wall-clock would add about
    # 8 min, so they run at gpu only.
    "cpu": {"train_size": 4000, "epochs": 10.0, "ilr.arms": _CONTROLS, "ilr.same_time": False},
    # The verdict's record (issue 19): 20,000 images with 40% uniform noise, 20 epochs, where the
    # baseline has time to memorise the noise; the method, the clean-data control, the baseline at
    # the method's wall-clock and at twice the epochs (the convergence check). 3-5 seeds, hours.
    "converged": {"train_size": 20000, "epochs": 20.0, "ilr.arms": ["baseline", "instance_lr", "baseline_clean"]},
    # The controls and the baseline at instance_lr's wall-clock; L2RW left out to keep 30 min on a T4.
    "gpu": {"train_size": 20000, "epochs": 20.0, "model": "resnet18", "width": 32, "ilr.arms": _CONTROLS},
    "paper": {"epochs": 40.0, "model": "resnet18", "width": 64, "batch_size": 100},
}


def experiments(cfg: dict) -> list[Experiment]:
    """Arms at equal epochs (cfg['ilr.arms'] of baseline, instance_lr, l2rw) and, with
    cfg['ilr.same_time'], the baseline at instance_lr's wall-clock."""
    names = cfg["ilr.arms"]
    if not {"baseline", "instance_lr"} <= set(names):
        raise ConfigError(f"ilr.arms={','.join(names)}: baseline and instance_lr are required")
    return [Experiment("instance_lr", "instance_lr", {n: ARMS[n] for n in names}, cfg,
                       same_time_for="instance_lr" if cfg["ilr.same_time"] else None)]


def run(cfg: dict, seeds: list[int], out_dir=None, progress: bool = True, dataset=None) -> dict:
    from ..results import seed_stats

    record = run_experiment(experiments(cfg)[0], seeds, out_dir=out_dir, progress=progress, dataset=dataset)
    for key in ("target_acc", "target_acc_prior"):
        if key in record["arms"]["instance_lr"]:
            record["metrics"][key] = record["arms"]["instance_lr"][key]["mean"]
    for arm, key, name in (("instance_lr", "noise_auc", "noise_auc"), ("instance_lr", "loss_auc", "loss_auc"),
                           ("baseline", "loss_auc", "baseline_loss_auc")):
        values = [e[key] for e in record["arms"][arm].get("extras", {}).values() if key in e]
        if values:
            record["metrics"][name] = seed_stats(values)["mean"]
            record["metrics"][f"{name}_per_seed"] = values
    return record
