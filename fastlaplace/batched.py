"""Running a user's network for a whole batch of tasks, each with its own adapted weights.

MAML adapts the weights of the network's ``nn.Linear`` and ``nn.Conv2d`` layers per task.
Rather than looping over tasks in Python, :class:`TaskBatchedNetwork` runs the user's own
module, with its own ``forward`` (skip connections, functional calls, nested modules and
heads of any kind), once on the examples of every task stacked in dimension 0, while its
adapted layers and its BatchNorm layers compute per task through *stand-ins*:

- an adapted ``nn.Linear``: one batched matmul with the per-task weights [tasks, out, in];
- an adapted ``nn.Conv2d``: one grouped convolution (groups = tasks) with the per-task
  weights [tasks, C_out, C_in, k_h, k_w], or a plain convolution per task, whichever is
  faster for the layer's shapes (:class:`ConvPlanner`; ``conv_strategy`` fixes it);
- every BatchNorm (1d, 2d, 3d): normalisation with each task's own batch statistics, the
  channels (task, channel) of one ``F.batch_norm`` call.

Everything else (activations, pooling, residual additions, LayerNorm, ...) runs as the user
wrote it, on all tasks' examples at once, with the shared meta-parameters θ.

**How the stand-ins are installed.** For the duration of one call, each of these modules'
``forward`` is replaced by an instance attribute (a ``functools.partial`` of the stand-in),
removed again in a ``finally`` block: nothing is left behind after the call, also when the
forward raises; nested calls restore in order. The module's parameters are never modified.
Like :func:`torch.func.functional_call`, which also swaps module attributes for the length
of a call, this is not safe for two threads running the *same* model object at once.

**Layout.** The stacked examples are ordered example-major (row n·T + t is example n of task
t) when the network has an adapted convolution or a BatchNorm, so that a convolution's or a
BatchNorm's input [N·T, C, H, W] is, without a copy, the grouped input [N, T·C, H, W];
otherwise (MLPs) task-major (row t·N + n), so that a linear layer's input is [T, N, d]
without a copy. The model's ``forward`` must therefore treat the rows of dimension 0 as
independent examples (BatchNorm aside, which the stand-in handles); its output must be one
tensor with the examples in dimension 0.

**Task chunks and recomputation.** ``task_chunk`` runs the model on a few tasks at a time
(the chunks concatenated; the same result up to rounding): the backward then holds one
chunk's temporaries, and on a CPU each tensor stays as small as a per-task loop's (glibc maps
every allocation above 32 MiB afresh, and the kernel zero-fills its pages on first touch:
one large batched tensor costs more per element than several small ones reused from the
heap; ``benchmarks/RESULTS.md``). A call with ``recompute=True`` also keeps no activations
of its chunks: the backward runs each chunk's forward again, one at a time.

**What is adapted** (``docs/design.md`` §1, §2; docs/guide.md, "Bring your own network"):

- By default every ``nn.Linear`` and ``nn.Conv2d`` of the model (the types of the layer-kind
  table :data:`LAYER_KINDS`, one row each); ``adapt=`` selects a subset: module names (a
  container's name selects the Linear and Conv2d layers inside it), or a predicate
  ``(name, module) -> bool`` called on each Linear and Conv2d. The inner
  loop, the Laplace term and the posterior cover the selected layers only; the others run
  with θ (meta-learned, not adapted).
- BatchNorm's scale and shift are meta-learned, never adapted, never in the Fisher (paper
  Section 5.2). BatchNorm always normalises with each task's batch statistics, in
  ``train()`` and ``eval()`` mode alike; a module with ``track_running_stats=True`` is
  accepted, and its running statistics are **never read nor updated** (they stay as they
  are).
- Any other parameter (LayerNorm's or GroupNorm's affine, embeddings, recurrent layers,
  parameters registered on a module and used in its ``forward``) is meta-learned and not
  adapted, like BatchNorm's.
- Errors that name the layer: an adapted layer whose parameters are shared with another
  module (tied weights), a grouped convolution, a Linear or Conv2d subclass with its own
  ``forward``, a BatchNorm subclass with its own ``forward``, an adapted layer that the
  forward never calls as a module (e.g. ``F.linear(x, self.fc.weight)``, or
  ``nn.MultiheadAttention``'s output projection), or one called with rows that are not the
  stacked examples. Exclude such a layer with ``adapt=`` to keep it shared.

A layer called more than once in one forward (weight sharing) uses the same per-task
weights at every call; for K-FAC its rows from all calls are concatenated, as KFC does for
the locations of a convolution (``docs/design.md`` §2).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from .options import ConvStrategy, ConvStrategyLike, parse

_BATCHNORM_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)

_log = logging.getLogger("fastlaplace")

Selection = None | str | Iterable[str] | Callable[[str, nn.Module], bool]


def param_key(layer: str, what: str) -> str:
    """The key of a layer's ``"weight"`` or ``"bias"`` in the per-task parameter dicts: the
    module's path and the parameter's name, as in ``model.named_parameters()``."""
    return f"{layer}.{what}" if layer else what


@contextlib.contextmanager
def autograd_enabled():
    """Gradients on, also under ``torch.no_grad()`` or ``torch.inference_mode()``: the inner
    loop and K-FAC's g rows are gradients even when the caller only evaluates."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def normal_tensor(t: Tensor) -> Tensor:
    """``t``, cloned into an ordinary tensor if it was made under inference mode (autograd
    cannot save inference tensors for backward). Call inside :func:`autograd_enabled`.
    Under ``torch.compile`` it is always cloned: Dynamo cannot trace ``is_inference()`` (a
    graph break), and a clone is what an inference tensor needs (a support set: cheap)."""
    if torch.compiler.is_compiling():
        return t.clone()
    return t.clone() if t.is_inference() else t


