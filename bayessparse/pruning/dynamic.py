"""Dynamic sparse training: the mask changes while training, its sparsity does not.

The net is sparse from the first step: :meth:`DynamicSparse.start_` draws a random mask
at the target sparsity, shared between the layers uniformly or by Erdős–Rényi
(:func:`layer_counts`). While training, a method drops active weights and regrows as
many dormant ones (:func:`~bayessparse.pruning.base.set_masks_`: a regrown weight starts
at zero with a fresh optimiser state). The methods differ in what they drop (the smallest
``|θ|``, those under a threshold, those whose sign flips) and where they regrow (at
random, where the gradient is largest).

Scores are ``|θ|`` of the effective weight: dormant weights are 0 and pruned for good, so
the harness's final prune at the target sparsity finds it met and changes nothing.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bayessparse.pruning.base import (
    Data,
    PruningMethod,
    check_option,
    current_mask,
    learning_rate,
    param_key,
    prunable_layers,
    set_masks_,
    trained_weight,
)
from bayessparse.pruning.registry import register
from bayessparse.sparsity import check_sparsity

DISTRIBUTIONS = ("uniform", "er", "erk")

Masks = dict[str, Tensor]


def apportion(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights``, none above its cap.

    A share that reaches its cap is fixed there and what is left is shared again among
    the others, until no share exceeds its cap; the shares are then rounded down and the
    remainder given one by one in order of the largest fractions (Hamilton's method), so
    the counts sum to ``total`` exactly. Where every open weight is 0, the caps stand in.

    Args:
        total: the integer to split.
        weights: non-negative weights, one per part.
        caps: the largest count of each part.

    Returns:
        The counts, one per part.

    Raises:
        ValueError: ``total`` is negative or more than the caps hold.
    """
    if not 0 <= total <= sum(caps):
        raise ValueError(
            f"Expected a total between 0 and the sum of the caps {sum(caps)}, got {total!r}."
        )
    fixed: dict[int, int] = {}
    while True:
        open_parts = [i for i in range(len(caps)) if i not in fixed]
        left = total - sum(fixed.values())
        base = [weights[i] for i in open_parts]
        if sum(base) <= 0:
            base = [caps[i] for i in open_parts]
        norm = sum(base) or 1
        shares = {i: left * w / norm for i, w in zip(open_parts, base, strict=True)}
        full = [i for i in open_parts if shares[i] >= caps[i]]
        if not full:
            break
        fixed.update({i: caps[i] for i in full})
    counts = {**fixed, **{i: math.floor(share) for i, share in shares.items()}}
    by_fraction = sorted(shares, key=lambda i: (counts[i] - shares[i], i))
    for i in by_fraction[: total - sum(counts.values())]:
        counts[i] += 1
    return [counts[i] for i in range(len(caps))]


def density_ratio(shape: Sequence[int], distribution: str) -> float:
    """A layer's density relative to the others', before scaling to the target.

    ``"uniform"``: 1. ``"er"`` (Mocanu et al. 2018): ``(n_in + n_out)/(n_in·n_out)``
    with ``(n_out, n_in) = shape[:2]``. ``"erk"`` (Evci et al. 2020): the sum of every
    dimension over their product, ``(n_in + n_out + k_h + k_w)/(n_in·n_out·k_h·k_w)``
    for a convolution, the same as ER for a Linear layer.

    Raises:
        ValueError: an unknown distribution.
    """
    if distribution == "uniform":
        return 1.0
    if distribution == "er":
        return sum(shape[:2]) / math.prod(shape[:2])
    if distribution == "erk":
        return sum(shape) / math.prod(shape)
    raise ValueError(f"Expected distribution to be one of {DISTRIBUTIONS}, got {distribution!r}.")


