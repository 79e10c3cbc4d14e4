r"""Log-normal noise truncated to :math:`[e^a, e^b]`, the noise of Structured Bayesian Pruning.

Neklyudov, Molchanov, Ashukha, Vetrov (2017), *Structured Bayesian Pruning via Log-Normal
Multiplicative Noise*, NeurIPS: :math:`\log\theta \sim \mathcal N(\mu, \sigma^2)` truncated
to :math:`[a, b]`, against the log-uniform prior truncated to the same interval (uniform
on :math:`\log\theta \in [a, b]`), which makes the KL divergence closed-form.

Everything is computed in float64 and returned in the parameters' dtype: the tails of the
normal matter here (a unit whose :math:`\mu` sits beyond a bound with a small
:math:`\sigma` has both :math:`\Phi(\alpha)` and :math:`\Phi(\beta)` below float32's
range). Masses are kept as logs (:func:`log_normal_mass`), and the interval is reflected
so that it lies mostly left of 0, where log Φ and its gradient are computed through erfcx.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all
from torch.types import _size

# log sqrt(2 pi e), the entropy of a standard normal.
_HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
# Where the (standardised, reflected) upper bound is below this, Φ nears the end of
# float64's range and the sampler takes the normal's exponential tail instead (relative
# error about 1/hi² = 0.1 % in the sample's distance from the bound).
_TAIL = -30.0
# Uniforms are kept off 0 and 1, where the inverse CDF is infinite.
_U_EPS = 1e-12


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, accurate for x near 0 and far below it (Mächler 2012)."""
    return torch.where(
        x > -math.log(2.0),
        torch.log(-torch.expm1(x.clamp(max=-1e-300))),
        torch.log1p(-torch.exp(x.clamp(max=-math.log(2.0)))),
    )


def _mills_value(x: Tensor) -> Tensor:
    """φ(x)/Φ(x), without gradient: through erfcx left of 0, through logs right of it."""
    left = math.sqrt(2.0 / math.pi) / torch.special.erfcx(-x.clamp(max=0.0) / math.sqrt(2.0))
    x_right = x.clamp(min=0.0)
    right = torch.exp(-0.5 * x_right.square() - _HALF_LOG_2PI - torch.special.log_ndtr(x_right))
    return torch.where(x <= 0, left, right)


class _LogNdtr(torch.autograd.Function):
    """log Φ(x), with the gradient φ(x)/Φ(x) through erfcx: torch's own, e^(log φ − log Φ),
    cancels to garbage below x ≈ −1e7, where a unit's μ sits beyond a bound with a tiny σ."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.special.log_ndtr(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * _mills_value(x)


class _LogErfcx(torch.autograd.Function):
    """log erfcx(y) for y ≥ 0, with a gradient that stays right for large y: torch's erfcx
    gradient, 2y·erfcx(y) − 2/√π, cancels; beyond y = 50 the asymptotic series is used."""

    @staticmethod
    def forward(ctx: Any, y: Tensor) -> Tensor:
        value = torch.special.erfcx(y)
        ctx.save_for_backward(y, value)
        return value.log()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        y, value = ctx.saved_tensors
        near = 2.0 * y - 2.0 / (math.sqrt(math.pi) * value)
        inv = 1.0 / y.clamp(min=50.0)
        inv2 = inv.square()
        far = inv * (-1.0 + inv2 * (1.0 - 2.5 * inv2))  # −1/y + 1/y³ − 5/(2y⁵) + O(y⁻⁷)
        return grad * torch.where(y > 50.0, far, near)


def _log_ndtr(x: Tensor) -> Tensor:
    """log Φ(x), differentiable far into the left tail (:class:`_LogNdtr`)."""
    return _LogNdtr.apply(x)


def _log_erfcx_left(x: Tensor) -> Tensor:
    """log erfcx(−x/√2) = log Φ(x) + x²/2 + log 2, for x ≤ 0 (larger x are clamped)."""
    return _LogErfcx.apply(-x.clamp(max=0.0) / math.sqrt(2.0))


def _mills(x: Tensor) -> Tensor:
    """φ(x)/Φ(x), differentiable: √(2/π)/erfcx(−x/√2) left of 0, e^(log φ − log Φ) right."""
    left = math.sqrt(2.0 / math.pi) * torch.exp(-_log_erfcx_left(x))
    x_right = x.clamp(min=0.0)
    right = torch.exp(-0.5 * x_right.square() - _HALF_LOG_2PI - _log_ndtr(x_right))
    return torch.where(x <= 0, left, right)


class _Interval(NamedTuple):
    """[α, β] reflected to [lo, hi] = [−β, −α] where that lies more to the left (α + β > 0):
    the standard normal's mass is the same, lo + hi ≤ 0, and log Φ is accurate there."""

    lo: Tensor
    hi: Tensor
    flipped: Tensor
    log_cdf_lo: Tensor
    log_cdf_hi: Tensor

    @classmethod
    def of(cls, alpha: Tensor, beta: Tensor) -> _Interval:
        flipped = alpha + beta > 0
        lo, hi = torch.where(flipped, -beta, alpha), torch.where(flipped, -alpha, beta)
        return cls(lo, hi, flipped, _log_ndtr(lo), _log_ndtr(hi))

    @property
    def log_ratio(self) -> Tensor:
        """log Φ(lo)/Φ(hi) < 0."""
        return self.log_cdf_lo - self.log_cdf_hi

    @property
    def log_mass(self) -> Tensor:
        """log Z = log(Φ(hi) − Φ(lo))."""
        return self.log_cdf_hi + _log1mexp(self.log_ratio)


