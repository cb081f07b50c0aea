"""How far one inner step goes along each eigen-direction of the inner loss's K-FAC curvature:
αh per layer (``docs/design.md`` §6), on the test tasks of a trained run.

    python benchmarks/implicit_prior_steps.py runs/sinusoid-llama-seed0/checkpoint.pt

Where αh ≥ 1 the step reaches or passes the minimiser and the exact implicit prior is flat.
Prints, per adapted layer, the largest αh over all tasks, the median over tasks of each task's
largest, and the share of directions with αh ≥ 1.
"""

from __future__ import annotations

import argparse

import torch

from fastlaplace import ops
from fastlaplace.curvature import support_rows
from fastlaplace.prior import inner_loss_scale
from fastlaplace.runs import load_for_evaluation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--tasks", type=int, default=600)
    args = p.parse_args()
    learner, problem, cfg = load_for_evaluation(args.checkpoint, device="cpu")
    batch = problem.sample("test", args.tasks, torch.Generator().manual_seed(cfg.eval_seed))
    with torch.no_grad():
        params = learner.adapt(batch.x_support, batch.y_support)
    rows = support_rows(learner.net, params, batch.x_support, batch.y_support, learner.likelihood, learner.fisher,
                        create_graph=False)
    s = inner_loss_scale(learner.loss, batch.y_support)
    print(f"α = {learner.inner_lr}, K = {learner.inner_steps}, s = {s:g}, {args.tasks} test tasks")
    print("| layer | max αh | median over tasks of the task's max αh | share of directions with αh ≥ 1 |")
    print("|---|---|---|---|")
    for record, a, g in rows:
        A, G = ops.kron_factors(a.detach(), g.detach(), record.bias)
        ea, eg = torch.linalg.eigvalsh(A.double()).clamp_min(0), torch.linalg.eigvalsh(G.double()).clamp_min(0)
        ah = learner.inner_lr * s * g.shape[1] * eg.unsqueeze(-1) * ea.unsqueeze(-2)  # [tasks, d_G, d_A]
        per_task = ah.flatten(1).max(1).values
        print(f"| {record.name} | {float(ah.max()):.3g} | {float(per_task.median()):.3g} | "
              f"{float((ah >= 1).double().mean()):.2%} |")


if __name__ == "__main__":
    main()
