"""Does this build of fastlaplace work here?  ``python -m fastlaplace.doctor``

    python -m fastlaplace.doctor [--device cpu|cuda|cuda:N ...] [--checks-only] [--json PATH]

Prints how the kernels were built and the devices, then checks every op on every device
against the float64 CPU reference (:mod:`fastlaplace.reference`) at shapes that take each
path (fused for orders ≤ 64, composite above; factored and exact; float32 and float64;
values and gradients); on CUDA, that no op and no LLAMA meta-iteration synchronises with the
host. Then it times one sinusoid meta-iteration of MAML and LLAMA (on CUDA also as the CUDA
graph of ``--cuda-graph``), and the log-det of the sinusoid network's layers next to the best
plain-PyTorch version. One table, one verdict
line; the exit status is 1 when anything disagrees. ``--json PATH`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from . import __version__, cli, ops
from . import reference as ref
from .data import SinusoidTasks
from .graphs import GraphStep
from .meta import LLAMA, MAML
from .models import sinusoid_mlp

# Normwise relative error allowed against the float64 reference: float64 kernels agree to
# rounding; float32 ones to a small multiple of float32's own error on these conditionings.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3}
DTYPES = {torch.float32: "float32", torch.float64: "float64"}


@dataclass
class Row:
    device: str
    check: str
    dtype: str
    ok: bool | None  # None: a figure, not a check
    detail: str
    error: float | None = None
    seconds: float | None = None


@dataclass
class Case:
    """One op at one shape: ``ours(*inputs)`` against ``reference(*inputs)`` (tuples of tensors)."""

    name: str
    make: Callable[[torch.Generator], tuple[Tensor, ...]]  # float64 CPU inputs that gradients flow to
    ours: Callable[..., tuple[Tensor, ...]]
    reference: Callable[..., tuple[Tensor, ...]]


def _gram(X: Tensor) -> Tensor:
    """A PSD matrix built from X, so that gradients are taken with respect to X (any symmetrisation
    convention of a kernel's backward gives the same gradient there)."""
    return X @ X.mT / X.shape[-1]


def _rows(B: int, R: int, d_in: int, d_out: int):
    return lambda gen: (torch.randn(B, R, d_in, generator=gen, dtype=torch.float64),
                        torch.randn(B, R, d_out, generator=gen, dtype=torch.float64))


def _squares(B: int, *orders: int):
    return lambda gen: tuple(torch.randn(B, d, d + 3, generator=gen, dtype=torch.float64) for d in orders)


def _damped(X: Tensor) -> Tensor:
    """Positive definite only with the damping (0.2) that damped_cholesky adds."""
    return _gram(X) - 0.05 * torch.eye(X.shape[-2], dtype=X.dtype, device=X.device)


def cases() -> list[Case]:
    """Every op at shapes that take each of its paths (``csrc/fused.h``: fused for orders ≤ 64)."""
    out = []
    for shape, path in (((3, 7, 5, 4), "small"), ((2, 9, 70, 3), "large")):
        for bias in (True, False):
            out.append(Case(f"kron_factors {path} bias={bias}", _rows(*shape),
                            lambda a, g, bias=bias: ops.kron_factors(a, g, bias),
                            lambda a, g, bias=bias: ref.kron_factors(a, g, bias)))
    for d in (6, 70):
        out.append(Case(f"damped_cholesky d={d}", _squares(2, d),
                        lambda X: ops.damped_cholesky(_damped(X), 0.2, check=False),
                        lambda X: ref.damped_cholesky(_damped(X), 0.2)))
    for method in ("factored", "exact"):
        for (dA, dG), path in (((5, 4), "fused"), ((70, 3), "composite")):
            out.append(Case(f"kron_logdet {method} {path} ({dA}x{dG})", _squares(3 if path == "fused" else 2, dA, dG),
                            lambda X, Y, m=method: (ops.kron_logdet(_gram(X), _gram(Y), 9.0, 0.3, m, check=False),),
                            lambda X, Y, m=method: (ref.kron_logdet(_gram(X), _gram(Y), 9.0, 0.3, m),)))
        # (tasks, rows, d_in, d_out): rows > columns, the Gram side (rows < columns), above order 64
        for shape, path in (((3, 8, 5, 4), "fused"), ((3, 6, 70, 3), "fused gram"), ((2, 80, 70, 3), "composite")):
            out.append(Case(f"kfac_logdet {method} {path} {shape}", _rows(*shape),
                            lambda a, g, m=method: (ops.kfac_logdet(a, g, float(a.shape[1]), 0.3, m, check=False),),
                            lambda a, g, m=method: (ref.kfac_logdet(a, g, float(a.shape[1]), 0.3, m),)))
    return out


def _normwise(x: Tensor, y: Tensor) -> float:
    x, y = x.detach().cpu().double(), y.detach().cpu().double()
    if x.shape != y.shape:
        return float("inf")
    error = float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) if y.numel() else 0.0
    return error if math.isfinite(error) else float("inf")  # NaN compares as nothing: fail it loudly


