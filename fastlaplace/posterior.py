"""The Laplace posterior of a task's adapted parameters, N(φ̂, Ĥ⁻¹), and sampling from it.

Ĥ is block diagonal over the adapted layers; each block is Kronecker factored
(``docs/design.md`` §3). With the layer's weight and bias as one matrix W = [W | b] of
shape [d_out, d_A] and its column-stacked vec, a layer's posterior is one of two kinds with
one interface (:class:`LayerPosterior`: ``sample``, ``variance``, ``logdet``, ``split``),
registered by its ``method`` in :attr:`LayerPosterior.kinds` (a new kind is a subclass):

- :class:`FactoredLayerPosterior` (``"factored"``): precision A_d ⊗ G_d with the damped
  factors A_d = √c·A + π√τ·I and G_d = √c·G + (√τ/π)·I; a sample is W = Ŵ + L_G⁻ᵀ Z L_A⁻¹
  (Cholesky factors of :func:`fastlaplace.ops.damped_cholesky`).
- :class:`EigenLayerPosterior` (``"exact"``): precision c·A⊗G + τI; with A = U_A diag(a) U_Aᵀ
  and G = U_G diag(g) U_Gᵀ a sample is W = Ŵ + U_G (Z ⊙ S) U_Aᵀ, S_ji = (c·a_i·g_j + τ_ji)^(-1/2).
  τ is a scalar or one precision per eigen-direction (the inner loop's implicit prior,
  :class:`fastlaplace.prior.Prior`).

The damping and the eigenvalue arithmetic are :mod:`fastlaplace.kfac_math`'s, the same as the
log-det kernels' reference. c·A⊗G is the K-FAC Fisher of the support set only, of its summed
negative log likelihood under unit noise, with c = N·T rows (``docs/design.md`` §2); a
mean-squared-error inner loss is (2/N)·that NLL. The factored precision's cross terms are
positive semi-definite: it is never below the exact one, so its posterior is never wider.

Observation noise σ² (regression) scales the whole posterior covariance: the likelihood's
curvature is Ĥ₁/σ², and the prior that makes φ̂ the MAP estimate scales with it (the inner
loss, and so its implicit prior, is on the scale of the data's squared error), so the
covariance is σ²(Ĥ₁ + τ)⁻¹ with τ on NLL₁'s scale (``docs/design.md`` §6). The layers hold
the unit-noise factorisation; :class:`LaplacePosterior` applies σ per task.

No dense covariance is ever formed.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from . import kfac_math, ops
from .batched import TaskBatchedNetwork, param_key
from .options import LogdetMethod, LogdetMethodLike, parse
from .prior import LayerPrecision


@dataclass
class LayerPosterior(ABC):
    """Gaussian posterior of one layer's [W | b] for every task: what both kinds share.

    Build one with :meth:`build` (either kind, by ``method``) or a subclass's
    :meth:`from_factors`."""

    name: str
    weight_shape: tuple[int, ...]  # per task, e.g. (d_out, d_in) or (C_out, C_in, k, k)
    bias: bool
    mean: Tensor  # [tasks, d_out, d_A]
    scale: float  # c
    tau: float | Tensor  # scalar, or [tasks, d_out, d_A] per eigen-direction of A⊗G (exact only)
    A: Tensor  # [tasks, d_A, d_A], float64
    G: Tensor  # [tasks, d_out, d_out], float64

    method: ClassVar[LogdetMethod]
    kinds: ClassVar[dict[LogdetMethod, type[LayerPosterior]]] = {}  # every kind, by its method

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "method" in cls.__dict__:
            LayerPosterior.kinds[cls.method] = cls

    @staticmethod
    def build(name: str, weight: Tensor, bias: Tensor | None, A: Tensor, G: Tensor, scale: float,
              tau: LayerPrecision, method: LogdetMethodLike) -> LayerPosterior:
        """The posterior of ``method``'s precision; arguments as :meth:`from_factors`."""
        kind = LayerPosterior.kinds[parse(LogdetMethod, method, "method")]
        return kind.from_factors(name, weight, bias, A, G, scale, tau)

    @classmethod
    def from_factors(cls, name: str, weight: Tensor, bias: Tensor | None, A: Tensor, G: Tensor, scale: float,
                     tau: LayerPrecision) -> LayerPosterior:
        """From the layer's adapted weight [tasks, d_out, ...] and bias [tasks, d_out] (or None),
        and its K-FAC factors. ``tau`` is a float, or (exact only) a function of the factors'
        eigenvalues giving a precision per eigen-direction (:data:`fastlaplace.prior.LayerPrecision`). The
        factorisations run in float64 (float32 eigensolvers fail on the nearly singular
        factors of a few support points); samples come back in the parameters' dtype."""
        if cls is LayerPosterior:
            raise TypeError("LayerPosterior is the interface: use LayerPosterior.build(..., method) or a subclass")
        A, G = A.double(), G.double()
        T, d_out = weight.shape[:2]
        mean = weight.reshape(T, d_out, -1)
        if bias is not None:
            mean = torch.cat([mean, bias.unsqueeze(-1)], dim=-1)
        return cls._factorise(name, tuple(weight.shape[1:]), bias is not None, mean, float(scale), tau, A, G)

    @classmethod
    @abstractmethod
    def _factorise(cls, name, weight_shape, bias, mean, scale, tau, A, G) -> LayerPosterior:
        """The instance, with its factorisation of the precision."""

    @abstractmethod
    def _noise(self, Z: Tensor) -> Tensor:
        """W − Ŵ for standard normal Z [n, tasks, d_out, d_A] (float64): covariance Ĥ⁻¹."""

    @abstractmethod
    def variance(self) -> Tensor:
        """Marginal posterior variance of every entry of [W | b], ``[tasks, d_out, d_A]`` (float64)."""

    @abstractmethod
    def logdet(self) -> Tensor:
        """log det of the layer's precision per task, ``[tasks]`` (float64)."""

    @abstractmethod
    def prior_terms(self, delta: Tensor) -> Tensor:
        """½·δᵀΛδ − ½·log det Λ per task [tasks] for the prior precision Λ and δ = vec(Φ̂ − Θ)
        given as [tasks, d_out, d_A] (float64): −log N(φ̂; θ, Λ⁻¹) without its (D/2)·log 2π.
        Directions with a flat prior (precision 0) add nothing: an improper prior has no normaliser."""

    def sample(self, n: int, generator: torch.Generator | None = None, sd: Tensor | None = None) -> Tensor:
        """n draws of [W | b]: ``[n, tasks, d_out, d_A]``; ``sd`` [tasks] scales each task's
        deviation from the mean (σ, the observation noise's standard deviation)."""
        Z = torch.randn((n, *self.mean.shape), generator=generator, dtype=torch.float64, device=self.mean.device)
        noise = self._noise(Z)
        if sd is not None:
            noise = noise * sd.to(noise).view(1, -1, 1, 1)
        return self.mean + noise.to(self.mean.dtype)

    def split(self, W: Tensor) -> dict[str, Tensor]:
        """[..., d_out, d_A] -> {name.weight: [..., *weight_shape], name.bias: [..., d_out]}."""
        lead = W.shape[:-2]
        out = {param_key(self.name, "weight"): (W[..., :-1] if self.bias else W).reshape(*lead, *self.weight_shape)}
        if self.bias:
            out[param_key(self.name, "bias")] = W[..., -1]
        return out


