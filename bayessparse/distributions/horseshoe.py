r"""The horseshoe prior (Carvalho, Polson, Scott 2010) with its exact marginal density.

The marginal density of the horseshoe has a closed form in the exponential integral
:math:`E_1`, which torch lacks; :func:`log_exp1_scaled` supplies :math:`\log(e^x E_1(x))`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all
from torch.types import _size

__all__ = ["Horseshoe", "log_exp1_scaled"]

_EULER_GAMMA = 0.57721566490153286

# Per compute dtype: (split, series terms, continued-fraction terms). The power series is used
# for x <= split, the continued fraction above. The series sums alternating terms that peak
# near x^k/k! while E1(x) ~ e^-x/x, so its cancellation grows like e^(2x): about 9x at x = 1 and
# 75x at x = 2 (relative to the unit roundoff). The continued fraction converges slowly near
# x = 1 (truncation error ~ exp(-c sqrt(n x))). Truncation errors at the split, measured with
# mpmath in 50-digit arithmetic:
#   float64: series, 24 terms at x = 2: 1.6e-18; fraction, 56 terms at x = 2: 3e-17. At a split
#            of 1 the fraction would need ~110 terms for float64, so float64 accepts the 75x
#            cancellation at x = 2 (~1e-14) to halve the fraction's cost.
#   float32: series, 12 terms at x = 1: 1.0e-10; fraction, 32 terms at x = 1: 5e-9 (< eps/20).
_PLANS: dict[torch.dtype, tuple[float, int, int]] = {
    torch.float64: (2.0, 24, 56),
    torch.float32: (1.0, 12, 32),
}

# Coefficients c_k = (-1)^k / (k k!) of the series E1(x) = -gamma - log x - sum_k c_k x^k.
_SERIES_COEFFS = [(-1) ** k / (k * math.factorial(k)) for k in range(1, 25)]


def _log_exp1_scaled_with_derivatives(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r""":math:`f(x) = \log(e^x E_1(x))`, :math:`f'(x)` and :math:`f''(x)`, without autograd.

    With :math:`g = e^x E_1(x)` and :math:`g' = g - 1/x`,
    :math:`f' = 1 - 1/(xg)` and :math:`f'' = (g + xg - 1)/(xg)^2`. Both branches are
    evaluated on the whole tensor (clamped into their own range) and merged with
    ``torch.where``: a fixed amount of elementwise work, without data-dependent indexing
    (which would synchronise a GPU).
    """
    split, n_series, n_fraction = _PLANS[x.dtype]

    # Power series, x <= split, summed by Horner's rule.
    xs = x.clamp(max=split)
    acc = torch.full_like(xs, _SERIES_COEFFS[n_series - 1])
    for c in reversed(_SERIES_COEFFS[: n_series - 1]):
        acc = acc * xs + c
    e1 = -_EULER_GAMMA - xs.log() - acc * xs
    f_series = xs + e1.log()
    g = f_series.exp()
    xg = xs * g
    # At x = 0, g = inf and xg = 0 * inf = NaN; the limits are f' -> -inf, f'' -> +inf.
    at_zero = xs == 0
    d1_series = torch.where(at_zero, -math.inf, 1 - xg.reciprocal())
    d2_series = torch.where(at_zero, math.inf, (g + xg - 1) / xg.square())

    # Continued fraction, x > split. Writing
    #   e^x E1(x) = 1 / D,  D = x + 1 - q,  q = 1/(x + 3 - 4/(x + 5 - 9/(x + 7 - ...))),
    # gives f = -log D, f' = 1 - D/x = (q - 1)/x and f'' = q D / x^2. Keeping the tail q
    # separate avoids the cancellation of 1 - 1/(x g) for large x, where f' ~ -1/x: this
    # form is accurate to a few ulps however large x is. The fraction is evaluated from the
    # innermost term outwards (backward recurrence), which is stable for a fixed length.
    xc = x.clamp(min=split)
    q = torch.zeros_like(xc)
    for k in range(n_fraction, 0, -1):
        q = (k * k) / (xc + (2 * k + 1) - q)
    denom = xc + 1 - q
    f_fraction = -denom.log()
    d1_fraction = (q - 1) / xc
    # q D / x^2 written as q (D/x) / x, which stays finite (0) at x = inf.
    d2_fraction = q * (1 + (1 - q) / xc) / xc

    series = x <= split  # False for NaN, which then propagates through the fraction branch
    return (
        torch.where(series, f_series, f_fraction),
        torch.where(series, d1_series, d1_fraction),
        torch.where(series, d2_series, d2_fraction),
    )


class _LogExp1Scaled(torch.autograd.Function):
    """``log_exp1_scaled`` with closed-form derivatives.

    Autograd through the recurrences would keep ~100 input-sized intermediates alive per call
    and lose accuracy for large x; the closed forms cost three extra elementwise ops.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        f, d1, d2 = _log_exp1_scaled_with_derivatives(x)
        ctx.save_for_backward(x, d1, d2)
        return f

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        x, d1, d2 = ctx.saved_tensors
        # Through a second Function so that the gradient is itself differentiable once
        # (Hessians, Laplace approximations); third derivatives raise.
        return grad_output * _Derivative.apply(x, d1, d2)


