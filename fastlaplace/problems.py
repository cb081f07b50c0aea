"""Meta-learning problems: a task distribution, the network that solves it, its loss and metric.

A problem samples meta-batches ``(x_support, y_support, x_query, y_query)`` shaped
[tasks, examples, ...] from a split ("train", "val", "test") with an explicit generator,
so that a run is reproducible and resumable from the generator's state. A task family is a
subclass of :class:`Problem`; the data sets of ``--dataset`` are built from them in
:mod:`fastlaplace.datasets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from .data.episodes import EpisodeSampler
from .data.sinusoid import SinusoidTasks
from .models import MODELS
from .options import Loss


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


class Problem:
    """A task family: what the programs ask of a problem. A subclass sets the class
    attributes and ``model`` (a name in :data:`fastlaplace.models.MODELS`), and defines
    :meth:`sample`, :meth:`metric` and the network's sizes (:attr:`example_shape`,
    :attr:`outputs`, :attr:`width`)."""

    loss: ClassVar[Loss]  # the learner's inner and query loss
    metric_name: ClassVar[str]  # the test metric's name in results and reports
    higher_is_better: ClassVar[bool]
    model: str

    @property
    def example_shape(self) -> tuple[int, ...]:
        """The shape of one example's input: the network's input, without the batch dimension."""
        raise NotImplementedError

    @property
    def outputs(self) -> int:
        raise NotImplementedError

    @property
    def width(self) -> int | None:
        """``--filters``: the network's width (``None``: the network's own)."""
        return None

    def build_model(self) -> nn.Module:
        return MODELS[self.model](self.example_shape, self.outputs, self.width)

    def sample(self, split: str, tasks: int, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    @staticmethod
    def metric(out: Tensor, y: Tensor) -> Tensor:
        """The metric of each task [tasks] for outputs [tasks, examples, ...] and targets ``y``."""
        raise NotImplementedError


class RegressionProblem(Problem):
    """Regression of one number on one number under a mean squared error, with the MLP by
    default (a task family: a subclass samples its tasks)."""

    loss = Loss.MSE
    metric_name = "mse"
    higher_is_better = False
    example_shape = (1,)
    outputs = 1

    @staticmethod
    def metric(out: Tensor, y: Tensor) -> Tensor:
        return (out - y).pow(2).flatten(1).mean(1)


@dataclass
class SinusoidProblem(RegressionProblem):
    tasks: SinusoidTasks
    model: str = "mlp"

    def sample(self, split: str, tasks: int, generator: torch.Generator) -> Batch:
        b = self.tasks.sample(tasks, generator)
        return Batch(b.x_support, b.y_support, b.x_query, b.y_query)


@dataclass
class ImageProblem(Problem):
    """N-way K-shot classification episodes from per-split class pools."""

    splits: dict[str, EpisodeSampler]
    in_channels: int
    image_size: int
    ways: int
    filters: int = 64
    model: str = "conv4"  # or "resnet12" (widths F, 2.5F, 5F, 10F with F = filters)
    loss = Loss.CROSS_ENTROPY
    metric_name = "accuracy"
    higher_is_better = True

    @property
    def example_shape(self) -> tuple[int, ...]:
        return self.in_channels, self.image_size, self.image_size

    @property
    def outputs(self) -> int:
        return self.ways

    @property
    def width(self) -> int | None:
        return self.filters

    def sample(self, split: str, tasks: int, generator: torch.Generator) -> Batch:
        if split not in self.splits:
            raise ValueError(f"no {split!r} split; have {sorted(self.splits)}")
        return Batch(*self.splits[split].sample(tasks, generator))

    @staticmethod
    def metric(out: Tensor, y: Tensor) -> Tensor:
        return (out.argmax(-1) == y).float().flatten(1).mean(1)
