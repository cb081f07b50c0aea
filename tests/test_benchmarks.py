"""The benchmarks' baseline: the best plain-PyTorch log-det computes what the kernels compute."""

import pytest
import torch

from fastlaplace import reference as ref


@pytest.mark.parametrize("shape", [(25, 10, 1, 40), (3, 10, 40, 40), (2, 30, 5, 3), (2, 6, 70, 1)], ids=str)
@pytest.mark.parametrize("method", ["factored", "exact"])
def test_best_plain_pytorch_baseline_matches_reference(shape, method):
    B, R, d_in, d_out = shape
    g = torch.Generator().manual_seed(0)
    a = torch.randn(B, R, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(B, R, d_out, generator=g, dtype=torch.float64, requires_grad=True)
    got = ref.plain_kfac_logdet(a, b, float(R), 0.3, method)
    want = ref.kfac_logdet(a, b, float(R), 0.3, method)
    assert torch.allclose(got, want, rtol=1e-10)
    ga = torch.autograd.grad(got.sum(), (a, b))
    wa = torch.autograd.grad(want.sum(), (a, b))
    assert all(torch.allclose(x, y, rtol=1e-6, atol=1e-9) for x, y in zip(ga, wa))

