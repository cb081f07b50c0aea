"""The Laplace posterior of a task's adapted parameters, N(φ̂, Ĥ⁻¹), and sampling from it.

Ĥ is block diagonal over the adapted layers; each block is Kronecker factored
(``docs/design.md`` §3). With the layer's weight and bias as one matrix W = [W | b] of
shape [d_out, d_A] and its column-stacked vec, a layer's posterior is one of two kinds with
one interface (:class:`LayerPosterior`: ``sample``, ``variance``, ``logdet``, ``split``):

- :class:`FactoredLayerPosterior` (``"factored"``): precision A_d ⊗ G_d with the damped
  factors A_d = √c·A + π√τ·I and G_d = √c·G + (√τ/π)·I; a sample is W = Ŵ + L_G⁻ᵀ Z L_A⁻¹
  (Cholesky factors of :func:`fastlaplace.ops.damped_cholesky`).
- :class:`EigenLayerPosterior` (``"exact"``): precision c·A⊗G + τI; with A = U_A diag(a) U_Aᵀ
  and G = U_G diag(g) U_Gᵀ a sample is W = Ŵ + U_G (Z ⊙ S) U_Aᵀ, S_ji = (c·a_i·g_j + τ_ji)^(-1/2).
  τ is a scalar or one precision per eigen-direction (the inner loop's implicit prior,
  :mod:`fastlaplace.prior`).

The damping and the eigenvalue arithmetic are :mod:`fastlaplace.kfac_math`'s, the same as the
log-det kernels' reference. c·A⊗G is the K-FAC Fisher of the support set only, of its summed
negative log likelihood under unit noise, with c = N·T rows (``docs/design.md`` §2); a
mean-squared-error inner loss is (2/N)·that NLL. The factored precision's cross terms are
positive semi-definite: it is never below the exact one, so its posterior is never wider.

No dense covariance is ever formed (except by ``dense_precision`` and ``dense_covariance``,
for tests on small layers).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from . import kfac_math, ops
from .batched import TaskBatchedNetwork, param_key
from .options import LogdetMethod, LogdetMethodLike, parse

# A prior precision: a scalar, or (exact only) a function of the factors' eigenvalues
# a [tasks, d_A] and g [tasks, d_G] giving one per eigen-direction [tasks, d_G, d_A].
PriorPrecision = float | Callable[[Tensor, Tensor], Tensor]


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

    @staticmethod
    def build(name: str, weight: Tensor, bias: Tensor | None, A: Tensor, G: Tensor, scale: float,
              tau: PriorPrecision, method: LogdetMethodLike) -> LayerPosterior:
        """The posterior of ``method``'s precision; arguments as :meth:`from_factors`."""
        kind = {LogdetMethod.FACTORED: FactoredLayerPosterior, LogdetMethod.EXACT: EigenLayerPosterior}
        return kind[parse(LogdetMethod, method, "method")].from_factors(name, weight, bias, A, G, scale, tau)

    @classmethod
    def from_factors(cls, name: str, weight: Tensor, bias: Tensor | None, A: Tensor, G: Tensor, scale: float,
                     tau: PriorPrecision) -> LayerPosterior:
        """From the layer's adapted weight [tasks, d_out, ...] and bias [tasks, d_out] (or None),
        and its K-FAC factors. ``tau`` is a float, or (exact only) a function of the factors'
        eigenvalues giving a precision per eigen-direction (:data:`PriorPrecision`). The
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
    def dense_precision(self) -> Tensor:
        """The precision of vec([W | b]) (column-stacked) per task, [tasks, D, D]: for tests only."""

    def dense_covariance(self) -> Tensor:
        """Covariance of vec([W | b]) (column-stacked) per task, [tasks, D, D]: for tests only."""
        return torch.linalg.inv(self.dense_precision())

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws of [W | b]: ``[n, tasks, d_out, d_A]``."""
        Z = torch.randn((n, *self.mean.shape), generator=generator, dtype=torch.float64, device=self.mean.device)
        return self.mean + self._noise(Z).to(self.mean.dtype)

    def split(self, W: Tensor) -> dict[str, Tensor]:
        """[..., d_out, d_A] -> {name.weight: [..., *weight_shape], name.bias: [..., d_out]}."""
        lead = W.shape[:-2]
        out = {param_key(self.name, "weight"): (W[..., :-1] if self.bias else W).reshape(*lead, *self.weight_shape)}
        if self.bias:
            out[param_key(self.name, "bias")] = W[..., -1]
        return out


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

    def dense_precision(self) -> Tensor:
        return torch.stack([torch.kron(LA @ LA.mT, LG @ LG.mT) for LA, LG in zip(self.L_A, self.L_G)])

    def dense_covariance(self) -> Tensor:
        return torch.stack([torch.kron(torch.cholesky_inverse(LA), torch.cholesky_inverse(LG))
                            for LA, LG in zip(self.L_A, self.L_G)])


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

    def dense_precision(self) -> Tensor:
        U = torch.stack([torch.kron(UA, UG) for UA, UG in zip(self.U_A, self.U_G)])  # vec(U_G E U_Aᵀ) = (U_A⊗U_G) vec E
        return U @ torch.diag_embed(self.std.mT.flatten(1).pow(-2)) @ U.mT


