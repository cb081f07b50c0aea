"""Calibrated uncertainty from LLAMA's posterior: metrics, calibration on validation tasks,
and ``python -m fastlaplace.uncertainty CHECKPOINT`` (the paper's Figure 5, measured).

Predictive distribution of a task at a point: the mixture over posterior samples of
N(f_s(x), σ²), with f_s the linearised network of each sample (see
:meth:`LaplacePosterior.predict`) and σ² the observation noise. Its negative log
likelihood is computed exactly (log-mean-exp over samples); central intervals use the
mixture's mean and variance (var_s f + σ²) under a Gaussian approximation.

Observation noise: a single σ² ("global"), or one per task proportional to the signal power
of its support set, σ_t² = k·mean(y_support²) + s₀ ("relative": sinusoid amplitudes span
0.1 to 5, so the misfit of a few-shot prediction scales with the task). The prior precision
τ and the noise model are chosen together on validation tasks (minimum predictive NLL),
never on test tasks — or τ is not chosen at all but taken from the inner loop's implicit
prior (the command's default, ``--prior early_stopping_first_order``: better calibrated on
sinusoids than the validation-chosen τ; :mod:`fastlaplace.prior`), and only the noise model is.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .batched import param_key
from .cli import MAXIMA, check_memory, check_output, errors_as_messages, positive_int
from .config import LOGDET_METHODS
from .curvature import rows_logdet, support_rows
from .evaluate import Estimate
from .meta import LLAMA, MAML
from .options import Prior, parse
from .posterior import LaplacePosterior, Predictive
from .prior import PRIORS, first_order_tau
from .runs import checkpoint_inputs, load_for_evaluation

Z50, Z90 = 0.6744897501960817, 1.6448536269514722


@dataclass(frozen=True)
class NoiseModel:
    """σ_t² = var (global) or k·mean(y_support²) + var (relative)."""

    var: float
    k: float = 0.0

    def variance(self, y_support: Tensor) -> Tensor:
        """[tasks, 1, 1] noise variance of each task."""
        power = y_support.pow(2).flatten(1).mean(1)
        return (self.k * power + self.var).view(-1, *[1] * (y_support.dim() - 1))

    @property
    def kind(self) -> str:
        return "relative" if self.k else "global"


def noise_grid() -> list[NoiseModel]:
    globals_ = [NoiseModel(10.0 ** (e / 4)) for e in range(-12, 5)]
    relatives = [NoiseModel(s0, k) for k in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5) for s0 in (0.001, 0.01, 0.05, 0.1, 0.2)]
    return globals_ + relatives


def mixture_nll(pred: Predictive, y: Tensor, noise_var: Tensor | float) -> Tensor:
    """Mean over points of −log (1/S) Σ_s N(y; f_s, σ²), per task [tasks]."""
    noise_var = torch.as_tensor(noise_var, dtype=y.dtype)
    log_p = -0.5 * ((y - pred.samples) ** 2 / noise_var + torch.log(2 * math.pi * noise_var))
    log_mix = torch.logsumexp(log_p, dim=0) - math.log(pred.samples.shape[0])
    return -log_mix.flatten(1).mean(1)


def point_nll(f: Tensor, y: Tensor, noise_var: Tensor | float) -> Tensor:
    """Gaussian NLL of a point prediction with noise σ², mean over points, per task."""
    noise_var = torch.as_tensor(noise_var, dtype=y.dtype)
    return (0.5 * ((y - f) ** 2 / noise_var + torch.log(2 * math.pi * noise_var))).flatten(1).mean(1)


def coverage(pred: Predictive, y: Tensor, noise_var: Tensor | float, z: float) -> Tensor:
    """Fraction of points inside mean ± z·sqrt(var_s f + σ²), per task."""
    sd = (pred.std**2 + noise_var).sqrt()
    return ((y - pred.mean).abs() <= z * sd).float().flatten(1).mean(1)


def laplace_marginal_nll(learner: LLAMA, x_support: Tensor, y_support: Tensor, tau: float | None = None,
                         prior: str | None = None) -> Tensor:
    """Per-task Laplace estimate of −log p(X_j | θ) (paper equation 11), [tasks]:
    −log p(X|φ̂) − log p(φ̂|θ) + ½·log det Ĥ − (D/2)·log 2π, with unit Gaussian noise
    (regression) or the categorical likelihood, D the number of adapted parameters.

    With a scalar τ (default: the training τ; ``prior="early_stopping_first_order"`` gives
    τ = 1/(s·α·K)) that is −log p(X|φ̂) + (τ/2)‖φ̂ − θ‖² − (D/2)·log τ + ½·log det Ĥ (the
    learner's log-det method). With ``prior="early_stopping"`` the prior is the inner loop's
    exact one per eigen-direction of each layer's A⊗G (exact log-det):
    Σ_ij [½·τ_ij·δ_ij² − ½·log τ_ij + ½·log(c·a_i·g_j + τ_ij)] with δ = U_Gᵀ(Φ̂ − Θ)U_A.
    """
    if prior is not None:
        prior = parse(Prior, prior, "prior")
    if prior == "early_stopping_first_order":
        tau = first_order_tau(learner.loss, y_support, learner.inner_lr, learner.inner_steps)
    tau = learner.tau if tau is None else tau
    with torch.no_grad():
        params = learner.adapt(x_support, y_support)
        out = learner.predict(params, x_support)
        T = out.shape[0]
        if learner.loss == "mse":
            nll = (0.5 * (out - y_support) ** 2 + 0.5 * math.log(2 * math.pi)).reshape(T, -1).sum(1)
        else:
            nll = learner.task_losses(out, y_support) * y_support.shape[1]
        theta = learner.net.adapted_parameters()
        if prior == "early_stopping":
            return nll + _implicit_prior_terms(learner.posterior(x_support, y_support, prior=prior), theta)
        sq = sum((params[k] - theta[k]).pow(2).flatten(1).sum(1) for k in params)
        D = sum(p.numel() for p in theta.values())
        rows = support_rows(learner.net, params, x_support, y_support, learner.likelihood, learner.fisher,
                            create_graph=False)
        logdet = rows_logdet(rows, tau, learner.logdet_method)
    return nll + 0.5 * tau * sq - 0.5 * D * math.log(tau) + 0.5 * logdet


def _implicit_prior_terms(post: LaplacePosterior, theta: dict[str, Tensor]) -> Tensor:
    """−log p(φ̂|θ) + ½·log det Ĥ − (D/2)·log 2π per task, from an exact posterior whose τ
    is per eigen-direction: Ĥ's eigenvalues are std⁻². Directions with a flat prior (precision
    0, where the inner step overshoots) add nothing to −log p(φ̂|θ): an improper prior has no
    normaliser."""
    total = 0.0
    for layer in post.layers:
        W = theta[param_key(layer.name, "weight")].reshape(layer.weight_shape[0], -1)
        if layer.bias:
            W = torch.cat([W, theta[param_key(layer.name, "bias")].unsqueeze(-1)], dim=-1)
        delta = layer.U_G.mT @ (layer.mean.double() - W.double()) @ layer.U_A  # [tasks, d_out, d_A]
        flat = layer.tau == 0
        log_tau = torch.where(flat, torch.zeros_like(layer.tau), layer.tau.log())
        terms = 0.5 * layer.tau * delta**2 - 0.5 * log_tau - layer.std.log()
        total = total + terms.flatten(1).sum(1)
    return total.to(post.layers[0].mean.dtype)


def _posterior(learner: LLAMA, x_support: Tensor, y_support: Tensor, prior: float | str,
               method: str | None) -> LaplacePosterior:
    """The posterior under a scalar τ or a named implicit prior."""
    if isinstance(prior, str):
        return learner.posterior(x_support, y_support, prior=prior, method=method)
    return learner.posterior(x_support, y_support, tau=prior, method=method)


CALIBRATION_TASKS, CALIBRATION_SAMPLES = 200, 50  # at most: fewer when the report itself uses fewer
EXTRAPOLATION_POINTS = 201  # the grid of extrapolation_ratio
REGRESSION_ONLY = ("uncertainty measures the calibration of regression predictions (sinusoid runs) only; "
                   "uncertainty of image classification is not implemented yet")


@dataclass
class Calibration:
    tau: float | str  # a prior precision, or the name of an implicit prior (not chosen)
    noise: NoiseModel
    val_nll: float
    point_noise: NoiseModel  # best noise model for the point (MAML) prediction, same grid


def calibrate(learner: LLAMA, problem, point_learner: MAML | None = None, tasks: int = CALIBRATION_TASKS,
              seed: int = 7, taus=None, noises: list[NoiseModel] | None = None, samples: int = CALIBRATION_SAMPLES,
              method: str | None = None, linearized: bool = True, prior: str | float | None = None) -> Calibration:
    """Choose τ and the noise model on validation tasks by predictive NLL; likewise the
    noise model of the point-prediction baseline. With ``prior`` (an implicit prior of
    :mod:`fastlaplace.prior`, or a fixed τ) τ is not chosen: only the noise model is."""
    taus = [prior] if prior is not None else taus or [10.0 ** (e / 2) for e in range(-2, 13)]  # 0.1 … 1e6
    noises = noises or noise_grid()
    batch = problem.sample("val", tasks, torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    best = (math.inf, None, None)
    for tau in taus:
        post = _posterior(learner, batch.x_support, batch.y_support, tau, method)
        pred = post.predict(batch.x_query, samples, gen, linearized=linearized)
        for noise in noises:
            nll = float(mixture_nll(pred, batch.y_query, noise.variance(batch.y_support)).mean())
            if nll < best[0]:
                best = (nll, tau, noise)
    point = point_learner or learner
    with torch.no_grad():
        f = point.predict(point.adapt(batch.x_support, batch.y_support), batch.x_query)
    point_noise = min(noises, key=lambda n: float(point_nll(f, batch.y_query, n.variance(batch.y_support)).mean()))
    return Calibration(best[1], best[2], best[0], point_noise)


def extrapolation_ratio(learner: LLAMA, tasks, tau: float | str, n_tasks: int = 600, seed: int = 11, samples: int = 100,
                        method: str | None = None, linearized: bool = True) -> Estimate:
    """Support points only in the lowest fifth of the input range: predictive spread (of
    sampled functions) averaged over the upper half of the range, divided by its average
    within the support points' span, per task."""
    lo, hi = tasks.x_range
    support_range = (lo, lo + (hi - lo) / 5)
    g = torch.Generator().manual_seed(seed)
    b = tasks.sample(n_tasks, g, support_range=support_range)
    grid = torch.linspace(lo, hi, EXTRAPOLATION_POINTS).view(1, -1, 1).expand(n_tasks, -1, -1)
    pred = _posterior(learner, b.x_support, b.y_support, tau, method).predict(grid, samples, g,
                                                                              linearized=linearized)
    std = pred.std.squeeze(-1)  # [tasks, grid]
    x = grid[0, :, 0]
    upper = std[:, x >= (lo + hi) / 2].mean(1)
    span_lo, span_hi = b.x_support.min(1).values, b.x_support.max(1).values  # [tasks, 1]
    inside = (x.view(1, -1) >= span_lo) & (x.view(1, -1) <= span_hi)
    within = (std * inside).sum(1) / inside.sum(1).clamp_min(1)
    return Estimate.of(upper / within)


