"""Running one network for a whole batch of tasks, each with its own adapted weights.

MAML adapts the weights of every Linear and Conv2d layer per task. Rather than looping
over tasks in Python, :class:`TaskBatchedNetwork` evaluates an ``nn.Sequential`` with
weights that carry a leading task dimension: Linear layers as batched matmuls, Conv2d
layers as one grouped convolution (groups = tasks), BatchNorm with per-task batch
statistics. It can also record, for each adapted layer, the rows K-FAC needs: the layer
inputs (unfolded patches for convolutions) and the pre-activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Identity, nn.Dropout)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


@dataclass
class LayerRecord:
    """Rows of one adapted layer for K-FAC: ``a`` [tasks, rows, d_in] (patches for conv) and
    the pre-activations ``s`` as produced by the forward pass (grad w.r.t. ``s`` gives g)."""

    name: str
    a: Tensor
    s: Tensor
    bias: bool

    def g_rows(self, grad_s: Tensor) -> Tensor:
        """Reshape ∂loss/∂s to rows [tasks, rows, d_out] matching ``a``."""
        if grad_s.dim() == 3:  # Linear: [T, N, d_out]
            return grad_s
        T, N, C = grad_s.shape[:3]  # Conv2d: [T, N, C, H, W] -> rows (example, location)
        return grad_s.permute(0, 1, 3, 4, 2).reshape(T, -1, C)


def _flatten(module: nn.Module) -> list[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        out = []
        for name, child in module.named_children():
            out += [(f"{name}.{n}" if n else name, m) for n, m in _flatten(child)]
        return out
    return [("", module)]


class TaskBatchedNetwork:
    """An ``nn.Sequential`` of Linear, Conv2d, BatchNorm2d, pooling, Flatten and elementwise
    activations, evaluated with per-task weights for its Linear and Conv2d layers."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Sequential):
            raise TypeError(
                "fastlaplace: the model must be an nn.Sequential of Linear, Conv2d, BatchNorm2d, pooling, "
                f"Flatten and activation layers; got {type(model).__name__}"
            )
        self.model = model
        self.layers = _flatten(model)
        for name, layer in self.layers:
            supported = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.Flatten) + _ELEMENTWISE + _POOLS
            if not isinstance(layer, supported):
                raise TypeError(f"fastlaplace: layer {name!r} ({type(layer).__name__}) is not supported")
            if isinstance(layer, nn.Conv2d) and (
                layer.groups != 1 or layer.dilation != (1, 1) or isinstance(layer.padding, str)
            ):
                raise TypeError(
                    f"fastlaplace: layer {name!r}: grouped, dilated or string-padded convolutions are not supported"
                )
            if isinstance(layer, nn.BatchNorm2d) and layer.track_running_stats:
                # MAML normalises with each task's batch statistics, in training and at test.
                raise TypeError(f"fastlaplace: layer {name!r}: use BatchNorm2d(track_running_stats=False)")
        self.has_batchnorm = any(isinstance(m, nn.BatchNorm2d) for _, m in self.layers)

    def adapted_parameters(self) -> dict[str, Tensor]:
        """θ of the inner loop: the weights and biases of every Linear and Conv2d layer."""
        out = {}
        for name, layer in self.layers:
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                out[f"{name}.weight"] = layer.weight
                if layer.bias is not None:
                    out[f"{name}.bias"] = layer.bias
        return out

    def __call__(
        self, params: dict[str, Tensor], x: Tensor, record: bool = False
    ) -> tuple[Tensor, list[LayerRecord]]:
        """Outputs [tasks, examples, ...] for inputs [tasks, examples, ...] and per-task
        ``params`` (each [tasks, *shape]); with ``record``, also the K-FAC rows."""
        records: list[LayerRecord] = []
        T, N = x.shape[:2]
        for name, layer in self.layers:
            if isinstance(layer, nn.Linear):
                w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
                s = x @ w.mT if b is None else torch.baddbmm(b.unsqueeze(1), x, w.mT)
                if record:
                    records.append(LayerRecord(name, x, s, b is not None))
                x = s
            elif isinstance(layer, nn.Conv2d):
                x_in = x
                x = self._conv(layer, params[f"{name}.weight"], params.get(f"{name}.bias"), x)
                if record:
                    patches = F.unfold(x_in.flatten(0, 1), layer.kernel_size, padding=layer.padding, stride=layer.stride)
                    a = patches.transpose(1, 2).reshape(T, -1, patches.shape[1])  # rows (example, location)
                    records.append(LayerRecord(name, a, x, layer.bias is not None))
            elif isinstance(layer, nn.BatchNorm2d):
                C = x.shape[2]
                y = x.transpose(0, 1).reshape(N, T * C, *x.shape[3:])  # channels (task, channel): per-task stats
                w = None if layer.weight is None else layer.weight.repeat(T)
                b = None if layer.bias is None else layer.bias.repeat(T)
                y = F.batch_norm(y, None, None, w, b, training=True, eps=layer.eps)
                x = y.reshape(N, T, C, *x.shape[3:]).transpose(0, 1)
            elif isinstance(layer, nn.Flatten):
                x = x.reshape(T, N, -1)
            else:  # activations and pooling act on each example alone
                x = layer(x.flatten(0, 1))
                x = x.reshape(T, N, *x.shape[1:])
        return x, records

    @staticmethod
    def _conv(layer: nn.Conv2d, w: Tensor, b: Tensor | None, x: Tensor) -> Tensor:
        T, N, C = x.shape[:3]
        y = F.conv2d(
            x.transpose(0, 1).reshape(N, T * C, *x.shape[3:]),
            w.reshape(-1, *w.shape[2:]),
            None if b is None else b.reshape(-1),
            stride=layer.stride,
            padding=layer.padding,
            groups=T,
        )
        return y.reshape(N, T, -1, *y.shape[2:]).transpose(0, 1)
