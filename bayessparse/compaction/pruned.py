"""Compaction of a plain pruned torch network (torch only).

:func:`compact_pruned` traces the network with :mod:`torch.fx`, asks
:class:`~bayessparse.compaction.analysis.Analysis` which units can go, and cuts the
layers, batch norms and inputs accordingly: the output is a :class:`torch.fx.GraphModule`
(an ``nn.Sequential`` for an ``nn.Sequential`` whose graph stays a chain).
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from typing import Any, cast

import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize, prune

from bayessparse.compaction.analysis import WEIGHTED, Analysis, LayerPlan


class Select(nn.Module):
    """Keep some entries of one dimension: ``torch.index_select(x, dim, index)``.

    Compaction puts it before a layer that reads only some of the units of a tensor that
    cannot lose them at its source, such as the network's input (the pixels no weight of
    the first layer reads). ``index`` is a buffer, so it is saved with the network and
    exported by :func:`torch.export.export`.

    Args:
        dim: the dimension to select from, counted from the end (``-1``: features) so that
            inputs with or without a batch dimension work alike.
        index: the positions to keep, in increasing order.
    """

    index: Tensor

    def __init__(self, dim: int, index: Tensor) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("index", index.to(torch.long))

    def forward(self, input: Tensor) -> Tensor:
        return torch.index_select(input, self.dim, self.index)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kept={self.index.numel()}"


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with :class:`Select` kept as one call (so compacting twice works)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, Select) or super().is_leaf_module(m, module_qualified_name)


def compact_pruned(net: nn.Module) -> nn.Module:
    """A physically smaller copy of a plain pruned network, computing the same function.

    ``net`` holds plain torch layers, pruned in :mod:`torch.nn.utils.prune` format
    (``weight_orig``/``weight_mask``, as :func:`bayessparse.to_dense` returns) or with
    zeros in its weights. A unit (neuron or channel) is removed when nothing needs it:

    * no kept output of a layer reads it with a non-zero weight; or
    * it is a constant (say a closed channel: 0, or ``β − γ·μ/σ`` after batch norm,
      mapped by the activations after it) and every layer reading it takes it into its
      bias exactly: a linear layer always, a convolution where the constant is 0 or the
      convolution has no zero padding (zero padding around a non-zero constant makes
      the borders differ, so the channel stays).

    Units joined by a skip addition are removed on every branch together, or kept. A
    layer that reads only some units of a tensor whose units cannot be removed at their
    source (the network's input, say the pixels no weight of the first layer of
    LeNet-300-100 reads) gets a :class:`Select` before it and loses the other columns.
    Units produced or read by anything not understood (the output, an unknown operation
    or module, a grouped convolution, a module called twice) stay. A layer of which no
    unit is needed keeps one, with zero weights and bias, that nothing reads.

    Understood: ``Linear``, ``ConvNd`` (``groups=1``), ``BatchNormNd`` (running
    statistics), entry-wise activations and dropout, max, average and adaptive pooling,
    ``Flatten``/``flatten(x, 1)``/``x.view(x.size(0), -1)``, means over positions,
    additions and subtractions of tensors, and arithmetic with numbers, as modules, functions
    or methods, in any nesting of modules that :mod:`torch.fx` can trace. Inputs are
    batched; the function preserved is the eval-mode one (batch statistics and dropout
    are not constant-preserving), and Python branches on ``self.training`` are traced
    in eval mode.

    Args:
        net: a plain torch network (it is not modified).

    Returns:
        The compacted network in ``net``'s train/eval mode: an ``nn.Sequential`` if ``net``
        is one (or a bare layer) and its graph is still a chain of its children, else a
        :class:`torch.fx.GraphModule` holding ``net``'s submodules (its containers, with
        the cut layers in them) and running the traced graph. Its eval-mode output
        equals ``net``'s up to floating-point summation order, with no more weights
        (a convolution without bias gains one where it absorbs a constant).

    Raises:
        TypeError: for a network with Bayesian sparse layers (compact those with
            :func:`bayessparse.compact`) or one that :mod:`torch.fx` cannot trace.
    """
    _check_plain(net)
    root = _baked_copy(net).eval()
    if type(root) in WEIGHTED:  # a bare layer: trace it as a network of one layer
        root = nn.Sequential(root)
    graph = _trace(root)
    with torch.no_grad():
        plan = Analysis(graph, root).plan()
        module = fx.GraphModule(root, graph)
        # The network's own containers (nn.Sequential, its blocks) rather than the plain
        # Modules fx makes in their place: they hold the same layers, cut below.
        module._modules.clear()
        module._modules.update(root._modules)
        _apply(module, plan)
    small = _as_sequential(module) if isinstance(root, nn.Sequential) else module
    return small.train(net.training)


def _check_plain(net: nn.Module) -> None:
    if not isinstance(net, nn.Module):
        raise TypeError(
            f"Expected an nn.Module to compact, got {type(net).__name__}. Pass the network."
        )
    for name, module in net.named_modules():
        if callable(getattr(module, "keep_prob", None)):  # a Bayesian sparse layer
            raise TypeError(
                f"Expected a plain torch network, got the Bayesian sparse layer "
                f"{name or 'net'!r} ({type(module).__name__}). Compact it with "
                "bayessparse.compact(net), which thresholds it first."
            )


def _trace(root: nn.Module) -> fx.Graph:
    try:
        return _Tracer().trace(root)
    except Exception as err:  # torch.fx raises many types; any means "cannot trace"
        raise TypeError(
            f"Expected a network that torch.fx can trace, got {type(root).__name__}, which "
            f"fails: {type(err).__name__}: {err}. Python control flow on tensor values and "
            "item assignment cannot be traced; use to_dense(net, bake=True) for a pruned "
            "network of the original shape instead."
        ) from err


def _baked_copy(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with its :mod:`torch.nn.utils.prune` masks and parametrizations
    baked into plain parameters.

    The prune hook stores ``orig * mask`` as an attribute that is not a graph leaf, which
    deepcopy refuses: it is recomputed from ``orig`` and ``mask`` instead (after an
    optimizer step it is stale until the next forward pass anyway).
    """
    memo: dict[int, Any] = {}
    for module in net.modules():
        for name in _prune_names(module):
            value = module.__dict__.get(name)
            if isinstance(value, Tensor):
                memo[id(value)] = value.detach()  # replaced by prune.remove below
    baked = copy.deepcopy(net, memo)
    for module in baked.modules():
        for name in _prune_names(module):
            prune.remove(module, name)
        if parametrize.is_parametrized(module):
            names = list(cast(nn.ModuleDict, module.parametrizations).keys())
            for name in names:
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    _flush_subnormals_(baked)
    return baked


