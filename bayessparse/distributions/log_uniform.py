"""The improper log-scale-uniform prior of sparse variational dropout."""

from __future__ import annotations

from typing import ClassVar

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import constraints
from torch.types import _size


class LogScaleUniform(TorchDistribution):
    r"""Improper prior with density :math:`p(|w|) \propto 1/|w|` on the real line.

    It is uniform on :math:`\log|w|`: the scale-invariant prior that makes Gaussian
    dropout with a learned noise level :math:`\alpha` a variational method
    (Kingma et al. 2015). It cannot be normalised, so :meth:`log_prob` is defined
    only up to an additive constant and :meth:`sample` raises. Its use is as the
    prior of a :class:`~torch.distributions.Normal` posterior, through
    ``kl_divergence(Normal(theta, sigma), LogScaleUniform())``, which is the
    Molchanov et al. (2017) approximation registered in :mod:`bayessparse.distributions.kl`.

    Args:
        batch_shape: batch shape of the (parameter-free) prior.

    Example:
        >>> q = torch.distributions.Normal(torch.tensor([1.0, 0.01]), 0.1)
        >>> kl = torch.distributions.kl_divergence(q, LogScaleUniform((2,)))
        >>> bool(kl[0] > kl[1])  # a weight with high signal-to-noise costs more
        True

    References:
        Kingma, Salimans, Welling (2015), *Variational Dropout and the Local
        Reparameterization Trick*. Molchanov, Ashukha, Vetrov (2017), *Variational
        Dropout Sparsifies Deep Neural Networks*.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {}
    support = constraints.real
    has_rsample = False

    def __init__(self, batch_shape: _size = (), validate_args: bool | None = None) -> None:
        super().__init__(torch.Size(batch_shape), torch.Size(), validate_args=validate_args)

    def expand(self, batch_shape: _size, _instance: object = None) -> LogScaleUniform:
        return LogScaleUniform(batch_shape, validate_args=self._validate_args)

    def log_prob(self, value: Tensor) -> Tensor:
        """Unnormalised log density ``-log|w|`` (the normaliser is infinite)."""
        if self._validate_args:
            self._validate_sample(value)
        return -value.abs().log()

    def sample(self, sample_shape: _size = ()) -> Tensor:
        raise NotImplementedError(
            "LogScaleUniform is an improper prior (p(|w|) ∝ 1/|w| cannot be normalised), "
            "so it has no samples. Use it only as the prior in kl_divergence(Normal(...), "
            "LogScaleUniform()), or sample from the posterior instead."
        )

    def rsample(self, sample_shape: _size = ()) -> Tensor:
        return self.sample(sample_shape)