def _with_grads(outs, inputs: tuple[Tensor, ...], weights: list[Tensor]) -> list[Tensor]:
    """The outputs and the gradients of Σ wᵢ·outᵢ with respect to the inputs."""
    total = sum((o * w.to(o)).sum() for o, w in zip(outs, weights))
    return [*outs, *torch.autograd.grad(total, inputs)]


def _values_and_grads(fn, inputs: tuple[Tensor, ...], weights: list[Tensor]) -> list[Tensor]:
    """fn's outputs and the gradients of Σ wᵢ·outᵢ with respect to the inputs."""
    inputs = tuple(t.detach().requires_grad_() for t in inputs)
    return _with_grads(fn(*inputs), inputs, weights)


def check_case(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Row:
    gen = torch.Generator().manual_seed(seed)
    inputs = tuple(t.to(dtype) for t in case.make(gen))
    # The reference sees the same (rounded) inputs: only the kernels' own error is measured.
    exact = tuple(t.double().requires_grad_() for t in inputs)
    outs = case.reference(*exact)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    want = _with_grads(outs, exact, weights)
    try:
        got = _values_and_grads(case.ours, tuple(t.to(device) for t in inputs), weights)
    except Exception as exc:  # a kernel that raises is a failed check, reported, not a crash
        return Row(str(device), case.name, DTYPES[dtype], False, f"raised {type(exc).__name__}: {cli.one_line(exc)}")
    wrong = [i for i, (x, y) in enumerate(zip(got, want)) if x.dtype != dtype or x.device != device]
    error = max(_normwise(x, y) for x, y in zip(got, want))
    ok = not wrong and error <= TOLERANCE[dtype]
    detail = f"rel. error {error:.1e} (tol {TOLERANCE[dtype]:.0e}), values+grads"
    if wrong:
        detail += f"; output {wrong[0]} has the wrong dtype or device"
    return Row(str(device), case.name, DTYPES[dtype], ok, detail, error=error)


# ---------------------------------------------------------------------------------------
# CUDA only: host syncs


def _sync_free(fn) -> str | None:
    """None if ``fn()`` makes no host sync on CUDA, else the error it raised."""
    fn()  # first call outside: lazy initialisations (cuBLAS handles, workspaces) may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as exc:
        return cli.one_line(exc, 160)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    return None


def sync_rows(device: torch.device) -> list[Row]:
    rows = []
    weights = [torch.ones((), device=device)] * 3
    for case in cases():
        inputs = tuple(t.float().to(device) for t in case.make(torch.Generator().manual_seed(0)))
        err = _sync_free(lambda f=case.ours, x=inputs: _values_and_grads(f, x, weights))
        rows.append(Row(str(device), f"no host sync: {case.name}", "float32", err is None, err or "none"))
    step = _meta_iteration(LLAMA, device)
    err = _sync_free(step)
    rows.append(Row(str(device), "no host sync: LLAMA meta-iteration", "float32", err is None,
                    (err or "none") + f"; {_launches(step)} GPU operations per meta-iteration"))
    return rows


def _launches(fn) -> int:
    """GPU kernels, copies and memsets of one call (the profiler's CUDA events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())


# ---------------------------------------------------------------------------------------
# Timings: the sinusoid problem of the paper (25 tasks, 10 + 10 points, 1-40-40-1, one step)


def _sinusoid(kind: type[MAML], device: torch.device):
    """A learner on ``device``, its optimiser and one meta-batch (on the CPU)."""
    with torch.random.fork_rng(devices=[]):  # the same network every time, the caller's generator untouched
        torch.manual_seed(0)
        model = sinusoid_mlp()
    learner = kind(model, inner_lr=0.01, inner_steps=1, check_finite=False).to(device)
    b = SinusoidTasks().sample(25, torch.Generator().manual_seed(0))
    return learner, torch.optim.Adam(learner.parameters(), lr=1e-3), (b.x_support, b.y_support, b.x_query, b.y_query)


def _meta_iteration(kind: type[MAML], device: torch.device) -> Callable[[], None]:
    learner, opt, batch = _sinusoid(kind, device)
    batch = [t.to(device) for t in batch]

    def step():
        opt.zero_grad(set_to_none=True)
        learner.meta_loss(*batch).backward()
        opt.step()
    return step


def _sinusoid_logdet(fn, device: torch.device) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(0)
    layers = [[t.float().to(device).requires_grad_() for t in _rows(25, 10, d_in, d_out)(gen)]
              for d_in, d_out in ((1, 40), (40, 40), (40, 1))]
    return lambda: sum(fn(a, g, 10.0, 1e-3, "factored").sum() for a, g in layers).backward()


def _seconds(fn, device: torch.device, reps: int) -> float:
    """Median seconds per call (after two warm-up calls), the device synchronised around each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(reps + 2):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timing_rows(device: torch.device) -> list[Row]:
    reps = 20 if device.type == "cuda" else 5
    rows = []
    for kind in (MAML, LLAMA):
        t = _seconds(_meta_iteration(kind, device), device, reps)
        rows.append(Row(str(device), f"time: sinusoid {kind.__name__} meta-iteration", "float32", None,
                        _fmt(t), seconds=t))
    ours = _seconds(_sinusoid_logdet(lambda *x: ops.kfac_logdet(*x, check=False), device), device, reps * 4)
    plain = _seconds(_sinusoid_logdet(ref.plain_kfac_logdet, device), device, reps * 4)
    rows.append(Row(str(device), "time: sinusoid log det fwd+bwd (3 layers)", "float32", None,
                    f"{_fmt(ours)}, best plain PyTorch {_fmt(plain)}: {plain / ours:.1f}x", seconds=ours))
    rows.append(Row(str(device), "time: same, best plain PyTorch", "float32", None, _fmt(plain), seconds=plain))
    if device.type == "cuda":
        rows.append(graph_row(device, reps))
    return rows


def graph_row(device: torch.device, reps: int) -> Row:
    """The LLAMA meta-iteration as ``--cuda-graph`` runs it: captured, then replayed (each
    replay copying a meta-batch in from the CPU)."""
    learner, opt, batch = _sinusoid(LLAMA, device)
    name = "time: sinusoid LLAMA meta-iteration, --cuda-graph"
    try:
        graph = GraphStep(learner, opt, None, batch)
        seconds = _seconds(lambda: graph.step(batch), device, reps)
        launches = _launches(lambda: graph.step(batch))
    except Exception as exc:  # --cuda-graph does not work here: a failed check, reported
        return Row(str(device), name, "float32", False, f"raised {type(exc).__name__}: {cli.one_line(exc)}")
    return Row(str(device), name, "float32", True, f"{_fmt(seconds)}, {launches} GPU operations per meta-iteration",
               seconds=seconds)


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


# ---------------------------------------------------------------------------------------


def devices(asked: list[str] | None) -> list[torch.device]:
    if asked:  # "cuda" as the device its tensors report, cuda:0 (or the current one)
        asked = [torch.device(d) for d in asked]
        return [torch.device("cuda", torch.cuda.current_device()) if d == torch.device("cuda") else d for d in asked]
    return [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else [])


def environment() -> dict:
    gpus = range(torch.cuda.device_count()) if torch.cuda.is_available() else []
    return {"fastlaplace": __version__, "build": ops.build_info(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "python": sys.version.split()[0],
            "cuda_devices": [_describe_gpu(i) for i in gpus]}


def _describe_gpu(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"


def run(devs: list[torch.device], checks_only: bool = False) -> list[Row]:
    rows = []
    for device in devs:
        if device.type == "cuda" and not ops.has_cuda():
            rows.append(Row(str(device), "CUDA kernels in this build", "-", False,
                            "none (built with FASTLAPLACE_CUDA=OFF, or without nvcc or a CUDA build of torch)"))
            continue
        for case in cases():
            for dtype in DTYPES:
                rows.append(check_case(case, device, dtype))
        if checks_only:
            continue
        if device.type == "cuda":
            rows += sync_rows(device)
        rows += timing_rows(device)
    return rows


def table(rows: list[Row]) -> str:
    cells = [("device", "check", "dtype", "result", "detail")]
    cells += [(r.device, r.check, r.dtype, {True: "ok", False: "FAIL", None: "-"}[r.ok], r.detail) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(4)) + "  " + c[4] for c in cells)


def verdict(rows: list[Row]) -> str:
    checks = [r for r in rows if r.ok is not None]
    failed = [r for r in checks if not r.ok]
    where = ", ".join(dict.fromkeys(r.device for r in rows))
    if failed:
        names = "; ".join(f"{r.device} {r.check} {r.dtype}" for r in failed[:5]) + ("; ..." if len(failed) > 5 else "")
        return f"verdict: FAILED, {len(failed)} of {len(checks)} checks disagree ({names})"
    return f"verdict: OK, all {len(checks)} checks agree on {where}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastlaplace.doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", action="append", metavar="DEV",
                   help="cpu, cuda or cuda:N (repeatable; default: the CPU and the first CUDA device if any)")
    p.add_argument("--checks-only", action="store_true",
                   help="the ops' values and gradients only: no host-sync checks (they use the profiler), no "
                        "timings (for compute-sanitizer)")
    p.add_argument("--json", metavar="PATH", help="write the environment, every check and every figure as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with cli.errors_as_messages():
        for d in args.device or []:
            cli.check_device(d)
        if args.json:
            cli.check_output("--json", args.json)
        env = environment()
        print(f"fastlaplace {env['fastlaplace']}, torch {env['torch']} (CUDA {env['torch_cuda']}), "
              f"Python {env['python']}")
        print("build: " + ", ".join(f"{k}={v}" for k, v in env["build"].items()))
        print("CUDA devices: " + (", ".join(env["cuda_devices"]) or "none"))
        rows = run(devices(args.device), args.checks_only)
        print(table(rows))
        line = verdict(rows)
        print(line)
        ok = all(r.ok is not False for r in rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**env, "ok": ok, "verdict": line, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
