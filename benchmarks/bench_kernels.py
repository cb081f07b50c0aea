"""fastlaplace's kernels against plain PyTorch, side by side in one run: the clarity reference
(fastlaplace.reference) and the best plain-PyTorch code a user would write
(fastlaplace.reference.plain_kfac_logdet: Gram trick, cholesky_ex, eigenvalues of the small side).

    python benchmarks/bench_kernels.py [--device cuda] [--quick]
    python benchmarks/bench_kernels.py --gpu-model   # H200 estimate from the emulator's counts

Shapes: the sinusoid MLP's three layers for 25 tasks of 10 examples; Conv4 on 84×84
miniImageNet 5-way 1-shot for 4 tasks (KFC rows = examples × locations); a sweep over
d and the number of tasks. Both log-det methods, forward alone and forward + backward.
Prints a table and writes it to benchmarks/RESULTS.md. Speed-ups are ratios of medians
measured in the same process, quoted against the best plain PyTorch.
"""

from __future__ import annotations

import argparse
import os

import torch
from _common import fmt_time, markdown_table, timeit, write_block

import fastlaplace.ops as ops
import fastlaplace.reference as ref

SINUSOID = [("sinusoid L1", 25, 10, 1, 40), ("sinusoid L2", 25, 10, 40, 40), ("sinusoid L3", 25, 10, 40, 1)]
CONV4 = [("conv4 L1", 4, 5 * 84 * 84, 27, 64), ("conv4 L2", 4, 5 * 42 * 42, 576, 64),
         ("conv4 L3", 4, 5 * 21 * 21, 576, 64), ("conv4 L4", 4, 5 * 10 * 10, 576, 64), ("conv4 head", 4, 5, 1600, 5)]


def layer_inputs(B, R, d_in, d_out, device, dtype, grad=False):
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(B, R, d_in, generator=g, dtype=dtype).to(device).requires_grad_(grad)
    gg = torch.randn(B, R, d_out, generator=g, dtype=dtype).to(device).requires_grad_(grad)
    return a, gg


def bench_logdet(name, B, R, d_in, d_out, method, device, dtype, backward, min_run_time):
    a, g = layer_inputs(B, R, d_in, d_out, device, dtype, grad=backward)

    def ours():
        out = ops.kfac_logdet(a, g, float(R), 1e-3, method, check=False)
        if backward:
            out.sum().backward()

    def plain(fn):
        def run():
            out = fn(a, g, float(R), 1e-3, method)
            if backward:
                out.sum().backward()
        return run

    t_ours, t_ref = timeit(ours, min_run_time), timeit(plain(ref.kfac_logdet), min_run_time)
    t_best = timeit(plain(ref.plain_kfac_logdet), min_run_time)
    return [name, f"{B}×{R}×({d_in}+1)→{d_out}", method, "fwd+bwd" if backward else "fwd", fmt_time(t_ref),
            fmt_time(t_best), fmt_time(t_ours), f"{t_best / t_ours:.1f}×"], (t_ref, t_best, t_ours)


# The GPU model (docs/design.md §7): a fused op is one launch, one block per task, all tasks in
# one wave (25 ≤ 132 SMs), so its time is the launch plus the slowest task's critical path:
# per phase the busiest thread's memory references, and a barrier between phases. The
# counts come from the emulator of the launch (per task, measured on the CPU); the constants
# are an H200's, stated here so the estimate can be checked against the first measurement.
H200 = {"launch_s": 5e-6,  # one kernel launch, host to completion of an empty kernel
        "barrier_s": 0.1e-6,  # __syncthreads of a 2-4 warp block with shared loads in flight
        "ref_s": 2 / 1.98e9,  # a shared/L1 reference and its arithmetic on the critical path: ~2 cycles
        "linalg_s": 25e-6}  # a batched cuSOLVER call of small matrices (several kernels each)
VIEWS = {"view", "reshape", "_reshape_alias", "as_strided", "expand", "transpose", "permute", "select", "slice",
         "unsqueeze", "squeeze", "t", "mT", "detach", "alias", "empty", "empty_strided", "empty_like", "diagonal",
         "lift_fresh", "unbind", "split", "narrow", "_unsafe_view", "resolve_conj", "resolve_neg", "result_type"}
LINALG = ("linalg", "cholesky", "eigh", "_linalg", "triangular")


