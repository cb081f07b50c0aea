"""The compiled ops against their pure-PyTorch references and against dense Kronecker
matrices: values, gradients, opcheck, errors."""

import subprocess
import sys
import tempfile

import pytest
import torch
from helpers import dense_kfac_precision

import fastlaplace
from fastlaplace import ops
from fastlaplace import reference as ref

F64 = torch.float64


def rows(B, R, din, dout, device, dtype=F64, noncontiguous=False):
    if noncontiguous:  # transposed storage: stride of the row dimension is not the largest
        a = torch.randn(B, din, 2 * R, dtype=dtype, device=device).transpose(1, 2)[:, ::2]
        g = torch.randn(B, dout, 2 * R, dtype=dtype, device=device).transpose(1, 2)[:, ::2]
        assert R == 1 or not (a.is_contiguous() or g.is_contiguous())
        return a, g
    return torch.randn(B, R, din, dtype=dtype, device=device), torch.randn(B, R, dout, dtype=dtype, device=device)


def spd(B, d, device, dtype=F64, rank=None):
    X = torch.randn(B, d, rank or d + 2, dtype=dtype, device=device)
    return X @ X.mT / X.shape[-1]


# Shapes (tasks, rows, d_in, d_out): the sinusoid MLP's layers, awkward sizes, and ones
# that take the CPU's composite (BLAS/LAPACK) path rather than the fused one.
LAYER_SHAPES = [
    (25, 10, 1, 40),
    (25, 10, 40, 40),
    (25, 10, 40, 1),
    (1, 1, 1, 1),
    (2, 3, 2, 2),
    (2, 200, 41, 5),
    (1, 20, 577, 5),
    (2, 1200, 28, 64),
    (1, 70, 70, 3),
    (1, 5, 1600, 5),  # Conv4's head on 84×84 images: d_A = 1601
]


