"""The numerical edge cases of the ops, each against a value computed with mpmath (60 digits,
tests/precision.py): a result is either that value to the stated tolerance or NaN (with the
op's error under check=True) where the arithmetic cannot resolve it (docs/design.md §2).
tests/fuzz_ops.py draws the same classes of inputs at random."""

import math

import mpmath as mp
import precision as hp
import pytest
import torch

import fastlaplace as fl

F64 = torch.float64


def close(x, y, rtol):
    return abs(float(x) - float(y)) <= rtol * (abs(float(y)) + 1)  # absolute near 0: L sums canceling logs


@pytest.mark.parametrize("g_scale", [1e-18, 1e-9])
@pytest.mark.parametrize("d_in", [2, 70])  # fused, composite (order 71 > 64)
def test_item1_factored_gradient_has_no_cancellation(g_scale, d_in):
    """Constant rows a and tiny g: the π-correction's derivative once subtracted two nearly
    equal traces and multiplied by π/(2 tr G) ≈ 1e52 (d/dg off by 10×)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.ones(1, 4, d_in, dtype=F64)
    g = torch.randn(1, 4, 2, dtype=F64, generator=gen) * g_scale
    wa, wg = torch.randn(a.shape, dtype=F64, generator=gen), torch.randn(g.shape, dtype=F64, generator=gen) * g_scale
    a_, g_ = a.clone().requires_grad_(), g.clone().requires_grad_()
    value = fl.kfac_logdet(a_, g_, 4.0, 1.0)
    ga, gg = torch.autograd.grad(value.sum(), (a_, g_))
    assert close(value[0].detach(), hp.kfac_logdet(a, g, 4.0, 1.0)[0], 1e-11)
    expected = hp.kfac_directional_derivative(a, g, torch.zeros_like(wa), wg, 4.0, 1.0)
    assert close((gg * wg).sum(), expected, 1e-9), (float((gg * wg).sum()), float(expected))
    expected = hp.kfac_directional_derivative(a, g, wa, torch.zeros_like(wg), 4.0, 1.0)
    assert close((ga * wa).sum(), expected, 1e-9), (float((ga * wa).sum()), float(expected))


def rank_deficient_rows(scale):
    """Rows whose third column is the sum of the first two, exactly (integers times 10^k)."""
    base = torch.tensor([[1.0, 2.0], [3.0, -1.0], [2.0, 2.0], [-1.0, 4.0], [5.0, 1.0], [0.0, 3.0]], dtype=F64)
    return (torch.cat([base, base.sum(1, keepdim=True)], 1) * scale)[None]


@pytest.mark.parametrize("method", ["factored", "exact"])
def test_item2_damping_below_rounding_is_nan_not_a_wrong_number(method):
    g = torch.tensor([[[0.5], [-1.0], [0.25], [1.5], [-0.5], [1.0]]], dtype=F64)
    fine = rank_deficient_rows(1.0)
    assert close(fl.kfac_logdet(fine, g, 6.0, 1.0, method)[0], hp.kfac_logdet(fine, g, 6.0, 1.0, method)[0], 1e-12)
    extreme = rank_deficient_rows(1e18)  # λ_A ≈ 1e-6 below the factor's rounding, ε·‖K_A‖ ≈ 1e21
    out = fl.kfac_logdet(extreme, g, 6.0, 1.0, method, check=False)
    expected = hp.kfac_logdet(extreme, g, 6.0, 1.0, method)[0]
    assert math.isnan(out[0]) or close(out[0], expected, 1e-9), (float(out[0]), float(expected))
    if math.isnan(out[0]):
        with pytest.raises(ValueError, match="rounding"):
            fl.kfac_logdet(extreme, g, 6.0, 1.0, method)
    # The same rank deficiency in a batch: the resolvable task keeps its exact value.
    batch = torch.cat([extreme, fine]), torch.cat([g, g])
    out = fl.kfac_logdet(*batch, 6.0, 1.0, method, check=False)
    assert close(out[1], hp.kfac_logdet(fine, g, 6.0, 1.0, method)[0], 1e-12)


@pytest.mark.parametrize("d", [64, 65])  # fused, composite
@pytest.mark.parametrize("method", ["factored", "exact"])
def test_item3_float32_composite_scalars_do_not_overflow(d, method):
    """scale 1e-80: λ = π√(τ/c) ≈ 1e40 overflowed float32 on the composite path."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(1, d, d + 2, generator=gen)
    A = (X @ X.mT / d + torch.eye(d)).float()
    G = torch.tensor([[[2.0, 0.5], [0.5, 1.0]]])
    out = fl.kron_logdet(A, G, 1e-80, 0.5, method)
    assert close(out[0], hp.kron_logdet(A, G, 1e-80, 0.5, method)[0], 1e-6)


