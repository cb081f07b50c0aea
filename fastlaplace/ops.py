"""Typed wrappers of the compiled ops ``torch.ops.fastlaplace.*``.

Each op is batched over a leading task dimension B. Beside each wrapper sit its fake
(meta) implementation, so that ``torch.compile`` can trace it, and its autograd formula,
which is first order: the meta-gradient of LLAMA's log-det term needs dA/dā and dG/dg,
never a double backward. (The log-det ops' autograd lives in ``csrc/autograd.cpp``: in
Python its per-call overhead exceeded the kernels' time at the sinusoid's sizes.) Formulas:
``docs/design.md`` §2; pure-PyTorch twins of every op are in :mod:`fastlaplace.reference`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _extension
from .options import LogdetMethod, LogdetMethodLike, parse

Method = LogdetMethodLike  # "exact" or "factored" (or the LogdetMethod member)
_ops = torch.ops.fastlaplace


def has_cuda() -> bool:
    """Whether this build of fastlaplace compiled and registered its CUDA kernels."""
    return _extension.build_info()["with_cuda"]


def build_info() -> dict:
    """The torch version the extension was built against, CUDA or not, CUDA architectures."""
    return _extension.build_info()


# ---------------------------------------------------------------------------------------
# Checks that run after a kernel, only when its output is not finite: they name the
# input at fault. They cost one reduction (a host sync on CUDA), so hot paths pass
# check=False and rely on the loss check of the training loop.


def _should_check(check: bool) -> bool:
    return check and not torch.compiler.is_compiling()


def _raise_for_nonfinite(op: str, **inputs: Tensor) -> None:
    for name, t in inputs.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"fastlaplace.{op}: {name} contains NaN or Inf")


_NOT_FINITE = ("the log-determinant is not finite: a damped factor is not positive definite, or the damping is "
               "below the rounding of a factor, where the arithmetic cannot resolve the value (docs/design.md §2)")


def _as_damping(damping: float | Tensor, M: Tensor) -> Tensor:
    if isinstance(damping, Tensor):
        return damping.expand(M.shape[0]) if damping.dim() == 0 else damping
    return torch.full((M.shape[0],), float(damping), dtype=M.dtype, device=M.device)


def _method(method: LogdetMethodLike) -> str:
    """The op schema's string for a method (a ``ValueError`` listing the choices otherwise)."""
    return parse(LogdetMethod, method, "method").value


def _check_bias(bias: bool) -> None:
    if not isinstance(bias, bool):  # the op schema would take 2, 1.5 or None as a bool
        raise TypeError(f"fastlaplace: bias must be True or False, got {bias!r}")


# ---------------------------------------------------------------------------------------
# The kernels' input checks (csrc/checks.h), repeated for the fake implementations so that
# torch.compile refuses at trace time what eager refuses at run time. Fakes return
# contiguous tensors, as the kernels do.


def _fake_float(t: Tensor, name: str) -> None:
    torch._check_type(t.dtype in (torch.float32, torch.float64),
                      lambda: f"fastlaplace: {name} must be float32 or float64, got {t.dtype}")


def _fake_rank(t: Tensor, rank: int, name: str, shape: str) -> None:
    torch._check_value(t.dim() == rank,
                       lambda: f"fastlaplace: {name} must have shape {shape}, got a tensor of shape {tuple(t.shape)}")


def _fake_same_kind(x: Tensor, y: Tensor, nx: str, ny: str) -> None:
    torch._check_type(x.dtype == y.dtype, lambda: f"fastlaplace: {nx} and {ny} must have the same dtype")
    torch._check_value(x.device == y.device, lambda: f"fastlaplace: {nx} and {ny} must be on the same device")


