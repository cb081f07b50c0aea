"""The implicit prior of early stopping (Grant et al. 2018, Sections 3.1-3.2; Santos 1996).

For a linear regression loss ℓ(φ) = ½‖y − Xφ‖² with curvature H = XᵀX, k steps of
φ ← φ − B∇ℓ(φ) from φ₀ = θ land exactly on the MAP estimate under the Gaussian prior
N(θ, Q). With H and B⁻¹ diagonalised together (WᵀHW = Λ, WᵀB⁻¹W = I; for B = αI this is
H = OΛOᵀ scaled by α):

    Q = W diag(((1 − λᵢ)⁻ᵏ − 1) / λᵢ) Wᵀ,  valid while 0 < λᵢ < 1,

where λᵢ are the eigenvalues of BH (αλ for plain gradient descent). That is what makes
MAML's inner loop an empirical-Bayes estimate in a hierarchical model.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_square_spd(M: Tensor, name: str) -> None:
    if M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(M.shape)}")
    if not M.is_floating_point():
        raise TypeError(f"{name} must be a floating-point matrix, got {M.dtype}")
    if not bool(torch.isfinite(M).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    if not torch.allclose(M, M.T, rtol=1e-10, atol=1e-12 * float(M.abs().max().clamp_min(1e-300))):
        raise ValueError(f"{name} must be symmetric")
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


def early_stopping_prior(H: Tensor, steps: int, lr: float | None = None, precond: Tensor | None = None) -> Tensor:
    """Covariance Q of the Gaussian prior N(θ, Q) implied by ``steps`` steps of gradient descent.

    Args:
        H: the loss's curvature XᵀX, symmetric positive definite ``[d, d]``.
        steps: k ≥ 1, the number of gradient steps.
        lr: step size α of plain gradient descent, or
        precond: a symmetric positive definite preconditioner B ``[d, d]`` (φ ← φ − B∇ℓ).

    Returns:
        Q ``[d, d]``. Raises ``ValueError`` where the prior is undefined: H not positive
        definite, or a step that overshoots (α·λ ≥ 1 for an eigenvalue λ of BH).
    """
    _check_square_spd(H, "H")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    lam, W = _joint_diagonalisation(H, lr, precond)
    if bool(lam.max() >= 1):
        raise ValueError(
            f"the step is too large: lr·λ_max = {float(lam.max()):.4g} >= 1 (eigenvalue of BH); gradient descent "
            "then oscillates and defines no Gaussian prior"
        )
    q = torch.expm1(-steps * torch.log1p(-lam)) / lam  # ((1 − λ)^(−k) − 1) / λ, accurate for small λ
    return (W * q) @ W.T


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