@pytest.mark.parametrize("d", [64, 65])
@pytest.mark.parametrize("method", ["factored", "exact"])
def test_item4_nan_value_has_nan_gradients_on_every_path(d, method):
    A = -torch.eye(d, dtype=F64)[None].repeat(2, 1, 1)  # not PSD: log det(c·A⊗G + τI) of a
    A[1] = torch.eye(d, dtype=F64)  # negative matrix (mpmath: its det is negative for odd orders)
    G = torch.eye(3, dtype=F64)[None].repeat(2, 1, 1) * 4
    value, gA, gG = torch.ops.fastlaplace.kron_logdet_and_grad(A, G, 1.0, 0.5, method)
    assert math.isnan(value[0]) and torch.isnan(gA[0]).all() and torch.isnan(gG[0]).all()
    assert close(value[1], hp.kron_logdet(A[1:], G[1:], 1.0, 0.5, method)[0], 1e-12)
    assert torch.isfinite(gA[1]).all() and torch.isfinite(gG[1]).all()
    a = torch.randn(2, 80, d, dtype=F64)
    a[0, 3, 5] = math.nan
    g = torch.randn(2, 80, 3, dtype=F64)
    value, ga, gg = torch.ops.fastlaplace.kfac_logdet_and_grad(a, g, 80.0, 0.5, method, True)
    assert math.isnan(value[0]) and torch.isnan(ga[0]).all() and torch.isnan(gg[0]).all()


def test_item5_giant_stride0_views_are_refused_at_once():
    a = torch.ones(1, 1, 1).expand(1, 2**51, 1)
    for op in (lambda: fl.kron_factors(a, a), lambda: fl.kfac_logdet(a, a, 1.0, 1.0)):
        with pytest.raises(ValueError, match="exceed the work one call accepts"):
            op()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # torch.compile refuses it at trace time
        fake = torch.empty(1, 1, 1).expand(1, 2**51, 1)
        with pytest.raises(ValueError, match="exceed the work one call accepts"):
            torch.ops.fastlaplace.kron_factors(fake, fake, True)
    # Within the bound, a stride-0 view is fine: every row is x0, so A = x̄0ᵀx̄0 exactly.
    x0 = torch.tensor([[[0.3, -1.7]]], dtype=F64)
    A, G = fl.kron_factors(x0.expand(1, 2**20, 2), x0[..., :1].expand(1, 2**20, 1))
    with mp.workdps(hp.DPS):
        expected = [[mp.mpf(float(u)) * mp.mpf(float(v)) for v in (0.3, -1.7, 1.0)] for u in (0.3, -1.7, 1.0)]
    # 2^20 equal terms summed: rounding ~1e-12.
    assert torch.allclose(A[0], torch.tensor([[float(v) for v in row] for row in expected], dtype=F64), rtol=1e-10,
                          atol=0)
    assert abs(float(G[0, 0, 0]) - 0.09) < 1e-10


@pytest.mark.parametrize("method", ["factored", "exact"])
def test_item6_small_contribution_is_rounded_within_its_bound_or_nan(method):
    """Bias column, Gram path (R < d): a ~ 1e-18 adds ~|a|²/(R·λ) ≈ 1e-36 nats, far below the
    rounding of the value (ε·|L|): equal to the a = 0 result, and both equal to mpmath's value.
    When λ is as small as |a|² the contribution matters, and the value is NaN, not a's absence."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(1, 3, 5, dtype=F64, generator=gen) * 1e-18
    g = torch.randn(1, 3, 2, dtype=F64, generator=gen)
    expected = hp.kfac_logdet(a, g, 3.0, 0.5, method)[0]
    with mp.workdps(hp.DPS):
        contribution = expected - hp.kfac_logdet(torch.zeros_like(a), g, 3.0, 0.5, method)[0]
    assert abs(float(contribution)) < 1e-30
    out = fl.kfac_logdet(a, g, 3.0, 0.5, method)
    assert close(out[0], expected, 1e-14)
    tiny_tau = 1e-72
    out = fl.kfac_logdet(a, g, 3.0, tiny_tau, method, check=False)
    expected = hp.kfac_logdet(a, g, 3.0, tiny_tau, method)[0]
    assert math.isnan(out[0]) or close(out[0], expected, 1e-9), (float(out[0]), float(expected))
