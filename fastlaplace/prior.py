"""The prior of a task's Laplace posterior: :class:`Prior`, one value for every way of giving
it, and the prior implied by the inner loop (``docs/design.md`` §6).

A :class:`Prior` is a scalar precision τ, one per layer, the inner loop's implicit prior
(first order or exact), or a scalar to be chosen on validation tasks; :meth:`Prior.resolve`
turns it into what a layer's posterior takes, and :meth:`Prior.method` says which posterior
precision it needs. Every precision is on the scale of NLL₁ below; with observation noise σ²
the posterior's covariance is σ² times that of unit noise (:class:`fastlaplace.posterior.LaplacePosterior`).

K steps of size α on the inner loss L from θ are the MAP estimate under N(θ, Q_L)
(:mod:`fastlaplace.theory`, paper Section 3.2). The posterior's curvature Ĥ is on the scale
of the summed negative log likelihood under unit noise, NLL₁, and the inner loss is
L = s·NLL₁ with s = 2/(N·outputs) for a mean squared error and 1/N for a mean
cross-entropy. Dividing L + ½δᵀQ_L⁻¹δ by s puts the prior on NLL₁'s scale: precision
(s·Q_L)⁻¹.

- ``"early_stopping"``: Q_L exactly, per eigen-direction of the layer's K-FAC block. The
  inner loss's curvature there is h_ij = s·c·a_i·g_j (a_i, g_j the factors' eigenvalues),
  Q_L's variance ((1 − αh)^(−K) − 1)/h, and αK where h = 0 (the null space of a few-shot
  support set). The curvature is taken at φ̂, the posterior's own, so that prior and
  likelihood share an eigenbasis; for a quadratic inner loss (the theorem's setting) it is
  the same at θ. Where a step lands on or beyond the minimiser (αh ≥ 1, except
  1 < αh < 2 with even K) no Gaussian prior gives the iterate: there the precision is 0,
  the limit as αh → 1 from below (a flat prior: the inner loop follows the data fully).
  Large-input layers meet this: on sinusoids (x up to 10) αh reaches far above 1 in the
  first layer (its largest values are the largest inputs squared).
- ``"early_stopping_first_order"``: Q_L ≈ αK·I, a scalar τ = 1/(s·α·K): N/(2αK) for a
  mean squared error with one output (sinusoid: 500), N/(αK) for a cross-entropy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .options import ImplicitPrior, LogdetMethod, Loss, LossLike, choices, parse
from .theory import step_variances

PRIORS = choices(ImplicitPrior)  # the names of the implicit priors, for callers that list them
VALIDATION = "validation"  # the name of a scalar τ chosen on validation tasks
VALIDATION_GRID = tuple(10.0 ** (e / 2) for e in range(-2, 13))  # 0.1 … 1e6

# What a layer's posterior takes (:meth:`fastlaplace.posterior.LayerPosterior.build`): a scalar,
# or (exact only) a function of the factors' eigenvalues a [tasks, d_A] and g [tasks, d_G]
# giving one precision per eigen-direction [tasks, d_G, d_A].
LayerPrecision = float | Callable[[Tensor, Tensor], Tensor]


def _positive(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"a prior precision tau must be a positive finite number, got {tau!r}")
    return float(tau)


@dataclass(frozen=True)
class Prior:
    """The prior precision of a task's Laplace posterior, on NLL₁'s scale.

    Make one with :meth:`of` from what a user passes: a number (a scalar τ), a mapping from
    layer names to numbers (one τ per adapted layer), an implicit prior's name
    (``"early_stopping"``, ``"early_stopping_first_order"``), or ``"validation"`` (a scalar
    τ to be chosen on validation tasks among :meth:`candidates`). ``kind`` is ``"scalar"``,
    ``"per_layer"``, ``"validation"`` or an :class:`~fastlaplace.options.ImplicitPrior`.
    """

    kind: str
    tau: float | tuple[tuple[str, float], ...] | tuple[float, ...] | None = None

    @classmethod
    def of(cls, value) -> Prior:
        if isinstance(value, Prior):
            return value
        if isinstance(value, Mapping):
            if not value:
                raise ValueError("a prior per layer needs at least one layer")
            return cls("per_layer", tuple((str(k), _positive(v)) for k, v in value.items()))
        if isinstance(value, str):
            if value == VALIDATION:
                return cls(VALIDATION, VALIDATION_GRID)
            try:
                return cls(parse(ImplicitPrior, value, "prior"))
            except ValueError:
                raise ValueError(f"prior must be a positive number, a mapping of layer names to numbers, "
                                 f"{VALIDATION!r} or one of {PRIORS}, got {value!r}") from None
        return cls("scalar", _positive(value))

    @classmethod
    def validation(cls, taus) -> Prior:
        """A scalar τ to be chosen among ``taus`` on validation tasks."""
        taus = tuple(_positive(t) for t in taus)
        if not taus:
            raise ValueError("a validation-chosen prior needs at least one candidate τ")
        return cls(VALIDATION, taus)

    def __str__(self) -> str:
        if self.kind == "scalar":
            return f"tau={self.tau:g}"
        if self.kind == "per_layer":
            return "tau per layer " + ", ".join(f"{k}={v:g}" for k, v in self.tau)
        return str(self.kind)

    def candidates(self) -> list[Prior]:
        """The priors to try: a validation-chosen prior's scalars, else this prior alone."""
        return [Prior("scalar", t) for t in self.tau] if self.kind == VALIDATION else [self]

    def method(self, method: LogdetMethod | str | None, default: LogdetMethod | str) -> LogdetMethod:
        """The posterior precision for ``method`` (default: ``default``): the per-direction
        implicit prior has no factored form, so it takes ``"exact"`` and refuses ``"factored"``."""
        method = None if method is None else parse(LogdetMethod, method, "method")
        if self.kind is ImplicitPrior.EARLY_STOPPING:
            if method is LogdetMethod.FACTORED:
                raise ValueError("prior='early_stopping' is per eigen-direction and needs method='exact'; "
                                 "use prior='early_stopping_first_order' with the factored method")
            return LogdetMethod.EXACT
        return method or parse(LogdetMethod, default, "method")

    def resolve(self, layer: str, scale: float, loss: LossLike, y_support: Tensor, lr: float,
                steps: int) -> LayerPrecision:
        """The precision of layer ``layer`` (``scale`` = c, its number of rows), for a support
        set ``y_support`` adapted by ``steps`` inner steps of size ``lr`` on ``loss``."""
        if self.kind == "scalar":
            return self.tau
        if self.kind == "per_layer":
            taus = dict(self.tau)
            if layer not in taus:
                raise ValueError(f"the prior per layer has no τ for layer {layer!r} (it has {sorted(taus)})")
            return taus[layer]
        if self.kind == VALIDATION:
            raise ValueError("a validation-chosen prior must be chosen first (see fastlaplace.uncertainty.calibrate)")
        if self.kind is ImplicitPrior.EARLY_STOPPING_FIRST_ORDER:
            return first_order_tau(loss, y_support, lr, steps)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"the implicit prior needs at least one inner step, got {steps!r}")
        return functools.partial(direction_precisions, scale=scale, s=inner_loss_scale(loss, y_support), lr=lr,
                                 steps=steps)

    def check_layers(self, names: list[str]) -> None:
        """A prior per layer must name exactly the adapted layers."""
        if self.kind == "per_layer" and sorted(dict(self.tau)) != sorted(names):
            raise ValueError(f"the prior per layer names {sorted(dict(self.tau))}; the adapted layers are "
                             f"{sorted(names)}")


