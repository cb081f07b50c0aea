"""Calibrated uncertainty from LLAMA's posterior: ``python -m fastlaplace.uncertainty CHECKPOINT``
(the paper's Figure 5, measured), for regression and classification runs alike; the metrics
are :mod:`fastlaplace.calibration`'s.

Regression (sinusoids): the predictive of a point is the mixture over posterior samples of
N(f_s(x), σ²), f_s the linearised network of each sample (see
:meth:`~fastlaplace.posterior.LaplacePosterior.predict`) and σ² the observation noise, which
also scales the posterior's covariance (σ²(Ĥ₁ + τ)⁻¹, ``docs/design.md`` §6). The noise is a
single σ² ("global"), or one per task proportional to the signal power of its support set,
σ_t² = k·mean(y_support²) + s₀ ("relative": sinusoid amplitudes span 0.1 to 5, so the misfit
of a few-shot prediction scales with the task). The noise model is chosen on validation tasks
(minimum predictive NLL), never on test tasks, and so is τ under ``--prior validation``; by
default the prior is the inner loop's own, to first order (``--prior
early_stopping_first_order``; :class:`fastlaplace.prior.Prior`).

Classification (image runs, the data set taken from the run): over test episodes, LLAMA's
linearised predictive of the logits (class probabilities by Monte Carlo over samples, and by
the probit approximation) against MAML's point prediction (``--maml RUN``, else the LLAMA
run's own φ̂), as it is and with a temperature chosen on validation episodes: accuracy, NLL,
Brier score (mean ± 95 % CI over episodes), ECE and MCE (15 equal-width confidence bins, every
query pooled; 95 % CI by a bootstrap over episodes), and per episode the AUROC of predictive
entropy telling the episode's query images from out-of-distribution ones: images of the
validation classes (never in a test episode), and the query images corrupted by Gaussian noise
(sd 0.5, clipped) or rotated by 90°.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .calibration import (
    Z50,
    Z90,
    NoiseModel,
    accuracy,
    auroc,
    brier,
    coverage,
    entropy,
    fit_temperature,
    laplace_marginal_nll,
    mixture_nll,
    nll,
    noise_grid,
    point_nll,
    reliability,
)
from .cli import MAXIMA, check_memory, check_output, errors_as_messages, positive_int
from .config import LOGDET_METHODS
from .evaluate import Estimate
from .files import atomic_write
from .meta import LLAMA, MAML
from .posterior import LaplacePosterior, Predictive
from .prior import PRIORS, VALIDATION, Prior
from .runs import checkpoint_inputs, load_for_evaluation

CALIBRATION_TASKS, CALIBRATION_SAMPLES = 200, 50  # at most: fewer when the report itself uses fewer
EXTRAPOLATION_POINTS = 201  # the grid of extrapolation_ratio
NOISE_SD, QUARTER_TURNS = 0.5, 1  # the corruptions of the out-of-distribution images
TASKS_AT_ONCE, SAMPLES_AT_ONCE = 10, 10  # episodes and posterior samples per pass (memory only)
BOOTSTRAP = 1000  # resamples of episodes for the CIs of ECE and MCE


def noisy_predictive(post: LaplacePosterior, x: Tensor, samples: int, generator: torch.Generator,
                     linearized: bool, noise_var: Tensor, chunk: int = 50) -> Predictive:
    """The predictive of ``post`` under observation noise ``noise_var`` [tasks, 1, 1] (it scales
    the covariance): a linearised one is predicted at unit noise and rescaled (exact)."""
    if linearized:
        return post.predict(x, samples, generator, chunk=chunk).rescaled(noise_var.sqrt().flatten())
    return post.with_noise(noise_var).predict(x, samples, generator, linearized=False, chunk=chunk)


# ------------------------------------------------------------------------------- regression
def point_prediction(point: MAML, batch) -> Tensor:
    """The point learner's prediction of ``batch``'s queries after adapting to its support sets."""
    with torch.no_grad():
        return point.predict(point.adapt(batch.x_support, batch.y_support), batch.x_query)


@dataclass
class Calibration:
    prior: Prior  # a scalar τ or an implicit prior (never "validation": that one is chosen)
    noise: NoiseModel
    val_nll: float
    point_noise: NoiseModel  # best noise model for the point (MAML) prediction, same grid


def calibrate(learner: LLAMA, problem, point_learner: MAML | None = None, tasks: int = CALIBRATION_TASKS,
              seed: int = 7, prior=VALIDATION, noises: list[NoiseModel] | None = None,
              samples: int = CALIBRATION_SAMPLES, method: str | None = None, linearized: bool = True) -> Calibration:
    """Choose the noise model (and τ, for a ``"validation"`` prior: among its candidates) on
    validation tasks by predictive NLL; likewise the noise model of the point-prediction baseline."""
    noises = noises or noise_grid()
    batch = problem.sample("val", tasks, torch.Generator().manual_seed(seed))
    best = (math.inf, None, None)
    candidates = list(Prior.of(prior).candidates())
    for candidate, post in zip(candidates, learner.posteriors(batch.x_support, batch.y_support, candidates, method)):
        unit = post.predict(batch.x_query, samples, torch.Generator().manual_seed(seed + 1)) if linearized else None
        for noise in noises:
            var = noise.variance(batch.y_support)
            pred = (unit.rescaled(var.sqrt().flatten()) if linearized else
                    noisy_predictive(post, batch.x_query, samples, torch.Generator().manual_seed(seed + 1), False, var))
            score = float(mixture_nll(pred, batch.y_query, var).mean())
            if score < best[0]:
                best = (score, candidate, noise)
    f = point_prediction(point_learner or learner, batch)
    point_noise = min(noises, key=lambda n: float(point_nll(f, batch.y_query, n.variance(batch.y_support)).mean()))
    return Calibration(best[1], best[2], best[0], point_noise)


def extrapolation_ratio(learner: LLAMA, tasks, prior, n_tasks: int = 600, seed: int = 11, samples: int = 100,
                        method: str | None = None, linearized: bool = True) -> Estimate:
    """Support points only in the lowest fifth of the input range: predictive spread (of
    sampled functions) averaged over the upper half of the range, divided by its average
    within the support points' span, per task (a ratio per task, so the noise's scaling of
    the covariance cancels: unit noise)."""
    lo, hi = tasks.x_range
    support_range = (lo, lo + (hi - lo) / 5)
    g = torch.Generator().manual_seed(seed)
    b = tasks.sample(n_tasks, g, support_range=support_range)
    grid = torch.linspace(lo, hi, EXTRAPOLATION_POINTS).view(1, -1, 1).expand(n_tasks, -1, -1)
    post = learner.posterior(b.x_support, b.y_support, prior=prior, method=method)
    std = post.predict(grid, samples, g, linearized=linearized).std.squeeze(-1)  # [tasks, grid]
    x = grid[0, :, 0]
    upper = std[:, x >= (lo + hi) / 2].mean(1)
    span_lo, span_hi = b.x_support.min(1).values, b.x_support.max(1).values  # [tasks, 1]
    inside = (x.view(1, -1) >= span_lo) & (x.view(1, -1) <= span_hi)
    within = (std * inside).sum(1) / inside.sum(1).clamp_min(1)
    return Estimate.of(upper / within)


def _noise_json(noise: NoiseModel) -> dict:
    return {"kind": noise.kind, "var": noise.var, "k": noise.k}


def report(learner: LLAMA, problem, point_learner: MAML | None = None, tasks: int = 600, seed: int = 1_000_003,
           samples: int = 100, method: str | None = None, linearized: bool = True,
           calibration: Calibration | None = None, prior=VALIDATION) -> dict:
    """Regression figures on new test tasks, after calibrating on validation tasks (the noise
    model, and τ under a ``"validation"`` prior): at most CALIBRATION_TASKS tasks and
    CALIBRATION_SAMPLES samples, no more than ``tasks`` and ``samples``."""
    cal = calibration or calibrate(learner, problem, point_learner, tasks=min(CALIBRATION_TASKS, tasks),
                                   samples=min(CALIBRATION_SAMPLES, samples), method=method,
                                   linearized=linearized, prior=prior)
    batch = problem.sample("test", tasks, torch.Generator().manual_seed(seed))
    noise = cal.noise.variance(batch.y_support)
    post = learner.posterior(batch.x_support, batch.y_support, prior=cal.prior, method=method)
    pred = noisy_predictive(post, batch.x_query, samples, torch.Generator().manual_seed(seed + 1), linearized, noise)
    f = point_prediction(point_learner or learner, batch)
    implicit = cal.prior.kind in PRIORS
    out = {
        "calibration": {"prior": str(cal.prior), "noise": _noise_json(cal.noise), "val_nll": cal.val_nll,
                        "point_noise": _noise_json(cal.point_noise)},
        "prior": str(cal.prior) if implicit or Prior.of(prior).kind != VALIDATION
        else f"scalar tau chosen on validation tasks ({cal.prior})",
        "method": str(cal.prior.method(method, learner.logdet_method)),
        "predictive": "linearized" if linearized else "sampled networks",
        "posterior_covariance": "noise-scaled: sigma^2 (H_1 + tau)^-1",
        "llama_nll": vars(Estimate.of(mixture_nll(pred, batch.y_query, noise))),
        "maml_point_nll": vars(Estimate.of(point_nll(f, batch.y_query, cal.point_noise.variance(batch.y_support)))),
        "coverage50": vars(Estimate.of(coverage(pred, batch.y_query, noise, Z50))),
        "coverage90": vars(Estimate.of(coverage(pred, batch.y_query, noise, Z90))),
        "laplace_marginal_nll": vars(Estimate.of(laplace_marginal_nll(learner, batch.x_support, batch.y_support))),
    }
    if implicit:
        out["laplace_marginal_nll_at_prior"] = vars(Estimate.of(
            laplace_marginal_nll(learner, batch.x_support, batch.y_support, prior=cal.prior, method=method)))
    if hasattr(problem, "tasks"):
        out["extrapolation_std_ratio"] = vars(extrapolation_ratio(learner, problem.tasks, cal.prior, tasks,
                                                                  samples=samples, method=method,
                                                                  linearized=linearized))
    return out


# --------------------------------------------------------------------------- classification
def _corrupted(x: Tensor, generator: torch.Generator) -> list[Tensor]:
    """The query images with Gaussian noise (clipped to [0, 1]) and rotated by 90°."""
    noisy = (x + NOISE_SD * torch.randn(x.shape, generator=generator, dtype=x.dtype)).clamp(0, 1)
    return [noisy, torch.rot90(x, QUARTER_TURNS, dims=(-2, -1))]


OOD_SETS = ("unseen classes", "noise", "rotation")


def episode_probs(learner: LLAMA, point: MAML, problem, split: str, tasks: int, seed: int, samples: int,
                  prior, method: str | None, steps: int, ood: bool = True, llama: bool = True) -> dict:
    """Class probabilities on ``tasks`` episodes of ``split``, TASKS_AT_ONCE at a time: LLAMA's
    posterior predictive (``"mc"``, ``"probit"``) and the point prediction's logits
    (``"point_logits"``), each [tasks, points, classes] with points = the query images, then
    (``ood``) as many of each out-of-distribution set; and the labels ``"y"`` [tasks, query].
    Without ``llama`` only the point prediction's."""
    gen, gen_ood = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    gen_post = torch.Generator().manual_seed(seed + 2)
    parts: dict[str, list[Tensor]] = {"mc": [], "probit": [], "point_logits": [], "y": []}
    for start in range(0, tasks, TASKS_AT_ONCE):
        n = min(TASKS_AT_ONCE, tasks - start)
        b = problem.sample(split, n, gen)
        # each set on its own: BatchNorm normalises with the statistics of the images it is given
        sets = [b.x_query, problem.sample("val", n, gen_ood).x_query, *_corrupted(b.x_query, gen_ood)] if ood \
            else [b.x_query]
        if llama:
            post = learner.posterior(b.x_support, b.y_support, prior=prior, method=method, steps=steps,
                                     generator=gen_post)
            preds = [post.predict(x, samples, gen_post, chunk=SAMPLES_AT_ONCE) for x in sets]
            parts["mc"].append(torch.cat([p.probs("mc") for p in preds], 1))
            parts["probit"].append(torch.cat([p.probs("probit") for p in preds], 1))
        with torch.no_grad():
            phi = point.adapt(b.x_support, b.y_support, steps=steps)
            parts["point_logits"].append(torch.cat([point.predict(phi, x) for x in sets], 1))
        parts["y"].append(b.y_query)
    return {k: torch.cat(v) for k, v in parts.items() if v}


