"""The networks of the paper's experiments, as plain ``nn.Sequential`` modules."""

from __future__ import annotations

from torch import nn


def sinusoid_mlp(hidden: int = 40) -> nn.Sequential:
    """The sinusoid regression network of Finn et al. (2017): 1-40-40-1 with ReLU."""
    return nn.Sequential(
        nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
    )


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