def _scalar_prior_terms(tau: float, delta: Tensor) -> Tensor:
    return 0.5 * tau * delta.square().flatten(1).sum(1) - 0.5 * delta[0].numel() * math.log(tau)


@dataclass
class FactoredLayerPosterior(LayerPosterior):
    """Precision A_d ⊗ G_d, A_d = √c·A + π√τ·I = L_A L_Aᵀ and G_d = √c·G + (√τ/π)·I = L_G L_Gᵀ
    (K-FAC's π-corrected damping, :func:`fastlaplace.kfac_math.factored_damping`)."""

    L_A: Tensor  # [tasks, d_A, d_A] lower Cholesky factor of A_d
    L_G: Tensor  # [tasks, d_out, d_out] of G_d

    method: ClassVar[LogdetMethod] = LogdetMethod.FACTORED

    @classmethod
    def _factorise(cls, name, weight_shape, bias, mean, scale, tau, A, G):
        if callable(tau):
            raise ValueError("a prior precision per eigen-direction needs method='exact'")
        lam_A, lam_G = kfac_math.factored_damping(A, G, scale, tau)
        sc = scale**0.5  # A_d = √c·(A + λ_A·I)
        L_A, _ = ops.damped_cholesky(sc * A, sc * lam_A)
        L_G, _ = ops.damped_cholesky(sc * G, sc * lam_G)
        return cls(name, weight_shape, bias, mean, scale, float(tau), A, G, L_A, L_G)

    def _noise(self, Z: Tensor) -> Tensor:
        X = torch.linalg.solve_triangular(self.L_G.mT, Z, upper=True)  # L_G⁻ᵀ Z
        return torch.linalg.solve_triangular(self.L_A, X, upper=False, left=False)  # (L_G⁻ᵀ Z) L_A⁻¹

    def variance(self) -> Tensor:
        var_A = torch.cholesky_inverse(self.L_A).diagonal(dim1=-2, dim2=-1)  # diag A_d⁻¹
        var_G = torch.cholesky_inverse(self.L_G).diagonal(dim1=-2, dim2=-1)
        return var_G.unsqueeze(-1) * var_A.unsqueeze(-2)

    def logdet(self) -> Tensor:
        def ld(L):
            return 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        # log det(A_d ⊗ G_d): the damped factors' own log-dets, so no factor c to add
        return kfac_math.factored_logdet(ld(self.L_A), self.A.shape[-1], ld(self.L_G), self.G.shape[-1], 1.0)

    def prior_terms(self, delta: Tensor) -> Tensor:
        return _scalar_prior_terms(self.tau, delta)


