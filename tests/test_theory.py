"""Section 3.2: k steps of gradient descent equal the MAP estimate under N(θ, Q)."""

import pytest
import torch

from fastlaplace.theory import early_stopping_prior, early_stopping_variance, gradient_descent, map_estimate

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
    with pytest.raises(ValueError, match="positive semi-definite"):
        early_stopping_prior(-H, 3, lr=0.1 / lmax)
    with pytest.raises(ValueError, match="positive semi-definite"):
        early_stopping_prior(H - 2 * torch.linalg.eigvalsh(H).min() * torch.eye(H.shape[0], dtype=F64), 3,
                             lr=0.1 / lmax)
    with pytest.raises(ValueError, match="even number of steps"):
        early_stopping_prior(H, 3, lr=1.5 / lmax)  # 1 < αλ < 2 with odd k
    with pytest.raises(ValueError, match="too large"):
        early_stopping_prior(H, 4, lr=2.5 / lmax)  # αλ ≥ 2: diverges
    with pytest.raises(ValueError, match="positive semi-definite"):
        early_stopping_variance(torch.tensor([-1.0, 1.0], dtype=F64), 2, lr=0.1)
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


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_positive_semi_definite_curvature(steps):
    """Fewer examples than parameters (the few-shot case): H has a null space, where the
    iterates never move and the prior variance is αk; elsewhere GD is still the MAP."""
    X, y, theta = problem(n=3, d=7, seed=4)
    H = X.T @ X
    lr = well_conditioned_rate(steps) / float(torch.linalg.eigvalsh(H).max())
    Q = early_stopping_prior(H, steps, lr=lr)
    torch.testing.assert_close(Q, Q.T)
    null = torch.linalg.svd(X).Vh[3:].T  # [d, d − n], orthonormal basis of H's null space
    torch.testing.assert_close(null.T @ Q @ null, lr * steps * torch.eye(4, dtype=F64), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gradient_descent(X, y, theta, steps, lr=lr), map_estimate(X, y, theta, Q),
                               rtol=1e-10, atol=1e-10)
    # Same with a preconditioner, and the zero-curvature limit of the per-direction variance.
    B = random_spd(7, 5) * lr
    Qb = early_stopping_prior(H, steps, precond=B)
    torch.testing.assert_close(gradient_descent(X, y, theta, steps, precond=B), map_estimate(X, y, theta, Qb),
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(early_stopping_variance(torch.zeros(2, dtype=F64), steps, lr=lr),
                               torch.full((2,), lr * steps, dtype=F64))


@pytest.mark.parametrize("steps", [2, 4])
def test_even_steps_past_the_midpoint(steps):
    """1 < αλ < 2 with an even number of steps: the iterate oscillates around the minimiser
    but ends on θ's side, closer, which is still the MAP under a Gaussian prior."""
    X, y, theta = problem(n=30, d=5, seed=3)
    H = X.T @ X
    lam = torch.linalg.eigvalsh(H)
    lr = 1.3 / float(lam.max())
    assert float(lr * lam.max()) > 1 and float(lr * lam.min()) < 1
    Q = early_stopping_prior(H, steps, lr=lr)
    assert bool((torch.linalg.eigvalsh(Q) > 0).all())
    torch.testing.assert_close(gradient_descent(X, y, theta, steps, lr=lr), map_estimate(X, y, theta, Q),
                               rtol=1e-9, atol=1e-9)


def test_variance_is_continuous_at_small_curvature():
    h = torch.tensor([0.0, 1e-12, 1e-6, 1e-2, 10.0, 60.0], dtype=F64)
    q = early_stopping_variance(h, 3, lr=0.01)
    exact = ((1 - 0.01 * h[3:]) ** -3 - 1) / h[3:]  # the plain formula, where it has no cancellation
    torch.testing.assert_close(q[3:], exact, rtol=1e-9, atol=0)
    series = 0.03 * (1 + 2 * 0.01 * h[:3])  # αk(1 + (k+1)/2·αh) for small h
    torch.testing.assert_close(q[:3], series, rtol=1e-12, atol=0)


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
