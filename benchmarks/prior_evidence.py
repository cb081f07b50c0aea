"""Which scalar prior precision τ the Laplace evidence of the support sets prefers, on a trained run.

    python benchmarks/prior_evidence.py runs/tune-digits/llama-eta1e-05-tau0.001-seed0/checkpoint.pt

Empirical Bayes needs no validation classes: per episode, the Laplace estimate of the support
set's −log p(X|θ) (:func:`fastlaplace.calibration.laplace_marginal_nlls`, paper equation 11) as a
function of τ, at the run's training inner steps (the Fisher's sampled labels seeded by
``--seed``). Prints, for episodes of the validation and the test split, the sum over episodes
for each τ of the grid and how many episodes each τ minimises. A τ preferred here but far below
the one that calibrates the predictive says the evidence is no way to choose it
(docs/uncertainty.md §2).
"""

from __future__ import annotations

import argparse

import torch

from fastlaplace.calibration import laplace_marginal_nlls
from fastlaplace.runs import load_for_evaluation

TAUS = (10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5, 1e6)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a LLAMA checkpoint.pt of an image or sinusoid run")
    p.add_argument("--episodes", type=int, default=40, help="episodes per split")
    p.add_argument("--taus", type=float, nargs="+", default=list(TAUS))
    p.add_argument("--seed", type=int, default=5)
    args = p.parse_args()

    learner, problem, _ = load_for_evaluation(args.checkpoint)
    for split in ("val", "test"):
        b = problem.sample(split, args.episodes, torch.Generator().manual_seed(args.seed))
        # one adaptation and curvature (one draw of the Fisher's labels) for every τ
        marginal = laplace_marginal_nlls(learner, b.x_support, b.y_support, args.taus,
                                         generator=torch.Generator().manual_seed(args.seed))  # [taus, episodes]
        best = marginal.argmin(0)
        print(f"{split}: τ, summed −log p(X|θ) over {args.episodes} episodes, episodes it minimises")
        for i, tau in enumerate(args.taus):
            print(f"  {tau:>9g}  {float(marginal[i].sum()):14.1f}  {int((best == i).sum())}")


if __name__ == "__main__":
    main()
