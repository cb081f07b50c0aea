"""K-FAC curvature of a task's support set at its adapted parameters.

For every adapted Linear or Conv2d layer, K-FAC needs the layer's input rows ``a`` and the
per-row gradients ``g`` of the negative log likelihood with respect to its outputs
(``docs/design.md`` §2). Which likelihood gradient goes into ``g`` is the Fisher type:

- ``"gauss_newton"``: regression with one output under unit Gaussian noise, where the
  Fisher equals the Gauss-Newton matrix and g = ∂f/∂s exactly (no sampling).
- ``"sampled"``: targets drawn from the model's own predictive (the true Fisher, one
  Monte-Carlo sample): labels y ~ softmax(f) for classification, y = f + ε for regression.
- ``"empirical"``: the observed targets (the empirical Fisher).
- ``"auto"``: Gauss-Newton for one-output regression, sampled otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .batched import LayerRecord, LayerRows, TaskBatchedNetwork, autograd_enabled, normal_tensor
from .options import FisherType, Likelihood, LogdetMethodLike, parse


def _fisher_loss(out: Tensor, y: Tensor, likelihood: Likelihood, fisher: FisherType,
                 generator: torch.Generator | None) -> Tensor:
    """A scalar whose gradient with respect to each layer's outputs gives K-FAC's g rows."""
    if likelihood is Likelihood.GAUSSIAN:
        if fisher in (FisherType.AUTO, FisherType.GAUSS_NEWTON):
            if out.shape[-1] != 1:
                if fisher is FisherType.GAUSS_NEWTON:
                    raise ValueError("fisher='gauss_newton' needs a single output; use 'sampled'")
                fisher = FisherType.SAMPLED
            else:
                return out.sum()
        if fisher is FisherType.SAMPLED:
            eps = torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device)
            return (out * eps).sum()
        return 0.5 * (out - y).pow(2).sum()
    # categorical
    if fisher is FisherType.GAUSS_NEWTON:
        raise ValueError("fisher='gauss_newton' is for one-output regression; use 'sampled' or 'empirical'")
    logits = out.flatten(0, -2)
    if fisher is FisherType.EMPIRICAL:
        labels = y.flatten()
    else:
        probs = torch.softmax(logits.detach(), dim=-1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return F.cross_entropy(logits, labels, reduction="sum")


def layer_rows(
    out: Tensor,
    records: list[LayerRecord],
    y: Tensor,
    likelihood: str,
    fisher: str = "auto",
    create_graph: bool = True,
    generator: torch.Generator | None = None,
) -> list[LayerRows]:
    """The rows of every adapted layer, for the first ``y.shape[1]`` examples (a layer called
    more than once: the rows of all its calls, concatenated).

    ``out`` and ``records`` come from one recorded forward pass, which may hold more
    examples than ``y`` (LLAMA runs support and query sets through one pass when the
    network has no BatchNorm); rows of the others are dropped.
    """
    likelihood = parse(Likelihood, likelihood, "likelihood")
    fisher = parse(FisherType, fisher, "fisher")
    examples, total = y.shape[1], out.shape[1]
    with autograd_enabled():
        loss = _fisher_loss(out[:, :examples], y, likelihood, fisher, generator)
        grads = torch.autograd.grad(loss, [r.s for r in records], create_graph=create_graph)
    layers: dict[str, tuple[LayerRecord, list[Tensor], list[Tensor]]] = {}
    for record, grad_s in zip(records, grads):
        a, g = record.a, record.g_rows(grad_s)
        keep = examples * (a.shape[1] // total)  # rows are (example, location) pairs, example-major
        if keep != a.shape[1]:
            a, g = a[:, :keep], g[:, :keep]
        _, a_parts, g_parts = layers.setdefault(record.name, (record, [], []))
        a_parts.append(a if create_graph else a.detach())
        g_parts.append(g)
    # A layer called several times (shared weights) has its rows from every call, as KFC has
    # those of every location of a convolution.
    return [LayerRows(record, a[0] if len(a) == 1 else torch.cat(a, 1), g[0] if len(g) == 1 else torch.cat(g, 1))
            for record, a, g in layers.values()]


def support_rows(
    net: TaskBatchedNetwork,
    params: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    likelihood: str,
    fisher: str = "auto",
    create_graph: bool = True,
    generator: torch.Generator | None = None,
) -> list[LayerRows]:
    """:func:`layer_rows` of the support set (x, y) at per-task parameters ``params``."""
    with autograd_enabled():
        x, y = normal_tensor(x), normal_tensor(y)
        if not any(p.requires_grad for p in params.values()):  # g needs a graph from params to outputs
            params = {k: normal_tensor(v).detach().requires_grad_() for k, v in params.items()}
        out, records = net(params, x, record=True)
    return layer_rows(out, records, y, likelihood, fisher, create_graph, generator)


def rows_logdet(rows: list[LayerRows], tau: float, method: LogdetMethodLike = "factored") -> Tensor:
    """log det Ĥ per task [tasks]: Σ over layers of log det(c·A⊗G + τI), with c the layer's
    number of rows (examples × locations)."""
    total = None
    for layer in rows:
        logdet = ops.kfac_logdet(layer.a, layer.g, layer.c, tau, method, bias=layer.bias, check=False)
        total = logdet if total is None else total + logdet
    return total
