"""Predictive metrics of few-shot tasks: how good and how honest a predictive distribution is.

Regression (a Gaussian observation noise σ² around sampled functions, :class:`NoiseModel`):
the predictive of a point is the mixture over posterior samples of N(f_s(x), σ²);
:func:`mixture_nll` is its negative log likelihood (log-mean-exp over samples, exact), and
:func:`coverage` the share of points inside a central interval of the mixture's mean and
variance (var_s f + σ²) under a Gaussian approximation.

Classification (class probabilities [tasks, points, classes]): :func:`nll`, :func:`brier`,
:func:`accuracy` per task; :func:`reliability` (equal-width confidence bins) with its expected
and maximum calibration errors (ECE, MCE) over all points pooled; :func:`auroc` of a score
(e.g. the predictive :func:`entropy`) separating out-of-distribution inputs from a task's
own; :func:`fit_temperature` for the temperature-scaling baseline (Guo et al. 2017).

And :func:`laplace_marginal_nll`, the Laplace estimate of a task's −log p(X|θ) under any
:class:`~fastlaplace.prior.Prior` (paper equation 11); :func:`laplace_marginal_nlls` under
several at the cost of one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .meta import LLAMA
from .posterior import Predictive

BINS = 15  # equal-width confidence bins of the reliability diagram, ECE and MCE (as Guo et al. 2017)
Z50, Z90 = 0.6744897501960817, 1.6448536269514722  # central 50 % and 90 % intervals of a Gaussian


# ------------------------------------------------------------------------------- regression
@dataclass(frozen=True)
class NoiseModel:
    """σ_t² = var (global) or k·mean(y_support²) + var (relative: one per task, proportional to
    the signal power of its support set)."""

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
    """The noise models a validation search tries: 17 global variances 1e-3 … 10 and 30 relative ones."""
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


# --------------------------------------------------------------------------- classification
def _log(p: Tensor) -> Tensor:
    return p.clamp_min(torch.finfo(p.dtype).tiny).log()


def nll(probs: Tensor, y: Tensor) -> Tensor:
    """−log p(y) per point, mean per task [tasks]; probs [tasks, points, classes], y [tasks, points]."""
    return -_log(probs.gather(-1, y.unsqueeze(-1)).squeeze(-1)).mean(1)


def brier(probs: Tensor, y: Tensor) -> Tensor:
    """Σ_k (p_k − 1[y = k])² per point, mean per task [tasks]."""
    return (probs - torch.nn.functional.one_hot(y, probs.shape[-1]).to(probs)).square().sum(-1).mean(1)


def accuracy(probs: Tensor, y: Tensor) -> Tensor:
    return (probs.argmax(-1) == y).to(probs.dtype).mean(1)


def entropy(probs: Tensor) -> Tensor:
    """Predictive entropy per point [tasks, points] (nats)."""
    return -(probs * _log(probs)).sum(-1)


@dataclass
class Reliability:
    """Per confidence bin b of ``BINS`` equal-width bins of [0, 1] (bin b holds the confidences
    in (b/BINS, (b+1)/BINS], the first also 0): the number of points, their mean confidence
    and their accuracy (NaN where empty)."""

    count: Tensor  # [bins]
    confidence: Tensor
    accuracy: Tensor

    @property
    def ece(self) -> float:
        """Σ_b (n_b/n)·|accuracy_b − confidence_b|."""
        gap = (self.accuracy - self.confidence).abs().nan_to_num(0.0)
        return float((self.count * gap).sum() / self.count.sum())

    @property
    def mce(self) -> float:
        """max_b |accuracy_b − confidence_b| over the non-empty bins."""
        return float((self.accuracy - self.confidence).abs()[self.count > 0].max())


def reliability(probs: Tensor, y: Tensor, bins: int = BINS) -> Reliability:
    """Confidence (the top class's probability) against accuracy, every point pooled."""
    conf, pred = probs.flatten(0, -2).double().max(-1)
    correct = (pred == y.flatten()).double()
    index = (conf * bins).ceil().long().sub(1).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    mean = torch.bincount(index, conf, minlength=bins) / count
    acc = torch.bincount(index, correct, minlength=bins) / count
    return Reliability(count, mean, acc)


def auroc(score_in: Tensor, score_out: Tensor) -> Tensor:
    """Per task [tasks], the area under the ROC curve of ``score`` telling out-of-distribution
    points [tasks, n_out] (positives) from in-distribution ones [tasks, n_in]: the probability
    that a random positive scores higher than a random negative, ties counting one half."""
    diff = score_out.unsqueeze(1) - score_in.unsqueeze(2)  # [tasks, n_in, n_out]
    return ((diff > 0).double() + 0.5 * (diff == 0).double()).flatten(1).mean(1)


def fit_temperature(logits: Tensor, y: Tensor, grid: Tensor | None = None) -> float:
    """The temperature T minimising the mean NLL of softmax(logits / T) over every point of
    [tasks, points, classes] (a grid search over log T, 0.05 to 20 by default)."""
    grid = torch.logspace(math.log10(0.05), math.log10(20.0), 241, dtype=torch.float64) if grid is None else grid
    logits = logits.double()
    losses = torch.stack([nll((logits / t).softmax(-1), y).mean() for t in grid])
    return float(grid[losses.argmin()])


# ---------------------------------------------------------------------- marginal likelihood
def laplace_marginal_nll(learner: LLAMA, x_support: Tensor, y_support: Tensor, prior=None,
                         method: str | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Per-task Laplace estimate of −log p(X_j | θ) (paper equation 11), [tasks]:
    −log p(X|φ̂) − log p(φ̂|θ) + ½·log det Ĥ − (D/2)·log 2π, with unit Gaussian noise
    (regression) or the categorical likelihood, D the number of adapted parameters.

    ``prior``: as :meth:`fastlaplace.LLAMA.posterior` (default: the training τ; the log-det
    of the posterior's method, by default the learner's). With a scalar τ the prior terms are
    (τ/2)‖φ̂ − θ‖² − (D/2)·log τ; under the exact implicit prior, per eigen-direction of each
    layer's A⊗G, Σ_ij [½·τ_ij·δ_ij² − ½·log τ_ij] with δ = U_Gᵀ(Φ̂ − Θ)U_A (directions with a
    flat prior add nothing: an improper prior has no normaliser). ``generator``: the labels
    of a sampled-label Fisher (classification), as in :meth:`fastlaplace.LLAMA.posterior`.
    """
    prior = learner.tau if prior is None else prior
    return laplace_marginal_nlls(learner, x_support, y_support, [prior], method, generator)[0]


def laplace_marginal_nlls(learner: LLAMA, x_support: Tensor, y_support: Tensor, priors: list,
                          method: str | None = None, generator: torch.Generator | None = None) -> Tensor:
    """:func:`laplace_marginal_nll` under each of ``priors``, [priors, tasks], from one
    adaptation and one curvature of the support sets (:meth:`fastlaplace.LLAMA.posteriors`):
    the same figures as separate calls with the same generator."""
    with torch.no_grad():
        posts = learner.posteriors(x_support, y_support, priors, method, generator)
        out = learner.predict(posts[0].params, x_support)  # φ̂ is the same under every prior
        if learner.loss == "mse":
            data = (0.5 * (out - y_support) ** 2 + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        else:
            data = learner.task_losses(out, y_support) * y_support.shape[1]
        theta = learner.net.adapted_parameters()
        return torch.stack([data + post.laplace_terms(theta) for post in posts])
