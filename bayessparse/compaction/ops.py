"""What each operation of a traced network means to compaction (torch only).

A *unit* is a neuron or a channel: an entry of a tensor's unit axis (the last axis for
linear layers, the channel axis for convolutions and batch norms), counted from the end
so that broadcasting lines units up. :class:`Units` describes a tensor's, and
:class:`Spaces` joins the units that must be removed together (by a skip addition, or an
entry-wise op). Each node of the graph becomes a :class:`Step`, which says how constant
units pass through it (eval-mode semantics): a closed channel is 0 after its convolution,
``β − γ·μ/σ`` after batch norm and ``relu`` of that after a ReLU; average pooling with
zero padding keeps only zeros constant; a convolution with zero padding keeps a constant
input channel only if it is 0, since the padding makes the borders differ.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

WEIGHTED: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Entry-wise modules: a constant unit stays constant, with the module's value of it.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
)
# The identity in eval mode, which is what compaction preserves.
IDENTITIES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
# Pooling that keeps every channel uniform: a window of equal values (padding of max
# pooling is -inf, so it never wins) has that value.
UNIFORM_POOLS: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
AVG_POOLS: tuple[type[nn.Module], ...] = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
ACTIVATION_FUNCTIONS: set[Callable[..., Any]] = {
    torch.relu,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardtanh,
    F.hardswish,
    F.hardsigmoid,
    torch.sigmoid,
    torch.tanh,
    F.sigmoid,
    F.tanh,
}
UNIFORM_POOL_FUNCTIONS: set[Callable[..., Any]] = {
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous"}
JOINS: dict[Any, Callable[[Tensor, Tensor], Tensor]] = {
    operator.add: operator.add,
    operator.iadd: operator.add,
    torch.add: operator.add,
    "add": operator.add,
    "add_": operator.add,
    operator.sub: operator.sub,
    operator.isub: operator.sub,
    torch.sub: operator.sub,
    "sub": operator.sub,
    "sub_": operator.sub,
}
SCALAR_OPS: dict[Any, Callable[[Any, Any], Any]] = {
    operator.add: operator.add,
    operator.sub: operator.sub,
    operator.mul: operator.mul,
    operator.truediv: operator.truediv,
    torch.add: operator.add,
    torch.sub: operator.sub,
    torch.mul: operator.mul,
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "div": operator.truediv,
}
IN_PLACE_FUNCTIONS = {operator.iadd, operator.isub}


class Spaces:
    """Union-find over unit spaces, with each space's size and whether it is fixed."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[int | None] = []
        self._fixed: list[bool] = []
        # Producers that slice a space: layers (their rows) and flattens (their blocks).
        self._layers: list[int] = []
        self._flattens: list[int] = []

    def new(self, size: int | None = None, *, fixed: bool = False, producer: str = "") -> int:
        self._parent.append(len(self._parent))
        self._size.append(size)
        self._fixed.append(fixed)
        self._layers.append(producer == "layer")
        self._flattens.append(producer == "flatten")
        return len(self._parent) - 1

    def find(self, space: int) -> int:
        while self._parent[space] != space:
            self._parent[space] = self._parent[self._parent[space]]
            space = self._parent[space]
        return space

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if None not in (self._size[a], self._size[b]) and self._size[a] != self._size[b]:
            # Broadcasting, not a unit-by-unit join: neither can lose units.
            self.fix(a)
            self.fix(b)
            return a
        self._parent[b] = a
        self._size[a] = self._size[a] if self._size[a] is not None else self._size[b]
        self._fixed[a] |= self._fixed[b]
        self._layers[a] += self._layers[b]
        self._flattens[a] += self._flattens[b]
        return a

    def size(self, space: int) -> int | None:
        return self._size[self.find(space)]

    def set_size(self, space: int, size: int) -> None:
        root = self.find(space)
        if self._size[root] is None:
            self._size[root] = size
        elif self._size[root] != size:
            self._fixed[root] = True  # a shape this analysis does not understand

    def fixed(self, space: int) -> bool:
        return self._fixed[self.find(space)]

    def fix(self, space: int) -> None:
        self._fixed[self.find(space)] = True

    def producers(self, space: int) -> tuple[int, int]:
        """(layers, flattens) writing the space."""
        root = self.find(space)
        return self._layers[root], self._flattens[root]

    def roots(self) -> Iterator[int]:
        return (s for s in range(len(self._parent)) if self._parent[s] == s)


