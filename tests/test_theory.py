"""Section 3.2: k steps of gradient descent equal the MAP estimate under N(θ, Q)."""

import pytest
import torch

from fastlaplace.theory import early_stopping_prior, gradient_descent, map_estimate

F64 = torch.float64


def problem(n=30, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.randn(n, generator=g, dtype=F64)
    theta = torch.randn(d, generator=g, dtype=F64)
    return X, y, theta


def well_conditioned_rate(steps):
    """lr·λ_max ≤ 0.5, and small enough that Q's largest scale (1 − lr·λ)^(−k) stays ≤ 1e3:
    Q itself must be well conditioned for a 1e-10 comparison of two ways to compute φ."""
    return min(0.5, 1 - 1e3 ** (-1 / steps))


def random_spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=F64)
    return A @ A.T / d + 0.5 * torch.eye(d, dtype=F64)


@pytest.mark.parametrize("steps", [1, 5, 50])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plain_gradient_descent_is_map(steps, seed):
    X, y, theta = problem(seed=seed)
    H = X.T @ X
    lr = well_conditioned_rate(steps) / float(torch.linalg.eigvalsh(H).max())
    Q = early_stopping_prior(H, steps, lr=lr)
    phi_k = gradient_descent(X, y, theta, steps, lr=lr)
    phi_map = map_estimate(X, y, theta, Q)
    assert torch.linalg.norm(phi_k - phi_map) <= 1e-10 * torch.linalg.norm(phi_k)


@pytest.mark.parametrize("steps", [1, 5, 50])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_preconditioned_gradient_descent_is_map(steps, seed):
    X, y, theta = problem(seed=seed)
    H = X.T @ X
    B = random_spd(X.shape[1], seed + 10)
    B = B * (well_conditioned_rate(steps) / float(torch.linalg.eigvals(B @ H).real.max()))
    Q = early_stopping_prior(H, steps, precond=B)
    phi_k = gradient_descent(X, y, theta, steps, precond=B)
    phi_map = map_estimate(X, y, theta, Q)
    assert torch.linalg.norm(phi_k - phi_map) <= 1e-10 * torch.linalg.norm(phi_k)
    torch.testing.assert_close(Q, Q.T)
    assert bool(torch.linalg.eigvalsh(Q).min() > 0)


def test_prior_widens_with_more_steps():
    X, _, _ = problem()
    H = X.T @ X
    lr = 0.3 / float(torch.linalg.eigvalsh(H).max())
    traces = [float(torch.trace(early_stopping_prior(H, k, lr=lr))) for k in (1, 5, 50)]
    assert traces[0] < traces[1] < traces[2]


def test_plain_equals_scalar_preconditioner():
    X, _, _ = problem()
    H = X.T @ X
    lr = 0.4 / float(torch.linalg.eigvalsh(H).max())
    eye = torch.eye(H.shape[0], dtype=F64)
    torch.testing.assert_close(early_stopping_prior(H, 7, lr=lr), early_stopping_prior(H, 7, precond=lr * eye))


def test_errors():
    X, y, theta = problem()
    H = X.T @ X
    lmax = float(torch.linalg.eigvalsh(H).max())
    with pytest.raises(ValueError, match="too large"):
        early_stopping_prior(H, 3, lr=1.0 / lmax)
    with pytest.raises(ValueError, match="positive definite"):
        early_stopping_prior(-H, 3, lr=0.1 / lmax)
    with pytest.raises(ValueError, match="positive definite"):
        early_stopping_prior(torch.ones(3, 3, dtype=F64), 3, lr=0.01)
    with pytest.raises(ValueError, match="square"):
        early_stopping_prior(X, 3, lr=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        early_stopping_prior(H, 3)
    with pytest.raises(ValueError, match="steps"):
        early_stopping_prior(H, 0, lr=0.1 / lmax)
    with pytest.raises(ValueError, match="shapes do not match"):
        map_estimate(X, y[:-1], theta, H)
    with pytest.raises(ValueError, match="precond must have"):
        early_stopping_prior(H, 3, precond=torch.eye(2, dtype=F64))


def test_example_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "early_stopping_prior.py"
    # From the repository root, as the README has it.
    run = subprocess.run([sys.executable, str(script), "--plot", str(tmp_path / "q.png")], capture_output=True,
                         text=True, timeout=120, cwd=script.parents[1])
    assert run.returncode == 0, run.stderr
    gaps = [float(line.split()[1]) for line in run.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(gaps) == 6 and max(gaps) < 1e-10
    assert (tmp_path / "q.png").exists()
