"""Models: a small CNN, a deep CNN with or without skip connections, ResNet-18 (CIFAR), an MLP,
and the CUDA-convnet-sized CNN of the MLHF paper's CIFAR-10 experiment.

All take (B, 3, 32, 32) images and return (B, classes) logits. `DeepCNN.features(x)` returns the
output of every block, so local heads (chapter 3) can be attached without changing the model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError


def conv_bn(c_in: int, c_out: int, batchnorm: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(c_out))
    return nn.Sequential(*layers, nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """~0.2M parameters at width 32: three stages (conv, pool) at 32/16/8 pixels, then a global
    max-and-average pool and a linear classifier. Trains CIFAR-10 to >80% in minutes on a CPU."""

    def __init__(self, num_classes: int = 10, width: int = 32, batchnorm: bool = True):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            conv_bn(3, w, batchnorm), nn.MaxPool2d(2),           # 16x16
            conv_bn(w, 2 * w, batchnorm), nn.MaxPool2d(2),       # 8x8
            conv_bn(2 * w, 4 * w, batchnorm), conv_bn(4 * w, 4 * w, batchnorm), nn.MaxPool2d(2),  # 4x4
        )
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        h = self.body(x)
        return self.head(h.amax(dim=(2, 3)))


class DeepCNN(nn.Module):
    """`depth` conv-BN-ReLU layers in three stages (width, 2·width, 4·width channels at 32, 16 and
    8 pixels), global average pooling and a linear classifier.

    skips=False: a plain stack, the net that gets hard to train as it deepens.
    skips=True: the same layers with identity shortcuts, each around ONE layer: within a stage the
    layers pair up and the second of each pair adds its input, z_2 = h_2(z_1) + z_1,
    z_4 = h_4(z_3) + z_3, ... (the 1st, 3rd, 5th... layer of a stage has none). ResNet's
    BasicBlock wraps two conv layers per shortcut; this one wraps one.
    batchnorm=False: conv layers with biases and He (Kaiming normal, fan-in, ReLU) initialisation
    (PyTorch's default init shrinks the signal's variance about 6x per ReLU layer, so without
    BatchNorm a plain net would fail by its init, not by its depth); with skips, the layers that
    add a shortcut start scaled by 1/sqrt(their number), as Fixup does, since unscaled each
    shortcut would double the variance.
    """

    def __init__(self, depth: int = 8, width: int = 16, num_classes: int = 10,
                 skips: bool = False, batchnorm: bool = True):
        super().__init__()
        if depth < 3:
            raise ConfigError(f"DeepCNN needs depth >= 3 (one layer per stage), got {depth}")
        per_stage = [depth // 3 + (1 if s < depth % 3 else 0) for s in range(3)]
        self.blocks, self.pool_before, self.channels = nn.ModuleList(), [], []
        c_in = 3
        for stage, n in enumerate(per_stage):
            c_out = width * 2 ** stage
            for i in range(n):
                self.blocks.append(conv_bn(c_in, c_out, batchnorm))
                self.pool_before.append(stage > 0 and i == 0)
                self.channels.append(c_out)
                c_in = c_out
        self.skips = skips
        self.head = nn.Linear(c_in, num_classes)
        if not batchnorm:
            shortcut = self._shortcut_layers()
            for block, has in zip(self.blocks, shortcut):
                conv = block[0]
                nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
                if skips and has:              # Fixup-like: n shortcuts grow the variance (1 + 1/n)^n < e, not 2^n
                    conv.weight.data.mul_(sum(shortcut) ** -0.5)

    def _shortcut_layers(self) -> list[bool]:
        """Which layers add a shortcut when skips=True: the 2nd, 4th, ... layer of each stage."""
        out, pos = [], 0
        for i in range(len(self.blocks)):
            pos = 0 if self.pool_before[i] else pos
            out.append(pos % 2 == 1)
            pos += 1
        return out

    def features(self, x, detach: bool = False) -> list[torch.Tensor]:
        """The output of every block, (B, C_l, H_l, W_l) for l = 1..depth. detach=True cuts the graph
        at every block's input but the first (same values; chapter 3's detached local losses)."""
        feats, pair_input = [], None
        for i, block in enumerate(self.blocks):
            if self.pool_before[i]:
                x = F.max_pool2d(x, 2)
                pair_input = None
            if detach and i > 0:
                x = x.detach()
            out = block(x)
            if self.skips:
                if pair_input is not None and pair_input.shape == out.shape:
                    out = out + pair_input            # shortcut around this one layer
                    pair_input = None
                elif pair_input is None:
                    pair_input = out
            feats.append(out)
            x = out
        return feats

    def forward(self, x):
        return self.head(self.features(x)[-1].mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18, CIFAR variant (He et al. 2016): 3x3 stem, no max-pool, 11.2M parameters at width 64."""

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        layers, c_in = [], width
        for stage in range(4):
            c_out = width * 2 ** stage
            for i in range(2):
                layers.append(BasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))


class MLP(nn.Module):
    """Flattened image -> `depth` hidden ReLU layers of `width` units -> logits."""

    def __init__(self, num_classes: int = 10, width: int = 256, depth: int = 2, in_dim: int = 3 * 32 * 32):
        super().__init__()
        dims = [in_dim] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.head(x)


class CudaConvnet(nn.Module):
    """The CUDA-convnet-sized CNN (after Krizhevsky's cuda-convnet `layers-18pct` for CIFAR-10):
    three conv5x5 layers (w, w, 2w channels), each pooled 3/2 to 16, 8, 4 pixels, LRN (size 3,
    alpha 5e-5, beta 0.75: that config's `rnorm`) after the first two, a linear classifier; 89,578
    parameters at width 32. No BatchNorm (so build_model's `batchnorm` does not apply), PyTorch's
    default init (the config's per-layer decay and scales are not reproduced). The MLHF paper says
    only "CUDA-convnet"; methods.md 6.5's TF-tutorial variant (64/64, FC-384, FC-192) is not this one.
    """

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 5, padding=2)
        self.conv2 = nn.Conv2d(w, w, 5, padding=2)
        self.conv3 = nn.Conv2d(w, 2 * w, 5, padding=2)
        self.lrn = nn.LocalResponseNorm(3, alpha=5e-5, beta=0.75)
        self.head = nn.Linear(2 * w * 4 * 4, num_classes)

    def forward(self, x):
        x = self.lrn(F.relu(F.max_pool2d(self.conv1(x), 3, 2, padding=1)))            # (B, w, 16, 16)
        x = self.lrn(F.avg_pool2d(F.relu(self.conv2(x)), 3, 2, padding=1))            # (B, w, 8, 8)
        x = F.avg_pool2d(F.relu(self.conv3(x)), 3, 2, padding=1)                      # (B, 2w, 4, 4)
        return self.head(x.flatten(1))


MODELS = ("small_cnn", "plain_cnn", "res_cnn", "resnet18", "mlp", "cuda_convnet")


def build_model(name: str, num_classes: int, width: int = 32, depth: int = 8, batchnorm: bool = True) -> nn.Module:
    """Build a model by name. `width`/`depth` mean what each class's docstring says."""
    if name == "small_cnn":
        return SmallCNN(num_classes, width, batchnorm)
    if name in ("plain_cnn", "res_cnn"):
        return DeepCNN(depth, width, num_classes, skips=name == "res_cnn", batchnorm=batchnorm)
    if name == "resnet18":
        return ResNet18(num_classes, width)
    if name == "mlp":
        return MLP(num_classes, width, depth)
    if name == "cuda_convnet":
        return CudaConvnet(num_classes, width)
    raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