@dataclass
class LayerRecord:
    """Rows of one call of an adapted layer for K-FAC: ``a`` [tasks, rows, d_in] (the inputs,
    or the unfolded patches of a convolution; rows are (example, location) pairs, example-
    major) and the outputs ``s`` as the stand-in produced them (∂loss/∂s gives g)."""

    name: str
    a: Tensor
    s: Tensor
    bias: bool
    kind: LayerKind
    tasks: int

    def g_rows(self, grad_s: Tensor) -> Tensor:
        """Reshape ∂loss/∂s to rows [tasks, rows, d_out] matching ``a``."""
        return self.kind.g_rows(grad_s, self.tasks)


class LayerRows(NamedTuple):
    """K-FAC's rows of one adapted layer, from all its calls: the inputs ``a`` [tasks, rows,
    d_in] and the gradients ``g`` [tasks, rows, d_out] of the loss with respect to its
    outputs, a row being an (example, location) pair; ``record`` is its first call's."""

    record: LayerRecord
    a: Tensor
    g: Tensor

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def bias(self) -> bool:
        return self.record.bias

    @property
    def c(self) -> float:
        """c of c·A⊗G: the rows of a task (examples × locations), as A and G are means over them."""
        return float(self.g.shape[1])


class _Call:
    """The state of one call: per-task parameters, sizes, layout and the recorded rows."""

    __slots__ = ("params", "tasks", "examples", "example_major", "record", "records", "called", "convs")

    def __init__(self, params: dict[str, Tensor], tasks: int, examples: int, example_major: bool, record: bool,
                 convs: ConvPlanner):
        self.params, self.tasks, self.examples, self.convs = params, tasks, examples, convs
        self.example_major, self.record = example_major, record
        self.records: list[LayerRecord] = []
        self.called: set[str] = set()


def _describe(name: str, module: nn.Module) -> str:
    return f"layer {name or '<the model itself>'!r} ({type(module).__name__})"


def _bad_input(call: _Call, name: str, module: nn.Module, x: Tensor, dims: str) -> ValueError:
    if x.dim() < 2:
        return ValueError(f"fastlaplace: {_describe(name, module)} received an input of shape {tuple(x.shape)}; it "
                          f"needs a batched input of {dims} dimensions")
    return ValueError(
        f"fastlaplace: {_describe(name, module)} received {x.shape[0]} rows in dimension 0, expected tasks × "
        f"examples = {call.tasks} × {call.examples}: the model's forward must pass each example through its "
        "adapted layers in dimension 0 (exclude the layer with adapt= to run it with shared weights)")


