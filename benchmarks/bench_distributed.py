"""Seconds per meta-iteration of LLAMA: one process against N processes (torch.distributed).

    python benchmarks/bench_distributed.py [--nproc 2] [--iterations 20] [--conv-iterations 3]
    python benchmarks/bench_distributed.py --device cuda --nproc 8      (a machine with 8 GPUs)

The global meta-batch is fixed (strong scaling): N processes each take 1/N of its tasks and
average the meta-gradients with one bucketed all-reduce (fastlaplace.distributed). On the CPU
the single process gets N threads and each of the N processes one thread (Gloo), so both use
the same cores; on CUDA the single process uses one GPU and each of the N processes its own
(NCCL). Scaling efficiency = t(1 process) / (N · t(N processes)). On the CPU a 1 process × 1 thread
column is printed too, with the speed-up over it: on a machine whose cores other programs
share, N intra-op threads can be much slower than one (each parallel region waits for its
slowest, descheduled thread), which flatters the N-process side of the first comparison.

1. Sinusoid: 24 tasks × 10 + 10 points, 1-40-40-1 MLP, 1 inner step, second order.
2. Conv4-32 on 28×28 random images, 5-way 1-shot, 5 query images per class, 8 tasks, 1 inner
   step (Omniglot-sized; the 84×84 miniImageNet setting takes minutes per iteration on a CPU).
Each timed run does one warm-up iteration, then times ``--iterations`` (synchronised with a
barrier on every rank); the median over ranks is not needed: the all-reduce synchronises them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import fmt_time, markdown_table, write_block

from fastlaplace import LLAMA, conv4, distributed, sinusoid_mlp
from fastlaplace.data import SinusoidTasks

ROOT = Path(__file__).resolve().parents[1]


def sample(problem: str, tasks: int, g: torch.Generator):
    if problem == "sinusoid":
        b = SinusoidTasks().sample(tasks, g)
        return b.x_support, b.y_support, b.x_query, b.y_query
    ways, shots, query = 5, 1, 5
    xs = torch.rand(tasks, ways * shots, 1, 28, 28, generator=g)
    xq = torch.rand(tasks, ways * query, 1, 28, 28, generator=g)
    ys = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    yq = torch.arange(ways).repeat_interleave(query).expand(tasks, -1).contiguous()
    return xs, ys, xq, yq


META_BATCH = {"sinusoid": 24, "conv4": 8}


def seconds_per_iteration(problem: str, iterations: int, device: str) -> float:
    """Run in every process (one, or each rank of a torchrun job)."""
    ctx = distributed.init(device)
    device = distributed.local_device(device, ctx)
    tasks = distributed.local_tasks(META_BATCH[problem], ctx.world_size)
    torch.manual_seed(0)
    if problem == "sinusoid":
        learner = LLAMA(sinusoid_mlp(), inner_lr=0.01, inner_steps=1)
    else:
        learner = LLAMA(conv4(1, 5, 28, 32), inner_lr=0.4, inner_steps=1, loss="cross_entropy")
    learner.to(device)
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    g = torch.Generator().manual_seed(distributed.rank_seed(0, ctx.rank))

    def step():
        batch = [t.to(device) for t in sample(problem, tasks, g)]
        opt.zero_grad(set_to_none=True)
        learner.meta_loss(*batch).backward()
        distributed.average_gradients(learner.parameters())
        opt.step()

    step()
    distributed.barrier()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iterations):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    distributed.barrier()
    return (time.perf_counter() - t0) / iterations


def launch(problem: str, nproc: int, iterations: int, device: str, threads: int) -> float:
    """Seconds per iteration of a torchrun job of ``nproc`` processes (``threads`` each)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(f"/tmp/bench_distributed_{os.getpid()}.json")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), __file__, "--worker", str(out), "--problem", problem,
           "--iterations", str(iterations), "--device", device, "--threads", str(threads)]
    subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).parent)
    seconds = json.loads(out.read_text())["seconds"]
    out.unlink()
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--iterations", type=int, default=20, help="timed sinusoid iterations")
    p.add_argument("--conv-iterations", type=int, default=3, help="timed Conv4 iterations (0: skip)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--problem", default="sinusoid", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:  # one rank of a launched job
        torch.set_num_threads(args.threads)
        seconds = seconds_per_iteration(args.problem, args.iterations, args.device)
        if distributed.current().is_main:
            Path(args.worker).write_text(json.dumps({"seconds": seconds}))
        distributed.shutdown()
        return
    n, cuda = args.nproc, args.device.startswith("cuda")
    single_threads = 1 if cuda else n
    rows = []
    for problem, iterations in (("sinusoid", args.iterations), ("conv4", args.conv_iterations)):
        if not iterations:
            continue
        one = launch(problem, 1, iterations, args.device, single_threads)
        serial = launch(problem, 1, iterations, args.device, 1) if not cuda else one
        many = launch(problem, n, iterations, args.device, 1)
        label = ("sinusoid, 24 tasks" if problem == "sinusoid" else "Conv4-32 28×28, 8 tasks × 5-way 1-shot")
        rows.append([label, fmt_time(serial), f"1 × {single_threads} thread(s)" if not cuda else "1 GPU", fmt_time(one),
                     f"{n} × 1 thread" if not cuda else f"{n} GPUs", fmt_time(many), f"{one / many:.2f}×",
                     f"{one / (n * many):.0%}", f"{serial / many:.2f}×"])
        print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(["LLAMA meta-iteration", "1 process × 1 thread", "one process", "s / it",
                           f"{n} processes", "s / it",
                            "speed-up", "efficiency", "speed-up over 1 × 1 thread"], rows)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    body = (f"{table}\n\nGlobal meta-batch fixed; each process takes 1/{n} of the tasks (torchrun, "
            f"{'NCCL' if cuda else 'Gloo'}). Load average at the end: {load} (other programs on the same cores "
            "make N intra-op threads wait for each other: compare with the 1 × 1 thread column).")
    if not cuda:
        body += (" On a GPU machine with several GPUs: `python benchmarks/bench_distributed.py --device cuda --nproc "
                 "N` (not run here: the GPU machine available to this project has one GPU).")
    if not args.no_write:
        write_block("bench_distributed", body, args.device)


if __name__ == "__main__":
    main()
