"""The fused ops' CUDA launch, emulated on the CPU (csrc/testing/emulator.h): the device code
of csrc/kfac_math.h run over the GPU's grid, every thread of a block in turn between
barriers, shared memory and the workspace NaN-filled, each access checked for races and
bounds. Every fused op, forward and backward, at the orders around the warp and block sizes
and odd row counts, for every block shape the launcher can choose, agrees with the CPU
kernels; a planted race and a planted out-of-bounds index are caught; each op is one launch
up to order 64, and FASTLAPLACE_CUDA_FUSED_MAX_ORDER moves the GPU's threshold."""

import pytest
import torch
from helpers import fuzz_failures

import fastlaplace  # noqa: F401  (loads the compiled ops)

F64 = torch.float64
ORDERS = [1, 2, 3, 31, 32, 33, 63, 64]
SHAPES = [32, 64, 128]  # fused.h block_threads: every block shape the launcher chooses
emu = torch.ops.fastlaplace_testing
ops = torch.ops.fastlaplace


def layer(n, kind, dtype=F64, B=2):
    """Rows a, g of a layer whose larger carrier has order n: a Gram carrier (fewer rows than
    columns; n rows), the same with a G of order 6 (so that the exact method decomposes both),
    or a factor (n columns with the bias; odd row counts)."""
    g = torch.Generator().manual_seed(n)
    if kind in ("gram", "eigen"):
        R, d_in, d_out = n, n + 4, 3 if kind == "gram" else 6
    else:
        R, d_in, d_out = 2 * n + 1, n - 1, 2
    a = torch.randn(B, R, d_in, generator=g, dtype=F64).to(dtype)
    gg = torch.randn(B, R, d_out, generator=g, dtype=F64).to(dtype)
    return a, gg


def factors(n, B=2):
    g = torch.Generator().manual_seed(100 + n)
    X, Y = torch.randn(B, n, n + 2, generator=g, dtype=F64), torch.randn(B, 3, 5, generator=g, dtype=F64)
    return X @ X.mT / (n + 2), Y @ Y.mT / 5


def close(got, want, dtype):
    tol = 1e-9 if dtype == F64 else 1e-4
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


def check(op, args, grads, threads, placement, dtype):
    """The op through the emulated launch (one launch) equals the CPU kernel; its stats."""
    value, grad_x, grad_y, stats = getattr(emu, f"emulate_{op}")(*args, grads, threads, placement, "none")
    assert stats[0] == 1, "one launch"
    want = getattr(ops, f"{op}_logdet_and_grad")(*args)
    for got, expected in zip((value, grad_x, grad_y) if grads else (value,), want):
        close(got, expected, dtype)
    return stats


def check_kfac(n, kind, method, grads, threads, placement="auto", dtype=F64):
    a, g = layer(n, kind, dtype)
    return check("kfac", (a, g, float(a.shape[1]), 0.1, method, True), grads, threads, placement, dtype)


def check_kron(n, method, grads, threads, placement="auto"):
    return check("kron", (*factors(n), 5.0, 0.1, method), grads, threads, placement, F64)


@pytest.mark.parametrize("n", ORDERS)
@pytest.mark.parametrize("method", ["factored", "exact"])
def test_every_fused_op_through_the_emulated_launch(n, method):
    """Both kfac carriers (Gram, factor) and kron, value alone and with gradients, at the
    launcher's own block shape with the matrices where it puts them, and in global memory."""
    kinds = ("gram", "factor", "eigen") if n <= 32 else ("gram", "factor")  # fused.h: max_order_eigen
    for grads in (False, True):
        check_kron(n, method, grads, 0)
        for kind in kinds:
            check_kfac(n, kind, method, grads, 0)
    check_kfac(n, "gram", method, True, 0, placement="global")


@pytest.mark.parametrize("threads", SHAPES)
@pytest.mark.parametrize("n", [1, 3, 33])
def test_every_block_shape(threads, n):
    """Each block shape at orders below, at and above its thread count, float32 too."""
    for method in ("factored", "exact"):
        check_kron(n, method, True, threads)
        if n <= 32:
            check_kfac(n, "eigen", method, True, threads)
        check_kfac(n, "factor", method, True, threads, placement="shared", dtype=torch.float32)
        check_kfac(n, "gram", method, True, threads, placement="global")


@pytest.mark.parametrize("barrier", [0, 2, 3, 7, 20])
def test_planted_race_is_caught(barrier):
    """Skipping one barrier of the real device code (each one a different phase boundary)."""
    a, g = layer(33, "gram")
    with pytest.raises(RuntimeError, match="data race"):
        emu.emulate_kfac(a, g, 33.0, 0.1, "exact", True, True, 0, "auto", f"race:{barrier}")


