"""The bit precision of a layer read from its posterior variances (Bayesian compression).

A weight known only to within its posterior standard deviation needs no more
significand bits than resolve it. Louizos, Ullrich & Welling encode each surviving
weight as a float with a sign bit, ``e`` exponent bits and ``t`` significand bits, and
choose ``t`` per layer from the marginal posterior variances σ². Their released code
(``compression.py``, "as mentioned in the paper") gives each weight the number of unit
round-offs ``2^−s`` (s = 1..23, Heath 1996, ch. 1) that exceed ``2σ²``,

    t_w = #{s ∈ 1..23 : 2σ_w² < 2^−s},

and the layer their mean, rounded up, ``t = ⌈mean_w t_w⌉``; the exponent must reach the
largest posterior mean, ``e = ⌈log2(log2 max|μ| + 1) + 1⌉``. Here the means and
variances are plain tensors, so the Bayesian layers stay out of this package.

References:
    Louizos, Ullrich, Welling. Bayesian compression for deep learning. NeurIPS 2017
    ("we use the posterior uncertainties to determine the optimal fixed point precision
    to encode the weights") and its code release,
    github.com/KarenUllrich/Tutorial_BayesianCompressionForDL (``compression.py``).
    Heath. Scientific computing: an introductory survey. McGraw-Hill 1996, ch. 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MAX_SIGNIFICANT_BITS = 23  # float32's significand


@dataclass(frozen=True)
class BitPrecision:
    """A layer's float format: one sign bit, exponent bits and significand bits.

    Attributes:
        significant_bits: ``t``, from the posterior variances.
        exponent_bits: ``e``, from the largest posterior mean.
        weights: the kept weights encoded.
    """

    significant_bits: int
    exponent_bits: int
    weights: int

    @property
    def bits_per_weight(self) -> int:
        """``1 + e + t``."""
        return 1 + self.exponent_bits + self.significant_bits

    @property
    def bits(self) -> int:
        """All kept weights at this precision."""
        return self.bits_per_weight * self.weights


def significant_bits(variances: Tensor) -> Tensor:
    """Each weight's significand bits: how many unit round-offs ``2^−s`` (s = 1..23)
    exceed twice its posterior variance."""
    round_offs = 2.0 ** -torch.arange(1, MAX_SIGNIFICANT_BITS + 1, dtype=torch.float64)
    doubled = 2 * variances.detach().double().reshape(-1, 1)
    return (doubled < round_offs.to(doubled.device)).sum(dim=1)


def bayesian_bits(
    means: Tensor,
    variances: Tensor,
    mask: Tensor | None = None,
    *,
    largest_mean: float | None = None,
) -> BitPrecision:
    """The bit precision of a layer from its posterior means and variances.

    ``t = ⌈mean of t_w over the kept weights⌉`` significand bits (see the module) and
    ``e = ⌈log2(max(log2 m, 0) + 1) + 1⌉`` exponent bits, ``m`` the largest ``|μ|``. The
    authors' code takes ``log2 m`` as it is: for ``m ≤ 1/2`` its formula is undefined or
    below 1 bit, so it is clamped at 0 here (1 exponent bit, as for ``m ≤ 1``).

    Args:
        means: the posterior means of the weights.
        variances: their marginal posterior variances (the weights' shape).
        mask: the kept weights; all if None.
        largest_mean: ``m`` shared by several layers (the authors take the network's
            largest ``|μ|``); default the largest kept ``|μ|`` of this layer.

    Returns:
        A :class:`BitPrecision`.

    Raises:
        ValueError: shapes that differ, negative variances, or no kept weight.
    """
    mask = torch.ones_like(means, dtype=torch.bool) if mask is None else mask.bool()
    if not means.shape == variances.shape == mask.shape:
        raise ValueError(
            f"Expected means, variances and mask of one shape, got {tuple(means.shape)}, "
            f"{tuple(variances.shape)} and {tuple(mask.shape)}."
        )
    kept = int(mask.sum())
    if kept == 0:
        raise ValueError("Expected at least one kept weight, got an empty mask.")
    if bool((variances[mask] < 0).any()):
        raise ValueError("Expected non-negative variances; pass σ², not log σ².")
    significand = -(-int(significant_bits(variances[mask]).sum()) // kept)  # ⌈mean⌉, exact
    if largest_mean is None:
        largest_mean = float(means.detach()[mask].abs().max())
    magnitude = max(math.log2(largest_mean), 0.0) if largest_mean > 0 else 0.0
    exponent = math.ceil(math.log2(magnitude + 1) + 1)
    return BitPrecision(significand, exponent, kept)


def round_to_bits(means: Tensor, significant_bits: int) -> Tensor:
    """The means in fixed point with ``t`` fractional bits: ``⌊μ/δ + 1/2⌋ · δ``,
    ``δ = 2^−t`` (the authors' rounding of the weights for inference)."""
    step = 2.0**-significant_bits
    return torch.floor(means / step + 0.5) * step
