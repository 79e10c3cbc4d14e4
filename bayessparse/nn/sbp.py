r"""Structured Bayesian Pruning: truncated log-normal noise on each neuron or channel.

Neklyudov, Molchanov, Ashukha, Vetrov (2017), *Structured Bayesian Pruning via Log-Normal
Multiplicative Noise*, NeurIPS. Each group g (an input unit, or an output channel) is
multiplied by a noise variable :math:`\theta_g` with :math:`\log\theta_g \sim
\mathcal N(\mu_g, \sigma_g^2)` truncated to :math:`[a, b] = [-20, 0]`
(:class:`~bayessparse.distributions.TruncatedLogNormal`), against the log-uniform prior
truncated to the same interval; the weights are ordinary point estimates (no weight KL).
Training draws θ per example and group; evaluation uses :math:`\hat\theta = \mathbb E[\theta]`
and prunes the groups whose signal-to-noise ratio :math:`\mathbb E[\theta] /
\mathrm{std}[\theta]` is at most 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from bayessparse.distributions.truncated_log_normal import TruncatedLogNormal
from bayessparse.nn.base import SparseModule, convolutions, torch_layer_type

GROUPS = ("input", "output")
# The official code clips mu and log sigma to [-20, 5] (it does so in the forward pass;
# here project_() does it after every step).
PARAM_RANGE = (-20.0, 5.0)
# keep_prob = 1 / (1 + Var/E²) = SNR² / (1 + SNR²) > 1/2  <=>  SNR > 1, the paper's rule.
SBP_THRESHOLD = 0.5


class _StructuredBayesianPruning(SparseModule):
    r"""Truncated log-normal noise :math:`\theta_g` on each group (module docstring).

    With input groups the input is scaled, :math:`\mathrm{op}(x \odot \theta, W) + b`; with
    output groups the whole pre-activation is, :math:`\theta \odot (\mathrm{op}(x, W) + b)`,
    so that a pruned channel outputs exactly 0 and can be cut out (the official LeNet-5
    code adds the bias after the noise; scaling it keeps the library's rule that a pruned
    unit's bias is pruned with it). :meth:`dense_weight` is :math:`W \hat\theta` with
    :math:`\hat\theta = \mathbb E[\theta]`, and output groups scale the bias by it too.

    The mask currency: ``log_alpha`` is the noise ratio :math:`\log(\mathrm{Var}[\theta] /
    \mathbb E[\theta]^2) = -2\log\mathrm{SNR}` (higher means prune), and :meth:`keep_prob`
    is :math:`1/(1 + \alpha) = \mathrm{SNR}^2/(1 + \mathrm{SNR}^2)`, the group families'
    currency, so that the default threshold 1/2 is the paper's SNR > 1.

    :meth:`kl` is the closed-form KL of each group's noise to the truncated log-uniform
    prior, summed.
    """

    default_threshold: float = SBP_THRESHOLD
    # The noise is per unit; the weights are point estimates with no posterior of their own.
    per_weight_params: tuple[str, ...] = ()
    noise_mu: nn.Parameter
    noise_log_sigma: nn.Parameter

    def _construct(
        self,
        *args: Any,
        group: str,
        mu_init: float = 0.0,
        log_sigma_init: float = -5.0,
        log_low: float = -20.0,
        log_high: float = 0.0,
        **kwargs: Any,
    ) -> None:
        torch_layer_type(self).__init__(self, *args, **kwargs)
        if group not in GROUPS:
            raise ValueError(f"Expected group to be one of {GROUPS}, got {group!r}.")
        if group == "input" and getattr(self, "groups", 1) != 1:
            raise ValueError(
                f"group='input' needs groups=1, got groups={self.groups!r}: grouped "
                "convolutions share weight columns across input channels. Use group='output'."
            )
        low, high = PARAM_RANGE
        for name, value in (("mu_init", mu_init), ("log_sigma_init", log_sigma_init)):
            if not low <= value <= high:
                raise ValueError(
                    f"Expected {name} in [{low:g}, {high:g}] (the range project_() keeps it "
                    f"in), got {value!r}. The paper starts at mu=0, log sigma=-5."
                )
        if not (math.isfinite(log_low) and math.isfinite(log_high) and log_low < log_high):
            raise ValueError(
                f"Expected finite log_low < log_high (the bounds of log theta), got "
                f"log_low={log_low!r}, log_high={log_high!r}. The paper uses -20 and 0."
            )
        self.group = group
        self.mu_init, self.log_sigma_init = float(mu_init), float(log_sigma_init)
        self.log_low, self.log_high = float(log_low), float(log_high)
        g = self.weight.new_empty(self.num_groups)
        self.noise_mu = nn.Parameter(g.clone())
        self.noise_log_sigma = nn.Parameter(g.clone())
        self._finish_construction()

    def _reset_posterior(self) -> None:
        with torch.no_grad():
            self.noise_mu.fill_(self.mu_init)
            self.noise_log_sigma.fill_(self.log_sigma_init)

    def project_(self) -> None:
        """Clamp μ and log σ to ``PARAM_RANGE``, as the official code does."""
        with torch.no_grad():
            self.noise_mu.clamp_(*PARAM_RANGE)
            self.noise_log_sigma.clamp_(*PARAM_RANGE)

    # --- groups ----------------------------------------------------------------------------

    @property
    def num_groups(self) -> int:
        """Input units (input channels) or output units (output channels)."""
        return self.weight.shape[self._group_dim()]

    def _group_dim(self) -> int:
        return 1 if self.group == "input" else 0

    def _as_weight(self, per_group: Tensor) -> Tensor:
        """Per-group values of shape (G,), reshaped to broadcast against ``weight``."""
        shape = [1] * self.weight.dim()
        shape[self._group_dim()] = -1
        return per_group.reshape(shape)

    def _as_activation(self, theta: Tensor) -> Tensor:
        """Noise of shape (*batch, G) laid out along the channel axis of an activation."""
        return theta.reshape(theta.shape + (1,) * (self.weight.dim() - 2))

    def _batch_shape(self, x: Tensor) -> tuple[int, ...]:
        return tuple(x.shape[: -(self.weight.dim() - 1)])

    # --- the noise -------------------------------------------------------------------------

    def noise(self) -> TruncatedLogNormal:
        """The posterior of the groups' noise θ, batch shape (G,)."""
        return TruncatedLogNormal(
            self.noise_mu, self.noise_log_sigma.exp(), self.log_low, self.log_high
        )

    def signal_to_noise(self) -> Tensor:
        """E[θ] / std[θ] of each group, shape (G,): the paper prunes SNR ≤ 1."""
        return self.noise().signal_to_noise()

    @property
    def log_alpha(self) -> Tensor:
        """log(Var[θ]/E[θ]²) = −2 log SNR of each group, broadcastable to ``weight``.
        Higher means prune."""
        return self._as_weight(self.noise().log_noise_ratio())

    def keep_prob(self) -> Tensor:
        """1/(1 + Var[θ]/E[θ]²) = SNR²/(1 + SNR²), broadcastable to ``weight``."""
        return torch.sigmoid(-self.log_alpha)

    def kl(self) -> Tensor:
        """Σ_g KL(q(θ_g) ‖ log-U[e^a, e^b]), closed form; the weights have no KL."""
        return self.noise().kl_log_uniform().sum()

    def dense_weight(self) -> Tensor:
        """W θ̂, with θ̂ = E[θ] of each group."""
        return self.weight * self._as_weight(self.noise().mean)

    def dense_bias(self) -> Tensor | None:
        bias = self.bias
        if bias is None or self.group != "output":
            return bias
        return bias * self.noise().mean

    def _bias_kept(self, threshold: float | None) -> Tensor | None:
        if self.bias is None or self.group != "output":
            return None
        return self._kept(threshold).reshape(-1)

    def forward(self, input: Tensor) -> Tensor:
        x = input
        self._check_input(x)
        weight, bias = self.weight, self.bias
        if not self.training:
            theta = self.noise().mean * self._kept().reshape(-1).to(weight.dtype)
            if bias is not None and self.group == "output":
                bias = bias * theta
            return self._op(x, weight * self._as_weight(theta), bias)
        # One draw per example and group (the official code draws one per mini-batch).
        theta = self._as_activation(self.noise().rsample(self._batch_shape(x)))
        if self.group == "input":
            return self._op(x * theta, weight, bias)
        return self._op(x, weight, bias) * theta


class SBPLinear(nn.Linear, _StructuredBayesianPruning):
    """``nn.Linear`` with Structured Bayesian Pruning noise on each input unit.

    Same constructor as :class:`torch.nn.Linear`, plus keyword-only options.

    Args:
        in_features, out_features, bias, device, dtype: as for :class:`torch.nn.Linear`.
        group: ``"input"`` (default: a pruned group removes a neuron of the previous layer,
            as the paper's LeNet architectures count them) or ``"output"``.
        mu_init, log_sigma_init: initial μ and log σ of log θ (0 and −5, official).
        log_low, log_high: the truncation [a, b] of log θ (−20 and 0, official).

    Example:
        >>> layer = SBPLinear(784, 300)
        >>> layer.keep_prob().shape  # one score per input unit
        torch.Size([1, 784])
        >>> bool(layer.signal_to_noise().min() > 1)  # all kept at the start
        True

    References:
        Neklyudov, Molchanov, Ashukha, Vetrov (2017), *Structured Bayesian Pruning via
        Log-Normal Multiplicative Noise*, NeurIPS.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        group: str = "input",
        **options: Any,
    ) -> None:
        self._construct(in_features, out_features, bias, device, dtype, group=group, **options)

    reset_parameters = SparseModule.reset_parameters
    forward = _StructuredBayesianPruning.forward


SBPConv1d, SBPConv2d, SBPConv3d = convolutions(
    _StructuredBayesianPruning,
    SBPLinear,
    "Structured Bayesian Pruning noise on each output channel",
    group="output",
)
LAYERS: tuple[type[SparseModule], ...] = (SBPLinear, SBPConv1d, SBPConv2d, SBPConv3d)