def test_planted_out_of_bounds_index_is_caught():
    """Every tensor's span one element short: the last element read is outside it."""
    a, g = layer(5, "factor")
    with pytest.raises(RuntimeError, match="out of bounds"):
        emu.emulate_kfac(a, g, 11.0, 0.1, "factored", True, True, 0, "auto", "bounds")


def test_one_launch_per_op_and_the_gpu_threshold(monkeypatch):
    """Orders <= 64 are one launch (the CUDA launcher's thresholds); 0 sends every op to the
    composite path (no launch), with the same values; a bad value is refused."""
    a, g = layer(64, "gram")
    A, G = factors(64)
    fused = [emu.emulate_kfac(a, g, 64.0, 0.1, "factored", True, True, 0, "auto", "none"),
             emu.emulate_kron(A, G, 5.0, 0.1, "exact", True, 0, "auto", "none")]
    assert [int(out[3][0]) for out in fused] == [1, 1]
    # The exact method decomposing both carriers is fused up to order 32 only.
    for n, launches in ((32, 1), (33, 0)):
        e = layer(n, "eigen")
        assert emu.emulate_kfac(*e, float(n), 0.1, "exact", True, True, 0, "auto", "none")[3][0] == launches
    monkeypatch.setenv("FASTLAPLACE_CUDA_FUSED_MAX_ORDER", "0")
    composite = [emu.emulate_kfac(a, g, 64.0, 0.1, "factored", True, True, 0, "auto", "none"),
                 emu.emulate_kron(A, G, 5.0, 0.1, "exact", True, 0, "auto", "none")]
    assert [int(out[3][0]) for out in composite] == [0, 0]
    for f, c in zip(fused, composite):
        for x, y in zip(f[:3], c[:3]):
            close(x, y, F64)
    monkeypatch.setenv("FASTLAPLACE_CUDA_FUSED_MAX_ORDER", "65")
    with pytest.raises(ValueError, match="FASTLAPLACE_CUDA_FUSED_MAX_ORDER"):
        emu.emulate_kron(A, G, 5.0, 0.1, "exact", True, 0, "auto", "none")


def test_shared_memory_within_the_limit_at_the_largest_order():
    """At order 64 each op's block fits the H200's 227 KiB of shared memory per block: the
    matrices in shared memory where they fit, in the workspace otherwise."""
    a, g = layer(64, "gram")
    A, G = factors(64)
    for method in ("factored", "exact"):
        for stats in (emu.emulate_kfac(a, g, 64.0, 0.1, method, True, True, 0, "auto", "none")[3],
                      emu.emulate_kron(A, G, 5.0, 0.1, method, True, 0, "auto", "none")[3]):
            assert stats[2] <= 227 * 1024
    # The factored kfac op, the LLAMA hot path, keeps its matrices in shared memory at 64.
    assert emu.emulate_kfac(a, g, 64.0, 0.1, "factored", True, True, 0, "auto", "none")[3][4] == 1


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 31, 32, 33, 56, 57, 63, 64, 65])
@pytest.mark.parametrize("threads", [0, 32, 128])  # 0: the CPU's QL; else a block's Jacobi
def test_small_matrix_eigensolvers_are_orthonormal(n, threads):
    """The fused kernels' eigensolvers on the matrices that once broke one: constant (one
    eigenvalue, n - 1 zeros), low rank, random and zero."""
    if threads and n > 33 and threads != 128:
        pytest.skip("the emulated Jacobi at the largest orders: one block shape suffices")
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, 3, dtype=F64, generator=g)
    Y = torch.randn(n, n, dtype=F64, generator=g)
    for M in (torch.full((n, n), 0.7, dtype=F64), X @ X.T, Y + Y.T, torch.zeros(n, n, dtype=F64)):
        w, V = emu.dense_eigh(M, threads)
        scale = max(1.0, float(M.abs().amax())) * n if n else 1.0
        assert torch.allclose(V.T @ V, torch.eye(n, dtype=F64), atol=1e-12), "eigenvectors not orthonormal"
        assert torch.allclose(V @ torch.diag(w) @ V.T, M, atol=1e-12 * scale), "V diag(w) Vᵀ != M"


@pytest.mark.parametrize("threads", [0, 32])
def test_property_fuzz_through_the_emulator(threads):
    """tests/fuzz_ops.py's drawn cases (defects, extreme values, strides, both dtypes) with the
    log-det ops on the emulated launch: the launcher's block shapes, and one warp throughout."""
    cases = 300
    failures = fuzz_failures(cases, "--emulate", str(threads), "--seed", str(7 + threads))
    assert not failures, f"{len(failures)} of {cases} cases failed:\n" + "\n".join(failures[:25])
