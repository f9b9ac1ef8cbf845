"""The baseline: cross-entropy, SGD with Nesterov momentum and weight decay, the loop's schedule.

Every method chapter compares against this, in the same loop, at the same budget and seeds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..data import Batch
from ..train import Arm, Context, Experiment, Method, run_experiment

# Chapter "baseline": the small CNN on CIFAR-10 (the shared knobs only).
SECTIONS: tuple = ()
DEFAULTS: dict = {}
PRESETS: dict = {
    # CI, where chapter 2 runs four times (the build, nbval, the Colab kill-and-resume test and its
    # reference): 2,000 training images, 2 epochs (31 steps), a checkpoint every 10 steps.
    "smoke": {"train_size": 2000, "meta_size": 500, "epochs": 2.0, "lr": 0.1, "checkpoint_every": 10},
    # 2 CPU cores: all 49,000 training images (1,000 held out), 8 epochs, so that chapter 2 with
    # its depth sweep fits 20 minutes (the recorded run trained 18: --set epochs=18 repeats it).
    "cpu": {"epochs": 8.0, "lr": 0.1, "channels_last": True},
    # One Colab-class GPU.
    "gpu": {"model": "resnet18", "width": 32, "epochs": 15.0, "lr": 0.1, "batch_size": 256},
    "paper": {"model": "resnet18", "width": 64, "epochs": 200.0, "lr": 0.1, "schedule": "cosine",
              "warmup": 0.0, "meta_size": 0},
}


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The dtype of the `amp` setting on `device` (None: full precision)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp=fp16 needs a CUDA device; on the CPU choose bf16 or off")
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """The loop's scheduled learning rate for this step."""
    for group in opt.param_groups:
        group["lr"] = lr


class Baseline(Method):
    """Plain training: one forward, one backward, one optimiser step per batch; the forward in
    mixed precision when cfg['amp'] asks (fp16 with a grad scaler). A subclass that writes its own
    step() keeps mixed precision by running its forward under self.autocast() and its update
    through self.descend(); one whose update reuses a full-precision meta computation sets
    `autocasts = False` (a test checks every arm's forward dtype against uses_amp())."""

    name = "baseline"
    autocasts = True              # step()'s forward runs under autocast() when cfg['amp'] asks

    def __init__(self, cfg: dict):
        self.label_smoothing = cfg["label_smoothing"]
        self.opt_cfg = {k: cfg[k] for k in ("lr", "momentum", "nesterov", "weight_decay")}
        self.amp = cfg.get("amp", "off")

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        c = self.opt_cfg
        self.opt = torch.optim.SGD(ctx.model.parameters(), lr=c["lr"], momentum=c["momentum"],
                                   nesterov=c["nesterov"] and c["momentum"] > 0, weight_decay=c["weight_decay"])
        self.device = next(ctx.model.parameters()).device
        self.dtype = autocast_dtype(self.amp, self.device) if self.uses_amp() else None
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None

    def uses_amp(self) -> bool:
        return self.amp != "off" and self.autocasts

    def autocast(self):
        """The forward's context: autocast to this arm's low precision, or a no-op in full precision."""
        return torch.autocast(self.device.type, self.dtype or torch.float32, enabled=self.dtype is not None)

    def descend(self, loss: torch.Tensor, inputs: list | None = None) -> None:
        """One update from a scalar loss: zero the gradients, backward (scaled under fp16; only into
        `inputs` when given), the optimiser's step (skipped by the scaler on an inf/NaN gradient)."""
        self.opt.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward(inputs=inputs)
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward(inputs=inputs)
            self.opt.step()

    def step(self, batch: Batch, meta_batch, lr: float) -> dict:
        set_lr(self.opt, lr)
        with self.autocast():
            logits = self.model(batch.x)
        loss = F.cross_entropy(logits.float(), batch.y, label_smoothing=self.label_smoothing)
        self.descend(loss)
        return {"loss": loss.detach(), "acc": (logits.argmax(1) == batch.y).float().mean()}

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), **({"scaler": self.scaler.state_dict()} if self.scaler else {})}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


ARMS = {"baseline": Arm(Baseline)}


def experiments(cfg: dict) -> list[Experiment]:
    """The chapter's experiment: the baseline alone (its own reference, cost ratio 1)."""
    return [Experiment("baseline", "baseline", ARMS, cfg)]


def run(cfg: dict, seeds: list[int], out_dir=None, progress: bool = True, dataset=None) -> dict:
    return run_experiment(experiments(cfg)[0], seeds, out_dir=out_dir, progress=progress, dataset=dataset)