def choose_prior(learner: LLAMA, problem, prior, tasks: int, seed: int, samples: int, method: str | None,
                 steps: int) -> tuple[Prior, dict[str, float]]:
    """The prior itself, or for a ``"validation"`` prior the candidate τ of least NLL (Monte
    Carlo predictive) on validation episodes; and each candidate's NLL (empty when none was chosen)."""
    prior = Prior.of(prior)
    if prior.kind != VALIDATION:
        return prior, {}

    # One adaptation and curvature per episode serve every candidate (LLAMA.posteriors), and
    # every candidate predicts from the same random draws: the figures of a separate
    # episode_probs(..., candidate, ood=False) per candidate, at a fraction of the work.
    candidates = list(prior.candidates())
    gen, gen_post = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 2)
    probs: list[list[Tensor]] = [[] for _ in candidates]
    labels = []
    for start in range(0, tasks, TASKS_AT_ONCE):
        b = problem.sample("val", min(TASKS_AT_ONCE, tasks - start), gen)
        posts = learner.posteriors(b.x_support, b.y_support, candidates, method, generator=gen_post, steps=steps)
        draws = gen_post.get_state()
        for mine, post in zip(probs, posts):
            gen_post.set_state(draws)
            mine.append(post.predict(b.x_query, samples, gen_post, chunk=SAMPLES_AT_ONCE).probs("mc"))
        labels.append(b.y_query)
    y = torch.cat(labels)
    scores = {candidate: float(nll(torch.cat(mine), y).mean()) for candidate, mine in zip(candidates, probs)}
    return min(scores, key=scores.get), {str(candidate): value for candidate, value in scores.items()}


