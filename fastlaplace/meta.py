"""ML-POINT (MAML) and ML-LAPLACE (LLAMA): Algorithm 2 of Grant et al. (2018) with its
Subroutines 3 and 4, batched over the tasks of a meta-batch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .batched import TaskBatchedNetwork, autograd_enabled, normal_tensor, param_key
from .curvature import layer_rows, rows_logdet, support_rows
from .options import FisherType, LogdetMethod, Loss, parse
from .posterior import LaplacePosterior, LayerPosterior
from .prior import Prior


@dataclass
class MetaLoss:
    """The meta-objective of a batch of tasks and its parts (all differentiable in θ)."""

    loss: Tensor  # scalar: mean over tasks of the task objective
    query_loss: Tensor  # [tasks]: L_qry(φ̂)
    logdet: Tensor | None = None  # [tasks]: log det Ĥ(φ̂) (LLAMA only)


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _all_finite(x: Tensor) -> bool:
    """One read of ``x`` (its sum) in the usual case; the elementwise check only when the sum
    is not finite (a NaN or Inf, or finite values whose sum overflows)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


class MAML(nn.Module):
    """ML-POINT: φ̂ = θ after K steps of gradient descent on the support loss; the task
    objective is the query loss at φ̂ (Subroutine 3).

    Args:
        model: any ``nn.Module`` (skip connections, functional code in ``forward``, nested
            modules), called on a batch of examples in dimension 0. Its ``nn.Linear`` and
            ``nn.Conv2d`` layers are adapted per task, all tasks at once (see
            :mod:`fastlaplace.batched` for the rules); BatchNorm normalises each task with
            its own batch statistics (running statistics are never read nor updated) and,
            like every other parameter, its scale and shift are meta-learned but not adapted.
        inner_lr: α, the inner-loop step size.
        inner_steps: K, inner steps during meta-training (``adapt`` takes others).
        first_order: drop the second-order terms of the meta-gradient.
        loss: ``"mse"`` (regression) or ``"cross_entropy"`` (classification).
        check_finite: raise ``ValueError`` for NaN or Inf inputs. It costs one reduction per
            batch, a host synchronisation on CUDA: pass ``False`` in loops that must not sync
            (a non-finite input then shows as a non-finite loss). Skipped under
            ``torch.compile``, where the data-dependent branch would break the graph.
        adapt: the layers adapted in the inner loop: ``None`` (every Linear and Conv2d),
            module names (a container's name selects the layers inside it; e.g.
            ``["head"]``, as ANIL), or a predicate ``(name, module) -> bool``. The other
            layers run with θ; LLAMA's Laplace term and posterior cover the adapted ones.
        conv_strategy: how the adapted convolutions run for all tasks at once:
            ``"grouped"`` (one grouped convolution), ``"loop"`` (a plain convolution per
            task) or ``"auto"`` (the faster, timed once per layer shape on first use; see
            :class:`fastlaplace.batched.ConvPlanner`). The strategies agree up to rounding;
            ``"auto"``'s choice depends on timings, so two runs with one seed may then differ
            in the last bits (like ``cudnn.benchmark``): the default is the fixed
            ``"grouped"``. :meth:`conv_choices` says what ran.
        task_chunk: evaluate the network on at most this many tasks at a time (``None``:
            all at once; see :class:`fastlaplace.batched.TaskBatchedNetwork`). Same results
            up to rounding; smaller chunks lower the peak memory of the meta-gradient's
            backward (with 1, close to the per-task loop's) and, for large images on a CPU,
            may be faster (tensors as small as the loop's: fewer page faults).
        recompute_query: keep no activations of the query pass; the backward recomputes them
            (``torch.utils.checkpoint``), one task chunk at a time: with ``task_chunk``, the
            peak memory holds one chunk's query activations instead of all tasks'. It costs
            one more forward pass of the query set. Same results up to rounding. (LLAMA on a
            network without BatchNorm runs support and query sets in one recorded pass,
            which keeps its activations.)
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1,
                 first_order: bool = False, loss: str = "mse", check_finite: bool = True, adapt=None,
                 conv_strategy: str = "grouped", task_chunk: int | None = None, recompute_query: bool = False):
        super().__init__()
        _check_positive("inner_lr", inner_lr)
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")
        loss = parse(Loss, loss, "loss").value
        self.model = model
        self.net = TaskBatchedNetwork(model, adapt, conv_strategy, task_chunk)
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.loss = loss
        self.check_finite = check_finite
        self.recompute_query = bool(recompute_query)

    @property
    def likelihood(self) -> str:
        """The curvature's name for the loss's negative log likelihood (``"gaussian"`` or ``"categorical"``)."""
        return Loss(self.loss).likelihood.value

    def conv_choices(self) -> dict[str, dict[str, str]]:
        """The strategy each adapted convolution ran, per input shape [N·T, C, H, W], so far."""
        return {name: dict(shapes) for name, shapes in self.net.convs.choices.items()}

    # ------------------------------------------------------------------ helpers
    def task_losses(self, out: Tensor, y: Tensor) -> Tensor:
        """Mean loss of each task [tasks] for outputs [tasks, examples, ...]."""
        T = out.shape[0]
        if self.loss == Loss.MSE:
            return (out - y).pow(2).reshape(T, -1).mean(1)
        return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").reshape(T, -1).mean(1)

    def _check_batch(self, x: Tensor, y: Tensor, what: str) -> None:
        if x.dim() < 3:
            raise ValueError(f"{what}: inputs must be [tasks, examples, features...], got shape {tuple(x.shape)}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{what}: need at least one task and one example, got shape {tuple(x.shape)}")
        if self.loss == Loss.CROSS_ENTROPY and (y.shape != x.shape[:2] or y.is_floating_point()):
            raise ValueError(f"{what}: labels must be integers of shape {tuple(x.shape[:2])}, got "
                             f"{tuple(y.shape)} {y.dtype}")
        if self.loss == Loss.MSE and (y.dim() != 3 or y.shape[:2] != x.shape[:2]):
            raise ValueError(f"{what}: targets must be [tasks, examples, outputs] matching inputs "
                             f"{tuple(x.shape[:2])}, got {tuple(y.shape)}")
        param = next(iter(self.net.adapted_parameters().values()))
        if x.device != param.device:
            raise ValueError(f"{what}: inputs are on {x.device} but the model is on {param.device}")
        if self.check_finite and not torch.compiler.is_compiling() and not _all_finite(x):
            raise ValueError(f"{what}: inputs contain NaN or Inf")

    def _check_episode(self, x_support, y_support, x_query, y_query) -> None:
        self._check_batch(x_support, y_support, "support set")
        self._check_batch(x_query, y_query, "query set")
        if x_query.shape[0] != x_support.shape[0]:
            raise ValueError(f"support and query sets have {x_support.shape[0]} and {x_query.shape[0]} tasks")
        if x_query.shape[2:] != x_support.shape[2:]:
            raise ValueError(f"support and query inputs differ in shape: {tuple(x_support.shape[2:])} and "
                             f"{tuple(x_query.shape[2:])}")

    # ------------------------------------------------------------------ inner loop
    def adapt(self, x_support: Tensor, y_support: Tensor, steps: int | None = None,
              create_graph: bool | None = None) -> dict[str, Tensor]:
        """φ̂ for every task: ``steps`` (default K) gradient steps from θ on the support set.

        Returns a dict of per-task parameters, each [tasks, *shape]. Differentiable with
        respect to θ when grad mode is on (second order unless ``first_order``).
        """
        self._check_batch(x_support, y_support, "support set")
        return self._adapt(x_support, y_support, steps, create_graph)

    def _adapt(self, x_support: Tensor, y_support: Tensor, steps: int | None = None,
               create_graph: bool | None = None) -> dict[str, Tensor]:
        """:meth:`adapt` without the input checks (for callers that made them)."""
        steps = self.inner_steps if steps is None else steps
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        track = torch.is_grad_enabled()
        if create_graph is None:
            create_graph = track and not self.first_order
        T = x_support.shape[0]
        params = {k: p.unsqueeze(0).expand(T, *p.shape) for k, p in self.net.adapted_parameters().items()}
        with autograd_enabled():  # also under no_grad and inference_mode: the steps are gradients
            x_support, y_support = normal_tensor(x_support), normal_tensor(y_support)
            if not track:  # evaluation: a fresh leaf per task, no graph back to θ
                params = {k: p.detach().requires_grad_() for k, p in params.items()}
            for _ in range(steps):
                out, _ = self.net(params, x_support)
                # Tasks are independent, so the gradient of the summed losses with respect
                # to task t's parameters is the gradient of task t's own loss.
                loss = self.task_losses(out, y_support).sum()
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
                params = {k: p - self.inner_lr * g for (k, p), g in zip(params.items(), grads)}
        if not track:
            params = {k: p.detach() for k, p in params.items()}
        return params

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Outputs [tasks, examples, ...] of the adapted networks."""
        return self.net(params, x)[0]

    def _query_losses(self, params: dict[str, Tensor], x_query: Tensor, y_query: Tensor) -> Tensor:
        """L_qry(φ̂) per task [tasks], the query pass recomputed in the backward if asked."""
        return self.task_losses(self.net(params, x_query, recompute=self.recompute_query)[0], y_query)

    # ------------------------------------------------------------------ objective
    def meta_objective(self, x_support: Tensor, y_support: Tensor, x_query: Tensor, y_query: Tensor,
                       generator: torch.Generator | None = None) -> MetaLoss:
        self._check_episode(x_support, y_support, x_query, y_query)
        params = self._adapt(x_support, y_support)
        query_loss = self._query_losses(params, x_query, y_query)
        return MetaLoss(query_loss.mean(), query_loss)

    def meta_loss(self, x_support: Tensor, y_support: Tensor, x_query: Tensor, y_query: Tensor,
                  generator: torch.Generator | None = None) -> Tensor:
        """Mean task objective over a batch of tasks (inputs [tasks, examples, ...])."""
        return self.meta_objective(x_support, y_support, x_query, y_query, generator).loss

    forward = meta_loss


