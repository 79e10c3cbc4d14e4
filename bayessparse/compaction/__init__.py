"""Compaction: a pruned network as a physically smaller plain torch network.

Two entry points:

* :func:`compact_pruned` (:mod:`bayessparse.compaction.pruned`, torch only) takes a plain
  torch network pruned in :mod:`torch.nn.utils.prune` format or with zeros in its
  weights, and removes the neurons and channels that do not change its output.
* :func:`compact` is the convenience entry for Bayesian networks: it thresholds the
  sparse layers with :func:`~bayessparse.to_dense` (the same selection arguments) and
  compacts the result.

:func:`block_max_pools_` (:mod:`bayessparse.compaction.pooling`) then swaps max-pools over
non-overlapping windows for :class:`BlockMaxPool`, the same values computed several times
faster on CPU; :func:`~bayessparse.export` does it on the network it writes.

The torch-only part imports neither Pyro nor the Bayesian layers
(``tests/test_architecture.py``). Its contract: the compacted network's eval-mode output
equals the masked network's (float64 to 1e-10, float32 to 1e-5), it has fewer weights,
and it never changes the output silently. A closed channel followed by batch norm is not
zero after it (BN adds ``β − γ·μ/σ``): such constants are folded into the bias of the
layer that reads them where that is exact (a linear layer; a convolution without zero
padding, or a zero constant), and the channel is kept where it is not.

Why :mod:`torch.fx` and not Torch-Pruning. Torch-Pruning (``torch-pruning`` on PyPI) builds
a dependency graph by tracing autograd with example inputs and removes whatever channel
indices it is given, with the coupled layers (skip additions, batch norms, flattens).
It does not decide which channels can go without changing the output: asked to remove a
closed channel before a batch norm, it drops the norm's shift ``β − γ·μ/σ`` and the
output changes silently (measured: 0.024 on a small residual block); it cannot fold
constants into biases, nor remove unread inputs of the network (the index-select), and
it needs example inputs, which :func:`compact` has never asked for. That decision is the
core of compaction, and it needs each operation's meaning (which map a constant to a
constant, where padding breaks it), which :mod:`torch.fx` exposes as a plain graph of
module and function calls: part of torch, no new dependency, no example input, and a
public API to rewrite the graph (insert the index-select, swap in cut layers). Cutting
the few layer types the analysis understands (Linear, ConvNd, BatchNormNd) is a few
lines of slicing; what fx cannot trace, or the analysis does not understand, is kept.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from bayessparse.compaction.pooling import BlockMaxPool, block_max_pools_
from bayessparse.compaction.pruned import Select, compact_pruned
from bayessparse.masks import to_dense

__all__ = ["BlockMaxPool", "Select", "block_max_pools_", "compact", "compact_pruned"]


def compact(
    net: nn.Module,
    threshold: float | Mapping[str, float] | None = None,
    *,
    sparsity: float | None = None,
    scope: str = "global",
) -> nn.Module:
    """A physically smaller plain torch network computing the same function as the masked one.

    The sparse layers are thresholded (:func:`~bayessparse.to_dense`, with the selection
    arguments of :func:`~bayessparse.masks`) and the plain network compacted by
    :func:`compact_pruned`, which says what is removed. A plain network (pruned with
    :mod:`torch.nn.utils.prune`, or not) is compacted as it is.

    Args:
        net: a network with Bayesian sparse layers, or a plain one (it is not modified).
        threshold: keep-probability cut for the sparse layers, or ``{layer name or
            state_dict key: cut}`` (``None``: their default).
        sparsity: instead of a threshold, the fraction of the sparse layers' weights to
            prune, in [0, 1), ranked by keep-probability.
        scope: with ``sparsity``, ``"global"`` or ``"layer"``.

    Returns:
        The compacted network (see :func:`compact_pruned`): ``compact(net)(x)`` equals
        ``net.eval()(x)`` up to floating-point summation order.

    Raises:
        TypeError: for a network :mod:`torch.fx` cannot trace.
        ValueError: for a bad selection, as :func:`~bayessparse.masks`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import bayessparse as bs
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> keep = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 1]])
        >>> _ = nn.utils.prune.custom_from_mask(net[0], "weight", keep)  # unit 1 is dead
        >>> small = bs.compact(net)
        >>> small[0], small[2].in_features
        (Linear(in_features=4, out_features=2, bias=True), 2)
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(small(x), net(x), atol=1e-6)
        True
    """
    return compact_pruned(to_dense(net, threshold, sparsity=sparsity, scope=scope))
