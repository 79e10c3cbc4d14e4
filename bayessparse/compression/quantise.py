"""Uniform quantisation and binarisation of the surviving weights, with their storage.

Symmetric ``b``-bit quantisation with one scale per layer, ``s = max|w| / Q`` over the
kept weights with ``Q = 2^(b−1) − 1``, rounds each weight to ``s · clamp(round(w / s),
−Q, Q)``: ``2Q + 1 = 2^b − 1`` levels, zero among them, so every code fits in ``b``
bits and a pruned weight stays exactly zero. Binarisation (1 bit) keeps the sign and one
scale, the mean magnitude of the kept weights, ``α · sign(w)`` with ``α = mean |w|``:
the scale of XNOR-Net, which minimises ``‖w − α·sign(w)‖²``; BinaryConnect uses
``sign(w)`` unscaled.

References:
    Courbariaux, Bengio, David. BinaryConnect: training deep neural networks with binary
    weights during propagations. NeurIPS 2015.
    Rastegari, Ordonez, Redmon, Farhadi. XNOR-Net: ImageNet classification using binary
    convolutional neural networks. ECCV 2016, §3.1 (α = mean |w|).
    Krishnamoorthi. Quantizing deep convolutional networks for efficient inference: a
    whitepaper. arXiv:1806.08342, 2018 (the uniform symmetric quantiser; here with the
    restricted range ±Q, so that the levels are symmetric about zero).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bayessparse.compression.storage import (
    LayerStorage,
    paper_bits,
    relative_indices,
    storage_bytes,
)
from bayessparse.pruning.base import (
    current_mask,
    leaf_name,
    param_key,
    prunable_layers,
    recompute_pruned_,
)

MIN_BITS, MAX_BITS = 2, 8


def quantise(weight: Tensor, bits: int, mask: Tensor | None = None) -> Tensor:
    """``weight`` quantised to ``bits`` bits, symmetric with one scale; pruned entries 0.

    Args:
        weight: any tensor.
        bits: 2 to 8 (for 1 bit, :func:`binarise`).
        mask: the kept weights; all if None. The scale is computed from them only.

    Returns:
        ``s · clamp(round(w / s), −Q, Q) · mask`` with ``Q = 2^(bits−1) − 1`` and
        ``s = max |w| / Q`` over the kept weights (ties round to even).

    Raises:
        ValueError: ``bits`` outside 2..8.

    Example:
        >>> quantise(torch.tensor([-1.0, 0.4, 0.1]), 2).tolist()  # levels −1, 0, 1
        [-1.0, 0.0, 0.0]
    """
    _check_bits(bits, MIN_BITS, "For 1 bit use binarise().")
    mask = _mask(weight, mask)
    levels = 2 ** (bits - 1) - 1
    largest = (weight.detach().abs() * mask).amax() if weight.numel() else weight.new_zeros(())
    if float(largest) == 0:
        return torch.zeros_like(weight)
    scale = largest / levels
    return torch.round(weight / scale).clamp(-levels, levels) * scale * mask


def binarise(weight: Tensor, mask: Tensor | None = None) -> Tensor:
    """``α · sign(w)`` on the kept weights, ``α`` = their mean magnitude; pruned ones 0.

    A kept weight of exactly 0 becomes ``+α`` (one bit has no zero).
    """
    mask = _mask(weight, mask)
    kept = weight.detach()[mask]
    scale = kept.abs().mean() if kept.numel() else weight.new_zeros(())
    return torch.where(weight >= 0, scale, -scale) * mask


def quantise_(
    net: nn.Module, bits: int, *, index_bits: int | None = None
) -> dict[str, LayerStorage]:
    """Quantise (``bits`` 2..8) or binarise (``bits`` 1) every Linear and Conv layer of
    ``net`` in place, pruned ones within their masks, and count their storage.

    Each layer stores its scale (32 bits), its biases (32 bits each) and ``bits`` per
    stored value. Pruned layers store the kept weights with relative indices and fillers
    (:func:`~bayessparse.compression.storage_bytes`); layers with no pruned weight are
    dense. A binarised pruned layer with fillers needs a third symbol, zero, for them:
    its values take 2 bits.

    Args:
        net: a network, pruned in :mod:`torch.nn.utils.prune` format or not.
        bits: 1 (binarise) to 8.
        index_bits: bits per relative index; default 8 for convolutions, 5 for fully
            connected layers (Deep Compression's).

    Returns:
        ``{weight key: LayerStorage}`` of the quantised layers.
    """
    _check_bits(bits, 1, "")
    storage = {}
    for name, module in prunable_layers(net).items():
        mask = current_mask(module)
        weight = getattr(module, leaf_name(module))
        with torch.no_grad():
            weight.copy_(binarise(weight, mask) if bits == 1 else quantise(weight, bits, mask))
        kept = _mask(weight, mask)
        per_index = paper_bits(module) if index_bits is None else index_bits
        per_index = 0 if bool(kept.all()) else per_index  # dense: no index needed
        _, filler = relative_indices(kept, per_index)
        per_value = 2 if bits == 1 and bool(filler.any()) else bits  # ±α and the fillers' 0
        bias = getattr(module, "bias", None)
        storage[param_key(name)] = storage_bytes(
            kept,
            bits_per_index=per_index,
            bits_per_value=per_value,
            codebook_size=1,
            biases=bias.numel() if isinstance(bias, Tensor) else 0,
        )
    recompute_pruned_(net)
    return storage


def _check_bits(bits: int, low: int, hint: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= MAX_BITS:
        raise ValueError(
            f"Expected bits to be an integer in {low}..{MAX_BITS}, got {bits!r}. {hint}".strip()
        )


def _mask(weight: Tensor, mask: Tensor | None) -> Tensor:
    """``mask`` as booleans on ``weight``'s device, or all true."""
    if mask is None:
        return torch.ones_like(weight, dtype=torch.bool)
    if mask.shape != weight.shape:
        raise ValueError(
            f"Expected a mask of the weight's shape {tuple(weight.shape)}, got "
            f"{tuple(mask.shape)}."
        )
    return mask.to(device=weight.device, dtype=torch.bool)