def _calibration_errors(probs: Tensor, y: Tensor, seed: int) -> dict:
    """Pooled ECE and MCE, each with the half-width of its 95 % bootstrap interval over episodes."""
    rel = reliability(probs, y)
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randint(0, probs.shape[0], (probs.shape[0],), generator=g) for _ in range(BOOTSTRAP)]
    boot = [reliability(probs[i], y[i]) for i in draws]
    out = {}
    for name, value, values in (("ece", rel.ece, [r.ece for r in boot]), ("mce", rel.mce, [r.mce for r in boot])):
        lo, hi = torch.tensor(values, dtype=torch.float64).quantile(torch.tensor([0.025, 0.975], dtype=torch.float64))
        out[name] = {"mean": value, "ci95": float(hi - lo) / 2, "n": probs.shape[0]}
    return out


def _scores(probs: Tensor, y: Tensor, seed: int) -> dict:
    """The metrics of one predictor: probs [tasks, query·(1 + OOD sets), classes]."""
    q = y.shape[1]
    query = probs[:, :q]
    rel = reliability(query, y)
    bins = {k: [None if math.isnan(v) else v for v in getattr(rel, k).tolist()]
            for k in ("count", "confidence", "accuracy")}
    out = {"accuracy": vars(Estimate.of(accuracy(query, y))), "nll": vars(Estimate.of(nll(query, y))),
           "brier": vars(Estimate.of(brier(query, y))), **_calibration_errors(query, y, seed), "reliability": bins}
    h = entropy(probs)
    for i, name in enumerate(OOD_SETS):
        ood = h[:, (i + 1) * q:(i + 2) * q]
        out[f"auroc_entropy_{name.replace(' ', '_')}"] = vars(Estimate.of(auroc(h[:, :q], ood)))
    return out


