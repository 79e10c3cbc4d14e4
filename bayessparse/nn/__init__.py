"""Bayesian sparse layers: drop-in replacements for ``nn.Linear`` and ``nn.ConvNd``."""

from bayessparse.nn.base import SparseModule
from bayessparse.nn.variational import (
    VariationalConv1d,
    VariationalConv2d,
    VariationalConv3d,
    VariationalLinear,
)

__all__ = [
    "SparseModule",
    "VariationalConv1d",
    "VariationalConv2d",
    "VariationalConv3d",
    "VariationalLinear",
]
