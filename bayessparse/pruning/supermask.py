"""The lottery ticket taken apart: supermasks learned on frozen random weights, the sign
and zero ablations of Zhou et al. (2019), and Paganini & Forde's (2020) grid of
iterative pruning variants.

:class:`Supermask` trains one score per weight instead of the weights. The ablations are
functions on a pruned net and the :func:`~bayessparse.pruning.policies.snapshot` of its
initial state: :func:`rewind_to_sign_` keeps only the signs of the initial weights,
:func:`zero_pruned_` freezes the pruned weights at their initial value or at zero by the
way they moved in training. :func:`paganini_forde_grid` names the registered methods of
the grid (importance measure × scope × rewind or reinitialise).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayessparse.pruning.base import (
    Data,
    PruningMethod,
    current_mask,
    leaf_name,
    param_key,
    prunable_layers,
    recompute_pruned_,
    trained_weight,
    unit_layers,
)
from bayessparse.pruning.magnitude import LotteryTicketIterative, Magnitude, Random
from bayessparse.pruning.policies import rewind_
from bayessparse.pruning.registry import register
from bayessparse.pruning.structured import FilterL1, per_unit

# What Supermask.prepare_ registers on each layer: the scores and the handle of the hook.
SCORE, _SCORE_HOOK = "supermask_score", "_supermask_hook"
# The buffer zero_pruned_ registers on each pruned layer: the frozen values.
FROZEN = "weight_frozen"
MOVES = ("toward", "away", "none")


def straight_through_mask(score: Tensor) -> Tensor:
    """A mask drawn from ``Bernoulli(σ(s))`` whose gradient is that of ``σ(s)``:
    ``m = b + σ(s) − sg(σ(s))`` with ``b`` the sample and ``sg`` stop-gradient, so that
    ``∂m/∂s = σ(s)(1 − σ(s))`` (the straight-through estimator of Bengio et al. 2013)."""
    prob = torch.sigmoid(score)
    # Bracketed so that the sample is exact: (p − sg(p)) is 0 in value, not b + p − p.
    return torch.bernoulli(prob.detach()) + (prob - prob.detach())


def _forward(layer: nn.Module, inputs: Tensor, weight: Tensor) -> Tensor:
    """``layer``'s output on ``inputs`` computed with ``weight`` in place of its own."""
    if isinstance(layer, nn.Linear):
        return F.linear(inputs, weight, layer.bias)
    assert isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    return layer._conv_forward(inputs, weight, layer.bias)  # padding modes included


