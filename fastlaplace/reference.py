"""Pure-PyTorch twins of every op in :mod:`fastlaplace.ops`, written for clarity.

They are the test oracle and the benchmark baseline: same signatures, same conventions
(``docs/design.md`` §2), gradients by plain autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def with_bias_column(a: Tensor) -> Tensor:
    """ā = [a, 1]: ``[..., d] -> [..., d + 1]``."""
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)


def kron_factors(a: Tensor, g: Tensor, bias: bool = True) -> tuple[Tensor, Tensor]:
    """A = āᵀā / R and G = gᵀg / R."""
    if bias:
        a = with_bias_column(a)
    R = a.shape[1]
    return a.mT @ a / R, g.mT @ g / R


def damped_cholesky(M: Tensor, damping: float | Tensor = 0.0) -> tuple[Tensor, Tensor]:
    """L = chol(M + damping·I) and log det(M + damping·I) = 2 Σ log diag L."""
    damping = torch.as_tensor(damping, dtype=M.dtype, device=M.device).expand(M.shape[0])
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    L = torch.linalg.cholesky(M + damping[:, None, None] * eye)
    return L, 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def pi_correction(A: Tensor, G: Tensor) -> Tensor:
    """π = sqrt((tr A / d_A) / (tr G / d_G)), or 1 where a trace is zero."""
    trA = A.diagonal(dim1=-2, dim2=-1).sum(-1)
    trG = G.diagonal(dim1=-2, dim2=-1).sum(-1)
    valid = (trA > 0) & (trG > 0)
    pi = torch.sqrt((trA / A.shape[-1]) / torch.where(valid, trG / G.shape[-1], torch.ones_like(trG)))
    return torch.where(valid, pi, torch.ones_like(pi))


def kron_logdet(A: Tensor, G: Tensor, scale: float, tau: float, method: str = "factored") -> Tensor:
    """log det(scale·A⊗G + tau·I), exactly or by K-FAC's factored damping."""
    dA, dG = A.shape[-1], G.shape[-1]
    if method == "exact":
        a = torch.linalg.eigvalsh(A)
        g = torch.linalg.eigvalsh(G)
        return torch.log(scale * a[:, :, None] * g[:, None, :] + tau).sum((1, 2))
    if method != "factored":
        raise ValueError(f"method must be 'exact' or 'factored', got {method!r}")
    pi = pi_correction(A, G)
    c, t = math.sqrt(scale), math.sqrt(tau)
    _, ldA = damped_cholesky(c * A, pi * t)
    _, ldG = damped_cholesky(c * G, t / pi)
    return dG * ldA + dA * ldG


def kfac_logdet(a: Tensor, g: Tensor, scale: float, tau: float, method: str = "factored", bias: bool = True) -> Tensor:
    """kron_logdet of the factors of a layer's rows."""
    A, G = kron_factors(a, g, bias)
    return kron_logdet(A, G, scale, tau, method)


def dense_kron_logdet(A: Tensor, G: Tensor, scale: float, tau: float) -> Tensor:
    """log det(scale·A⊗G + tau·I) from the dense d_A·d_G matrix: the ground truth on small layers."""
    out = []
    for Ab, Gb in zip(A, G):
        H = scale * torch.kron(Ab, Gb) + tau * torch.eye(Ab.shape[0] * Gb.shape[0], dtype=A.dtype, device=A.device)
        out.append(torch.linalg.slogdet(H).logabsdet)
    return torch.stack(out)