def kernel_launches(fn) -> tuple[int, int]:
    """(kernels, of which batched linear-algebra calls) that fn would launch on CUDA, from a CPU
    profile: each linear-algebra op once (whatever it calls inside), and each other leaf ATen
    op except views and allocations (each is at least one kernel)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()

    def inside_linalg(e):
        p = e.cpu_parent
        while p is not None:
            if any(k in p.name for k in LINALG):
                return True
            p = p.cpu_parent
        return False

    kernels = linalg = 0
    for e in prof.events():
        name = e.name.removeprefix("aten::")
        if not e.name.startswith("aten::") or name in VIEWS or inside_linalg(e):
            continue
        if any(k in name for k in LINALG):
            linalg += 1
        elif not any(c.name.startswith("aten::") for c in e.cpu_children):
            kernels += 1
    return kernels + linalg, linalg


def fused_estimate(stats: list[float]) -> float:
    """H200 seconds of a fused op from the emulator's counts (the op, then autograd's scaling
    of the two saved gradients by the upstream one)."""
    launches, phases, critical = stats[0], stats[5], stats[8]
    return (launches + 2) * H200["launch_s"] + phases * H200["barrier_s"] + critical * H200["ref_s"]


def launch_bound_estimate(fn) -> tuple[float, int, int]:
    kernels, linalg = kernel_launches(fn)
    return (kernels - linalg) * H200["launch_s"] + linalg * H200["linalg_s"], kernels, linalg


def threshold_rows(orders=(8, 16, 32, 48, 64)) -> list[list[str]]:
    """At the orders the GPU's thresholds send to the fused path: the fused op's estimate next
    to the composite path's (the same op with FASTLAPLACE_CUDA_FUSED_MAX_ORDER=0), a layer of n
    rows with a Gram carrier of order n, forward + backward."""
    emu = torch.ops.fastlaplace_testing
    rows = []
    for method, d_out in (("factored", 20), ("exact", 3), ("exact", 20)):
        for n in orders:
            a, g = layer_inputs(4, n, n + 7, d_out, "cpu", torch.float64)
            args = (a, g, float(n), 1e-3, method, True, True, 0, "auto", "none")
            stats = emu.emulate_kfac(*args)[3].tolist()
            if not stats[0]:
                continue  # the thresholds send it to the composite path
            ours = fused_estimate(stats)
            before = os.environ.get("FASTLAPLACE_CUDA_FUSED_MAX_ORDER")
            os.environ["FASTLAPLACE_CUDA_FUSED_MAX_ORDER"] = "0"
            try:
                composite, kernels, linalg = launch_bound_estimate(lambda: emu.emulate_kfac(*args))
            finally:
                os.environ.pop("FASTLAPLACE_CUDA_FUSED_MAX_ORDER")
                if before is not None:
                    os.environ["FASTLAPLACE_CUDA_FUSED_MAX_ORDER"] = before
            rows.append([f"4×{n}×({n + 7}+1)→{d_out}", method, f"{kernels} ({linalg} linalg)", fmt_time(composite),
                         fmt_time(ours), f"{composite / ours:.1f}×"])
    return rows


THRESHOLD_HEADER = ["layer", "method", "composite kernels", "composite (H200 est.)", "fused (H200 est.)",
                    "fused speed-up"]


def gpu_model_rows(layers, methods=("factored", "exact")) -> list[list[str]]:
    """Per sinusoid layer and method (forward + backward): the emulator's per-task counts, the
    H200 estimate of the fused op, and that of the best plain PyTorch from its kernel count."""
    emu = torch.ops.fastlaplace_testing
    rows = []
    for method in methods:
        total_ours = total_plain = 0.0
        for name, B, R, d_in, d_out in layers:
            a, g = layer_inputs(B, R, d_in, d_out, "cpu", torch.float64)
            st = emu.emulate_kfac(a, g, float(R), 1e-3, method, True, True, 0, "auto", "none")[3].tolist()
            threads, phases, shared, glob, critical = st[1], st[5], st[6], st[7], st[8]
            ours = fused_estimate(st)
            a.requires_grad_(True)
            g.requires_grad_(True)
            plain, kernels, linalg = launch_bound_estimate(
                lambda: ref.plain_kfac_logdet(a, g, float(R), 1e-3, method).sum().backward())
            total_ours += ours
            total_plain += plain
            rows.append([name, method, f"{int(threads)}", f"{phases:.0f}", f"{shared + glob:.0f}", f"{critical:.0f}",
                         f"{kernels} ({linalg} linalg)", fmt_time(plain), fmt_time(ours), f"{plain / ours:.1f}×"])
        rows.append(["**all layers**", method, "", "", "", "", "", f"**{fmt_time(total_plain)}**",
                     f"**{fmt_time(total_ours)}**", f"**{total_plain / total_ours:.1f}×**"])
    return rows


GPU_MODEL_HEADER = ["layer", "method", "threads", "phases/task", "refs/task", "critical refs", "plain kernels",
                    "plain (H200 est.)", "fastlaplace (H200 est.)", "speed-up"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--quick", action="store_true", help="shorter timings, fewer sweep points")
    p.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    p.add_argument("--sinusoid-only", action="store_true", help="only the sinusoid layers (no Conv4, no sweep)")
    p.add_argument("--gpu-model", action="store_true",
                   help="only the GPU model: H200 estimates from the emulator's counts (CPU, float64)")
    args = p.parse_args()
    if args.gpu_model:
        rows, thresholds = gpu_model_rows(SINUSOID), threshold_rows()
        for row in rows + thresholds:
            print(" | ".join(row), flush=True)
        if not args.no_write:
            write_block("bench_kernels_gpu_model",
                        "An estimate from counts made on the CPU (docs/design.md §7: the emulator's phases and "
                        "critical-path references for the fused ops, profiled kernel counts for PyTorch), not a "
                        f"measurement. Constants: {H200}.\n\nSinusoid MLP (25 tasks × 10 examples), forward + "
                        "backward:\n\n" + markdown_table(GPU_MODEL_HEADER, rows)
                        + "\n\nFused against composite at the orders the GPU's thresholds send to the fused "
                        "path:\n\n" + markdown_table(THRESHOLD_HEADER, thresholds), "cpu")
        return
    dtype = getattr(torch, args.dtype)
    mrt = 0.1 if args.quick else 0.4
    header = ["layer", "tasks×rows×d_A→d_G", "method", "pass", "reference", "best plain", "fastlaplace",
              "speed-up vs best"]
    sections = []

    # Whole-model totals are the sums over layers of both sides' medians.
    models = [("Sinusoid MLP (25 tasks × 10 examples)", SINUSOID)]
    if not args.sinusoid_only:
        models.append(("Conv4, 84×84 miniImageNet 5-way 1-shot (4 tasks)", CONV4))
    for title, layers in models:
        rows = []
        for method in ("factored", "exact"):
            for backward in (False, True):
                tot_ref = tot_best = tot_ours = 0.0
                for name, B, R, d_in, d_out in layers:
                    row, (t_ref, t_best, t_ours) = bench_logdet(name, B, R, d_in, d_out, method, args.device, dtype,
                                                                backward, mrt)
                    rows.append(row)
                    tot_ref += t_ref
                    tot_best += t_best
                    tot_ours += t_ours
                    print(" | ".join(row), flush=True)
                rows.append(["**all layers**", "", method, "fwd+bwd" if backward else "fwd", f"**{fmt_time(tot_ref)}**",
                             f"**{fmt_time(tot_best)}**", f"**{fmt_time(tot_ours)}**",
                             f"**{tot_best / tot_ours:.1f}×**"])
                print(" | ".join(rows[-1]), flush=True)
        sections.append(f"### kfac_logdet: {title}\n\n" + markdown_table(header, rows))

    # Sweep: the primitives on their own.
    ds = [] if args.sinusoid_only else [2, 41, 64, 577, 1601]
    Bs = [1, 4, 25] if args.quick else [1, 4, 25, 100]
    rows = []
    for d in ds:
        for B in Bs:
            if d * d * d * B > 2e10 and args.device == "cpu":
                continue  # minutes of LAPACK on 2 cores; says nothing new
            X = torch.randn(B, d, d + 8, dtype=dtype, device=args.device)
            M = X @ X.mT / (d + 8)
            damping = torch.full((B,), 0.1, dtype=dtype, device=args.device)
            t_ours = timeit(lambda: ops.damped_cholesky(M, damping, check=False), mrt)
            t_ref = timeit(lambda: ref.damped_cholesky(M, damping), mrt)
            a = torch.randn(B, 10, d - 1 if d > 1 else 1, dtype=dtype, device=args.device)
            g = torch.randn(B, 10, min(d, 64), dtype=dtype, device=args.device)
            f_ours = timeit(lambda: ops.kron_factors(a, g), mrt)
            f_ref = timeit(lambda: ref.kron_factors(a, g), mrt)
            row = [str(d), str(B), fmt_time(t_ref), fmt_time(t_ours), f"{t_ref / t_ours:.1f}×", fmt_time(f_ref),
                   fmt_time(f_ours), f"{f_ref / f_ours:.1f}×"]
            rows.append(row)
            print(" | ".join(row), flush=True)
    if rows:
        sections.append("### Primitives: damped_cholesky (d×d) and kron_factors (10 rows, d_A = d, "
                        "d_G = min(d, 64))\n\n"
                        + markdown_table(["d", "tasks", "cholesky ref", "cholesky ours", "speed-up", "factors ref",
                                          "factors ours", "speed-up"], rows))
    body = f"dtype {args.dtype}, τ = 1e-3, c = rows.\n\n" + "\n\n".join(sections)
    if not args.no_write:
        write_block("bench_kernels", body, args.device)


if __name__ == "__main__":
    main()
