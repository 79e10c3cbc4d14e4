"""Magnitude pruning in its variants, and its control, random pruning.

One score, ``|θ|``, and the variants the literature built on it: one-shot or iterative,
after training or gradually during it (GMP), with the survivors' trained values
retained, rewound (the lottery ticket) or redrawn (:mod:`bayessparse.pruning.policies`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bayessparse.pruning.base import (
    Data,
    PruningMethod,
    apply_masks_,
    compute_masks,
    param_key,
    prunable_layers,
    trained_weight,
)
from bayessparse.pruning.registry import register
from bayessparse.sparsity import SCOPES, check_sparsity


@register
class Magnitude(PruningMethod):
    """Prune the weights of smallest magnitude, score ``|θ|``; keep training the survivors.

    One-shot from a trained net and fine-tuned with the trained values retained, as in
    "Learning both weights and connections for efficient neural networks".

    References:
        Han, Pool, Tran, Dally. NeurIPS 2015.
    """

    name = "magnitude"
    family = "magnitude"

    def scores(self, net: nn.Module, data: Data | None) -> dict[str, Tensor]:
        return {
            param_key(name): trained_weight(m).detach().abs()
            for name, m in prunable_layers(net).items()
        }


@register
class Random(PruningMethod):
    """Prune weights uniformly at random: the control every method must beat.

    Args:
        seed: seeds the scores, so that one seed gives one mask.
    """

    name = "random"
    family = "control"

    def __init__(self, seed: int = 0, **options: Any) -> None:
        super().__init__(**options)
        self.seed = seed

    def scores(self, net: nn.Module, data: Data | None) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        scores = {}
        for name, m in prunable_layers(net).items():
            weight = trained_weight(m)
            scores[param_key(name)] = torch.rand(weight.shape, generator=generator).to(
                weight.device
            )
        return scores


@register
class MagnitudeIterative(Magnitude):
    """Han et al.'s iterative magnitude pruning: prune, retrain, prune again.

    Each of ``rounds`` rounds prunes the smallest ``|θ|`` of the survivors to the round's
    target ``s_k = 1 − (1 − s)^(k/rounds)`` (the same fraction of the survivors every
    round: :func:`~bayessparse.pruning.policies.round_sparsities`) and retrains them from
    their trained values for its share of the fine-tuning budget. Five rounds, as
    :class:`LotteryTicketIterative`, so that the two differ by the policy only.

    References:
        Han, Pool, Tran, Dally. Learning both weights and connections for efficient
        neural networks. NeurIPS 2015.
    """

    name = "magnitude_iterative"
    rounds = 5


@register
class LotteryTicket(Magnitude):
    """The lottery ticket, one shot: prune the smallest ``|θ|`` of the trained net, then
    rewind the survivors to their values at initialisation θ0 (or at an early iterate θk,
    the snapshot the harness keeps) and train them again under the mask.

    References:
        Frankle, Carbin. The lottery ticket hypothesis: finding sparse, trainable neural
        networks. ICLR 2019.
        Frankle, Dziugaite, Roy, Carbin. Linear mode connectivity and the lottery ticket
        hypothesis. ICML 2020 (rewinding to θk).
    """

    name = "lottery"
    policy = "rewind"


@register
class LotteryTicketIterative(LotteryTicket):
    """The lottery ticket found by iterative magnitude pruning with rewinding.

    Each round prunes the same fraction p of the survivors by ``|θ|``, rewinds them and
    trains again; after 5 rounds the target s is reached, ``p = 1 − (1 − s)^(1/5)``.
    Frankle & Carbin take p = 20 % (10–20 % for convolutions), hence
    ``ln(1 − s)/ln 0.8`` rounds: 10 for s = 0.9, 21 for s = 0.99, each a full training.
    The harness splits one fine-tuning budget over the rounds, so their number trades the
    gentleness of each prune against the training after it: 5 rounds leave each a fifth
    of the budget and prune p = 37 % per round at s = 0.9 (60 % at s = 0.99), a
    deviation from the paper's rate forced by the equal budget.

    References:
        Frankle, Carbin. The lottery ticket hypothesis: finding sparse, trainable neural
        networks. ICLR 2019.
    """

    name = "lottery_iterative"
    rounds = 5


@register
class MagnitudeReinit(Magnitude):
    """Prune the smallest ``|θ|``, then train the pruned architecture from a fresh random
    initialisation: the control showing whether the trained or initial values matter,
    or only the architecture the mask leaves.

    References:
        Liu, Sun, Zhou, Huang, Darrell. Rethinking the value of network pruning. ICLR 2019.
    """

    name = "magnitude_reinit"
    policy = "reinit"


def cubic_sparsity(
    step: int,
    final_sparsity: float,
    initial_sparsity: float,
    begin_step: int,
    end_step: int,
    frequency: int,
) -> float:
    """The sparsity of Zhu & Gupta's gradual pruning schedule after optimiser step ``step``.

    ``s_t = s_f + (s_i − s_f)(1 − (t − t0)/(n Δt))³`` for ``t`` in ``{t0, t0 + Δt, …,
    t0 + n Δt}``, held between pruning steps: from ``s_i`` at ``t0 = begin_step``, quickly
    at first while many weights are redundant, slowly near ``s_f``, reached at
    ``t0 + n Δt = end_step`` and kept after. If ``end_step − begin_step`` is not a
    multiple of Δt, ``end_step`` is the last pruning step and the schedule's denominator
    (the paper's ``n Δt``), so that ``s_f`` is still reached.

    Args:
        step: the optimiser step t (0 for the first).
        final_sparsity: s_f, in [0, 1).
        initial_sparsity: s_i, in [0, s_f].
        begin_step: t0, the first pruning step; before it the sparsity is 0.
        end_step: the last pruning step, ``≥ begin_step``.
        frequency: Δt ≥ 1, steps between pruning steps.

    Returns:
        The target sparsity s_t.

    Raises:
        ValueError: values out of the ranges above.

    References:
        Zhu, Gupta. To prune, or not to prune: exploring the efficacy of pruning for model
        compression. ICLR workshop 2018 (arXiv:1710.01878, 2017).
    """
    if not 0.0 <= initial_sparsity <= final_sparsity < 1.0:
        raise ValueError(
            f"Expected 0 ≤ initial_sparsity ≤ final_sparsity < 1, got {initial_sparsity!r} "
            f"and {final_sparsity!r}. The schedule rises from the first to the second."
        )
    if not 0 <= begin_step <= end_step or frequency < 1:
        raise ValueError(
            f"Expected 0 ≤ begin_step ≤ end_step and frequency ≥ 1, got {begin_step!r}, "
            f"{end_step!r} and {frequency!r}."
        )
    if step < begin_step:
        return 0.0
    if step >= end_step:
        return final_sparsity
    last_pruning_step = begin_step + (step - begin_step) // frequency * frequency
    remaining = 1.0 - (last_pruning_step - begin_step) / (end_step - begin_step)
    return final_sparsity + (initial_sparsity - final_sparsity) * remaining**3


@register
class GradualMagnitude(Magnitude):
    """Gradual magnitude pruning (GMP): prune by ``|θ|`` while training, along a cubic
    schedule (:func:`cubic_sparsity`) from ``initial_sparsity`` to the target.

    Every Δt optimiser steps between ``begin`` and ``end`` (fractions of the training's
    steps) the smallest weights are masked to the schedule's sparsity; weights once
    pruned stay pruned, and training goes on after ``end`` at the final sparsity so the
    network recovers. At the end of training the target is already met, so the
    harness's final prune at that sparsity changes nothing.

    Args:
        initial_sparsity: s_i, the sparsity of the first pruning step, in [0, 1).
        begin: the fraction of the training's steps after which pruning starts.
        end: the fraction after which it stops, at the target sparsity; ``begin ≤ end ≤ 1``.
        frequency: Δt, optimiser steps between pruning steps (Zhu & Gupta use 100–1000).
        scope: ``"global"`` or ``"layer"`` (each layer to the schedule's sparsity, as in
            the paper): the scope the harness prunes with at the end, so that the final
            prune finds the target met.

    Raises:
        ValueError: an option out of range.

    References:
        Zhu, Gupta. To prune, or not to prune: exploring the efficacy of pruning for model
        compression. ICLR workshop 2018 (arXiv:1710.01878, 2017).
    """

    name = "gmp"
    stage = "during_training"

    def __init__(
        self,
        initial_sparsity: float = 0.0,
        begin: float = 0.0,
        end: float = 0.75,
        frequency: int = 100,
        scope: str = "global",
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.initial_sparsity = check_sparsity(initial_sparsity)
        if not 0.0 <= begin <= end <= 1.0:
            raise ValueError(
                f"Expected 0 ≤ begin ≤ end ≤ 1 (fractions of the training's steps), got "
                f"begin={begin!r} and end={end!r}. The default prunes over the first 75 %."
            )
        if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
            raise ValueError(f"Expected frequency to be an integer ≥ 1, got {frequency!r}.")
        if scope not in SCOPES:
            raise ValueError(f"Expected scope to be one of {SCOPES}, got {scope!r}.")
        self.begin, self.end, self.frequency = begin, end, frequency
        self.scope: str = scope
        self.final_sparsity: float | None = None  # set by start_
        self.begin_step = self.end_step = 0
        self.reached = 0.0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(initial_sparsity={self.initial_sparsity}, "
            f"begin={self.begin}, end={self.end}, frequency={self.frequency}, "
            f"scope={self.scope!r})"
        )

    def start_(self, net: nn.Module, sparsity: float, total_steps: int) -> None:
        """Plan the schedule of a training of ``total_steps`` steps toward ``sparsity``.

        Raises:
            ValueError: ``sparsity`` below ``initial_sparsity`` or not in [0, 1), or
                ``total_steps`` < 1.
        """
        final = check_sparsity(sparsity)
        if final < self.initial_sparsity:
            raise ValueError(
                f"Expected a target sparsity ≥ initial_sparsity={self.initial_sparsity}, got "
                f"{sparsity!r}. Lower initial_sparsity or raise the target."
            )
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"Expected total_steps to be an integer ≥ 1, got {total_steps!r}.")
        last = total_steps - 1  # steps are counted from 0
        self.final_sparsity = final
        self.begin_step = min(int(self.begin * total_steps), last)
        self.end_step = min(int(self.end * total_steps), last)
        self.reached = 0.0

    def after_step(
        self, net: nn.Module, optimizer: torch.optim.Optimizer | None, step: int
    ) -> None:
        """Prune to the schedule's sparsity at ``step`` when it rose since the last prune.

        Raises:
            RuntimeError: :meth:`start_` was not called first.
        """
        if self.final_sparsity is None:
            raise RuntimeError(
                "GradualMagnitude.after_step ran before start_(net, sparsity, total_steps): "
                "plan the schedule before training."
            )
        target = cubic_sparsity(
            step,
            self.final_sparsity,
            self.initial_sparsity,
            self.begin_step,
            self.end_step,
            self.frequency,
        )
        if target > self.reached:
            masks = compute_masks(net, self, target, scope=self.scope)
            with torch.no_grad():
                apply_masks_(net, masks)
            self.reached = target
