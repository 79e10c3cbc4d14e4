"""What a bench row measures on a finished network: quality, size, FLOPs, speed."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from bayessparse.compaction import compact_pruned
from bayessparse.metrics import classification_report, flops, predict_logits, speedup
from bayessparse.pruning.base import prunable_layers, trained_weight

TIMING_BATCH = 100


def measure(net: nn.Module, dense: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Any]:
    """Test metrics and cost of a plain (possibly pruned) network.

    Args:
        net: the final network, plain torch layers, pruned in
            :mod:`torch.nn.utils.prune` format or with zeros in its weights.
        dense: an unpruned network of the same architecture (the speed reference).
        images, labels: the test set.

    Returns:
        ``error``, ``nll``, ``ece`` (15 bins), ``brier``; ``weights`` (of the Linear and
        Conv layers, biases not counted), ``nonzero``, ``achieved_sparsity``,
        ``compression`` (``weights / nonzero``); ``flops_dense`` and ``flops_nonzero``
        (MACs per example); ``architecture`` (the compacted net's units, papers'
        notation: a hidden unit whose row is pruned is gone, its column in the next layer too);
        ``params`` and ``compact_params`` (all parameters before and after
        compaction); ``speedup`` (CPU time of ``dense`` over the compacted net's).
    """
    net.eval()
    report = classification_report(predict_logits(net, images), labels)
    weights = [trained_weight(layer) for layer in prunable_layers(net).values()]
    total = sum(w.numel() for w in weights)
    nonzero = sum(int(w.count_nonzero()) for w in weights)
    cost = flops(net, images[:1])
    small = compact_pruned(net).eval()
    return {
        **report,
        "weights": total,
        "nonzero": nonzero,
        "achieved_sparsity": 1 - nonzero / total,
        "compression": total / nonzero if nonzero else float("inf"),
        "flops_dense": int(cost["dense"]),
        "flops_nonzero": int(cost["nonzero"]),
        "architecture": architecture(small),
        "params": parameter_count(dense),
        "compact_params": parameter_count(small),
        "speedup": speedup(dense.eval(), small, images[:TIMING_BATCH]),
    }


def architecture(net: nn.Module) -> str:
    """Kept units in the papers' notation: the output channels of each convolution, then
    the input units of each linear layer, a unit kept if any of its weights is non-zero
    (e.g. ``20-50-800-500`` for a dense LeNet-5-Caffe)."""
    units = []
    for layer in prunable_layers(net).values():
        used = trained_weight(layer) != 0
        if isinstance(layer, nn.Linear):
            units.append(int(used.any(0).sum()))
        else:
            units.append(int(used.flatten(1).any(1).sum()))
    return "-".join(str(u) for u in units)


def parameter_count(net: nn.Module) -> int:
    """Parameters of ``net``; a pruned layer counts its weight once (not the mask)."""
    return sum(p.numel() for p in net.parameters())
