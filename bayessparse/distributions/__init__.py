"""Sparsity-inducing priors and gates as :mod:`pyro.distributions`, and their KL divergences."""

from bayessparse.distributions.hard_concrete import HardConcrete
from bayessparse.distributions.horseshoe import Horseshoe, log_exp1_scaled
from bayessparse.distributions.kl import sparse_vd_kl
from bayessparse.distributions.log_uniform import LogScaleUniform
from bayessparse.distributions.truncated_log_normal import TruncatedLogNormal

__all__ = [
    "HardConcrete",
    "Horseshoe",
    "LogScaleUniform",
    "TruncatedLogNormal",
    "log_exp1_scaled",
    "sparse_vd_kl",
]
