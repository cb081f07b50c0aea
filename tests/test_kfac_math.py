"""fastlaplace.kfac_math against dense matrices: every formula checked on the d_A·d_G
Kronecker matrix itself (torch.kron, slogdet, eigvalsh, float64), never with the module's
own arithmetic."""

import math

import pytest
import torch
from helpers import dense_kfac_precision

from fastlaplace import kfac_math as km

F64 = torch.float64


def layer(tasks, R, d_in, d_out, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(tasks, R, d_in, dtype=F64, generator=g)
    gr = torch.randn(tasks, R, d_out, dtype=F64, generator=g)
    if bias:
        a = torch.cat([a, torch.ones(tasks, R, 1, dtype=F64)], -1)
    A = torch.einsum("tri,trj->tij", a, a) / R  # Σ_r ā_r ā_rᵀ / R
    G = torch.einsum("tri,trj->tij", gr, gr) / R
    return a, gr, A, G


def dense_exact(A, G, c, tau):
    """log det(c·A⊗G + τI) and the eigenvalues of c·A⊗G + τI, from the dense matrix."""
    H = [c * torch.kron(Ab, Gb) + tau * torch.eye(Ab.shape[0] * Gb.shape[0], dtype=F64) for Ab, Gb in zip(A, G)]
    return torch.stack([torch.linalg.slogdet(h).logabsdet for h in H]), [torch.linalg.eigvalsh(h) for h in H]


def dense_factored(A, G, c, tau):
    return dense_kfac_precision(A, G, c, tau, "factored")


# (tasks, rows, d_in, d_out): full-rank factors, and fewer rows than columns on either side.
SHAPES = [(2, 12, 3, 4), (2, 3, 6, 5), (3, 10, 1, 12), (1, 4, 9, 2), (2, 2, 5, 6)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_exact_logdet_and_precisions_equal_dense_kronecker(shape):
    _, _, A, G = layer(*shape)
    c, tau = float(shape[1]), 0.7
    want, spectra = dense_exact(A, G, c, tau)
    a, g = torch.linalg.eigvalsh(A), torch.linalg.eigvalsh(G)
    torch.testing.assert_close(km.exact_logdet(a, g, c, tau), want, rtol=1e-12, atol=1e-10)
    precisions = km.exact_precisions(a, g, c, tau)
    assert precisions.shape == (shape[0], G.shape[-1], A.shape[-1])
    for t, spectrum in enumerate(spectra):
        torch.testing.assert_close(precisions[t].flatten().sort().values, spectrum, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_exact_logdet_from_gram_carriers_equals_dense(shape):
    """With R < d the carriers are R×R Gram matrices; the missing pairs add log τ."""
    a_rows, g_rows, A, G = layer(*shape)
    c, tau = float(shape[1]), 0.3
    KA, KG = km.spectrum_carrier(a_rows[..., :-1], bias=True), km.spectrum_carrier(g_rows)
    R = shape[1]
    assert KA.shape[-1] == min(R, A.shape[-1]) and KG.shape[-1] == min(R, G.shape[-1])
    got = km.exact_logdet(torch.linalg.eigvalsh(KA), torch.linalg.eigvalsh(KG), c, tau, A.shape[-1], G.shape[-1])
    torch.testing.assert_close(got, dense_exact(A, G, c, tau)[0], rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_spectrum_carrier_has_the_factors_nonzero_spectrum(shape):
    a_rows, _, A, _ = layer(*shape)
    K = km.spectrum_carrier(a_rows[..., :-1], bias=True)
    assert km.uses_gram(shape[1], A.shape[-1]) == (K.shape[-1] < A.shape[-1])
    full, carried = torch.linalg.eigvalsh(A), torch.linalg.eigvalsh(K)
    n = K.shape[-1]
    torch.testing.assert_close(full[:, -n:], carried, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(full[:, :-n], torch.zeros_like(full[:, :-n]), rtol=0, atol=1e-12)
    torch.testing.assert_close(km.trace(K), km.trace(A))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("carriers", [False, True])
def test_factored_logdet_equals_dense_damped_kronecker(shape, carriers):
    a_rows, g_rows, A, G = layer(*shape)
    c, tau = float(shape[1]), 0.4
    dA, dG = A.shape[-1], G.shape[-1]
    KA, KG = (km.spectrum_carrier(a_rows[..., :-1], bias=True), km.spectrum_carrier(g_rows)) if carriers else (A, G)
    lam_A, lam_G = km.factored_damping(KA, KG, c, tau, dA, dG)
    eye = lambda n: torch.eye(n, dtype=F64)
    ldA = km.carrier_logdet(torch.logdet(KA + lam_A[:, None, None] * eye(KA.shape[-1])), KA.shape[-1], dA, lam_A)
    ldG = km.carrier_logdet(torch.logdet(KG + lam_G[:, None, None] * eye(KG.shape[-1])), KG.shape[-1], dG, lam_G)
    got = km.factored_logdet(ldA, dA, ldG, dG, c)
    torch.testing.assert_close(got, torch.logdet(dense_factored(A, G, c, tau)), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_factored_precision_dominates_exact(shape):
    """docs/design.md §2: the damped product minus c·A⊗G + τI is PSD, so factored ≥ exact."""
    _, _, A, G = layer(*shape)
    c, tau = float(shape[1]), 0.5
    D = A.shape[-1] * G.shape[-1]
    exact = torch.stack([c * torch.kron(Ab, Gb) + tau * torch.eye(D, dtype=F64) for Ab, Gb in zip(A, G)])
    gap = torch.linalg.eigvalsh(dense_factored(A, G, c, tau) - exact)
    assert bool((gap > -1e-10 * exact.abs().amax()).all())


def test_pi_correction_is_one_for_a_zero_factor():
    A = torch.zeros(2, 3, 3, dtype=F64)
    G = torch.eye(4, dtype=F64).expand(2, 4, 4)
    torch.testing.assert_close(km.pi_correction(A, G), torch.ones(2, dtype=F64))
    torch.testing.assert_close(km.pi_correction(G, A), torch.ones(2, dtype=F64))
    torch.testing.assert_close(km.pi_correction(3 * torch.eye(2, dtype=F64)[None], torch.eye(5, dtype=F64)[None]),
                               torch.tensor([math.sqrt(3.0)], dtype=F64))