def log_normal_mass(alpha: Tensor, beta: Tensor) -> Tensor:
    """log(Φ(β) − Φ(α)) for α < β, with Φ the standard normal CDF, stable in both tails."""
    return _Interval.of(alpha, beta).log_mass


def _log_cdf_shift(x: Tensor, shift: Tensor) -> Tensor:
    """log Φ(x − s) − log Φ(x) for s ≥ 0, without the cancellation of two large logs.

    Left of 0, log Φ(y) = −y²/2 − log 2 + log erfcx(−y/√2) exactly, so the quadratic parts
    cancel by hand: s x − s²/2 plus a difference of slowly varying logs."""
    x_left = x.clamp(max=0.0)
    left = shift * x_left - 0.5 * shift.square()
    left = left + _log_erfcx_left(x_left - shift) - _log_erfcx_left(x_left)
    x_right = x.clamp(min=0.0)
    right = _log_ndtr(x_right - shift) - _log_ndtr(x_right)
    return torch.where(x <= 0, left, right)


def _log_mass_shift(alpha: Tensor, beta: Tensor, shift: Tensor) -> Tensor:
    """log(Φ(β − s) − Φ(α − s)) − log(Φ(β) − Φ(α)) for s ≥ 0.

    Where α ≤ 0 (always, for a layer's μ ≥ a) it is built from :func:`_log_cdf_shift`,
    exact where both masses are far in the left tail; elsewhere it is the plain difference,
    which loses digits only when α is far right of 0 (μ below a by many σ)."""
    right_of_zero = alpha > 0
    a = torch.where(right_of_zero, 0.0, alpha)  # each branch gets inputs that are safe for it
    b = torch.where(right_of_zero, beta - alpha, beta)
    log_ratio = _log_ndtr(a) - _log_ndtr(b)  # log Φ(α)/Φ(β)
    shift_a, shift_b = _log_cdf_shift(a, shift), _log_cdf_shift(b, shift)
    left = shift_b + _log1mexp(log_ratio + shift_a - shift_b) - _log1mexp(log_ratio)
    if not bool(right_of_zero.any()):
        return left
    plain = log_normal_mass(alpha - shift, beta - shift) - log_normal_mass(alpha, beta)
    return torch.where(right_of_zero, plain, left)


def _left_gap(x: Tensor) -> Tensor:
    """x + φ(x)/Φ(x) for x < 0 (a small positive number, about −1/x far left)."""
    y = -x.clamp(max=-1e4)
    far = 1.0 / y - 2.0 / y**3  # the Mills ratio's expansion; the next term is O(y⁻⁵)
    near = x + _mills(x.clamp(min=-1e4))
    return torch.where(x < -1e4, far, near)


