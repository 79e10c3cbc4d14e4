"""From a trained Bayesian network to deterministic masks and plain torch networks.

Every pruning decision ends in masks: boolean tensors keyed like ``state_dict``
(``"0.weight"``, and ``"0.bias"`` where a layer prunes biases), applied as
:mod:`torch.nn.utils.prune` buffers. :func:`masks`, :func:`to_dense`,
:func:`sparsity_report` and :func:`~bayessparse.compact` take the same selection
arguments, and the masks of one selection are the same in all of them:

* ``threshold``: keep what has ``keep_prob() > threshold``. One float in [0, 1] for every
  layer; a dict ``{layer name or state_dict key: float}`` for some layers (the others use
  their default); or ``None``: each layer's
  :attr:`~bayessparse.nn.SparseModule.default_threshold`, the rule of its family's paper.
* ``sparsity`` in [0, 1) with ``scope="global"`` (all weights of all sparse layers
  together) or ``scope="layer"`` (each layer on its own): rank by ``keep_prob()`` and
  prune that fraction of the weights. A score stands for the weights it broadcasts over:
  one weight (sparse VD, L0 weight gates) or a whole unit (the group families and L0's
  input and output gates), which is pruned whole. The target is T = round(sparsity · N)
  of the N weights in scope. Scores are sorted ascending, ties broken by position (layers
  in ``named_modules`` order, then the row-major index of the score), and the prefix of
  that order that brings the pruned weights closest to T is pruned, weights pruned for
  good (:meth:`~bayessparse.nn.SparseModule.prune_`) counting as pruned already (if they
  reach T, nothing more is pruned). So per-weight scores hit T exactly, ties or not,
  within 1/(2N) of ``sparsity``; unit scores prune whole units, at most half a unit's
  weights from T (in ``scope="layer"``, a small layer's units are coarse: LeNet-5's
  conv1 has 20 of 25 weights each). :func:`sparsity_report` gives the achieved sparsity.
  A weight tensor shared by several layers counts once where its layers score it alike (a
  shared per-weight posterior); layers that gate a shared weight by their own units each
  count it. Biases are never counted. The rule is :func:`bayessparse.sparsity.select`'s.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from bayessparse.convert import sparse_modules, unwrap_pyro_type
from bayessparse.nn.attention import SparseMultiheadAttention, restore_fused_paths_
from bayessparse.nn.base import SparseModule, torch_layer_kwargs, torch_layer_type
from bayessparse.sparsity.selection import (
    Scores,
    check_selection,
    check_threshold,
    select,
    weight_mask,
)


class _Selected(NamedTuple):
    """The masks of one sparse layer under a selection."""

    module: SparseModule
    weight: Tensor
    bias: Tensor | None  # None where neither the family nor prune_ prunes the bias
    threshold: float | None  # the cut used; None under a target sparsity


def masks(
    net: nn.Module,
    threshold: float | Mapping[str, float] | None = None,
    *,
    sparsity: float | None = None,
    scope: str = "global",
) -> dict[str, Tensor]:
    """Boolean masks of every sparse layer, keyed like ``state_dict``.

    ``"0.weight"`` for every sparse layer, and ``"0.bias"`` where the bias is pruned: by
    families that prune whole output units (their closed units' biases) or by
    :meth:`~bayessparse.nn.SparseModule.prune_`. They are exactly the masks that
    :func:`to_dense` applies with the same arguments.

    Args:
        net: a network with sparse layers (or one sparse layer, keyed ``"weight"``).
        threshold: keep-probability cut in [0, 1], or ``{layer name or state_dict key:
            cut}``; ``None`` uses each layer's default rule (module docstring).
        sparsity: instead of a threshold, the fraction of weights to prune, in [0, 1).
        scope: with ``sparsity``, ``"global"`` or ``"layer"``.

    Raises:
        ValueError: for both a threshold and a sparsity, a value out of range or NaN, an
            unknown scope, or dict keys that name no sparse layer.
        TypeError: for a threshold or sparsity that is not a number (or dict of numbers).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import bayessparse as bs
        >>> net = bs.to_sparse_(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
        >>> m = bs.masks(net, sparsity=0.5)  # the half of the weights least likely kept
        >>> sorted(m), int(m["0.weight"].sum() + m["2.weight"].sum())
        (['0.weight', '2.weight'], 9)
    """
    out: dict[str, Tensor] = {}
    for name, chosen in _select_layers(net, threshold, sparsity, scope).items():
        out[_key(name, "weight")] = chosen.weight
        if chosen.bias is not None:
            out[_key(name, "bias")] = chosen.bias
    return out


def _key(name: str, param: str) -> str:
    """The ``state_dict`` key of a layer's parameter (a bare layer's is ``param``)."""
    return f"{name}.{param}" if name else param


def _select_layers(
    net: nn.Module,
    threshold: float | Mapping[str, float] | None,
    sparsity: float | None,
    scope: str,
) -> dict[str, _Selected]:
    """The masks of every sparse layer of ``net`` by name, under one selection."""
    check_selection(threshold, sparsity, scope)
    layers = dict(sparse_modules(net))
    scores = {name: _scores(module) for name, module in layers.items()}
    cuts: dict[str, float] = {}
    if sparsity is None:
        cuts = _cuts(layers, threshold)
        kept = select(scores, cuts)
    else:
        owner = _tie_owners(layers, scores)
        ranked = select(
            {name: scores[name] for name in layers if owner[name] == name},
            sparsity=sparsity,
            scope=scope,
        )
        kept = {name: ranked[owner[name]] for name in layers}
    return {
        name: _Selected(
            module,
            weight_mask(scores[name], kept[name]),
            _bias_mask(module, kept[name]),
            cuts.get(name),
        )
        for name, module in layers.items()
    }


def _scores(module: SparseModule) -> Scores:
    with torch.no_grad():
        values = module.keep_prob()
    return Scores(
        values=values,
        shape=tuple(module.weight.shape),
        fixed=module._prune_mask("weight"),
        default_threshold=module.default_threshold,
    )


def _bias_mask(module: SparseModule, kept: Tensor) -> Tensor | None:
    """The bias mask of ``module`` given its kept scores: the family's and prune_'s."""
    fixed = module._prune_mask("bias")
    # Families that prune biases gate whole output units: their bias mask is the unit
    # mask, one entry per output unit (SparseModule._bias_kept).
    if module._bias_kept(None) is None:
        return fixed
    units = kept.reshape(-1).clone()  # not a view of the weight's unit mask
    return units if fixed is None else units & fixed


def _cuts(
    layers: dict[str, SparseModule], threshold: float | Mapping[str, float] | None
) -> dict[str, float]:
    """The keep-probability cut of each layer: ``threshold``, its entry, or the default."""
    if threshold is not None and not isinstance(threshold, Mapping):
        return dict.fromkeys(layers, check_threshold(threshold))
    given = {} if threshold is None else _given_cuts(layers, threshold)
    return {name: given.get(name, module.default_threshold) for name, module in layers.items()}


def _given_cuts(
    layers: dict[str, SparseModule], threshold: Mapping[str, float]
) -> dict[str, float]:
    """A dict threshold keyed by layer name, its keys being layer names or state_dict keys.

    Raises:
        ValueError: for a key that names no sparse layer, a value out of [0, 1], or two
            keys of one layer with different values.
    """
    layer_of: dict[str, str] = {}  # accepted key -> layer name
    for name, module in layers.items():
        layer_of[name] = layer_of[_key(name, "weight")] = name
        if module.bias is not None:
            layer_of[_key(name, "bias")] = name
    given: dict[str, float] = {}
    for key, value in threshold.items():
        if key not in layer_of:
            raise ValueError(
                f"Expected threshold keys naming sparse layers, got {key!r}. Valid layer "
                f"names: {list(layers)}, or their state_dict keys such as "
                f"{_key(next(iter(layers), ''), 'weight')!r}."
            )
        cut, name = check_threshold(value, f"threshold[{key!r}]"), layer_of[key]
        if given.get(name, cut) != cut:
            raise ValueError(
                f"Expected one threshold per layer, got {given[name]!r} and {cut!r} for "
                f"layer {name!r} (key {key!r}). Give each layer one value."
            )
        given[name] = cut
    return given


def _tie_owners(layers: dict[str, SparseModule], scores: dict[str, Scores]) -> dict[str, str]:
    """The layer that ranks each layer's weights: the first layer of its weight tensor if
    both score the tensor alike (tied weights with a shared posterior), else itself.

    So a shared weight tensor counts once towards a target sparsity, as in
    :func:`sparsity_report`, and its layers get one mask.
    """
    first: dict[int, str] = {}
    owner = {}
    for name, module in layers.items():
        head = first.setdefault(id(module.weight), name)
        owner[name] = head if _same_scores(scores[head], scores[name]) else name
    return owner


def _same_scores(a: Scores, b: Scores) -> bool:
    same_values = a.values.shape == b.values.shape and torch.equal(a.values, b.values)
    if a.fixed is None or b.fixed is None:
        return same_values and a.fixed is b.fixed
    return same_values and torch.equal(a.fixed, b.fixed)


def _strip_pyro(module: nn.Module) -> None:
    """Turn a ``PyroModule[T]`` made by ``to_pyro_module_`` back into a plain ``T``, in place."""
    plain = unwrap_pyro_type(type(module))
    if plain is not type(module):
        module.__class__ = plain
        for attr in ("_pyro_name", "_pyro_context", "_pyro_params", "_pyro_samples"):
            module.__dict__.pop(attr, None)


def to_dense(
    net: nn.Module,
    threshold: float | Mapping[str, float] | None = None,
    bake: bool = False,
    *,
    sparsity: float | None = None,
    scope: str = "global",
) -> nn.Module:
    """A plain torch copy of ``net`` with each sparse layer replaced by its masked torch layer.

    The copy holds no Pyro types. Masks are in :mod:`torch.nn.utils.prune` format
    (``weight_orig`` and ``weight_mask`` buffers, and ``bias_orig``/``bias_mask`` where the
    bias is pruned), exactly :func:`masks` with the same selection, so ``prune.remove``
    and tools that read pruned models work on it; with ``bake=True`` they are baked into
    plain zeros.

    A sparse layer under several names becomes one plain layer in all its places. Tied
    layers (one sparse ``weight``) keep sharing their plain weight tensors where the
    masked weights agree, as with sparse VD's per-weight posterior; where each layer
    scales the shared weight by its own gates or group scales, they get their own.

    Args:
        net: a network with sparse layers (it is not modified).
        threshold: keep-probability cut in [0, 1], or ``{layer name or state_dict key:
            cut}``; ``None`` uses each layer's default rule.
        bake: write the masks into the weights and drop the prune buffers (those of
            layers pruned with :mod:`torch.nn.utils.prune` and left dense as well).
        sparsity: instead of a threshold, the fraction of weights to prune, in [0, 1).
        scope: with ``sparsity``, ``"global"`` or ``"layer"`` (module docstring).

    Returns:
        The deterministic network, in the same train/eval mode as ``net``.

    Raises:
        ValueError, TypeError: for a bad selection, as :func:`masks`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import bayessparse as bs
        >>> net = bs.to_sparse_(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
        >>> plain = bs.to_dense(net, sparsity=0.5)
        >>> type(plain[0]).__name__, nn.utils.prune.is_pruned(plain)
        ('Linear', True)
        >>> baked = bs.to_dense(net, sparsity=0.5, bake=True)  # zeros, no prune buffers
        >>> int((baked[0].weight != 0).sum() + (baked[2].weight != 0).sum())
        9
    """
    if isinstance(net, SparseModule):  # a bare layer: no copy of the Pyro layer needed
        return _plain_layer(_select_layers(net, threshold, sparsity, scope)[""], bake)
    dense = _deepcopy(net)  # the copy keeps shared modules and tied weights shared
    # Selected on the copy, whose layers are the ones replaced below (same values).
    chosen = {id(c.module): c for c in _select_layers(dense, threshold, sparsity, scope).values()}
    plain_of: dict[int, nn.Module] = {}  # sparse layer -> its plain layer, made once
    first: dict[int, tuple[SparseModule, nn.Module]] = {}  # weight -> first layer using it
    for parent in list(dense.modules()):
        for key, layer in list(parent._modules.items()):
            if not isinstance(layer, SparseModule):
                continue
            if id(layer) not in plain_of:
                plain = _plain_layer(chosen[id(layer)], bake)
                owner, owner_plain = first.setdefault(id(layer.weight), (layer, plain))
                if owner is not layer:
                    _tie_equal_(plain, owner_plain, layer, owner)
                plain_of[id(layer)] = plain
            # Assign into _modules directly so that the layer keeps its place in a
            # Sequential, and in every place of a module registered under several names.
            parent._modules[key] = plain_of[id(layer)]
    for module in dense.modules():
        _strip_pyro(module)
        if bake:  # layers pruned with torch.nn.utils.prune and left dense, too
            _bake_(module)
    _plain_attention_(dense)
    return dense


def _plain_attention_(net: nn.Module) -> None:
    """Turn each sparse attention of ``net`` (with plain projections by now, baked or in
    prune format) back into an ``nn.MultiheadAttention``, and torch's fused inference
    paths back on."""
    plain_of: dict[int, nn.Module] = {}
    for parent in list(net.modules()):
        for key, child in list(parent._modules.items()):
            if isinstance(child, SparseMultiheadAttention):
                if id(child) not in plain_of:
                    plain_of[id(child)] = child.to_torch()
                parent._modules[key] = plain_of[id(child)]
    restore_fused_paths_(net)


def _torch_pruned_names(module: nn.Module) -> list[str]:
    """The parameters of ``module`` pruned with :mod:`torch.nn.utils.prune` (not baked)."""
    return [
        n
        for n in ("weight", "bias")
        if hasattr(module, f"{n}_orig") and hasattr(module, f"{n}_mask")
    ]


def _deepcopy(net: nn.Module) -> nn.Module:
    """``copy.deepcopy(net)``, also when layers of it are pruned with torch's prune.

    The prune hook stores ``orig * mask`` as an attribute that is not a graph leaf, and
    deepcopy refuses those. They are copied detached and recomputed in the copy, as the
    hook would at the next forward (the originals may be stale after an optimizer step).
    """
    memo: dict[int, Any] = {}
    for module in net.modules():
        for name in _torch_pruned_names(module):
            value = module.__dict__.get(name)
            if isinstance(value, Tensor):
                memo[id(value)] = value.detach().clone()
    dense = copy.deepcopy(net, memo)
    for module in dense.modules():
        for name in _torch_pruned_names(module):
            setattr(
                module, name, getattr(module, f"{name}_orig") * getattr(module, f"{name}_mask")
            )
    return dense


def _tie_equal_(
    plain: nn.Module, owner_plain: nn.Module, layer: SparseModule, owner: SparseModule
) -> None:
    """Make ``plain`` hold ``owner_plain``'s weight (and bias) tensors where the sparse
    layers share them and the masked plain values agree.

    With a per-weight posterior (sparse VD, L0 weight gates) tied layers have one masked
    weight; with per-unit scales or gates (the group families) each layer scales the
    shared weight its own way, so the plain weights differ and stay separate.
    """
    for name in ("weight", "bias"):
        if getattr(layer, name) is None or getattr(layer, name) is not getattr(owner, name):
            continue
        pruned = name not in plain._parameters  # and not baked: ``name_orig``, ``name_mask``
        places: list[tuple[dict[str, Any], dict[str, Any], str]] = (
            [
                (plain._parameters, owner_plain._parameters, f"{name}_orig"),
                (plain._buffers, owner_plain._buffers, f"{name}_mask"),
            ]
            if pruned
            else [(plain._parameters, owner_plain._parameters, name)]
        )
        if all(
            theirs.get(key) is not None and torch.equal(mine[key], theirs[key])
            for mine, theirs, key in places
        ):
            for mine, theirs, key in places:
                mine[key] = theirs[key]
            if pruned:  # the masked value, which the prune hook refreshes
                setattr(plain, name, getattr(owner_plain, name))


def _plain_layer(chosen: _Selected, bake: bool) -> nn.Module:
    """The plain torch layer of a sparse one, with the selected masks.

    As :meth:`~bayessparse.nn.SparseModule.to_dense`, but with masks from any selection
    rather than from one threshold.
    """
    layer, weight = chosen.module, chosen.module.weight
    plain: Any = torch_layer_type(layer)(
        **torch_layer_kwargs(layer), device=weight.device, dtype=weight.dtype
    )
    bias = layer.dense_bias()
    with torch.no_grad():
        plain.weight.copy_(layer.dense_weight())
        if bias is not None:
            plain.bias.copy_(bias)
    prune.custom_from_mask(plain, "weight", chosen.weight)
    if chosen.bias is not None:
        prune.custom_from_mask(plain, "bias", chosen.bias)
    plain.train(layer.training)
    if bake:
        _bake_(plain)
    return plain


def _bake_(module: nn.Module) -> None:
    """Write the :mod:`torch.nn.utils.prune` masks of ``module`` into its parameters.

    ``prune.remove`` recomputes ``orig * mask``; the ``weight`` attribute itself is stale
    after an optimizer step until the next forward pass.
    """
    for name in _torch_pruned_names(module):
        prune.remove(module, name)


def sparsity_report(
    net: nn.Module,
    threshold: float | Mapping[str, float] | None = None,
    *,
    sparsity: float | None = None,
    scope: str = "global",
) -> dict[str, Any]:
    """Per-layer and total weight counts of the masked network.

    Compression is ``|W| / |W != 0|`` over the weight tensors of the sparse layers (biases
    excluded), as in Molchanov et al. (2017). ``inputs_kept`` / ``outputs_kept`` count the
    input and output units (channels for convolutions) that keep at least one weight; the
    structured methods' papers report architectures in these terms. A weight tensor shared
    by several layers (tied weights) counts once in the totals, where it is kept if any
    of its layers keeps it.

    Args:
        net: a network with sparse layers.
        threshold, sparsity, scope: the selection, as for :func:`masks`.

    Returns:
        A dict of counts, keyed as
        ``{"layers": {name: {"weights", "kept", "sparsity", "inputs_kept",
        "outputs_kept", "threshold"}}, "weights", "kept", "sparsity", "compression",
        "selection"}``. A layer's ``"threshold"`` is the keep-probability cut it used
        (``None`` under a target sparsity); ``"selection"`` is ``{"threshold",
        "sparsity", "scope"}`` as asked, with a dict threshold keyed by layer name and
        ``"scope"`` ``None`` without a sparsity. ``"sparsity"`` is the achieved one.

    Raises:
        ValueError: for a network without sparse layers, or a bad selection.
        TypeError: for a bad selection, as :func:`masks`.
    """
    chosen = _select_layers(net, threshold, sparsity, scope)
    layers = {}
    stored: dict[int, Tensor] = {}  # weight tensor -> union of its layers' masks
    for name, layer in chosen.items():
        mask = layer.weight
        n, k = mask.numel(), int(mask.sum())
        layers[name or "weight"] = {  # a bare layer, as masks() keys it
            "weights": n,
            "kept": k,
            "sparsity": 1.0 - k / n,
            "inputs_kept": int(mask.transpose(0, 1).flatten(1).any(1).sum()),
            "outputs_kept": int(mask.flatten(1).any(1).sum()),
            "threshold": layer.threshold,
        }
        key = id(layer.module.weight)
        stored[key] = mask | stored[key] if key in stored else mask
    total = sum(mask.numel() for mask in stored.values())
    kept = sum(int(mask.sum()) for mask in stored.values())
    if total == 0:
        raise ValueError(
            f"{type(net).__name__} has no sparse layers to report on. Convert it first with "
            "bayessparse.to_sparse_(net)."
        )
    return {
        "layers": layers,
        "weights": total,
        "kept": kept,
        "sparsity": 1.0 - kept / total,
        "compression": total / kept if kept else math.inf,
        "selection": _selection(chosen, threshold, sparsity, scope),
    }


def _selection(
    chosen: dict[str, _Selected],
    threshold: float | Mapping[str, float] | None,
    sparsity: float | None,
    scope: str,
) -> dict[str, Any]:
    """The selection as asked, a dict threshold keyed by layer name (state_dict keys
    resolved), for :func:`sparsity_report`."""
    if isinstance(threshold, Mapping):
        asked: Any = _given_cuts({name: c.module for name, c in chosen.items()}, threshold)
    else:
        asked = None if threshold is None else float(threshold)
    return {
        "threshold": asked,
        "sparsity": None if sparsity is None else float(sparsity),
        "scope": None if sparsity is None else scope,
    }


def keep_probs(net: nn.Module) -> dict[str, Tensor]:
    """Each sparse layer's ``keep_prob()``, keyed like ``state_dict`` (``"0.weight"``).

    The probability that a weight is kept (per weight, or per unit for unit-gating
    families, broadcastable to the weight), without gradient: what
    :func:`bayessparse.metrics.flops` weighs its ``expected`` count by.
    """
    return {
        _key(name, "weight"): module.keep_prob().detach() for name, module in sparse_modules(net)
    }