def layer_counts(
    shapes: Sequence[Sequence[int]], sparsity: float, distribution: str = "erk"
) -> list[int]:
    """The number of active weights of each layer at ``sparsity`` over all of them.

    Layer ``l`` of ``n_l`` weights gets density ``d_l = min(1, ε·r_l)``, ``r_l`` its
    :func:`density_ratio`, where ε solves ``Σ d_l·n_l = N − round(s·N)``: layers whose
    density would pass 1 are made dense and ε is solved again over the others (the
    procedure of Evci et al.'s code); the counts ``d_l·n_l`` are rounded by
    :func:`apportion`, so that exactly ``round(s·N)`` weights are pruned.

    Args:
        shapes: the weight shapes, ``(out, in)`` or ``(out, in, k_h, k_w)``.
        sparsity: the overall sparsity s, in [0, 1).
        distribution: ``"uniform"``, ``"er"`` or ``"erk"``.

    Returns:
        The active counts, one per layer.

    Raises:
        ValueError: a sparsity outside [0, 1) or an unknown distribution.
    """
    sizes = [math.prod(shape) for shape in shapes]
    active = sum(sizes) - round(check_sparsity(sparsity) * sum(sizes))
    weights = [density_ratio(s, distribution) * n for s, n in zip(shapes, sizes, strict=True)]
    return apportion(active, weights, sizes)


def top_k_among(scores: Tensor, among: Tensor, k: int) -> Tensor:
    """A boolean mask of the ``k`` highest ``scores`` where ``among`` is true.

    Raises:
        ValueError: fewer than ``k`` positions to choose from.
    """
    if k > int(among.sum()):
        raise ValueError(f"Expected at most {int(among.sum())} to choose, got k={k}.")
    flat = scores.masked_fill(~among, -math.inf).flatten()
    chosen = torch.zeros_like(among).flatten()
    chosen[flat.topk(k).indices] = True
    return chosen.view_as(among)


def rewire_(
    net: nn.Module, kept: Masks, grown: Masks, optimizer: torch.optim.Optimizer | None
) -> None:
    """Drop the active weights outside ``kept``, then turn on ``grown``: every grown
    weight starts at zero with a fresh optimiser state, even one just dropped."""
    set_masks_(net, kept)
    set_masks_(net, {key: kept[key] | grown[key] for key in kept}, optimizer)


def masked_layers(net: nn.Module) -> dict[str, tuple[nn.Module, Tensor, Tensor]]:
    """Each layer's ``(layer, effective weight, mask)``, keyed like ``state_dict``.

    Raises:
        RuntimeError: a layer has no mask (``start_`` masks them all).
    """
    layers = {}
    for name, module in prunable_layers(net).items():
        mask = current_mask(module)
        if mask is None:
            raise RuntimeError(
                f"Expected every Linear and Conv layer masked, got none on {name!r}. Call "
                "start_(net, sparsity, total_steps) before training."
            )
        layers[param_key(name)] = (module, trained_weight(module).detach(), mask)
    return layers