@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_kron_factors_matches_reference(device, shape, bias, noncontiguous):
    a, g = rows(*shape, device, noncontiguous=noncontiguous)
    A, G = ops.kron_factors(a, g, bias)
    A_ref, G_ref = ref.kron_factors(a, g, bias)
    torch.testing.assert_close(A, A_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(G, G_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(A, A.mT, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("B", [1, 25])
@pytest.mark.parametrize("d", [1, 2, 41, 97, 577])
def test_damped_cholesky_matches_reference(device, B, d):
    if d == 577 and B == 25:
        pytest.skip("covered by B=1")
    M = spd(B, d, device)
    damping = torch.rand(B, dtype=F64, device=device)
    L, logdet = ops.damped_cholesky(M, damping)
    L_ref, logdet_ref = ref.damped_cholesky(M, damping)
    torch.testing.assert_close(L, L_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(logdet, logdet_ref, rtol=1e-10, atol=1e-9)


def test_damped_cholesky_1601(device):
    M = spd(1, 1601, device, rank=200)
    L, logdet = ops.damped_cholesky(M, 0.5)
    torch.testing.assert_close(logdet, ref.damped_cholesky(M, 0.5)[1], rtol=1e-10, atol=1e-8)


def test_damped_cholesky_noncontiguous_and_scalar_damping(device):
    M = spd(3, 41, device).mT  # symmetric, so the transposed view holds the same matrix
    L, logdet = ops.damped_cholesky(M, 0.1)
    torch.testing.assert_close(logdet, ref.damped_cholesky(M.contiguous(), 0.1)[1])


@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=str)
@pytest.mark.parametrize("method", ["exact", "factored"])
def test_kfac_logdet_matches_reference(device, shape, method):
    a, g = rows(*shape, device)
    R = shape[1]
    out = ops.kfac_logdet(a, g, scale=R, tau=0.5, method=method)
    torch.testing.assert_close(out, ref.kfac_logdet(a, g, R, 0.5, method), rtol=1e-9, atol=1e-8)


@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=str)
@pytest.mark.parametrize("method", ["exact", "factored"])
def test_kron_logdet_matches_reference(device, shape, method):
    A, G = ref.kron_factors(*rows(*shape, device))
    out = ops.kron_logdet(A, G, scale=3.0, tau=0.2, method=method)
    torch.testing.assert_close(out, ref.kron_logdet(A, G, 3.0, 0.2, method), rtol=1e-9, atol=1e-8)


@pytest.mark.parametrize("shape", [(3, 10, 1, 40), (2, 4, 6, 5), (2, 30, 3, 2), (1, 7, 9, 9)], ids=str)
def test_exact_logdet_equals_dense_slogdet(device, shape):
    a, g = rows(*shape, device)
    R = shape[1]
    A, G = ref.kron_factors(a, g)
    dense = ref.dense_kron_logdet(A, G, R, 0.7)
    torch.testing.assert_close(ops.kfac_logdet(a, g, R, 0.7, "exact"), dense, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(ops.kron_logdet(A, G, R, 0.7, "exact"), dense, rtol=1e-10, atol=1e-9)


def test_factored_differs_from_exact_on_low_rank_factors(device):
    """docs/design.md §2: with few rows the factored approximation is far from the exact value."""
    a, g = rows(4, 10, 40, 40, device)
    exact = ops.kfac_logdet(a, g, 10, 1.0, "exact")
    factored = ops.kfac_logdet(a, g, 10, 1.0, "factored")
    assert bool(((factored - exact).abs() > 1.0).all())


def test_float32_close_to_float64(device):
    a, g = rows(25, 10, 40, 40, device)
    for method in ("exact", "factored"):
        truth = ref.kfac_logdet(a, g, 10, 0.5, method)
        ours = ops.kfac_logdet(a.float(), g.float(), 10, 0.5, method).double()
        torch_f32 = ref.kfac_logdet(a.float(), g.float(), 10, 0.5, method).double()
        assert ours.dtype == F64
        tol = 4 * (torch_f32 - truth).abs().max() + 1e-4 * truth.abs().max()
        assert (ours - truth).abs().max() <= tol


# ------------------------------------------------------------------------- gradients

GRAD_SHAPES = [(2, 10, 3, 4), (2, 4, 6, 5), (2, 30, 3, 2), (2, 8, 9, 7), (1, 70, 70, 3)]


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
@pytest.mark.parametrize("method", ["exact", "factored"])
def test_kfac_logdet_gradcheck(device, shape, method):
    a, g = rows(*shape, device)
    a.requires_grad_()
    g.requires_grad_()
    fn = lambda a, g: ops.kfac_logdet(a, g, shape[1], 0.3, method)
    assert torch.autograd.gradcheck(fn, (a, g), fast_mode=shape[2] > 20)


@pytest.mark.parametrize("d", [(3, 4), (7, 2), (66, 3)], ids=str)
@pytest.mark.parametrize("method", ["exact", "factored"])
def test_kron_logdet_gradcheck(device, d, method):
    A, G = spd(2, d[0], device).requires_grad_(), spd(2, d[1], device).requires_grad_()
    fn = lambda A, G: ops.kron_logdet((A + A.mT) / 2, (G + G.mT) / 2, 5.0, 0.3, method)
    assert torch.autograd.gradcheck(fn, (A, G), fast_mode=d[0] > 20)


def dense_kfac_logdet(a, g, scale, tau, method, bias=True):
    """log det of the dense d_A·d_G precision (tests/helpers.py), with the factors summed row
    by row as outer products: an oracle that shares no code with the kernels, the reference
    or fastlaplace.kfac_math, differentiable by plain autograd."""
    if bias:
        a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
    R = a.shape[1]
    A = torch.einsum("tri,trj->tij", a, a) / R
    G = torch.einsum("tri,trj->tij", g, g) / R
    return torch.linalg.slogdet(dense_kfac_precision(A.cpu(), G.cpu(), scale, tau, method)).logabsdet.to(a.device)


# Dense matrices of order d_A·d_G ≤ 213; fewer rows than columns on either side or both
# (the kernels' Gram path), the fused (order ≤ 64) and the composite path (order 70).
DENSE_SHAPES = [(2, 10, 3, 4), (2, 4, 6, 5), (2, 3, 9, 7), (3, 10, 1, 40), (2, 5, 40, 1), (1, 70, 70, 2)]


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=str)
@pytest.mark.parametrize("method", ["exact", "factored"])
@pytest.mark.parametrize("bias", [True, False])
def test_kfac_logdet_value_and_gradient_match_dense_kronecker(device, shape, method, bias):
    a, g = rows(*shape, device)
    w = torch.randn(shape[0], dtype=F64, device=device)
    values, grads = [], []
    for fn in (ops.kfac_logdet, dense_kfac_logdet):
        a_, g_ = a.clone().requires_grad_(), g.clone().requires_grad_()
        out = fn(a_, g_, float(shape[1]), 0.3, method, bias=bias)
        (out * w).sum().backward()
        values.append(out.detach())
        grads.append((a_.grad, g_.grad))
    torch.testing.assert_close(values[0], values[1], rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("d", [(3, 4), (7, 2), (66, 3)], ids=str)
@pytest.mark.parametrize("method", ["exact", "factored"])
def test_kron_logdet_value_and_gradient_match_dense_kronecker(device, d, method):
    A0, G0 = spd(2, d[0], device), spd(2, d[1], device)
    values, grads = [], []
    for fn in (ops.kron_logdet, lambda A, G, *args: torch.linalg.slogdet(
            dense_kfac_precision(A.cpu(), G.cpu(), *args)).logabsdet.to(device)):
        A, G = A0.clone().requires_grad_(), G0.clone().requires_grad_()
        out = fn(A, G, 5.0, 0.3, method)
        out.sum().backward()
        values.append(out.detach())
        grads.append(((A.grad + A.grad.mT) / 2, (G.grad + G.grad.mT) / 2))  # the op's gradient is symmetric
    torch.testing.assert_close(values[0], values[1], rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
@pytest.mark.parametrize("method", ["exact", "factored"])
def test_kfac_logdet_gradient_matches_reference(device, shape, method):
    a, g = rows(*shape, device)
    w = torch.randn(shape[0], dtype=F64, device=device)
    grads = []
    for fn in (ops.kfac_logdet, ref.kfac_logdet):
        a_, g_ = a.clone().requires_grad_(), g.clone().requires_grad_()
        (fn(a_, g_, shape[1], 0.3, method) * w).sum().backward()
        grads.append((a_.grad, g_.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("d", [1, 5, 41, 100])
def test_damped_cholesky_gradcheck(device, d):
    M = spd(2, d, device).requires_grad_()
    damping = torch.rand(2, dtype=F64, device=device).add_(0.1).requires_grad_()
    fn = lambda M, damping: ops.damped_cholesky((M + M.mT) / 2, damping)
    assert torch.autograd.gradcheck(fn, (M, damping), fast_mode=d > 10)


@pytest.mark.parametrize("bias", [True, False])
def test_kron_factors_gradcheck(device, bias):
    a, g = rows(2, 6, 3, 4, device)
    assert torch.autograd.gradcheck(lambda a, g: ops.kron_factors(a, g, bias), (a.requires_grad_(), g.requires_grad_()))


# ------------------------------------------------------------------------- opcheck

def _opcheck_cases(device):
    a, g = rows(2, 5, 3, 4, device)
    a2, g2 = rows(1, 70, 70, 3, device)  # composite path on the CPU
    A, G = spd(2, 4, device), spd(2, 3, device)
    cases = [
        (torch.ops.fastlaplace.kron_factors, (a, g, True)),
        (torch.ops.fastlaplace.kron_factors, (a2, g2, False)),
        (torch.ops.fastlaplace.damped_cholesky, (A, torch.rand(2, dtype=F64, device=device))),
    ]
    for method in ("exact", "factored"):
        cases += [
            (torch.ops.fastlaplace.kron_logdet, (A, G, 2.0, 0.5, method)),
            (torch.ops.fastlaplace.kron_logdet_and_grad, (A, G, 2.0, 0.5, method)),
            (torch.ops.fastlaplace.kfac_logdet, (a, g, 5.0, 0.5, method, True)),
            (torch.ops.fastlaplace.kfac_logdet, (a2, g2, 70.0, 0.5, method, True)),
            (torch.ops.fastlaplace.kfac_logdet_and_grad, (a, g, 5.0, 0.5, method, True)),
            (torch.ops.fastlaplace.kfac_logdet_and_grad, (a2, g2, 70.0, 0.5, method, True)),
        ]
    return cases


def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        args = tuple(x.clone().requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                     for x in args)
        torch.library.opcheck(op, args)


def test_double_backward_is_refused(device):
    a, g = rows(2, 5, 3, 4, device)
    a.requires_grad_()
    for fn in (ops.kfac_logdet, torch.ops.fastlaplace.kfac_logdet):
        with pytest.raises(NotImplementedError, match="differentiable once"):
            torch.autograd.grad(fn(a, g, 5.0, 0.5, "factored", True).sum(), a, create_graph=True)


# ------------------------------------------------------------------------- bad input

def test_bad_inputs_raise_clear_errors():
    a, g = rows(2, 5, 3, 4, "cpu")
    with pytest.raises(ValueError, match="a must have shape"):
        ops.kron_factors(a[0], g)
    with pytest.raises(ValueError, match="same number of tasks"):
        ops.kron_factors(a, g[:1])
    with pytest.raises(ValueError, match="same number of rows"):
        ops.kfac_logdet(a, g[:, :4], 5, 0.1)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.kron_factors(a.long(), g.long())
    with pytest.raises(TypeError, match="same dtype"):
        ops.kfac_logdet(a.float(), g, 5, 0.1)
    with pytest.raises(ValueError, match="tau"):
        ops.kfac_logdet(a, g, 5, 0.0)
    with pytest.raises(ValueError, match="scale"):
        ops.kfac_logdet(a, g, -1, 0.1)
    with pytest.raises(ValueError, match="method"):
        ops.kfac_logdet(a, g, 5, 0.1, method="diagonal")
    with pytest.raises(ValueError, match="square"):
        ops.damped_cholesky(torch.randn(2, 3, 4, dtype=F64))
    with pytest.raises(ValueError, match="one value per task"):
        ops.damped_cholesky(spd(2, 3, "cpu"), torch.ones(3, dtype=F64))


@pytest.mark.parametrize("d", [3, 120])
def test_not_positive_definite_is_reported(d):
    M = spd(3, d, "cpu")
    M[1] = -M[1]
    with pytest.raises(ValueError, match="matrix 1 of the batch is not positive definite"):
        ops.damped_cholesky(M, 1e-3)
    L, logdet = ops.damped_cholesky(M, 1e-3, check=False)
    assert torch.isnan(logdet[1]) and torch.isfinite(logdet[[0, 2]]).all()


@pytest.mark.parametrize("op", ["kfac", "kron", "cholesky"])
def test_nonfinite_inputs_are_named(op):
    a, g = rows(2, 5, 3, 4, "cpu")
    a[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        if op == "kfac":
            ops.kfac_logdet(a, g, 5, 0.1)
        elif op == "kron":
            A, G = ref.kron_factors(a, g)
            ops.kron_logdet(A, G, 5, 0.1, "exact")
        else:
            ops.damped_cholesky(ref.kron_factors(a, g)[0], 0.1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_raise():
    a, g = rows(2, 5, 3, 4, "cpu")
    with pytest.raises((ValueError, RuntimeError), match="device"):
        ops.kron_factors(a, g.cuda())


# ------------------------------------------------------------------------- build

def test_cuda_kernels_registered_when_built_with_cuda():
    if not fastlaplace.has_cuda():
        pytest.skip("extension built without CUDA")
    for name in ["kron_factors", "damped_cholesky", "kron_logdet", "kron_logdet_and_grad", "kfac_logdet",
                 "kfac_logdet_and_grad"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastlaplace::{name}", "CUDA"), name


def test_build_info():
    info = ops.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["with_cuda"] == fastlaplace.has_cuda()


def test_torch_mismatch_gives_rebuild_message():
    code = (
        "import torch; torch.__version__ = '0.0.0'\n"
        "try:\n    import fastlaplace\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tempfile.gettempdir()).stdout
    assert "but torch 0.0.0 is imported" in out and "Rebuild" in out