class _Derivative(torch.autograd.Function):
    """Returns the precomputed f'(x), with f''(x) as its derivative with respect to x."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, d1: Tensor, d2: Tensor) -> Tensor:
        ctx.save_for_backward(d2)
        return d1.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None]:
        (d2,) = ctx.saved_tensors
        return grad_output * d2, None, None


def log_exp1_scaled(x: Tensor) -> Tensor:
    r"""Elementwise :math:`\log\big(e^x E_1(x)\big)`, with :math:`E_1(x) = \int_x^\infty
    e^{-t}/t\,dt` the exponential integral.

    For :math:`x \le x_0` the power series

    .. math:: E_1(x) = -\gamma - \log x - \sum_{k\ge1} \frac{(-x)^k}{k\,k!},

    and above it the continued fraction

    .. math:: e^x E_1(x) = \cfrac{1}{x + 1 - \cfrac{1}{x + 3 - \cfrac{4}{x + 5 - \cdots}}},

    each with a fixed number of terms applied to the whole tensor. The split :math:`x_0` and
    the term counts depend on the dtype (1 for float32, 2 for float64). The relative error
    against :func:`scipy.special.exp1` is below 1e-13 in float64 over :math:`[10^{-10},
    10^3]`; in float32 the absolute error is a few ulps of :math:`1 + |f|`. (Relative error
    grows near :math:`x \approx 0.4348`, where :math:`e^x E_1(x) = 1` and the result is 0.)
    float16 and bfloat16 are computed in float32.

    The derivatives are in closed form, :math:`f' = 1 - 1/(x e^x E_1(x))` (computed
    without cancellation for large :math:`x`) and :math:`f''`, so the result can be
    differentiated twice.

    Args:
        x: real tensor, any shape; :math:`x \ge 0`.

    Returns:
        :math:`\log(e^x E_1(x))`, same shape and dtype: ``+inf`` at 0 (:math:`E_1(0)=\infty`),
        about :math:`-\log x - 1/x` for large :math:`x`, ``-inf`` at ``+inf`` and NaN for
        negative or NaN input. The derivative at 0 is ``-inf``.

    Raises:
        TypeError: for complex input.

    References:
        Abramowitz, Stegun (1964), *Handbook of Mathematical Functions*, 5.1.11 (series) and
        5.1.22 (continued fraction); Press et al., *Numerical Recipes*, §6.3.
    """
    if x.is_complex():
        raise TypeError("log_exp1_scaled is defined for real x >= 0, got a complex tensor.")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if x.dtype in _PLANS:
        result: Tensor = _LogExp1Scaled.apply(x)
        return result
    # Half precisions: the series and fraction need float32's range and precision.
    result = _LogExp1Scaled.apply(x.float())
    return result.to(x.dtype)


# log of the constant (2 pi^3)^(-1/2) of the marginal density.
_LOG_NORMALISER = -0.5 * math.log(2 * math.pi**3)


class Horseshoe(TorchDistribution):
    r"""Marginal of the horseshoe prior: :math:`w \mid \lambda \sim \mathcal N(0, \lambda^2
    s^2)`, :math:`\lambda \sim \mathcal C^+(0, 1)`.

    The half-Cauchy local scale :math:`\lambda` puts mass both near 0 (shrinking noise
    weights towards 0) and far out (leaving signals unshrunk): the shrinkage coefficient
    :math:`\kappa = 1/(1 + \lambda^2)` has the horseshoe-shaped Beta(½, ½) density. With
    :math:`x = w^2 / (2 s^2)`, substituting :math:`v = 1/\lambda^2` in the mixture integral
    gives the closed form

    .. math:: p(w) = \int_0^\infty \mathcal N(w; 0, \lambda^2 s^2)
              \frac{2}{\pi(1 + \lambda^2)}\,d\lambda
              = \frac{1}{s\pi\sqrt{2\pi}} \int_0^\infty \frac{e^{-xv}}{1 + v}\,dv
              = \frac{1}{s\sqrt{2\pi^3}}\, e^{x} E_1(x),

    which has a pole at :math:`w = 0` (:math:`p \sim -\log|w|`, integrable) and tails
    :math:`p(w) \approx \sqrt{2/\pi^3}\, s / w^2`. It lies between the bounds
    :math:`\tfrac{K}{2}\log(1 + 4/\theta^2) < s\,p(w) < K\log(1 + 2/\theta^2)` with
    :math:`\theta = w/s` and :math:`K = (2\pi^3)^{-1/2}` (Carvalho et al. 2010, Theorem 1).

    Louizos, Ullrich, Welling (2017) use this scale mixture as a group prior, with a
    half-Cauchy scale shared by all weights of a neuron or filter so that whole groups are
    pruned. This class is the marginal of one weight; weights sharing a scale are not
    independent, so a group's joint density is not a product of these.

    Args:
        scale: global scale :math:`s > 0`, any shape (the batch shape).
        validate_args: as for :class:`torch.distributions.Distribution`.

    Example:
        >>> prior = Horseshoe(torch.tensor(0.5))
        >>> w = prior.rsample((3,))
        >>> prior.log_prob(w).shape
        torch.Size([3])
        >>> prior.log_prob(torch.tensor(0.0))  # the pole at 0
        tensor(inf)

    References:
        Carvalho, Polson, Scott (2010), *The horseshoe estimator for sparse signals*,
        Biometrika 97(2) (the prior; density bounds, Theorem 1). Louizos, Ullrich,
        Welling (2017), *Bayesian Compression for Deep Learning*, NeurIPS (horseshoe group
        prior for pruning).
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {"scale": constraints.positive}
    support = constraints.real
    has_rsample = True
    scale: Tensor

    def __init__(self, scale: Tensor | float = 1.0, validate_args: bool | None = None) -> None:
        (self.scale,) = broadcast_all(scale)
        super().__init__(self.scale.shape, validate_args=validate_args)

    def expand(self, batch_shape: _size, _instance: Horseshoe | None = None) -> Horseshoe:
        new = self._get_checked_instance(Horseshoe, _instance)
        batch_shape = torch.Size(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        super(Horseshoe, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> Tensor:
        r"""NaN: the tails decay like :math:`1/w^2`, so :math:`E|w| = \infty` and the mean,
        as for the Cauchy, does not exist (symmetry does not make it 0)."""
        return torch.full_like(self.scale, math.nan)

    @property
    def variance(self) -> Tensor:
        r"""``+inf``: :math:`E w^2 = s^2 E\lambda^2 = \infty` (the convention of
        :class:`torch.distributions.Cauchy`)."""
        return torch.full_like(self.scale, math.inf)

    def rsample(self, sample_shape: _size = ()) -> Tensor:
        r"""Reparameterised draws :math:`w = s\,\lambda\,\varepsilon`.

        :math:`\lambda = \tan(\pi u / 2)` with :math:`u \sim \mathcal U(0, 1)` (the inverse
        distribution function of :math:`\mathcal C^+(0, 1)`) and
        :math:`\varepsilon \sim \mathcal N(0, 1)`.

        Args:
            sample_shape: leading shape of independent draws.

        Returns:
            Samples of shape ``sample_shape + batch_shape``, differentiable with respect
            to ``scale`` (:math:`\partial w/\partial s = w/s`).
        """
        shape = self._extended_shape(sample_shape)
        dtype, device = self.scale.dtype, self.scale.device
        # torch.rand draws from [0, 1): u = 0 would give lambda = 0 and w = 0, the pole of
        # the density (log_prob = inf). Clamping to [tiny, 1 - eps] keeps lambda in
        # (0, 1/tan(pi eps/2)) ~ (0, 5e6) in float32: tan(pi/2) in floating point is
        # huge and of either sign, and the clipped mass, about eps, is far below what any
        # sampling-based estimate resolves.
        finfo = torch.finfo(dtype)
        u = torch.rand(shape, dtype=dtype, device=device).clamp(finfo.tiny, 1 - finfo.eps)
        local_scale = torch.tan(0.5 * math.pi * u)
        noise = torch.randn(shape, dtype=dtype, device=device)
        return self.scale * local_scale * noise

    def log_prob(self, value: Tensor) -> Tensor:
        r"""Exact log marginal density :math:`-\log s - \tfrac12\log(2\pi^3) +
        \log(e^x E_1(x))`, :math:`x = w^2/(2s^2)`.

        Args:
            value: real points, broadcastable with the batch shape.

        Returns:
            The log density; ``+inf`` at :math:`w = 0` (the pole; its gradient there is
            NaN).
        """
        if self._validate_args:
            self._validate_sample(value)
        x = 0.5 * (value / self.scale).square()
        return log_exp1_scaled(x) - self.scale.log() + _LOG_NORMALISER
