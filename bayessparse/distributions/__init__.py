"""Sparsity-inducing priors as :mod:`pyro.distributions` and their KL divergences."""

from bayessparse.distributions.kl import sparse_vd_kl
from bayessparse.distributions.log_uniform import LogScaleUniform

__all__ = ["LogScaleUniform", "sparse_vd_kl"]
