"""Peak memory of Conv4 meta-iterations, one learner per fresh process.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/peak_memory.py loop|maml|llama [--steps 2] [--size 84]
        [--task-chunk N] [--recompute-query]

The same episodes as ``bench_meta.py``'s Conv4 rows (4 tasks × 5-way 1-shot, 15 query images
per class, Conv4-32, random images). Two meta-iterations (forward, backward, Adam step; the
loop is the per-task ``functional_call`` loop, its parameters stepped by Adam too), then one
line: the process's peak resident set (``ru_maxrss``) above its resident set before the first
iteration (after the imports, the network and the optimizer). A fresh process per learner:
in one process, glibc's heap keeps what an earlier learner freed and hides a later one's peak.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from bench_meta import _resident_bytes, learner_step, per_task_conv_loop, random_episodes

from fastlaplace import LLAMA, MAML, conv4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("learner", choices=("loop", "maml", "llama"))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", type=int, default=84)
    p.add_argument("--filters", type=int, default=32)
    p.add_argument("--task-chunk", type=int)
    p.add_argument("--recompute-query", action="store_true")
    args = p.parse_args()
    ways, channels = 5, 3 if args.size >= 84 else 1
    batch = random_episodes(4, args.size, channels, 15)
    torch.manual_seed(0)
    model = conv4(channels, ways, args.size, args.filters)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    if args.learner == "loop":
        loop = per_task_conv_loop(model, batch, 0.01, args.steps)

        def step():
            opt.zero_grad(set_to_none=True)
            loop()
            opt.step()
    else:
        cls = MAML if args.learner == "maml" else LLAMA
        learner = cls(model, inner_lr=0.01, inner_steps=args.steps, loss="cross_entropy", task_chunk=args.task_chunk,
                      recompute_query=args.recompute_query)
        step = learner_step(learner, batch, opt)
    before = _resident_bytes()
    start = time.perf_counter()
    for _ in range(2):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(f"{args.learner} steps={args.steps} size={args.size} task_chunk={args.task_chunk} "
          f"recompute_query={args.recompute_query}: peak {peak / 2**20:.0f} MiB above start, "
          f"{(time.perf_counter() - start) / 2:.2f} s per iteration (not a timing: separate processes)", flush=True)


if __name__ == "__main__":
    main()
