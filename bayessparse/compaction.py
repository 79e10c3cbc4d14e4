"""Structured compaction: physically remove pruned neurons and channels."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bayessparse.masks import to_dense
from bayessparse.nn.base import torch_layer_kwargs

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Modules that act on each channel separately and map an all-zero channel to zeros.
_CHANNELWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
)


def _unsupported(module: nn.Module) -> TypeError:
    return TypeError(
        f"compact() handles nn.Sequential networks of Linear/ConvNd layers, Flatten, and "
        f"channel-wise activations, pooling and dropout; got {type(module).__name__}. "
        "Use to_dense(net, bake=True) for a same-shape pruned network instead."
    )


def compact(
    net: nn.Module,
    threshold: float | Mapping[str, float] | None = None,
    *,
    sparsity: float | None = None,
    scope: str = "global",
) -> nn.Sequential:
    """A physically smaller plain torch network computing the same function as the masked one.

    The network is first made deterministic (:func:`~bayessparse.to_dense` with the masks
    baked in). An output unit (neuron or channel) of a layer is removed when nothing
    downstream reads it (the next layer's weights on it are all zero) or when it is always
    zero (its weights and bias are zero, and the following activation maps 0 to 0); the
    next layer loses the matching inputs. Across ``nn.Flatten`` a channel is the block of
    features it flattens to. The last layer keeps all its outputs. A layer of which no
    unit matters (say the next one is fully pruned) keeps one unit with zero weights and
    bias, so that every layer has a unit; the network then computes the constant the
    masked one does, from the biases.

    Args:
        net: an ``nn.Sequential`` (possibly converted by :func:`~bayessparse.to_sparse_`) of
            ``nn.Linear``/``nn.ConvNd`` (sparse or plain), ``nn.Flatten``, and channel-wise
            activations, pooling and dropout.
        threshold: keep-probability cut for the sparse layers, or ``{layer name or
            state_dict key: cut}`` (``None``: their default).
        sparsity: instead of a threshold, the fraction of the sparse layers' weights to
            prune, in [0, 1), ranked by keep-probability.
        scope: with ``sparsity``, ``"global"`` or ``"layer"``. The selection is
            :func:`~bayessparse.masks`'s, with the same arguments.

    Returns:
        A plain ``nn.Sequential`` with smaller layers; ``compact(net)(x)`` equals
        ``net.eval()(x)`` up to floating-point summation order.

    Raises:
        TypeError: for a network or module it cannot compact.
        ValueError: for a bad selection, as :func:`~bayessparse.masks`.
    """
    if not isinstance(net, nn.Sequential):
        raise _unsupported(net)
    # Also bakes layers pruned with torch.nn.utils.prune, whose weight attribute is stale
    # after an optimizer step.
    dense = to_dense(net, threshold, bake=True, sparsity=sparsity, scope=scope)
    modules: list[Any] = list(dense.children())  # Any: torch types layer attributes loosely
    for module in modules:
        if not isinstance(module, (*_WEIGHTED, nn.Flatten, *_CHANNELWISE)):
            raise _unsupported(module)
    weighted = [i for i, m in enumerate(modules) if isinstance(m, _WEIGHTED)]
    if not weighted:
        raise ValueError("compact() found no Linear or ConvNd layer to compact.")

    keep: dict[int, Tensor] = {}  # layer index -> bool mask of its kept output units
    silenced: set[int] = set()  # layers of which no unit matters: one zero unit is kept
    for pos, i in enumerate(weighted):
        layer = modules[i]
        if pos == len(weighted) - 1:
            keep[i] = torch.ones(layer.weight.shape[0], dtype=torch.bool)
            continue
        j = weighted[pos + 1]
        used = _read_by_next(modules[j], modules[i + 1 : j], layer.weight.shape[0])
        alive = layer.weight.detach().flatten(1).ne(0).any(1)
        if layer.bias is not None:
            alive |= layer.bias.detach().ne(0)
        keep[i] = used & alive
        if not keep[i].any():
            # Layers cannot have zero units, so one stays, with zero weights and bias: it
            # outputs 0, which the channel-wise modules keep at 0, so it adds nothing to
            # the next layer. Everything downstream is then a constant of the biases.
            keep[i][0] = True
            silenced.add(i)

    out: list[nn.Module] = []
    kept_in: Tensor | None = None  # kept input features of the next weighted layer
    for i, module in enumerate(modules):
        if isinstance(module, _WEIGHTED):
            out.append(_slice_layer(module, kept_in, keep[i], zero=i in silenced))
            kept_in = keep[i]
        elif isinstance(module, nn.Flatten):
            out.append(copy.deepcopy(module))
            if kept_in is not None:
                nxt = next(modules[k] for k in weighted if k > i)
                block = nxt.weight.shape[1] // kept_in.numel()
                kept_in = kept_in.repeat_interleave(block)
        else:
            out.append(copy.deepcopy(module))
    return nn.Sequential(*out).train(net.training)


def _read_by_next(nxt: Any, between: list[nn.Module], channels: int) -> Tensor:
    """Which of ``channels`` output units the next weighted layer reads at all."""
    columns = nxt.weight.detach().transpose(0, 1).flatten(1).ne(0).any(1)  # per input feature
    if any(isinstance(m, nn.Flatten) for m in between):
        return columns.view(channels, -1).any(1)  # a channel is a block of features
    return columns


def _slice_layer(
    layer: Any, kept_in: Tensor | None, kept_out: Tensor, zero: bool = False
) -> nn.Module:
    weight = layer.weight.detach()[kept_out]
    if kept_in is not None:
        if getattr(layer, "groups", 1) != 1:
            raise TypeError(
                f"compact() cannot remove input channels of a grouped convolution "
                f"(groups={layer.groups})."
            )
        weight = weight[:, kept_in]
    kwargs: dict[str, Any] = torch_layer_kwargs(layer)
    if isinstance(layer, nn.Linear):
        kwargs.update(in_features=weight.shape[1], out_features=weight.shape[0])
    else:
        kwargs.update(in_channels=weight.shape[1] * layer.groups, out_channels=weight.shape[0])
    small: Any = type(layer)(**kwargs, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        small.weight.copy_(weight)
        if layer.bias is not None:
            small.bias.copy_(layer.bias.detach()[kept_out])
        if zero:
            small.weight.zero_()
            if small.bias is not None:
                small.bias.zero_()
    return small
