"""The best plain-PyTorch version of the fused log-det that a careful user would write: the
baseline speed-ups are quoted against (the clarity reference, fastlaplace.reference, is the
other). Batched over tasks, Gram matrices when a layer has fewer rows than columns,
``cholesky_ex`` (no error check, so no host sync), eigenvalues of the small carriers only.
The formulas are fastlaplace.kfac_math's."""

from __future__ import annotations

import torch
from torch import Tensor

from fastlaplace import kfac_math as km


def kfac_logdet(a: Tensor, g: Tensor, scale: float, tau: float, method: str = "factored", bias: bool = True) -> Tensor:
    dA, dG = a.shape[2] + int(bias), g.shape[2]
    KA, KG = km.spectrum_carrier(a, bias), km.spectrum_carrier(g)
    nA, nG = KA.shape[-1], KG.shape[-1]
    if method == "exact":
        return km.exact_logdet(torch.linalg.eigvalsh(KA), torch.linalg.eigvalsh(KG), scale, tau, dA, dG)
    lamA, lamG = km.factored_damping(KA, KG, scale, tau, dA, dG)
    LA, _ = torch.linalg.cholesky_ex(KA + lamA[:, None, None] * torch.eye(nA, dtype=a.dtype, device=a.device))
    LG, _ = torch.linalg.cholesky_ex(KG + lamG[:, None, None] * torch.eye(nG, dtype=a.dtype, device=a.device))
    ldA = km.carrier_logdet(2 * LA.diagonal(dim1=-2, dim2=-1).log().sum(-1), nA, dA, lamA)
    ldG = km.carrier_logdet(2 * LG.diagonal(dim1=-2, dim2=-1).log().sum(-1), nG, dG, lamG)
    return km.factored_logdet(ldA, dA, ldG, dG, scale)