def standard_truncated_entropy(alpha: Tensor, beta: Tensor) -> Tensor:
    """Entropy of N(0, 1) truncated to [α, β]: log(√(2πe) Z) + (αφ(α) − βφ(β)) / (2Z).

    Reflection leaves it unchanged. Where the reflected [lo, hi] lies left of 0 and Z
    underflows, log Z and the boundary term are both of order hi²/2 and cancel; there
    they are combined by hand, through x + φ(x)/Φ(x) and mass ratios."""
    iv = _Interval.of(alpha, beta)
    lo, hi, log_ratio = iv.lo, iv.hi, iv.log_ratio
    lo_share = torch.exp(log_ratio - _log1mexp(log_ratio))  # Φ(lo) / Z
    lo_term, hi_term = lo * _mills(lo), hi * _mills(hi)  # xφ(x)/Φ(x)
    # hi ≥ 0: Z ≥ Φ(hi) − Φ(−hi), nothing cancels.
    direct = _HALF_LOG_2PI_E + iv.log_mass
    direct = direct + 0.5 * (lo_term * lo_share - hi_term * (1.0 + lo_share))
    # hi < 0: log Z = −hi²/2 − log √(2π) − log(φ/Φ)(hi) + log(1 − Φ(lo)/Φ(hi)).
    hi_left = hi.clamp(max=-1e-3)
    log_mills_hi = 0.5 * math.log(2.0 / math.pi) - _log_erfcx_left(hi_left)
    neg = (
        0.5 * hi_left * _left_gap(hi_left)
        + 0.5 * lo_share * (hi_term - lo_term)
        + _HALF_LOG_2PI
        + log_mills_hi
        - _log1mexp(log_ratio)
    )
    return torch.where(hi < -1e-3, _HALF_LOG_2PI_E - neg, direct)