class DynamicSparse(PruningMethod):
    """Base class of dynamic sparse training: a random sparse start, then a changing mask.

    :meth:`start_` masks every Linear and Conv layer at random, each with its
    :func:`layer_counts` share of the active weights; subclasses change the masks in
    :meth:`after_step`. Scores are ``|θ|``.

    Args:
        distribution: how the active weights are shared between the layers: ``"uniform"``
            (each layer at the target), ``"er"`` or ``"erk"`` (:func:`density_ratio`).
        seed: seeds the random masks, regrowth and noise.

    Raises:
        ValueError: an unknown distribution.
    """

    family = "dynamic"
    stage = "during_training"

    def __init__(self, distribution: str, seed: int = 0, **options: Any) -> None:
        super().__init__(**options)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"Expected distribution to be one of {DISTRIBUTIONS}, got {distribution!r}."
            )
        self.distribution, self.seed = distribution, seed
        self.generator: torch.Generator | None = None  # set by start_
        self.total_steps = 0

    def __repr__(self) -> str:
        names = list(inspect.signature(type(self).__init__).parameters)[1:-1]
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"

    def scores(self, net: nn.Module, data: Data | None) -> dict[str, Tensor]:
        return {
            param_key(name): trained_weight(m).detach().abs()
            for name, m in prunable_layers(net).items()
        }

    def start_(self, net: nn.Module, sparsity: float, total_steps: int) -> None:
        """Mask ``net`` at random at ``sparsity`` for a training of ``total_steps`` steps.

        Raises:
            ValueError: ``sparsity`` not in [0, 1), ``total_steps`` < 1, or no Linear or
                Conv layer in ``net``.
        """
        check_option("total_steps", total_steps, integer=True)
        layers = prunable_layers(net)
        if not layers:
            raise ValueError(
                f"Expected a network with Linear or Conv layers, got {type(net).__name__} "
                "with none: dynamic sparse training masks their weights."
            )
        shapes = [trained_weight(m).shape for m in layers.values()]
        counts = layer_counts(shapes, sparsity, self.distribution)
        device = trained_weight(next(iter(layers.values()))).device
        self.generator = torch.Generator(device=device).manual_seed(self.seed)
        masks = {
            param_key(name): self.random_among(
                torch.ones(shape, dtype=torch.bool, device=device), count
            )
            for name, shape, count in zip(layers, shapes, counts, strict=True)
        }
        set_masks_(net, masks)
        self.total_steps = total_steps

    def started_rng(self) -> torch.Generator:
        """The random generator that :meth:`start_` seeded.

        Raises:
            RuntimeError: :meth:`start_` was not called first.
        """
        if self.generator is None:
            raise RuntimeError(
                f"{type(self).__name__} ran before start_(net, sparsity, total_steps): call "
                "it before training."
            )
        return self.generator

    def uniform(self, shape: Sequence[int], device: torch.device) -> Tensor:
        """Uniform draws in [0, 1) from the method's generator (random scores)."""
        return torch.rand(tuple(shape), generator=self.started_rng(), device=device)

    def random_among(self, candidates: Tensor, count: int) -> Tensor:
        """A mask of ``count`` positions drawn uniformly among ``candidates``."""
        return top_k_among(self.uniform(candidates.shape, candidates.device), candidates, count)


class PeriodicRewiring(DynamicSparse):
    """Dynamic sparse training that changes the masks every ``frequency`` steps.

    After optimiser step t (counted from 0) the masks change when the steps done, t + 1,
    are a multiple of ``frequency`` and fewer than ``end·total_steps``: never after the
    last step, so that the last regrown weights get trained. A subclass decides what to
    keep and what to grow (:meth:`drop_and_grow`); :func:`rewire_` applies it.

    Args:
        distribution: the initial share of each layer (:class:`DynamicSparse`).
        frequency: optimiser steps between mask updates.
        end: the fraction of the training's steps after which the masks stay fixed, in
            (0, 1].
        seed: seeds the random masks and regrowth.

    Raises:
        ValueError: an option out of range.
    """

    def __init__(
        self, distribution: str, frequency: int, end: float, seed: int = 0, **options: Any
    ) -> None:
        super().__init__(distribution, seed, **options)
        check_option("frequency", frequency, integer=True)
        check_option("end", end)
        if end > 1:
            raise ValueError(f"Expected end in (0, 1], a fraction of the training, got {end!r}.")
        self.frequency, self.end = frequency, end

    def is_update(self, step: int) -> bool:
        """Whether the masks change after optimiser step ``step``."""
        done = step + 1
        return done % self.frequency == 0 and done < self.end * self.total_steps

    def after_step(
        self, net: nn.Module, optimizer: torch.optim.Optimizer | None, step: int
    ) -> None:
        """Drop and regrow weights at an update step (regrown ones at zero, their
        optimiser state reset).

        Raises:
            RuntimeError: :meth:`start_` was not called first.
        """
        self.started_rng()  # refuses to run before start_
        if self.is_update(step):
            kept, grown = self.drop_and_grow(net, step + 1)
            rewire_(net, kept, grown, optimizer)

    def drop_and_grow(self, net: nn.Module, done: int) -> tuple[Masks, Masks]:
        """The active weights to keep and the dormant ones to grow, after ``done`` steps,
        keyed like ``state_dict`` (``net`` is not changed)."""
        raise NotImplementedError


