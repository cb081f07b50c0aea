"""The K-FAC arithmetic of ``docs/design.md`` §2-3, written once in PyTorch.

Pure functions of tensors batched over a leading task dimension, with no fastlaplace
imports: the clarity reference of the kernels (:mod:`fastlaplace.reference`), the
posterior (:mod:`fastlaplace.posterior`) and the plain-PyTorch baseline of the benchmarks
take their formulas from here. The compiled kernels have their own implementation of the
same formulas (``csrc/kfac_math.h`` for orders ≤ 64, ``csrc/composite.cpp`` above), which
the tests compare with the reference; the functions here are themselves tested against
dense ``torch.kron`` matrices (``tests/test_kfac_math.py``).

A layer's curvature block is c·A⊗G with A = āᵀā/R (d_A × d_A, ā the input rows with a
trailing 1 for a bias), G = gᵀg/R (d_G × d_G) and c the number of rows the Fisher sums
over; the prior adds τ·I.

- **Damping** (the factored method): c·A⊗G + τI ≈ (√c·A + π√τ·I) ⊗ (√c·G + (√τ/π)·I), with
  π = sqrt((tr A/d_A) / (tr G/d_G)). Written as √c·(A + λ_A·I) ⊗ √c·(G + λ_G·I) with
  λ_A = π√τ/√c and λ_G = √τ/(π√c) (:func:`factored_damping`), its log-det is
  d_G·logdet(A + λ_A·I) + d_A·logdet(G + λ_G·I) + d_A·d_G·log c (:func:`factored_logdet`).
- **Exact**: log det(c·A⊗G + τI) = Σᵢⱼ log(c·aᵢ·gⱼ + τ) over the eigenvalues aᵢ of A and gⱼ
  of G (:func:`exact_logdet`); c·gⱼ·aᵢ + τ are the precisions of the eigen-directions
  (:func:`exact_precisions`), which the exact posterior samples along.
- **Gram or factor**: with fewer rows R than columns d, a factor has rank ≤ R and its
  nonzero eigenvalues are those of the R×R Gram matrix x̄x̄ᵀ/R (:func:`spectrum_carrier`);
  the other d − n eigenvalues are zero, so logdet(A + λI) = logdet(K + λI) + (d − n)·log λ
  (:func:`carrier_logdet`) and each missing pair of the exact sum adds log τ. Traces are
  the same, so π is too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def with_bias_column(x: Tensor) -> Tensor:
    """x̄ = [x, 1]: ``[..., d] -> [..., d + 1]``."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


def trace(M: Tensor) -> Tensor:
    """tr M per task: ``[tasks, n, n] -> [tasks]``."""
    return M.diagonal(dim1=-2, dim2=-1).sum(-1)


# ------------------------------------------------------------------------- Gram or factor


def uses_gram(rows: int, d: int) -> bool:
    """Whether a factor of order d over ``rows`` rows is carried by its R×R Gram matrix."""
    return rows < d


def spectrum_carrier(x: Tensor, bias: bool = False) -> Tensor:
    """The matrix carrying the nonzero spectrum of the factor x̄ᵀx̄/R of rows x [tasks, R, d]:
    the factor itself, or with R < d (+1 for the bias) the Gram matrix x̄x̄ᵀ/R."""
    if bias:
        x = with_bias_column(x)
    R = x.shape[1]
    return x @ x.mT / R if uses_gram(R, x.shape[2]) else x.mT @ x / R


def carrier_logdet(logdet_K: Tensor, n: int, d: int, damping: Tensor | float) -> Tensor:
    """logdet(A + λI) of a factor of order d from logdet(K + λI) of its carrier of order n:
    the d − n eigenvalues the carrier leaves out are zero."""
    if n == d:
        return logdet_K
    return logdet_K + (d - n) * torch.log(torch.as_tensor(damping, dtype=logdet_K.dtype, device=logdet_K.device))


# ------------------------------------------------------------------------- factored


def pi_correction(A: Tensor, G: Tensor, d_A: int | None = None, d_G: int | None = None) -> Tensor:
    """π = sqrt((tr A/d_A) / (tr G/d_G)) per task, or 1 where a trace is not positive.

    A and G may be the factors (d_A, d_G default to their orders) or their spectrum carriers
    (same traces), with the factors' orders given."""
    d_A = A.shape[-1] if d_A is None else d_A
    d_G = G.shape[-1] if d_G is None else d_G
    trA, trG = trace(A), trace(G)
    valid = (trA > 0) & (trG > 0)
    one = torch.ones_like(trA)
    pi = torch.sqrt(torch.where(valid, trA / d_A, one) / torch.where(valid, trG / d_G, one))
    return torch.where(valid, pi, one)


def factored_damping(A: Tensor, G: Tensor, scale: float, tau: float, d_A: int | None = None,
                     d_G: int | None = None) -> tuple[Tensor, Tensor]:
    """λ_A = π√τ/√c and λ_G = √τ/(π√c) per task: the damped factors are √c·(A + λ_A·I) and
    √c·(G + λ_G·I) = √c·A + π√τ·I and √c·G + (√τ/π)·I. Orders as :func:`pi_correction`."""
    pi = pi_correction(A, G, d_A, d_G)
    s = math.sqrt(tau / scale)
    return pi * s, s / pi


def factored_logdet(logdet_A: Tensor, d_A: int, logdet_G: Tensor, d_G: int, scale: float) -> Tensor:
    """log det of (√c·(A + λ_A·I)) ⊗ (√c·(G + λ_G·I)) from logdet(A + λ_A·I) and logdet(G + λ_G·I):
    d_G·logdet_A + d_A·logdet_G + d_A·d_G·log c."""
    return d_G * logdet_A + d_A * logdet_G + d_A * d_G * math.log(scale)


# ------------------------------------------------------------------------- exact


def exact_precisions(a: Tensor, g: Tensor, scale: float, tau: float | Tensor) -> Tensor:
    """c·gⱼ·aᵢ + τ for eigenvalues a [tasks, n_A] and g [tasks, n_G]: ``[tasks, n_G, n_A]``,
    laid out as a layer's [W | b] (output rows, input columns). ``tau`` is a scalar or one
    precision per pair, ``[tasks, n_G, n_A]``."""
    return scale * g.unsqueeze(-1) * a.unsqueeze(-2) + tau


def exact_logdet(a: Tensor, g: Tensor, scale: float, tau: float | Tensor, d_A: int | None = None,
                 d_G: int | None = None) -> Tensor:
    """Σᵢⱼ log(c·aᵢ·gⱼ + τ) per task = log det(c·A⊗G + τI), from the eigenvalues a [tasks, n_A]
    and g [tasks, n_G]. With carriers' eigenvalues (n < d), each of the d_A·d_G − n_A·n_G
    missing pairs has a zero eigenvalue and adds log τ (a scalar τ then)."""
    n_A, n_G = a.shape[-1], g.shape[-1]
    missing = (n_A if d_A is None else d_A) * (n_G if d_G is None else d_G) - n_A * n_G
    out = torch.log(exact_precisions(a, g, scale, tau)).sum((-2, -1))
    if missing:
        if isinstance(tau, Tensor):
            raise ValueError("a prior precision per direction needs every eigenvalue (n = d)")
        out = out + missing * math.log(tau)
    return out