@dataclass
class Units:
    """The unit axis of one tensor of the graph, and its constant units.

    Attributes:
        space: its unit space.
        axis: the unit dimension counted from the end (-1: features; -3: channels of an
            (N, C, H, W) tensor), or ``None`` where unknown (inputs, unknown ops).
        rank: the number of dimensions, or ``None`` where unknown.
        const: per unit, whether it does not depend on the input and is equal at every
            position; ``None`` when none is.
        value: per unit, that constant (0 where not constant).
    """

    space: int
    axis: int | None
    rank: int | None
    const: Tensor | None = None
    value: Tensor | None = None


def constants_of(
    units: dict[fx.Node, Units], node: fx.Node, size: int | None
) -> tuple[Tensor, Tensor] | tuple[None, None]:
    """The constant units of ``node`` and their values, if it has any, ``size`` of them."""
    found = units.get(node)
    if found is None or found.const is None or found.value is None:
        return None, None
    if found.const.numel() != size:
        return None, None
    return found.const, found.value


class Step:
    """One node of the graph, as the analysis understands it."""

    node: fx.Node

    def constants(self, units: dict[fx.Node, Units], spaces: Spaces) -> None:
        """Set the constant units of the node's output from those of its inputs."""
        units[self.node].const = None


@dataclass
class Opaque(Step):
    """A node the analysis does not understand: nothing of it is constant."""

    node: fx.Node


@dataclass
class LayerStep(Step):
    """A Linear or ConvNd (``groups=1``) module call."""

    node: fx.Node
    module: Any  # nn.Linear | nn.ConvNd: torch types their attributes loosely
    source: fx.Node
    in_space: int
    out_space: int
    own_input: bool  # False: the input's units are another axis; a fresh fixed space
    foldable: Tensor | None = None  # per input unit: a constant the bias can take
    in_value: Tensor | None = None  # the input constants, 0 elsewhere
    reads: Tensor | None = None  # (out, in): weight[o, u] != 0 somewhere in its kernel

    def constants(self, units: dict[fx.Node, Units], spaces: Spaces) -> None:
        weight = self.module.weight.detach()
        n_in, n_out = weight.shape[1], weight.shape[0]
        const, value = constants_of(units, self.source, n_in) if self.own_input else (None, None)
        if const is None or value is None:
            const = torch.zeros(n_in, dtype=torch.bool, device=weight.device)
            value = torch.zeros(n_in, dtype=weight.dtype, device=weight.device)
        self.foldable = const & (value.eq(0) | keeps_uniform(self.module))
        self.in_value = torch.where(self.foldable, value, torch.zeros_like(value))
        self.reads = columns(weight)
        out_const = ~(self.reads & ~self.foldable).any(1)
        bias = self.module.bias
        out_value = kernel_sums(weight) @ self.in_value
        if bias is not None:
            out_value = out_value + bias.detach()
        out = units[self.node]
        out.const = out_const
        out.value = torch.where(out_const, out_value, torch.zeros(n_out).to(out_value))


@dataclass
class NormStep(Step):
    """A BatchNorm module call, per channel."""

    node: fx.Node
    module: Any  # nn.BatchNorm1d/2d/3d
    source: fx.Node

    def constants(self, units: dict[fx.Node, Units], spaces: Spaces) -> None:
        m = self.module
        const, value = constants_of(units, self.source, m.num_features)
        out = units[self.node]
        if const is None or value is None or m.running_mean is None:
            out.const = None  # batch statistics: no constant survives them as such
            return
        weight, bias = m.weight, m.bias
        normed = F.batch_norm(
            value.unsqueeze(0),
            m.running_mean,
            m.running_var,
            None if weight is None else weight.detach(),
            None if bias is None else bias.detach(),
            False,
            0.0,
            m.eps,
        )[0]
        out.const, out.value = const, torch.where(const, normed, torch.zeros_like(normed))


