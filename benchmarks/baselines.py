"""The best plain-PyTorch version of the fused log-det that a careful user would write: the
baseline speed-ups are quoted against (the clarity reference, fastlaplace.reference, is the
other). Batched over tasks, Gram matrices when a layer has fewer rows than columns,
``cholesky_ex`` (no error check, so no host sync), eigenvalues of the small carriers only."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def spectrum_carrier(x: Tensor) -> Tensor:
    """x̄x̄ᵀ/R (Gram, R×R) when R < d, else x̄ᵀx̄/R: the same nonzero eigenvalues."""
    R = x.shape[1]
    return x @ x.mT / R if R < x.shape[2] else x.mT @ x / R


def kfac_logdet(a: Tensor, g: Tensor, scale: float, tau: float, method: str = "factored", bias: bool = True) -> Tensor:
    if bias:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], 2)
    dA, dG = a.shape[2], g.shape[2]
    KA, KG = spectrum_carrier(a), spectrum_carrier(g)
    nA, nG = KA.shape[-1], KG.shape[-1]
    if method == "exact":
        wA, wG = torch.linalg.eigvalsh(KA), torch.linalg.eigvalsh(KG)
        pairs = torch.log(scale * wA[:, :, None] * wG[:, None, :] + tau).sum((1, 2))
        return pairs + (dA * dG - nA * nG) * math.log(tau)
    trA = KA.diagonal(dim1=-2, dim2=-1).sum(-1)
    trG = KG.diagonal(dim1=-2, dim2=-1).sum(-1)
    pi = torch.sqrt((trA / dA) / (trG / dG))
    lamA, lamG = pi * math.sqrt(tau / scale), math.sqrt(tau / scale) / pi
    LA, _ = torch.linalg.cholesky_ex(KA + lamA[:, None, None] * torch.eye(nA, dtype=a.dtype, device=a.device))
    LG, _ = torch.linalg.cholesky_ex(KG + lamG[:, None, None] * torch.eye(nG, dtype=a.dtype, device=a.device))
    ldA = 2 * LA.diagonal(dim1=-2, dim2=-1).log().sum(-1) + (dA - nA) * lamA.log()
    ldG = 2 * LG.diagonal(dim1=-2, dim2=-1).log().sum(-1) + (dG - nG) * lamG.log()
    return dG * ldA + dA * ldG + dA * dG * math.log(scale)
