"""Pruning at initialisation: SNIP, SNIP at an orthogonal initialisation, and GraSP.

Each method scores the weights once, on a few batches, before any training (stage
``"at_init"``); the survivors are then trained from the net's own initial values. SNIP
scores at a fresh, seeded draw of the weights, as its reference code does (it chooses the
mask at one variance-scaling draw and trains another): scoring leaves the net as it is,
so ``prepare_`` has nothing to do. Nets are scored in their current mode (train or eval).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayessparse.pruning.base import (
    Data,
    PruningMethod,
    check_option,
    current_mask,
    device_batches,
    leaf_name,
    param_key,
    prunable_layers,
    recompute_pruned_,
    require_data,
)
from bayessparse.pruning.registry import register

# Weight variance of each variance-scaling initialisation, from (fan_in, fan_out).
VARIANCE_SCALING: dict[str, Callable[[int, int], float]] = {
    # He et al. 2015, SNIP's "VS-H": keeps the variance of ReLU activations.
    "vs_h": lambda fan_in, fan_out: 2.0 / fan_in,
    # Glorot & Bengio 2010, SNIP's "VS-X": the mean of the forward and backward conditions.
    "vs_x": lambda fan_in, fan_out: 2.0 / (fan_in + fan_out),
    # LeCun: the default of TF's variance_scaling_initializer, which SNIP's code uses.
    "vs_l": lambda fan_in, fan_out: 1.0 / fan_in,
}

# Approximate isometry stops once a step lowers the gap by less than this fraction.
ISOMETRY_RTOL = 1e-6

Draw = Callable[[tuple[int, ...], torch.Generator, torch.dtype], Tensor]


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a Linear or Conv weight: its inputs and outputs per unit
    times the kernel size."""
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def variance_scaling(
    shape: tuple[int, ...], init: str, generator: torch.Generator, dtype: torch.dtype
) -> Tensor:
    """A weight drawn from ``N(0, σ²)`` with σ² = ``VARIANCE_SCALING[init](fan_in, fan_out)``."""
    std = math.sqrt(VARIANCE_SCALING[init](*fans(shape)))
    return torch.randn(shape, generator=generator, dtype=dtype) * std


