"""Sinusoid regression tasks (Finn et al. 2017; Grant et al. 2018, Section 5.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SinusoidBatch:
    x_support: Tensor  # [tasks, support, 1]
    y_support: Tensor
    x_query: Tensor  # [tasks, query, 1]
    y_query: Tensor
    amplitude: Tensor  # [tasks]
    phase: Tensor  # [tasks]


@dataclass(frozen=True)
class SinusoidTasks:
    """y = A·sin(x − φ), A ~ U[amplitude], φ ~ U[phase], x ~ U[x_range].

    The paper samples x from [-10, 10]; Finn et al. used [-5, 5].
    """

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-10.0, 10.0)
    support: int = 10
    query: int = 10

    def __post_init__(self):
        if self.support < 1 or self.query < 1:
            raise ValueError(f"support and query must be >= 1, got {self.support} and {self.query}")
        if not self.x_range[0] < self.x_range[1]:
            raise ValueError(f"x_range must be increasing, got {self.x_range}")

    def sample(self, tasks: int, generator: torch.Generator | None = None,
               support_range: tuple[float, float] | None = None, dtype=torch.float32) -> SinusoidBatch:
        """Draw ``tasks`` tasks; ``support_range`` restricts the support inputs (Figure 5's
        bottom-right panel: points from the lower part of the range only)."""
        if tasks < 1:
            raise ValueError(f"need at least one task, got {tasks}")

        def uniform(shape, lo, hi):
            return torch.rand(shape, generator=generator, dtype=dtype) * (hi - lo) + lo

        amp = uniform((tasks,), *self.amplitude)
        phase = uniform((tasks,), *self.phase)
        xs = uniform((tasks, self.support, 1), *(support_range or self.x_range))
        xq = uniform((tasks, self.query, 1), *self.x_range)
        return SinusoidBatch(xs, self.evaluate(xs, amp, phase), xq, self.evaluate(xq, amp, phase), amp, phase)

    @staticmethod
    def evaluate(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
        """The true function of each task at inputs x [tasks, points, 1]."""
        return amplitude[:, None, None] * torch.sin(x - phase[:, None, None])
