"""The meta-learning methods of ``python -m fastlaplace.train --method NAME``: one builder
each in :data:`METHODS`, ``(network, loss, settings) -> learner``, the settings being a run's
resolved :class:`fastlaplace.config.Config`. A new method is a learner class (a subclass of
:class:`fastlaplace.MAML`) and one ``METHODS.register(name, builder)`` (``docs/architecture.md``,
"Where things go")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .meta import LLAMA, MAML
from .options import Loss, Registry

Builder = Callable[[nn.Module, Loss, Any], MAML]
METHODS: Registry[Builder] = Registry("method")


def inner_loop(loss: Loss, cfg) -> dict:
    """The arguments every learner of a run takes: the inner loop's, the loss, the convolutions'
    strategy, the tasks per chunk, the query pass's recomputation; no finite check of the
    inputs (a host sync on CUDA), as they come from the problem's own samplers."""
    return dict(inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, loss=loss, conv_strategy=cfg.conv_strategy,
                task_chunk=cfg.task_chunk, recompute_query=cfg.recompute_query, check_finite=False)


def maml(model: nn.Module, loss: Loss, cfg) -> MAML:
    """MAML (ML-POINT), second order."""
    return MAML(model, **inner_loop(loss, cfg))


def fomaml(model: nn.Module, loss: Loss, cfg) -> MAML:
    """First-order MAML: the meta-gradient without the inner loop's second-order terms."""
    return MAML(model, first_order=True, **inner_loop(loss, cfg))


def llama(model: nn.Module, loss: Loss, cfg) -> MAML:
    """LLAMA (ML-LAPLACE): MAML's objective plus η·log det Ĥ."""
    return LLAMA(model, eta=cfg.eta, tau=cfg.tau, logdet_method=cfg.logdet_method, fisher=cfg.fisher,
                 **inner_loop(loss, cfg))


for _builder in (maml, fomaml, llama):
    METHODS.register(_builder.__name__, _builder)