@dataclass
class MapStep(Step):
    """An entry-wise operation (activation, scalar arithmetic, eval-mode dropout).

    ``uniform=False`` for pooling that keeps zeros but may break other constants (average
    pooling with zero padding), so only zero units stay constant.
    """

    node: fx.Node
    source: fx.Node
    fn: Callable[[Tensor], Tensor]
    uniform: bool = True
    in_place: bool = False

    def constants(self, units: dict[fx.Node, Units], spaces: Spaces) -> None:
        out = units[self.node]
        size = spaces.size(out.space)
        const, value = constants_of(units, self.source, size)
        if const is None or value is None:
            out.const = None
        else:
            if not self.uniform:
                const = const & value.eq(0)
            mapped = self.fn(value)
            out.const, out.value = const, torch.where(const, mapped, torch.zeros_like(mapped))


@dataclass
class JoinStep(Step):
    """``a + b`` or ``a - b`` of two tensors with the same units."""

    node: fx.Node
    left: fx.Node
    right: fx.Node
    fn: Callable[[Tensor, Tensor], Tensor]
    in_place: bool = False

    def constants(self, units: dict[fx.Node, Units], spaces: Spaces) -> None:
        out = units[self.node]
        size = spaces.size(out.space)
        const_a, value_a = constants_of(units, self.left, size)
        const_b, value_b = constants_of(units, self.right, size)
        if const_a is None or const_b is None or value_a is None or value_b is None:
            out.const = None
        else:
            const, joined = const_a & const_b, self.fn(value_a, value_b)
            out.const, out.value = const, torch.where(const, joined, torch.zeros_like(joined))


@dataclass
class FlattenStep(Step):
    """``flatten(x, 1)`` of (N, C, ...): channel c becomes a block of ``block`` features."""

    node: fx.Node
    source: fx.Node
    parent: int  # the channels' space
    space: int  # the features' space
    block: int = 0  # features per channel, known once the spaces' sizes are

    def constants(self, units: dict[fx.Node, Units], spaces: Spaces) -> None:
        out = units[self.node]
        const, value = constants_of(units, self.source, spaces.size(self.parent))
        if const is None or value is None or not self.block:
            out.const = None
            return
        out.const = const.repeat_interleave(self.block)
        out.value = value.repeat_interleave(self.block)


def columns(weight: Tensor) -> Tensor:
    """(out, in) bool: where a weight of the layer is non-zero, over its kernel."""
    return weight.ne(0).flatten(2).any(2) if weight.dim() > 2 else weight.ne(0)


def kernel_sums(weight: Tensor) -> Tensor:
    """(out, in): what a uniform unit contributes to each output per unit of its value."""
    return weight.flatten(2).sum(2) if weight.dim() > 2 else weight


def keeps_uniform(module: Any) -> bool:
    """Whether a uniform input channel gives a uniform output: no zero padding."""
    if isinstance(module, nn.Linear):
        return True
    padding = module.padding
    if isinstance(padding, str):
        return padding == "valid"
    return module.padding_mode != "zeros" or all(p == 0 for p in padding)


def avg_pool_keeps_uniform(module: Any) -> bool:
    """Average pooling keeps a non-zero constant only where no window reaches padding."""
    padding = module.padding if isinstance(module.padding, tuple) else (module.padding,)
    return (
        all(p == 0 for p in padding)
        and not module.ceil_mode
        and getattr(module, "divisor_override", None) is None
    )


def identity(value: Tensor) -> Tensor:
    return value


def module_fn(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """The module's function of a value vector, out of place (the module may be in-place)."""

    def fn(value: Tensor) -> Tensor:
        return module(value.clone())

    return fn


def call(target: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    """The function or method call of a node, on a value vector and out of place."""
    if isinstance(target, str):
        name = target.removesuffix("_")
        return lambda value: getattr(value, name)(*rest, **kwargs)
    return lambda value: target(value, *rest, **kwargs)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flattens_from_1(rest: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    start = kwargs.get("start_dim", rest[0] if rest else 0)
    end = kwargs.get("end_dim", rest[1] if len(rest) > 1 else -1)
    return (start, end) == (1, -1) and len(rest) <= 2 and set(kwargs) <= {"start_dim", "end_dim"}
