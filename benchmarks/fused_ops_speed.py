"""The fused log-det ops' CPU time, one thread, to compare two builds of the kernels (run it
once per environment, alternating, and compare the JSON lines): forward + backward of
``kfac_logdet`` per method on the sinusoid layers (25 tasks), Gram orders 32 and 64 and a
classifier head; the median of 15 calls after 3 warm-ups, in seconds.

    OMP_NUM_THREADS=1 python benchmarks/fused_ops_speed.py > new.json   # then with the other build
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import fastlaplace.ops as ops

# (name, tasks, rows, inputs, outputs): all fused on the CPU (Gram or factor order <= 64).
CASES = [("sinusoid L1", 25, 10, 2, 40), ("sinusoid L2", 25, 10, 41, 40), ("sinusoid L3", 25, 10, 41, 1),
         ("gram 32", 25, 32, 100, 100), ("gram 64", 8, 64, 200, 200), ("head", 4, 5, 1601, 5)]


def median_time(fn, reps: int = 15, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 2]


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    result = {}
    for method in ("factored", "exact"):
        for name, tasks, rows, d_in, d_out in CASES:
            a = torch.randn(tasks, rows, d_in, generator=generator, requires_grad=True)
            g = torch.randn(tasks, rows, d_out, generator=generator, requires_grad=True)
            result[f"{method} {name}"] = median_time(
                lambda a=a, g=g: ops.kfac_logdet(a, g, 1.0, 1e-3, method=method).sum().backward())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
