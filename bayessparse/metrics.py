"""Quality and calibration metrics of a classifier's predictive distribution."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayessparse.nn.base import SparseModule


@torch.no_grad()
def predict_logits(net: nn.Module, inputs: Tensor, batch_size: int = 1000) -> Tensor:
    """Logits of ``net`` on ``inputs`` in evaluation mode, computed in batches.

    The network's train/eval mode is restored afterwards.
    """
    was_training = net.training
    net.eval()
    try:
        return torch.cat([net(chunk) for chunk in inputs.split(batch_size)])
    finally:
        net.train(was_training)


def error_rate(logits: Tensor, labels: Tensor) -> float:
    """Fraction of examples whose arg-max class is wrong."""
    return float((logits.argmax(-1) != labels).double().mean())


def nll(logits: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood (cross-entropy) in nats."""
    return float(F.cross_entropy(logits.double(), labels))


def ece(logits: Tensor, labels: Tensor, num_bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins (Guo et al. 2017).

    ``sum_b |B_b| / n * |accuracy(B_b) - confidence(B_b)|`` over ``num_bins`` bins of the
    top-class probability.
    """
    if num_bins < 1:
        raise ValueError(f"Expected num_bins >= 1, got {num_bins!r}.")
    probs = logits.double().softmax(-1)
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).double()
    # Bin b holds confidences in (b/B, (b+1)/B]; confidence is > 0, so index 0..B-1.
    # sum_b |B_b|/n |acc_b - conf_b| = sum_b |sum_{i in b} correct_i - confidence_i| / n.
    bins = (confidence * num_bins).ceil().long().clamp(1, num_bins) - 1
    acc = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, correct)
    conf = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, confidence)
    return float((acc - conf).abs().sum() / labels.numel())


def classification_report(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Test error, NLL and ECE of ``logits`` against ``labels``."""
    return {
        "error": error_rate(logits, labels),
        "nll": nll(logits, labels),
        "ece": ece(logits, labels),
    }


@torch.no_grad()
def flops(net: nn.Module, example: Tensor) -> dict[str, int]:
    """Multiply-accumulates per example of the Linear/ConvNd layers of ``net`` on ``example``.

    ``dense`` counts every weight; ``nonzero`` counts only weights that are non-zero in the
    deterministic (eval-mode) network: masked weights of sparse layers and zeros of pruned
    or baked layers cost nothing on sparse hardware. Biases and activations are not counted.

    Args:
        net: any network; it is run once in eval mode on ``example``.
        example: an input batch (counts are divided by its batch size).
    """
    counts = {"dense": 0, "nonzero": 0}
    batch = example.shape[0]

    def hook(module: nn.Module, _: Any, output: Tensor) -> None:
        weight: Tensor = module.weight  # type: ignore[assignment]
        if isinstance(module, SparseModule):
            weight = module.dense_weight() * module.mask()
        # Each weight is used once per output position (and per example).
        positions = output.numel() // (batch * weight.shape[0])
        counts["dense"] += weight.numel() * positions
        counts["nonzero"] += int(weight.count_nonzero()) * positions

    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, layers)]
    try:
        predict_logits(net, example, batch_size=batch)
    finally:
        for handle in handles:
            handle.remove()
    return counts
