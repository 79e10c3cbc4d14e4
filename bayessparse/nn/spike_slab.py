r"""Relaxed spike-and-slab group layers.

Each group g (an input unit or an output channel) has an inclusion variable
:math:`z_g \in \{0, 1\}` with prior Bernoulli(π), and its weights have the slab prior
:math:`\mathcal N(0, s^2)` when included. The variational posterior is
:math:`q(z_g) = \mathrm{Bernoulli}(p_g)` with :math:`q(\tilde w \mid z_g = 1) =
\mathcal N(\theta, \sigma^2)` and :math:`q(\tilde w \mid z_g = 0)` equal to the prior
(Titsias and Lázaro-Gredilla 2011), so that

.. math:: \mathrm{KL} = \sum_g \mathrm{KL}(\mathrm{Bern}(p_g) \,\|\, \mathrm{Bern}(\pi))
          + p_g \sum_{i \in g} \mathrm{KL}(\mathcal N(\theta_i, \sigma_i^2) \,\|\,
          \mathcal N(0, s^2)).

Training relaxes :math:`z` to a binary-concrete sample (Maddison et al. 2017; Jang et al.
2017), one per example, so that gradients reach :math:`p`; evaluation keeps the groups with
:math:`p_g > 1/2` (the median probability model) at their slab mean :math:`\theta`.
Monte Carlo prediction (:func:`bayessparse.predict`) samples :math:`z_g \sim
\mathrm{Bernoulli}(p_g)` itself.
"""

from __future__ import annotations

import math
from typing import Any

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayessparse.nn.base import SparseModule, convolutions
from bayessparse.nn.group import _GroupScaled


class _SpikeSlab(_GroupScaled):
    """Relaxed spike-and-slab maths shared by the linear and conv layers (module docstring).

    ``log_alpha`` is the log-odds of exclusion, :math:`\\log((1 - p) / p)` (higher means
    prune), so that ``keep_prob()`` is the inclusion probability :math:`p` and the default
    threshold 0.5 keeps the groups more likely in than out.
    """

    default_threshold: float = 0.5
    inclusion_logit: nn.Parameter

    def _construct(
        self,
        *args: Any,
        group: str,
        prior_inclusion: float = 0.5,
        slab_scale: float = 1.0,
        inclusion_init: float = 0.9,
        temperature: float = 2.0 / 3.0,
        log_sigma2_init: float = -3.0,
        **kwargs: Any,
    ) -> None:
        # An included group pays its slab KL (excluded ones fall back to the prior); at
        # the BC layers' log sigma² = -9 that is 4 nats per weight, enough to switch groups
        # off before the data speak, so the slab starts wider.
        self._construct_groups(*args, group=group, log_sigma2_init=log_sigma2_init, **kwargs)
        for name, value in (
            ("prior_inclusion", prior_inclusion),
            ("inclusion_init", inclusion_init),
        ):
            if not 0.0 < value < 1.0:
                raise ValueError(f"Expected {name} in (0, 1), got {value!r}.")
        for name, value in (("slab_scale", slab_scale), ("temperature", temperature)):
            if not value > 0.0:
                raise ValueError(f"Expected {name} > 0, got {value!r}.")
        self.prior_inclusion, self.slab_scale = float(prior_inclusion), float(slab_scale)
        self.inclusion_init, self.temperature = float(inclusion_init), float(temperature)
        self.inclusion_logit = nn.Parameter(self.weight.new_empty(self.num_groups))
        self._finish_construction()

    def _reset_scales(self) -> None:
        with torch.no_grad():
            self.inclusion_logit.fill_(math.log(self.inclusion_init / (1 - self.inclusion_init)))

    def _group_log_alpha(self) -> Tensor:
        return -self.inclusion_logit

    def _scale_estimate(self) -> Tensor:
        return torch.ones_like(self.inclusion_logit)

    def _scale_sample(self, batch_shape: tuple[int, ...]) -> Tensor:
        logits = self.inclusion_logit.expand(batch_shape + self.inclusion_logit.shape)
        if self._predicting:
            # Prediction samples the posterior q(z) = Bernoulli(p) itself: the relaxation
            # only serves training gradients.
            return torch.bernoulli(torch.sigmoid(logits))
        temperature = logits.new_tensor(self.temperature)
        return dist.RelaxedBernoulli(temperature, logits=logits).rsample()

    def kl(self) -> Tensor:
        """KL(q(z) ‖ Bern(π)) + Σ_g p_g KL(q(w̃_g) ‖ N(0, s²)) (module docstring)."""
        logit = self.inclusion_logit
        p = torch.sigmoid(logit)
        log_p, log_q = F.logsigmoid(logit), F.logsigmoid(-logit)
        pi = self.prior_inclusion
        gate_kl = p * (log_p - math.log(pi)) + (1 - p) * (log_q - math.log(1 - pi))
        theta, log_sigma2 = self.weight, self.weight_log_sigma2
        s2 = self.slab_scale**2
        slab_kl = 0.5 * ((theta.square() + log_sigma2.exp()) / s2 - 1 - log_sigma2 + math.log(s2))
        pruned = self._prune_mask("weight")
        if pruned is not None:
            slab_kl = slab_kl * pruned
        other = [d for d in range(theta.dim()) if d != self._group_dim()]
        return gate_kl.sum() + (p * slab_kl.sum(other)).sum()


class SpikeSlabLinear(nn.Linear, _SpikeSlab):
    """``nn.Linear`` with a relaxed spike-and-slab prior on each input unit's weights.

    Same constructor as :class:`torch.nn.Linear`, plus keyword-only options.

    Args:
        in_features, out_features, bias, device, dtype: as for :class:`torch.nn.Linear`.
        group: ``"input"`` (default) or ``"output"``.
        prior_inclusion: π, the prior probability that a group is in.
        slab_scale: s, the slab's prior standard deviation.
        inclusion_init: initial posterior inclusion probability p.
        temperature: of the binary-concrete relaxation used in training.
        log_sigma2_init: initial log σ² of the weights (−3).
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
    forward = _SpikeSlab.forward


SpikeSlabConv1d, SpikeSlabConv2d, SpikeSlabConv3d = convolutions(
    _SpikeSlab,
    SpikeSlabLinear,
    "a relaxed spike-and-slab prior per output channel",
    group="output",
)
LAYERS: tuple[type[SparseModule], ...] = (
    SpikeSlabLinear,
    SpikeSlabConv1d,
    SpikeSlabConv2d,
    SpikeSlabConv3d,
)