class LLAMA(MAML):
    """ML-LAPLACE: the task objective adds η·log det Ĥ(φ̂) (Subroutine 4), with Ĥ the K-FAC
    Fisher of the support set's summed negative log likelihood under unit noise (c·A⊗G per
    layer, c = N·T rows; the inner loss is the mean, e.g. (2/N)·that NLL for a one-output
    MSE) plus prior precision τ.

    Args:
        eta: η, weight of the log-det term (the paper: 1e-6).
        tau: τ, prior precision added to the curvature (the paper: 0.001).
        logdet_method: ``"factored"`` (K-FAC's π-corrected damping; the paper names no
            damping) or ``"exact"``. The factored log-det is never below the exact one (its
            cross terms are positive semi-definite).
        fisher: ``"auto"``, ``"gauss_newton"``, ``"sampled"`` or ``"empirical"``
            (see :mod:`fastlaplace.curvature`).
        Other arguments as :class:`MAML`. With ``eta = 0`` the objective and its
        meta-gradient are exactly MAML's.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1,
                 first_order: bool = False, loss: str = "mse", eta: float = 1e-6, tau: float = 1e-3,
                 logdet_method: str = "factored", fisher: str = "auto", check_finite: bool = True, adapt=None,
                 conv_strategy: str = "grouped", task_chunk: int | None = None, recompute_query: bool = False):
        super().__init__(model, inner_lr, inner_steps, first_order, loss, check_finite, adapt=adapt,
                         conv_strategy=conv_strategy, task_chunk=task_chunk, recompute_query=recompute_query)
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        _check_positive("tau", tau)
        logdet_method = parse(LogdetMethod, logdet_method, "logdet_method").value
        fisher = parse(FisherType, fisher, "fisher").value
        self.eta, self.tau = float(eta), float(tau)
        self.logdet_method, self.fisher = logdet_method, fisher

    def laplace_logdet(self, params: dict[str, Tensor], x_support: Tensor, y_support: Tensor,
                       generator: torch.Generator | None = None) -> Tensor:
        """log det Ĥ(φ̂) per task [tasks], differentiable with respect to θ through φ̂."""
        rows = support_rows(self.net, params, x_support, y_support, self.likelihood, self.fisher,
                            create_graph=torch.is_grad_enabled(), generator=generator)
        return rows_logdet(rows, self.tau, self.logdet_method)

    def meta_objective(self, x_support, y_support, x_query, y_query, generator=None) -> MetaLoss:
        if self.eta == 0:
            return super().meta_objective(x_support, y_support, x_query, y_query)
        self._check_episode(x_support, y_support, x_query, y_query)
        params = self._adapt(x_support, y_support)
        # Two passes with BatchNorm (batch statistics must not mix support and query examples)
        # and in evaluation (without a graph from θ to the outputs, the one pass gives no g rows).
        if self.net.has_batchnorm or not torch.is_grad_enabled():
            query_loss = self._query_losses(params, x_query, y_query)
            logdet = self.laplace_logdet(params, x_support, y_support, generator)
        else:  # one pass over support and query examples serves both terms
            out, records = self.net(params, torch.cat([x_support, x_query], 1), record=True)
            query_loss = self.task_losses(out[:, x_support.shape[1]:], y_query)
            rows = layer_rows(out, records, y_support, self.likelihood, self.fisher,
                              create_graph=torch.is_grad_enabled(), generator=generator)
            logdet = rows_logdet(rows, self.tau, self.logdet_method)
        return MetaLoss((query_loss + self.eta * logdet).mean(), query_loss, logdet)

    def posterior(self, x_support: Tensor, y_support: Tensor, tau: float | None = None, method: str | None = None,
                  generator: torch.Generator | None = None, steps: int | None = None, prior=None,
                  noise_var: float | Tensor = 1.0) -> LaplacePosterior:
        """Each task's Laplace posterior N(φ̂, σ²·Ĥ⁻¹) over its adapted layers (paper Section 5.1).

        Ĥ = c·A⊗G + prior precision, with c·A⊗G the K-FAC Fisher of the support set's summed
        negative log likelihood under unit noise (``docs/design.md`` §2); σ² = ``noise_var``
        (regression's observation noise, per task or one number; §6).

        Args:
            x_support, y_support: the tasks' support sets [tasks, examples, ...].
            tau: a scalar prior precision (default: the training τ); or
            prior: anything :meth:`fastlaplace.prior.Prior.of` takes: a number, one per layer
                (a mapping of layer names), or the inner loop's implicit prior (paper Section
                3.2): ``"early_stopping"`` (exact per eigen-direction; ``method="exact"``) or
                ``"early_stopping_first_order"`` (τ = 1/(s·α·K), either method).
            method: ``"factored"`` or ``"exact"`` precision (default: ``logdet_method``, or
                ``"exact"`` for ``prior="early_stopping"``).
            generator: for sampled-label Fisher curvature.
            steps: inner steps to reach φ̂ (default: the training K); the implicit prior is
                that of these steps.
            noise_var: σ², the observation noise of regression (1 for classification).
        """
        if prior is not None and tau is not None:
            raise ValueError("give either tau or prior, not both")
        prior = self.tau if prior is None and tau is None else prior if tau is None else tau
        return self.posteriors(x_support, y_support, [prior], method, generator, steps, noise_var)[0]

    def posteriors(self, x_support: Tensor, y_support: Tensor, priors: list, method: str | None = None,
                   generator: torch.Generator | None = None, steps: int | None = None,
                   noise_var: float | Tensor = 1.0) -> list[LaplacePosterior]:
        """:meth:`posterior` under each of ``priors``, from one adaptation and one K-FAC
        curvature of the support set (what a sweep over candidate priors would otherwise
        recompute for each); the same posteriors as separate calls with the same generator."""
        self._check_batch(x_support, y_support, "support set")
        steps = self.inner_steps if steps is None else steps
        if isinstance(priors, (str, int, float, dict, Prior, Tensor)):
            raise TypeError(f"priors must be a list of priors, got {type(priors).__name__} "
                            "(for one prior: posterior(prior=...))")
        priors = [Prior.of(p) for p in priors]
        if not priors:
            raise ValueError("posteriors needs at least one prior")
        methods = [prior.method(method, self.logdet_method) for prior in priors]  # bad combinations fail here
        with torch.no_grad():
            params = self._adapt(x_support, y_support, steps=steps)
        rows = support_rows(self.net, params, x_support, y_support, self.likelihood, self.fisher,
                            create_graph=False, generator=generator)
        names = [layer.name for layer in rows]
        for prior in priors:
            prior.check_layers(names)
        factors = [ops.kron_factors(layer.a.detach(), layer.g.detach(), layer.bias) for layer in rows]
        params = {k: v.detach() for k, v in params.items()}
        posteriors = []
        for prior, layer_method in zip(priors, methods):
            layers = [LayerPosterior.build(layer.name, params[param_key(layer.name, "weight")],
                                           params[param_key(layer.name, "bias")] if layer.bias else None, A, G,
                                           layer.c, prior.resolve(layer.name, layer.c, self.loss, y_support,
                                                                  self.inner_lr, steps), layer_method)
                      for layer, (A, G) in zip(rows, factors)]
            posteriors.append(LaplacePosterior(self.net, params, layers, noise_var))
        return posteriors
