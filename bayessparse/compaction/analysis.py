"""Which units of a traced network can go, and what the layers after them must absorb.

Torch only. :class:`Analysis` makes three passes over the graph:

1. Structure: a :class:`~bayessparse.compaction.ops.Step` per node, and the unit spaces
   (:class:`~bayessparse.compaction.ops.Spaces`): units of tensors joined by a skip
   addition or an entry-wise op are one space, removed on every tensor of it together or
   kept. A space whose units are produced or read by anything not understood (the
   network's input, an unknown operation, the output) is *fixed*: nothing is removed
   from it, though a layer reading it may skip the columns it does not use (an
   index-select before the layer).
2. Constants, forwards: which units are input-independent (and, for channels, equal at
   every position), and their values (:mod:`bayessparse.compaction.ops`).
3. Needs, backwards to a least fixed point (liveness): a unit is needed where a kept
   output of a layer reads it with a non-zero weight, unless it is a constant the layer
   can take into its bias exactly; then it is *folded*. A linear layer can take any
   constant unit; a convolution only a uniform one that padding does not break.

:meth:`Analysis.plan` gives the kept units of every space and, per layer, its rows,
columns, index-select and bias fold.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from bayessparse.compaction.ops import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ACTIVATIONS,
    AVG_POOLS,
    IDENTITIES,
    IN_PLACE_FUNCTIONS,
    JOINS,
    NORMS,
    SCALAR_OPS,
    UNIFORM_POOL_FUNCTIONS,
    UNIFORM_POOLS,
    WEIGHTED,
    FlattenStep,
    JoinStep,
    LayerStep,
    MapStep,
    NormStep,
    Opaque,
    Spaces,
    Step,
    Units,
    avg_pool_keeps_uniform,
    call,
    flattens_from_1,
    identity,
    is_number,
    kernel_sums,
    module_fn,
)


@dataclass
class LayerPlan:
    """How to cut one Linear/ConvNd layer.

    Attributes:
        rows: kept output units (bool over the original ones).
        zero_rows: kept output units whose weights and bias are zeroed (placeholders
            kept so that a space never has zero units; nothing reads them).
        cols: input columns kept (bool over the original ones).
        zero_cols: columns zeroed (bool over the kept ones): units the layer does not
            read, or folded into its bias, kept only because the layer cannot select.
        select: the positions to keep among the units of the incoming tensor, or
            ``None`` for all.
        fold: added to the bias of the kept rows (``None``: nothing).
    """

    rows: Tensor
    zero_rows: Tensor
    cols: Tensor
    zero_cols: Tensor
    select: Tensor | None
    fold: Tensor | None


@dataclass
class Plan:
    """What compaction changes: each layer's cut, and the kept channels of each norm."""

    layers: dict[fx.Node, LayerPlan]
    norms: dict[fx.Node, Tensor]


