"""The implicit prior of early stopping (Grant et al. 2018, Sections 3.1-3.2; Santos 1996).

For a linear regression loss ℓ(φ) = ½‖y − Xφ‖² with curvature H = XᵀX, k steps of
φ ← φ − B∇ℓ(φ) from φ₀ = θ land exactly on the MAP estimate under the Gaussian prior
N(θ, Q). With H and B⁻¹ diagonalised together (WᵀHW = Λ, WᵀB⁻¹W = I; for B = αI this is
H = OΛOᵀ scaled by α):

    Q = W diag(((1 − λᵢ)⁻ᵏ − 1) / λᵢ) Wᵀ,

where λᵢ are the eigenvalues of BH (αλ for plain gradient descent). Per direction the k-th
iterate shrinks the distance to the minimiser by (1 − λᵢ)ᵏ, and the MAP by 1/(1 + λᵢqᵢ), so
the prior exists wherever 0 < (1 − λᵢ)ᵏ < 1:

- 0 < λᵢ < 1, any k;
- 1 < λᵢ < 2 for even k (the iterate oscillates but ends on the same side, closer);
- λᵢ = 0 (H only positive semi-definite, as with fewer examples than parameters): the
  limit qᵢ = k, i.e. prior variance αk (plain gradient descent) where the data say nothing.

That is what makes MAML's inner loop an empirical-Bayes estimate in a hierarchical model.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_square_symmetric(M: Tensor, name: str) -> None:
    if M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(M.shape)}")
    if not M.is_floating_point():
        raise TypeError(f"{name} must be a floating-point matrix, got {M.dtype}")
    if not bool(torch.isfinite(M).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    if not torch.allclose(M, M.T, rtol=1e-10, atol=1e-12 * float(M.abs().max().clamp_min(1e-300))):
        raise ValueError(f"{name} must be symmetric")


def _check_square_spd(M: Tensor, name: str) -> None:
    _check_square_symmetric(M, name)
    eig = torch.linalg.eigvalsh(M)
    if not bool(eig.min() > 0):
        raise ValueError(f"{name} must be positive definite (smallest eigenvalue {float(eig.min()):.3g})")


def _joint_diagonalisation(H: Tensor, lr: float | None, precond: Tensor | None) -> tuple[Tensor, Tensor]:
    """(λ, W) with WᵀHW = diag(λ) and WᵀB⁻¹W = I, B = lr·I or the preconditioner."""
    if (lr is None) == (precond is None):
        raise ValueError("give exactly one of lr (plain gradient descent) and precond (a matrix B)")
    if precond is None:
        if not (lr > 0):
            raise ValueError(f"lr must be positive, got {lr}")
        lam, O = torch.linalg.eigh(H)
        return lr * lam, O * lr**0.5
    _check_square_spd(precond, "precond")
    if precond.shape != H.shape:
        raise ValueError(f"precond must have H's shape {tuple(H.shape)}, got {tuple(precond.shape)}")
    L = torch.linalg.cholesky(precond)  # B = LLᵀ, so B⁻¹ = CCᵀ with C = L⁻ᵀ and C⁻¹HC⁻ᵀ = LᵀHL
    lam, U = torch.linalg.eigh(L.T @ H @ L)
    return lam, L @ U


def _zero_tolerance(lam: Tensor, d: int) -> Tensor:
    """Eigenvalues within rounding of zero: d·ε·max|λ| (eigh's backward error), times 10."""
    return 10 * d * torch.finfo(lam.dtype).eps * lam.abs().max().clamp_min(torch.finfo(lam.dtype).tiny)


def step_variances(lam: Tensor, steps: int) -> Tensor:
    """qᵢ = ((1 − λᵢ)^(−k) − 1) / λᵢ elementwise, in units of the step (Q = W diag(q) Wᵀ).

    λ = 0 gives the limit k; accurate for small λ (expm1/log1p). Raises ``ValueError`` naming
    the condition where no Gaussian prior exists: λ < 0, λ ≥ 2, λ = 1, or 1 < λ < 2 with odd k.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if bool((lam < 0).any()):
        raise ValueError(f"the curvature must be positive semi-definite (eigenvalue {float(lam.min()):.4g} of BH)")
    big = lam >= 1
    if bool(big.any()):
        worst = float(lam.max())
        if steps % 2 or worst >= 2 or bool((lam == 1).any()):
            raise ValueError(
                f"the step is too large: lr·λ_max = {worst:.4g} (eigenvalue of BH); a Gaussian prior needs "
                f"lr·λ < 1, or lr·λ < 2 (but not 1) with an even number of steps (here {steps}): otherwise the "
                "iterate lands on the minimiser or beyond it on alternate sides, which no Gaussian prior gives")
    safe = torch.where(lam == 0, torch.ones_like(lam), lam)
    q = torch.expm1(-steps * torch.log(torch.abs(1 - safe))) / safe  # |1 − λ|^(−k) = (1 − λ)^(−k) for even k
    small = torch.expm1(-steps * torch.log1p(-safe.clamp(max=0.5))) / safe  # accurate for small λ
    q = torch.where(lam < 0.5, small, q)
    return torch.where(lam == 0, torch.full_like(lam, float(steps)), q)


def early_stopping_variance(h: Tensor, steps: int, lr: float) -> Tensor:
    """Prior variance of each eigen-direction of the loss's curvature, eigenvalues h ≥ 0:
    ((1 − αh)^(−k) − 1) / h, and αk where h = 0 (plain gradient descent, step α)."""
    if not (lr > 0):
        raise ValueError(f"lr must be positive, got {lr}")
    return lr * step_variances(lr * h, steps)


def early_stopping_prior(H: Tensor, steps: int, lr: float | None = None, precond: Tensor | None = None) -> Tensor:
    """Covariance Q of the Gaussian prior N(θ, Q) implied by ``steps`` steps of gradient descent.

    Args:
        H: the loss's curvature XᵀX, symmetric positive semi-definite ``[d, d]`` (rank
            deficient when there are fewer examples than parameters: Q = αk there).
        steps: k ≥ 1, the number of gradient steps.
        lr: step size α of plain gradient descent, or
        precond: a symmetric positive definite preconditioner B ``[d, d]`` (φ ← φ − B∇ℓ).

    Returns:
        Q ``[d, d]``. Raises ``ValueError`` naming the condition where the prior is undefined:
        H not positive semi-definite, or a step that lands on or overshoots the minimiser
        (α·λ ≥ 1 for an eigenvalue λ of BH, except 1 < α·λ < 2 with even k).
    """
    _check_square_symmetric(H, "H")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    lam, W = _joint_diagonalisation(H, lr, precond)
    tol = _zero_tolerance(lam, H.shape[0])
    if bool((lam < -tol).any()):
        raise ValueError(f"H must be positive semi-definite (eigenvalue {float(lam.min()):.4g} of BH)")
    lam = torch.where(lam.abs() <= tol, torch.zeros_like(lam), lam)
    return (W * step_variances(lam, steps)) @ W.T


def map_estimate(X: Tensor, y: Tensor, theta: Tensor, Q: Tensor) -> Tensor:
    """argmin_φ ½‖y − Xφ‖² + ½(φ − θ)ᵀQ⁻¹(φ − θ) = θ + (XᵀX + Q⁻¹)⁻¹Xᵀ(y − Xθ).

    Q⁻¹ comes from Q's Cholesky factor. Where Q is huge (many steps) its inverse is
    inaccurate only in directions where XᵀX dominates the sum anyway, so the estimate stays
    accurate; the form Q(XᵀXQ + I)⁻¹ would not.
    """
    if X.dim() != 2 or y.shape != X.shape[:1] or theta.shape != X.shape[1:] or Q.shape != (X.shape[1],) * 2:
        raise ValueError(f"shapes do not match: X {tuple(X.shape)}, y {tuple(y.shape)}, theta "
                         f"{tuple(theta.shape)}, Q {tuple(Q.shape)}; need X [n, d], y [n], theta [d], Q [d, d]")
    L, info = torch.linalg.cholesky_ex(Q)
    if int(info) != 0:
        raise ValueError("Q must be symmetric positive definite")
    precision = torch.cholesky_inverse(L)
    return theta + torch.linalg.solve(X.T @ X + precision, X.T @ (y - X @ theta))


def gradient_descent(X: Tensor, y: Tensor, theta: Tensor, steps: int, lr: float | None = None,
                     precond: Tensor | None = None) -> Tensor:
    """``steps`` steps of φ ← φ − B∇ℓ(φ) on ℓ = ½‖y − Xφ‖², from φ = θ (B = lr·I or precond)."""
    if (lr is None) == (precond is None):
        raise ValueError("give exactly one of lr and precond")
    phi = theta.clone()
    for _ in range(steps):
        grad = X.T @ (X @ phi - y)
        phi = phi - (lr * grad if precond is None else precond @ grad)
    return phi
