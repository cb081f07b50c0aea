"""The prior of a task's Laplace posterior implied by the inner loop (``docs/design.md`` §6).

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
  Large-input layers meet this: on sinusoids (x up to 10) αh reaches about 1.5.
- ``"early_stopping_first_order"``: Q_L ≈ αK·I, a scalar τ = 1/(s·α·K): N/(2αK) for a
  mean squared error with one output (sinusoid: 500), N/(αK) for a cross-entropy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .options import Loss, LossLike, Prior, choices, parse
from .theory import step_variances

PRIORS = choices(Prior)  # the names of options.Prior, for callers that list them


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
