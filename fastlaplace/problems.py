"""Meta-learning problems: a task distribution, the network that solves it, its loss and metric.

A problem samples meta-batches ``(x_support, y_support, x_query, y_query)`` shaped
[tasks, examples, ...] from a split ("train", "val", "test") with an explicit generator,
so that a run is reproducible and resumable from the generator's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .data.episodes import EpisodeSampler
from .data.sinusoid import SinusoidTasks
from .models import conv4, resnet12, resnet12_widths, sinusoid_mlp


class Batch(NamedTuple):
    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor

    def to(self, device) -> Batch:
        # From pinned memory, as a copy from pageable memory would wait for the GPU.
        pin = torch.device(device).type == "cuda"
        return Batch(*((t.pin_memory() if pin and t.device.type == "cpu" else t).to(device, non_blocking=True)
                       for t in self))


@dataclass
class SinusoidProblem:
    tasks: SinusoidTasks
    loss: str = "mse"
    metric_name: str = "mse"
    higher_is_better: bool = False

    def build_model(self) -> nn.Module:
        return sinusoid_mlp()

    def sample(self, split: str, tasks: int, generator: torch.Generator) -> Batch:
        b = self.tasks.sample(tasks, generator)
        return Batch(b.x_support, b.y_support, b.x_query, b.y_query)

    @staticmethod
    def metric(out: Tensor, y: Tensor) -> Tensor:
        return (out - y).pow(2).flatten(1).mean(1)


@dataclass
class ImageProblem:
    """N-way K-shot classification episodes from per-split class pools."""

    splits: dict[str, EpisodeSampler]
    in_channels: int
    image_size: int
    ways: int
    filters: int = 64
    model: str = "conv4"  # or "resnet12" (widths F, 2.5F, 5F, 10F with F = filters)
    loss: str = "cross_entropy"
    metric_name: str = "accuracy"
    higher_is_better: bool = True

    def build_model(self) -> nn.Module:
        if self.model == "resnet12":
            return resnet12(self.in_channels, self.ways, resnet12_widths(self.filters))
        if self.model != "conv4":
            raise ValueError(f"model must be 'conv4' or 'resnet12', got {self.model!r}")
        return conv4(self.in_channels, self.ways, self.image_size, self.filters)

    def sample(self, split: str, tasks: int, generator: torch.Generator) -> Batch:
        if split not in self.splits:
            raise ValueError(f"no {split!r} split; have {sorted(self.splits)}")
        return Batch(*self.splits[split].sample(tasks, generator))

    @staticmethod
    def metric(out: Tensor, y: Tensor) -> Tensor:
        return (out.argmax(-1) == y).float().flatten(1).mean(1)