class TruncatedLogNormal(TorchDistribution):
    r"""θ with :math:`\log\theta \sim \mathcal N(\mu, \sigma^2)` truncated to [low, high].

    With :math:`\alpha = (a - \mu)/\sigma`, :math:`\beta = (b - \mu)/\sigma` and
    :math:`Z = \Phi(\beta) - \Phi(\alpha)`:

    .. math::
        \mathbb E[\theta^k] = e^{k\mu + k^2\sigma^2/2}
            \frac{\Phi(\beta - k\sigma) - \Phi(\alpha - k\sigma)}{Z}, \qquad
        \mathrm{KL}(q \,\|\, \text{log-}\mathcal U[a, b]) = \log(b - a)
            - \log(\sigma\sqrt{2\pi e}) - \log Z
            - \frac{\alpha\phi(\alpha) - \beta\phi(\beta)}{2Z}.

    :meth:`rsample` is reparameterised: :math:`\log\theta = \mu + \sigma
    \Phi^{-1}(\Phi(\alpha) + u Z)` with :math:`u \sim \mathcal U(0, 1)` (where the mean
    lies more than 30σ beyond a bound, the normal's exponential tail stands in for
    :math:`\Phi^{-1}`). Everything is computed in float64 (module docstring).

    Args:
        loc: μ, the mean of log θ before truncation.
        scale: σ > 0.
        low, high: the bounds a < b of log θ (−20 and 0 in the paper).

    Example:
        >>> q = TruncatedLogNormal(torch.tensor([0.0, -3.0]), torch.tensor([0.01, 2.0]))
        >>> (q.signal_to_noise() > 1).tolist()  # a narrow unit is kept, a wide one pruned
        [True, False]

    References:
        Neklyudov, Molchanov, Ashukha, Vetrov (2017), *Structured Bayesian Pruning via
        Log-Normal Multiplicative Noise*, NeurIPS.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "loc": constraints.real,
        "scale": constraints.positive,
    }
    has_rsample = True

    def __init__(
        self,
        loc: Tensor | float,
        scale: Tensor | float,
        low: float = -20.0,
        high: float = 0.0,
        validate_args: bool | None = None,
    ) -> None:
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(
                f"Expected finite bounds low < high on log theta, got low={low!r}, "
                f"high={high!r}. The paper uses low=-20, high=0."
            )
        self.loc, self.scale = broadcast_all(loc, scale)
        self.low, self.high = float(low), float(high)
        super().__init__(self.loc.shape, torch.Size(), validate_args=validate_args)

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        return constraints.interval(math.exp(self.low), math.exp(self.high))

    def expand(self, batch_shape: _size, _instance: object = None) -> TruncatedLogNormal:
        shape = torch.Size(batch_shape)
        return TruncatedLogNormal(
            self.loc.expand(shape),
            self.scale.expand(shape),
            self.low,
            self.high,
            validate_args=False,
        )

    # --- the standardised interval, in float64 --------------------------------------------

    def _params64(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(μ, σ, α, β)`` in float64."""
        mu, sigma = self.loc.double(), self.scale.double()
        return mu, sigma, (self.low - mu) / sigma, (self.high - mu) / sigma

    def _log_moment(self, k: float) -> Tensor:
        """log E[θᵏ] = kμ + k²σ²/2 + log(Φ(β − kσ) − Φ(α − kσ)) − log Z, float64."""
        mu, sigma, alpha, beta = self._params64()
        shift = k * sigma
        return k * mu + 0.5 * shift.square() + _log_mass_shift(alpha, beta, shift)

    @property
    def mean(self) -> Tensor:
        return self._log_moment(1.0).exp().to(self.loc.dtype)

    @property
    def variance(self) -> Tensor:
        return (self._log_moment(1.0).exp().square() * self._noise_ratio()).to(self.loc.dtype)

    def _noise_ratio(self) -> Tensor:
        """Var[θ] / E[θ]², float64: e^r − 1 with r = log E[θ²] − 2 log E[θ].

        r is a second difference of log masses; where it is below float64's rounding (σ
        under about 1e-7, or μ far beyond a bound with a small σ) the true ratio is tiny,
        and it is clamped to at least 1e-300 rather than left to rounding's sign."""
        r = self._log_moment(2.0) - 2.0 * self._log_moment(1.0)
        return torch.expm1(r).clamp(min=1e-300)

    def log_noise_ratio(self) -> Tensor:
        """log(Var[θ] / E[θ]²): the log α of a multiplicative noise (higher: noisier)."""
        return self._noise_ratio().log().to(self.loc.dtype)

    def signal_to_noise(self) -> Tensor:
        """E[θ] / std[θ], the paper's pruning score (units with SNR ≤ 1 are pruned)."""
        return self._noise_ratio().rsqrt().to(self.loc.dtype)

    def kl_log_uniform(self) -> Tensor:
        """KL(q ‖ p) to the log-uniform prior on [e^low, e^high], elementwise (closed form):
        log(b − a) − log σ − H(α, β), with H the standard truncated normal's entropy."""
        _, sigma, alpha, beta = self._params64()
        entropy = sigma.log() + standard_truncated_entropy(alpha, beta)
        return (math.log(self.high - self.low) - entropy).to(self.loc.dtype)

    def log_prob(self, value: Tensor) -> Tensor:
        """log q(θ) = log φ((log θ − μ)/σ) − log σ − log Z − log θ on the support."""
        if self._validate_args:
            self._validate_sample(value)
        mu, sigma, alpha, beta = self._params64()
        log_value = value.double().log()
        x = (log_value - mu) / sigma
        log_q = -0.5 * x.square() - _HALF_LOG_2PI - sigma.log()
        log_q = log_q - log_normal_mass(alpha, beta) - log_value
        return log_q.to(self.loc.dtype)

    def rsample(self, sample_shape: _size = ()) -> Tensor:
        """θ of shape ``sample_shape + batch_shape``, differentiable in loc and scale.

        On the reflected interval [lo, hi] (u ↦ 1 − u by symmetry, which is as uniform):
        log θ = μ ± σ Φ⁻¹(Φ(lo) + u Z); where hi < −30, the mass hugs the bound and the
        normal's exponential tail, rate −hi, gives the distance from it instead."""
        shape = self._extended_shape(torch.Size(sample_shape))
        mu, sigma, alpha, beta = self._params64()
        iv = _Interval.of(alpha, beta)
        u = torch.rand(shape, dtype=torch.float64, device=mu.device).clamp(_U_EPS, 1 - _U_EPS)
        tail = iv.hi < _TAIL
        any_tail = bool(tail.any())
        # Per group, once: Φ(lo) and Z, both within float64's range away from the tail
        # (tail groups get safe stand-ins, so that no NaN reaches torch.where's gradient).
        central = iv
        if any_tail:
            central = _Interval.of(torch.where(tail, -1.0, iv.lo), torch.where(tail, 0.0, iv.hi))
        cdf_lo, mass = central.log_cdf_lo.exp(), central.log_mass.exp()
        signed_sigma = torch.where(iv.flipped, -sigma, sigma)
        # Per draw: four operations and the inverse CDF.
        log_theta = torch.addcmul(mu, signed_sigma, torch.special.ndtri(cdf_lo + u * mass))
        if any_tail:
            # Density ∝ exp(−rate t) at distance t = σ(hi − x) ≤ σ(hi − lo) from the bound.
            rate = -torch.where(tail, iv.hi, _TAIL)
            width = torch.where(tail, iv.hi - iv.lo, 1.0)
            distance = -sigma * torch.log1p(u * torch.expm1(-rate * width)) / rate
            near_bound = torch.where(iv.flipped, self.low + distance, self.high - distance)
            log_theta = torch.where(tail, near_bound, log_theta)
        return log_theta.clamp(self.low, self.high).exp().to(self.loc.dtype)
