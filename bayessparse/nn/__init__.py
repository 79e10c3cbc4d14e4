"""Bayesian sparse layers: drop-in replacements for ``nn.Linear`` and ``nn.ConvNd``."""

from bayessparse.nn.attention import SparseMultiheadAttention
from bayessparse.nn.base import SparseModule
from bayessparse.nn.group import (
    GroupNJConv1d,
    GroupNJConv2d,
    GroupNJConv3d,
    GroupNJLinear,
    HorseshoeConv1d,
    HorseshoeConv2d,
    HorseshoeConv3d,
    HorseshoeLinear,
)
from bayessparse.nn.l0 import L0Conv1d, L0Conv2d, L0Conv3d, L0Linear
from bayessparse.nn.sbp import SBPConv1d, SBPConv2d, SBPConv3d, SBPLinear
from bayessparse.nn.spike_slab import (
    SpikeSlabConv1d,
    SpikeSlabConv2d,
    SpikeSlabConv3d,
    SpikeSlabLinear,
)
from bayessparse.nn.variational import (
    VariationalConv1d,
    VariationalConv2d,
    VariationalConv3d,
    VariationalLinear,
)

__all__ = [
    "GroupNJConv1d",
    "GroupNJConv2d",
    "GroupNJConv3d",
    "GroupNJLinear",
    "HorseshoeConv1d",
    "HorseshoeConv2d",
    "HorseshoeConv3d",
    "HorseshoeLinear",
    "L0Conv1d",
    "L0Conv2d",
    "L0Conv3d",
    "L0Linear",
    "SBPConv1d",
    "SBPConv2d",
    "SBPConv3d",
    "SBPLinear",
    "SparseModule",
    "SparseMultiheadAttention",
    "SpikeSlabConv1d",
    "SpikeSlabConv2d",
    "SpikeSlabConv3d",
    "SpikeSlabLinear",
    "VariationalConv1d",
    "VariationalConv2d",
    "VariationalConv3d",
    "VariationalLinear",
]
