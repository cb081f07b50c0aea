"""Run by tests/test_distributed.py under ``python -m torch.distributed.run`` (not a test file).

``dist_worker.py equivalence OUT.json``: every rank samples the same global meta-batch (float64),
keeps its shard, and averages the meta-gradients; rank 0 compares them with the one-process
meta-gradient of the whole meta-batch (MAML and LLAMA) and the split evaluation with the
one-process one, and writes the largest differences to OUT.json.

``dist_worker.py train ARGS...``: ``fastlaplace.train``'s command line, where the rank named by
``CRASH_RANK`` raises an OSError while sampling meta-batch number ``CRASH_AT`` (a rank that dies).
"""

import json
import os
import sys
from pathlib import Path

import torch


def equivalence(out: str) -> None:
    from fastlaplace import LLAMA, MAML, distributed, sinusoid_mlp
    from fastlaplace.data import SinusoidTasks
    from fastlaplace.evaluate import evaluate
    from fastlaplace.problems import SinusoidProblem

    ctx = distributed.init("cpu")
    assert ctx.world_size == 2, ctx
    problem = SinusoidProblem(SinusoidTasks())
    batch = problem.sample("train", 6, torch.Generator().manual_seed(3))
    batch = type(batch)(*(t.double() for t in batch))
    report = {}
    for name, cls, kwargs in [("maml", MAML, {}), ("llama", LLAMA, dict(eta=1e-2, tau=0.1))]:
        torch.manual_seed(0)
        learner = cls(sinusoid_mlp().double(), inner_lr=0.01, inner_steps=2, **kwargs)
        learner.meta_loss(*distributed.shard(batch, ctx)).backward()
        distributed.average_gradients(learner.parameters(), bucket_bytes=4096)  # several buckets
        averaged = [p.grad.clone() for p in learner.parameters()]
        learner.zero_grad()
        learner.meta_loss(*batch).backward()
        report[name] = max(float((a - p.grad).abs().max()) for a, p in zip(averaged, learner.parameters()))
        report[name + "_scale"] = max(float(p.grad.abs().max()) for p in learner.parameters())
    learner = MAML(sinusoid_mlp(), inner_lr=0.01)
    split = evaluate(learner, problem, [0, 1], tasks=250, seed=5, chunk=40, progress=False, distributed=True)
    whole = evaluate(learner, problem, [0, 1], tasks=250, seed=5, chunk=40, progress=False)
    grouped = evaluate(learner, problem, [0, 1], tasks=250, seed=5, chunk=40, progress=False, distributed=True, group=7)
    report["evaluation_equal"] = all(vars(split[s]) == vars(whole[s]) for s in (0, 1))
    report["evaluation_grouped_equal"] = all(
        abs(grouped[s].mean - whole[s].mean) <= 1e-6 * abs(whole[s].mean) and grouped[s].n == whole[s].n
        for s in (0, 1))
    report["evaluation_n"] = split[1].n
    torch.optim.Adam(learner.parameters())  # as training does: the first optimiser imports torch._dynamo
    distributed.shutdown()
    report["threads_after_shutdown"] = gloo_threads()
    if ctx.is_main:
        with open(out, "w") as f:
            json.dump(report, f)


def gloo_threads() -> list[str]:
    """The names of this process's threads that belong to Gloo (Linux)."""
    names = [p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")]
    return sorted(n for n in names if "gloo" in n)


def crashing_train(argv: list[str]) -> None:
    from fastlaplace import train
    from fastlaplace.problems import SinusoidProblem

    crash_at, crash_rank = int(os.environ.get("CRASH_AT", "0")), os.environ.get("CRASH_RANK", "1")
    original, calls = SinusoidProblem.sample, {"n": 0}

    def sample(self, split, *args, **kwargs):
        if split == "train" and os.environ.get("RANK") == crash_rank:
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise OSError(f"simulated failure of rank {crash_rank} at meta-batch {crash_at}")
        return original(self, split, *args, **kwargs)

    SinusoidProblem.sample = sample
    train.main(argv)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "equivalence":
        equivalence(sys.argv[2])
    else:
        crashing_train(sys.argv[2:])