def _masked_output(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    # The layer's own output is discarded: a forward hook cannot change the weight the
    # forward uses without replacing the parameter, which torch prune needs in place.
    score = layer.get_parameter(SCORE)
    mask = straight_through_mask(score) if layer.training else (score >= 0).to(score.dtype)
    return _forward(layer, inputs[0], trained_weight(layer) * mask)


def _own_parameters(layer: nn.Module) -> list[Tensor]:
    """The layer's weight and bias as stored (``weight_orig`` once pruned)."""
    names = [leaf_name(layer)] + ([leaf_name(layer, "bias")] if layer.bias is not None else [])
    return [layer.get_parameter(name) for name in names]


@register
class Supermask(PruningMethod):
    """Supermasks: keep the random initial weights frozen and learn which to keep, a score
    s per weight with keep probability ``σ(s)``; prune by ``σ(s)``.

    While training, each forward pass multiplies the weights by a mask drawn from
    ``Bernoulli(σ(s))``, whose gradient reaches s by the straight-through estimator
    (:func:`straight_through_mask`): ``∂L/∂s = (∂L/∂W' ⊙ W) σ(s)(1 − σ(s))`` with
    ``W' = W ⊙ m``. Weights and biases of the Linear and Conv layers do not train
    (``requires_grad`` off), as in the official code. In eval mode the mask is the
    deterministic ``σ(s) ≥ 1/2`` (the official code samples at test time too; its
    ``round_mask`` variant rounds): scores start at ``init_score`` = 0 (the official
    default), so a prepared net evaluates as the dense one until training moves them.

    ``prepare_`` registers the scores as ``layer.supermask_score`` and a forward hook that
    recomputes the layer's output with the masked weight (the layer's own output is
    computed and discarded: about one more forward pass per layer). The harness then
    prunes by the scores σ(s) at the target sparsity, and ``finalize_`` removes the
    scores and the hook and lets the weights train again: the net left is the frozen
    initial weights under the selected mask, which the harness fine-tunes (Zhou et al.
    evaluate it without training the weights).

    Args:
        init_score: the initial score s of every weight, a finite number.

    References:
        Zhou, Lan, Liu, Yosinski. "Deconstructing lottery tickets: zeros, signs, and the
        supermask". NeurIPS 2019.
        Bengio, Léonard, Courville. "Estimating or propagating gradients through
        stochastic neurons for conditional computation". arXiv:1308.3432, 2013.
    """

    name = "supermask"
    family = "lottery"
    stage = "during_training"

    def __init__(self, init_score: float = 0.0, **options: Any) -> None:
        super().__init__(**options)
        if isinstance(init_score, bool) or not isinstance(init_score, (int, float)):
            raise ValueError(f"Expected init_score to be a number, got {init_score!r}.")
        if not math.isfinite(init_score):
            raise ValueError(f"Expected a finite init_score, got {init_score!r}. Pass e.g. 0.")
        self.init_score = float(init_score)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(init_score={self.init_score})"

    def prepare_(self, net: nn.Module) -> nn.Module:
        for layer in prunable_layers(net).values():
            if hasattr(layer, SCORE):
                continue
            score = torch.full_like(trained_weight(layer).detach(), self.init_score)
            setattr(layer, SCORE, nn.Parameter(score))
            setattr(layer, _SCORE_HOOK, layer.register_forward_hook(_masked_output))
            for param in _own_parameters(layer):
                param.requires_grad_(False)
        return net

    def scores(self, net: nn.Module, data: Data | None) -> dict[str, Tensor]:
        """The keep probabilities ``σ(s)``, one per weight.

        Raises:
            ValueError: a layer has no scores (``prepare_`` adds them).
        """
        layers = prunable_layers(net)
        missing = [name for name, layer in layers.items() if not hasattr(layer, SCORE)]
        if missing:
            raise ValueError(
                f"Expected supermask scores on every Linear and Conv layer, got none on "
                f"{missing}. Call prepare_(net) first: it adds them."
            )
        return {
            param_key(name): torch.sigmoid(layer.get_parameter(SCORE).detach())
            for name, layer in layers.items()
        }

    def finalize_(self, net: nn.Module) -> nn.Module:
        for layer in prunable_layers(net).values():
            if not hasattr(layer, SCORE):
                continue
            getattr(layer, _SCORE_HOOK).remove()
            delattr(layer, _SCORE_HOOK)
            delattr(layer, SCORE)
            for param in _own_parameters(layer):
                param.requires_grad_(True)
        return net


def _kept(layer: nn.Module) -> Tensor:
    """The layer's weight mask, all true if it is not pruned."""
    mask = current_mask(layer)
    return torch.ones_like(trained_weight(layer), dtype=torch.bool) if mask is None else mask


def rewind_to_sign_(
    net: nn.Module, init: dict[str, Tensor], constant: bool = True, seed: int = 0
) -> None:
    """Rewind ``net`` to ``init``, then keep only the signs of the surviving weights'
    initial values: ``θ ← sign(θ₀)·σ_l`` (``constant``, the "signed constant"
    initialisation, σ_l the standard deviation of layer l's initial weights, all of them,
    as the official code's ``np.std``), or the survivors' initial magnitudes shuffled
    among them within each layer, ``θ ← sign(θ₀)·|θ₀|_π`` (the "signed reshuffle").

    Zhou et al. find that survivors keeping their initial signs train about as well as
    the lottery ticket itself, and far better than with random signs. Biases and other
    state are rewound to ``init``; masks are kept.

    Args:
        net: a pruned net (:mod:`torch.nn.utils.prune` format; unpruned layers count as
            all kept), changed in place.
        init: its :func:`~bayessparse.pruning.policies.snapshot` before training.
        constant: signed constant if true, signed reshuffle if false.
        seed: seeds the shuffle.

    Raises:
        ValueError: ``init`` is not a snapshot of this net (from
            :func:`~bayessparse.pruning.policies.rewind_`).

    References:
        Zhou, Lan, Liu, Yosinski. "Deconstructing lottery tickets: zeros, signs, and the
        supermask". NeurIPS 2019.
    """
    rewind_(net, init)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in prunable_layers(net).values():
            weight = layer.get_parameter(leaf_name(layer))
            kept = _kept(layer)
            if constant:
                weight[kept] = weight.sign()[kept] * weight.std(correction=0)
            else:
                survivors = weight[kept]
                order = torch.randperm(len(survivors), generator=generator).to(weight.device)
                weight[kept] = survivors.sign() * survivors.abs()[order]
    recompute_pruned_(net)


def frozen_values(initial: Tensor, trained: Tensor, kept: Tensor, moved: str) -> Tensor:
    """The value each pruned weight is frozen at in Zhou et al.'s "zeros" ablation, 0
    where kept.

    A pruned weight moved toward zero in training if ``|θ_T| < |θ₀|``, away if
    ``|θ_T| > |θ₀|``. With ``moved="toward"`` those that moved toward zero are 0 and the
    other pruned weights keep θ₀ (the official ``freeze_init_zero_mask``); ``"away"``
    the reverse (``freeze_init_zero_rev``); ``"none"`` freezes every pruned weight at θ₀
    (``freeze_init``). A weight that did not move keeps θ₀ in all three.

    Args:
        initial: θ₀. trained: θ_T. kept: the weight mask. All of one shape.
        moved: ``"toward"``, ``"away"`` or ``"none"``.

    Raises:
        ValueError: an unknown ``moved``.
    """
    if moved not in MOVES:
        raise ValueError(f"Expected moved to be one of {MOVES}, got {moved!r}.")
    toward, away = trained.abs() < initial.abs(), trained.abs() > initial.abs()
    zeroed = {"toward": toward, "away": away, "none": torch.zeros_like(kept)}[moved]
    return torch.where(~kept & ~zeroed, initial, torch.zeros_like(initial))


def _add_frozen(layer: nn.Module, inputs: Any) -> None:
    # Runs after torch prune's hook has set weight = weight_orig * weight_mask.
    layer.weight = trained_weight(layer) + layer.get_buffer(FROZEN)


def zero_pruned_(net: nn.Module, init: dict[str, Tensor], moved: str = "toward") -> None:
    """Zhou et al.'s "zeros" ablation: rewind the survivors of a pruned net to ``init`` and
    freeze each pruned weight at 0 or at its initial value by how it moved in training.

    ``moved="toward"`` zeroes the pruned weights that moved toward zero and freezes the
    others at θ₀; the paper reports that this trains about as well as the lottery ticket
    (all pruned weights 0), while freezing them all at θ₀ (``"none"``) does worse: what
    matters is setting to zero the weights training was taking there. ``"away"`` is the
    control.
    See :func:`frozen_values`. The trained values are read from the net's
    ``weight_orig`` (what :mod:`torch.nn.utils.prune` keeps under the mask), before
    rewinding.

    The frozen values are a buffer ``layer.weight_frozen`` (0 where kept) that a forward
    pre-hook adds to the masked weight, so masks still mark the pruned weights and the
    survivors alone train; the buffer appears in ``state_dict`` (so :func:`rewind_` no
    longer takes the net's snapshots). Layers without a mask are only rewound.

    Args:
        net: a trained, pruned net, changed in place.
        init: its :func:`~bayessparse.pruning.policies.snapshot` before training.
        moved: ``"toward"``, ``"away"`` or ``"none"``.

    Raises:
        ValueError: an unknown ``moved``, ``init`` not a snapshot of this net, or a net
            it was applied to already (its trained values are rewound).

    References:
        Zhou, Lan, Liu, Yosinski. "Deconstructing lottery tickets: zeros, signs, and the
        supermask". NeurIPS 2019.
    """
    if moved not in MOVES:
        raise ValueError(f"Expected moved to be one of {MOVES}, got {moved!r}.")
    if any(hasattr(layer, FROZEN) for layer in prunable_layers(net).values()):
        raise ValueError(
            "Expected a trained, pruned net, got one zero_pruned_ was applied to already: "
            "its trained values were rewound. Apply it once, right after pruning."
        )
    pruned = {
        name: (layer, layer.get_parameter("weight_orig").detach().clone())
        for name, layer in prunable_layers(net).items()
        if current_mask(layer) is not None
    }
    rewind_(net, init)
    for name, (layer, trained) in pruned.items():
        initial = init[param_key(name)].to(trained.device)
        layer.register_buffer(FROZEN, frozen_values(initial, trained, _kept(layer), moved))
        layer.register_forward_pre_hook(_add_frozen)
    recompute_pruned_(net)


@register
class FilterL2(FilterL1):
    """Prune the filters (output channels) and neurons of smallest L2 norm, score
    ``‖W_j‖₂`` over unit j's weights, from a trained net; fine-tune the survivors.

    :func:`torch.nn.utils.prune.ln_structured` with n = 2 over the output dimension, one
    of the structured measures Paganini & Forde compare with Li et al.'s L1 norm
    (:class:`~bayessparse.pruning.FilterL1`).

    References:
        Paganini, Forde. "On iterative neural network pruning, reinitialization, and the
        similarity of masks". ICLR 2020 workshop (arXiv:2001.05050).
    """

    name = "filter_l2"

    def scores(self, net: nn.Module, data: Data | None) -> dict[str, Tensor]:
        return {
            param_key(name): per_unit(
                layer, torch.linalg.vector_norm(trained_weight(layer).detach().flatten(1), dim=1)
            )
            for name, layer in unit_layers(net).items()
        }


@register
class RandomUnit(Random):
    """Prune whole neurons and filters uniformly at random: the control of the structured
    methods (``torch.nn.utils.prune.random_structured``).

    Args:
        seed: seeds the scores, so that one seed gives one mask.
    """

    name = "random_unit"
    structure = "unit"

    def scores(self, net: nn.Module, data: Data | None) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        scores = {}
        for name, layer in unit_layers(net).items():
            weight = trained_weight(layer)
            draw = torch.rand(weight.shape[0], generator=generator).to(weight.device)
            scores[param_key(name)] = per_unit(layer, draw)
        return scores


# Paganini & Forde's importance measures: (name, method, scope). Structured measures and
# random pruning rank within each layer, as torch prune's ln_structured and
# random_unstructured do; magnitude comes in both scopes.
PAGANINI_FORDE_MEASURES: tuple[tuple[str, type[PruningMethod], str], ...] = (
    ("magnitude_global", Magnitude, "global"),
    ("magnitude_local", Magnitude, "layer"),
    ("random", Random, "layer"),
    ("filter_l1", FilterL1, "layer"),
    ("filter_l2", FilterL2, "layer"),
    ("random_unit", RandomUnit, "layer"),
)
PAGANINI_FORDE_POLICIES = ("rewind", "reinit")
# Cells of the grid that a method registered elsewhere already is.
_REGISTERED_CELLS: dict[str, type[PruningMethod]] = {
    "magnitude_global_rewind": LotteryTicketIterative
}


def _grid_variant(measure: str, base: type[PruningMethod], scope: str, policy: str) -> str:
    """Register the iterative variant of ``base`` at ``scope`` and ``policy``; its name."""
    name = f"{measure}_{policy}"
    if name in _REGISTERED_CELLS:
        return _REGISTERED_CELLS[name].name
    ranking = "one ranking for the whole net" if scope == "global" else "a ranking per layer"
    survivors = {"rewind": "rewound to their initial values", "reinit": "re-initialised"}
    doc = (
        f"Paganini & Forde's grid: {base.name!r} scores, {ranking}, 5 rounds of pruning, "
        f"the survivors {survivors[policy]} after each.\n\n"
        "    ``scope`` is the scope to prune with (the harness ranks weight methods\n"
        "    globally and unit methods per layer unless it reads it).\n\n"
        "    References:\n"
        "        Paganini, Forde. On iterative neural network pruning, reinitialization, and\n"
        "        the similarity of masks. ICLR 2020 workshop (arXiv:2001.05050).\n"
    )
    attributes = {
        "name": name,
        "scope": scope,
        "policy": policy,
        "rounds": LotteryTicketIterative.rounds,
        "__doc__": doc,
        "__module__": __name__,
    }
    class_name = "".join(part.title() for part in name.split("_"))
    register(cast(type[PruningMethod], type(class_name, (base,), attributes)))
    return name


_GRID = [
    _grid_variant(measure, base, scope, policy)
    for measure, base, scope in PAGANINI_FORDE_MEASURES
    for policy in PAGANINI_FORDE_POLICIES
]


def paganini_forde_grid() -> list[str]:
    """The registered methods of Paganini & Forde's grid, measure by measure, each
    rewound then re-initialised.

    Importance measure (magnitude, random, structured L1 and L2 norm, random structured)
    × scope (global or per layer, for magnitude) × survivors rewound to θ₀ (the lottery
    ticket) or re-initialised, all iterative: 5 rounds, each pruning the same share of
    the survivors (they prune 20 % per round until the target; the harness shares one
    budget among the rounds, as for
    :class:`~bayessparse.pruning.LotteryTicketIterative`, which is the global-magnitude,
    rewound cell). Each variant's ``scope`` attribute is the scope to prune with.

    Returns:
        Method names for ``python -m bayessparse bench --methods``.

    References:
        Paganini, Forde. "On iterative neural network pruning, reinitialization, and the
        similarity of masks". ICLR 2020 workshop (arXiv:2001.05050).
        Paganini, Forde. "Streamlining tensor and network pruning in PyTorch".
        arXiv:2004.13770, 2020.
    """
    return list(_GRID)