def _fake_rows(a: Tensor, g: Tensor) -> None:
    _fake_float(a, "a")
    _fake_float(g, "g")
    _fake_rank(a, 3, "a", "[tasks, rows, d_in]")
    _fake_rank(g, 3, "g", "[tasks, rows, d_out]")
    _fake_same_kind(a, g, "a", "g")
    torch._check_value(a.shape[0] == g.shape[0], lambda: "fastlaplace: a and g must have the same number of tasks")
    torch._check_value(a.shape[1] == g.shape[1], lambda: "fastlaplace: a and g must have the same number of rows")
    torch._check_value(a.shape[0] >= 1 and a.shape[1] >= 1, lambda: "fastlaplace: need at least one task and one row")
    torch._check_value(g.shape[2] >= 1, lambda: "fastlaplace: g needs d_out >= 1")


MAX_ELEMENTS = 2**30  # per input or factor: csrc/checks.h's bound on one call's work
MAX_WORK = 2**44  # multiply-adds B·R·(d_A² + d_G²) to form the factors


def _fake_work(a: Tensor, g: Tensor, bias: bool) -> None:
    B, R, dA, dG = a.shape[0], a.shape[1], a.shape[2] + int(bias), g.shape[2]
    torch._check_value(a.numel() <= MAX_ELEMENTS and g.numel() <= MAX_ELEMENTS and B * (dA**2 + dG**2) <= MAX_ELEMENTS
                       and B * R * (dA**2 + dG**2) <= MAX_WORK,
                       lambda: "fastlaplace: a and g exceed the work one call accepts (2^30 elements per input or "
                       "factor, 2^44 multiply-adds B*R*(d_A^2 + d_G^2)); split the batch or the rows")


def _fake_layer(a: Tensor, g: Tensor, bias: bool) -> None:
    _fake_rows(a, g)
    _fake_work(a, g, bias)
    torch._check_value(a.shape[2] + int(bias) >= 1, lambda: "fastlaplace: a has d_in = 0 and bias=False")


def _fake_square(m: Tensor, name: str) -> None:
    _fake_float(m, name)
    _fake_rank(m, 3, name, "[tasks, d, d]")
    torch._check_value(m.shape[1] == m.shape[2] and m.shape[1] >= 1 and m.shape[0] >= 1,
                       lambda: f"fastlaplace: {name} must be a batch of square matrices [tasks, d, d]")


def _fake_factors(A: Tensor, G: Tensor) -> None:
    _fake_square(A, "A")
    _fake_square(G, "G")
    _fake_same_kind(A, G, "A", "G")
    torch._check_value(A.shape[0] == G.shape[0], lambda: "fastlaplace: A and G must have the same number of tasks")


def _fake_scalars(scale: float, tau: float, method: str) -> None:
    torch._check_value(scale > 0 and math.isfinite(scale), lambda: "fastlaplace: scale must be positive and finite")
    torch._check_value(tau > 0 and math.isfinite(tau), lambda: "fastlaplace: tau must be positive and finite")
    parse(LogdetMethod, method, "fastlaplace: method")


# ---------------------------------------------------------------------------------------
# kron_factors


def kron_factors(a: Tensor, g: Tensor, bias: bool = True) -> tuple[Tensor, Tensor]:
    """K-FAC factors of one layer for every task.

    Args:
        a: layer inputs, ``[tasks, rows, d_in]`` (rows: examples, or example-location pairs
            of unfolded conv patches).
        g: gradients of the loss with respect to the layer's outputs, ``[tasks, rows, d_out]``.
        bias: append a constant 1 to each input row (the layer has a bias). The CPU kernel
            forms the extended rows [a, 1]: in a per-task double buffer for small factors, as
            a concatenated copy before its BLAS call for larger ones; the CUDA kernel makes the
            1s as it loads each tile.

    Returns:
        ``A = āᵀā / R`` of shape ``[tasks, d_in + bias, d_in + bias]`` and
        ``G = gᵀg / R`` of shape ``[tasks, d_out, d_out]``.
    """
    _check_bias(bias)
    return _ops.kron_factors(a, g, bias)


@torch.library.register_fake("fastlaplace::kron_factors")
def _(a, g, bias):
    _fake_rows(a, g)
    _fake_work(a, g, bias)
    B, _, d = a.shape
    D = d + int(bias)
    return a.new_empty(B, D, D), g.new_empty(B, g.shape[2], g.shape[2])