def _linear(call: _Call, name: str, module: nn.Linear, x: Tensor) -> Tensor:
    T, N = call.tasks, call.examples
    if x.dim() < 2 or x.shape[0] != T * N:
        raise _bad_input(call, name, module, x, "2 or more")
    call.called.add(name)
    w, b = call.params[param_key(name, "weight")], call.params.get(param_key(name, "bias"))
    d_in = x.shape[-1]
    if call.example_major:  # rows n·T + t -> [T, N·P, d_in] (a view when there is one row per example)
        xt = x.reshape(N, T, -1, d_in).transpose(0, 1).flatten(1, 2)
    else:  # rows t·N + n -> [T, N·P, d_in], a view
        xt = x.view(T, -1, d_in) if x.is_contiguous() else x.reshape(T, -1, d_in)
    s = xt @ w.mT if b is None else torch.baddbmm(b.unsqueeze(1), xt, w.mT)
    if call.record:
        call.records.append(LayerRecord(name, xt, s, b is not None, LINEAR, T))
    if call.example_major:
        return s.reshape(T, N, -1, s.shape[-1]).transpose(0, 1).reshape(*x.shape[:-1], s.shape[-1])
    return s.view(-1, s.shape[-1]) if x.dim() == 2 else s.view(*x.shape[:-1], s.shape[-1])


