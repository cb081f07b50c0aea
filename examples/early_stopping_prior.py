"""The implicit prior of early stopping (Grant et al. 2018, Section 3.2), seen on a random problem.

Runs k steps of gradient descent on a random linear regression, compares the iterate with
the MAP estimate under N(θ, Q) for the Q that fastlaplace.theory computes, and plots Q's
eigenvalues against k (written to early_stopping_prior.png when matplotlib is installed).

    python examples/early_stopping_prior.py
"""

import argparse

import torch

from fastlaplace.theory import early_stopping_prior, gradient_descent, map_estimate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=40, help="examples")
    p.add_argument("--d", type=int, default=5, help="parameters")
    p.add_argument("--rate", type=float, default=0.1, help="lr · largest eigenvalue of XᵀX")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="early_stopping_prior.png")
    args = p.parse_args()

    g = torch.Generator().manual_seed(args.seed)
    X = torch.randn(args.n, args.d, generator=g, dtype=torch.float64)
    y = X @ torch.randn(args.d, generator=g, dtype=torch.float64) + 0.1 * torch.randn(args.n, generator=g,
                                                                                       dtype=torch.float64)
    theta = torch.randn(args.d, generator=g, dtype=torch.float64)
    H = X.T @ X
    lr = args.rate / float(torch.linalg.eigvalsh(H).max())

    print(f"linear regression: {args.n} examples, {args.d} parameters, lr = {lr:.4g} (lr·λ_max = {args.rate})")
    print(f"{'k':>4}  {'‖φ_k − φ_MAP‖ / ‖φ_k‖':>22}  {'eigenvalues of Q'}")
    steps = [1, 2, 5, 10, 20, 50]
    spectra = []
    for k in steps:
        Q = early_stopping_prior(H, k, lr=lr)
        phi_k = gradient_descent(X, y, theta, k, lr=lr)
        gap = float(torch.linalg.norm(phi_k - map_estimate(X, y, theta, Q)) / torch.linalg.norm(phi_k))
        eig = torch.linalg.eigvalsh(Q)
        spectra.append(eig)
        print(f"{k:>4}  {gap:>22.2e}  " + " ".join(f"{float(e):.3g}" for e in eig))

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i in range(args.d):
        ax.plot(steps, [float(s[i]) for s in spectra], marker="o")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gradient steps k")
    ax.set_ylabel("eigenvalues of the prior covariance Q")
    ax.set_title("Early stopping as a Gaussian prior N(θ, Q)")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
