"""From a trained Bayesian network to deterministic masks and plain torch networks."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from bayessparse.convert import sparse_modules, unwrap_pyro_type
from bayessparse.nn.base import SparseModule, check_threshold


def masks(net: nn.Module, threshold: float | None = None) -> dict[str, Tensor]:
    """Boolean weight masks of every sparse layer, keyed like ``state_dict`` (``"0.weight"``).

    Args:
        net: a network with sparse layers.
        threshold: keep-probability cut in [0, 1]; ``None`` uses each layer's default rule.
    """
    if threshold is not None:
        check_threshold(threshold)
    return {
        f"{name}.weight" if name else "weight": module.mask(threshold)
        for name, module in sparse_modules(net)
    }


def _strip_pyro(module: nn.Module) -> None:
    """Turn a ``PyroModule[T]`` made by ``to_pyro_module_`` back into a plain ``T``, in place."""
    plain = unwrap_pyro_type(type(module))
    if plain is not type(module):
        module.__class__ = plain
        for attr in ("_pyro_name", "_pyro_context", "_pyro_params", "_pyro_samples"):
            module.__dict__.pop(attr, None)


def to_dense(net: nn.Module, threshold: float | None = None, bake: bool = False) -> nn.Module:
    """A plain torch copy of ``net`` with each sparse layer replaced by its masked torch layer.

    The copy holds no Pyro types. Masks are in :mod:`torch.nn.utils.prune` format
    (``weight_orig`` and ``weight_mask`` buffers), so ``prune.remove`` and tools that read
    pruned models work on it; with ``bake=True`` they are baked into plain zeros.

    A sparse layer under several names becomes one plain layer in all its places. Tied
    layers (one sparse ``weight``) keep sharing their plain weight tensors where the
    masked weights agree, as with sparse VD's per-weight posterior; where each layer
    scales the shared weight by its own gates or group scales, they get their own.

    Args:
        net: a network with sparse layers (it is not modified).
        threshold: keep-probability cut in [0, 1]; ``None`` uses each layer's default rule.
        bake: write the masks into the weights and drop the prune buffers (those of
            layers pruned with :mod:`torch.nn.utils.prune` and left dense as well).

    Returns:
        The deterministic network, in the same train/eval mode as ``net``.
    """
    if threshold is not None:
        check_threshold(threshold)
    if isinstance(net, SparseModule):  # a bare layer: no copy of the Pyro layer needed
        return _plain_layer(net, threshold, bake)
    dense = _deepcopy(net)  # the copy keeps shared modules and tied weights shared
    plain_of: dict[int, nn.Module] = {}  # sparse layer -> its plain layer, made once
    first: dict[int, tuple[SparseModule, nn.Module]] = {}  # weight -> first layer using it
    for parent in list(dense.modules()):
        for key, layer in list(parent._modules.items()):
            if not isinstance(layer, SparseModule):
                continue
            if id(layer) not in plain_of:
                plain = _plain_layer(layer, threshold, bake)
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
    return dense


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


def _plain_layer(layer: SparseModule, threshold: float | None, bake: bool) -> nn.Module:
    plain = layer.to_dense(threshold)
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


def sparsity_report(net: nn.Module, threshold: float | None = None) -> dict[str, Any]:
    """Per-layer and total weight counts of the masked network.

    Compression is ``|W| / |W != 0|`` over the weight tensors of the sparse layers (biases
    excluded), as in Molchanov et al. (2017). ``inputs_kept`` / ``outputs_kept`` count the
    input and output units (channels for convolutions) that keep at least one weight; the
    structured methods' papers report architectures in these terms. A weight tensor shared
    by several layers (tied weights) counts once in the totals, where it is kept if any
    of its layers keeps it.

    Returns:
        ``{"layers": {name: {"weights", "kept", "sparsity", "inputs_kept",
        "outputs_kept"}}, "weights", "kept", "sparsity", "compression"}``.
    """
    if threshold is not None:
        check_threshold(threshold)
    layers = {}
    stored: dict[int, Tensor] = {}  # weight tensor -> union of its layers' masks
    for name, module in sparse_modules(net):
        mask = module.mask(threshold)
        n, k = mask.numel(), int(mask.sum())
        layers[name or "weight"] = {  # a bare layer, as masks() keys it
            "weights": n,
            "kept": k,
            "sparsity": 1.0 - k / n,
            "inputs_kept": int(mask.transpose(0, 1).flatten(1).any(1).sum()),
            "outputs_kept": int(mask.flatten(1).any(1).sum()),
        }
        key = id(module.weight)
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
    }