@register
class SET(PeriodicRewiring):
    """Sparse evolutionary training: an Erdős–Rényi sparse net whose connections evolve.

    Every ``frequency`` steps each layer drops the fraction ζ of its positive weights
    closest to zero and ζ of its negative ones closest to zero, ``⌊ζ·n₊⌋`` smallest of
    ``θ ≥ 0`` and ``⌊ζ·n₋⌋`` largest of ``θ < 0`` (each sign its own fraction, as the
    official code does, rather than ζ/2 of all; an active weight at exactly 0 counts as
    positive and goes first), then regrows as many uniformly at random among its dormant
    positions, at zero: each layer keeps its count. A weight just dropped may be drawn
    again and restarts at zero, as in the official code.

    The initial density of layer ``l`` is ``ε(n_in + n_out)/(n_in·n_out)`` with ε solved
    for the target sparsity (:func:`layer_counts`), where the paper fixes ε (e.g. 20) and
    lets the sparsity follow. The paper evolves the connections after each epoch;
    ``frequency`` counts optimiser steps, and its default 600 is one epoch of MNIST's
    60,000 training images at the bench's batch of 100.

    Args:
        zeta: ζ, the fraction of each sign's active weights replaced, in (0, 1).
        distribution: ``"er"`` (the paper), ``"erk"`` or ``"uniform"``.
        frequency: optimiser steps between updates.
        end: the fraction of training after which the masks stay fixed.
        seed: seeds the random masks and regrowth.

    Raises:
        ValueError: an option out of range.

    References:
        Mocanu, Mocanu, Stone, Nguyen, Gibescu, Liotta. Scalable training of artificial
        neural networks with adaptive sparse connectivity inspired by network science.
        Nature Communications 9, 2383 (2018).
    """

    name = "set"

    def __init__(
        self,
        zeta: float = 0.3,
        distribution: str = "er",
        frequency: int = 600,
        end: float = 1.0,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(distribution, frequency, end, seed, **options)
        if not 0 < zeta < 1:
            raise ValueError(f"Expected zeta in (0, 1), got {zeta!r}. The paper uses 0.3.")
        self.zeta = zeta

    def drop_and_grow(self, net: nn.Module, done: int) -> tuple[Masks, Masks]:
        kept, grown = {}, {}
        for key, (_, weight, active) in masked_layers(net).items():
            dropped = self.closest_to_zero(weight, active)
            kept[key] = active & ~dropped
            grown[key] = self.random_among(~kept[key], int(dropped.sum()))
        return kept, grown

    def closest_to_zero(self, weight: Tensor, active: Tensor) -> Tensor:
        """The ``⌊ζ·n₊⌋`` smallest active weights ≥ 0 and ``⌊ζ·n₋⌋`` largest < 0."""
        positive, negative = active & (weight >= 0), active & (weight < 0)
        smallest = top_k_among(-weight, positive, int(self.zeta * int(positive.sum())))
        largest = top_k_among(weight, negative, int(self.zeta * int(negative.sum())))
        return smallest | largest


def adapt_threshold(threshold: float, pruned: int, target: float, tolerance: float) -> float:
    """DSR's threshold for the next update: doubled if fewer than ``(1 − δ)·N_p`` weights
    were pruned, halved if more than ``(1 + δ)·N_p``, else kept."""
    if pruned < (1 - tolerance) * target:
        return 2 * threshold
    if pruned > (1 + tolerance) * target:
        return threshold / 2
    return threshold


@register
class DSR(PeriodicRewiring):
    """Dynamic sparse reparameterization: prune by one adaptive threshold, regrow where
    the survivors are.

    Every ``frequency`` steps: prune the active weights with ``|θ| < H`` in every layer,
    K in all; adapt H to bring K to the target ``N_p``: ``H ← 2H`` if ``K < (1 − δ)N_p``,
    ``H ← H/2`` if ``K > (1 + δ)N_p`` (:func:`adapt_threshold`); regrow K weights, layer
    ``l`` getting ``K·r_l / Σ r`` of them for its ``r_l`` surviving weights (rounded by
    :func:`apportion`, at most its dormant positions), uniformly at random among its
    dormant positions, at zero. The total count is constant; each layer's moves with
    its survivors.

    Defaults from the paper and its official code: H₀ = 0.001, δ = 0.1, ``N_p`` = 1 % of
    the prunable weights (the code's ``target_fraction_to_prune``, there of all the
    model's parameters), the uniform initial sparsity, every 100 steps (the paper's
    period for WRN-28-2 on CIFAR-10, where the code doubles it at epochs 40, 80 and 120)
    until 80 % of training (the code stops at epoch 160 of 200). Every Linear and Conv
    layer is sparse, where the official WRN-28-2 keeps its first convolution and last
    linear layer dense.

    Args:
        threshold: H₀, the initial pruning threshold on ``|θ|``.
        prune_fraction: ``N_p`` as a fraction of the prunable weights, in (0, 1).
        tolerance: δ, the relative tolerance around ``N_p``, in [0, 1).
        distribution: the initial share of each layer, ``"uniform"`` (the paper).
        frequency: optimiser steps between updates.
        end: the fraction of training after which the masks stay fixed.
        seed: seeds the random masks and regrowth.

    Raises:
        ValueError: an option out of range.

    References:
        Mostafa, Wang. Parameter efficient training of deep convolutional neural
        networks by dynamic sparse reparameterization. ICML 2019.
    """

    name = "dsr"

    def __init__(
        self,
        threshold: float = 1e-3,
        prune_fraction: float = 0.01,
        tolerance: float = 0.1,
        distribution: str = "uniform",
        frequency: int = 100,
        end: float = 0.8,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(distribution, frequency, end, seed, **options)
        check_option("threshold", threshold)
        if not 0 < prune_fraction < 1 or not 0 <= tolerance < 1:
            raise ValueError(
                f"Expected prune_fraction in (0, 1) and tolerance in [0, 1), got "
                f"{prune_fraction!r} and {tolerance!r}. The paper's are 0.01 and 0.1."
            )
        self.threshold, self.prune_fraction, self.tolerance = threshold, prune_fraction, tolerance
        self.current_threshold = threshold

    def start_(self, net: nn.Module, sparsity: float, total_steps: int) -> None:
        super().start_(net, sparsity, total_steps)
        self.current_threshold = self.threshold

    def drop_and_grow(self, net: nn.Module, done: int) -> tuple[Masks, Masks]:
        """Prune under H, reallocate the pruned count, and adapt H for the next update."""
        layers = masked_layers(net)
        kept = {
            k: active & (w.abs() >= self.current_threshold) for k, (_, w, active) in layers.items()
        }
        pruned = sum(int(layers[k][2].sum() - kept[k].sum()) for k in kept)
        survivors = [int(m.sum()) for m in kept.values()]
        dormant = [m.numel() - n for m, n in zip(kept.values(), survivors, strict=True)]
        counts = apportion(pruned, survivors, dormant)
        grown = {
            k: self.random_among(~m, count)
            for (k, m), count in zip(kept.items(), counts, strict=True)
        }
        total = sum(w.numel() for _, w, _ in layers.values())
        self.current_threshold = adapt_threshold(
            self.current_threshold, pruned, self.prune_fraction * total, self.tolerance
        )
        return kept, grown


def cosine_drop_fraction(step: int, alpha: float, end_step: int) -> float:
    """RigL's drop fraction after ``step`` steps: ``α/2·(1 + cos(π·t/T_end))``, from α
    at the start to 0 at ``T_end = end_step`` (and after).

    Raises:
        ValueError: ``end_step`` < 1.
    """
    check_option("end_step", end_step, integer=True)
    return alpha / 2 * (1 + math.cos(math.pi * min(step, end_step) / end_step))


@register
class RigL(PeriodicRewiring):
    """Rigging the lottery: drop the smallest weights, regrow where the gradient is largest.

    Every ΔT = ``frequency`` steps until ``T_end = end·T``, each layer drops
    ``⌊f(t)·n_l⌋`` of its ``n_l`` active weights, those of smallest ``|θ|``, with
    ``f(t) = α/2·(1 + cos(π·t/T_end))`` (:func:`cosine_drop_fraction`), and regrows as
    many among the positions dormant after the drop, those with the largest
    ``|∂L/∂θ|`` of the dense gradient, at zero with a fresh optimiser state: each layer
    keeps its count.

    The dense gradient is that of the current batch, as in the paper. Torch prune's
    ``weight_orig`` gets ``∂L/∂weight ⊙ mask``, zero at dormant positions, so
    :meth:`prepare_` hooks every Linear and Conv layer: after each forward pass it
    registers a hook on the effective weight ``weight_orig * weight_mask`` that keeps
    its gradient, dense, as backward computes it anyway (a reference, no extra pass);
    the update after a step uses the last one kept. :meth:`finalize_` removes the hooks.
    A weight dropped and regrown in one update restarts at zero, where the official code
    keeps its value.

    Args:
        alpha: α, the initial drop fraction, in (0, 1).
        distribution: ``"erk"`` (the paper's best), ``"er"`` or ``"uniform"``.
        frequency: ΔT, optimiser steps between updates (the paper's 100).
        end: T_end as a fraction of the training (the paper's 0.75).
        seed: seeds the random initial masks.

    Raises:
        ValueError: an option out of range.

    References:
        Evci, Gale, Menick, Castro, Elsen. Rigging the lottery: making all tickets
        winners. ICML 2020.
    """

    name = "rigl"

    def __init__(
        self,
        alpha: float = 0.3,
        distribution: str = "erk",
        frequency: int = 100,
        end: float = 0.75,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(distribution, frequency, end, seed, **options)
        if not 0 < alpha < 1:
            raise ValueError(f"Expected alpha in (0, 1), got {alpha!r}. The paper uses 0.3.")
        self.alpha = alpha
        self.hooks: dict[nn.Module, RemovableHandle] = {}
        self.dense_grads: dict[nn.Module, Tensor] = {}

    def prepare_(self, net: nn.Module) -> nn.Module:
        for module in prunable_layers(net).values():
            if module not in self.hooks:
                self.hooks[module] = module.register_forward_hook(self._keep_dense_grad)
        return net

    def _keep_dense_grad(self, module: nn.Module, inputs: Any, output: Any) -> None:
        weight = module.weight
        # A pruned layer's weight is recomputed at each forward: a fresh non-leaf tensor.
        if isinstance(weight, Tensor) and weight.requires_grad and not weight.is_leaf:

            def keep(grad: Tensor) -> None:
                self.dense_grads[module] = grad.detach()

            weight.register_hook(keep)

    def finalize_(self, net: nn.Module) -> nn.Module:
        for module in prunable_layers(net).values():
            if module in self.hooks:
                self.hooks.pop(module).remove()
            self.dense_grads.pop(module, None)
        return net

    def drop_and_grow(self, net: nn.Module, done: int) -> tuple[Masks, Masks]:
        fraction = cosine_drop_fraction(done, self.alpha, int(self.end * self.total_steps))
        kept, grown = {}, {}
        for key, (layer, weight, active) in masked_layers(net).items():
            count = int(fraction * int(active.sum()))
            kept[key] = active & ~top_k_among(-weight.abs(), active, count)
            grown[key] = top_k_among(self.dense_grad(layer).abs(), ~kept[key], count)
        return kept, grown

    def dense_grad(self, module: nn.Module) -> Tensor:
        """The gradient of the last backward pass w.r.t. the layer's effective weight.

        Raises:
            RuntimeError: none was kept (:meth:`prepare_` not called, or no backward).
        """
        if module not in self.dense_grads:
            raise RuntimeError(
                "Expected RigL's dense gradient of every layer, got none: call "
                "prepare_(net) before start_() and training, and update after a backward pass."
            )
        return self.dense_grads[module]


@register
class DeepR(DynamicSparse):
    """Deep rewiring: sign-constrained connections that go dormant when they cross zero,
    each replaced by a random dormant one.

    Connection k has a fixed sign ``s_k`` and a magnitude ``θ_k``, ``w_k = s_k·θ_k``,
    active while ``θ_k ≥ 0``. After each optimiser step (η its learning rate) every
    active magnitude gets the L1 term and noise,
    ``θ_k ← θ_k − ηα + √(2ηT)·ν_k``, ν_k ~ N(0, 1); the connections with ``θ_k < 0``
    become dormant and as many dormant connections of the same layer, drawn uniformly,
    become active at ``θ = 0`` (their optimiser state reset): each layer keeps its count.
    The optimiser's own step on the active weights is the gradient term
    ``−η ∂E/∂θ_k``.

    :meth:`prepare_` registers each layer's signs as a buffer ``deepr_sign``: the signs
    of the initial weights, random and symmetric (the official code draws them
    independently of the magnitudes; the distribution is the same), fixed for good, so
    a connection keeps its sign through every rewiring. :meth:`finalize_` removes the
    buffers. The defaults give each step the official MNIST script's L1 decrement and
    noise, ``ηα = 5·10⁻⁶`` and std ``√(2ηT) = 5·10⁻⁶`` (its α = 10⁻⁵ and T = 2.5·10⁻¹¹ at
    η = 0.5), at the pruning papers' SGD learning rate η = 0.1: α = 5·10⁻⁵ and
    T = 1.25·10⁻¹⁰. The script's α and T at η = 0.1 left steps five times smaller and
    LeNet-300-100 at 97.26 % accuracy at 98 % sparsity (2 seeds, 100 epochs); without
    L1 or noise, 95.06 %; with these defaults 97.71 % (97.81 / 97.60). The script sets each
    layer's connections by hand, 1 % - 3 % - 30 % of LeNet-300-100's: the Erdős–Rényi
    shares are near them at any target (1.5 % - 4.5 % - 37 % at 98 % sparsity), where a
    uniform share leaves the output layer 20 connections for 10 classes (25.6 % error
    after 40 epochs).

    Args:
        alpha: α ≥ 0, the L1 term on the magnitudes.
        temperature: T ≥ 0, the noise's temperature.
        distribution: the share of each layer, ``"er"`` (near the official script's),
            ``"erk"`` or ``"uniform"``.
        seed: seeds the random masks, rewiring and noise.

    Raises:
        ValueError: an option out of range.

    References:
        Bellec, Kappel, Maass, Legenstein. Deep rewiring: training very sparse deep
        networks. ICLR 2018.
    """

    name = "deepr"

    def __init__(
        self,
        alpha: float = 5e-5,
        temperature: float = 1.25e-10,
        distribution: str = "er",
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(distribution, seed, **options)
        check_option("alpha", alpha, zero=True)
        check_option("temperature", temperature, zero=True)
        self.alpha, self.temperature = alpha, temperature

    def prepare_(self, net: nn.Module) -> nn.Module:
        for module in prunable_layers(net).values():
            if not hasattr(module, "deepr_sign"):
                weight = trained_weight(module).detach()
                module.register_buffer("deepr_sign", torch.where(weight < 0, -1.0, 1.0).to(weight))
        return net

    def finalize_(self, net: nn.Module) -> nn.Module:
        for module in prunable_layers(net).values():
            if hasattr(module, "deepr_sign"):
                delattr(module, "deepr_sign")
        return net

    def after_step(
        self, net: nn.Module, optimizer: torch.optim.Optimizer | None, step: int
    ) -> None:
        """Apply the L1 term and noise to the active magnitudes, then rewire.

        Raises:
            ValueError: no optimizer (its learning rate scales the update).
            RuntimeError: :meth:`prepare_` or :meth:`start_` was not called first.
        """
        if optimizer is None:
            raise ValueError(
                "Expected the torch optimizer training the net, got None: DeepR's noise and "
                "L1 step scale with its learning rate. Train with a torch optimizer."
            )
        kept, grown = {}, {}
        with torch.no_grad():
            for key, (layer, _, active) in masked_layers(net).items():
                sign, orig = self.signs(layer), layer.get_parameter("weight_orig")
                lr = learning_rate(optimizer, orig)
                rng = self.started_rng()
                noise = torch.randn(
                    orig.shape, generator=rng, device=orig.device, dtype=orig.dtype
                )
                orig.add_(
                    (noise * math.sqrt(2 * lr * self.temperature) - lr * self.alpha * sign)
                    * active
                )
                kept[key] = active & (sign * orig >= 0)
                grown[key] = self.random_among(~kept[key], int((active & ~kept[key]).sum()))
        rewire_(net, kept, grown, optimizer)

    def signs(self, module: nn.Module) -> Tensor:
        """The fixed signs of a layer's connections.

        Raises:
            RuntimeError: :meth:`prepare_` did not register them.
        """
        sign = getattr(module, "deepr_sign", None)
        if not isinstance(sign, Tensor):
            raise RuntimeError(
                "Expected DeepR's signs on every layer, got none: call prepare_(net) first."
            )
        return sign