@dataclass
class ClassificationResult:
    report: dict
    probs: dict[str, Tensor]  # each predictor's probabilities of the test queries [tasks, query, classes]
    y: Tensor


def classification_report(learner: LLAMA, problem, point_learner: MAML | None = None, tasks: int = 600,
                          seed: int = 1_000_003, samples: int = 100, method: str | None = None,
                          prior="early_stopping_first_order", steps: int | None = None) -> ClassificationResult:
    """The classification figures (module docstring) on ``tasks`` test episodes; the prior (under
    ``"validation"``) and the point prediction's temperature chosen on validation episodes."""
    steps = learner.inner_steps if steps is None else steps
    point = point_learner or learner
    val_tasks = min(CALIBRATION_TASKS, tasks)
    chosen, val_nll = choose_prior(learner, problem, prior, val_tasks, seed + 7, min(CALIBRATION_SAMPLES, samples),
                                   method, steps)
    val = episode_probs(learner, point, problem, "val", val_tasks, seed + 7, 1, chosen, method, steps, ood=False,
                        llama=False)
    temperature = fit_temperature(val["point_logits"], val["y"])
    test = episode_probs(learner, point, problem, "test", tasks, seed, samples, chosen, method, steps)
    predictors = {
        "llama_mc": test["mc"], "llama_probit": test["probit"],
        "maml_point": test["point_logits"].softmax(-1),
        "maml_temperature": (test["point_logits"] / temperature).softmax(-1),
    }
    out = {
        "episodes": tasks, "samples": samples, "inner_steps": steps,
        "prior": f"scalar tau chosen on validation episodes ({chosen})" if Prior.of(prior).kind == VALIDATION
        else str(chosen),
        "validation_nll": val_nll,  # each candidate τ's (Monte Carlo) NLL on the validation episodes
        "method": str(chosen.method(method, learner.logdet_method)),
        "point_prediction": "the MAML run (--maml)" if point_learner is not None else "the LLAMA run's own φ̂",
        "temperature": temperature, "calibration_bins": "15 equal-width confidence bins, every query pooled",
        "ood": {"unseen classes": "query images of validation-split episodes",
                "noise": f"the query images plus Gaussian noise of sd {NOISE_SD}, clipped to [0, 1]",
                "rotation": f"the query images rotated by {90 * QUARTER_TURNS}°"},
        **{name: _scores(p, test["y"], seed) for name, p in predictors.items()},
    }
    q = test["y"].shape[1]
    return ClassificationResult(out, {name: p[:, :q] for name, p in predictors.items()}, test["y"])


