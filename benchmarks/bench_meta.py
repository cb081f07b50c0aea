"""Seconds per meta-iteration: MAML against LLAMA, and against a plain per-task loop.

    python benchmarks/bench_meta.py [--device cuda] [--conv-iterations 3]

1. Sinusoid (25 tasks × 10 + 10 points, 1-40-40-1 MLP, 1 inner step, second order):
   fastlaplace's MAML, first-order MAML, LLAMA (factored and exact log-det), and the way
   learn2learn runs MAML — a Python loop over the tasks with autograd.grad(create_graph=True)
   per task — written here in plain PyTorch (learn2learn itself does not install on this
   Python: its sdist needs its Cython sources regenerated) and labelled as such.
2. Conv4 on 84×84 random images, 5-way 1-shot, 15 query images per class, 4 tasks, 5 inner
   steps (the paper's miniImageNet setting): MAML and LLAMA, with the projected hours for
   60,000 iterations.
Repetitions are interleaved so that both sides see the same machine load; medians reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fastlaplace import LLAMA, MAML, conv4, sinusoid_mlp
from fastlaplace.data import SinusoidTasks
from _common import fmt_time, markdown_table, write_block


def per_task_loop_step(model, batch, lr=0.01):
    """learn2learn-style MAML: one task at a time, create_graph=True."""
    xs, ys, xq, yq = batch
    theta = dict(model.named_parameters())
    total = 0.0
    for t in range(xs.shape[0]):
        loss = F.mse_loss(functional_call(model, theta, (xs[t],)), ys[t])
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
        phi = {k: v - lr * g for (k, v), g in zip(theta.items(), grads)}
        total = total + F.mse_loss(functional_call(model, phi, (xq[t],)), yq[t])
    (total / xs.shape[0]).backward()


def interleaved(steps: dict, reps: int, inner: int, device: str) -> dict[str, float]:
    times = {k: [] for k in steps}
    for fn in steps.values():  # warm up
        fn()
    for _ in range(reps):
        for name, fn in steps.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def learner_step(learner, batch, opt):
    def step():
        opt.zero_grad(set_to_none=True)
        learner.meta_loss(*batch).backward()
        opt.step()
    return step


def sinusoid(device: str, reps: int) -> str:
    b = SinusoidTasks().sample(25, torch.Generator().manual_seed(0))
    batch = tuple(t.to(device) for t in (b.x_support, b.y_support, b.x_query, b.y_query))
    learners = {
        "MAML": MAML(sinusoid_mlp()),
        "first-order MAML": MAML(sinusoid_mlp(), first_order=True),
        "LLAMA (factored)": LLAMA(sinusoid_mlp(), logdet_method="factored"),
        "LLAMA (exact)": LLAMA(sinusoid_mlp(), logdet_method="exact"),
    }
    steps = {}
    for name, learner in learners.items():
        learner.to(device)
        steps[name] = learner_step(learner, batch, torch.optim.Adam(learner.parameters(), 1e-3))
    loop_model = sinusoid_mlp().to(device)
    steps["per-task loop (plain PyTorch, as learn2learn)"] = lambda: per_task_loop_step(loop_model, batch)
    med = interleaved(steps, reps, 10, device)
    base = med["MAML"]
    rows = [[k, fmt_time(v), f"{v / base:.2f}"] for k, v in med.items()]
    for r in rows:
        print(" | ".join(r), flush=True)
    return markdown_table(["sinusoid, 25 tasks", "s / meta-iteration", "÷ MAML"], rows)


def conv(device: str, iterations: int, filters: int) -> str:
    g = torch.Generator().manual_seed(0)
    T, ways, shots, query = 4, 5, 1, 15
    xs = torch.rand(T, ways * shots, 3, 84, 84, generator=g).to(device)
    xq = torch.rand(T, ways * query, 3, 84, 84, generator=g).to(device)
    ys = torch.arange(ways).repeat_interleave(shots).expand(T, -1).contiguous().to(device)
    yq = torch.arange(ways).repeat_interleave(query).expand(T, -1).contiguous().to(device)
    batch = (xs, ys, xq, yq)
    steps = {}
    for name, cls in (("MAML", MAML), ("LLAMA (factored)", LLAMA)):
        torch.manual_seed(0)
        learner = cls(conv4(3, ways, 84, filters), inner_lr=0.01, inner_steps=5, loss="cross_entropy").to(device)
        steps[name] = learner_step(learner, batch, torch.optim.Adam(learner.parameters(), 1e-3))
    med = interleaved(steps, iterations, 1, device)
    base = med["MAML"]
    rows = [[k, fmt_time(v), f"{v / base:.2f}", f"{v * 60000 / 3600:.1f} h"] for k, v in med.items()]
    for r in rows:
        print(" | ".join(r), flush=True)
    return markdown_table([f"Conv4-{filters} 84×84, 4 tasks × 5-way 1-shot, 5 steps", "s / meta-iteration", "÷ MAML",
                           "60,000 iterations"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=15, help="interleaved repetitions (sinusoid)")
    p.add_argument("--conv-iterations", type=int, default=3, help="timed Conv4 iterations per method (0: skip)")
    p.add_argument("--filters", type=int, default=32)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    parts = [sinusoid(args.device, args.reps)]
    if args.conv_iterations:
        parts.append(conv(args.device, args.conv_iterations, args.filters))
    if not args.no_write:
        write_block("bench_meta", "\n\n".join(parts), args.device)


if __name__ == "__main__":
    main()