@dataclass
class EigenLayerPosterior(LayerPosterior):
    """Precision c·A⊗G + τ, diagonal in the factors' joint eigenbasis U_A ⊗ U_G: the
    direction (i, j) has precision c·a_i·g_j + τ_ji (:func:`fastlaplace.kfac_math.exact_precisions`)
    and standard deviation ``std[j, i]``."""

    U_A: Tensor  # [tasks, d_A, d_A] eigenvectors of A (columns)
    U_G: Tensor  # [tasks, d_out, d_out]
    std: Tensor  # [tasks, d_out, d_A]: (c·a_i·g_j + τ_ji)^(-1/2)

    method: ClassVar[LogdetMethod] = LogdetMethod.EXACT

    @classmethod
    def _factorise(cls, name, weight_shape, bias, mean, scale, tau, A, G):
        a, U_A = torch.linalg.eigh(A)
        g, U_G = torch.linalg.eigh(G)
        tau = tau(a, g) if callable(tau) else float(tau)
        std = kfac_math.exact_precisions(a, g, scale, tau).rsqrt()
        return cls(name, weight_shape, bias, mean, scale, tau, A, G, U_A, U_G, std)

    def _noise(self, Z: Tensor) -> Tensor:
        return self.U_G @ (Z * self.std) @ self.U_A.mT

    def variance(self) -> Tensor:
        return self.U_G.square() @ self.std.square() @ self.U_A.square().mT

    def logdet(self) -> Tensor:
        return -2 * self.std.log().flatten(1).sum(1)

    def prior_terms(self, delta: Tensor) -> Tensor:
        if not isinstance(self.tau, Tensor):  # a scalar is the same in every basis
            return _scalar_prior_terms(self.tau, delta)
        rotated = self.U_G.mT @ delta @ self.U_A  # the eigenbasis in which τ is diagonal
        log_tau = torch.where(self.tau == 0, torch.zeros_like(self.tau), self.tau.log())
        return (0.5 * self.tau * rotated.square() - 0.5 * log_tau).flatten(1).sum(1)


