"""Sparse variational dropout layers (Molchanov et al. 2017)."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from bayessparse.distributions.kl import (
    K1,
    _clamped_log_alpha,
    _kl_terms,
    _scaled_kl_grads,
    sparse_vd_kl_sum,
)
from bayessparse.fusion import Fusible
from bayessparse.nn.base import SparseModule, convolutions, torch_layer_type

# keep_prob = sigmoid(-log alpha) > sigmoid(-3)  <=>  log alpha < 3, the paper's rule.
SPARSE_VD_THRESHOLD = float(torch.sigmoid(torch.tensor(-3.0, dtype=torch.float64)))


def _clip(theta: Tensor, log_sigma2: Tensor, clip: bool) -> Tensor:
    """``keep = [log α < 3]`` as θ's dtype with ``clip``, else 1."""
    if not clip:
        return torch.ones_like(theta)
    return (log_sigma2 - torch.log(theta * theta + 1e-8) < 3.0).to(theta.dtype)


def _training_terms(theta: Tensor, log_sigma2: Tensor, clip: bool) -> tuple[Tensor, ...]:
    """A training pass's mean weight ``θ·keep``, variance ``σ²`` and KL sum, over flat
    tensors: one pass over the weights when compiled."""
    kl, _, _, variance = _kl_terms(theta, log_sigma2)
    return theta * _clip(theta, log_sigma2, clip), variance, kl.sum()


def _training_grads(
    grad_mean: Tensor,
    grad_variance: Tensor,
    grad_kl: Tensor,
    theta: Tensor,
    log_sigma2: Tensor,
    clip: bool,
) -> tuple[Tensor, Tensor]:
    """The gradients by θ and log σ² of a training pass, from its three outputs',
    recomputed from θ and log σ² (cheaper than storing the terms: one more read each)."""
    terms = _kl_terms(theta, log_sigma2)
    kl_grad_theta, kl_grad_log_sigma2 = _scaled_kl_grads(terms, theta, grad_kl)
    return (
        grad_mean * _clip(theta, log_sigma2, clip) + kl_grad_theta,
        grad_variance * terms[3] + kl_grad_log_sigma2,
    )


_fused_training_terms = Fusible(_training_terms)
_fused_training_grads = Fusible(_training_grads)


class _TrainingTerms(torch.autograd.Function):
    """A training pass's mean weight, variance and KL from θ and log σ², in one fused
    pass forward and one backward (the ``keep`` mask carries no gradient); it keeps no
    tensor but θ and log σ² for the backward."""

    @staticmethod
    def forward(ctx: Any, theta: Tensor, log_sigma2: Tensor, clip: bool) -> tuple[Tensor, ...]:
        mean, variance, kl = _fused_training_terms(theta.reshape(-1), log_sigma2.reshape(-1), clip)
        ctx.save_for_backward(theta, log_sigma2)
        ctx.clip = clip
        return mean.view_as(theta), variance.view_as(theta), kl + K1 * theta.numel()

    @staticmethod
    def backward(
        ctx: Any, grad_mean: Tensor | None, grad_variance: Tensor | None, grad_kl: Tensor | None
    ) -> tuple[Tensor, Tensor, None]:
        theta, log_sigma2 = ctx.saved_tensors
        zero = theta.new_zeros(())
        grads = _fused_training_grads(
            zero if grad_mean is None else grad_mean.reshape(-1),
            zero if grad_variance is None else grad_variance.reshape(-1),
            zero if grad_kl is None else grad_kl,
            theta.reshape(-1),
            log_sigma2.reshape(-1),
            ctx.clip,
        )
        return grads[0].view_as(theta), grads[1].view_as(theta), None


# The KL that a layer's last training pass computed with its weights, with the weights'
# versions then: kl() takes it instead of recomputing while they are unchanged. Kept
# outside the layer, so that copying or saving a layer never meets an autograd graph.
_PASS_KL: weakref.WeakKeyDictionary[SparseModule, tuple[tuple[int, int], Tensor]] = (
    weakref.WeakKeyDictionary()
)


