"""Seconds per meta-iteration: MAML against LLAMA, and against a plain per-task loop.

    python benchmarks/bench_meta.py [--device cuda] [--conv-iterations 3] [--resnet-iterations 1 ...]

1. Sinusoid (25 tasks × 10 + 10 points, 1-40-40-1 MLP, 1 inner step, second order):
   fastlaplace's MAML, first-order MAML, LLAMA (factored and exact log-det), and the way
   learn2learn runs MAML — a Python loop over the tasks with autograd.grad(create_graph=True)
   per task — written here in plain PyTorch (learn2learn itself does not install on this
   Python: its sdist needs its Cython sources regenerated) and labelled as such.
2. Conv4 on 84×84 RGB and 28×28 gray random images, 5-way 1-shot, 15 query images per class, 4 tasks,
   2 and 5 second-order inner steps (``--conv-sizes``, ``--conv-steps``, ``--conv-query``):
   the per-task loop a user writes in plain PyTorch (``functional_call`` per task,
   ``autograd.grad(create_graph=True)``), MAML under each convolution strategy (grouped,
   loop, auto), with ``task_chunk`` (``--task-chunks``) and ``recompute_query``, and LLAMA,
   interleaved in one process (``--channels-last-loop`` adds the loop with channels-last
   images and weights); then each one's peak memory above the
   process's resident set before its call (CPU: the resident set's high-water mark, reset
   through ``/proc/self/clear_refs``; CUDA: ``max_memory_allocated``), one after another.
   ``--conv-model resnet12`` runs the same rows for ResNet-12 (``--resnet-widths``).
3. With ``--resnet-iterations N``: ResNet-12 (64-160-320-640 by default) on 84×84 random
   images, 5-way 1-shot, MAML and LLAMA: seconds per meta-iteration and peak memory (each
   method in a fresh process: its peak resident set on the CPU, ``torch.cuda.max_memory_allocated``
   on CUDA). The paper's setting (4 tasks, 15 query images per class, 5 inner steps) is the
   default; ``--resnet-tasks``, ``--resnet-query``, ``--resnet-steps`` and ``--resnet-widths``
   make it fit a smaller machine. Its table goes to its own block of RESULTS.md.
Repetitions are interleaved so that both sides see the same machine load; medians reported.
``--reps 0`` and ``--conv-iterations 0`` skip parts 1 and 2.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from _common import fmt_time, markdown_table, write_block
from torch.func import functional_call

from fastlaplace import LLAMA, MAML, conv4, resnet12, sinusoid_mlp
from fastlaplace.data import SinusoidTasks


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


def interleaved(steps: dict, reps: int, inner: int, device: str, clock=time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each step, the steps taking turns; ``clock``:
    ``time.perf_counter`` (wall) or ``time.process_time`` (the process's CPU time)."""
    times = {k: [] for k in steps}
    for fn in steps.values():  # warm up
        fn()
    for _ in range(reps):
        for name, fn in steps.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = clock()
            for _ in range(inner):
                fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append((clock() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def random_episodes(tasks: int, size: int, channels: int, query: int, device: str = "cpu", ways: int = 5,
                    shots: int = 1) -> tuple:
    """A seeded meta-batch of ways-way episodes of random images: (x_support, y_support,
    x_query, y_query), the same for every learner and every script that asks for it."""
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(tasks, ways * shots, channels, size, size, generator=g)
    xq = torch.rand(tasks, ways * query, channels, size, size, generator=g)
    ys = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    yq = torch.arange(ways).repeat_interleave(query).expand(tasks, -1).contiguous()
    return tuple(t.to(device) for t in (xs, ys, xq, yq))


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


def per_task_conv_loop(model, batch, lr: float, steps: int, memory_format=torch.contiguous_format):
    """The best plain-PyTorch MAML a user writes for a convolutional network: one task at a
    time, torch.func.functional_call, autograd.grad(create_graph=True); returns a step.
    ``memory_format=torch.channels_last`` stores each task's images and the model's weights
    channels-last (NHWC), which oneDNN convolves without reordering them on a CPU (the
    model is converted in place)."""
    xs, ys, xq, yq = batch
    model.to(memory_format=memory_format)
    # each task's images in the format (a 5-D [T, N, C, H, W] tensor has no channels-last 4-D slices)
    xs = [x.contiguous(memory_format=memory_format) for x in xs]
    xq = [x.contiguous(memory_format=memory_format) for x in xq]

    def step():
        theta = dict(model.named_parameters())
        total = 0.0
        for t in range(len(xs)):
            phi = theta
            for _ in range(steps):
                loss = F.cross_entropy(functional_call(model, phi, (xs[t],)), ys[t])
                grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
                phi = {k: v - lr * g for (k, v), g in zip(phi.items(), grads)}
            total = total + F.cross_entropy(functional_call(model, phi, (xq[t],)), yq[t])
        (total / len(xs)).backward()
    return step


def peak_above_start(fn, device: str) -> float:
    """Bytes of memory one call of ``fn`` adds at its peak: CUDA's allocator statistics, or on the
    CPU the resident set's high-water mark (reset through /proc/self/clear_refs) above its start."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = _resident_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    fn()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    return hwm - before


def conv(device: str, iterations: int, filters: int, size: int, steps: int, query: int, model: str = "conv4",
         widths=(64, 160, 320, 640), chunks=(1,), clock=time.perf_counter, channels_last_loop: bool = False) -> str:
    """Conv4 (or ResNet-12) meta-iterations, interleaved in one process: the per-task loop
    (and, with ``channels_last_loop``, the same loop channels-last), MAML under each
    convolution strategy and with ``task_chunk`` in ``chunks`` (with and
    without ``recompute_query``), LLAMA (all tasks at once, and the first of ``chunks`` with
    ``recompute_query``); then each one's peak memory, one after another."""
    T, ways, channels = 4, 5, 3 if size >= 84 else 1  # miniImageNet's RGB, Omniglot's gray
    batch = random_episodes(T, size, channels, query, device, ways)

    def network():
        return conv4(channels, ways, size, filters) if model == "conv4" else resnet12(channels, ways, widths)

    torch.manual_seed(0)
    loop_model = network().to(device)
    runs = {"per-task loop (functional_call, plain PyTorch)": per_task_conv_loop(loop_model, batch, 0.01, steps)}
    if channels_last_loop:
        torch.manual_seed(0)
        runs["per-task loop, channels-last"] = per_task_conv_loop(network().to(device), batch, 0.01, steps,
                                                                  torch.channels_last)
    learners = {}
    variants = [("MAML (grouped)", MAML, "grouped", None, False), ("MAML (loop)", MAML, "loop", None, False),
                ("MAML (auto)", MAML, "auto", None, False)]
    variants += [(f"MAML (grouped, task_chunk={c})", MAML, "grouped", c, False) for c in chunks]
    variants += [(f"MAML (grouped, task_chunk={c}, recompute_query)", MAML, "grouped", c, True) for c in chunks]
    variants += [("LLAMA (factored, auto)", LLAMA, "auto", None, False)]
    variants += [(f"LLAMA (factored, grouped, task_chunk={c}, recompute_query)", LLAMA, "grouped", c, True)
                 for c in chunks[:1]]
    for name, cls, strategy, chunk, recompute in variants:
        torch.manual_seed(0)
        learner = cls(network(), inner_lr=0.01, inner_steps=steps, loss="cross_entropy", conv_strategy=strategy,
                      task_chunk=chunk, recompute_query=recompute).to(device)
        learners[name] = learner
        runs[name] = learner_step(learner, batch, torch.optim.Adam(learner.parameters(), 1e-3))
    med = interleaved(runs, iterations, 1, device, clock)  # its warm-up makes "auto" measure first
    peaks = {name: peak_above_start(fn, device) for name, fn in runs.items()}
    base = med[next(iter(med))]
    rows = [[k, fmt_time(v), f"{base / v:.2f}×", f"{v / med['MAML (auto)']:.2f}", f"{peaks[k] / 2**20:.0f} MiB"]
            for k, v in med.items()]
    for r in rows:
        print(" | ".join(r), flush=True)
    auto = learners["MAML (auto)"].conv_choices()
    chosen = "; ".join(f"{layer}: " + ", ".join(f"{shape} {how}" for shape, how in shapes.items())
                       for layer, shapes in auto.items())
    name = f"Conv4-{filters}" if model == "conv4" else f"ResNet-12 ({'-'.join(map(str, widths))})"
    return (markdown_table([f"{name} {size}×{size}, {T} tasks × 5-way 1-shot, {query} query per class, "
                            f"{steps} steps", ("CPU " if clock is time.process_time else "") + "s / meta-iteration",
                            "speed ÷ loop's", "÷ MAML (auto)",
                            "peak memory above start"], rows)
            + f"\n\nMAML (auto) chose per layer (input [N·T, C, H, W]): {chosen}.")


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def resnet_worker(args) -> None:
    """One method's ResNet-12 meta-iterations in this (fresh) process; prints one JSON line."""
    device, T, ways, query = args.device, args.resnet_tasks, 5, args.resnet_query
    batch = random_episodes(T, 84, 3, query, device, ways)
    torch.manual_seed(0)
    cls = MAML if args.resnet_worker == "MAML" else LLAMA
    learner = cls(resnet12(3, ways, args.resnet_widths), inner_lr=0.01, inner_steps=args.resnet_steps,
                  loss="cross_entropy").to(device)
    step = learner_step(learner, batch, torch.optim.Adam(learner.parameters(), 1e-3))
    cuda = device.startswith("cuda")
    before = torch.cuda.memory_allocated(device) if cuda else _resident_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.resnet_warmup + args.resnet_iterations):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        if i >= args.resnet_warmup:
            times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(seconds=statistics.median(times), peak=peak, before=before)), flush=True)