def _flush_subnormals_(net: nn.Module) -> None:
    """Set the subnormal values of ``net``'s floating parameters to zero, in place.

    Sparse VD drives the means of the weights it prunes toward zero, into the subnormal
    range (about a quarter of LeNet-300-100's first-layer weights after 20 epochs). Kept
    by a looser selection, they cost nothing numerically (each is below 1.2e-38) but a
    CPU without flush-to-zero multiplies them tens of times slower: measured, the
    compacted net ran 0.03x the dense one's speed with them and 2.5x without.
    """
    with torch.no_grad():
        for param in net.parameters():
            if param.is_floating_point():
                tiny = torch.finfo(param.dtype).tiny
                param.masked_fill_(param.abs() < tiny, 0.0)


def _prune_names(module: nn.Module) -> list[str]:
    """The parameters of ``module`` in prune format: ``weight`` and ``bias``, and any other
    (``nn.MultiheadAttention``'s ``in_proj_weight``)."""
    names = [key.removesuffix("_orig") for key in module._parameters if key.endswith("_orig")]
    return [name for name in names if f"{name}_mask" in module._buffers]


def _apply(module: fx.GraphModule, plan: Any) -> None:
    """Cut the layers and norms as planned and insert the index-selects."""
    for node, layer_plan in plan.layers.items():
        layer: Any = module.get_submodule(str(node.target))
        _cut_layer(layer, layer_plan)
        if layer_plan.select is not None:
            dim = -1 if isinstance(layer, nn.Linear) else -(layer.weight.dim() - 1)
            index = layer_plan.select.to(layer.weight.device)
            _insert_select(module, node, Select(dim, index))
    for node, kept in plan.norms.items():
        _cut_norm(module.get_submodule(str(node.target)), kept)
    module.graph.lint()
    module.recompile()