@dataclass
class Predictive:
    """Predictions of posterior samples: ``samples`` [samples, tasks, points, outputs] (the
    sampled functions for regression, logits for classification), and ``mode`` = f(x, φ̂)
    [tasks, points, outputs] when the predictions are linearised at φ̂ (then the samples are
    exactly Gaussian around it)."""

    samples: Tensor
    mode: Tensor | None = None

    @property
    def mean(self) -> Tensor:
        return self.samples.mean(0)

    @property
    def std(self) -> Tensor:
        """Spread of the sampled functions (epistemic), without observation noise."""
        return self.samples.std(0, unbiased=self.samples.shape[0] > 1)

    def rescaled(self, sd: Tensor) -> Predictive:
        """The predictive of the posterior with its covariance scaled by sd² per task (``sd``
        [tasks] or broadcastable to [tasks, points, outputs]): exact for a linearised predictive,
        whose deviations from the mode are linear in the parameters'."""
        if self.mode is None:
            raise ValueError("only a linearised predictive can be rescaled; predict again with the noise instead")
        sd = sd.reshape(sd.shape[0], *[1] * (self.mode.dim() - 1)) if sd.dim() == 1 else sd
        return Predictive(self.mode + sd * (self.samples - self.mode), self.mode)

    def probs(self, approximation: str = "mc") -> Tensor:
        """Class probabilities of logit samples, ``[tasks, points, classes]``: ``"mc"``, the
        mean over samples of softmax(f_s); or ``"probit"``, the extended probit approximation
        softmax(μ / sqrt(1 + π/8·v)) of E[softmax(f)] for Gaussian logits of mean μ (the mode of
        a linearised predictive, else the sample mean) and variance v per class (MacKay 1992;
        as laplace-torch's ``link_approx="probit"``), with v estimated from the samples."""
        if approximation == "mc":
            return self.samples.softmax(-1).mean(0)
        if approximation != "probit":
            raise ValueError(f"approximation must be 'mc' or 'probit', got {approximation!r}")
        if self.mode is not None:
            mu, var = self.mode, (self.samples - self.mode).square().mean(0)
        else:
            mu, var = self.samples.mean(0), self.samples.var(0, unbiased=self.samples.shape[0] > 1)
        return (mu / (1 + math.pi / 8 * var).sqrt()).softmax(-1)


