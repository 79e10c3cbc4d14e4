"""Turning a plain torch network into a Bayesian sparse one, in place."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_
from torch import nn

from bayessparse.nn import attention, group, l0, sbp, spike_slab, variational
from bayessparse.nn.attention import SparseMultiheadAttention
from bayessparse.nn.base import SparseModule, torch_layer_type

# method -> {exact torch type -> sparse class}. A new family adds a row.
METHODS: dict[str, dict[type[nn.Module], type[SparseModule]]] = {
    method: {torch_layer_type(layer): layer for layer in layers}
    for method, layers in {
        "sparse_vd": variational.LAYERS,
        "l0": l0.LAYERS,
        "group_nj": group.GROUP_NJ_LAYERS,
        "horseshoe": group.HORSESHOE_LAYERS,
        "spike_slab": spike_slab.LAYERS,
        "sbp": sbp.LAYERS,
    }.items()
}


# Layers with weights that to_sparse_ leaves dense, reported when it meets them: the exact
# type rule skips their subclasses (and ConvTranspose), and the others have no sparse layer.
DENSE_WEIGHTED: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.modules.conv._ConvNd,
    nn.MultiheadAttention,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.Bilinear,
    nn.RNNBase,
)


def unwrap_pyro_type(cls: type) -> type:
    """``T`` for a ``PyroModule[T]`` class made by Pyro (``to_pyro_module_``), else ``cls``."""
    plain: type = cls.__bases__[0] if cls.__bases__ else cls
    if not issubclass(plain, PyroModule) and PyroModule[plain] is cls:  # type: ignore[index]
        return plain
    return cls


def sparse_modules(net: nn.Module) -> Iterator[tuple[str, SparseModule]]:
    """``(name, module)`` of every :class:`SparseModule` in ``net``, in ``named_modules`` order."""
    for name, module in net.named_modules():
        if isinstance(module, SparseModule):
            yield name, module


def _slots(net: nn.Module) -> Iterator[tuple[nn.Module, str, str, nn.Module]]:
    """``(parent, key, name, child)`` for every place a module is registered in ``net``.

    Unlike ``named_modules``, a module registered in several places is listed at each of
    them (``parent._modules[key]`` is the place); ``name`` is its path through the first
    name of ``parent``.
    """
    for parent_name, parent in net.named_modules():
        for key, child in parent._modules.items():
            if child is not None:
                yield parent, key, f"{parent_name}.{key}" if parent_name else key, child


def _convert(
    sparse_cls: type[SparseModule],
    dense: nn.Module,
    name: str,
    owners: dict[int, tuple[str, SparseModule]],
    layer_kwargs: dict[str, Any],
) -> SparseModule:
    """The sparse layer replacing ``dense``, holding its Parameter objects and ties."""
    layer = sparse_cls.from_dense(dense, **layer_kwargs).train(dense.training)
    # from_dense copies the values; keeping the objects keeps every tie, with layers that
    # are converted now, later or never, and with the references the caller holds. A
    # parameter pruned by torch.nn.utils.prune is not in _parameters (its ``_orig`` is).
    for param_name in ("weight", "bias"):
        param = dense._parameters.get(param_name)
        if param is not None:
            layer._parameters[param_name] = param
    owner_name, owner = owners.setdefault(id(layer.weight), (name, layer))
    if owner is not layer:
        try:
            layer.share_weight_posterior_(owner)
        except ValueError as error:
            raise ValueError(f"{name!r} shares its weight with {owner_name!r}: {error}") from error
    return layer


def to_sparse_(
    net: nn.Module,
    method: str = "sparse_vd",
    include: Callable[[str, nn.Module], bool] | None = None,
    **layer_kwargs: Any,
) -> nn.Module:
    """Replace the layers of ``net`` by Bayesian sparse layers, in place, and return ``net``.

    Layers are matched by exact type (``nn.Linear``, ``nn.Conv1d/2d/3d``, or Pyro's
    ``PyroModule[nn.Linear]`` and the like), so subclasses
    with their own behaviour and layers that are already sparse are left alone: calling it
    twice is harmless. Each new layer starts from the old one's weights
    (:meth:`~bayessparse.nn.SparseModule.from_dense`) and keeps its ``weight`` and ``bias``
    Parameter objects. Normalisation and other layers stay deterministic. The root and
    all its submodules become :class:`~pyro.nn.PyroModule` (so every parameter gets a
    name in Pyro's param store, its path from the root) and ``net`` can be trained with
    :class:`pyro.infer.SVI`.

    Shared modules and tied weights stay shared. A module registered under several names
    is converted once (if ``include`` accepts any of its names) and the one sparse layer
    takes all its places. Layers that share a weight Parameter keep sharing it, and share
    the per-weight parameters of its posterior too
    (:attr:`~bayessparse.nn.SparseModule.per_weight_params`, e.g. sparse VD's
    ``weight_log_sigma2``); per-unit parameters (gates, group scales) stay per layer. A
    tie with a layer left dense holds: it reads the posterior mean.

    Weights and biases pruned with :mod:`torch.nn.utils.prune` stay pruned for good: the
    sparse layer gets their masks (:meth:`~bayessparse.nn.SparseModule.prune_`), so they
    stay exactly zero in training and evaluation, :func:`~bayessparse.masks` reports them
    pruned and :func:`~bayessparse.to_dense` keeps them pruned.

    Attention: an ``nn.MultiheadAttention`` (with ``kdim == vdim == embed_dim``, as in
    ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer``) becomes a
    :class:`~bayessparse.nn.attention.SparseMultiheadAttention` whose input projection
    (``in_proj``, the old ``in_proj_weight`` and ``in_proj_bias``) and ``out_proj`` are
    sparse ``Linear`` layers, if ``include`` accepts the attention module's name; the
    feed-forward ``Linear`` layers are converted as any other. torch's fused inference
    path of ``nn.TransformerEncoderLayer`` reads weights directly, bypassing sparse
    layers, so it is turned off in the encoder layers that hold them (and turned back on
    by :func:`~bayessparse.to_dense`).

    What stays dense, with a warning that lists it: subclasses of ``nn.Linear`` and
    ``nn.ConvNd`` (the exact-type rule: they may compute differently), transposed
    convolutions, attention with separate key/value sizes or an input projection pruned
    with :mod:`torch.nn.utils.prune`, embeddings, ``nn.Bilinear`` and recurrent layers (no
    sparse layer replaces them), and the attention's ``bias_k``/``bias_v``. Layers that
    ``include`` rejects are not listed. Normalisation layers stay deterministic, silently.

    Args:
        net: the network to convert.
        method: the sparse family; one of ``bayessparse.convert.METHODS``.
        include: optional predicate ``include(name, module)``; only layers for which it is
            true are converted, e.g. ``lambda name, m: name != "fc3"``.
        **layer_kwargs: options passed to every new layer (e.g. ``train_clip=True``).

    Returns:
        ``net`` itself, converted.

    Raises:
        ValueError: for an unknown ``method``, when nothing in ``net`` can be converted, or
            when a layer shares its weight with a sparse layer of another family (nothing
            is converted then).
        TypeError: if ``net`` is not an ``nn.Module``.

    Example:
        >>> net = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 10))
        >>> net = to_sparse_(net, "sparse_vd")
        >>> type(net[0]).__name__
        'VariationalLinear'
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"Expected an nn.Module to convert, got {type(net).__name__}.")
    if method not in METHODS:
        raise ValueError(
            f"Unknown sparsification method {method!r}. Choose one of {sorted(METHODS)}."
        )
    table = METHODS[method]
    slots = list(_slots(net))
    # A module under several names is one layer: it is converted if include accepts any
    # of its names, once, and the one sparse layer takes all of its places.
    chosen = {
        id(child)
        for _, _, name, child in slots
        if unwrap_pyro_type(type(child)) in table and (include is None or include(name, child))
    }
    # Layers that share a weight share its posterior: the first layer made from a weight
    # owns it, and sparse layers already in the network come first.
    owners: dict[int, tuple[str, SparseModule]] = {}
    for name, module in sparse_modules(net):
        owners.setdefault(id(module.weight), (name, module))
    converted: dict[int, nn.Module] = {}
    for _, _, name, child in slots:
        if id(child) in chosen and id(child) not in converted:
            sparse_cls = table[unwrap_pyro_type(type(child))]
            converted[id(child)] = _convert(sparse_cls, child, name, owners, layer_kwargs)
        elif id(child) not in converted and _attention_chosen(child, name, table, include):
            converted[id(child)] = _convert_attention(
                table[nn.Linear], child, name, owners, layer_kwargs
            )
    for parent, key, _, child in slots:
        if id(child) in converted:
            # Assign in place: setattr on a PyroModule parent would move the child to the
            # end of _modules and so reorder an nn.Sequential.
            parent._modules[key] = converted[id(child)]
    already_sparse = any(True for _ in sparse_modules(net))
    if not converted and not already_sparse:
        found = sorted({type(m).__name__ for m in net.modules()})
        raise ValueError(
            f"to_sparse_(method={method!r}) found nothing to convert: no module of type "
            f"{sorted(t.__name__ for t in table)} "
            f"{'passed include' if include is not None else 'in the network'}. The network "
            f"holds {found}. Check the include predicate or the layer types."
        )
    _warn_dense(net, include)
    attention.disable_fused_paths_(net)
    _pyro_tree_(net)
    return net


