"""Structured pruning: whole neurons and channels, by filter norm or by a learnt scale.

The units are the output neurons of Linear layers and the output channels of Conv
layers, in every prunable layer but the network's last (its outputs are the classes).
A unit's score broadcasts over its row of the weight, shape ``(out, 1, ...)``, and
pruning it masks its row and its bias (:func:`~bayessparse.pruning.compute_masks`), so
that :func:`~bayessparse.compaction.compact_pruned` can remove it.

The methods that learn a scale per unit (network slimming, sparse structure selection)
attach it to the layer in ``prepare_``: a submodule or parameter registered on the layer
(``layer.slim_bn``, ``layer.sss_scale``) and applied to its output by a forward hook, so
that the keys of the net's own parameters do not change. ``finalize_`` folds the scale
into the layer's weight and bias and removes it, leaving a plain net with the same
eval-mode outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import prune as torch_prune

from bayessparse.pruning.base import (
    Data,
    PruningMethod,
    apply_masks_,
    check_option,
    leaf_name,
    learning_rate,
    param_key,
    recompute_pruned_,
    trained_weight,
    unit_layers,
)
from bayessparse.pruning.registry import register

Hook = Callable[[nn.Module, Any, Tensor], Tensor]


def per_unit(layer: nn.Module, values: Tensor) -> Tensor:
    """One value per output unit, shaped ``(out, 1, ...)`` to broadcast over the weight."""
    return values.reshape(-1, *[1] * (trained_weight(layer).dim() - 1))


def _on_output(layer: nn.Module, values: Tensor) -> Tensor:
    """One value per output unit, shaped to broadcast over the layer's output: features
    last for Linear, channels second for Conv."""
    if isinstance(layer, nn.Linear):
        return values
    return values.reshape(-1, *[1] * (trained_weight(layer).dim() - 2))


def _attach_(layer: nn.Module, name: str, value: nn.Module | nn.Parameter, hook: Hook) -> None:
    """Register ``value`` on ``layer`` as ``name`` and ``hook`` on its output."""
    setattr(layer, name, value)
    # Kept on the layer so that a copy of the net (deepcopy) removes its own hook.
    setattr(layer, f"_{name}_hook", layer.register_forward_hook(hook))


def _detach_(layer: nn.Module, name: str) -> None:
    """Remove what :func:`_attach_` registered."""
    getattr(layer, f"_{name}_hook").remove()
    delattr(layer, f"_{name}_hook")
    delattr(layer, name)


def fold_(layer: nn.Module, scale: Tensor, shift: Tensor | None = None) -> None:
    """Make ``layer`` compute ``scale · layer(x) + shift`` per output unit, in place: its
    weight rows times ``scale``, its bias ``b·scale + shift`` (a bias is added for a
    ``shift`` if it has none). Pruned layers keep their masks."""
    with torch.no_grad():
        getattr(layer, leaf_name(layer)).mul_(per_unit(layer, scale))
        if isinstance(layer.bias, Tensor):
            bias = getattr(layer, leaf_name(layer, "bias"))
            bias.mul_(scale).add_(0 if shift is None else shift)
        elif shift is not None and shift.any():
            layer.bias = nn.Parameter(shift.clone())
    recompute_pruned_(layer)


@register
class FilterL1(PruningMethod):
    """Prune the filters (output channels) and neurons of smallest L1 norm, score
    ``Σ|W_j|`` over unit j's weights, from a trained net; fine-tune the survivors.

    The paper ranks the filters within each layer at a per-layer rate set by a sensitivity
    analysis; ``scope="layer"`` ranks within each layer at one rate. A global ranking
    (the default scope) compares sums over filters of different sizes.

    References:
        Li, Kadav, Durdanovic, Samet, Graf. "Pruning filters for efficient ConvNets".
        ICLR 2017.
    """

    name = "filter_l1"
    family = "structured"
    structure = "unit"

    def scores(self, net: nn.Module, data: Data | None) -> dict[str, Tensor]:
        return {
            param_key(name): per_unit(
                layer, trained_weight(layer).detach().abs().flatten(1).sum(1)
            )
            for name, layer in unit_layers(net).items()
        }


def _normalise_output(layer: nn.Module, inputs: Any, output: Tensor) -> Tensor:
    return layer.get_submodule("slim_bn")(output)


def _added_norm(layer: nn.Module) -> _BatchNorm:
    """A BatchNorm for the outputs of ``layer``: γ = 0.5, β = 0, and the identity in eval
    mode until it has seen data (running mean 0, running variance γ² − eps)."""
    weight = trained_weight(layer)
    if isinstance(layer, (nn.Linear, nn.Conv1d)):
        kind: type[_BatchNorm] = nn.BatchNorm1d
    else:
        kind = nn.BatchNorm2d if isinstance(layer, nn.Conv2d) else nn.BatchNorm3d
    norm = kind(weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        norm.get_parameter("weight").fill_(0.5)
        norm.get_buffer("running_var").fill_(0.5**2 - norm.eps)
    return norm


def following_norms(net: nn.Module, *, check: bool = True) -> dict[str, _BatchNorm | None]:
    """Per unit layer, the BatchNorm on its outputs, or None: the module right after the
    layer in ``named_modules`` order, if it is a BatchNorm of the layer's width (as in a
    Sequential of layer, norm, activation), or ``layer.slim_bn``.

    Raises:
        ValueError: a following norm has no scales (``affine=False``), or, with ``check``,
            the net has no unit layers.
    """
    modules = list(net.named_modules())
    after = {name: modules[i + 1][1] for i, (name, _) in enumerate(modules[:-1])}
    norms: dict[str, _BatchNorm | None] = {}
    for name, layer in unit_layers(net, check=check).items():
        norm = after.get(name)
        width = trained_weight(layer).shape[0]
        if not isinstance(norm, _BatchNorm) or norm.num_features != width:
            norms[name] = None
        elif not norm.affine:
            raise ValueError(
                f"Expected the BatchNorm after {name!r} to have scales, got affine=False. "
                "Network slimming prunes by those scales: build it with affine=True."
            )
        else:
            norms[name] = norm
    return norms


@register
class NetworkSlimming(PruningMethod):
    """Network slimming: an L1 penalty on the BatchNorm scales γ while training, then
    prune the channels and neurons of smallest ``|γ|`` (one global threshold).

    The penalty ``λ Σ|γ|`` over the scales of the norms on the unit layers' outputs is
    per example (:meth:`PruningMethod.penalty`); autograd's gradient of ``|γ|``,
    ``sign(γ)``, is the sub-gradient of the official code. A unit layer without a
    BatchNorm after it (LeNet-5 has none) gets one from ``prepare_``, ``layer.slim_bn``,
    with γ = 0.5 and β = 0 as the official code starts its norms; norms the net has keep
    their values. Pruning a unit also masks its ``slim_bn`` scale and shift
    (:meth:`update_`), so that the unit outputs zero, as when the paper removes the
    channel, and ``finalize_`` folds the norm (eval-mode statistics) into the layer:
    ``W ← W·γ/σ``, ``b ← (b − μ)·γ/σ + β`` with ``σ = sqrt(var + eps)``. Norms the net has
    stay, and the units they shift to a constant are folded into the next layer by
    :func:`~bayessparse.compaction.compact_pruned`. An added norm's running variance starts
    at ``γ² − eps``, so that before training it is the identity in eval mode (training
    replaces it within a few dozen steps); it expects Linear outputs ``(N, features)``.

    Args:
        l1: λ, the paper's 1e-4.

    References:
        Liu, Li, Shen, Huang, Yan, Zhang. "Learning efficient convolutional networks
        through network slimming". ICCV 2017.
    """

    name = "slimming"
    family = "structured"
    stage = "during_training"
    structure = "unit"

    def __init__(self, l1: float = 1e-4, **options: Any) -> None:
        super().__init__(**options)
        check_option("l1", l1, zero=True)
        self.l1 = l1

    def prepare_(self, net: nn.Module) -> nn.Module:
        layers = unit_layers(net, check=False)
        for name, norm in following_norms(net, check=False).items():
            if norm is None:
                _attach_(layers[name], "slim_bn", _added_norm(layers[name]), _normalise_output)
        return net

    def scales(self, net: nn.Module) -> dict[str, Tensor]:
        """The scales γ of the norm on each unit layer's outputs, by layer name.

        Raises:
            ValueError: a unit layer has no norm after it (``prepare_`` adds them).
        """
        norms = following_norms(net)
        missing = [name for name, norm in norms.items() if norm is None]
        if missing:
            raise ValueError(
                f"Expected a BatchNorm after each unit layer, got none after {missing}. "
                "Call prepare_(net) first: it adds them."
            )
        return {name: norm.weight for name, norm in norms.items() if norm is not None}

    def penalty(self, net: nn.Module) -> Tensor:
        return (
            self.l1 * torch.stack([gamma.abs().sum() for gamma in self.scales(net).values()]).sum()
        )

    def scores(self, net: nn.Module, data: Data | None) -> dict[str, Tensor]:
        layers = unit_layers(net)
        return {
            param_key(name): per_unit(layers[name], gamma.detach().abs())
            for name, gamma in self.scales(net).items()
        }

    def update_(self, net: nn.Module, masks: dict[str, Tensor], data: Data | None) -> None:
        for name, layer in unit_layers(net).items():
            if hasattr(layer, "slim_bn") and param_key(name) in masks:
                kept = masks[param_key(name)].flatten(1).any(1)
                apply_masks_(layer, {"slim_bn.weight": kept, "slim_bn.bias": kept})

    def finalize_(self, net: nn.Module) -> nn.Module:
        for layer in unit_layers(net, check=False).values():
            norm = getattr(layer, "slim_bn", None)
            if not isinstance(norm, _BatchNorm):
                continue
            for param in ("weight", "bias"):
                if hasattr(norm, f"{param}_mask"):
                    torch_prune.remove(norm, param)  # the masked values as plain parameters
            mean, var = norm.get_buffer("running_mean"), norm.get_buffer("running_var")
            scale = norm.get_parameter("weight") / torch.sqrt(var + norm.eps)
            shift = norm.get_parameter("bias") - mean * scale
            fold_(layer, scale.detach(), shift.detach())
            _detach_(layer, "slim_bn")
        return net


def _scale_output(layer: nn.Module, inputs: Any, output: Tensor) -> Tensor:
    return output * _on_output(layer, layer.get_parameter("sss_scale"))


def soft_threshold(values: Tensor, threshold: float) -> Tensor:
    """The proximal map of ``threshold·‖·‖₁``: ``sign(v)·max(|v| − threshold, 0)``."""
    return values.sign() * (values.abs() - threshold).clamp(min=0)


@register
class SparseStructureSelection(PruningMethod):
    """Sparse structure selection: a scale λ_j on each unit's output, trained with a sparse
    regulariser ``γ‖λ‖₁`` by proximal steps; prune the units of smallest ``|λ|``.

    ``prepare_`` gives each unit layer ``layer.sss_scale`` (λ = 1), multiplied into its
    output by a forward hook. After every optimiser step, :meth:`after_step` applies the
    proximal map of the regulariser with the learning rate η of λ's parameter group, the
    soft threshold ``λ ← sign(λ)·max(|λ| − η·γ, 0)``: a plain proximal gradient step on
    top of the optimiser's, where the paper uses accelerated proximal gradient (a
    momentum on λ, and the official code also clips λ at 0; scores use ``|λ|`` either
    way). ``finalize_`` folds λ into the layer, ``W ← λ·W``, ``b ← λ·b``.

    With Adam (the bench's optimiser) a scale moves by at most about η per step whatever
    its gradient's scale (by η·m̂/√v̂), so γ compares the threshold with that step: a unit
    survives when its scale's gradient is steady enough to outpace it. The default γ = 1
    zeroes the scales of units whose gradient is not consistently signed. Measured on
    LeNet-300-100 (full MNIST, Adam at 1e-3, batch 100, the loop's schedule): γ = 1
    zeroes 279 of the 400 hidden units in 6 epochs (test error 4.1 %, 4.3 % once pruned
    to 80 % of the unit weights, before fine-tuning); γ = 0.5 zeroes 7 (2.2 %, 32 % once
    pruned); γ = 0.3 zeroes none in 3 epochs, shrinking every scale alike. The official
    0.01 goes with SGD at lr 0.1, against the mean loss's gradient.

    Args:
        gamma: γ, the weight of the regulariser.

    References:
        Huang, Wang. "Data-driven sparse structure selection for deep neural networks".
        ECCV 2018.
    """

    name = "sss"
    family = "structured"
    stage = "during_training"
    structure = "unit"

    def __init__(self, gamma: float = 1.0, **options: Any) -> None:
        super().__init__(**options)
        check_option("gamma", gamma, zero=True)
        self.gamma = gamma

    def prepare_(self, net: nn.Module) -> nn.Module:
        for layer in unit_layers(net, check=False).values():
            if not hasattr(layer, "sss_scale"):
                weight = trained_weight(layer)
                scale = nn.Parameter(weight.new_ones(weight.shape[0]))
                _attach_(layer, "sss_scale", scale, _scale_output)
        return net

    def scales(self, net: nn.Module) -> dict[str, nn.Parameter]:
        """The scales λ of each unit layer, by layer name.

        Raises:
            ValueError: a unit layer has none (``prepare_`` adds them).
        """
        layers = unit_layers(net)
        missing = [name for name, layer in layers.items() if not hasattr(layer, "sss_scale")]
        if missing:
            raise ValueError(
                f"Expected scales on every unit layer, got none on {missing}. Call "
                "prepare_(net) first: it adds them."
            )
        return {name: layer.get_parameter("sss_scale") for name, layer in layers.items()}

    def scores(self, net: nn.Module, data: Data | None) -> dict[str, Tensor]:
        layers = unit_layers(net)
        return {
            param_key(name): per_unit(layers[name], scale.detach().abs())
            for name, scale in self.scales(net).items()
        }

    def after_step(self, net: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        with torch.no_grad():
            for scale in self.scales(net).values():
                scale.copy_(soft_threshold(scale, learning_rate(optimizer, scale) * self.gamma))

    def finalize_(self, net: nn.Module) -> nn.Module:
        for layer in unit_layers(net, check=False).values():
            if hasattr(layer, "sss_scale"):
                fold_(layer, layer.get_parameter("sss_scale").detach())
                _detach_(layer, "sss_scale")
        return net
