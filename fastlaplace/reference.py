"""Pure-PyTorch twins of every op in :mod:`fastlaplace.ops`, written for clarity.

They are the test oracle and the benchmark baseline: same signatures, same conventions
(``docs/design.md`` §2), gradients by plain autograd. The formulas (π-corrected damping,
the exact eigenvalue sum) come from :mod:`fastlaplace.kfac_math`; everything else is the
plainest route: the factors are always the d×d matrices, never the Gram matrices that the
kernels use when a layer has fewer rows than columns, so comparing the two checks that
path too. :func:`dense_kron_logdet` is the ground truth on small layers, and
:func:`plain_kfac_logdet` the fastest plain-PyTorch version: the baseline of the speed-ups.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kfac_math
from .kfac_math import with_bias_column
from .options import LogdetMethod, LogdetMethodLike, parse


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


def kron_logdet(A: Tensor, G: Tensor, scale: float, tau: float, method: LogdetMethodLike = "factored") -> Tensor:
    """log det(scale·A⊗G + tau·I), exactly or by K-FAC's factored damping."""
    if parse(LogdetMethod, method, "method") is LogdetMethod.EXACT:
        return kfac_math.exact_logdet(torch.linalg.eigvalsh(A), torch.linalg.eigvalsh(G), scale, tau)
    lam_A, lam_G = kfac_math.factored_damping(A, G, scale, tau)
    _, ldA = damped_cholesky(A, lam_A)
    _, ldG = damped_cholesky(G, lam_G)
    return kfac_math.factored_logdet(ldA, A.shape[-1], ldG, G.shape[-1], scale)


def kfac_logdet(a: Tensor, g: Tensor, scale: float, tau: float, method: LogdetMethodLike = "factored",
                bias: bool = True) -> Tensor:
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


def plain_kfac_logdet(a: Tensor, g: Tensor, scale: float, tau: float, method: LogdetMethodLike = "factored",
                      bias: bool = True) -> Tensor:
    """kfac_logdet as a careful user writes it in plain PyTorch: the baseline speed-ups are
    quoted against. Batched over tasks, the Gram matrix where a layer has fewer rows than
    columns, ``cholesky_ex`` (no error check, so no host sync), eigenvalues of the small side."""
    dA, dG = a.shape[2] + int(bias), g.shape[2]
    KA, KG = kfac_math.spectrum_carrier(a, bias), kfac_math.spectrum_carrier(g)
    nA, nG = KA.shape[-1], KG.shape[-1]
    if parse(LogdetMethod, method, "method") is LogdetMethod.EXACT:
        return kfac_math.exact_logdet(torch.linalg.eigvalsh(KA), torch.linalg.eigvalsh(KG), scale, tau, dA, dG)
    lamA, lamG = kfac_math.factored_damping(KA, KG, scale, tau, dA, dG)
    LA, _ = torch.linalg.cholesky_ex(KA + lamA[:, None, None] * torch.eye(nA, dtype=a.dtype, device=a.device))
    LG, _ = torch.linalg.cholesky_ex(KG + lamG[:, None, None] * torch.eye(nG, dtype=a.dtype, device=a.device))
    ldA = kfac_math.carrier_logdet(2 * LA.diagonal(dim1=-2, dim2=-1).log().sum(-1), nA, dA, lamA)
    ldG = kfac_math.carrier_logdet(2 * LG.diagonal(dim1=-2, dim2=-1).log().sum(-1), nG, dG, lamG)
    return kfac_math.factored_logdet(ldA, dA, ldG, dG, scale)
