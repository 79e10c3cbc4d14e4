"""Regularise while training, then prune: penalties and update rules that drive weights,
or whole neurons and filters, toward zero so that the final prune removes little.

Every method here acts during training (stage ``"during_training"``): the harness adds
``penalty(net)`` to the loss (per example; it multiplies it by the training-set size) or
calls ``after_step`` after each optimiser step, then prunes with the shared selector at
the target sparsity by the method's scores: the magnitude ``|θ|`` for weight methods,
the unit norm ``‖θ_g‖₂`` for unit methods. Penalties read each weight as the layer
computes with it, ``weight_orig · weight_mask`` once pruned, so pruned weights cost
nothing and get no gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from bayessparse.pruning.base import (
    Data,
    PruningMethod,
    check_option,
    leaf_name,
    learning_rate,
    param_key,
    prunable_layers,
    recompute_pruned_,
    unit_layers,
)
from bayessparse.pruning.magnitude import Magnitude
from bayessparse.pruning.registry import register
from bayessparse.pruning.structured import per_unit


def masked_weight(layer: nn.Module) -> Tensor:
    """The weight ``layer`` computes with, as a function of its parameter:
    ``weight_orig * weight_mask`` when pruned, else the weight itself. Unlike
    ``layer.weight``, which :mod:`torch.nn.utils.prune` recomputes only at each forward
    pass, it is never stale."""
    mask = getattr(layer, "weight_mask", None)
    if isinstance(mask, Tensor):
        return layer.get_parameter("weight_orig") * mask
    return layer.get_parameter("weight")


def unit_norms(layer: nn.Module) -> Tensor:
    """``‖θ_g‖₂`` of each output unit g of ``layer`` (a row of a Linear's weight, a
    filter of a Conv's)."""
    return torch.linalg.vector_norm(masked_weight(layer).flatten(1), dim=1)


def group_lasso(layer: nn.Module) -> Tensor:
    """``Σ_g √|g| ‖θ_g‖₂`` over the output units of ``layer``, |g| the weights of a unit."""
    weight = masked_weight(layer)
    return math.sqrt(weight[0].numel()) * unit_norms(layer).sum()


def decorrelation(weight: Tensor, relative_norm: float) -> Tensor:
    """``R_C = Σ_{i≠j} C_ij²`` of one layer, ``C_ij = ⟨w_i, w_j⟩ / (‖w_i‖ ‖w_j‖)`` the
    cosine between units i and j (rows of ``weight`` flattened).

    Only units of norm at least ``relative_norm`` times the layer's largest take part:
    the gradient of a unit's direction grows as 1/‖w‖, so the units group lasso is
    zeroing would otherwise get the largest pulls.

    Args:
        weight: the layer's weight, ``(out, ...)``.
        relative_norm: the cut, in [0, 1].

    Returns:
        A scalar, differentiable in ``weight``.
    """
    rows = weight.flatten(1)
    norms = torch.linalg.vector_norm(rows, dim=1)
    size = norms.detach()
    taking_part = (size > 0) & (size >= relative_norm * size.max())
    directions = rows[taking_part] / norms[taking_part, None]
    cosines = directions @ directions.T
    diagonal = torch.eye(len(cosines), dtype=torch.bool, device=cosines.device)
    return cosines.masked_fill(diagonal, 0.0).pow(2).sum()


def output_sensitivity(net: nn.Module, inputs: Tensor) -> dict[str, Tensor]:
    """The sensitivity of the net's outputs to each prunable weight,
    ``S(w) = (1/C) Σ_k |∂ȳ_k/∂w|``, keyed like ``state_dict``.

    ``ȳ`` is the mean over ``inputs`` of the C outputs the net returns (logits for a
    classifier), so the derivative is the batch's mean derivative; one backward pass per
    output, in eval mode (dropout off, BatchNorm on its running statistics, no update of
    them). Pruned layers are differentiated through their ``weight_orig``.

    Args:
        net: the network; its mode is restored afterwards.
        inputs: a batch of inputs.

    Returns:
        One tensor of the weight's shape per prunable layer.
    """
    layers = prunable_layers(net)
    leaves = [layer.get_parameter(leaf_name(layer)) for layer in layers.values()]
    was_training = net.training
    net.eval()
    try:
        with torch.enable_grad():
            outputs = net(inputs).mean(0).flatten()
            total = [torch.zeros_like(leaf) for leaf in leaves]
            for output in outputs:
                grads = torch.autograd.grad(output, leaves, retain_graph=True, allow_unused=True)
                for accumulated, grad in zip(total, grads, strict=True):
                    if grad is not None:  # a layer the output does not depend on
                        accumulated.add_(grad.abs())
    finally:
        net.train(was_training)
    return {param_key(name): s / len(outputs) for name, s in zip(layers, total, strict=True)}


def bounded_insensitivity(sensitivity: Tensor) -> Tensor:
    """``S̄ = (1 − S)·H(1 − S) = max(1 − S, 0)``: 1 for a weight the output ignores, 0 for
    one it depends on at rate 1 or more."""
    return (1.0 - sensitivity).clamp(min=0.0)


@register
class L1(Magnitude):
    """An L1 penalty ``λ Σ|θ|`` on the weights of the Linear and Conv layers while
    training (the lasso), then prune the smallest ``|θ|``.

    The penalty's gradient ``λ·sign(θ)`` pulls every weight toward zero at the same rate,
    so weights the loss does not hold up reach (about) zero. Han et al. compare L1 and L2
    regularisation before magnitude pruning: L1 leaves more weights near zero, so it
    loses less accuracy right after pruning and more after retraining.

    Args:
        l1: λ, per example. The default puts the penalty at 0.05 at a fresh
            LeNet-300-100 (Σ|θ| ≈ 5.1·10³), against a loss of 2.3; not tuned.

    References:
        Tibshirani. "Regression shrinkage and selection via the lasso". JRSS B 1996.
        Collins, Kohli. "Memory bounded deep convolutional networks". arXiv:1412.1442, 2014.
        Han, Pool, Tran, Dally. "Learning both weights and connections for efficient
        neural networks". NeurIPS 2015.
    """

    name = "l1"
    family = "regularisation"
    stage = "during_training"

    def __init__(self, l1: float = 1e-5, **options: Any) -> None:
        super().__init__(**options)
        check_option("l1", l1, zero=True)
        self.l1 = l1

    def __repr__(self) -> str:
        return f"{type(self).__name__}(l1={self.l1})"

    def penalty(self, net: nn.Module) -> Tensor:
        layers = prunable_layers(net).values()
        return self.l1 * torch.stack([masked_weight(m).abs().sum() for m in layers]).sum()


@register
class L2(Magnitude):
    """An L2 penalty ``(λ/2) Σ θ²`` on the weights of the Linear and Conv layers while
    training (weight decay, gradient ``λθ``), then prune the smallest ``|θ|``.

    Added to the loss, so that with Adam it is the coupled L2 penalty rather than
    decoupled weight decay. Han et al.'s choice for magnitude pruning followed by
    retraining.

    Args:
        l2: λ, per example; the default is the customary weight decay 5·10⁻⁴ (a penalty
            of 0.034 at a fresh LeNet-300-100, Σθ² ≈ 137).

    References:
        Krogh, Hertz. "A simple weight decay can improve generalization". NeurIPS 1991.
        Han, Pool, Tran, Dally. "Learning both weights and connections for efficient
        neural networks". NeurIPS 2015.
    """

    name = "l2"
    family = "regularisation"
    stage = "during_training"

    def __init__(self, l2: float = 5e-4, **options: Any) -> None:
        super().__init__(**options)
        check_option("l2", l2, zero=True)
        self.l2 = l2

    def __repr__(self) -> str:
        return f"{type(self).__name__}(l2={self.l2})"

    def penalty(self, net: nn.Module) -> Tensor:
        layers = prunable_layers(net).values()
        return 0.5 * self.l2 * torch.stack([masked_weight(m).pow(2).sum() for m in layers]).sum()


@register
class GroupLasso(PruningMethod):
    """Group lasso on the output units: ``λ Σ_g √|g| ‖θ_g‖₂`` over the neurons and filters
    of every Linear and Conv layer but the last, then prune the units of smallest
    ``‖θ_g‖₂``.

    A group is a unit's incoming weights (a row of a Linear's weight, a Conv's filter);
    the gradient ``λ √|g| θ_g / ‖θ_g‖₂`` pulls a whole unit toward zero at a constant
    rate, so units the loss does not need reach zero together. The weight √|g| is Yuan &
    Lin's; Wen et al. (structured sparsity learning) penalise filters, channels and
    shapes, of which this is the filter-wise (and neuron-wise) part.

    Args:
        group_lasso: λ, per example. The default puts the penalty at 0.06 at a fresh
            LeNet-300-100 (Σ_g √|g| ‖θ_g‖₂ ≈ 5.9·10³), against a loss of 2.3; not tuned.

    References:
        Yuan, Lin. "Model selection and estimation in regression with grouped variables".
        JRSS B 2006.
        Wen, Wu, Wang, Chen, Li. "Learning structured sparsity in deep neural networks".
        NeurIPS 2016.
    """

    name = "group_lasso"
    family = "regularisation"
    stage = "during_training"
    structure = "unit"

    def __init__(self, group_lasso: float = 1e-5, **options: Any) -> None:
        super().__init__(**options)
        check_option("group_lasso", group_lasso, zero=True)
        self.group_lasso = group_lasso

    def __repr__(self) -> str:
        return f"{type(self).__name__}(group_lasso={self.group_lasso})"

    def penalty(self, net: nn.Module) -> Tensor:
        layers = unit_layers(net).values()
        return self.group_lasso * torch.stack([group_lasso(layer) for layer in layers]).sum()

    def scores(self, net: nn.Module, data: Data | None) -> dict[str, Tensor]:
        return {
            param_key(name): per_unit(layer, unit_norms(layer).detach())
            for name, layer in unit_layers(net).items()
        }


@register
class Decorrelation(GroupLasso):
    """Group lasso plus a decorrelation penalty on each hidden layer's units:
    ``λ_g Σ_g √|g| ‖θ_g‖₂ + λ_c Σ_l R_C(W_l)``, ``R_C = Σ_{i≠j} C_ij²``, then prune the
    units of smallest ``‖θ_g‖₂``.

    ``C_ij`` is the cosine between units i and j of a layer (its filters' normalised Gram
    matrix, :func:`decorrelation`), over the units still in play: the paper computes the
    correlation through a sparse mask that leaves out the filters group lasso has
    removed; here a unit is left out once its norm falls below ``relative_norm`` times
    the layer's largest (a pruned unit, norm 0, always). Redundant units, which group
    lasso alone keeps alive together, are pushed apart, so that fewer are needed. The
    paper also starts from an orthogonal (SVD) initialisation; the harness's
    initialisation is kept here. The paper's exact normalisation of ``R_C`` could not be
    checked against its text; the sum of squared off-diagonal cosines is the usual form.

    Args:
        group_lasso: λ_g, per example (as :class:`GroupLasso`).
        decorrelation: λ_c, per example. At a fresh LeNet-300-100 ``Σ R_C`` is 148
            (random directions: ``C_ij² ≈ 1/fan_in``), so the default starts it at 0.015;
            not tuned.
        relative_norm: the cut on a unit's norm, relative to its layer's largest, in [0, 1].

    References:
        Zhu, Zhou, Li. "Improving deep neural network sparsity through decorrelation
        regularization". IJCAI 2018.
    """

    name = "decorrelation"

    def __init__(
        self,
        group_lasso: float = 1e-5,
        decorrelation: float = 1e-4,
        relative_norm: float = 1e-2,
        **options: Any,
    ) -> None:
        super().__init__(group_lasso, **options)
        check_option("decorrelation", decorrelation, zero=True)
        if not 0.0 <= relative_norm <= 1.0:
            raise ValueError(
                f"Expected relative_norm in [0, 1], got {relative_norm!r}. It is the share of "
                "its layer's largest norm below which a unit is left out of R_C."
            )
        self.decorrelation, self.relative_norm = decorrelation, relative_norm

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(group_lasso={self.group_lasso}, "
            f"decorrelation={self.decorrelation}, relative_norm={self.relative_norm})"
        )

    def penalty(self, net: nn.Module) -> Tensor:
        layers = unit_layers(net).values()
        correlation = torch.stack(
            [decorrelation(masked_weight(layer), self.relative_norm) for layer in layers]
        ).sum()
        return super().penalty(net) + self.decorrelation * correlation


# Attributes SensitivityDriven.prepare_ puts on the net: the hook and the batch it records.
_HOOK, _BATCH = "_sensitivity_hook", "_sensitivity_batch"


def _remember_batch(net: nn.Module, args: tuple[Any, ...]) -> None:
    # Training batches only: evaluation on held-out data must not drive the update.
    if net.training and args:
        setattr(net, _BATCH, args[0].detach())


@register
class SensitivityDriven(Magnitude):
    """Sensitivity-driven regularisation: after each optimiser step, shrink the weights the
    network's output is insensitive to, ``w ← w − η λ w S̄(w)``, then prune the smallest
    ``|θ|`` (one global threshold, the shared selector).

    The sensitivity of the output to a weight is ``S(w) = (1/C) Σ_k |∂y_k/∂w|`` over the C
    outputs, and ``S̄ = (1 − S)·H(1 − S)`` the bounded insensitivity (H the Heaviside
    step), so that a weight the output depends on at rate 1 or more is not shrunk at all
    (:func:`output_sensitivity`, :func:`bounded_insensitivity`). The paper's update is
    ``w_t = w_{t−1} − η ∂L/∂w_{t−1} − η λ w_{t−1} S̄(w_{t−1})`` with plain SGD; here the
    shrinking is a second step after the optimiser's (Adam's on the bench), with the
    learning rate η of the weight's parameter group.

    Approximations, for a cost of one forward and C backward passes per step: S is
    evaluated after the optimiser step, on the training batch that step used (recorded
    by a hook that ``prepare_`` puts on the net), as the batch-mean derivative of the
    outputs the net returns (the logits; the loss applies the softmax), in eval mode.
    Whether the paper differentiates the logits or the softmax probabilities could not
    be checked against its text here. The update acts on the weights of the Linear and
    Conv layers, not on biases, and throughout the harness's training phase, where the
    paper first trains to its accuracy, then sparsifies.

    Args:
        strength: λ. With Adam at η = 10⁻³ a weight the output ignores shrinks by
            ``e^{−ηλT}`` over T steps: the default 1 divides it by e every thousand
            steps, while the optimiser's steps (about η each) hold up the weights the
            loss needs; not tuned.

    References:
        Tartaglione, Lepsøy, Fiandrotti, Francini. "Learning sparse neural networks via
        sensitivity-driven regularization". NeurIPS 2018.
    """

    name = "sensitivity"
    family = "regularisation"
    stage = "during_training"

    def __init__(self, strength: float = 1.0, **options: Any) -> None:
        super().__init__(**options)
        check_option("strength", strength, zero=True)
        self.strength = strength

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strength={self.strength})"

    def prepare_(self, net: nn.Module) -> nn.Module:
        if not hasattr(net, _HOOK):
            setattr(net, _HOOK, net.register_forward_pre_hook(_remember_batch))
        return net

    def after_step(
        self, net: nn.Module, optimizer: torch.optim.Optimizer | None, step: int
    ) -> None:
        """Shrink each weight by ``η λ w S̄(w)``, S measured on the last training batch.

        Raises:
            RuntimeError: no training batch was seen (``prepare_`` not called first).
            ValueError: no torch optimizer trains the weights.
        """
        batch = getattr(net, _BATCH, None)
        if batch is None:
            raise RuntimeError(
                "SensitivityDriven.after_step found no training batch: call prepare_(net) "
                "before training, so that the batches the net trains on are recorded."
            )
        insensitivity = {
            key: bounded_insensitivity(s) for key, s in output_sensitivity(net, batch).items()
        }
        with torch.no_grad():
            for name, layer in prunable_layers(net).items():
                weight = layer.get_parameter(leaf_name(layer))
                rate = learning_rate(optimizer, weight) * self.strength
                weight.sub_(rate * weight * insensitivity[param_key(name)])
        recompute_pruned_(net)

    def finalize_(self, net: nn.Module) -> nn.Module:
        if hasattr(net, _HOOK):
            getattr(net, _HOOK).remove()
            delattr(net, _HOOK)
        if hasattr(net, _BATCH):
            delattr(net, _BATCH)
        return net
