r"""The hard concrete gate distribution of L0-regularised networks (Louizos et al. 2018)."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all
from torch.types import _size

# Fixed composite Gauss–Legendre rule for :attr:`HardConcrete.mean` and ``variance``: the
# integrands are analytic in t = logit(s), so 16 panels of 16 nodes converge geometrically (see
# ``_survival_quadrature``). Nodes and weights are for [-1, 1].
_GL_PANELS = 16
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(16)


def _check_float(name: str, value: float, ok: bool, expectation: str, hint: str) -> float:
    """Return ``float(value)``; raise ``ValueError`` naming the value unless ``ok``."""
    if not ok:
        raise ValueError(f"Expected {name} {expectation}, got {value!r}. {hint}")
    return float(value)


class HardConcrete(TorchDistribution):
    r"""Hard concrete gate: a binary concrete variable stretched to :math:`(\gamma, \zeta)`
    and clipped to :math:`[0, 1]`.

    With :math:`u \sim \mathcal U(0, 1)`, temperature :math:`\beta` and location
    :math:`\log\alpha`,

    .. math::
        s = \sigma\big((\log u - \log(1 - u) + \log\alpha) / \beta\big), \qquad
        \bar s = s(\zeta - \gamma) + \gamma, \qquad
        z = \min(1, \max(0, \bar s)).

    Because :math:`\gamma < 0 < 1 < \zeta`, :math:`z` has atoms at 0 and 1 and a density on
    :math:`(0, 1)`; a higher :math:`\log\alpha` means a gate more likely to be open (keep).
    Writing :math:`t(z) = \log\frac{z - \gamma}{\zeta - z}` (the logit of the unstretched
    :math:`s`), the distribution function on :math:`[0, 1)` is

    .. math:: P(Z \le z) = \sigma\big(\beta\, t(z) - \log\alpha\big),

    so :math:`P(Z = 0) = \sigma(\beta\log(-\gamma/\zeta) - \log\alpha)` and
    :math:`P(Z = 1) = \sigma(\log\alpha - \beta\log\frac{1 - \gamma}{\zeta - 1})`.

    :meth:`log_prob` is the log density with respect to the counting measure on
    :math:`\{0, 1\}` plus Lebesgue measure on :math:`(0, 1)`: the log mass at an atom and the
    log density inside. :meth:`rsample` is reparameterised (the gradient to ``log_alpha``
    flows through the samples in :math:`(0, 1)` and is 0 at the atoms, as in the paper).

    Args:
        log_alpha: gate location :math:`\log\alpha`, any shape (the batch shape).
        temperature: :math:`\beta > 0`; the paper uses 2/3.
        low: stretch lower end :math:`\gamma < 0`; the paper uses -0.1.
        high: stretch upper end :math:`\zeta > 1`; the paper uses 1.1.
        validate_args: as for :class:`torch.distributions.Distribution`.

    Raises:
        ValueError: if ``temperature``, ``low`` or ``high`` is out of range.

    Example:
        >>> gate = HardConcrete(torch.tensor([-4.0, 4.0]))
        >>> gate.prob_nonzero()  # the expected L0 norm contribution of each gate
        tensor([0.0831, 0.9963])
        >>> gate.deterministic_gate()  # the test-time gate
        tensor([0., 1.])

    References:
        Louizos, Welling, Kingma (2018), *Learning Sparse Neural Networks through L0
        Regularization*, ICLR, section 4. Maddison, Mnih, Teh (2017), *The Concrete
        Distribution* (binary concrete density and distribution function).
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {"log_alpha": constraints.real}
    support = constraints.unit_interval
    has_rsample = True

    def __init__(
        self,
        log_alpha: Tensor | float,
        temperature: float = 2.0 / 3.0,
        low: float = -0.1,
        high: float = 1.1,
        validate_args: bool | None = None,
    ) -> None:
        # Chained comparisons are False for NaN, and the bounds exclude ±inf: a non-finite
        # stretch or temperature makes every formula below meaningless.
        self.temperature = _check_float(
            "temperature",
            temperature,
            0 < temperature < math.inf,
            "to be finite and > 0",
            "Louizos et al. use 2/3.",
        )
        self.low = _check_float(
            "low",
            low,
            -math.inf < low < 0,
            "to be finite and < 0",
            "The stretch must reach below 0 for gates to be exactly 0 (Louizos et al. use -0.1).",
        )
        self.high = _check_float(
            "high",
            high,
            1 < high < math.inf,
            "to be finite and > 1",
            "The stretch must reach above 1 for gates to be exactly 1 (Louizos et al. use 1.1).",
        )
        (self.log_alpha,) = broadcast_all(log_alpha)
        super().__init__(self.log_alpha.shape, validate_args=validate_args)

    def expand(self, batch_shape: _size, _instance: HardConcrete | None = None) -> HardConcrete:
        new = self._get_checked_instance(HardConcrete, _instance)
        batch_shape = torch.Size(batch_shape)
        new.log_alpha = self.log_alpha.expand(batch_shape)
        new.temperature = self.temperature
        new.low = self.low
        new.high = self.high
        super(HardConcrete, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    # Logits t(z) = log((z - γ)/(ζ - z)) of the unstretched s at the clip points z = 0 and 1.
    @property
    def _logit_at_zero(self) -> float:
        return math.log(-self.low / self.high)

    @property
    def _logit_at_one(self) -> float:
        return math.log((1 - self.low) / (self.high - 1))

    def _logit(self, value: Tensor) -> Tensor:
        """t(z) = log((z - γ)/(ζ - z)); finite for z in [0, 1] since γ < 0 and ζ > 1."""
        return torch.log(value - self.low) - torch.log(self.high - value)

    def rsample(self, sample_shape: _size = ()) -> Tensor:
        """Reparameterised gates ``z`` of shape ``sample_shape + batch_shape``.

        Args:
            sample_shape: leading shape of independent draws.

        Returns:
            Samples in :math:`[0, 1]`, differentiable with respect to ``log_alpha``.
        """
        shape = self._extended_shape(sample_shape)
        # torch.rand draws from [0, 1), so u = 0 (log u = -inf) is possible; clamp to
        # [eps, 1 - eps] rather than [tiny, 1 - tiny] because 1 - tiny rounds to 1. The noise
        # is truncated at ±log(1/eps - 1) (±15.9 in float32, ±36 in float64), which
        # is mass ~eps of the logistic and lies far inside the atoms anyway.
        eps = torch.finfo(self.log_alpha.dtype).eps
        u = torch.rand(shape, dtype=self.log_alpha.dtype, device=self.log_alpha.device)
        u = u.clamp(eps, 1 - eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        return (s * (self.high - self.low) + self.low).clamp(0.0, 1.0)

    def log_prob(self, value: Tensor) -> Tensor:
        r"""Log mass at the atoms, log density inside :math:`(0, 1)`.

        Inside, with :math:`x = \beta\,t(z) - \log\alpha`, the stretched binary concrete
        density :math:`\frac{\beta\alpha s^{-\beta-1}(1-s)^{-\beta-1}}{(\alpha s^{-\beta}
        + (1-s)^{-\beta})^2}\cdot\frac{1}{\zeta-\gamma}` at :math:`s = (z-\gamma)/(\zeta-\gamma)`
        is, in log space,

        .. math:: \log\sigma(x) + \log\sigma(-x) + \log\beta + \log(\zeta - \gamma)
                  - \log(z - \gamma) - \log(\zeta - z).

        Args:
            value: points in :math:`[0, 1]`, broadcastable with the batch shape.

        Returns:
            :math:`\log P(Z = 0)` at 0, :math:`\log P(Z = 1)` at 1, the log density
            between, and ``-inf`` outside :math:`[0, 1]` (which raises instead when
            validation is on).
        """
        if self._validate_args:
            self._validate_sample(value)
        log_alpha = self.log_alpha
        inside = (value > 0) & (value < 1)
        # Evaluate the density formula at a harmless point where it does not apply, so that
        # neither the result nor its gradient picks up NaN from log of a negative number.
        z = torch.where(inside, value, torch.full_like(value, 0.5))
        x = self.temperature * self._logit(z) - log_alpha
        log_density = (
            F.logsigmoid(x)
            + F.logsigmoid(-x)
            + math.log(self.temperature)
            + math.log(self.high - self.low)
            - torch.log(z - self.low)
            - torch.log(self.high - z)
        )
        log_p_zero = F.logsigmoid(self.temperature * self._logit_at_zero - log_alpha)
        log_p_one = F.logsigmoid(log_alpha - self.temperature * self._logit_at_one)
        result = torch.where(inside, log_density, torch.full_like(log_density, -math.inf))
        result = torch.where(value == 0, log_p_zero, result)
        result = torch.where(value == 1, log_p_one, result)
        return torch.where(torch.isnan(value), value, result)

    def cdf(self, value: Tensor) -> Tensor:
        r""":math:`P(Z \le z)`: 0 below 0, :math:`\sigma(\beta\,t(z) - \log\alpha)` on
        :math:`[0, 1)`, 1 from 1 on.

        Args:
            value: points, broadcastable with the batch shape; when validation is on they
                must lie in :math:`[0, 1]`.

        Returns:
            The distribution function at ``value``; at 0 it is the atom :math:`P(Z = 0)`.
        """
        if self._validate_args:
            self._validate_sample(value)
        in_range = (value >= 0) & (value < 1)
        z = torch.where(in_range, value, torch.full_like(value, 0.5))
        continuous = torch.sigmoid(self.temperature * self._logit(z) - self.log_alpha)
        result = torch.where(in_range, continuous, (value >= 1).to(continuous.dtype))
        return torch.where(torch.isnan(value), value, result)

    def icdf(self, value: Tensor) -> Tensor:
        r"""Generalised inverse :math:`\inf\{z : P(Z \le z) \ge p\}` of :meth:`cdf`.

        It is 0 for :math:`p \le P(Z = 0)`, 1 for :math:`p \ge 1 - P(Z = 1)` and otherwise
        :math:`\gamma + (\zeta - \gamma)\,\sigma\big((\operatorname{logit} p + \log\alpha)
        /\beta\big)`, so ``icdf(U)`` with :math:`U \sim \mathcal U(0, 1)` is a sample.

        Args:
            value: probabilities in :math:`[0, 1]`, broadcastable with the batch shape.

        Returns:
            Quantiles in :math:`[0, 1]`.

        Raises:
            ValueError: under validation, if a probability is outside :math:`[0, 1]`.
        """
        if self._validate_args and not bool(((value >= 0) & (value <= 1)).all()):
            raise ValueError(f"Expected probabilities in [0, 1], got {value!r}.")
        p_zero = torch.sigmoid(self.temperature * self._logit_at_zero - self.log_alpha)
        p_one = torch.sigmoid(self.log_alpha - self.temperature * self._logit_at_one)
        below, above = value <= p_zero, value >= 1 - p_one
        inside = ~(below | above)
        p = torch.where(inside, value, torch.full_like(value, 0.5))  # keeps logit finite
        s = torch.sigmoid((torch.logit(p) + self.log_alpha) / self.temperature)
        # Rounding can push the quantile just outside [0, 1] next to the atoms.
        z = (s * (self.high - self.low) + self.low).clamp(0.0, 1.0)
        result = torch.where(below, torch.zeros_like(z), torch.where(above, torch.ones_like(z), z))
        return torch.where(torch.isnan(value), value, result)

    def prob_nonzero(self) -> Tensor:
        r""":math:`P(Z \ne 0) = \sigma(\log\alpha - \beta\log(-\gamma/\zeta))`, batch-shaped.

        Its sum over gates is the expected L0 norm, the paper's differentiable penalty.

        Returns:
            The probability that each gate is non-zero, differentiable in ``log_alpha``.
        """
        return torch.sigmoid(self.log_alpha - self.temperature * self._logit_at_zero)

    def deterministic_gate(self) -> Tensor:
        r"""The paper's test-time gate :math:`\hat z = \min(1, \max(0, \sigma(\log\alpha)
        (\zeta - \gamma) + \gamma))`.

        It is the clipped stretch of the noise-free :math:`s` at temperature 1 (the paper's
        choice: the median of :math:`Z` would be :math:`\sigma(\log\alpha/\beta)` in place of
        :math:`\sigma(\log\alpha)`), so :math:`\hat z > 0 \iff \log\alpha >
        \log(-\gamma/\zeta)`, where :meth:`prob_nonzero` is only
        :math:`\sigma((1 - \beta)\log(-\gamma/\zeta))` (0.310 at the defaults).

        Returns:
            Gates in :math:`[0, 1]`, batch-shaped.
        """
        stretched = torch.sigmoid(self.log_alpha) * (self.high - self.low) + self.low
        return stretched.clamp(0.0, 1.0)

    def _survival_quadrature(self) -> tuple[Tensor, Tensor]:
        r""":math:`E[Z] = \int_0^1 P(Z > z)\,dz` and :math:`E[Z^2] = \int_0^1 2z\,P(Z > z)\,dz`.

        Substituting :math:`z = \gamma + (\zeta - \gamma)\sigma(t)` turns both into integrals
        over :math:`t \in [\log(-\gamma/\zeta), \log\frac{1-\gamma}{\zeta-1}]` of
        :math:`\sigma(\log\alpha - \beta t)\,(\zeta-\gamma)\sigma(t)\sigma(-t)` (times
        :math:`2z(t)`), whose nearest complex poles are :math:`\min(\pi, \pi/\beta)` from the
        real axis. Gauss–Legendre on panels of half-width :math:`h` then errs by about
        :math:`\rho^{-32}` with :math:`\rho \approx a/h + \sqrt{1 + (a/h)^2}`, :math:`a` the
        pole distance: below 1e-12 while :math:`\beta\,(t_1 - t_0) \lesssim 100` (at the
        default stretch, :math:`\beta \lesssim 20`). The atom at 1 is included because the
        survival function is 1 - cdf on all of :math:`[0, 1)`.
        """
        log_alpha = self.log_alpha
        t0, t1 = self._logit_at_zero, self._logit_at_one
        width = (t1 - t0) / _GL_PANELS
        centres = t0 + width * (np.arange(_GL_PANELS)[:, None] + 0.5)
        t_np = (centres + 0.5 * width * _GL_NODES).ravel()
        w_np = np.tile(0.5 * width * _GL_WEIGHTS, _GL_PANELS)
        t = torch.as_tensor(t_np, dtype=log_alpha.dtype, device=log_alpha.device)
        w = torch.as_tensor(w_np, dtype=log_alpha.dtype, device=log_alpha.device)
        span = self.high - self.low
        dz_dt = span * torch.sigmoid(t) * torch.sigmoid(-t)
        z = self.low + span * torch.sigmoid(t)
        survival = torch.sigmoid(log_alpha.unsqueeze(-1) - self.temperature * t)
        weighted = survival * (w * dz_dt)
        return weighted.sum(-1), (weighted * (2 * z)).sum(-1)

    @property
    def mean(self) -> Tensor:
        r""":math:`E[Z] = P(Z = 1) + \int_0^1 z\,p(z)\,dz`, by fixed quadrature.

        Computed as :math:`\int_0^1 P(Z > z)\,dz`; see :meth:`_survival_quadrature` for the
        accuracy. Memory is 256 values per batch element; differentiable in ``log_alpha``.
        """
        return self._survival_quadrature()[0]

    @property
    def variance(self) -> Tensor:
        r""":math:`E[Z^2] - E[Z]^2`, by the same quadrature as :attr:`mean`.

        Clamped at 0 because the subtraction cancels when a gate is almost surely 0 or 1
        (absolute error ~1e-16 in float64, so tiny variances have poor relative accuracy).
        """
        first, second = self._survival_quadrature()
        return (second - first**2).clamp(min=0.0)
