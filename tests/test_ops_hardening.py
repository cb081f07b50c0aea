"""Edge cases of the ops that once crashed or answered wrongly, and the property test that
throws thousands of drawn inputs at every op (tests/fuzz_ops.py, in a child process)."""

import os

import pytest
import torch
from helpers import fuzz_failures

import fastlaplace as fl
from fastlaplace import reference as ref

F64 = torch.float64


@pytest.mark.parametrize("d", [56, 57, 58, 60, 62, 64, 65])
@pytest.mark.parametrize("method", ["exact", "factored"])
def test_constant_factor_gradients(d, method):
    A = torch.full((1, d, d), 0.3, dtype=F64)
    G = torch.eye(3, dtype=F64)[None] * torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    value, gA, gG = torch.ops.fastlaplace.kron_logdet_and_grad(A, G, 10.0, 0.5, method)
    A_, G_ = A.clone().requires_grad_(), G.clone().requires_grad_()
    expected = ref.kron_logdet(A_, G_, 10.0, 0.5, method)
    eA, eG = torch.autograd.grad(expected.sum(), (A_, G_))
    assert torch.allclose(value, expected, rtol=1e-10)
    # The reference's gradient is a general matrix; the op's is its symmetric part.
    assert torch.allclose(gA, (eA + eA.mT) / 2, rtol=1e-8, atol=1e-10)
    assert torch.allclose(gG, (eG + eG.mT) / 2, rtol=1e-8, atol=1e-10)


def test_layer_without_parameters_is_refused_not_a_crash():
    for method in ("exact", "factored"):
        with pytest.raises(ValueError, match="d_in = 0 and bias=False"):
            fl.kfac_logdet(torch.zeros(1, 3, 0), torch.randn(1, 3, 2), 1.0, 1.0, method, bias=False)
    A, G = fl.kron_factors(torch.zeros(2, 3, 0), torch.randn(2, 3, 2), bias=False)
    assert A.shape == (2, 0, 0) and G.shape == (2, 2, 2)


@pytest.mark.parametrize("R", [3, 200])  # fused path and the composite (BLAS) path
@pytest.mark.parametrize("method", ["exact", "factored"])
def test_bias_only_layer(R, method):
    a, g = torch.zeros(2, R, 0, dtype=F64), torch.randn(2, R, 70, dtype=F64)
    out = fl.kfac_logdet(a, g, float(R), 0.5, method)
    assert torch.allclose(out, ref.kfac_logdet(a, g, float(R), 0.5, method), rtol=1e-10)


@pytest.mark.parametrize("bias", [2, 1.5, None, "yes"])
def test_bias_must_be_a_bool(bias):
    a, g = torch.randn(1, 3, 2), torch.randn(1, 3, 2)
    with pytest.raises(TypeError, match="bias must be True or False"):
        fl.kfac_logdet(a, g, 3.0, 1.0, bias=bias)
    with pytest.raises(TypeError, match="bias must be True or False"):
        fl.kron_factors(a, g, bias=bias)


@pytest.mark.parametrize("d", [96, 97, 150])  # either side of the LAPACK threshold
@pytest.mark.parametrize("bad", ["inf_entry", "nan_entry", "inf_damping"])
def test_damped_cholesky_nonfinite_same_on_every_path(d, bad):
    X = torch.randn(2, d, d + 1, dtype=F64)
    M = X @ X.mT / d
    damping = torch.full((2,), 0.1, dtype=F64)
    if bad == "inf_entry":
        M[1, 5, 5] = float("inf")
    elif bad == "nan_entry":
        M[1, 7, 3] = M[1, 3, 7] = float("nan")
    else:
        damping[1] = float("inf")
    L, logdet, info = torch.ops.fastlaplace.damped_cholesky(M, damping)
    assert int(info[0]) == 0 and int(info[1]) > 0
    assert torch.isfinite(logdet[0]) and torch.isnan(logdet[1]) and torch.isnan(L[1]).all()
    with pytest.raises(ValueError, match="NaN or Inf|not positive definite"):
        fl.damped_cholesky(M, damping)


def test_kron_factors_accumulates_in_double():
    a = torch.ones(1, 2**25 + 3, 1)  # float32 sums stop growing at 2^24
    A, G = fl.kron_factors(a, a[..., :1], bias=False)
    assert float(A[0, 0, 0]) == 1.0 and float(G[0, 0, 0]) == 1.0


def test_outputs_are_contiguous_as_the_fakes_say():
    a = torch.randn(2, 80, 70, dtype=F64)  # composite path (order 71 > 64)
    g = torch.randn(2, 80, 3, dtype=F64)
    for method in ("exact", "factored"):
        _, da, dg = torch.ops.fastlaplace.kfac_logdet_and_grad(a, g, 80.0, 0.5, method, True)
        A, G = fl.kron_factors(a, g)
        _, gA, gG = torch.ops.fastlaplace.kron_logdet_and_grad(A, G, 80.0, 0.5, method)
        assert all(t.is_contiguous() for t in (da, dg, gA, gG)), method
    M = torch.eye(5, dtype=F64).expand(3, 5, 5).mT
    L, _, _ = torch.ops.fastlaplace.damped_cholesky(M, torch.ones(3, dtype=F64))
    assert L.is_contiguous()


def test_fakes_repeat_the_kernels_checks():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a, g = torch.empty(2, 5, 3), torch.empty(2, 5, 4)
        with pytest.raises(TypeError, match="float32 or float64"):
            torch.ops.fastlaplace.kfac_logdet(a.half(), g.half(), 5.0, 1.0, "exact", True)
        with pytest.raises(ValueError, match="same number of rows"):
            torch.ops.fastlaplace.kron_factors(a, g[:, :4], True)
        with pytest.raises(ValueError, match="d_in = 0"):
            torch.ops.fastlaplace.kfac_logdet(a[..., :0], g, 5.0, 1.0, "exact", False)
        with pytest.raises(ValueError, match="tau"):
            torch.ops.fastlaplace.kron_logdet(torch.empty(2, 3, 3), torch.empty(2, 4, 4), 5.0, -1.0, "exact")
        with pytest.raises(ValueError, match="square"):
            torch.ops.fastlaplace.damped_cholesky(torch.empty(2, 3, 4), torch.empty(2))
        L, _, _ = torch.ops.fastlaplace.damped_cholesky(torch.empty(2, 3, 3).mT, torch.empty(2))
        assert L.is_contiguous()




def test_property_fuzz_every_op():
    """Thousands of drawn inputs: each either raises ValueError/TypeError (when it carries a
    defect) or agrees with the float64 reference. A crash of the child is a failure too;
    the run then continues after the crashing case."""
    cases = int(os.environ.get("FASTLAPLACE_FUZZ_CASES", "2000"))
    failures = fuzz_failures(cases)
    assert not failures, f"{len(failures)} of {cases} cases failed:\n" + "\n".join(failures[:25])
