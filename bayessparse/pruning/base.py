"""The method interface: a method scores weights; one selector turns scores into masks.

In the spirit of :mod:`torch.nn.utils.prune` (one ``compute_mask``, the hook machinery in
one place) and jaxpruner (a method overrides only its scores): a :class:`PruningMethod`
returns importance scores, higher-is-kept, per weight or per unit;
:func:`bayessparse.sparsity.select` turns them into boolean masks at a target sparsity;
:func:`prune` applies them in :mod:`torch.nn.utils.prune` format. Methods that act during
training add a ``penalty(net)`` to the loss and an ``after_step(net, optimizer, step)``
hook; when a method acts (at initialisation, after training, during training) and how the
survivors are trained afterwards (retain, rewind, reinitialise) are class attributes that
the benchmark harness reads, so that every method runs under one budget by one loop.

This package imports torch and :mod:`bayessparse.sparsity` only: never Pyro, the
Bayesian layers or the training loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from bayessparse.sparsity import Scores, check_sparsity, select, weight_mask

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
STAGES = ("at_init", "after_training", "during_training")
POLICIES = ("retain", "rewind", "reinit")
STRUCTURES = ("weight", "unit")

Data = tuple[Tensor, Tensor]


class PruningMethod:
    """Base class of the pruning methods: override :meth:`scores` (and hooks if needed).

    Class attributes describe the method to the harness:

    Attributes:
        name: the registry name (``python -m bayessparse bench --methods NAME``).
        family: the literature's family, e.g. ``"magnitude"``, ``"second_order"``,
            ``"at_init"``, ``"structured"``, ``"control"``.
        stage: when the masks are chosen: ``"at_init"`` (before training),
            ``"after_training"`` (from a trained dense net, then fine-tuned) or
            ``"during_training"`` (hooks act while training, then masks are chosen).
        policy: how survivors of an after-training prune are trained on: ``"retain"``
            their trained values (Han et al. 2015), ``"rewind"`` to their initial or an
            early value (Frankle & Carbin 2019), ``"reinit"`` from a fresh
            initialisation (Liu et al. 2019).
        structure: ``"weight"`` (one score per weight) or ``"unit"`` (one per output
            neuron or channel: whole units are pruned, and their biases with them).
        needs_data: whether :meth:`scores` needs ``data``.
        rounds: after-training methods prune in this many rounds, each followed by its
            share of the fine-tuning budget (iterative pruning; 1: one-shot).
        scope: the scope the harness prunes with, ``"global"`` or ``"layer"``; ``None``
            (default): global for weight methods, per layer for unit methods.

    Args:
        **options: method options (each method documents its own); unknown names raise.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    stage: ClassVar[str] = "after_training"
    policy: ClassVar[str] = "retain"
    structure: ClassVar[str] = "weight"
    needs_data: ClassVar[bool] = False
    rounds: ClassVar[int] = 1
    scope: str | None = None

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(
                f"Method {self.name!r} got unknown options {sorted(options)}. "
                f"See help(bayessparse.pruning.{type(self).__name__}) for its options."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def scores(self, net: nn.Module, data: Data | None) -> dict[str, Tensor]:
        """Importance of each prunable weight, higher-is-kept, keyed like ``state_dict``.

        Each value broadcasts to its weight: the weight's shape (one score per weight) or
        one score per output unit (shape ``(out, 1, ...)``). Layers left out of the dict
        are not pruned. Weights already pruned keep their masks whatever their score.
        """
        raise NotImplementedError(f"{type(self).__name__} must define scores(net, data)")

    def prepare_(self, net: nn.Module) -> nn.Module:
        """Make ``net`` ready for the method before training (default: unchanged)."""
        return net

    def start_(self, net: nn.Module, sparsity: float, total_steps: int) -> None:
        """Called before training by a ``"during_training"`` method's trainer: the target
        sparsity and the number of optimiser steps the training will take (default:
        nothing; e.g. gradual magnitude pruning plans its schedule here)."""

    def penalty(self, net: nn.Module) -> Tensor | None:
        """A term added to the mean training loss (per example, as the papers write it:
        e.g. ``λ·Σ|γ|``), or ``None`` (default). The loop's data term is the summed loss
        over the training set, so trainers multiply the penalty by its size."""
        return None

    def after_step(self, net: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Called after every optimiser step while training (default: nothing)."""

    def update_(self, net: nn.Module, masks: dict[str, Tensor], data: Data | None) -> None:
        """Change the surviving weights once ``masks`` are chosen (default: nothing);
        e.g. OBS's compensating update. Runs before the masks are applied."""

    def finalize_(self, net: nn.Module) -> nn.Module:
        """Undo :meth:`prepare_` after training, leaving a plain net (default: unchanged)."""
        return net


def prunable_layers(net: nn.Module) -> dict[str, nn.Module]:
    """The Linear and Conv layers of ``net`` by name, in ``named_modules`` order."""
    return {name: m for name, m in net.named_modules() if isinstance(m, PRUNABLE)}


def param_key(layer: str, param: str = "weight") -> str:
    """The ``state_dict`` key of a layer's parameter (``"0.weight"``; ``"weight"`` for a
    bare layer)."""
    return f"{layer}.{param}" if layer else param


def current_mask(module: nn.Module) -> Tensor | None:
    """The weight mask of a layer pruned in :mod:`torch.nn.utils.prune` format, or None."""
    mask = getattr(module, "weight_mask", None)
    return mask.bool() if isinstance(mask, Tensor) else None


def trained_weight(module: nn.Module) -> Tensor:
    """The weight the layer computes with (``weight_orig * weight_mask`` when pruned)."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight


def unit_layers(net: nn.Module, *, check: bool = True) -> dict[str, nn.Module]:
    """The layers whose output units can be pruned: every Linear and Conv layer of ``net``
    (in ``named_modules`` order) but the last.

    Raises:
        ValueError: with ``check``, if there is none (a single Linear layer, say).
    """
    layers = list(prunable_layers(net).items())
    if check and len(layers) < 2:
        raise ValueError(
            f"Expected a network with a Linear or Conv layer before its last one, got "
            f"{type(net).__name__} with {len(layers)}: it has no units to prune, since the "
            "last layer's outputs are the classes. Prune its weights with a weight method "
            "such as 'magnitude' instead."
        )
    return dict(layers[:-1])


def leaf_name(module: nn.Module, param: str = "weight") -> str:
    """The name of the parameter that stores ``param``: ``weight_orig`` when pruned."""
    return f"{param}_orig" if hasattr(module, f"{param}_orig") else param


def recompute_pruned_(net: nn.Module) -> None:
    """Recompute ``weight = weight_orig * weight_mask`` of the pruned layers of ``net``:
    torch prune's hook caches it at each forward pass, so it is stale after a change of
    ``weight_orig`` (or a functional call, which leaves the substitute's)."""
    with torch.no_grad():
        for module in net.modules():
            for param in ("weight", "bias"):
                if hasattr(module, f"{param}_mask"):
                    orig, mask = getattr(module, f"{param}_orig"), getattr(module, f"{param}_mask")
                    setattr(module, param, orig * mask)


def check_option(
    name: str, value: Any, *, integer: bool = False, zero: bool = False, optional: bool = False
) -> None:
    """Check a method option: a positive number (``zero``: or 0), an integer if asked,
    or ``None`` if ``optional``.

    Raises:
        ValueError: for anything else (bools, NaN, infinities included).
    """
    if optional and value is None:
        return
    valid = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    # NaN fails both comparisons.
    if not (valid and (value >= 0 if zero else value > 0) and value < math.inf):
        wanted = ("integer" if integer else "number") + (" >= 0" if zero else " > 0")
        raise ValueError(f"Expected {name} to be a finite {wanted}, got {value!r}.")


def device_batches(net: nn.Module, data: Data, batch_size: int, num: int | None) -> Iterator[Data]:
    """The first ``num`` batches of ``data``, on the device of ``net``'s parameters."""
    device = next(net.parameters()).device
    for x, y in loss_batches(data, batch_size, num):
        yield x.to(device), y.to(device)


def require_data(method: PruningMethod, data: Data | None) -> Data:
    """``data``, or a clear error for a method that scores with the loss and got none."""
    if data is None:
        raise ValueError(
            f"Method {method.name!r} scores weights with the loss on data, got data=None. "
            "Pass data=(inputs, targets), e.g. a few batches of the training set."
        )
    return data


def learning_rate(optimizer: torch.optim.Optimizer | None, param: Tensor) -> float:
    """The learning rate of the parameter group of ``optimizer`` that holds ``param``
    (methods whose ``after_step`` scales an update by it: proximal steps, rewiring).

    Raises:
        ValueError: no optimizer (SVI), or none of its groups holds ``param``.
    """
    groups = [] if optimizer is None else optimizer.param_groups
    for group in groups:
        if any(p is param for p in group["params"]):
            return float(group["lr"])
    raise ValueError(
        f"Expected a torch optimizer training the net's weights, got {optimizer!r}, which "
        "does not. Build it from net.parameters() after the method's prepare_(net) and "
        "start_(): the update is scaled by the weights' learning rate."
    )


def loss_batches(data: Data, batch_size: int, num_batches: int | None = None) -> Iterator[Data]:
    """Consecutive ``(x, y)`` batches of ``data`` (all of it, or the first ``num_batches``)."""
    x, y = data
    starts = range(0, x.shape[0], batch_size)
    for start in starts if num_batches is None else starts[:num_batches]:
        yield x[start : start + batch_size], y[start : start + batch_size]


def check_data(method: PruningMethod, data: Any) -> Data | None:
    """``data`` as an ``(inputs, targets)`` pair of tensors, or None if the method needs none.

    Raises:
        ValueError: the method needs data and got none, or it is not a pair of tensors of
            equal length.
    """
    if data is None:
        return require_data(method, data) if method.needs_data else None
    if (
        not isinstance(data, (tuple, list))
        or len(data) != 2
        or not all(isinstance(t, Tensor) for t in data)
        or data[0].shape[0] != data[1].shape[0]
        or data[0].shape[0] == 0
    ):
        raise ValueError(
            f"Expected data=(inputs, targets), two tensors with the same non-zero number of "
            f"rows, got {type(data).__name__}. Pass e.g. (images[:1000], labels[:1000])."
        )
    return data[0], data[1]


def compute_masks(
    net: nn.Module,
    method: PruningMethod,
    sparsity: float,
    data: Data | None = None,
    scope: str = "global",
) -> dict[str, Tensor]:
    """The masks ``method`` chooses at ``sparsity``, keyed like ``state_dict``; ``net`` is
    not changed. Unit methods mask the biases of the units they prune."""
    layers = prunable_layers(net)
    raw = method.scores(net, data)
    scores: dict[str, Scores] = {}
    for name, module in layers.items():
        key = param_key(name)
        if key not in raw:
            continue
        weight = trained_weight(module)
        value = raw[key].detach()
        if not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"Method {method.name!r} gave non-finite scores for {key!r}. The network's "
                "weights or the data hold NaN or inf values; check them."
            )
        scores[key] = Scores(value, tuple(weight.shape), fixed=current_mask(module))
    unknown = sorted(set(raw) - set(scores))
    if unknown:
        raise ValueError(
            f"Method {method.name!r} scored {unknown}, which are not weights of the net's "
            "Linear or Conv layers."
        )
    if not scores:
        raise ValueError(
            f"Method {method.name!r} found nothing to prune in {type(net).__name__}: it "
            "prunes the weights of Linear and Conv layers"
            + (" by output unit" if method.structure == "unit" else "")
            + "."
        )
    kept = select(scores, sparsity=sparsity, scope=scope)
    masks: dict[str, Tensor] = {}
    for name, module in layers.items():
        key = param_key(name)
        if key not in scores:
            continue
        masks[key] = weight_mask(scores[key], kept[key])
        unit = scores[key].unit_shape
        if module.bias is not None and unit[0] > 1 and all(u == 1 for u in unit[1:]):
            # Units pruned in an earlier round keep their bias pruned (select omits them).
            earlier = getattr(module, "bias_mask", None)
            kept_bias = kept[key].reshape(-1).clone()
            if isinstance(earlier, Tensor):
                kept_bias &= earlier.bool().to(kept_bias.device)
            masks[param_key(name, "bias")] = kept_bias
    return masks


def apply_masks_(net: nn.Module, masks: dict[str, Tensor]) -> None:
    """Apply ``masks`` (keyed like ``state_dict``) in :mod:`torch.nn.utils.prune` format.

    Only ever removes weights: a layer pruned before keeps its pruned weights pruned and
    its one ``weight_mask`` (narrowed in place by :func:`set_masks_`), so that
    ``state_dict`` keys stay the same whatever the number of rounds.
    """
    modules = dict(net.named_modules())
    narrowed = {}
    for key, mask in masks.items():
        layer_name, _, param = key.rpartition(".")
        old = getattr(modules[layer_name], f"{param}_mask", None)
        narrowed[key] = mask if old is None else mask.to(old.device).bool() & old.bool()
    set_masks_(net, narrowed)


def set_masks_(
    net: nn.Module, masks: dict[str, Tensor], optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Replace the masks of ``net`` by ``masks`` (keyed like ``state_dict``), in
    :mod:`torch.nn.utils.prune` format: unlike :func:`apply_masks_`, a mask may turn
    pruned weights back on, as dynamic sparse training regrows them.

    A weight that turns on starts a new connection: its ``weight_orig`` entry is set to 0
    and, given ``optimizer``, so is its entry in every state tensor the optimizer keeps
    for ``weight_orig`` (Adam's ``exp_avg`` and ``exp_avg_sq``, SGD's
    ``momentum_buffer``), so that no stale momentum moves it (Evci et al. 2020).

    Args:
        net: the network, pruned or not.
        masks: boolean masks of its Linear / Conv parameters.
        optimizer: the optimizer training ``net``, or None (no state to reset).
    """
    modules = dict(net.named_modules())
    with torch.no_grad():
        for key, mask in masks.items():
            layer_name, _, param = key.rpartition(".")
            module = modules[layer_name]
            old = getattr(module, f"{param}_mask", None)
            if not isinstance(old, Tensor):  # a dense layer: nothing can turn on
                torch_prune.custom_from_mask(module, param, mask.to(getattr(module, param).device))
                continue
            orig = getattr(module, f"{param}_orig")
            new = mask.to(device=old.device, dtype=torch.bool)
            turned_on = new & ~old.bool()
            orig.masked_fill_(turned_on, 0.0)
            state = optimizer.state.get(orig, {}) if optimizer is not None else {}
            for value in state.values():
                if isinstance(value, Tensor) and value.shape == orig.shape:
                    value.masked_fill_(turned_on, 0.0)
            old.copy_(new)
    recompute_pruned_(net)


def prune(
    net: nn.Module,
    method: str | PruningMethod,
    sparsity: float,
    data: Data | None = None,
    scope: str = "global",
    **options: Any,
) -> dict[str, Tensor]:
    """Prune ``net`` in place with ``method`` to ``sparsity`` and return the masks.

    Weights already pruned (an earlier round) stay pruned and count toward the target.

    Args:
        net: a network with Linear / Conv layers.
        method: a registered name (:func:`~bayessparse.pruning.methods`) or an instance.
        sparsity: the fraction of the prunable weights to prune, in [0, 1).
        data: ``(inputs, targets)`` for methods that score with the loss.
        scope: ``"global"`` (rank all layers together) or ``"layer"`` (each layer).
        **options: options of the method, when ``method`` is a name.

    Returns:
        Boolean masks keyed like ``state_dict`` (``"1.weight"``, and ``"1.bias"`` for unit
        methods), exactly what was applied.

    Raises:
        ValueError: unknown method, sparsity outside [0, 1), missing data, or a net
            with nothing the method can prune.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> masks = prune(net, "magnitude", 0.5)
        >>> sorted(masks)
        ['0.weight', '2.weight']
    """
    from bayessparse.pruning.registry import get_method

    chosen = get_method(method, **options) if isinstance(method, str) else method
    if options and not isinstance(method, str):
        raise TypeError("Pass options to the method's constructor when giving an instance.")
    target = check_sparsity(sparsity)
    checked = check_data(chosen, data)
    masks = compute_masks(net, chosen, target, checked, scope)
    with torch.no_grad():
        chosen.update_(net, masks, checked)
        apply_masks_(net, masks)
    return masks