def _cut_layer(layer: Any, plan: LayerPlan) -> None:
    """Keep the planned rows and columns of a Linear/ConvNd, zero and fold as planned."""
    weight = layer.weight.detach()
    rows, cols = plan.rows.to(weight.device), plan.cols.to(weight.device)
    if rows.all() and cols.all() and plan.fold is None and not plan.zero_cols.any():
        return
    new_weight = weight[rows][:, cols].clone()
    new_weight[plan.zero_rows.to(weight.device)] = 0
    new_weight[:, plan.zero_cols.to(weight.device)] = 0
    bias = None if layer.bias is None else layer.bias.detach()[rows].clone()
    if plan.fold is not None and (bias is not None or plan.fold.any()):
        bias = plan.fold.clone() if bias is None else bias + plan.fold
    grad = layer.weight.requires_grad
    if bias is not None:
        bias[plan.zero_rows.to(weight.device)] = 0
        layer.bias = nn.Parameter(bias, requires_grad=grad)
    layer.weight = nn.Parameter(new_weight, requires_grad=grad)
    n_out, n_in = new_weight.shape[:2]
    if isinstance(layer, nn.Linear):
        layer.in_features, layer.out_features = n_in, n_out
    else:
        layer.in_channels, layer.out_channels = n_in, n_out


def _cut_norm(norm: Any, kept: Tensor) -> None:
    """Keep the planned channels of a batch norm."""
    kept = kept.to(norm.running_mean.device)
    for name in ("weight", "bias"):
        param = getattr(norm, name)
        if param is not None:
            cut = param.detach()[kept].clone()
            setattr(norm, name, nn.Parameter(cut, requires_grad=param.requires_grad))
    norm.running_mean = norm.running_mean[kept].clone()
    norm.running_var = norm.running_var[kept].clone()
    norm.num_features = int(kept.sum())


def _insert_select(module: fx.GraphModule, node: fx.Node, select: Select) -> None:
    """Run ``select`` on the input of the layer call ``node``, for that call only."""
    name, number = f"{node.target}_select", 1
    while _has_submodule(module, name):
        number += 1
        name = f"{node.target}_select{number}"
    module.add_submodule(name, select)
    source = node.args[0]
    assert isinstance(source, fx.Node)
    with module.graph.inserting_before(node):
        selected = module.graph.call_module(name, (source,))
    node.replace_input_with(source, selected)


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def _as_sequential(module: fx.GraphModule) -> nn.Module:
    """``module`` as an ``nn.Sequential`` of its children if its graph is a chain of calls
    of distinct children, each reading the one before; else ``module``."""
    nodes = list(module.graph.nodes)
    calls = nodes[1:-1]
    chain = (
        len(nodes) >= 2
        and nodes[0].op == "placeholder"
        and nodes[-1].op == "output"
        and all(n.op == "call_module" and "." not in str(n.target) for n in calls)
        and len({n.target for n in calls}) == len(calls)
        and all(n.args == (prev,) and not n.kwargs for prev, n in itertools.pairwise(nodes))
    )
    if not chain:
        return module
    return nn.Sequential(
        OrderedDict((str(n.target), module.get_submodule(str(n.target))) for n in calls)
    )
