"""An exponential moving average of a network's parameters (Polyak averaging).

The official L0 code trains its MLP with one (``beta_ema`` 0.999) and evaluates the
averaged parameters; the training loop keeps one when ``train(..., ema=decay)`` asks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def check_decay(decay: Any) -> float | None:
    """``decay`` as a float in (0, 1), or ``None`` (no averaging)."""
    if decay is None:
        return None
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
        raise ValueError(
            f"Expected the parameter average's decay in (0, 1), got {decay!r}; the official "
            "L0 code uses 0.999."
        )
    return float(decay)


class ParameterAverage:
    """``average ← decay · average + (1 − decay) · parameter`` after every step.

    The average starts at the parameters' values when it is made (as
    :class:`torch.optim.swa_utils.AveragedModel` does on its first update), so it needs
    no bias correction. Buffers (e.g. pruning masks) are not averaged: they are the
    network's.
    """

    def __init__(self, net: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = list(net.parameters())
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged parameters in the network for the block, the trained ones after."""
        trained = [p.detach().clone() for p in self.params]
        self.apply_()
        try:
            yield
        finally:
            _copy_(self.params, trained)

    def apply_(self) -> None:
        """Put the averaged parameters in the network, for good."""
        _copy_(self.params, self.average)

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average}  # the decay is a setting, checked on resume

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _copy_(self.average, state["average"])


@torch.no_grad()
def _copy_(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    moved = [s.to(t.device) for t, s in zip(targets, sources, strict=True)]
    torch._foreach_copy_(list(targets), moved)