# --------------------------------------------------------------------------- the printed summary
PREDICTORS = {"llama_mc": "LLAMA, posterior predictive (MC)", "llama_probit": "LLAMA, posterior predictive (probit)",
              "maml_point": "MAML, point prediction", "maml_temperature": "MAML, temperature-scaled"}
METRICS = {"accuracy": "accuracy", "nll": "NLL", "brier": "Brier", "ece": "ECE", "mce": "MCE",
           "auroc_entropy_unseen_classes": "AUROC unseen classes", "auroc_entropy_noise": "AUROC noise",
           "auroc_entropy_rotation": "AUROC rotation"}


def estimate_text(e: dict, digits: int = 3) -> str:
    """``mean ± half-width`` of an estimate's dictionary."""
    return f"{e['mean']:.{digits}f} ± {e['ci95']:.{digits}f}"


def summary(result: dict) -> str:
    """A report as a person reads it: the settings, then a Markdown table (mean ± 95 % CI over
    episodes or tasks); ``--json`` keeps everything, the reliability bins included."""
    if "llama_mc" not in result:  # regression
        rows = [("predictive NLL, LLAMA", result["llama_nll"]),
                ("predictive NLL, MAML point", result["maml_point_nll"]),
                ("coverage of the 50 % interval", result["coverage50"]),
                ("coverage of the 90 % interval", result["coverage90"])]
        if "extrapolation_std_ratio" in result:
            rows.append(("sd away from the data / sd near it", result["extrapolation_std_ratio"]))
        head = [f"prior: {result['prior']}; method: {result['method']}; predictive: {result['predictive']}; "
                f"noise: {result['calibration']['noise']['kind']} (chosen on validation tasks)"]
        return "\n".join([*head, "", "| figure | mean ± 95 % CI over tasks |", "|---|---|",
                          *(f"| {name} | {estimate_text(e)} |" for name, e in rows)])
    head = [f"{result['episodes']} test episodes, {result['samples']} posterior samples, {result['inner_steps']} inner "
            f"steps; prior: {result['prior']}; method: {result['method']}",
            f"point prediction: {result['point_prediction']}; temperature {result['temperature']:.3g} (chosen on "
            f"validation episodes); ECE, MCE: {result['calibration_bins']} (CI: bootstrap over episodes)"]
    table = ["| predictor | " + " | ".join(METRICS.values()) + " |", "|---|" + "---|" * len(METRICS)]
    table += [f"| {label} | " + " | ".join(estimate_text(result[key][m]) for m in METRICS) + " |"
              for key, label in PREDICTORS.items()]
    return "\n".join([*head, "", *table])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fastlaplace.uncertainty", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a LLAMA checkpoint.pt written by fastlaplace.train")
    p.add_argument("--maml", help="a MAML checkpoint of the same data set for the point-prediction baseline "
                                  "(default: the LLAMA checkpoint's own adapted parameters φ̂)")
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--method", choices=LOGDET_METHODS, default=None)
    p.add_argument("--prior", choices=(VALIDATION,) + PRIORS, default="early_stopping_first_order",
                   help="the posterior's prior: the inner loop's implicit prior to first order, τ = N/(2αK) for "
                        "a mean squared error and N/(αK) for a cross-entropy (early_stopping_first_order, the "
                        "default), exactly per eigen-direction (early_stopping; exact method), or a scalar τ "
                        "chosen on validation tasks by predictive NLL (validation)")
    p.add_argument("--tau", type=float, help="a fixed prior precision τ instead of --prior (only the noise model "
                                             "is chosen on validation tasks)")
    p.add_argument("--taus", type=float, nargs="+", help="the candidates of --prior validation (default: 0.1 to 1e6, "
                                                         "15 values)")
    p.add_argument("--sampled-networks", action="store_true",
                   help="predict with the sampled networks rather than the network linearised at φ̂ (regression)")
    p.add_argument("--data-root", default=None, help="the data folder of an image run (never taken from the "
                                                     "checkpoint)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read miniImageNet's pickle files (loading a pickle can run code: only files you trust)")
    p.add_argument("--json", help="write the whole report (the reliability bins too) to this file; '-' prints it "
                                  "instead of the summary table")
    args = p.parse_args(argv)
    with errors_as_messages():
        positive_int("--tasks", args.tasks, 1, MAXIMA["eval_tasks"])
        positive_int("--samples", args.samples, 2, MAXIMA["samples"])
        if args.tau is not None and not (math.isfinite(args.tau) and args.tau > 0):
            raise ValueError(f"--tau must be a positive number, got {args.tau}")
        if args.json and args.json != "-":
            check_output("--json", args.json, [*checkpoint_inputs(args.checkpoint, args.maml), args.data_root])
        data = dict(device="cpu", data_root=args.data_root, allow_pickle=args.allow_pickle)
        learner, problem, cfg = load_for_evaluation(args.checkpoint, **data)
        if not isinstance(learner, LLAMA):
            raise ValueError(f"{args.checkpoint} is not a LLAMA run (train with --method llama)")
        point = None
        if args.maml:
            point, _, point_cfg = load_for_evaluation(args.maml, **data)
            if point_cfg.dataset != cfg.dataset:
                raise ValueError(f"--maml {args.maml} is a {point_cfg.dataset} run; {args.checkpoint} is a "
                                 f"{cfg.dataset} run")
        if args.taus and args.prior != VALIDATION:
            raise ValueError("--taus are the candidates of --prior validation")
        prior = args.tau if args.tau is not None else Prior.validation(args.taus) if args.taus else args.prior
        if learner.loss == "mse":
            # the predictions of the test tasks and the extrapolation grid, all tasks at once
            points = cfg.query_points + EXTRAPOLATION_POINTS
            check_memory(f"--tasks {args.tasks} × --samples {args.samples} predictions at {points} points",
                         4 * args.tasks * args.samples * points, "cpu")
            result = report(learner, problem, point, args.tasks, cfg.eval_seed, args.samples, args.method,
                            linearized=not args.sampled_networks, prior=prior)
        else:
            if args.sampled_networks:
                raise ValueError("--sampled-networks is for regression runs; classification uses the "
                                 "linearised predictive")
            steps = cfg.test_inner_steps[-1]
            result = classification_report(learner, problem, point, args.tasks, cfg.eval_seed, args.samples,
                                           args.method, prior, steps).report
        text = json.dumps(result, indent=2, ensure_ascii=False)
        print(text if args.json == "-" else summary(result))
        if args.json and args.json != "-":
            atomic_write(Path(args.json), lambda f: f.write((text + "\n").encode()))
    return result


if __name__ == "__main__":
    main()