def report(learner: LLAMA, problem, point_learner: MAML | None = None, tasks: int = 600, seed: int = 1_000_003,
           samples: int = 100, method: str | None = None, linearized: bool = True,
           calibration: Calibration | None = None, prior: str | float | None = None) -> dict:
    """The figures of issue #4 on new test tasks, after calibrating on validation tasks (τ and
    the noise model, or the noise model alone under an implicit ``prior``): at most
    CALIBRATION_TASKS tasks and CALIBRATION_SAMPLES samples, no more than ``tasks`` and ``samples``."""
    cal = calibration or calibrate(learner, problem, point_learner, tasks=min(CALIBRATION_TASKS, tasks),
                                   samples=min(CALIBRATION_SAMPLES, samples), method=method,
                                   linearized=linearized, prior=prior)
    batch = problem.sample("test", tasks, torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    pred = _posterior(learner, batch.x_support, batch.y_support, cal.tau, method).predict(
        batch.x_query, samples, gen, linearized=linearized)
    noise = cal.noise.variance(batch.y_support)
    point = point_learner or learner
    with torch.no_grad():
        f = point.predict(point.adapt(batch.x_support, batch.y_support), batch.x_query)
    out = {
        "calibration": {"tau": cal.tau, "noise": {"kind": cal.noise.kind, **asdict(cal.noise)},
                        "val_nll": cal.val_nll,
                        "point_noise": {"kind": cal.point_noise.kind, **asdict(cal.point_noise)}},
        "prior": (cal.tau if isinstance(cal.tau, str) else "fixed tau" if prior is not None
                  else "scalar tau chosen on validation tasks"),
        "method": method or ("exact" if cal.tau == "early_stopping" else learner.logdet_method),
        "predictive": "linearized" if linearized else "sampled networks",
        "llama_nll": vars(Estimate.of(mixture_nll(pred, batch.y_query, noise))),
        "maml_point_nll": vars(Estimate.of(point_nll(f, batch.y_query, cal.point_noise.variance(batch.y_support)))),
        "coverage50": vars(Estimate.of(coverage(pred, batch.y_query, noise, Z50))),
        "coverage90": vars(Estimate.of(coverage(pred, batch.y_query, noise, Z90))),
        "laplace_marginal_nll": vars(Estimate.of(laplace_marginal_nll(learner, batch.x_support, batch.y_support))),
    }
    if isinstance(cal.tau, str):
        out["laplace_marginal_nll_at_prior"] = vars(Estimate.of(
            laplace_marginal_nll(learner, batch.x_support, batch.y_support, prior=cal.tau)))
    if hasattr(problem, "tasks"):
        out["extrapolation_std_ratio"] = vars(extrapolation_ratio(learner, problem.tasks, cal.tau, tasks,
                                                                  samples=samples, method=method,
                                                                  linearized=linearized))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fastlaplace.uncertainty", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a LLAMA checkpoint.pt written by fastlaplace.train")
    p.add_argument("--maml", help="a MAML checkpoint for the point-prediction baseline (default: the LLAMA "
                                  "checkpoint's own adapted parameters φ̂)")
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--method", choices=LOGDET_METHODS, default=None)
    p.add_argument("--prior", choices=("validation",) + PRIORS, default="early_stopping_first_order",
                   help="the posterior's prior: the inner loop's implicit prior to first order, τ = N/(2αK) for "
                        "a mean squared error (early_stopping_first_order, the default: the best calibrated on "
                        "sinusoids, see the README), exactly per eigen-direction (early_stopping; exact method), "
                        "or a scalar τ chosen on validation tasks by predictive NLL (validation)")
    p.add_argument("--tau", type=float, help="a fixed prior precision τ instead of --prior (only the noise model "
                                             "is chosen on validation tasks)")
    p.add_argument("--sampled-networks", action="store_true",
                   help="predict with the sampled networks rather than the network linearised at φ̂")
    p.add_argument("--data-root", default=None, help="the data folder of an image run (never taken from the "
                                                     "checkpoint)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read miniImageNet's pickle files (loading a pickle can run code: only files you trust)")
    p.add_argument("--json", help="also write the report to this file")
    args = p.parse_args(argv)
    with errors_as_messages():
        positive_int("--tasks", args.tasks, 1, MAXIMA["eval_tasks"])
        positive_int("--samples", args.samples, 2, MAXIMA["samples"])
        if args.tau is not None and not (math.isfinite(args.tau) and args.tau > 0):
            raise ValueError(f"--tau must be a positive number, got {args.tau}")
        if args.json:
            check_output("--json", args.json, [*checkpoint_inputs(args.checkpoint, args.maml), args.data_root])
        data = dict(device="cpu", data_root=args.data_root, allow_pickle=args.allow_pickle,
                    datasets=("sinusoid",), purpose=REGRESSION_ONLY)
        learner, problem, cfg = load_for_evaluation(args.checkpoint, **data)
        if not isinstance(learner, LLAMA):
            raise ValueError(f"{args.checkpoint} is not a LLAMA run (train with --method llama)")
        # the predictions of the test tasks and the extrapolation grid, all tasks at once
        points = cfg.query_points + EXTRAPOLATION_POINTS
        check_memory(f"--tasks {args.tasks} × --samples {args.samples} predictions at {points} points",
                     4 * args.tasks * args.samples * points, "cpu")
        point = load_for_evaluation(args.maml, **data)[0] if args.maml else None
        result = report(learner, problem, point, args.tasks, cfg.eval_seed, args.samples, args.method,
                        linearized=not args.sampled_networks,
                        prior=args.tau if args.tau is not None else None if args.prior == "validation" else args.prior)
        text = json.dumps(result, indent=2)
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
