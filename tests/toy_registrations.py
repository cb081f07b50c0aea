"""A data set of a new task family and a new meta-learning method, registered from outside
the package as ``docs/architecture.md`` ("Where things go") says: importing this module is
all it takes for ``python -m fastlaplace.train --dataset lines --method anil`` (see
tests/test_registries.py, which runs it from the command line).

- ``lines``: regression on random lines y = a·x + b (its own ``Problem`` class, which
  takes the loss, metric and network of the regression family), one ``DATASETS`` entry.
- ``anil``: MAML adapting only the network's last linear layer (Raghu et al. 2020), one
  ``METHODS`` entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastlaplace import MAML
from fastlaplace.datasets import DATASETS, DatasetSpec, mlp_footprint
from fastlaplace.methods import METHODS, inner_loop
from fastlaplace.options import Loss
from fastlaplace.problems import Batch, RegressionProblem


@dataclass
class LinesProblem(RegressionProblem):
    """Tasks y = a·x + b with a, b uniform in [-2, 2], x uniform in [-5, 5]."""

    support: int
    query: int
    model: str = "mlp"

    def sample(self, split: str, tasks: int, generator: torch.Generator) -> Batch:
        slope, offset = torch.rand(2, tasks, 1, 1, generator=generator) * 4 - 2
        x = torch.rand(tasks, self.support + self.query, 1, generator=generator) * 10 - 5
        y = slope * x + offset
        return Batch(x[:, :self.support], y[:, :self.support], x[:, self.support:], y[:, self.support:])


def anil(model: nn.Module, loss: Loss, cfg) -> MAML:
    """MAML whose inner loop adapts the last linear layer only (the others are meta-learned)."""
    head = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return MAML(model, adapt=[head], **inner_loop(loss, cfg))


DATASETS.register("lines", DatasetSpec(
    "random lines y = a·x + b", LinesProblem, lambda cfg: LinesProblem(cfg.support, cfg.query_points, cfg.model),
    dict(iterations=20, meta_batch=4, meta_lr=1e-3, inner_lr=0.01, inner_steps=1, test_inner_steps=[0, 1],
         eta=1e-6, tau=1e-3),
    ("mlp",), mlp_footprint))
METHODS.register("anil", anil)