def _kron_factors_setup(ctx, inputs, output):
    a, g, bias = inputs
    ctx.bias = bias
    ctx.save_for_backward(a, g)


def _kron_factors_backward(ctx, grad_A, grad_G):
    a, g = ctx.saved_tensors
    R = a.shape[1]
    grad_a = grad_g = None
    if grad_A is not None and ctx.needs_input_grad[0]:
        P = grad_A + grad_A.mT  # dL/dā = ā (Ā + Āᵀ) / R
        d = a.shape[2]
        grad_a = a @ P[:, :d, :d]
        if ctx.bias:
            grad_a = grad_a + P[:, d, :d].unsqueeze(1)
        grad_a = grad_a / R
    if grad_G is not None and ctx.needs_input_grad[1]:
        grad_g = g @ (grad_G + grad_G.mT) / R
    return grad_a, grad_g, None


torch.library.register_autograd(
    "fastlaplace::kron_factors", _kron_factors_backward, setup_context=_kron_factors_setup
)


# ---------------------------------------------------------------------------------------
# damped_cholesky


def damped_cholesky(M: Tensor, damping: float | Tensor = 0.0, check: bool = True) -> tuple[Tensor, Tensor]:
    """Lower Cholesky factor of ``M + damping·I`` and its log-determinant, in one pass.

    Args:
        M: symmetric matrices ``[tasks, d, d]``; only the lower triangle is read.
        damping: a float, or one value per task ``[tasks]``.
        check: raise ``ValueError`` when a matrix is not positive definite after damping
            or an input is not finite (otherwise those tasks get NaN).

    Returns:
        ``L`` ``[tasks, d, d]`` and ``logdet`` ``[tasks]``.
    """
    damping = _as_damping(damping, M)
    L, logdet, info = _ops.damped_cholesky(M, damping)
    if _should_check(check) and not bool((info == 0).all()):
        _raise_for_nonfinite("damped_cholesky", M=M, damping=damping)
        task = int(torch.nonzero(info)[0, 0])
        raise ValueError(
            f"fastlaplace.damped_cholesky: matrix {task} of the batch is not positive definite after "
            f"damping {float(damping[task]):g} (leading minor of order {int(info[task])} is not); "
            "increase the damping"
        )
    return L, logdet


@torch.library.register_fake("fastlaplace::damped_cholesky")
def _(M, damping):
    _fake_square(M, "M")
    _fake_rank(damping, 1, "damping", "[tasks]")
    _fake_same_kind(M, damping, "M", "damping")
    torch._check_value(damping.shape[0] == M.shape[0], lambda: "fastlaplace: damping must have one value per task")
    return M.new_empty(M.shape), M.new_empty(M.shape[0]), M.new_empty(M.shape[0], dtype=torch.int32)


def _damped_cholesky_setup(ctx, inputs, output):
    L, _, _ = output
    ctx.save_for_backward(L)


def _damped_cholesky_backward(ctx, grad_L, grad_logdet, _grad_info):
    (L,) = ctx.saved_tensors
    grad_M = torch.zeros_like(L)
    if grad_logdet is not None:
        grad_M = grad_M + grad_logdet[:, None, None] * torch.cholesky_inverse(L)
    if grad_L is not None:
        # Cholesky's backward (Murray 2016), as in PyTorch: Φ(Lᵀ L̄) symmetrised, then L⁻ᵀ · L⁻¹.
        P = (L.mT @ grad_L).tril()
        P = 0.5 * (P + P.tril(-1).mT)
        P = torch.linalg.solve_triangular(L.mT, P, upper=True, left=True)
        grad_M = grad_M + torch.linalg.solve_triangular(L, P, upper=False, left=False)
    grad_damping = grad_M.diagonal(dim1=-2, dim2=-1).sum(-1) if ctx.needs_input_grad[1] else None
    return grad_M, grad_damping


torch.library.register_autograd(
    "fastlaplace::damped_cholesky", _damped_cholesky_backward, setup_context=_damped_cholesky_setup
)


# ---------------------------------------------------------------------------------------
# kron_logdet