class _SparseVD(SparseModule):
    r"""Sparse variational dropout maths, shared by the linear and conv layers.

    Posterior :math:`q(w_{ij}) = \mathcal N(\theta_{ij}, \sigma_{ij}^2)` with
    :math:`\log\alpha = \log\sigma^2 - \log\theta^2`, prior :math:`p(|w|)\propto 1/|w|`.
    Training uses the local reparameterization trick: the pre-activation
    :math:`b = \mathrm{op}(x, \theta) + \sqrt{\mathrm{op}(x^2, \sigma^2)}\,\varepsilon`
    is sampled directly, one independent draw per example and output unit.
    Evaluation is deterministic: :math:`\mathrm{op}(x, \theta\odot m)` with the mask
    :math:`m = [\log\alpha < 3]`.
    """

    default_threshold: float = SPARSE_VD_THRESHOLD
    per_weight_params: tuple[str, ...] = ("weight_log_sigma2",)
    weight_log_sigma2: nn.Parameter

    # Sparse layers subclass their torch layer first (``class VariationalLinear(nn.Linear,
    # _SparseVD)``) so that they are drop-in torch types. torch's __init__ then reaches this
    # mixin through ``super().__init__()`` with no arguments, so the mixin cannot define
    # __init__ itself: concrete classes bind these methods explicitly instead.
    def _construct(
        self, *args: Any, log_sigma2_init: float = -10.0, train_clip: bool = False, **kwargs: Any
    ) -> None:
        torch_layer_type(self).__init__(self, *args, **kwargs)
        self.log_sigma2_init = float(log_sigma2_init)
        self.train_clip = bool(train_clip)
        self.weight_log_sigma2 = nn.Parameter(torch.empty_like(self.weight))
        self._finish_construction()

    def _reset_posterior(self) -> None:
        with torch.no_grad():
            self.weight_log_sigma2.fill_(self.log_sigma2_init)

    @property
    def log_alpha(self) -> Tensor:
        """Noise-to-signal ratio log σ² − log θ², clamped to [−8, 8]. Higher means prune."""
        return _clamped_log_alpha(self.weight, self.weight_log_sigma2)

    def keep_prob(self) -> Tensor:
        """1 / (1 + α) = σ(−log α): the weight's signal share."""
        return torch.sigmoid(-self.log_alpha)

    def kl(self) -> Tensor:
        """Sum over weights of the Molchanov approximation to KL(q ‖ log-uniform).

        A pruned weight counts as θ = 0, whose KL is the clamped minimum (2e-4 nats).
        After a training pass it is the one that pass computed (same value, one pass
        over the weights less), while the weights are unchanged.
        """
        taken = _PASS_KL.pop(self, None)
        if taken is not None and taken[0] == self._posterior_versions():
            return taken[1]
        theta, pruned = self.weight, self._prune_mask("weight")
        if pruned is not None:
            theta = theta * pruned
        return sparse_vd_kl_sum(theta, self.weight_log_sigma2)

    def dense_weight(self) -> Tensor:
        """The posterior mean θ."""
        return self.weight

    def weight_variance(self) -> Tensor:
        """Each weight's posterior variance σ² (what Bayesian compression reads its bit
        precision from, :func:`~bayessparse.compression.bayesian_bits`)."""
        return self.weight_log_sigma2.exp()

    def _posterior_versions(self) -> tuple[int, int]:
        # In-place updates (optimiser steps, copy_) bump a tensor's version.
        return self.weight._version, self.weight_log_sigma2._version

    def forward(self, input: Tensor) -> Tensor:
        x = input
        self._check_input(x)
        theta, bias = self.weight, self.bias
        if not self.training:
            return self._op(x, theta * self.mask().to(theta.dtype), bias)
        log_sigma2 = self.weight_log_sigma2  # one PyroModule lookup (a pyro.param) per use
        if self._predicting:  # the predictive masks decide what is pruned
            variance = log_sigma2.exp()
        elif self._prune_mask("weight") is None:
            # With train_clip, drop already-pruned weights (log alpha >= 3) from the mean,
            # as the official LeNet recipes do. The KL comes from the same pass.
            theta, variance, kl = _TrainingTerms.apply(theta, log_sigma2, self.train_clip)
            _PASS_KL[self] = (self._posterior_versions(), kl)
        else:  # the KL must count pruned weights as zero: kl() computes it
            with torch.no_grad():
                keep = _clip(theta, log_sigma2, self.train_clip)
            theta, variance = theta * keep, log_sigma2.exp()
        mean = self._op(x, theta, bias)
        var = self._op(x * x, variance, None)
        return self._gaussian_sample(mean, var)


class VariationalLinear(nn.Linear, _SparseVD):
    """Sparse variational dropout ``nn.Linear`` (a :class:`~pyro.nn.PyroModule`).

    A drop-in replacement for :class:`torch.nn.Linear`: same constructor, ``weight`` is the
    posterior mean θ, and ``weight_log_sigma2`` holds log σ². See :class:`_SparseVD` for the
    maths.

    Args:
        in_features, out_features, bias, device, dtype: as for :class:`torch.nn.Linear`.
        log_sigma2_init: initial log σ² of every weight (the paper's −10).
        train_clip: also drop weights with log α ≥ 3 from the training mean, as the
            official LeNet recipes do.

    Example:
        >>> layer = VariationalLinear(784, 300)
        >>> layer.eval()(torch.randn(5, 784)).shape
        torch.Size([5, 300])

    References:
        Molchanov, Ashukha, Vetrov (2017), *Variational Dropout Sparsifies Deep Neural
        Networks*, ICML.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        log_sigma2_init: float = -10.0,
        train_clip: bool = False,
    ) -> None:
        self._construct(
            in_features,
            out_features,
            bias,
            device,
            dtype,
            log_sigma2_init=log_sigma2_init,
            train_clip=train_clip,
        )

    reset_parameters = SparseModule.reset_parameters
    forward = _SparseVD.forward


VariationalConv1d, VariationalConv2d, VariationalConv3d = convolutions(
    _SparseVD, VariationalLinear, "sparse variational dropout on every weight"
)
LAYERS: tuple[type[SparseModule], ...] = (
    VariationalLinear,
    VariationalConv1d,
    VariationalConv2d,
    VariationalConv3d,
)