@dataclass
class Predictive:
    """Predictions of posterior samples: ``samples`` [samples, tasks, points, outputs]."""

    samples: Tensor

    @property
    def mean(self) -> Tensor:
        return self.samples.mean(0)

    @property
    def std(self) -> Tensor:
        """Spread of the sampled functions (epistemic), without observation noise."""
        return self.samples.std(0, unbiased=self.samples.shape[0] > 1)


class LaplacePosterior:
    """Per-task Laplace posteriors N(φ̂, Ĥ⁻¹) of the adapted layers of a meta-learner.

    Built by :meth:`fastlaplace.LLAMA.posterior`. Parameters that are not adapted (BatchNorm)
    stay at their meta-learned values in every sample.
    """

    def __init__(self, net: TaskBatchedNetwork, params: dict[str, Tensor], layers: list[LayerPosterior]):
        self.net, self.params, self.layers = net, params, layers
        self.tasks = next(iter(params.values())).shape[0]

    def logdet(self) -> Tensor:
        """log det Ĥ per task, ``[tasks]`` (float64): the sum over the adapted layers."""
        return sum(layer.logdet() for layer in self.layers)

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """n parameter sets per task: a dict of ``[n, tasks, *shape]``."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"number of samples must be an integer >= 1, got {n!r}")
        out = {}
        for layer in self.layers:
            out.update(layer.split(layer.sample(n, generator)))
        return out

    def predict(self, x: Tensor, n_samples: int = 100, generator: torch.Generator | None = None,
                linearized: bool = True, chunk: int = 50) -> Predictive:
        """Predictions of ``n_samples`` posterior samples at inputs x [tasks, points, ...]:
        ``samples`` [samples, tasks, points, outputs].

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
        outs = []
        with torch.no_grad():
            for start in range(0, n_samples, chunk):
                n = min(chunk, n_samples - start)
                drawn = self.sample(n, generator)
                mode = {k: v.repeat(n, *[1] * (v.dim() - 1)) for k, v in self.params.items()}
                params = {k: drawn[k].flatten(0, 1) if k in drawn else v for k, v in mode.items()}
                xs = x.repeat(n, *[1] * (x.dim() - 1))
                if linearized:
                    tangent = {k: params[k] - mode[k] for k in mode}
                    f, df = torch.func.jvp(lambda p, xs=xs: self.net(p, xs)[0], (mode,), (tangent,))
                    out = f + df
                else:
                    out, _ = self.net(params, xs)
                outs.append(out.reshape(n, self.tasks, *out.shape[1:]))
        return Predictive(torch.cat(outs))

    def predict_mean_params(self, x: Tensor) -> Tensor:
        """Outputs of the posterior mode φ̂ (MAML's point estimate)."""
        with torch.no_grad():
            return self.net(self.params, x)[0]
