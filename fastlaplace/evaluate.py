"""Evaluation on new tasks: ``python -m fastlaplace.evaluate CHECKPOINT``.

Reports the metric (MSE or accuracy) after each number of inner steps as mean ± 95%
confidence interval over tasks (1.96 standard errors), as in the paper's Table 1. Tasks whose
adaptation diverged (a non-finite metric) are counted and reported, not averaged.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

import torch

from . import distributed as dist
from .cli import MAXIMA, available_memory, check_device, check_memory, check_seed, errors_as_messages, positive_int
from .config import Config
from .meta import MAML
from .problems import Batch
from .progress import progress_bar
from .runs import load_for_evaluation

CHUNK = 100  # tasks drawn at a time (the draws, and so the results, do not depend on the memory)


def _number(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 1e5 else f"{x:.4g}"


@dataclass
class Estimate:
    """Mean ± 95% confidence interval over tasks. A task whose metric is not finite (its
    adaptation diverged, e.g. more inner steps than the learner was trained with) is counted
    in ``diverged`` and left out of the mean, which is then over ``n - diverged`` tasks. The
    median (of the finite values too) is reported beside the mean: one task that nearly
    diverged can move the mean by orders of magnitude, the median not."""

    mean: float
    ci95: float
    n: int
    median: float = float("nan")
    diverged: int = 0

    def __str__(self) -> str:
        text = f"{_number(self.mean)} ± {_number(self.ci95)} (median {_number(self.median)})"
        if self.diverged:
            text += f" over the {self.n - self.diverged} finite tasks; {self.diverged} of {self.n} diverged"
        return text

    @classmethod
    def of(cls, values: torch.Tensor) -> Estimate:
        v = values.double().cpu().reshape(-1)
        finite = v[torch.isfinite(v)]
        m = finite.numel()
        if m == 0:
            return cls(float("nan"), float("nan"), v.numel(), float("nan"), v.numel())
        std = float(finite.std(unbiased=True)) if m > 1 else float("nan")
        return cls(float(finite.mean()), 1.96 * std / math.sqrt(m), v.numel(), float(finite.median()), v.numel() - m)


def evaluate(learner: MAML, problem, steps: list[int], tasks: int = 600, seed: int = 0,
             split: str = "test", chunk: int = CHUNK, device: str | torch.device = "cpu",
             progress: bool = True, distributed: bool = False, group: int | None = None) -> dict[int, Estimate]:
    """Metric of the adapted learner on ``tasks`` new tasks of ``split``, per inner-step count.

    Tasks are drawn ``chunk`` at a time and adapted ``group`` at a time (default: a whole
    chunk); tasks are independent, so ``group`` changes the memory, not the results.

    With ``distributed`` (inside an initialised ``torch.distributed`` process group, see
    :mod:`fastlaplace.distributed`) the chunks of tasks are dealt out to the ranks in turn and
    the metrics gathered: every rank returns the same estimates as one process would."""
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks}")
    ctx = dist.current() if distributed else dist.Context()
    generator = torch.Generator().manual_seed(seed)
    values: dict[int, list[torch.Tensor]] = {s: [] for s in steps}
    sizes, mine = [], []
    with progress_bar(tasks, f"eval {split}", enabled=progress) as bar, torch.no_grad():
        done = 0
        while done < tasks:
            n = min(chunk, tasks - done)
            batch = problem.sample(split, n, generator)  # every rank draws every chunk: the same tasks
            if len(sizes) % ctx.world_size == ctx.rank:
                size = group or n
                for lo in range(0, n, size):
                    part = Batch(*(t[lo:lo + size] for t in batch)).to(device)
                    for s in steps:
                        params = learner.adapt(part.x_support, part.y_support, steps=s)
                        values[s].append(problem.metric(learner.predict(params, part.x_query), part.y_query))
                if ctx.distributed:
                    parts = -(-n // size)  # this chunk's entries in values[s]
                    mine.append(torch.stack([torch.cat(values[s][-parts:]) for s in steps]).double().cpu().reshape(-1))
            sizes.append(n)
            done += n
            bar.update(n)
    if ctx.distributed:
        parts = dist.gather_varlen(torch.cat(mine) if mine else torch.zeros(0, dtype=torch.float64))
        chunks: list[torch.Tensor] = []  # [steps, n] per chunk, in order
        offsets = [0] * ctx.world_size
        for i, n in enumerate(sizes):
            r = i % ctx.world_size
            chunks.append(parts[r][offsets[r]:offsets[r] + len(steps) * n].reshape(len(steps), n))
            offsets[r] += len(steps) * n
        values = {s: [c[j] for c in chunks] for j, s in enumerate(steps)}
    return {s: Estimate.of(torch.cat(v)) for s, v in values.items()}


def evaluation_group(cfg: Config, tasks: int, tasks_flag: str, device) -> int:
    """How many tasks to adapt at once: a whole chunk, or fewer where its estimated memory
    exceeds the device's. An error only when a single task cannot fit."""
    group, have = min(CHUNK, tasks), available_memory(device)
    while group > 1 and cfg.batch_memory(group, 0, graph=False)[1] > have:
        group = (group + 1) // 2
    what, needed = cfg.batch_memory(group, 0, graph=False)
    check_memory(f"the evaluation of {what} (one task at a time; {tasks_flag})", needed, device)
    return group


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fastlaplace.evaluate", description=__doc__)
    p.add_argument("checkpoint", help="a checkpoint.pt written by fastlaplace.train")
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument("--steps", type=int, nargs="+", default=None, help="inner steps (default: the run's)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--seed", type=int, default=None, help="seed of the evaluation tasks (default: the run's)")
    p.add_argument("--device", default=None)
    p.add_argument("--data-root", default=None, help="the data folder of an image run (never taken from the "
                                                     "checkpoint)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read miniImageNet's pickle files (loading a pickle can run code: only files you trust)")
    args = p.parse_args(argv)
    with errors_as_messages():
        positive_int("--tasks", args.tasks, 1, MAXIMA["eval_tasks"])
        for s in args.steps or []:
            positive_int("--steps", s, 0, MAXIMA["test_inner_steps"])
        if args.device is not None:
            check_device(args.device)
        if args.seed is not None:
            check_seed("--seed", args.seed)
        learner, problem, cfg = load_for_evaluation(args.checkpoint, device=args.device, data_root=args.data_root,
                                                    allow_pickle=args.allow_pickle)
        steps = args.steps or cfg.test_inner_steps
        group = evaluation_group(cfg, args.tasks, "--tasks", cfg.device)
        seed = cfg.eval_seed if args.seed is None else args.seed
        results = evaluate(learner, problem, steps, args.tasks, seed, args.split, device=cfg.device, group=group)
    for s, est in results.items():
        print(f"{args.split} {problem.metric_name} after {s} step(s): {est}  ({est.n} tasks)")
    summary = {str(s): vars(e) for s, e in results.items()}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
