"""Hard-concrete L0 gates on weights, input units or output channels (Louizos et al. 2018)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from bayessparse.distributions.hard_concrete import HardConcrete
from bayessparse.nn.base import SparseModule, convolutions, torch_layer_type

GATES = ("weight", "input", "output")
# The official code clamps log alpha to [log 1e-2, log 1e2] after every step: a gate can
# neither close nor open beyond the reach of the gradient, so it can always come back.
GATE_LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))


def l0_threshold(temperature: float, low: float, high: float) -> float:
    """The keep-probability cut equivalent to the paper's test rule ẑ > 0.

    ẑ = clamp(σ(log α)(ζ − γ) + γ, 0, 1) > 0 ⇔ log α > log(−γ/ζ) ⇔
    P(z ≠ 0) = σ(log α − β log(−γ/ζ)) > σ((1 − β) log(−γ/ζ)); 0.31018 at the defaults.
    """
    return 1.0 / (1.0 + math.exp(-(1.0 - temperature) * math.log(-low / high)))


class _L0Gated(SparseModule):
    r"""Hard-concrete gates z on groups of weights, trained with the expected-L0 penalty.

    The weight used is :math:`\theta \odot z`, with one gate per weight, per input unit
    (input channel for convolutions) or per output unit (output channel; the gate then
    scales the bias too, so that a closed channel outputs exactly 0 and can be removed).
    Training draws one gate sample per mini-batch, as the official code does; evaluation
    uses the paper's deterministic gate :math:`\hat z = \min(1, \max(0, \sigma(\log\alpha)
    (\zeta - \gamma) + \gamma))`, masked by ``keep_prob() > threshold``.

    :meth:`kl` is **not a KL divergence**: it is the expected-L0 surrogate of Louizos et al.
    (eqs. 3 and 9), :math:`\sum_j P(z_j \ne 0) \sum_{i \in j} (\lambda + \tfrac12 w_d
    \theta_i^2)`, in the same units as the un-normalised negative ELBO
    :math:`N \cdot \text{mean CE}`, so ``l0_lambda`` is the paper's :math:`\lambda N`
    (``l0_lambda=0.1`` is the paper's :math:`\lambda = 0.1/N`).

    ``log_alpha`` is the gate location: **higher means keep** (the opposite of sparse VD);
    threshold :meth:`keep_prob` instead.
    """

    default_threshold: float = l0_threshold(2.0 / 3.0, -0.1, 1.1)
    # Input and output gates are per unit; with gate="weight" the gates are per weight.
    per_weight_params: tuple[str, ...] = ()
    gate_log_alpha: nn.Parameter

    def _construct(
        self,
        *args: Any,
        gate: str = "weight",
        droprate_init: float = 0.5,
        l0_lambda: float = 1.0,
        weight_decay: float = 0.0,
        temperature: float = 2.0 / 3.0,
        low: float = -0.1,
        high: float = 1.1,
        **kwargs: Any,
    ) -> None:
        torch_layer_type(self).__init__(self, *args, **kwargs)
        if gate not in GATES:
            raise ValueError(f"Expected gate to be one of {GATES}, got {gate!r}.")
        if gate == "input" and getattr(self, "groups", 1) != 1:
            raise ValueError(
                f"gate='input' needs groups=1, got groups={self.groups!r}: grouped "
                "convolutions share weight columns across input channels. Use gate='output' "
                "or gate='weight'."
            )
        if not 0.0 < droprate_init < 1.0:
            raise ValueError(
                f"Expected droprate_init in (0, 1), got {droprate_init!r}. It is the initial "
                "probability of dropping a gate (the official code uses 0.5; 0.2 for inputs)."
            )
        for name, value in (("l0_lambda", l0_lambda), ("weight_decay", weight_decay)):
            if not value >= 0.0:
                raise ValueError(f"Expected {name} >= 0, got {value!r}.")
        # Validates temperature, low and high.
        HardConcrete(torch.zeros(()), temperature, low, high)
        self.gate, self.droprate_init = gate, float(droprate_init)
        self.l0_lambda, self.weight_decay = float(l0_lambda), float(weight_decay)
        self.temperature, self.low, self.high = float(temperature), float(low), float(high)
        self.default_threshold = l0_threshold(self.temperature, self.low, self.high)
        w = self.weight
        shape = {
            "weight": w.shape,
            "input": (1, w.shape[1]) + (1,) * (w.dim() - 2),
            "output": (w.shape[0],) + (1,) * (w.dim() - 1),
        }[gate]
        self.gate_log_alpha = nn.Parameter(torch.empty(shape, device=w.device, dtype=w.dtype))
        if gate == "weight":
            self.per_weight_params = ("gate_log_alpha",)
        self._finish_construction()

    def _reset_posterior(self) -> None:
        # log alpha ~ N(log(1 - p) - log p, 0.01^2): gates start open with probability 1 - p.
        mean = math.log(1.0 - self.droprate_init) - math.log(self.droprate_init)
        with torch.no_grad():
            self.gate_log_alpha.normal_(mean, 1e-2)

    def project_(self) -> None:
        """Clamp the gate locations to ``GATE_LOG_ALPHA_RANGE``, as the official code does."""
        with torch.no_grad():
            self.gate_log_alpha.clamp_(*GATE_LOG_ALPHA_RANGE)

    def _gates(self) -> HardConcrete:
        return HardConcrete(self.gate_log_alpha, self.temperature, self.low, self.high)

    @property
    def log_alpha(self) -> Tensor:
        """Gate locations, broadcastable to ``weight``. Higher means keep."""
        return self.gate_log_alpha

    def keep_prob(self) -> Tensor:
        """P(z ≠ 0) of each gate, broadcastable to ``weight``."""
        return self._gates().prob_nonzero()

    def kl(self) -> Tensor:
        """Expected-L0 surrogate (a penalty, not a KL): Σ_j P(z_j≠0) Σ_{i∈j} (λ + ½ wd θ_i²)."""
        keep, pruned = self.keep_prob(), self._prune_mask("weight")
        if self.weight_decay == 0.0 and pruned is None:
            group_size = self.weight.numel() // keep.numel()
            return self.l0_lambda * group_size * keep.sum()
        cost = self.l0_lambda + 0.5 * self.weight_decay * self.weight.square()
        if pruned is not None:
            cost = cost * pruned  # a pruned weight is zero whatever its gate: it costs nothing
        return (keep * cost).sum()

    def dense_weight(self) -> Tensor:
        """θ ⊙ ẑ, with the paper's deterministic test-time gate ẑ."""
        return self.weight * self._gates().deterministic_gate()

    def dense_bias(self) -> Tensor | None:
        bias = self.bias
        if bias is None or self.gate != "output":
            return bias
        return bias * self._gates().deterministic_gate().reshape(-1)

    def _bias_kept(self, threshold: float | None) -> Tensor | None:
        if self.bias is None or self.gate != "output":
            return None
        return self._kept(threshold).reshape(-1)

    def forward(self, input: Tensor) -> Tensor:
        x = input
        self._check_input(x)
        theta, bias = self.weight, self.bias
        gates = self._gates()
        # Training: one gate draw per mini-batch, shared by its examples. Eval: the masked
        # deterministic test gate.
        z = gates.rsample() if self.training else gates.deterministic_gate() * self._kept()
        if bias is not None and self.gate == "output":
            bias = bias * z.reshape(-1)
        return self._op(x, theta * z, bias)


class L0Linear(nn.Linear, _L0Gated):
    """``nn.Linear`` with hard-concrete L0 gates (a :class:`~pyro.nn.PyroModule`).

    Same constructor as :class:`torch.nn.Linear`, plus keyword-only options.

    Args:
        in_features, out_features, bias, device, dtype: as for :class:`torch.nn.Linear`.
        gate: ``"input"`` (the paper's ``L0Dense``: one gate per input unit, so a closed
            gate removes a neuron of the previous layer), ``"output"`` or ``"weight"``.
        droprate_init: initial probability that a gate is closed.
        l0_lambda: cost per kept weight in nats of the N-scaled ELBO (the paper's λN).
        weight_decay: gated L2 coefficient (the paper's eq. 9).
        temperature, low, high: hard-concrete β, γ, ζ (2/3, −0.1, 1.1).

    Example:
        >>> layer = L0Linear(784, 300)  # one gate per input unit
        >>> layer.keep_prob().shape
        torch.Size([1, 784])
        >>> round(layer.default_threshold, 4)  # P(z != 0) cut equal to the paper's z > 0
        0.3102

    References:
        Louizos, Welling, Kingma (2018), *Learning Sparse Neural Networks through L0
        Regularization*, ICLR.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        gate: str = "input",
        **options: Any,
    ) -> None:
        self._construct(in_features, out_features, bias, device, dtype, gate=gate, **options)

    reset_parameters = SparseModule.reset_parameters
    forward = _L0Gated.forward


L0Conv1d, L0Conv2d, L0Conv3d = convolutions(
    _L0Gated,
    L0Linear,
    "hard-concrete L0 gates (one per output channel: the paper's L0Conv2d)",
    gate="output",
)
LAYERS: tuple[type[SparseModule], ...] = (L0Linear, L0Conv1d, L0Conv2d, L0Conv3d)