def _same_padding(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) of ``padding='same'``: the odd unit on the right, as PyTorch pads."""
    out = []
    for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
        total = d * (k - 1)
        out += [total // 2, total - total // 2]
    return tuple(out)


def _conv2d(call: _Call, name: str, module: nn.Conv2d, x: Tensor) -> Tensor:
    T, N = call.tasks, call.examples
    if x.dim() != 4 or x.shape[0] != T * N:
        raise _bad_input(call, name, module, x, "4")
    call.called.add(name)
    w, b = call.params[param_key(name, "weight")], call.params.get(param_key(name, "bias"))
    padding = module.padding
    if module.padding_mode != "zeros":  # as nn.Conv2d does: pad by the mode, then convolve unpadded
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    y = call.convs(name, x, w, b, T, module.stride, padding, module.dilation)  # [N, T·C_out, H', W']
    if call.record:
        if padding == "valid":
            padding = 0
        elif padding == "same":
            x, padding = F.pad(x, _same_padding(module)), 0
        patches = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)  # [N·T, D, L]
        a = patches.reshape(N, T, *patches.shape[1:]).permute(1, 0, 3, 2).reshape(T, -1, patches.shape[1])
        call.records.append(LayerRecord(name, a, y, b is not None, CONV2D, T))
    return y.reshape(N * T, -1, *y.shape[2:])


def _conv_g_rows(grad_s: Tensor, tasks: int) -> Tensor:
    """∂loss/∂s of a convolution, [N, tasks·C_out, H', W'], as rows [tasks, N·H'·W', C_out]."""
    N, C = grad_s.shape[0], grad_s.shape[1] // tasks
    return grad_s.reshape(N, tasks, C, -1).permute(1, 0, 3, 2).reshape(tasks, -1, C)


def _check_groups(name: str, module: nn.Conv2d) -> None:
    if module.groups != 1:
        raise TypeError(f"fastlaplace: {_describe(name, module)} is a grouped convolution (groups={module.groups}), "
                        "which cannot be adapted (its K-FAC block is not one Kronecker product); exclude it with "
                        "adapt= (it then stays shared and meta-learned)")


@dataclass(frozen=True)
class LayerKind:
    """A type of layer that MAML can adapt per task: a row of :data:`LAYER_KINDS`.

    ``forward(call, name, module, x)`` stands in for the module's forward with per-task
    weights (and records its K-FAC rows when the call records them); ``g_rows(grad_s, tasks)``
    turns ∂loss/∂s, s being the outputs as the stand-in made them, into rows [tasks, rows,
    d_out] matching ``a``; ``example_major``: the stand-in needs the examples ordered
    example-major (see the module's docstring); ``own``: the methods a subclass must not
    override (the stand-in would bypass them); ``check(name, module)`` refuses a module of
    the type that cannot be adapted.
    """

    module: type[nn.Module]
    forward: Callable[..., Tensor]
    g_rows: Callable[[Tensor, int], Tensor]
    example_major: bool = False
    own: tuple[str, ...] = ("forward",)
    check: Callable[[str, nn.Module], None] | None = None


LINEAR = LayerKind(nn.Linear, _linear, lambda grad_s, tasks: grad_s)  # s is already [tasks, rows, d_out]
CONV2D = LayerKind(nn.Conv2d, _conv2d, _conv_g_rows, example_major=True, own=("forward", "_conv_forward"),
                   check=_check_groups)
LAYER_KINDS: tuple[LayerKind, ...] = (LINEAR, CONV2D)


def _adaptable() -> str:
    """The adaptable module types, for messages: "nn.Linear or nn.Conv2d"."""
    return " or ".join(f"nn.{kind.module.__name__}" for kind in LAYER_KINDS)


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The row of :data:`LAYER_KINDS` that ``module`` is an instance of (None: not adaptable)."""
    for kind in LAYER_KINDS:
        if isinstance(module, kind.module):
            return kind
    return None


def _conv_grouped(x: Tensor, w: Tensor, b: Tensor | None, tasks: int, stride, padding, dilation) -> Tensor:
    """One grouped convolution: rows [N·T, C] are, without a copy, channels [N, T·C]."""
    x = x.reshape(x.shape[0] // tasks, -1, *x.shape[2:])
    return F.conv2d(x, w.flatten(0, 1), None if b is None else b.flatten(), stride, padding, dilation, tasks)


def _conv_loop(x: Tensor, w: Tensor, b: Tensor | None, tasks: int, stride, padding, dilation) -> Tensor:
    """A plain convolution per task on its (strided) rows, the outputs stacked as [N, T·C_out]."""
    x = x.reshape(x.shape[0] // tasks, tasks, *x.shape[1:])
    ys = [F.conv2d(x[:, t], w[t], None if b is None else b[t], stride, padding, dilation) for t in range(tasks)]
    return torch.stack(ys, 1).flatten(1, 2)


_CONVOLUTIONS = {ConvStrategy.GROUPED: _conv_grouped, ConvStrategy.LOOP: _conv_loop}


class ConvPlanner:
    """How the task-batched convolutions of one :class:`TaskBatchedNetwork` run.

    ``"grouped"`` and ``"loop"`` fix the strategy; ``"auto"`` times both, forward and
    backward, on the first call of each (layer shape, input shape and strides, device,
    dtype), keeps the faster and reuses it for the life of this object, which belongs to
    the network (so to its learner: two learners measure for themselves; nothing is shared
    through the process). Measuring costs a few forward and backward passes of the layer
    once per shape, with a host synchronisation on CUDA; under ``torch.compile`` an
    unmeasured shape runs ``"grouped"``. Strategies agree up to floating-point rounding.

    :attr:`choices` records what each layer ran (fixed or measured), per input shape
    ("[N·T, C, H, W]"), for the run's folder; each new entry is also logged (``logging``,
    logger ``fastlaplace``).
    """

    def __init__(self, strategy: ConvStrategyLike = "grouped", repeats: int = 2):
        self.strategy = parse(ConvStrategy, strategy, "conv_strategy")
        self.repeats = repeats
        self._cache: dict[tuple, ConvStrategy] = {}
        self.choices: dict[str, dict[str, str]] = {}  # layer -> input shape -> strategy

    def __call__(self, name: str, x: Tensor, w: Tensor, b: Tensor | None, tasks: int, stride, padding,
                 dilation) -> Tensor:
        """The convolution of rows ``x`` [N·T, C, H, W] (example-major) with per-task ``w``
        [T, C_out, C, k_h, k_w] and ``b`` [T, C_out]: [N, T·C_out, H', W']."""
        strategy = self.strategy
        if strategy is ConvStrategy.AUTO:
            key = (tuple(x.shape), x.stride(), tuple(w.shape), b is not None, stride, padding, dilation, x.device,
                   x.dtype, tasks)
            strategy = self._cache.get(key)
            if strategy is None:
                if torch.compiler.is_compiling() or _inside_functorch_transform():
                    # timing needs plain autograd; the strategies give the same values
                    strategy = ConvStrategy.GROUPED
                else:
                    strategy = self._cache[key] = self._measure(x, w, b, (tasks, stride, padding, dilation))
        if not torch.compiler.is_compiling():
            shape = str(list(x.shape))
            if self.choices.get(name, {}).get(shape) != strategy.value:
                self.choices.setdefault(name, {})[shape] = strategy.value
                _log.info("fastlaplace: convolution %r on input %s runs %r", name, shape, strategy.value)
        return _CONVOLUTIONS[strategy](x, w, b, tasks, stride, padding, dilation)

    def _measure(self, x: Tensor, w: Tensor, b: Tensor | None, args: tuple) -> ConvStrategy:
        """The strategy with the shortest forward and backward (best of ``repeats`` after a warm-up)."""
        cuda = x.device.type == "cuda"
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone().requires_grad_(x.requires_grad)
            w = w.detach().clone().requires_grad_()
            b = None if b is None else b.detach().clone().requires_grad_()
            wrt = [t for t in (x, w, b) if t is not None and t.requires_grad]
            best, best_time = ConvStrategy.GROUPED, math.inf
            for strategy, fn in _CONVOLUTIONS.items():
                times = []
                for _ in range(1 + self.repeats):
                    if cuda:
                        torch.cuda.synchronize(x.device)
                    start = time.perf_counter()
                    y = fn(x, w, b, *args)
                    torch.autograd.grad(y, wrt, torch.ones_like(y))
                    if cuda:
                        torch.cuda.synchronize(x.device)
                    times.append(time.perf_counter() - start)
                if min(times[1:]) < best_time:
                    best, best_time = strategy, min(times[1:])
        return best


def _batch_norm(call: _Call, name: str, module: _BatchNorm, x: Tensor) -> Tensor:
    T, N = call.tasks, call.examples
    if x.dim() < 2 or x.shape[0] != T * N:
        raise _bad_input(call, name, module, x, "2 to 5")
    C = x.shape[1]
    w = None if module.weight is None else module.weight.repeat(T)
    b = None if module.bias is None else module.bias.repeat(T)
    # Channels (task, channel): each task's own batch statistics; running statistics untouched.
    y = F.batch_norm(x.reshape(N, T * C, *x.shape[2:]), None, None, w, b, True, 0.0, module.eps)
    return y.reshape(x.shape)


_MISSING = object()


class TaskBatchedNetwork:
    """Any ``nn.Module`` evaluated with per-task weights for its adapted Linear and Conv2d
    layers and per-task batch statistics for its BatchNorm layers (see the module's
    docstring for the rules).

    Args:
        model: the network; called as ``model(x)`` on a batch of examples in dimension 0.
        adapt: which Linear and Conv2d layers are adapted: ``None`` (all), module names
            (a container's name selects the layers inside it), or a predicate
            ``(name, module) -> bool`` called on every Linear and Conv2d.
        conv_strategy: how the adapted convolutions run, ``"grouped"``, ``"loop"`` or
            ``"auto"`` (measured per layer shape; see :class:`ConvPlanner`, held as
            :attr:`convs`).
        task_chunk: run the model on at most this many tasks at a time (``None``: all at
            once), the chunks' outputs concatenated. Tasks are independent, so the result is
            the same up to rounding; the backward then holds one chunk's temporaries at a
            time instead of all tasks' (peak memory), and each chunk's tensors are smaller
            (on a CPU, fewer page faults; see above). Calls that record K-FAC rows run all
            tasks at once.
    """

    def __init__(self, model: nn.Module, adapt: Selection = None, conv_strategy: ConvStrategyLike = "grouped",
                 task_chunk: int | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"fastlaplace: the model must be an nn.Module, got {type(model).__name__}")
        if task_chunk is not None and (isinstance(task_chunk, bool) or not isinstance(task_chunk, int)
                                       or task_chunk < 1):
            raise ValueError(f"fastlaplace: task_chunk must be None or an integer >= 1, got {task_chunk!r}")
        self.task_chunk = task_chunk
        self._planned: set[tuple] = set()  # chunk shapes whose convolutions "auto" has timed (see _recomputed)
        modules = list(model.named_modules())
        for name, module in modules:
            if isinstance(module, torch.jit.ScriptModule):
                raise TypeError(f"fastlaplace: {_describe(name, module)} is a TorchScript module, whose forward "
                                "cannot run with per-task weights; pass the Python module")
            if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters(recurse=False)):
                raise ValueError(f"fastlaplace: {_describe(name, module)} has uninitialised (lazy) parameters; "
                                 "run the model once on an example batch before meta-learning it")
        self.model = model
        self.convs = ConvPlanner(conv_strategy)
        self.adapted: list[tuple[str, nn.Module]] = _select(modules, adapt)
        if not self.adapted:
            raise ValueError(f"fastlaplace: adapt selects no layer: at least one {_adaptable()} must be adapted")
        owners: dict[int, list[str]] = {}
        for name, module in modules:
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), []).append(name)
        for name, module in self.adapted:
            _check_adaptable(name, module)
            for what in ("weight", "bias"):
                p = getattr(module, what)
                others = [o for o in owners.get(id(p), []) if o != name] if p is not None else []
                if others:
                    raise ValueError(
                        f"fastlaplace: {_describe(name, module)} shares its {what} with {others[0]!r} (tied "
                        "weights): an adapted layer's parameters must be its own, or a task's adapted copy would "
                        f"untie them; exclude {name!r} with adapt= (its weights then stay shared and meta-learned)")
        self.norms: list[tuple[str, _BatchNorm]] = []
        for name, module in modules:
            if isinstance(module, _BatchNorm):
                if type(module).forward not in _BATCHNORM_FORWARDS:
                    raise TypeError(f"fastlaplace: {_describe(name, module)} overrides BatchNorm's forward; its "
                                    "batch statistics would mix the tasks of a meta-batch")
                self.norms.append((name, module))
        self.has_batchnorm = bool(self.norms)
        self.kinds = [layer_kind(m) for _, m in self.adapted]
        self.example_major = self.has_batchnorm or any(kind.example_major for kind in self.kinds)

    @property
    def adapted_layers(self) -> list[str]:
        """Names of the adapted layers (module paths, as in ``model.named_modules()``)."""
        return [name for name, _ in self.adapted]

    def adapted_parameters(self) -> dict[str, Tensor]:
        """θ of the inner loop: the weights and biases of the adapted layers."""
        out = {}
        for name, layer in self.adapted:
            out[param_key(name, "weight")] = layer.weight
            if layer.bias is not None:
                out[param_key(name, "bias")] = layer.bias
        return out

    def __call__(
        self, params: dict[str, Tensor], x: Tensor, record: bool = False, recompute: bool = False
    ) -> tuple[Tensor, list[LayerRecord]]:
        """Outputs [tasks, examples, ...] for inputs [tasks, examples, ...] and per-task
        ``params`` (each [tasks, *shape], keyed as :meth:`adapted_parameters`); with
        ``record``, also the K-FAC rows of every call of every adapted layer. With
        ``recompute`` (and gradients on), each chunk of tasks keeps no activations: the
        backward runs its forward again (``torch.utils.checkpoint``), one chunk at a time,
        so the peak holds one chunk's (the outputs are then not to be differentiated twice)."""
        T, chunk = x.shape[0], self.task_chunk or x.shape[0]
        recompute = recompute and not record and torch.is_grad_enabled()
        if record or (chunk >= T and not recompute):
            return self._run(params, x, record)
        run = self._recomputed if recompute else self._outputs
        outs = [run({k: p[t:t + chunk] for k, p in params.items()}, x[t:t + chunk]) for t in range(0, T, chunk)]
        return (outs[0] if len(outs) == 1 else torch.cat(outs)), []

    def _outputs(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return self._run(params, x, False)[0]

    def _recomputed(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        if self.convs.strategy is ConvStrategy.AUTO and key not in self._planned and not torch.compiler.is_compiling():
            # "auto" times its candidates with autograd, which cannot run inside a checkpoint: first a plain pass
            with torch.no_grad():
                self._outputs(params, x)
            self._planned.add(key)
        keys = list(params)
        return checkpoint(lambda x, *values: self._outputs(dict(zip(keys, values)), x), x, *params.values(),
                          use_reentrant=False)

    def _run(self, params: dict[str, Tensor], x: Tensor, record: bool) -> tuple[Tensor, list[LayerRecord]]:
        """:meth:`__call__` on all of ``x``'s tasks at once."""
        T, N = x.shape[:2]
        call = _Call(params, T, N, self.example_major, record, self.convs)
        rows = x.transpose(0, 1).reshape(N * T, *x.shape[2:]) if self.example_major else x.reshape(T * N, *x.shape[2:])
        with self._stand_ins(call):
            out = self.model(rows)
        if len(call.called) != len(self.adapted):
            missing = [name for name, _ in self.adapted if name not in call.called]
            raise ValueError(
                f"fastlaplace: the adapted layer(s) {missing} were not called as modules in the model's forward "
                "(their parameters may be used directly, e.g. F.linear(x, self.fc.weight), as nn.MultiheadAttention "
                "does with its out_proj); call the module, or exclude the layer(s) with adapt=")
        if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != T * N:
            what = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"fastlaplace: the model's forward must return one tensor with the {T * N} examples in "
                             f"dimension 0, got {what}")
        if self.example_major:
            return out.reshape(N, T, *out.shape[1:]).transpose(0, 1), call.records
        return out.reshape(T, N, *out.shape[1:]), call.records

    def _stand_ins(self, call: _Call):
        return _StandIns(call, [(m, functools.partial(kind.forward, call, n, m))
                                for (n, m), kind in zip(self.adapted, self.kinds)]
                         + [(m, functools.partial(_batch_norm, call, n, m)) for n, m in self.norms])


def _inside_functorch_transform() -> bool:
    """Inside torch.func's jvp, vmap or grad (the linearised predictive), where a tensor cannot
    be detached and given requires_grad, as the "auto" strategy's timing does."""
    return torch._C._functorch.peek_interpreter_stack() is not None


class _StandIns:
    """Installs each module's stand-in ``forward`` as an instance attribute; restores what was
    there (nothing, or an outer call's stand-in) on exit, whatever happened."""

    __slots__ = ("call", "pairs", "saved")

    def __init__(self, call: _Call, pairs: list[tuple[nn.Module, Callable]]):
        self.call, self.pairs, self.saved = call, pairs, []

    def __enter__(self):
        try:
            for module, fn in self.pairs:
                previous = module.__dict__.get("forward", _MISSING)
                if previous is not _MISSING and not _is_stand_in(previous):
                    raise TypeError(f"fastlaplace: {_describe(fn.args[1], module)} has its forward replaced on the "
                                    "instance (by a wrapper or hook library?), which the learner would bypass; "
                                    "exclude it with adapt=, or remove the replacement")
                self.saved.append((module, previous))
                module.__dict__["forward"] = fn
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        while self.saved:
            module, previous = self.saved.pop()
            if previous is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous
        return False


def _is_stand_in(forward) -> bool:
    """An outer call's stand-in (of any kind in the table, looked up now)."""
    return getattr(forward, "func", None) in (*(kind.forward for kind in LAYER_KINDS), _batch_norm)



def _select(modules: list[tuple[str, nn.Module]], adapt: Selection) -> list[tuple[str, nn.Module]]:
    candidates = [(n, m) for n, m in modules if layer_kind(m) is not None]
    if adapt is None:
        return candidates
    if callable(adapt) and not isinstance(adapt, (str, nn.Module)):
        return [(n, m) for n, m in candidates if adapt(n, m)]
    names = [adapt] if isinstance(adapt, str) else list(adapt) if isinstance(adapt, Iterable) else [adapt]
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"fastlaplace: adapt must be None, module names or a predicate (name, module) -> bool, "
                        f"got {adapt!r}")
    by_name = dict(modules)
    chosen: set[str] = set()
    for name in names:
        if name not in by_name:
            known = [n for n, _ in candidates]
            raise ValueError(f"fastlaplace: adapt names {name!r}, which is not a module of the model; its adaptable "
                             f"layers ({_adaptable()}) are {known[:20]}{' ...' if len(known) > 20 else ''}")
        inside = [n for n, _ in candidates if n == name or not name or n.startswith(name + ".")]
        if not inside:
            raise ValueError(f"fastlaplace: adapt names {_describe(name, by_name[name])}, which neither is nor "
                             f"contains an {_adaptable()}: only those can be adapted")
        chosen.update(inside)
    return [(n, m) for n, m in candidates if n in chosen]


def _check_adaptable(name: str, module: nn.Module) -> None:
    kind = layer_kind(module)
    base = kind.module
    own = [f for f in kind.own if getattr(type(module), f, None) is not getattr(base, f, None)]
    if own:
        raise TypeError(f"fastlaplace: {_describe(name, module)} is a {base.__name__} with its own {own[0]}, which "
                        "cannot run with per-task weights; exclude it with adapt= (it then stays shared and "
                        "meta-learned)")
    if kind.check is not None:
        kind.check(name, module)
