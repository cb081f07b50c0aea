"""Where LLAMA's time over MAML goes: one Conv4-32 meta-iteration of each (4 tasks × 5-way
1-shot, 15 query images per class, 2 second-order steps, one thread), CPU time of 10 timed
iterations after 3 warm-ups, then torch.profiler's self CPU time per op over 3 more, LLAMA's
ops ranked by their excess over MAML's.

    python benchmarks/profile_llama_overhead.py [--size 28] [--filters 32] [--steps 2]
"""

import argparse
import time

import torch
from bench_meta import learner_step, random_episodes
from torch.profiler import ProfilerActivity, profile

from fastlaplace import LLAMA, MAML
from fastlaplace.models import conv4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--filters", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=25, help="ops listed")
    args = p.parse_args()
    torch.set_num_threads(1)
    ways, channels = 5, 3 if args.size >= 84 else 1
    batch = random_episodes(4, args.size, channels, 15)
    seconds, profiles = {}, {}
    for cls in (MAML, LLAMA):
        torch.manual_seed(0)
        learner = cls(conv4(channels, ways, args.size, args.filters), inner_lr=0.01, inner_steps=args.steps,
                      loss="cross_entropy", conv_strategy="grouped")
        step = learner_step(learner, batch, torch.optim.Adam(learner.parameters(), 1e-3))
        for _ in range(3):
            step()
        t = time.process_time()
        for _ in range(10):
            step()
        seconds[cls.__name__] = (time.process_time() - t) / 10
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        profiles[cls.__name__] = {e.key: (e.self_cpu_time_total / 3e3, e.count / 3) for e in prof.key_averages()}
    maml, llama = profiles["MAML"], profiles["LLAMA"]
    print(f"CPU s per meta-iteration: MAML {seconds['MAML']:.3f}, LLAMA {seconds['LLAMA']:.3f} "
          f"({seconds['LLAMA'] / seconds['MAML']:.2f}x)")
    print(f"profiled self CPU ms per iteration: MAML {sum(v[0] for v in maml.values()):.1f}, "
          f"LLAMA {sum(v[0] for v in llama.values()):.1f}")
    print("| op | LLAMA ms | MAML ms | excess ms | LLAMA calls | MAML calls |\n|---|---|---|---|---|---|")
    ranked = sorted(llama, key=lambda k: llama[k][0] - maml.get(k, (0, 0))[0], reverse=True)
    for key in ranked[:args.rows]:
        (lt, lc), (mt, mc) = llama[key], maml.get(key, (0.0, 0.0))
        print(f"| {key} | {lt:.2f} | {mt:.2f} | {lt - mt:+.2f} | {lc:.0f} | {mc:.0f} |")


if __name__ == "__main__":
    main()
