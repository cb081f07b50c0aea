"""The Laplace posterior of a task's adapted parameters, N(φ̂, Ĥ⁻¹), and sampling from it.

Ĥ is block diagonal over the adapted layers; each block is Kronecker factored
(``docs/design.md`` §3). With the layer's weight and bias as one matrix W = [W | b] of
shape [d_out, d_A] and its column-stacked vec:

- ``"factored"``: precision A_d ⊗ G_d with the damped factors A_d = √c·A + π√τ·I and
  G_d = √c·G + (√τ/π)·I; a sample is W = Ŵ + L_G⁻ᵀ Z L_A⁻¹ (Cholesky factors of
  :func:`fastlaplace.ops.damped_cholesky`).
- ``"exact"``: precision c·A⊗G + τI; with A = U_A diag(a) U_Aᵀ and G = U_G diag(g) U_Gᵀ a
  sample is W = Ŵ + U_G (Z ⊙ S) U_Aᵀ, S_ji = (c·a_i·g_j + τ_ji)^(-1/2). τ is a scalar or
  one precision per eigen-direction (the inner loop's implicit prior, :mod:`fastlaplace.prior`).

c·A⊗G is the K-FAC Fisher of the support set only, of its summed negative log likelihood
under unit noise, with c = N·T rows (``docs/design.md`` §2); a mean-squared-error inner loss
is (2/N)·that NLL. The factored precision's cross terms are positive semi-definite: it is
never below the exact one, so its posterior is never wider.

No dense covariance is ever formed (except by :meth:`LayerPosterior.dense_covariance`,
for tests on small layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops
from .batched import TaskBatchedNetwork, param_key
from .reference import pi_correction


@dataclass
class LayerPosterior:
    """Gaussian posterior of one layer's [W | b] for every task."""

    name: str
    weight_shape: tuple[int, ...]  # per task, e.g. (d_out, d_in) or (C_out, C_in, k, k)
    bias: bool
    mean: Tensor  # [tasks, d_out, d_A]
    method: str
    scale: float
    tau: float | Tensor  # scalar, or [tasks, d_out, d_A] per eigen-direction of A⊗G (exact only)
    A: Tensor  # [tasks, d_A, d_A]
    G: Tensor  # [tasks, d_out, d_out]
    L_A: Tensor | None = None  # factored: Cholesky factors of the damped factors
    L_G: Tensor | None = None
    U_A: Tensor | None = None  # exact: eigenvectors and per-entry standard deviations
    U_G: Tensor | None = None
    std: Tensor | None = None  # [tasks, d_out, d_A]

    @classmethod
    def build(cls, name, weight, bias, A, G, scale: float, tau, method: str) -> "LayerPosterior":
        """From the layer's adapted weight [tasks, d_out, ...] and bias [tasks, d_out], and its
        K-FAC factors. ``tau`` is a float, or (exact only) a function of the factors'
        eigenvalues a [tasks, d_A] and g [tasks, d_G] giving a precision per eigen-direction
        [tasks, d_out, d_A]. The factorisations run in float64 (float32 eigensolvers fail on the
        nearly singular factors of a few support points); samples come back in the
        parameters' dtype."""
        A, G = A.double(), G.double()
        T, d_out = weight.shape[:2]
        mean = weight.reshape(T, d_out, -1)
        if bias is not None:
            mean = torch.cat([mean, bias.unsqueeze(-1)], dim=-1)
        post = cls(name, tuple(weight.shape[1:]), bias is not None, mean, method, scale, tau, A, G)
        if callable(tau) and method != "exact":
            raise ValueError("a prior precision per eigen-direction needs method='exact'")
        if method == "factored":
            pi = pi_correction(A, G)
            sc, st = math.sqrt(scale), math.sqrt(tau)
            post.L_A, _ = ops.damped_cholesky(sc * A, pi * st)
            post.L_G, _ = ops.damped_cholesky(sc * G, st / pi)
        elif method == "exact":
            a, post.U_A = torch.linalg.eigh(A)
            g, post.U_G = torch.linalg.eigh(G)
            if callable(tau):
                post.tau = tau(a, g)
            post.std = (scale * g.unsqueeze(-1) * a.unsqueeze(-2) + post.tau).rsqrt()
        else:
            raise ValueError(f"method must be 'exact' or 'factored', got {method!r}")
        return post

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws of [W | b]: ``[n, tasks, d_out, d_A]``."""
        Z = torch.randn((n, *self.mean.shape), generator=generator, dtype=torch.float64, device=self.mean.device)
        if self.method == "factored":
            X = torch.linalg.solve_triangular(self.L_G.mT, Z, upper=True)  # L_G⁻ᵀ Z
            E = torch.linalg.solve_triangular(self.L_A, X, upper=False, left=False)  # (L_G⁻ᵀ Z) L_A⁻¹
        else:
            E = self.U_G @ (Z * self.std) @ self.U_A.mT
        return self.mean + E.to(self.mean.dtype)

    def split(self, W: Tensor) -> dict[str, Tensor]:
        """[..., d_out, d_A] -> {name.weight: [..., *weight_shape], name.bias: [..., d_out]}."""
        lead = W.shape[:-2]
        out = {param_key(self.name, "weight"): (W[..., :-1] if self.bias else W).reshape(*lead, *self.weight_shape)}
        if self.bias:
            out[param_key(self.name, "bias")] = W[..., -1]
        return out

    def dense_covariance(self) -> Tensor:
        """Covariance of vec([W | b]) (column-stacked) per task, [tasks, D, D]: for tests only."""
        eye_a = torch.eye(self.A.shape[-1], dtype=self.A.dtype, device=self.A.device)  # float64
        eye_g = torch.eye(self.G.shape[-1], dtype=self.G.dtype, device=self.G.device)
        out = []
        for t in range(self.A.shape[0]):
            if self.method == "factored":
                inv_a = torch.cholesky_inverse(self.L_A[t])
                inv_g = torch.cholesky_inverse(self.L_G[t])
                out.append(torch.kron(inv_a, inv_g))
            else:
                if torch.is_tensor(self.tau):  # per eigen-direction: (U_A⊗U_G) diag(vec τ) (U_A⊗U_G)ᵀ
                    U = torch.kron(self.U_A[t], self.U_G[t])
                    prior = U @ torch.diag(self.tau[t].mT.reshape(-1)) @ U.T
                else:
                    prior = self.tau * torch.kron(eye_a, eye_g)
                out.append(torch.linalg.inv(self.scale * torch.kron(self.A[t], self.G[t]) + prior))
        return torch.stack(out)


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
                    f, df = torch.func.jvp(lambda p: self.net(p, xs)[0], (mode,), (tangent,))
                    out = f + df
                else:
                    out, _ = self.net(params, xs)
                outs.append(out.reshape(n, self.tasks, *out.shape[1:]))
        return Predictive(torch.cat(outs))

    def predict_mean_params(self, x: Tensor) -> Tensor:
        """Outputs of the posterior mode φ̂ (MAML's point estimate)."""
        with torch.no_grad():
            return self.net(self.params, x)[0]