def inner_loss_scale(loss: LossLike, y_support: Tensor) -> float:
    """s with inner loss L = s·NLL₁ per task: 2/(N·outputs) (``"mse"``) or 1/N (``"cross_entropy"``)."""
    if parse(Loss, loss, "loss") is Loss.MSE:
        return 2.0 / (y_support.shape[1] * y_support[0, 0].numel())
    return 1.0 / y_support.shape[1]


def first_order_tau(loss: LossLike, y_support: Tensor, lr: float, steps: int) -> float:
    """τ = 1/(s·α·K): the implicit prior's precision to first order in α, on NLL₁'s scale."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"the implicit prior needs at least one inner step, got {steps!r}")
    return 1.0 / (inner_loss_scale(loss, y_support) * lr * steps)


def direction_precisions(a: Tensor, g: Tensor, scale: float, s: float, lr: float, steps: int) -> Tensor:
    """Prior precision (s·Q_L)⁻¹ per eigen-direction of c·A⊗G, ``[tasks, d_G, d_A]``.

    Args:
        a, g: eigenvalues of A ``[tasks, d_A]`` and G ``[tasks, d_G]`` (rounding below zero
            is clipped: the factors are Gram matrices).
        scale: c, the layer's number of rows; s: the inner loss's scale; lr, steps: α and K.

    Directions without a Gaussian prior (see the module's docstring) get 0.
    """
    lam = lr * s * scale * g.clamp_min(0).unsqueeze(-1) * a.clamp_min(0).unsqueeze(-2)  # αh
    exists = (lam < 1) | ((steps % 2 == 0) & (lam > 1) & (lam < 2))
    q = lr * step_variances(torch.where(exists, lam, torch.zeros_like(lam)), steps)
    return torch.where(exists, 1.0 / (s * q), torch.zeros_like(q))