def _attention_chosen(
    module: Any,
    name: str,
    table: dict[type[nn.Module], type[SparseModule]],
    include: Callable[[str, nn.Module], bool] | None,
) -> bool:
    """Whether ``module`` is an ``nn.MultiheadAttention`` to make sparse."""
    return (
        unwrap_pyro_type(type(module)) is nn.MultiheadAttention
        and nn.Linear in table
        and attention.convertible(module)
        and (include is None or include(name, module))
    )


def _convert_attention(
    linear: type[SparseModule],
    dense: nn.Module,
    name: str,
    owners: dict[int, tuple[str, SparseModule]],
    layer_kwargs: dict[str, Any],
) -> SparseMultiheadAttention:
    """The sparse attention replacing ``dense``, its projections made as by :func:`_convert`."""
    assert isinstance(dense, nn.MultiheadAttention)
    in_proj = _convert(
        linear, attention.in_proj_shell(dense), f"{name}.in_proj", owners, layer_kwargs
    )
    out_proj = _convert(linear, dense.out_proj, f"{name}.out_proj", owners, layer_kwargs)
    return SparseMultiheadAttention(dense, in_proj, out_proj)


def _warn_dense(net: nn.Module, include: Callable[[str, nn.Module], bool] | None) -> None:
    """One warning naming the layers with weights that stay dense (see to_sparse_)."""
    dense: list[str] = []
    for name, module in net.named_modules():
        if any(name.startswith(f"{outer}.") for outer in dense):
            continue  # inside a layer already listed (the out_proj of a dense attention)
        if isinstance(module, SparseModule) or not isinstance(module, DENSE_WEIGHTED):
            continue
        if include is None or include(name, module):
            dense.append(name)
    extra = [
        f"{name}.{key}"
        for name, module in net.named_modules()
        if isinstance(module, SparseMultiheadAttention)
        for key in ("bias_k", "bias_v")
        if getattr(module, key) is not None
    ]
    if dense or extra:
        found = [f"{n} ({type(net.get_submodule(n)).__name__})" for n in dense] + extra
        warnings.warn(
            f"to_sparse_ leaves these weights dense: {', '.join(found)}. Only nn.Linear, "
            "nn.Conv1d/2d/3d (exact types) and the projections of nn.MultiheadAttention "
            "have sparse layers; pass include=... to silence this for layers you keep "
            "dense on purpose.",
            stacklevel=3,
        )


def _pyro_tree_(net: nn.Module) -> None:
    """Make ``net`` and every submodule a PyroModule named by its path, in ``net``'s context.

    Pyro's ``to_pyro_module_`` cannot be run again on a converted network that has run:
    it re-attaches every child, and attaching asserts that no module below the child has
    entered its context ("submodule ... has executed outside of supermodule"). The check
    is meant for modules run on their own, but after a conversion every module shares the
    root's context, which the first forward pass marks as used, so any container with
    children trips it. So only modules that are not PyroModules yet are converted,
    children first, and the names and the context are then set here. A module under
    several names takes its first one, as in ``named_parameters``.
    """
    for module in reversed(list(net.modules())):
        if not isinstance(module, PyroModule):
            to_pyro_module_(module, recurse=False)
    assert isinstance(net, PyroModule)
    for name, module in net.named_modules():
        if name:
            assert isinstance(module, PyroModule)
            module._pyro_name = f"{net._pyro_name}.{name}" if net._pyro_name else name
            module._pyro_context = net._pyro_context
