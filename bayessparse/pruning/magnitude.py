"""Magnitude pruning and its control, random pruning."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bayessparse.pruning.base import (
    Data,
    PruningMethod,
    param_key,
    prunable_layers,
    trained_weight,
)
from bayessparse.pruning.registry import register


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
