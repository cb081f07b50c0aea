"""High-precision (mpmath) values of the log-det ops, for tests/test_ops_precision.py and
the oracle of tests/fuzz_ops.py. Test-only: mpmath comes with torch (through sympy) and is in the test extra."""

from __future__ import annotations

import mpmath as mp
import torch

DPS = 60


def _matrix(x: torch.Tensor) -> mp.matrix:
    return mp.matrix([[mp.mpf(float(v)) for v in row] for row in x.double().tolist()])


def carrier(x: torch.Tensor, bias: bool) -> tuple[mp.matrix, int]:
    """The exact carrier of x̄ᵀx̄/R (one task's rows x [R, d]) and the factor's order d."""
    return carrier_of_rows([[mp.mpf(v) for v in row] for row in x.double().tolist()], bias)


def carrier_of_rows(rows: list, bias: bool) -> tuple[mp.matrix, int]:
    """K = x̄x̄ᵀ/R (R < d) or x̄ᵀx̄/R of rows given as lists of mpf, and d."""
    X = mp.matrix([[*r, mp.mpf(1)] if bias else list(r) for r in rows])
    R, d = X.rows, X.cols
    return (X * X.T if d > R else X.T * X) / R, d


def trace(K: mp.matrix):
    return mp.fsum(K[i, i] for i in range(K.rows))


def logdet_from_spectra(a: list, trA, dA: int, g: list, trG, dG: int, scale: float, tau: float, method: str,
                        magnitude: bool = False):
    """log det(c·A⊗G + τI) from the carriers' eigenvalues a, g (n ≤ d of them) and traces, exactly
    or by the factored damping (π from the traces); NaN where a logarithm's argument is ≤ 0.
    magnitude: the same sum of the logarithms' absolute values (the scale of its rounding)."""
    c, t = mp.mpf(scale), mp.mpf(tau)

    def log(x):
        return (abs(mp.log(x)) if magnitude else mp.log(x)) if x > 0 else mp.nan

    if method == "exact":
        return mp.fsum(log(c * ai * gj + t) for ai in a for gj in g) + (dA * dG - len(a) * len(g)) * log(t)
    pi = mp.sqrt((trA / dA) / (trG / dG)) if trA > 0 and trG > 0 else mp.mpf(1)
    lamA, lamG = pi * mp.sqrt(t / c), mp.sqrt(t / c) / pi

    def damped(w, lam, d):
        return mp.fsum(log(x + lam) for x in w) + (d - len(w)) * log(lam)

    return dG * damped(a, lamA, dA) + dA * damped(g, lamG, dG) + dA * dG * log(c)


def logdet_from_carriers(KA: mp.matrix, dA: int, KG: mp.matrix, dG: int, scale: float, tau: float, method: str):
    """log det(c·A⊗G + τI) from the carriers K (order n ≤ d)."""
    a, g = mp.eigsy(KA, eigvals_only=True), mp.eigsy(KG, eigvals_only=True)
    return logdet_from_spectra(list(a), trace(KA), dA, list(g), trace(KG), dG, scale, tau, method)


def sensitivity(a: list, trA, dA: int, g: list, trG, dG: int, scale: float, tau: float, method: str, deltaA, deltaG):
    """How far the value moves when every eigenvalue a of K_A moves down by δ_A and g of K_G by δ_G
    (the most a perturbation of norm δ moves it, by Weyl's inequality and monotonicity; π fixed):
    the oracle's measure of whether a value is defined at a precision. inf where a shifted
    argument is ≤ 0."""
    base = logdet_from_spectra(a, trA, dA, g, trG, dG, scale, tau, method)
    moved = logdet_from_spectra([x - deltaA for x in a], trA, dA, [x - deltaG for x in g], trG, dG, scale, tau,
                                method)
    return mp.inf if mp.isnan(moved) or mp.isnan(base) else abs(moved - base)


def kfac_logdet(a: torch.Tensor, g: torch.Tensor, scale: float, tau: float, method: str = "factored",
                bias: bool = True) -> list:
    """Per task, as mpf."""
    with mp.workdps(DPS):
        out = []
        for ab, gb in zip(a, g):
            (KA, dA), (KG, dG) = carrier(ab, bias), carrier(gb, False)
            out.append(logdet_from_carriers(KA, dA, KG, dG, scale, tau, method))
        return out


def kron_logdet(A: torch.Tensor, G: torch.Tensor, scale: float, tau: float, method: str = "factored") -> list:
    with mp.workdps(DPS):
        return [logdet_from_carriers(_matrix(Ab), Ab.shape[0], _matrix(Gb), Gb.shape[0], scale, tau, method)
                for Ab, Gb in zip(A, G)]


def kfac_directional_derivative(a: torch.Tensor, g: torch.Tensor, wa: torch.Tensor, wg: torch.Tensor, scale: float,
                                tau: float, method: str = "factored", bias: bool = True):
    """d/dt of Σ_tasks kfac_logdet(a + t·wa, g + t·wg) at t = 0, by mpmath's differentiation."""
    B, R = a.shape[0], a.shape[1]
    A0, G0, WA, WG = (x.double().reshape(B * R, -1).tolist() for x in (a, g, wa, wg))

    def value(t):
        total = mp.mpf(0)
        for b in range(B):
            rows = slice(b * R, (b + 1) * R)
            xa = [[mp.mpf(x) + t * w for x, w in zip(A0[r], WA[r])] for r in range(rows.start, rows.stop)]
            xg = [[mp.mpf(x) + t * w for x, w in zip(G0[r], WG[r])] for r in range(rows.start, rows.stop)]
            KA, dA = carrier_of_rows(xa, bias)
            KG, dG = carrier_of_rows(xg, False)
            total += logdet_from_carriers(KA, dA, KG, dG, scale, tau, method)
        return total

    with mp.workdps(DPS):
        return mp.diff(value, 0)

