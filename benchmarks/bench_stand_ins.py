"""The general network path (stand-ins in the user's own forward) against the Sequential-only
``TaskBatchedNetwork`` it replaced: CPU seconds per meta-iteration, interleaved.

    python benchmarks/bench_stand_ins.py [--base a2a3f22] [--reps 60] [--conv-size 84 --conv-reps 3]

The previous implementation is read from git (``git show BASE:fastlaplace/batched.py``) and
swapped in as ``learner.net`` of an otherwise identical learner; both learners run the same
batch, alternately, and the medians of the process's CPU time per meta-iteration are compared
(CPU time rather than wall time: the shared machine's load moves wall times by tens of per cent).
Rows: sinusoid MAML and LLAMA (25 tasks, 1-40-40-1 MLP, 1 inner step) and Conv4-32 MAML and
LLAMA (4 tasks × 5-way 1-shot, 15 query images per class, 5 inner steps, random images).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastlaplace import LLAMA, MAML, conv4, sinusoid_mlp
from fastlaplace.data import SinusoidTasks


def load_base(commit: str):
    source = subprocess.run(["git", "show", f"{commit}:fastlaplace/batched.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    path = Path(tempfile.mkdtemp()) / "batched_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("batched_base", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["batched_base"] = module
    spec.loader.exec_module(module)
    return module


def compare(name, make_learner, batch, base, reps, inner):
    learners = {}
    for version in ("previous", "stand-ins"):
        torch.manual_seed(0)
        learner = make_learner()
        if version == "previous":
            learner.net = base.TaskBatchedNetwork(learner.model)
        learners[version] = (learner, torch.optim.Adam(learner.parameters(), 1e-3))

    def step(learner, opt):
        opt.zero_grad(set_to_none=True)
        learner.meta_loss(*batch).backward()
        opt.step()

    times = {v: [] for v in learners}
    for learner, opt in learners.values():
        step(learner, opt)  # warm up
    for _ in range(reps):
        for version, (learner, opt) in learners.items():
            t0 = time.process_time()
            for _ in range(inner):
                step(learner, opt)
            times[version].append((time.process_time() - t0) / inner)
    med = {v: statistics.median(t) for v, t in times.items()}
    print(f"| {name} | {med['previous'] * 1e3:.2f} ms | {med['stand-ins'] * 1e3:.2f} ms | "
          f"{med['stand-ins'] / med['previous']:.3f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="a2a3f22", help="commit of the previous fastlaplace/batched.py")
    p.add_argument("--reps", type=int, default=60, help="interleaved repetitions of 10 sinusoid iterations")
    p.add_argument("--conv-size", type=int, default=84)
    p.add_argument("--conv-reps", type=int, default=3, help="interleaved Conv4 iterations (0: skip)")
    args = p.parse_args()
    base = load_base(args.base)
    print("| CPU time per meta-iteration (median) | previous | stand-ins | ratio |\n|---|---|---|---|")
    b = SinusoidTasks().sample(25, torch.Generator().manual_seed(0))
    batch = (b.x_support, b.y_support, b.x_query, b.y_query)
    compare("sinusoid MAML", lambda: MAML(sinusoid_mlp()), batch, base, args.reps, 10)
    compare("sinusoid LLAMA (factored)", lambda: LLAMA(sinusoid_mlp()), batch, base, args.reps, 10)
    if args.conv_reps:
        g, T, ways, query, size = torch.Generator().manual_seed(0), 4, 5, 15, args.conv_size
        batch = (torch.rand(T, ways, 3, size, size, generator=g), torch.arange(ways).expand(T, -1).contiguous(),
                 torch.rand(T, ways * query, 3, size, size, generator=g),
                 torch.arange(ways).repeat_interleave(query).expand(T, -1).contiguous())
        for cls in (MAML, LLAMA):
            compare(f"Conv4-32 {size}×{size} {cls.__name__}",
                    lambda cls=cls: cls(conv4(3, ways, size, 32), inner_lr=0.01, inner_steps=5, loss="cross_entropy"),
                    batch, base, args.conv_reps, 1)


if __name__ == "__main__":
    main()
