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
    """The exponential average of the parameters after each step, bias-corrected as the
    official L0 code's (and Adam's moments): after step ``t``,
    ``sum_i (1 − decay) · decay^(t−i) · parameter_i / (1 − decay^t)``.

    The initial parameters carry no weight, so a short run's average is of its trained
    parameters, not mostly of its initialisation (an average started at the initial
    values keeps ``decay^t`` of them: 79 % after 24 steps at 0.99). Computed as a running
    average whose step ``t`` moves ``(1 − decay) / (1 − decay^t)`` of the way to the
    parameters. Buffers (e.g. pruning masks) are not averaged: they are the network's.
    """

    def __init__(self, net: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = list(net.parameters())
        self.average = [p.detach().clone() for p in self.params]
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        weight = (1.0 - self.decay) / (1.0 - self.decay**self.steps)
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], weight)

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
        return {"average": self.average, "steps": self.steps}  # decay: a checked setting

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _copy_(self.average, state["average"])
        self.steps = state["steps"]


@torch.no_grad()
def _copy_(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    moved = [s.to(t.device) for t, s in zip(targets, sources, strict=True)]
    torch._foreach_copy_(list(targets), moved)
