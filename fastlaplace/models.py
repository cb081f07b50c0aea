"""The networks of the paper's experiments (``nn.Sequential`` modules) and the few-shot
ResNet-12, and :data:`MODELS`, the networks of ``python -m fastlaplace.train --model NAME``.
Any other ``nn.Module`` works with :class:`fastlaplace.MAML` and :class:`fastlaplace.LLAMA`
as well (docs/guide.md, "Bring your own network")."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .options import Registry


def sinusoid_mlp(hidden: int = 40) -> nn.Sequential:
    """The sinusoid regression network of Finn et al. (2017): 1-40-40-1 with ReLU."""
    return _mlp((1,), 1, hidden)


def conv4(in_channels: int = 3, num_classes: int = 5, image_size: int = 84, filters: int = 64) -> nn.Sequential:
    """The standard 4-block few-shot classifier (Vinyals et al. 2016; Finn et al. 2017).

    Each block: 3×3 convolution (``filters`` channels, padding 1), BatchNorm, ReLU, 2×2
    max-pool; then a linear layer. 84×84 RGB gives 5×5×64 = 1600 features, 28×28 gray
    gives 1×1×64. BatchNorm uses batch statistics (as in MAML); its scale and shift are
    meta-learned but neither adapted in the inner loop nor part of the Fisher.
    """
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, filters, 3, padding=1),
            nn.BatchNorm2d(filters, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels, size = filters, size // 2
    if size < 1:
        raise ValueError(f"image_size {image_size} is too small for four 2×2 poolings")
    layers += [nn.Flatten(), nn.Linear(filters * size * size, num_classes)]
    return nn.Sequential(*layers)


class ResNet12Block(nn.Module):
    """One ResNet-12 block: three 3×3 convolutions with BatchNorm (leaky ReLU after the first
    two), a 1×1 convolution with BatchNorm on the shortcut, the sum, leaky ReLU, 2×2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int, negative_slope: float = 0.1):
        super().__init__()
        self.negative_slope = negative_slope
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels, track_running_stats=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, track_running_stats=False)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels, track_running_stats=False)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                      nn.BatchNorm2d(out_channels, track_running_stats=False))

    def forward(self, x: Tensor) -> Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), self.negative_slope)
        out = F.leaky_relu(self.bn2(self.conv2(out)), self.negative_slope)
        out = self.bn3(self.conv3(out))
        return F.max_pool2d(F.leaky_relu(out + self.shortcut(x), self.negative_slope), 2)


class ResNet12(nn.Module):
    """The few-shot ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019): four
    :class:`ResNet12Block` s, global average pooling and a linear head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5, widths: Sequence[int] = (64, 160, 320, 640),
                 negative_slope: float = 0.1):
        super().__init__()
        if len(widths) != 4 or not all(isinstance(w, int) and w >= 1 for w in widths):
            raise ValueError(f"widths must be four positive integers, got {widths!r}")
        channels = [in_channels, *widths]
        self.blocks = nn.Sequential(*(ResNet12Block(channels[i], channels[i + 1], negative_slope) for i in range(4)))
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] < 16 or x.shape[-2] < 16:
            raise ValueError(f"ResNet-12 needs images of at least 16×16 (four 2×2 poolings), got "
                             f"{x.shape[-2]}×{x.shape[-1]}")
        return self.head(self.blocks(x).mean((2, 3)))


def resnet12(in_channels: int = 3, num_classes: int = 5, widths: Sequence[int] = (64, 160, 320, 640),
             negative_slope: float = 0.1) -> ResNet12:
    """The few-shot ResNet-12: four residual blocks of three 3×3 convolutions (no bias) with
    BatchNorm and leaky ReLU (slope 0.1), a 1×1 convolution with BatchNorm on the shortcut and
    a 2×2 max-pool, then global average pooling and a linear head. ``widths`` are the blocks'
    channels: 64-160-320-640 is the standard network (12.4 million parameters; 84×84 images
    give 5×5×640 features before the pooling). No DropBlock.

    Meta-learned with :class:`fastlaplace.MAML` or :class:`fastlaplace.LLAMA`, all 16
    convolutions and the head are adapted by default (``adapt=["head"]`` adapts the head
    only, as ANIL does); BatchNorm uses each task's batch statistics (``track_running_stats``
    is off: running statistics would never be used) and its scale and shift are meta-learned
    but not adapted.
    """
    return ResNet12(in_channels, num_classes, tuple(widths), negative_slope)


def resnet12_widths(filters: int) -> tuple[int, int, int, int]:
    """ResNet-12 widths scaled from the first block's: (F, 2.5F, 5F, 10F); 64 gives 64-160-320-640."""
    return filters, 5 * filters // 2, 5 * filters, 10 * filters


# ---------------------------------------------------------------------------- --model
Builder = Callable[[tuple[int, ...], int, int | None], nn.Module]
MODELS: Registry[Builder] = Registry("model")
"""``--model NAME``: a builder ``(example_shape, outputs, width) -> nn.Module`` per name, for
a problem's example shape (``(1,)`` for a number, ``(C, H, W)`` for an image), its outputs
(classes) and the width ``--filters`` (``None``: the network's own)."""


def _mlp(example_shape: tuple[int, ...], outputs: int, width: int | None) -> nn.Module:
    """1-40-40-1 for sinusoids: two hidden layers of ``width`` (default 40) units."""
    (features,) = example_shape
    hidden = width or 40
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, outputs))


def _conv4(example_shape: tuple[int, ...], outputs: int, width: int | None) -> nn.Module:
    channels, size, _ = example_shape
    return conv4(channels, outputs, size, width or 64)


def _resnet12(example_shape: tuple[int, ...], outputs: int, width: int | None) -> nn.Module:
    return resnet12(example_shape[0], outputs, resnet12_widths(width or 64))


MODELS.register("mlp", _mlp)
MODELS.register("conv4", _conv4)
MODELS.register("resnet12", _resnet12)