def orthogonal(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """A weight whose flattened rows (``out``, ``in·kernel``) are orthonormal, or its
    columns when there are more rows (:func:`torch.nn.init.orthogonal_`, gain 1)."""
    return nn.init.orthogonal_(torch.empty(shape, dtype=dtype), generator=generator)


def initial_tensors(net: nn.Module, draw: Draw, seed: int) -> dict[str, Tensor]:
    """A seeded draw of every prunable weight and zero biases, keyed like ``state_dict``
    (``"0.weight_orig"`` for pruned layers); the net is not changed."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in prunable_layers(net).items():
        weight = getattr(module, leaf_name(module))
        value = draw(tuple(weight.shape), generator, weight.dtype)
        tensors[param_key(name, leaf_name(module))] = value.to(weight.device)
        if isinstance(module.bias, Tensor):
            tensors[param_key(name, leaf_name(module, "bias"))] = torch.zeros_like(module.bias)
    return tensors


def connection_sensitivity(
    net: nn.Module, x: Tensor, y: Tensor, tensors: dict[str, Tensor]
) -> dict[str, Tensor]:
    """SNIP's ``|θ ⊙ ∂L/∂θ|`` per prunable weight, with ``net``'s parameters replaced by
    ``tensors`` (:func:`initial_tensors`) and L the mean cross-entropy on ``(x, y)``.

    Weights pruned before score 0: the gradient reaches them through their mask.
    """
    layers = prunable_layers(net)
    leaves = {key: value.detach().requires_grad_() for key, value in tensors.items()}
    weights = [leaves[param_key(name, leaf_name(m))] for name, m in layers.items()]
    with torch.enable_grad():
        try:
            logits = torch.func.functional_call(net, leaves, (x,))
        finally:
            recompute_pruned_(net)
        grads = torch.autograd.grad(F.cross_entropy(logits, y), weights)
    return {
        param_key(name): (weight.detach() * grad).abs()
        for name, weight, grad in zip(layers, weights, grads, strict=True)
    }


@register
class SNIP(PruningMethod):
    """SNIP: prune the connections the loss is least sensitive to, at initialisation.

    The score of weight q is its connection sensitivity ``|θ_q · ∂L/∂θ_q|``, the magnitude
    of the derivative of the loss with respect to a multiplicative gate ``c_q`` on the
    weight at ``c = 1``; L is the mean cross-entropy on one batch. It is computed at a
    seeded variance-scaling draw of the weights, ``θ ~ N(0, σ²)`` (``init``: ``"vs_h"``
    σ² = 2/fan_in, He et al. 2015, the best of the paper's Table 3; ``"vs_x"``
    σ² = 2/(fan_in + fan_out), Glorot & Bengio 2010; ``"vs_l"`` σ² = 1/fan_in, the TF default
    of the reference code), with zero biases. Like the reference code, which chooses the
    mask at one variance-scaling draw and trains another, the net itself is not
    re-initialised: scoring leaves it as it is. Differences: the reference draws from a
    truncated normal and also draws (and prunes) the biases; here the draw is untruncated,
    biases are zero while scoring, and only weights are pruned. Normalising the scores by
    their sum, as the paper does, does not change their order and is left out.

    Args:
        batch_size: examples of ``data`` scored (the first ones); the paper uses one batch
            of 100.
        init: the variance scaling scored at: ``"vs_h"``, ``"vs_x"`` or ``"vs_l"``.
        seed: seeds the draw, so that one seed gives one mask.

    References:
        Lee, Ajanthan, Torr. "SNIP: Single-shot network pruning based on connection
        sensitivity". ICLR 2019.
    """

    name = "snip"
    family = "at_init"
    stage = "at_init"
    needs_data = True

    def __init__(
        self, batch_size: int = 100, init: str = "vs_h", seed: int = 0, **options: Any
    ) -> None:
        super().__init__(**options)
        check_option("batch_size", batch_size, integer=True)
        check_option("seed", seed, integer=True, zero=True)
        if init not in VARIANCE_SCALING:
            raise ValueError(
                f"Expected init to be one of {sorted(VARIANCE_SCALING)}, got {init!r}. "
                "'vs_h' is He's variance scaling, the paper's best."
            )
        self.batch_size, self.init, self.seed = batch_size, init, seed

    def initial_weights(self, net: nn.Module) -> dict[str, Tensor]:
        """The weights scored at, keyed like ``state_dict`` (biases: zero)."""

        def draw(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> Tensor:
            return variance_scaling(shape, self.init, generator, dtype)

        return initial_tensors(net, draw, self.seed)

    def scores(self, net: nn.Module, data: Data | None) -> dict[str, Tensor]:
        x, y = next(device_batches(net, require_data(self, data), self.batch_size, 1))
        return connection_sensitivity(net, x, y, self.initial_weights(net))


@register
class SNIPOrthogonal(PruningMethod):
    """SNIP at an orthogonal initialisation, then approximate isometry of the sparse net.

    Lee et al. (2020) explain pruning at initialisation by signal propagation: SNIP works
    best from a dynamically isometric start, and the pruned net should be made isometric
    again. Here the scores are SNIP's ``|θ_q · ∂L/∂θ_q|`` (:class:`SNIP`) at a seeded
    orthogonal draw (:func:`torch.nn.init.orthogonal_` on every layer, the convolutions'
    kernels flattened to ``(out, in·k·k)``, zero biases). Once the masks M are chosen,
    :meth:`update_` enforces approximate isometry (AI) on the net's kept weights, layer by
    layer: ``min_W ‖(M⊙W)(M⊙W)ᵀ − I‖²_F`` by gradient descent at ``isometry_lr``
    (gradient ``4·M ⊙ (VVᵀ − I)V``, V = M⊙W flattened to rows) for at most
    ``isometry_steps`` steps, the reference code's 10000, stopping once a step lowers the
    objective by less than a fraction :data:`ISOMETRY_RTOL` of it (a few hundred steps,
    seconds on LeNet-300-100). It needs no data and leaves pruned weights at zero.

    Differences from the reference code: its convolutions start from TF's block-orthogonal
    kernel (Xiao et al. 2018), not the flattened orthogonal draw; its AI minimises the
    Frobenius norm itself (same minimiser), whose gradient keeps unit size at the minimum,
    so plain gradient descent would not settle there, where the squared norm's does; and
    it enforces AI at the scored orthogonal draw, where here the mask is chosen at the
    draw and AI acts on the net's own weights (as SNIP's code trains another draw than it
    scores). AI acts only on layers whose mask changed, so pruning again at the same
    sparsity changes nothing.

    Args:
        batch_size: examples of ``data`` scored (the first ones).
        seed: seeds the orthogonal draw.
        isometry_steps: at most this many gradient steps of AI per layer (0: no AI).
        isometry_lr: their step size, the reference code's 0.1.

    References:
        Lee, Ajanthan, Gould, Torr. "A signal propagation perspective for pruning neural
        networks at initialization". ICLR 2020.
    """

    name = "snip_orthogonal"
    family = "at_init"
    stage = "at_init"
    needs_data = True

    def __init__(
        self,
        batch_size: int = 100,
        seed: int = 0,
        isometry_steps: int = 10000,
        isometry_lr: float = 0.1,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        check_option("batch_size", batch_size, integer=True)
        check_option("seed", seed, integer=True, zero=True)
        check_option("isometry_steps", isometry_steps, integer=True, zero=True)
        check_option("isometry_lr", isometry_lr)
        self.batch_size, self.seed = batch_size, seed
        self.isometry_steps, self.isometry_lr = isometry_steps, isometry_lr

    def initial_weights(self, net: nn.Module) -> dict[str, Tensor]:
        """The weights scored at, keyed like ``state_dict`` (biases: zero)."""
        return initial_tensors(net, orthogonal, self.seed)

    def scores(self, net: nn.Module, data: Data | None) -> dict[str, Tensor]:
        x, y = next(device_batches(net, require_data(self, data), self.batch_size, 1))
        return connection_sensitivity(net, x, y, self.initial_weights(net))

    def update_(self, net: nn.Module, masks: dict[str, Tensor], data: Data | None) -> None:
        for name, module in prunable_layers(net).items():
            mask, old = masks.get(param_key(name)), current_mask(module)
            if mask is None or (old is not None and torch.equal(old, mask)):
                continue
            weight = getattr(module, leaf_name(module))
            approximate_isometry_(weight, mask, self.isometry_steps, self.isometry_lr)


def isometry_gap(weight: Tensor) -> Tensor:
    """``‖WWᵀ − I‖²_F`` of a weight flattened to rows ``(out, in·kernel)``: 0 when its rows
    are orthonormal."""
    rows = weight.flatten(1)
    eye = torch.eye(rows.shape[0], dtype=rows.dtype, device=rows.device)
    return (rows @ rows.T - eye).square().sum()


def approximate_isometry_(weight: Tensor, mask: Tensor, steps: int, lr: float) -> None:
    """Gradient descent on ``‖(M⊙W)(M⊙W)ᵀ − I‖²_F`` over the kept entries of ``weight``,
    in place, for at most ``steps`` steps of size ``lr``; the pruned entries are left as
    they are.

    It stops at the first step that does not lower the objective by a fraction
    :data:`ISOMETRY_RTOL`, keeping the weights before it: converged (going on would only
    crawl through round-off and subnormal numbers), or overshot, which a kept row's
    singular value above ``sqrt(1 + 1/(2·lr))`` (2.4 at lr 0.1) does.
    """
    keep = mask.flatten(1).to(weight.dtype)
    rows = weight.detach().flatten(1) * keep
    eye = torch.eye(rows.shape[0], dtype=rows.dtype, device=rows.device)
    best, lowest = rows, math.inf
    for _ in range(steps):
        residual = rows @ rows.T - eye
        gap = float(residual.square().sum())
        if gap >= lowest * (1 - ISOMETRY_RTOL):
            rows = best
            break
        best, lowest = rows, gap
        rows = rows - lr * 4 * keep * (residual @ rows)
    with torch.no_grad():
        weight.copy_(torch.where(mask, rows.view_as(weight), weight))


@register
class GraSP(PruningMethod):
    """GraSP: prune the weights whose removal reduces the gradient flow least, at init.

    Removing weights δ = −θ_q changes the gradient norm ``gᵀg`` by about ``2δᵀHg``, so
    GraSP scores ``S(−θ) = −θ ⊙ Hg`` and removes the weights of highest S, which preserves
    (or increases) the gradient flow. This selector keeps the highest scores, so the score
    returned is ``−S = θ ⊙ Hg``. As in the official code, the logits are divided by a
    temperature T and, over batches b of the mean cross-entropy L_b,
    ``g = Σ_b ∇L_b`` (no graph) and ``Hg = Σ_b ∇(∇L_bᵀ g)`` by double backpropagation,
    with respect to the weights of the Linear and Conv layers (not the biases).

    Differences from the official code: it draws 25 examples of each class and scores
    them in two halves (``batch_size=125``, ``num_batches=2`` match that count on ten
    classes, from the first examples of ``data`` whatever their classes), and it scores a
    copy whose Linear layers are redrawn from Xavier normal (its nets start Linear layers
    at N(0, 0.01)); here the net is scored as it is.

    Args:
        batch_size: examples per batch.
        num_batches: batches scored (the first ones).
        temperature: T, the official 200.

    References:
        Wang, Zhang, Grosse. "Picking winning tickets before training by preserving
        gradient flow". ICLR 2020.
    """

    name = "grasp"
    family = "at_init"
    stage = "at_init"
    needs_data = True

    def __init__(
        self,
        batch_size: int = 125,
        num_batches: int = 2,
        temperature: float = 200.0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        check_option("batch_size", batch_size, integer=True)
        check_option("num_batches", num_batches, integer=True)
        check_option("temperature", temperature)
        self.batch_size, self.num_batches, self.temperature = batch_size, num_batches, temperature

    def scores(self, net: nn.Module, data: Data | None) -> dict[str, Tensor]:
        batches = list(
            device_batches(net, require_data(self, data), self.batch_size, self.num_batches)
        )
        layers = prunable_layers(net)
        weights = [getattr(m, leaf_name(m)) for m in layers.values()]
        with torch.enable_grad():
            gradient = _summed(
                torch.autograd.grad(self._loss(net, x, y), weights) for x, y in batches
            )
            product = _summed(
                _hessian_times(self._loss(net, x, y), weights, gradient) for x, y in batches
            )
        return {
            param_key(name): weight.detach() * hg
            for name, weight, hg in zip(layers, weights, product, strict=True)
        }

    def _loss(self, net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(net(x) / self.temperature, y)


def _hessian_times(loss: Tensor, weights: list[Tensor], vector: list[Tensor]) -> list[Tensor]:
    """``H v`` with H the Hessian of ``loss`` in ``weights``: the gradient of ``∇lossᵀ v``
    (``v`` held constant) by double backpropagation."""
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    inner = torch.stack([(g * v).sum() for g, v in zip(grads, vector, strict=True)]).sum()
    return list(torch.autograd.grad(inner, weights, allow_unused=True, materialize_grads=True))


def _summed(terms: Iterable[Sequence[Tensor]]) -> list[Tensor]:
    """The sum of lists of tensors, entry by entry."""
    totals: list[Tensor] = []
    for term in terms:
        totals = [t + u for t, u in zip(totals, term, strict=True)] if totals else list(term)
    return totals
