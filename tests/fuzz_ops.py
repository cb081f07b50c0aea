"""Seeded property test of every op, run by tests/test_fuzz_ops.py in a child process so that
a hard crash (a segfault) is reported as a failing case instead of killing the test run.

    python tests/fuzz_ops.py --seed 0 --start 0 --cases 2000 [--emulate THREADS]

Each case draws an op (through its public wrapper, with the default checks), shapes,
dtype, strides, values and scalars; about a third of the cases carry one defect (a wrong
dtype, rank or size, a non-finite entry, a bad scalar, a matrix that is not positive
definite...). The property: a defect raises ValueError or TypeError; a valid case returns
results (and gradients) that agree with the float64 reference of fastlaplace.reference.
A few per cent of the cases are the extreme but well-defined inputs that once failed (constant
rows, exactly rank-deficient rows, extreme scale ratios, stride-0 giants, orders on both
sides of 64), judged against mpmath by an oracle that accepts NaN only where the value is not
defined at the inputs' precision (check_edge below). Run on the build before their fixes
(commit f3037e7), the 2000 cases of seed 0 caught all four of its items 1-4: 59 failures, of
which 7 derivatives off by up to 1e-2 relative (item 1, constant rows), 13 finite values off by
up to 173 nats (item 2), 4 inf/NaN values of float32 composite layers (item 3), 11 NaN values
with finite gradients above order 64 (item 4), and 24 stride-0 giants ending in an allocation
error (item 5); after the fixes, none. A case that does not
return within 60 s ends the child (a CRASH for the test). With --emulate the log-det ops run
through the emulator of their CUDA launch (tests/test_emulator.py runs a share of the cases
so). Prints ``CASE i`` before each case,
``FAIL i: ...`` for each violation and ``DONE n`` at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import signal
import sys

import precision as hp
import torch

import fastlaplace as fl
from fastlaplace import reference as ref

EXPECTED = (ValueError, TypeError)
ORDERS = [1, 2, 3, 5, 10, 31, 40, 56, 57, 60, 63, 64, 65, 70]
ROWS = [1, 2, 3, 5, 10, 33, 70, 130]


class Case:
    """One drawn call: ``run()`` calls the op, ``expect()`` the float64 reference."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.dtype = rng.choice([torch.float32, torch.float64])
        self.defect: str | None = None
        self.desc: list[str] = []

    # ------------------------------------------------------------------ drawing inputs
    def values(self, *shape: int) -> torch.Tensor:
        """Random values in one of several modes, float64 (cast by ``layout``)."""
        mode = self.rng.choice(["normal", "scaled", "constant", "low_rank", "zero_rows"])
        self.desc.append(mode)
        x = torch.randn(*shape, dtype=torch.float64)
        if mode == "scaled":
            x = x * 10 ** self.rng.uniform(-2, 1 if self.dtype == torch.float32 else 2)
        elif mode == "constant":
            x = torch.full(shape, self.rng.uniform(-2, 2), dtype=torch.float64)
        elif mode == "low_rank" and shape[-1] > 1 and shape[-2] > 1:
            k = self.rng.randint(1, min(shape[-2:]) - 1) if min(shape[-2:]) > 1 else 1
            x = torch.randn(*shape[:-1], k, dtype=torch.float64) @ torch.randn(*shape[:-2], k, shape[-1],
                                                                               dtype=torch.float64)
        elif mode == "zero_rows" and shape[-2] > 1:
            x[..., : shape[-2] // 2, :] = 0
        return x

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """The same values in the case's dtype, contiguous or as a strided view."""
        x = x.to(self.dtype)
        kind = self.rng.choice(["contiguous", "transposed", "sliced", "expanded"])
        self.desc.append(kind)
        if kind == "transposed":  # same values, transposed strides
            return x.mT.contiguous().mT
        if kind == "sliced":
            big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
            big[..., ::2] = x
            return big[..., ::2]
        if kind == "expanded" and x.shape[0] > 1:  # stride 0 over the tasks
            x.copy_(x[:1].expand_as(x))
            return x[:1].expand_as(x)
        return x

    def psd(self, B: int, d: int) -> torch.Tensor:
        X = self.values(B, d, self.rng.choice([1, d, d + 3]))
        return X @ X.mT / X.shape[-1]

    def tau(self) -> float:
        return 10 ** self.rng.uniform(-1, 1)


def draw(rng: random.Random) -> tuple[Case, callable, callable]:
    """A case, a function running the op, and a function running the float64 reference."""
    case = Case(rng)
    op = rng.choice(["kron_factors", "damped_cholesky", "kron_logdet", "kfac_logdet"])
    grad = rng.random() < 0.75
    defect = rng.choice([None] * 6 + ["dtype", "rank", "size", "nonfinite", "scalar", "method", "bias", "empty",
                                      "not_pd"])  # not_pd: also "no parameters" for kfac_logdet
    case.desc += [op, str(case.dtype).split(".")[1], f"grad={grad}"]
    B = rng.choice([1, 2, 3])
    kwargs: dict = {}
    if op in ("kron_factors", "kfac_logdet"):
        R, d_in, d_out = rng.choice(ROWS), rng.choice([0] + ORDERS), rng.choice(ORDERS)
        while R * (d_in + d_out) > 6000:
            R = rng.choice(ROWS[:5])
        bias = rng.random() < 0.7 or d_in == 0
        tensors = {"a": case.values(B, R, d_in), "g": case.values(B, R, d_out)}
        kwargs["bias"] = bias
        case.desc.append(f"B={B} R={R} d_in={d_in} d_out={d_out} bias={bias}")
        if op == "kfac_logdet":
            kwargs.update(scale=float(rng.choice([R, 1.0, 3.5])), tau=case.tau(),
                          method=rng.choice(["exact", "factored"]))
    elif op == "damped_cholesky":
        d = rng.choice(ORDERS + [96, 97, 100])
        tensors = {"M": case.psd(B, d)}
        kwargs["damping"] = 10 ** rng.uniform(-1 if case.dtype == torch.float32 else -3, 0)
        case.desc.append(f"B={B} d={d}")
    else:
        dA, dG = rng.choice(ORDERS), rng.choice(ORDERS)
        tensors = {"A": case.psd(B, dA), "G": case.psd(B, dG)}
        kwargs.update(scale=float(rng.choice([1.0, 10.0, 40.0])), tau=case.tau(),
                      method=rng.choice(["exact", "factored"]))
        case.desc.append(f"B={B} dA={dA} dG={dG}")
    case.desc += [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in kwargs.items()]

    name = rng.choice(sorted(tensors))
    rows_op = op in ("kron_factors", "kfac_logdet")
    t = tensors[name]
    if defect == "dtype":
        tensors[name] = t.to(rng.choice([torch.float16, torch.int64, torch.bool, torch.complex64]))
    elif defect == "rank":
        tensors[name] = t[0] if rng.random() < 0.5 else t[None]
    elif defect == "size":  # one more task or row (rows ops), or an oblong or extra matrix (square ops)
        dim = rng.choice([0, 1]) if rows_op else rng.choice([1, 2] if op == "damped_cholesky" else [0, 1, 2])
        tensors[name] = torch.cat([t, t.narrow(dim, 0, 1)], dim)
    elif defect == "empty":  # no task, no row, no output column, or 0×0 matrices
        if rows_op:
            dim = rng.choice([0, 1, 2] if name == "g" else [0, 1])
            tensors[name] = t.narrow(dim, 0, 0)
        else:
            tensors[name] = t.narrow(0, 0, 0) if rng.random() < 0.5 else t[:, :0, :0]
    elif defect == "nonfinite" and op != "kron_factors" and t.numel():
        t = t.clone()
        idx = (0, *(rng.randrange(s) for s in t.shape[1:]))  # task 0 survives an "expanded" layout
        t[idx] = rng.choice([math.nan, math.inf, -math.inf])
        if not rows_op:  # keep it symmetric
            t[idx[0], idx[2], idx[1]] = t[idx]
        tensors[name] = t
    elif defect == "scalar" and op != "kron_factors":
        if op == "damped_cholesky":
            kwargs["damping"] = rng.choice([math.nan, math.inf, -math.inf, -1e9])
        else:
            kwargs[rng.choice(["scale", "tau"])] = rng.choice([0.0, -1.0, math.nan, math.inf])
    elif defect == "method" and "method" in kwargs:
        kwargs["method"] = rng.choice(["EXACT", "", "cholesky"])
    elif defect == "bias" and "bias" in kwargs:
        kwargs["bias"] = rng.choice([2, 1.5, None, "yes"])
    elif defect == "not_pd" and op == "damped_cholesky":
        tensors[name] = -t - 2 * torch.eye(t.shape[-1], dtype=torch.float64)
    elif defect == "not_pd" and op == "kfac_logdet":  # here: a layer without parameters
        tensors["a"], kwargs["bias"] = tensors["a"][..., :0], False
    else:
        defect = None
    case.defect = defect
    case.desc.append(f"defect={defect}")

    inputs = {k: case.layout(v) if v.is_floating_point() and v.dtype == torch.float64 else v
              for k, v in tensors.items()}
    if grad and defect is None:
        inputs = {k: v.detach().requires_grad_() for k, v in inputs.items()}

    def run():
        out = getattr(fl, op)(*inputs.values(), **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        grads = None
        if grad and defect is None:
            weights = [torch.randn(o.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
                       for o in outs]
            loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
            grads = torch.autograd.grad(loss, list(inputs.values()))
        return outs, grads

    def expect(dtype=torch.float64):
        x = {k: v.detach().to(dtype).requires_grad_(grad) for k, v in inputs.items()}
        kw = dict(kwargs)
        if op == "kron_factors":
            out = ref.kron_factors(*x.values(), kw["bias"])
        elif op == "damped_cholesky":
            out = ref.damped_cholesky(*x.values(), kw["damping"])
        else:
            out = getattr(ref, op)(*x.values(), **kw)
        outs = out if isinstance(out, tuple) else (out,)
        grads = None
        if grad:
            weights = [torch.randn(o.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
                       for o in outs]
            loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
            grads = torch.autograd.grad(loss, list(x.values()))
        return outs, grads

    return case, run, expect


def agree(x: torch.Tensor, y: torch.Tensor, y32: torch.Tensor | None, dtype: torch.dtype, what: str) -> str | None:
    """None if x (the kernel's) agrees with y (the float64 reference), else a description.

    float64 is held to a relative 1e-7; float32 to 4× the error of the same reference
    computed in float32 (PyTorch's own float32 error on this input) plus a relative 1e-5."""
    if tuple(x.shape) != tuple(y.shape):
        return f"{what}: shape {tuple(x.shape)} vs reference {tuple(y.shape)}"
    if x.dtype != dtype:
        return f"{what}: dtype {x.dtype}, expected {dtype}"
    if not x.numel():
        return None
    x, y = x.detach().double(), y.detach().double()
    if not bool(torch.isfinite(x).all()):
        return f"{what}: non-finite result without an error"
    scale = float(y.abs().max()) + 1.0
    err = float((x - y).abs().max())
    if dtype == torch.float64:
        allowed = 1e-7 * scale
    else:
        ref_err = float((y32.detach().double() - y).abs().nan_to_num(float("inf")).max()) if y32 is not None else 0.0
        allowed = 4 * ref_err + 1e-5 * scale if math.isfinite(ref_err) else 2e-3 * scale
    if err > allowed:
        return f"{what}: max error {err:.3g} > allowed {allowed:.3g} (reference magnitude {scale:.3g})"
    return None


def check(i: int, rng: random.Random) -> str | None:
    case, run, expect = draw(rng)
    desc = " ".join(case.desc)
    try:
        outs, grads = run()
    except EXPECTED as exc:
        if case.defect is None:
            return f"{desc}: valid input raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return None
    except Exception as exc:
        return f"{desc}: raised {type(exc).__name__} (not ValueError/TypeError): {str(exc).splitlines()[0][:200]}"
    if case.defect is not None:
        return f"{desc}: a defective input returned without an error"
    ref_outs, ref_grads = expect()
    ref32_outs, ref32_grads = [None] * len(ref_outs), [None] * len(ref_grads or ())
    if case.dtype == torch.float32:
        with contextlib.suppress(Exception):  # a float32 reference that fails leaves the float64 one
            ref32_outs, ref32_grads = expect(torch.float32)
    for k, (x, y, y32) in enumerate(zip(outs, ref_outs, ref32_outs)):
        problem = agree(x, y, y32, case.dtype, f"output {k}")
        if problem:
            return f"{desc}: {problem}"
    for k, (x, y, y32) in enumerate(zip(grads or (), ref_grads or (), ref32_grads or [None] * 9)):
        problem = agree(x, y, y32, case.dtype, f"gradient {k}")
        if problem:
            return f"{desc}: {problem}"
    return None


# ---------------------------------------------------------------------------------------
# Edge cases: well-defined but extreme inputs, checked against mpmath (60 digits,
# tests/precision.py). An oracle that knows when a value is defined: each carrier's
# eigenvalues are moved down by δ = its rounding at the ops' working precision (4·n²·ε·(tr K
# + λ) in double, a bound on the rounding of forming and factoring it) plus the inputs' own
# precision (2·ε_dtype·tr K); the value's move κ is the most any perturbation of that size can
# move it. NaN (from the precision guard) is accepted only where κ exceeds the guard's
# tolerance, 1e-6·(|L| + d_A·d_G); a finite value must be within its rounding plus κ; where
# the value is NaN every gradient must be NaN.

EDGE_ORDERS = [1, 2, 3, 62, 63, 64, 65, 66]  # with ≤ 6 rows the large orders have small Gram carriers
EPS = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def edge_rows(rng: random.Random, kind: str, B: int, R: int, d_in: int, d_out: int) -> tuple[torch.Tensor, ...]:
    if kind == "constant":  # constant rows a, tiny g: the factored gradient's cancellation
        return (torch.full((B, R, d_in), rng.uniform(-2, 2), dtype=torch.float64),
                torch.randn(B, R, d_out, dtype=torch.float64) * 10 ** -rng.uniform(6, 18))
    if kind == "rank_deficient":  # exactly (integers), at a scale up to 1e18
        k = rng.randint(1, max(1, min(R, d_in) - 1))
        a = torch.randint(-3, 4, (B, R, k)).double() @ torch.randint(-3, 4, (B, k, d_in)).double()
        return a * 10.0 ** rng.randint(0, 18), torch.randn(B, R, d_out, dtype=torch.float64)
    e = rng.uniform(-18, 18)  # extreme scale ratios between the two sides
    return torch.randn(B, R, d_in, dtype=torch.float64) * 10**e, torch.randn(B, R, d_out, dtype=torch.float64) * 10**-e


def mp_oracle(KA, dA: int, KG, dG: int, scale: float, tau: float, method: str, eps_in: float,
              spectra: tuple | None = None) -> tuple[float, ...]:
    """(value, κ, magnitude of its rounding) of one task from mpmath carriers (or their spectra)."""
    a, g = spectra or (list(hp.mp.eigsy(KA, eigvals_only=True)), list(hp.mp.eigsy(KG, eigvals_only=True)))
    trA, trG = hp.trace(KA), hp.trace(KG)
    lam = [0.0, 0.0]
    if method == "factored" and trA > 0 and trG > 0:
        pi = hp.mp.sqrt((trA / dA) / (trG / dG))
        lam = [pi * hp.mp.sqrt(tau / scale), hp.mp.sqrt(tau / scale) / pi]
    deltas = [4 * K.rows**2 * 2.0**-53 * (tr + lk) + 2 * eps_in * tr
              for K, tr, lk in ((KA, trA, lam[0]), (KG, trG, lam[1]))]
    y = hp.logdet_from_spectra(a, trA, dA, g, trG, dG, scale, tau, method)
    kappa = hp.sensitivity(a, trA, dA, g, trG, dG, scale, tau, method, *deltas)
    size = hp.logdet_from_spectra(a, trA, dA, g, trG, dG, scale, tau, method, magnitude=True)
    return float(y), float(kappa), float(size)


def judge(x: float, y: float, kappa: float, move: float, size: float, terms: int, rel: float, what: str) -> str | None:
    """x (the op's) against y (mpmath's). κ: the move under rounding at the working precision
    plus the inputs' (where NaN is accepted); move: the largest move seen when the inputs
    alone are perturbed at their precision (what a finite value may be off by, 4× for margin)."""
    if math.isnan(x):
        return None if kappa > 1e-6 * (abs(y) + terms) or math.isnan(y) else \
            f"{what}: NaN where the value is defined ({y:.17g}, moves {kappa:.3g} at working precision)"
    tolerated = min(kappa, 1e-6 * (abs(y) + terms))  # the rounding the guard lets through
    if not math.isfinite(y) or abs(x - y) > rel * (abs(y) + size + 1) + 4 * move + tolerated:
        return f"{what}: {x:.17g}, expected {y:.17g} (moves {move:.3g} at input precision)"
    return None


def check_edge(rng: random.Random) -> str | None:
    kind = rng.choice(["constant", "constant", "rank_deficient", "rank_deficient", "scale_ratio", "composite_scale",
                       "composite_scale", "not_psd", "giant"])
    dtype = rng.choice([torch.float64, torch.float64, torch.float32])
    method = rng.choice(["exact", "factored", "factored"])
    desc = f"edge {kind} {str(dtype).split('.')[1]} {method}"
    if kind == "giant":  # stride-0 views far beyond one call's work bound: refused at once
        d = rng.choice([1, 2, 70])
        a = torch.ones(1, 1, d, dtype=dtype).expand(rng.choice([1, 3]), 2 ** rng.randint(34, 55), d)
        try:
            fl.kron_factors(a, a) if rng.random() < 0.5 else fl.kfac_logdet(a, a, 1.0, 1.0, method)
        except ValueError:
            return None
        except Exception as exc:  # an allocation failure, say
            return f"{desc} {tuple(a.shape)}: raised {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        return f"{desc} {tuple(a.shape)}: no error"
    if kind == "not_psd":  # NaN values and their gradients, on both sides of order 64
        d = rng.choice(EDGE_ORDERS[3:])
        X = torch.randn(2, d, d + 1, dtype=torch.float64)
        A = (X @ X.mT / d + torch.eye(d, dtype=torch.float64)).to(dtype)
        A[0] = -A[0]
        G = torch.eye(2, dtype=dtype).expand(2, 2, 2).contiguous()
        value, gA, gG = torch.ops.fastlaplace.kron_logdet_and_grad(A, G, 3.0, 0.5, method)
        if not (math.isnan(value[0]) and torch.isnan(gA[0]).all() and torch.isnan(gG[0]).all()):
            return f"{desc} d={d}: a NaN value came with finite gradients, or a finite value for a negative factor"
        ok = torch.isfinite(value[1]) and torch.isfinite(gA[1]).all()
        return None if ok else f"{desc} d={d}: the positive-definite task is not finite"
    if kind == "composite_scale":  # positive-definite factors, extreme scale, both sides of order 64
        d, dtype = rng.choice(EDGE_ORDERS[4:]), rng.choice([torch.float32, torch.float32, torch.float64])
        desc = f"edge {kind} {str(dtype).split('.')[1]} {method}"
        X = torch.randn(1, d, d + 2, dtype=torch.float64)
        A = (X @ X.mT / d + torch.eye(d, dtype=torch.float64)).to(dtype)
        G = torch.tensor([[[2.0, 0.5], [0.5, 1.0]]], dtype=dtype)
        scale, tau = rng.choice([1e-80, 1e-40, 1e40, 1e80]) * 10 ** rng.uniform(-8, 8), 10 ** rng.uniform(-1, 1)
        x = float(fl.kron_logdet(A, G, scale, tau, method, check=False)[0])
        # Positive definite and well conditioned: float64 spectra are exact enough (relative ε),
        # and mpmath takes the logarithms at scales float64 cannot hold.

        def spectra(M):
            return [hp.mp.mpf(float(w)) for w in torch.linalg.eigvalsh(M.double())]

        with hp.mp.workdps(30):
            KA, KG = hp.mp.matrix(A[0].double().tolist()), hp.mp.matrix(G[0].double().tolist())
            y, kappa, size = mp_oracle(KA, d, KG, 2, scale, tau, method, EPS[dtype], (spectra(A[0]), spectra(G[0])))
            moves = []  # the inputs themselves at their precision: symmetric relative perturbations of ε_dtype
            for _ in range(2):
                E = torch.randn_like(A[0].double())
                Ap = A[0].double() * (1 + EPS[dtype] * (E + E.mT) / 2)
                moves.append(abs(hp.logdet_from_spectra(spectra(Ap), hp.trace(hp.mp.matrix(Ap.tolist())), d,
                                                        spectra(G[0]), hp.trace(KG), 2, scale, tau, method) - y))
        return judge(x, float(y), kappa, float(max(moves)), size, 2 * d, 1e-6 if dtype == torch.float32 else 1e-12,
                     f"{desc} d={d} c={scale:.3g}")

    B, R = rng.choice([1, 2]), rng.randint(2, 6)
    d_in, d_out = rng.choice(EDGE_ORDERS), rng.choice(EDGE_ORDERS)
    bias = rng.random() < 0.5
    a, g = (t.to(dtype) for t in edge_rows(rng, kind, B, R, d_in, d_out))
    scale, tau = float(R) * rng.choice([1.0, 1e-6, 1e6]), 10 ** rng.uniform(-3, 1)
    desc += f" B={B} R={R} d_in={d_in} d_out={d_out} bias={bias} scale={scale:.3g} tau={tau:.3g}"
    grad = rng.random() < 0.75
    a_, g_ = a.clone().requires_grad_(grad), g.clone().requires_grad_(grad)
    value = fl.kfac_logdet(a_, g_, scale, tau, method, bias, check=False)
    if grad:
        ga, gg = torch.autograd.grad(value.sum(), (a_, g_))
    dA, dG = d_in + int(bias), d_out
    for b in range(B):
        with hp.mp.workdps(hp.DPS):
            (KA, _), (KG, _) = hp.carrier(a[b], bias), hp.carrier(g[b], False)
            y, kappa, size = mp_oracle(KA, dA, KG, dG, scale, tau, method, EPS[dtype])
            moves = []  # the rows themselves at their precision: relative perturbations of ε_dtype
            for _ in range(2):
                ap = a[b].double() * (1 + EPS[dtype] * torch.randn(a[b].shape, dtype=torch.float64))
                gp = g[b].double() * (1 + EPS[dtype] * torch.randn(g[b].shape, dtype=torch.float64))
                (KAp, _), (KGp, _) = hp.carrier(ap, bias), hp.carrier(gp, False)
                moves.append(float(abs(hp.logdet_from_carriers(KAp, dA, KGp, dG, scale, tau, method) - y)))
        x = float(value[b].detach())
        problem = judge(x, y, kappa, max(moves), size, dA * dG, 1e-5 if dtype == torch.float32 else 1e-12,
                        f"{desc} task {b}")
        if problem:
            return problem
        if not grad:
            continue
        if math.isnan(x):
            if not (torch.isnan(ga[b]).all() and torch.isnan(gg[b]).all()):
                return f"{desc} task {b}: NaN value with finite gradients"
            continue
        if kappa > 1e-9 * (abs(y) + dA * dG) or dtype == torch.float32:
            continue  # the gradient is checked where the value is well conditioned, in float64
        # Along a random direction of a, then of g (each scaled like its input), against mpmath;
        # allowed: relative 1e-6, plus 1e-9 of the sum of the components' magnitudes.
        for name, x, gx in (("a", a, ga), ("g", g, gg)):
            w = torch.randn_like(x[b : b + 1]) * x[b].abs().amax()
            wa, wg = (w, torch.zeros_like(g[b : b + 1])) if name == "a" else (torch.zeros_like(a[b : b + 1]), w)
            got = float((gx[b] * w[0]).sum())
            want = float(hp.kfac_directional_derivative(a[b : b + 1], g[b : b + 1], wa, wg, scale, tau, method, bias))
            if not abs(got - want) <= 1e-6 * abs(want) + 1e-9 * float((gx[b] * w[0]).abs().sum()):
                return f"{desc} task {b}: derivative along {name} {got:.17g}, expected {want:.17g}"
    return None


EDGE_SHARE = 0.1  # of the cases: each costs ~0.1 s of mpmath


def route_through_emulator(threads: int) -> torch.library.Library:
    """Serve the four log-det ops' CPU kernels by the emulator of their CUDA launch
    (torch.ops.fastlaplace_testing, csrc/testing/emulator.h) with blocks of ``threads``
    (0: the launcher's own choice), so that every case runs the device code under the GPU's
    thread mapping, races and bounds checked. Keep the returned library alive."""
    emu = torch.ops.fastlaplace_testing
    lib = torch.library.Library("fastlaplace", "IMPL")

    def kfac(a, g, scale, tau, method, bias, grads):
        return emu.emulate_kfac(a, g, scale, tau, method, bias, grads, threads, "auto", "none")

    def kron(A, G, scale, tau, method, grads):
        return emu.emulate_kron(A, G, scale, tau, method, grads, threads, "auto", "none")

    lib.impl("kfac_logdet", lambda a, g, s, t, m, b: kfac(a, g, s, t, m, b, False)[0], "CPU")
    lib.impl("kfac_logdet_and_grad", lambda a, g, s, t, m, b: kfac(a, g, s, t, m, b, True)[:3], "CPU")
    lib.impl("kron_logdet", lambda A, G, s, t, m: kron(A, G, s, t, m, False)[0], "CPU")
    lib.impl("kron_logdet_and_grad", lambda A, G, s, t, m: kron(A, G, s, t, m, True)[:3], "CPU")
    return lib


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--cases", type=int, default=2000)
    p.add_argument("--emulate", type=int, default=None, metavar="THREADS",
                   help="run the log-det ops through the emulated CUDA launch, blocks of THREADS (0: the launcher's)")
    args = p.parse_args()
    torch.set_num_threads(1)
    emulated = None if args.emulate is None else route_through_emulator(args.emulate)  # noqa: F841 (kept alive)
    for i in range(args.start, args.cases):
        print(f"CASE {i}", flush=True)
        rng = random.Random(args.seed * 1_000_003 + i)
        torch.manual_seed(args.seed * 1_000_003 + i)
        signal.alarm(60)  # a case that runs on (an op that never returns) ends the child: a CRASH
        problem = check_edge(rng) if rng.random() < EDGE_SHARE else check(i, rng)
        signal.alarm(0)
        if problem:
            print(f"FAIL {i}: {problem}", flush=True)
    print(f"DONE {args.cases}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
