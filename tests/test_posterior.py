"""The Laplace posterior: sampler moments against the analytic covariance, predictions, metrics, plots."""

import math
import subprocess
import sys

import pytest
import torch
from helpers import dense_kfac_precision, dense_posterior_covariance, dense_posterior_precision
from torch.func import functional_call, jacrev, vmap

from fastlaplace import LLAMA, ops, sinusoid_mlp
from fastlaplace.calibration import (
    Z50,
    Z90,
    NoiseModel,
    coverage,
    laplace_marginal_nll,
    laplace_marginal_nlls,
    mixture_nll,
    point_nll,
)
from fastlaplace.curvature import rows_logdet, support_rows
from fastlaplace.data import SinusoidTasks
from fastlaplace.posterior import EigenLayerPosterior, FactoredLayerPosterior, LayerPosterior, Predictive
from fastlaplace.prior import Prior
from fastlaplace.problems import SinusoidProblem
from fastlaplace.uncertainty import calibrate, report

F64 = torch.float64


def small_layer(method, d_in=2, d_out=2, rows=3, tasks=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(tasks, rows, d_in, generator=g, dtype=F64)
    gr = torch.randn(tasks, rows, d_out, generator=g, dtype=F64)
    from fastlaplace.reference import kron_factors
    A, G = kron_factors(a, gr, bias=True)
    weight = torch.randn(tasks, d_out, d_in, generator=g, dtype=F64)
    bias = torch.randn(tasks, d_out, generator=g, dtype=F64)
    return LayerPosterior.build("layer", weight, bias, A, G, scale=float(rows), tau=0.7, method=method)


@pytest.mark.parametrize("method", ["factored", "exact"])
def test_sample_moments_match_analytic_covariance(method):
    post = small_layer(method)
    n = 200_000
    W = post.sample(n, torch.Generator().manual_seed(1))  # [n, tasks, d_out, d_A]
    vec = W.mT.reshape(n, W.shape[1], -1)  # column-stacked vec([W | b])
    analytic = torch.linalg.inv(dense_kfac_precision(post.A, post.G, post.scale, 0.7, method))
    for t in range(W.shape[1]):
        torch.testing.assert_close(vec[:, t].mean(0), post.mean[t].mT.reshape(-1),
                                   atol=0.02 * analytic[t].diagonal().max().sqrt(), rtol=0)
        empirical = torch.cov(vec[:, t].T)
        assert (empirical - analytic[t]).abs().max() <= 0.03 * analytic[t].abs().max()


@pytest.mark.parametrize("method", ["factored", "exact"])
@pytest.mark.parametrize("shape", [(2, 2, 3), (3, 1, 4), (2, 4, 1)], ids=str)  # d_in, d_out, rows
def test_layer_posterior_interface_matches_dense(method, shape):
    """Both kinds against the dense precision built with torch.kron (tests/helpers.py): the
    precision, the covariance, the marginal variances, the log-det, and the log-det of the
    compiled kron_logdet op on the same factors."""
    post = small_layer(method, *shape)
    assert isinstance(post, {"factored": FactoredLayerPosterior, "exact": EigenLayerPosterior}[method])
    assert post.method == method
    dense = dense_kfac_precision(post.A, post.G, post.scale, 0.7, method)
    T, d_out, d_A = post.mean.shape
    torch.testing.assert_close(dense_posterior_precision(post), dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dense_posterior_covariance(post), torch.linalg.inv(dense), rtol=1e-8, atol=1e-10)
    diag = torch.linalg.inv(dense).diagonal(dim1=-2, dim2=-1).reshape(T, d_A, d_out).mT  # vec is column-stacked
    torch.testing.assert_close(post.variance(), diag, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(post.logdet(), torch.linalg.slogdet(dense).logabsdet, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(post.logdet(), ops.kron_logdet(post.A, post.G, post.scale, 0.7, method),
                               rtol=1e-10, atol=1e-9)


def test_layer_posterior_errors():
    with pytest.raises(ValueError, match=r"method must be one of \('factored', 'exact'\)"):
        small_layer("diagonal")
    A = torch.eye(2, dtype=F64)[None]
    with pytest.raises(ValueError, match="needs method='exact'"):
        LayerPosterior.build("x", torch.zeros(1, 2, 2), None, A, A, 1.0, lambda a, g: a, "factored")


def test_exact_sampler_covariance_is_inverse_dense_precision():
    post = small_layer("exact", d_in=3, d_out=2, rows=2)
    for t in range(post.A.shape[0]):
        UA, UG = post.U_A[t], post.U_G[t]
        U = torch.kron(UA, UG)  # vec(U_G E U_Aᵀ) = (U_A ⊗ U_G) vec(E)
        sampler_cov = U @ torch.diag(post.std[t].mT.reshape(-1) ** 2) @ U.T
        D = post.A.shape[-1] * post.G.shape[-1]
        precision = post.scale * torch.kron(post.A[t], post.G[t]) + post.tau * torch.eye(D, dtype=F64)
        torch.testing.assert_close(sampler_cov, torch.linalg.inv(precision), rtol=1e-10, atol=1e-12)


def sinusoid_learner(method="factored"):
    torch.manual_seed(0)
    return LLAMA(sinusoid_mlp(), tau=1.0, logdet_method=method)


@pytest.mark.parametrize("method", ["factored", "exact"])
@pytest.mark.parametrize("linearized", [True, False])
def test_posterior_predict_shapes(method, linearized):
    learner = sinusoid_learner(method)
    b = SinusoidTasks().sample(3, torch.Generator().manual_seed(0))
    post = learner.posterior(b.x_support, b.y_support)
    params = post.sample(4)
    assert params["0.weight"].shape == (4, 3, 40, 1) and params["4.bias"].shape == (4, 3, 1)
    pred = post.predict(b.x_query, 7, torch.Generator().manual_seed(1), linearized=linearized)
    assert pred.samples.shape == (7, 3, 10, 1)
    assert pred.mean.shape == (3, 10, 1) and bool((pred.std > 0).all())
    # the samples spread around the posterior mode
    torch.testing.assert_close(post.predict(b.x_query, 2000, linearized=True).mean,
                               learner.predict(post.params, b.x_query), atol=0.3, rtol=0)


def test_posterior_errors():
    learner = sinusoid_learner()
    b = SinusoidTasks().sample(3, torch.Generator().manual_seed(0))
    post = learner.posterior(b.x_support, b.y_support)
    with pytest.raises(ValueError, match="samples"):
        post.sample(0)
    with pytest.raises(ValueError, match="samples"):
        post.predict(b.x_query, -1)
    with pytest.raises(ValueError, match="tasks"):
        post.predict(b.x_query[:2], 5)
    with pytest.raises(ValueError, match="targets must be"):
        learner.posterior(b.x_support, b.y_support[:, :4])
    with pytest.raises(ValueError, match="tau"):
        learner.posterior(b.x_support, b.y_support, tau=-1.0)


def repeated_primal_pushforward(post, x, drawn):
    """The linearised predictive written plainly: the network at φ̂ repeated once per sample,
    one jvp over all of them."""
    n = next(iter(drawn.values())).shape[0]
    modes = {k: v.repeat(n, *[1] * (v.dim() - 1)) for k, v in post.params.items()}
    tangents = {k: drawn[k].flatten(0, 1) - modes[k] if k in drawn else torch.zeros_like(v) for k, v in modes.items()}
    xs = x.repeat(n, *[1] * (x.dim() - 1))
    f, df = torch.func.jvp(lambda p: post.net(p, xs)[0], (modes,), (tangents,))
    return f[: post.tasks], df.reshape(n, post.tasks, *df.shape[1:])


@pytest.mark.parametrize("case", ["mlp", "conv-grouped", "conv-loop", "conv-auto", "conv-head-only"])
def test_linearized_predictive_computes_the_network_at_the_mode_once(case):
    """The samples' tangents batched by vmap against the mode, in float64: the same mode and
    the same J(φ − φ̂) as repeating the network at the mode once per sample (convolutions
    under each strategy, per-task BatchNorm, layers left out of adaptation)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if case == "mlp":
        learner = LLAMA(sinusoid_mlp(), tau=1.0).double()
        b = SinusoidTasks().sample(3, g)
        xs, ys, xq = b.x_support.double(), b.y_support.double(), b.x_query.double()
    else:
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                  torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3))
        strategy = case.split("-")[1] if case != "conv-head-only" else "grouped"
        learner = LLAMA(net, tau=1.0, loss="cross_entropy", conv_strategy=strategy,
                        adapt=["5"] if case == "conv-head-only" else None).double()
        xs, xq = (torch.rand(2, n, 1, 8, 8, generator=g, dtype=torch.float64) for n in (3, 6))
        ys = torch.arange(3).expand(2, -1).contiguous()
    post = learner.posterior(xs, ys)
    drawn = post.sample(4, torch.Generator().manual_seed(2))
    with torch.no_grad():
        mode, jvps = post._pushforward(xq, drawn)
        want_mode, want_jvps = repeated_primal_pushforward(post, xq, drawn)
    torch.testing.assert_close(mode, want_mode, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jvps, want_jvps, rtol=1e-10, atol=1e-12)
    assert jvps.shape == (4, *mode.shape) and bool(jvps.abs().amax() > 0)
    pred = post.predict(xq, 4, torch.Generator().manual_seed(2))
    torch.testing.assert_close(pred.samples, want_mode + want_jvps, rtol=1e-10, atol=1e-12)


def test_posteriors_under_several_priors_equal_separate_calls():
    """One adaptation and curvature for a sweep of priors: each posterior is the one a
    separate call gives (sampled-label Fisher from the same generator state, both methods)."""
    learner = LLAMA(sinusoid_mlp(), tau=1.0, fisher="sampled")
    b = SinusoidTasks().sample(3, torch.Generator().manual_seed(0))
    priors = [0.5, 100.0, "early_stopping_first_order", "early_stopping"]
    swept = learner.posteriors(b.x_support, b.y_support, priors, generator=torch.Generator().manual_seed(3))
    assert len(swept) == len(priors)
    for prior, post in zip(priors, swept):
        alone = learner.posterior(b.x_support, b.y_support, prior=prior, generator=torch.Generator().manual_seed(3))
        assert [layer.name for layer in post.layers] == [layer.name for layer in alone.layers]
        for k in alone.params:
            assert torch.equal(post.params[k], alone.params[k])
        one, other = (p.predict(b.x_query, 5, torch.Generator().manual_seed(4)) for p in (post, alone))
        torch.testing.assert_close(one.samples, other.samples, rtol=0, atol=0)
    # the priors differ, so do the posteriors' spreads
    spreads = [p.predict(b.x_query, 200, torch.Generator().manual_seed(4)).std.mean() for p in swept[:2]]
    assert spreads[0] > 2 * spreads[1]
    with pytest.raises(ValueError, match="at least one prior"):
        learner.posteriors(b.x_support, b.y_support, [])
    with pytest.raises(TypeError, match="a list of priors"):
        learner.posteriors(b.x_support, b.y_support, "early_stopping")
    with pytest.raises(ValueError, match="exact"):  # checked before any work
        learner.posteriors(b.x_support, b.y_support, [1.0, "early_stopping"], method="factored")


def test_metrics():
    torch.manual_seed(0)
    y = torch.zeros(2, 5000, 1)
    pred = Predictive(torch.zeros(1, 2, 5000, 1))
    noisy = y + torch.randn_like(y)
    assert abs(float(coverage(pred, noisy, 1.0, Z90).mean()) - 0.9) < 0.02
    assert abs(float(coverage(pred, noisy, 1.0, Z50).mean()) - 0.5) < 0.02
    # one sample: the mixture NLL is the point NLL
    torch.testing.assert_close(mixture_nll(pred, noisy, 0.5), point_nll(pred.samples[0], noisy, 0.5))
    zero = torch.zeros(1, 1, 1)
    assert float(point_nll(zero, zero, 1.0)) == pytest.approx(0.5 * math.log(2 * math.pi))
    noise = NoiseModel(0.1, 0.5)
    ys = torch.ones(3, 4, 1) * 2
    torch.testing.assert_close(noise.variance(ys), torch.full((3, 1, 1), 2.1))


def jacobian_kfac_precisions(model, phi, x, tau, method):
    """Per task, the dense precision of each Linear layer's K-FAC block under the Gauss-Newton
    Fisher of a one-output MLP, from per-example Jacobians alone: g_n = ∂f_n/∂b (the
    Jacobian with respect to the layer's bias) and ā_n the layer's input (a forward hook on
    the plain module), checked against the weight's Jacobian, which is g_n ā_nᵀ. Shares no
    code with fastlaplace's row capture (batched.py, curvature.py) or its log-dets."""
    linears = [name for name, m in model.named_children() if isinstance(m, torch.nn.Linear)]
    out = []
    for t in range(x.shape[0]):
        p = {k: v[t] for k, v in phi.items()}
        inputs = {}
        hooks = [getattr(model, name).register_forward_hook(
            lambda m, args, _, name=name: inputs.__setitem__(name, args[0])) for name in linears]
        functional_call(model, p, (x[t],))
        for h in hooks:
            h.remove()
        J = vmap(jacrev(lambda p, xn: functional_call(model, p, (xn[None],))[0, 0]), in_dims=(None, 0))(p, x[t])
        N = x.shape[1]
        blocks = []
        for name in linears:
            g = J[f"{name}.bias"]  # [N, d_out]
            a = torch.cat([inputs[name], torch.ones(N, 1, dtype=x.dtype)], -1)  # [N, d_in + 1]
            torch.testing.assert_close(J[f"{name}.weight"], g[:, :, None] * a[:, None, :-1])
            A, G = (a.T @ a / N)[None], (g.T @ g / N)[None]
            blocks.append(dense_kfac_precision(A, G, float(N), tau, method)[0])
        out.append(blocks)
    return out


def test_laplace_marginal_nll_draws_the_fisher_labels_from_its_generator():
    """A classification learner's sampled-label Fisher: the same generator seed gives the same
    estimate, equal to the parts of the posterior built with that seed; another seed another."""
    from helpers import tiny_convnet

    torch.manual_seed(0)
    learner = LLAMA(tiny_convnet(), tau=1.0, loss="cross_entropy", fisher="sampled").double()
    g = torch.Generator().manual_seed(1)
    xs = torch.rand(2, 6, 1, 4, 4, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 3, (2, 6), generator=g)

    def seeded(seed):
        return torch.Generator().manual_seed(seed)

    got = laplace_marginal_nll(learner, xs, ys, prior=2.0, generator=seeded(3))
    torch.testing.assert_close(laplace_marginal_nll(learner, xs, ys, prior=2.0, generator=seeded(3)), got,
                               rtol=0, atol=0)
    post = learner.posterior(xs, ys, prior=2.0, generator=seeded(3))
    with torch.no_grad():
        data = learner.task_losses(learner.predict(post.params, xs), ys) * ys.shape[1]
        want = data + post.laplace_terms(learner.net.adapted_parameters())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(laplace_marginal_nll(learner, xs, ys, prior=2.0, generator=seeded(4)), got)
    # a sweep over priors: one adaptation and curvature, the figures of separate calls
    swept = laplace_marginal_nlls(learner, xs, ys, [2.0, 50.0], generator=seeded(3))
    separate = torch.stack([got, laplace_marginal_nll(learner, xs, ys, prior=50.0, generator=seeded(3))])
    torch.testing.assert_close(swept, separate, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["factored", "exact"])
def test_laplace_marginal_nll_matches_dense_jacobian_computation(method):
    """−log p(X|θ) from its parts, each computed independently: data NLL at φ̂, the prior's
    quadratic and normaliser, ½ log det Ĥ of dense K-FAC blocks built from per-example
    Jacobians; and the posterior's log det Ĥ against the same blocks and the compiled op."""
    learner, b = tiny_learner(2), tiny_batch(tasks=3)
    learner.logdet_method = method
    out = laplace_marginal_nll(learner, b.x_support, b.y_support)
    assert out.shape == (3,) and bool(torch.isfinite(out).all())
    tau = 3.0
    phi = learner.adapt(b.x_support, b.y_support)
    with torch.no_grad():
        f = learner.predict(phi, b.x_support)
    nll = (0.5 * (f - b.y_support) ** 2 + 0.5 * math.log(2 * math.pi)).sum((1, 2))
    theta = learner.net.adapted_parameters()
    sq = sum((phi[k] - theta[k]).pow(2).flatten(1).sum(1) for k in phi)
    D = sum(p.numel() for p in theta.values())
    blocks = jacobian_kfac_precisions(learner.model, phi, b.x_support, tau, method)
    logdet = torch.stack([sum(torch.linalg.slogdet(H).logabsdet for H in task) for task in blocks])
    expected = nll + 0.5 * tau * sq - 0.5 * D * math.log(tau) + 0.5 * logdet
    torch.testing.assert_close(laplace_marginal_nll(learner, b.x_support, b.y_support, prior=tau), expected.detach())
    post = learner.posterior(b.x_support, b.y_support, tau=tau)
    torch.testing.assert_close(post.logdet(), logdet, rtol=1e-9, atol=1e-9)
    rows = support_rows(learner.net, phi, b.x_support, b.y_support, "gaussian", create_graph=False)
    torch.testing.assert_close(rows_logdet(rows, tau, method), logdet, rtol=1e-9, atol=1e-9)


def test_report_runs_on_few_tasks():
    learner = sinusoid_learner()
    problem = SinusoidProblem(SinusoidTasks())
    cal = calibrate(learner, problem, tasks=10, prior=Prior.validation([1.0, 100.0]), samples=5)
    assert cal.prior in (Prior.of(1.0), Prior.of(100.0))
    out = report(learner, problem, tasks=12, samples=5, calibration=cal)
    for key in ("llama_nll", "maml_point_nll", "coverage50", "coverage90", "laplace_marginal_nll",
                "extrapolation_std_ratio"):
        assert math.isfinite(out[key]["mean"]), key


def test_plot_cli(tmp_path):
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "fastlaplace.train", "--iterations", "3", "--eval-tasks", "5", "--val-every",
                    "2", "--val-tasks", "5", "--out", str(out), "--no-progress"], check=True, capture_output=True,
                   timeout=300, cwd=tmp_path)
    for args in (["posterior", str(out / "checkpoint.pt"), "--tau", "10"], ["curves", str(out)]):
        png = tmp_path / f"{args[0]}.png"
        run = subprocess.run([sys.executable, "-m", "fastlaplace.plot", *args, "--out", str(png)],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        assert png.stat().st_size > 10_000


# ------------------------------------------------------------------ the inner loop's implicit prior
def tiny_learner(steps=2):
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(1, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).double()
    return LLAMA(net, inner_lr=0.05, inner_steps=steps, tau=1.0)


def tiny_batch(tasks=2, support=4):
    b = SinusoidTasks(support=support, query=3).sample(tasks, torch.Generator().manual_seed(5), dtype=F64)
    return b


def dense_implicit_prior(layer, s, lr, steps):
    """Per task: the prior precision (s·Q_L)⁻¹ with Q_L from theory.early_stopping_prior of the
    dense inner-loss curvature s·c·A⊗G, and the posterior precision c·A⊗G + (s·Q_L)⁻¹."""
    from fastlaplace.theory import early_stopping_prior
    out = []
    for t in range(layer.A.shape[0]):
        fisher = layer.scale * torch.kron(layer.A[t], layer.G[t])
        fisher = 0.5 * (fisher + fisher.T)
        Q = early_stopping_prior(s * fisher, steps, lr=lr)
        prior = torch.linalg.inv(s * Q)
        out.append((prior, fisher + prior))
    return out


@pytest.mark.parametrize("steps", [1, 3])
def test_implicit_prior_matches_dense_theory(steps):
    """Exact per-direction prior against a dense computation on a tiny network (float64): its
    covariance, and the first-order τ = N/(2αK) as the limit of small steps."""
    learner, b = tiny_learner(steps), tiny_batch()
    post = learner.posterior(b.x_support, b.y_support, prior="early_stopping")
    s = 2.0 / b.y_support.shape[1]
    for layer in post.layers:
        assert layer.method == "exact" and layer.tau.shape == layer.mean.shape
        for t, (_prior, precision) in enumerate(dense_implicit_prior(layer, s, learner.inner_lr, steps)):
            torch.testing.assert_close(dense_posterior_covariance(layer)[t], torch.linalg.inv(precision),
                                       rtol=1e-8, atol=1e-10)
    first = learner.posterior(b.x_support, b.y_support, prior="early_stopping_first_order")
    N = b.y_support.shape[1]
    assert all(layer.tau == pytest.approx(N / (2 * learner.inner_lr * steps)) for layer in first.layers)
    # α → 0: the exact prior's precision tends to the first-order one in every direction.
    learner.inner_lr = 1e-7
    small = learner.posterior(b.x_support, b.y_support, prior="early_stopping")
    for layer in small.layers:
        torch.testing.assert_close(layer.tau, torch.full_like(layer.tau, N / (2e-7 * steps)), rtol=1e-4, atol=0)


def test_implicit_prior_scale_for_cross_entropy():
    from fastlaplace.prior import first_order_tau, inner_loss_scale
    y = torch.zeros(3, 5, dtype=torch.long)
    assert first_order_tau("cross_entropy", y, 0.1, 2) == pytest.approx(5 / 0.2)
    assert inner_loss_scale("mse", torch.zeros(3, 10, 2)) == pytest.approx(2 / 20)


def test_marginal_nll_under_implicit_prior_matches_dense():
    learner, b = tiny_learner(2), tiny_batch()
    got = laplace_marginal_nll(learner, b.x_support, b.y_support, prior="early_stopping")
    phi = learner.adapt(b.x_support, b.y_support)
    with torch.no_grad():
        f = learner.predict(phi, b.x_support)
    expected = (0.5 * (f - b.y_support) ** 2 + 0.5 * math.log(2 * math.pi)).sum((1, 2))
    theta = learner.net.adapted_parameters()
    post = learner.posterior(b.x_support, b.y_support, prior="early_stopping")
    for layer in post.layers:
        W = torch.cat([theta[f"{layer.name}.weight"], theta[f"{layer.name}.bias"].unsqueeze(-1)], -1)
        delta = (layer.mean - W).mT.reshape(layer.mean.shape[0], -1)  # column-stacked vec
        for t, (prior, precision) in enumerate(dense_implicit_prior(layer, 2.0 / 4, learner.inner_lr, 2)):
            expected[t] += (0.5 * delta[t] @ prior @ delta[t] - 0.5 * torch.logdet(prior)
                            + 0.5 * torch.logdet(precision))
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)
    tau = 4 / (2 * learner.inner_lr * 2)
    first_order = laplace_marginal_nll(learner, b.x_support, b.y_support, prior="early_stopping_first_order")
    torch.testing.assert_close(first_order,
                               laplace_marginal_nll(learner, b.x_support, b.y_support, prior=tau))


def test_implicit_prior_errors_and_report():
    learner, b = tiny_learner(1), tiny_batch()
    with pytest.raises(ValueError, match="needs method='exact'"):
        learner.posterior(b.x_support, b.y_support, prior="early_stopping", method="factored")
    with pytest.raises(ValueError, match="either tau or prior"):
        learner.posterior(b.x_support, b.y_support, tau=1.0, prior="early_stopping")
    with pytest.raises(ValueError, match="prior must be a positive number, .* or one of"):
        learner.posterior(b.x_support, b.y_support, prior="flat")
    learner.inner_lr = 0.5  # the inner step overshoots in some directions: flat prior (precision 0) there
    post = learner.posterior(b.x_support, b.y_support, prior="early_stopping")
    taus = torch.cat([layer.tau.flatten() for layer in post.layers])
    assert bool((taus == 0).any()) and bool((taus > 0).any())
    assert all(bool(torch.isfinite(layer.std).all()) for layer in post.layers)
    assert bool(torch.isfinite(laplace_marginal_nll(learner, b.x_support, b.y_support, prior="early_stopping")).all())
    learner = sinusoid_learner("exact")
    problem = SinusoidProblem(SinusoidTasks())
    for prior in ("early_stopping", "early_stopping_first_order"):
        out = report(learner, problem, tasks=8, samples=5, prior=prior)
        assert out["calibration"]["prior"] == prior == out["prior"]
        for key in ("llama_nll", "coverage50", "coverage90", "laplace_marginal_nll_at_prior",
                    "extrapolation_std_ratio"):
            assert math.isfinite(out[key]["mean"]), key


# ------------------------------------------------------------------ observation noise (docs/design.md §6)
@pytest.mark.parametrize("prior", ["early_stopping", "early_stopping_first_order", 3.0])
def test_noise_scales_the_covariance_as_bayesian_linear_regression(prior):
    """For a linear model K-FAC is exact (c·A⊗G = XᵀX), so the posterior must be Bayesian linear
    regression's (float64). Under noise σ² the prior whose MAP is the inner loop's iterate φ̂ has
    covariance σ²·(s·Q) (the inner loss is on the squared error's scale), and the posterior
    covariance is σ²(XᵀX + (sQ)⁻¹)⁻¹: the unit-noise one scaled by σ², with τ unchanged."""
    from fastlaplace.theory import early_stopping_prior
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 1)).double()
    lr, steps, N, var = 0.05, 3, 6, 0.3
    learner = LLAMA(net, inner_lr=lr, inner_steps=steps, logdet_method="exact")
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(2, N, 3, generator=g, dtype=F64)
    ys = torch.randn(2, N, 1, generator=g, dtype=F64)
    post = learner.posterior(xs, ys, prior=prior, method="exact", noise_var=var)
    (layer,) = post.layers
    theta = torch.cat([net[0].weight.detach(), net[0].bias.detach()[:, None]], 1).reshape(-1)  # vec [W | b]
    s = 2.0 / N
    for t in range(2):
        X = torch.cat([xs[t], torch.ones(N, 1, dtype=F64)], 1)
        XtX = X.T @ X
        if prior == "early_stopping":
            prior_precision = torch.linalg.inv(s * early_stopping_prior(s * XtX, steps, lr=lr))
        else:
            tau = prior if isinstance(prior, float) else 1 / (s * lr * steps)
            prior_precision = tau * torch.eye(4, dtype=F64)
        # Bayesian linear regression with noise σ² and prior N(θ, σ²·Λ⁻¹)
        cov = torch.linalg.inv(XtX / var + prior_precision / var)
        map_ = theta + cov @ X.T @ (ys[t, :, 0] - X @ theta) / var
        torch.testing.assert_close(cov, var * dense_posterior_covariance(layer)[t], rtol=1e-9, atol=1e-12)
        if prior == "early_stopping":  # the implicit prior's MAP is the iterate itself, at any σ²
            torch.testing.assert_close(layer.mean[t].reshape(-1), map_, rtol=1e-9, atol=1e-12)
    # sampling applies σ per task: the deviations are exactly σ times the unit-noise ones
    unit = post.with_noise(1.0).sample(3, torch.Generator().manual_seed(2))
    noisy = post.sample(3, torch.Generator().manual_seed(2))
    for k, v in noisy.items():
        torch.testing.assert_close(v - post.params[k], var**0.5 * (unit[k] - post.params[k]))
    # the linearised predictive rescales exactly
    pred = post.with_noise(1.0).predict(xs, 4, torch.Generator().manual_seed(3))
    again = post.predict(xs, 4, torch.Generator().manual_seed(3))
    torch.testing.assert_close(pred.rescaled(torch.full((2,), var**0.5, dtype=F64)).samples, again.samples)
    with pytest.raises(ValueError, match="noise_var"):
        post.with_noise(torch.tensor([1.0, -1.0]))