def kron_logdet(
    A: Tensor, G: Tensor, scale: float, tau: float, method: Method = "factored", check: bool = True
) -> Tensor:
    """``log det(scale·A⊗G + tau·I)`` per task.

    Args:
        A: input-side factors ``[tasks, d_A, d_A]`` (symmetric PSD; lower triangle read).
        G: output-side factors ``[tasks, d_G, d_G]``.
        scale: ``c``, the number of rows the factors average over (N·T).
        tau: prior precision τ > 0.
        method: ``"exact"``: Σᵢⱼ log(c·aᵢ·gⱼ + τ) over the factors' eigenvalues (the better
            approximation); ``"factored"``: the π-corrected damped factors of K-FAC,
            d_G·logdet(√c·A + π√τ·I) + d_A·logdet(√c·G + √τ/π·I) (K-FAC's usual damping; the
            paper names none). Never below the exact value: its cross terms are PSD.
        check: raise ``ValueError`` if a result is not finite.

    Returns:
        ``[tasks]``.
    """
    out = _ops.kron_logdet(A, G, float(scale), float(tau), _method(method))
    if _should_check(check) and not bool(torch.isfinite(out).all()):
        _raise_for_nonfinite("kron_logdet", A=A, G=G)
        raise ValueError(f"fastlaplace.kron_logdet: {_NOT_FINITE} (are A and G PSD?)")
    return out


@torch.library.register_fake("fastlaplace::kron_logdet")
def _(A, G, scale, tau, method):
    _fake_factors(A, G)
    _fake_scalars(scale, tau, method)
    return A.new_empty(A.shape[0])


@torch.library.register_fake("fastlaplace::kron_logdet_and_grad")
def _(A, G, scale, tau, method):
    _fake_factors(A, G)
    _fake_scalars(scale, tau, method)
    return A.new_empty(A.shape[0]), A.new_empty(A.shape), G.new_empty(G.shape)


# Autograd of kron_logdet and kfac_logdet is registered in C++ (csrc/autograd.cpp): when a
# gradient is needed the forward runs the *_and_grad op (value and gradients in one pass)
# and backward only scales the saved gradients.


# ---------------------------------------------------------------------------------------
# kfac_logdet


def kfac_logdet(
    a: Tensor,
    g: Tensor,
    scale: float,
    tau: float,
    method: Method = "factored",
    bias: bool = True,
    check: bool = True,
) -> Tensor:
    """``log det(scale·A⊗G + tau·I)`` straight from a layer's rows (LLAMA's hot path).

    Same as ``kron_logdet(*kron_factors(a, g, bias), scale, tau, method)``, fused. With
    fewer rows R than columns, both methods work on the R×R Gram matrix of that side instead
    of its d×d factor (same nonzero eigenvalues and trace; ``docs/design.md`` §5).

    Args:
        a: ``[tasks, rows, d_in]``; g: ``[tasks, rows, d_out]``; see :func:`kron_factors`.
        scale, tau, method, check: see :func:`kron_logdet`.
        bias: the layer has a bias (a constant 1 is appended to each row of ``a``).

    Returns:
        ``[tasks]``.
    """
    method = _method(method)
    _check_bias(bias)
    out = _ops.kfac_logdet(a, g, float(scale), float(tau), method, bias)
    if _should_check(check) and not bool(torch.isfinite(out).all()):
        _raise_for_nonfinite("kfac_logdet", a=a, g=g)
        raise ValueError(f"fastlaplace.kfac_logdet: {_NOT_FINITE}")
    return out


@torch.library.register_fake("fastlaplace::kfac_logdet")
def _(a, g, scale, tau, method, bias):
    _fake_layer(a, g, bias)
    _fake_scalars(scale, tau, method)
    return a.new_empty(a.shape[0])


@torch.library.register_fake("fastlaplace::kfac_logdet_and_grad")
def _(a, g, scale, tau, method, bias):
    _fake_layer(a, g, bias)
    _fake_scalars(scale, tau, method)
    return a.new_empty(a.shape[0]), a.new_empty(a.shape), g.new_empty(g.shape)
