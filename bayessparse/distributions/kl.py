"""KL divergences to sparsity priors, registered with :func:`torch.distributions.register_kl`."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Normal, register_kl

from bayessparse.distributions.log_uniform import LogScaleUniform
from bayessparse.fusion import Fusible

# Molchanov et al. (2017), eq. 14: a sigmoid + softplus fit of the exact KL (up to a constant).
K1, K2, K3 = 0.63576, 1.87320, 1.48695

# Range of log alpha = log sigma^2 - log theta^2 in which the approximation is used. The
# official sparse-VD code clips to [-8, 8]: beyond it the KL is flat and the weight is decided.
LOG_ALPHA_MIN, LOG_ALPHA_MAX = -8.0, 8.0
INV_ALPHA_MIN, INV_ALPHA_MAX = math.exp(-LOG_ALPHA_MAX), math.exp(-LOG_ALPHA_MIN)


def sparse_vd_kl(log_alpha: Tensor) -> Tensor:
    r"""Elementwise KL of :math:`\mathcal N(\theta,\alpha\theta^2)` to :math:`p(|w|)\propto 1/|w|`.

    The exact value, :math:`-\tfrac12\log\alpha + \mathbb E_{\varepsilon\sim\mathcal N(1,\alpha)}
    \log|\varepsilon| + C`, has no closed form. This is Molchanov et al.'s approximation

    .. math:: -\mathrm{KL} \approx k_1\,\sigma(k_2 + k_3\log\alpha)
              - \tfrac12\log(1 + \alpha^{-1}) - k_1,

    with the constant chosen so that the KL tends to 0 as :math:`\alpha\to\infty` (maximum
    error about 0.007 nats per weight). It depends only on :math:`\log\alpha`.

    Args:
        log_alpha: noise-to-signal ratio :math:`\log\sigma^2 - \log\theta^2`, any shape.

    Returns:
        The KL per element, same shape as ``log_alpha``.
    """
    neg_kl = K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * F.softplus(-log_alpha) - K1
    return -neg_kl


@register_kl(Normal, LogScaleUniform)
def _kl_normal_log_scale_uniform(q: Normal, p: LogScaleUniform) -> Tensor:
    return sparse_vd_kl(_clamped_log_alpha(q.loc, 2 * q.scale.log()))


def _kl_terms(theta: Tensor, log_sigma2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per weight: the KL up to ``−K1``, ``d KL / d log α`` (zero where the clamp holds),
    ``θ² + 1e-8`` and ``σ²``; the shared start of the functions below."""
    theta_sq = theta * theta + 1e-8
    variance = log_sigma2.exp()
    log_alpha = log_sigma2 - torch.log(theta_sq)
    inside = (log_alpha > LOG_ALPHA_MIN) & (log_alpha < LOG_ALPHA_MAX)
    s = torch.sigmoid(K2 + K3 * log_alpha.clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX))
    # 1/α = θ²/σ², clamped as log α is: a division where exp(−log α) would cost one more
    # transcendental per weight (the fused kernels are compute-bound: 15 % faster).
    inv_alpha = (theta_sq / variance).clamp(INV_ALPHA_MIN, INV_ALPHA_MAX)
    # softplus(−log α) = log(1 + 1/α) and σ(−log α) = (1/α) / (1 + 1/α).
    kl = 0.5 * torch.log1p(inv_alpha) - K1 * s
    # d KL / d log α = −k1 k3 s (1 − s) − ½ σ(−log α).
    grad = torch.where(inside, -K1 * K3 * s * (1 - s) - 0.5 * inv_alpha / (1 + inv_alpha), 0.0)
    return kl, grad, theta_sq, variance


def _kl_sum(theta: Tensor, log_sigma2: Tensor) -> Tensor:
    """``Σ sparse_vd_kl − K1·n`` over flat tensors."""
    return _kl_terms(theta, log_sigma2)[0].sum()


def _kl_grads(theta: Tensor, log_sigma2: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """``scale`` times the gradients of :func:`_kl_sum` by θ and log σ²."""
    return _scaled_kl_grads(_kl_terms(theta, log_sigma2), theta, scale)


def _scaled_kl_grads(
    terms: tuple[Tensor, Tensor, Tensor, Tensor], theta: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`_kl_grads` from the :func:`_kl_terms` of θ and log σ²."""
    _, grad, theta_sq, _ = terms
    grad = grad * scale
    return grad * theta * (-2.0 / theta_sq), grad  # d log α / d θ = −2θ / (θ² + 1e-8)


_fused_kl_sum = Fusible(_kl_sum)
_fused_kl_grads = Fusible(_kl_grads)


class _SparseVDKLSum(torch.autograd.Function):
    """``sparse_vd_kl(log_alpha(theta, log_sigma2)).sum()`` with a backward that
    recomputes from the inputs: one fused pass over the weights each way (compiled for
    large layers), where autograd through the formula runs a dozen and keeps a dozen
    weight-sized intermediates alive."""

    @staticmethod
    def forward(ctx: Any, theta: Tensor, log_sigma2: Tensor) -> Tensor:
        ctx.save_for_backward(theta, log_sigma2)
        return _fused_kl_sum(theta.reshape(-1), log_sigma2.reshape(-1)) + K1 * theta.numel()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, Tensor]:
        theta, log_sigma2 = ctx.saved_tensors
        grads = _fused_kl_grads(theta.reshape(-1), log_sigma2.reshape(-1), grad_output)
        return grads[0].view_as(theta), grads[1].view_as(theta)


def _clamped_log_alpha(theta: Tensor, log_sigma2: Tensor) -> Tensor:
    # 1e-8 keeps log(theta^2) finite at theta = 0; the clamp (as in the official code)
    # stops the KL from chasing weights that are already decided.
    log_alpha = log_sigma2 - torch.log(theta * theta + 1e-8)
    return log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)


def sparse_vd_kl_sum(theta: Tensor, log_sigma2: Tensor) -> Tensor:
    r"""Total sparse-VD KL of a weight tensor, :math:`\sum_{ij}` :func:`sparse_vd_kl` of
    :math:`\log\alpha_{ij} = \mathrm{clamp}(\log\sigma^2_{ij} - \log(\theta_{ij}^2 + 10^{-8}),
    -8, 8)`, in one fused pass over the weights forward and one backward, which
    recomputes from the inputs (same values and gradients as autograd through the
    formula, in a fraction of the memory and time; compiled by :mod:`bayessparse.fusion`
    for large tensors).

    Args:
        theta: posterior means.
        log_sigma2: posterior log variances, same shape.

    Returns:
        A scalar tensor.
    """
    return _SparseVDKLSum.apply(theta, log_sigma2)