class Analysis:
    """The structure, constants and needs of a traced network (module docstring).

    Args:
        graph: the traced graph (of a network in eval mode, its masks baked in).
        root: the module the graph was traced from.
    """

    def __init__(self, graph: fx.Graph, root: nn.Module) -> None:
        self.root = root
        self.spaces = Spaces()
        self.units: dict[fx.Node, Units] = {}
        self.steps: list[Step] = []
        # Inputs whose memory a node's output may share (views, the identity, in-place
        # ops), and inputs it may change in place: constants of a changed tensor, and of
        # every tensor sharing its memory, are forgotten from there on.
        self._aliases: dict[fx.Node, tuple[fx.Node, ...]] = {}
        self._changes: dict[fx.Node, tuple[fx.Node, ...]] = {}
        # A module called at several places could not be cut for each of them alike.
        self._calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        for node in graph.nodes:
            self._structure(node)
        self._check_flattens()
        self._constants()

    # --- Pass 2: constants ----------------------------------------------------------------

    def _constants(self) -> None:
        """Each step's constants, in execution order, forgetting those changed in place."""
        shared: dict[fx.Node, set[fx.Node]] = {}  # node -> the nodes sharing its memory
        for step in self.steps:
            node = step.node
            step.constants(self.units, self.spaces)
            for changed in self._changes.get(node, ()):
                for other in shared.get(changed, {changed}):
                    if other in self.units:
                        self.units[other].const = None
                if isinstance(step, (MapStep, JoinStep)) and step.in_place:
                    # The changed tensor now holds the output, exactly.
                    source, out = self.units[changed], self.units[node]
                    source.const, source.value = out.const, out.value
            group = {node}.union(*(shared.get(a, {a}) for a in self._aliases.get(node, ())))
            for member in group:
                shared[member] = group

    # --- Pass 1: structure --------------------------------------------------------------

    def _structure(self, node: fx.Node) -> None:
        if node.op == "output":
            for source in node.all_input_nodes:
                self._fix(source)
            return
        if node.op == "call_module":
            step = self._module_step(node, self.root.get_submodule(str(node.target)))
        elif node.op == "call_function":
            step = self._function_step(node, node.target)
        elif node.op == "call_method":
            step = self._function_step(node, str(node.target))
        else:  # placeholder, get_attr
            step = self._opaque(node)
        self.steps.append(step)

    def _opaque(self, node: fx.Node) -> Step:
        for source in node.all_input_nodes:
            self._fix(source)
        # It may return a view of its inputs, or change them in place: assume it does.
        self._aliases[node] = self._changes[node] = tuple(node.all_input_nodes)
        self.units[node] = Units(self.spaces.new(fixed=True), None, None)
        return Opaque(node)

    def _fix(self, node: fx.Node) -> None:
        if node in self.units:
            self.spaces.fix(self.units[node].space)

    def _module_step(self, node: fx.Node, module: nn.Module) -> Step:
        kind = type(module)  # exact types: a subclass may compute something else
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(source, fx.Node) or source not in self.units:
            return self._opaque(node)
        if (
            kind in WEIGHTED
            and getattr(module, "groups", 1) == 1
            and self._calls[node.target] == 1
        ):
            return self._layer(node, module, source)
        if kind in NORMS and self._calls[node.target] == 1:
            return self._norm(node, module, source)
        if kind in ACTIVATIONS:
            in_place = bool(getattr(module, "inplace", False))
            return self._map(node, source, module_fn(module), in_place=in_place)
        if kind in IDENTITIES:  # they return their input itself
            return self._map(node, source, identity, alias=True)
        if kind in UNIFORM_POOLS:
            return self._map(node, source, identity)
        if kind in AVG_POOLS:
            return self._map(node, source, identity, uniform=avg_pool_keeps_uniform(module))
        if isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) == (1, -1):
            return self._flatten(node, source)
        return self._opaque(node)

    def _function_step(self, node: fx.Node, target: Any) -> Step:
        args, kwargs = node.args, dict(node.kwargs)
        tensors = [a for a in args if isinstance(a, fx.Node)]
        source = args[0] if args else None
        if not isinstance(source, fx.Node) or source not in self.units:
            if len(args) == 2 and len(tensors) == 1 and target in SCALAR_OPS:
                return self._scalar(node, target, tensors[0], args[0], reverse=True)
            return self._opaque(node)
        rest = args[1:]
        if target in ("view", "reshape") and self._is_batch_then_rest(source, rest):
            return self._flatten(node, source)
        if target == "size" and rest == (0,) and not kwargs:
            # The batch size does not change with the units: not a read of them.
            self.units[node] = Units(self.spaces.new(fixed=True), None, None)
            return Opaque(node)
        if len(args) == 2 and not kwargs and target in JOINS and len(tensors) == 2:
            return self._join(node, source, tensors[1], JOINS[target], target)
        if len(args) == 2 and not kwargs and target in SCALAR_OPS:
            return self._scalar(node, target, source, args[1], reverse=False)
        if len(tensors) != 1 or any(isinstance(v, fx.Node) for v in kwargs.values()):
            return self._opaque(node)
        if target in ACTIVATION_FUNCTIONS or target in ACTIVATION_METHODS:
            # torch passes ``inplace`` of F.relu and the like as a keyword.
            in_place = bool(kwargs.pop("inplace", False)) or str(target).endswith("_")
            fn = call(target, rest, kwargs)
            return self._map(node, source, fn, alias=target == "contiguous", in_place=in_place)
        if target in UNIFORM_POOL_FUNCTIONS:
            return self._map(node, source, identity)
        if target in (torch.flatten, "flatten") and flattens_from_1(rest, kwargs):
            return self._flatten(node, source)
        if target in (torch.mean, "mean"):
            return self._mean(node, source, rest, kwargs)
        return self._opaque(node)

    def _is_batch_then_rest(self, source: fx.Node, rest: tuple[Any, ...]) -> bool:
        """``x.view(x.size(0), -1)``: a flatten from dim 1."""
        if len(rest) != 2 or rest[1] != -1 or not isinstance(rest[0], fx.Node):
            return False
        size = rest[0]
        return (
            size.op == "call_method"
            and size.target == "size"
            and size.args == (source, 0)
            and not size.kwargs
        )

    def _layer(self, node: fx.Node, module: Any, source: fx.Node) -> Step:
        linear = isinstance(module, nn.Linear)
        axis = -1 if linear else -(module.weight.dim() - 1)
        n_in, n_out = module.weight.shape[1], module.weight.shape[0]
        units = self.units[source]
        own = units.axis == axis
        if own:
            self.spaces.set_size(units.space, n_in)
            in_space = units.space
        else:  # its units are not the layer's inputs: read whole, from a fresh fixed space
            self._fix(source)
            in_space = self.spaces.new(n_in, fixed=True)
        out_space = self.spaces.new(n_out, producer="layer")
        rank = units.rank if linear else (units.rank or module.weight.dim())
        self.units[node] = Units(out_space, axis, rank)
        return LayerStep(node, module, source, in_space, out_space, own)

    def _norm(self, node: fx.Node, module: Any, source: fx.Node) -> Step:
        units = self.units[source]
        # Batch norm normalises dim 1: the last one only for (N, C) input.
        axis_rank = {nn.BatchNorm1d: {(-1, 2), (-2, 3)}, nn.BatchNorm2d: {(-3, 4)}}
        allowed = axis_rank.get(type(module), {(-4, 5)})
        if (units.axis, units.rank) not in allowed:
            return self._opaque(node)
        self.spaces.set_size(units.space, module.num_features)
        self.units[node] = Units(units.space, units.axis, units.rank)
        return NormStep(node, module, source)

    def _map(
        self,
        node: fx.Node,
        source: fx.Node,
        fn: Callable[[Tensor], Tensor],
        *,
        uniform: bool = True,
        alias: bool = False,
        in_place: bool = False,
    ) -> Step:
        units = self.units[source]
        self.units[node] = Units(units.space, units.axis, units.rank)
        if alias or in_place:
            self._aliases[node] = (source,)
        if in_place:
            self._changes[node] = (source,)
        return MapStep(node, source, fn, uniform, in_place)

    def _scalar(
        self, node: fx.Node, target: Any, source: fx.Node, number: Any, *, reverse: bool
    ) -> Step:
        if source not in self.units or not is_number(number):
            return self._opaque(node)
        op = SCALAR_OPS[target]

        def fn(value: Tensor) -> Tensor:
            return op(number, value) if reverse else op(value, number)

        return self._map(node, source, fn)

    def _join(
        self,
        node: fx.Node,
        left: fx.Node,
        right: fx.Node,
        fn: Callable[[Tensor, Tensor], Tensor],
        target: Any,
    ) -> Step:
        a, b = self.units.get(left), self.units.get(right)
        if a is None or b is None or a.axis is None or a.axis != b.axis:
            return self._opaque(node)
        space = self.spaces.union(a.space, b.space)
        rank = None if None in (a.rank, b.rank) else max(a.rank or 0, b.rank or 0)
        self.units[node] = Units(space, a.axis, rank)
        in_place = target in IN_PLACE_FUNCTIONS or str(target).endswith("_")
        if in_place:
            self._aliases[node] = self._changes[node] = (left,)
        return JoinStep(node, left, right, fn, in_place)

    def _flatten(self, node: fx.Node, source: fx.Node) -> Step:
        units = self.units[source]
        self._aliases[node] = (source,)  # a view where it can be
        if units.rank == 2 and units.axis == -1:  # already flat: the identity
            return self._map(node, source, identity, alias=True)
        if units.axis is None or units.rank is None or units.rank + units.axis != 1:
            # Features of unknown origin: a fixed space, though flat (readers may select).
            self._fix(source)
            self.units[node] = Units(self.spaces.new(fixed=True), -1, 2)
            return Opaque(node)
        space = self.spaces.new(producer="flatten")
        self.units[node] = Units(space, -1, 2)
        return FlattenStep(node, source, units.space, space)

    def _mean(
        self, node: fx.Node, source: fx.Node, rest: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Step:
        """A mean over positions (global average pooling), leaving the units' axis."""
        units = self.units[source]
        dims = kwargs.pop("dim", rest[0] if rest else None)
        keepdim = kwargs.pop("keepdim", rest[1] if len(rest) > 1 else False)
        if units.axis is None or units.rank is None or kwargs or len(rest) > 2:
            return self._opaque(node)
        dims = (dims,) if isinstance(dims, int) else dims
        if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
            return self._opaque(node)
        rank, unit_dim = units.rank, units.rank + units.axis
        reduced = {d % rank for d in dims}
        if 0 in reduced or unit_dim in reduced:
            return self._opaque(node)
        new_rank = rank if keepdim else rank - len(reduced)
        new_dim = unit_dim if keepdim else unit_dim - sum(d < unit_dim for d in reduced)
        self.units[node] = Units(units.space, new_dim - new_rank, new_rank)
        return MapStep(node, source, identity)

    def _check_flattens(self) -> None:
        """A flatten's features are cut by their channels: nothing else may write them, and
        both spaces are cut or neither (to a fixed point, as one flatten fixes another's
        channels)."""
        flattens = [s for s in self.steps if isinstance(s, FlattenStep)]
        changed = True
        while changed:
            changed = False
            for step in flattens:
                if step.block or (
                    self.spaces.fixed(step.space) and self.spaces.fixed(step.parent)
                ):
                    continue
                channels, features = self.spaces.size(step.parent), self.spaces.size(step.space)
                layers, writers = self.spaces.producers(step.space)
                if (
                    not channels
                    or not features
                    or features % channels
                    or layers
                    or writers > 1
                    or self.spaces.fixed(step.space)
                    or self.spaces.fixed(step.parent)
                ):
                    self.spaces.fix(step.space)
                    self.spaces.fix(step.parent)
                    changed = True
        for step in flattens:
            if not self.spaces.fixed(step.space):
                channels, features = self.spaces.size(step.parent), self.spaces.size(step.space)
                assert channels and features
                step.block = features // channels

    # --- Pass 3: needs, and the plan -------------------------------------------------------

    def plan(self) -> Plan:
        """Remove every unit nothing needs; say how each layer and norm is cut."""
        needed = self._needs()
        kept, dummy = self._kept(needed)
        layers = {
            s.node: self._layer_plan(s, kept, dummy)
            for s in self.steps
            if isinstance(s, LayerStep)
        }
        norms = {
            s.node: kept[root]
            for s in self.steps
            if isinstance(s, NormStep)
            and (root := self.spaces.find(self.units[s.node].space)) in kept
        }
        return Plan(layers, norms)

    def _needs(self) -> dict[int, Tensor]:
        """Per cut space (not fixed), the units something needs: a least fixed point, from
        the fixed spaces (all needed) backwards through the layers and flattens."""
        needed = {
            root: torch.zeros(size, dtype=torch.bool)
            for root in self.spaces.roots()
            if not self.spaces.fixed(root) and (size := self.spaces.size(root)) is not None
        }
        layers = [s for s in self.steps if isinstance(s, LayerStep)]
        flattens = [s for s in self.steps if isinstance(s, FlattenStep) and s.block]
        changed = True
        while changed:
            changed = False
            for layer in layers:
                rows = self._lookup(needed, layer.out_space, layer.module.weight.shape[0], True)
                changed |= _grow(needed, self.spaces.find(layer.in_space), _live(layer, rows))
            for flat in flattens:
                blocks = needed[self.spaces.find(flat.space)].view(-1, flat.block).any(1)
                changed |= _grow(needed, self.spaces.find(flat.parent), blocks)
        return needed

    def _kept(self, needed: dict[int, Tensor]) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """Per cut space, the kept units and the placeholders among them."""
        kept, dummy = {}, {}
        for root, need in needed.items():
            kept[root], dummy[root] = need.clone(), torch.zeros_like(need)
            if not need.any():
                # A layer cannot have zero units: one stays, inert (its readers zero its
                # columns), so that every layer keeps a unit.
                kept[root][0] = dummy[root][0] = True
        for step in self.steps:
            if isinstance(step, FlattenStep) and step.block:
                parent, flat = self.spaces.find(step.parent), self.spaces.find(step.space)
                kept[flat] = kept[parent].repeat_interleave(step.block)
                dummy[flat] = dummy[parent].repeat_interleave(step.block)
        return kept, dummy

    def _lookup(self, table: dict[int, Tensor], space: int, size: int, fill: bool) -> Tensor:
        """``table``'s mask of a space, or ``fill`` for all ``size`` units of a fixed one."""
        found = table.get(self.spaces.find(space))
        return found if found is not None else torch.full((size,), fill, dtype=torch.bool)

    def _layer_plan(
        self, layer: LayerStep, kept: dict[int, Tensor], dummy: dict[int, Tensor]
    ) -> LayerPlan:
        n_out, n_in = layer.module.weight.shape[:2]
        rows = self._lookup(kept, layer.out_space, n_out, True)
        dummies = self._lookup(dummy, layer.out_space, n_out, False)
        live = _live(layer, rows & ~dummies)  # columns that must stay: read, not folded
        in_kept = self._lookup(kept, layer.in_space, n_in, True)
        if live.any() and (in_kept & ~live).any():  # skip the others with an index-select
            cols, zero_cols = live, torch.zeros(int(live.sum()), dtype=torch.bool)
            select: Tensor | None = live[in_kept].nonzero().flatten()
        else:  # all live, or none: keep the incoming units, zero the columns not live
            cols, zero_cols, select = in_kept, ~live[in_kept], None
        fold = _fold(layer, rows, live)
        return LayerPlan(rows, dummies[rows], cols, zero_cols, select, fold)


def _live(layer: LayerStep, rows: Tensor) -> Tensor:
    """Input units that ``rows`` of the layer read and that its bias cannot absorb."""
    assert layer.foldable is not None and layer.reads is not None  # set by the constants pass
    reads = layer.reads[rows.to(layer.reads.device)].any(0)
    return (reads & ~layer.foldable).cpu()


def _fold(layer: LayerStep, rows: Tensor, live: Tensor) -> Tensor | None:
    """What the constant input units the layer drops add to its kept rows' outputs."""
    assert layer.foldable is not None and layer.in_value is not None
    weight = layer.module.weight.detach()
    folded = layer.foldable & ~live.to(weight.device)
    if not folded.any():
        return None
    sums = kernel_sums(weight[rows.to(weight.device)])
    return sums[:, folded] @ layer.in_value[folded]


def _grow(needed: dict[int, Tensor], root: int, more: Tensor) -> bool:
    """``needed[root] |= more``, where the space is cut; whether it changed."""
    if root not in needed:
        return False
    grown = needed[root] | more
    changed = not torch.equal(grown, needed[root])
    needed[root] = grown
    return changed