def resnet(args) -> str:
    """ResNet-12 rows: each method in a fresh process, so that its peak memory is its own."""
    results = {}
    for method in ("MAML", "LLAMA (factored)"):
        cmd = [sys.executable, __file__, "--resnet-worker", "MAML" if method == "MAML" else "LLAMA",
               "--device", args.device, "--resnet-iterations", str(args.resnet_iterations),
               "--resnet-warmup", str(args.resnet_warmup), "--resnet-tasks", str(args.resnet_tasks),
               "--resnet-query", str(args.resnet_query), "--resnet-steps", str(args.resnet_steps),
               "--resnet-widths", *map(str, args.resnet_widths)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"{method} worker failed:\n{run.stderr[-3000:]}")
        results[method] = json.loads(run.stdout.strip().splitlines()[-1])
    base = results["MAML"]["seconds"]
    gib = 2.0**30
    rows = [[k, fmt_time(r["seconds"]), f"{r['seconds'] / base:.2f}", f"{r['peak'] / gib:.2f} GiB",
             f"{(r['peak'] - r['before']) / gib:.2f} GiB"] for k, r in results.items()]
    for r in rows:
        print(" | ".join(r), flush=True)
    memory = ("peak torch.cuda.max_memory_allocated", "of which in the meta-iterations") if args.device.startswith(
        "cuda") else ("peak resident set (whole process)", "above the resident set before the first iteration")
    widths = "-".join(map(str, args.resnet_widths))
    title = (f"ResNet-12 ({widths}) 84×84, {args.resnet_tasks} task(s) × 5-way 1-shot, {args.resnet_query} query "
             f"per class, {args.resnet_steps} step(s)")
    note = (f"\n\n{args.resnet_iterations} timed iteration(s) per method after {args.resnet_warmup} warm-up, "
            "each method in its own process; second-order meta-gradient.")
    return markdown_table([title, "s / meta-iteration", "÷ MAML", *memory], rows) + note


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=15, help="interleaved repetitions (sinusoid; 0: skip)")
    p.add_argument("--conv-iterations", type=int, default=3, help="timed Conv4 iterations per method (0: skip)")
    p.add_argument("--filters", type=int, default=32)
    p.add_argument("--conv-sizes", type=int, nargs="+", default=[84, 28], help="Conv4 image sizes")
    p.add_argument("--conv-steps", type=int, nargs="+", default=[2, 5], help="Conv4 inner steps")
    p.add_argument("--conv-query", type=int, default=15, help="Conv4 query images per class")
    p.add_argument("--task-chunks", type=int, nargs="*", default=[1],
                   help="Conv4 rows of MAML (and LLAMA: the first) with these task_chunk values, with and without "
                   "recompute_query")
    p.add_argument("--cpu-time", action="store_true",
                   help="Conv4 rows in the process's CPU time, not wall time (a shared CPU machine: with one thread "
                   "the load then moves them far less)")
    p.add_argument("--channels-last-loop", action="store_true",
                   help="a row of part 2: the per-task loop with channels-last images and weights (which oneDNN "
                   "convolves without reordering them)")
    p.add_argument("--conv-model", choices=("conv4", "resnet12"), default="conv4",
                   help="the network of part 2 (resnet12: --resnet-widths)")
    p.add_argument("--resnet-iterations", type=int, default=0, help="timed ResNet-12 iterations per method (0: skip)")
    p.add_argument("--resnet-warmup", type=int, default=1, help="untimed ResNet-12 iterations first")
    p.add_argument("--resnet-tasks", type=int, default=4)
    p.add_argument("--resnet-query", type=int, default=15, help="query images per class")
    p.add_argument("--resnet-steps", type=int, default=5, help="inner steps")
    p.add_argument("--resnet-widths", type=int, nargs=4, default=[64, 160, 320, 640])
    p.add_argument("--resnet-worker", choices=("MAML", "LLAMA"), help=argparse.SUPPRESS)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.resnet_worker:
        return resnet_worker(args)
    parts = [sinusoid(args.device, args.reps)] if args.reps else []
    for size in args.conv_sizes if args.conv_iterations else ():
        for steps in args.conv_steps:
            parts.append(conv(args.device, args.conv_iterations, args.filters, size, steps, args.conv_query,
                              args.conv_model, args.resnet_widths, args.task_chunks,
                              time.process_time if args.cpu_time else time.perf_counter, args.channels_last_loop))
    if parts and not args.no_write:
        write_block("bench_meta", "\n\n".join(parts), args.device)
    if args.resnet_iterations:
        table = resnet(args)
        if not args.no_write:
            write_block("bench_meta_resnet12", table, args.device)


if __name__ == "__main__":
    main()