class LaplacePosterior:
    """Per-task Laplace posteriors N(φ̂, σ²·Ĥ⁻¹) of the adapted layers of a meta-learner, Ĥ
    the unit-noise precision of ``layers`` and σ² the observation noise ``noise_var`` (a
    number, or one per task [tasks]; 1 for classification).

    Built by :meth:`fastlaplace.LLAMA.posterior`. Parameters that are not adapted (BatchNorm)
    stay at their meta-learned values in every sample.
    """

    def __init__(self, net: TaskBatchedNetwork, params: dict[str, Tensor], layers: list[LayerPosterior],
                 noise_var: float | Tensor = 1.0):
        self.net, self.params, self.layers = net, params, layers
        self.tasks = next(iter(params.values())).shape[0]
        noise_var = torch.as_tensor(noise_var, dtype=torch.float64).flatten()
        if noise_var.numel() not in (1, self.tasks) or not bool((noise_var > 0).all() & noise_var.isfinite().all()):
            raise ValueError(f"noise_var must be positive and finite, one number or one per task ({self.tasks}), "
                             f"got {noise_var.numel()} values")
        self.noise_var = noise_var.expand(self.tasks)

    def with_noise(self, noise_var: float | Tensor) -> LaplacePosterior:
        """The same posterior under observation noise ``noise_var`` (shares the factorisations)."""
        return LaplacePosterior(self.net, self.params, self.layers, noise_var)

    def logdet(self) -> Tensor:
        """log det Ĥ per task, ``[tasks]`` (float64): the sum over the adapted layers (unit noise)."""
        return sum(layer.logdet() for layer in self.layers)

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """n parameter sets per task: a dict of ``[n, tasks, *shape]``."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"number of samples must be an integer >= 1, got {n!r}")
        sd = self.noise_var.sqrt()
        out = {}
        for layer in self.layers:
            out.update(layer.split(layer.sample(n, generator, sd)))
        return out

    def predict(self, x: Tensor, n_samples: int = 100, generator: torch.Generator | None = None,
                linearized: bool = True, chunk: int = 50) -> Predictive:
        """Predictions of ``n_samples`` posterior samples at inputs x [tasks, points, ...]:
        ``samples`` [samples, tasks, points, outputs], ``chunk`` samples at a time.

        ``linearized=True`` (default) predicts with the network linearised at φ̂,
        f(x, φ̂) + J(x)(φ − φ̂) (the GLM predictive of Immer et al. 2021: the one the Laplace
        posterior is the posterior of, computed with one forward-mode pass per chunk);
        ``False`` evaluates the sampled networks themselves, as in the paper's Figure 5,
        which with ReLU networks spreads also where the data are.
        """
        if x.shape[0] != self.tasks:
            raise ValueError(f"x has {x.shape[0]} tasks but the posterior has {self.tasks}")
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"number of samples must be an integer >= 1, got {n_samples!r}")
        outs, mode = [], None
        with torch.no_grad():
            for start in range(0, n_samples, chunk):
                n = min(chunk, n_samples - start)
                drawn = self.sample(n, generator)
                if linearized:
                    mode, jvps = self._pushforward(x, drawn)
                    outs.append(mode + jvps)
                else:
                    params = {k: drawn[k].flatten(0, 1) if k in drawn else v.repeat(n, *[1] * (v.dim() - 1))
                              for k, v in self.params.items()}
                    out, _ = self.net(params, x.repeat(n, *[1] * (x.dim() - 1)))
                    outs.append(out.reshape(n, self.tasks, *out.shape[1:]))
        return Predictive(torch.cat(outs), mode)

    def _pushforward(self, x: Tensor, drawn: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """f(x, φ̂) [tasks, ...] and J(x)(φ − φ̂) for each drawn φ [n, tasks, ...]: one
        forward-mode pass with the samples' tangents batched by ``vmap``, so that the network
        at φ̂ (and every intermediate value of it) is computed once, not once per sample."""
        adapted = {k: self.params[k] for k in drawn}
        fixed = {k: v for k, v in self.params.items() if k not in drawn}  # not adapted: no tangent
        tangents = {k: drawn[k] - adapted[k] for k in drawn}

        def jvp(tangent):
            return torch.func.jvp(lambda p: self.net({**fixed, **p}, x)[0], (adapted,), (tangent,))

        with warnings.catch_warnings():  # torch's first jvp scripts its decompositions
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
            return torch.func.vmap(jvp, out_dims=(None, 0))(tangents)

    def laplace_terms(self, theta: dict[str, Tensor]) -> Tensor:
        """−log p(φ̂|θ) + ½·log det Ĥ − (D/2)·log 2π per task [tasks] (unit noise; the 2π
        terms cancel), θ the meta-learned (shared) parameters: the Laplace estimate of
        −log p(X|θ) less the data's −log p(X|φ̂) (paper equation 11)."""
        total = 0.0
        for layer in self.layers:
            W = theta[param_key(layer.name, "weight")].reshape(layer.weight_shape[0], -1)
            if layer.bias:
                W = torch.cat([W, theta[param_key(layer.name, "bias")].unsqueeze(-1)], dim=-1)
            total = total + layer.prior_terms(layer.mean.double() - W.double()) + 0.5 * layer.logdet()
        return total.to(self.layers[0].mean.dtype)
