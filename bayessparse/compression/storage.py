"""What a compressed layer really takes, counted bit by bit as Deep Compression does.

A pruned layer is stored as a stream of entries in the order of its flattened weight,
one per kept weight: a relative index (the distance from the previous entry, ``b`` bits)
and a value (a 32-bit float, or a code into a shared codebook). A distance larger than
``2^b`` cannot be written in ``b`` bits, so a filler entry holding a zero is stored every
``2^b`` positions along the gap (Han, Mao, Dally 2016, §2, Figure 2): a gap ``g`` costs
``⌈g / 2^b⌉`` entries. Distances run from a virtual entry before position 0, so each lies
in ``1 .. 2^b`` and is written as ``g − 1``. The codebook stores its centroids in 32
bits, the biases take 32 bits each, and either stream can be Huffman-coded
(:mod:`bayessparse.compression.huffman`). ``bits_per_index = 0`` is dense storage: every
position is an entry and none needs an index.

Reference point: the dense float32 layer, ``32 · (weights + biases)`` bits.

References:
    Han, Mao, Dally. Deep compression: compressing deep neural networks with pruning,
    trained quantization and Huffman coding. ICLR 2016.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bayessparse.compression.huffman import huffman_bits, symbol_counts

FLOAT_BITS = 32
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class LayerStorage:
    """The storage of one layer, in bits per part.

    Attributes:
        weights: entries of the dense weight.
        biases: entries of the bias (0 if none).
        nonzero: kept weights.
        fillers: filler zeros stored to bridge gaps longer than the index range.
        index_bits: bits of the relative indices.
        value_bits: bits of the stored values or codes (fillers included).
        codebook_bits: bits of the shared values (32 per centroid or scale).
        bias_bits: bits of the biases (32 each).
    """

    weights: int
    biases: int
    nonzero: int
    fillers: int
    index_bits: int
    value_bits: int
    codebook_bits: int
    bias_bits: int

    @property
    def bits(self) -> int:
        """All the bits the layer takes."""
        return self.index_bits + self.value_bits + self.codebook_bits + self.bias_bits

    @property
    def bytes(self) -> int:
        """``⌈bits / 8⌉``: the layer stored on its own, padded to a whole byte."""
        return -(-self.bits // 8)

    @property
    def dense_bytes(self) -> int:
        """The dense float32 layer: ``4 · (weights + biases)``."""
        return (self.weights + self.biases) * FLOAT_BITS // 8

    @property
    def compression_ratio(self) -> float:
        """``dense_bytes / bytes`` (infinite if nothing is left to store)."""
        return self.dense_bytes / self.bytes if self.bytes else math.inf


def relative_indices(mask: Tensor, bits_per_index: int) -> tuple[Tensor, Tensor]:
    """The entries storing the kept weights of ``mask`` with ``bits_per_index``-bit
    relative indices, fillers included (Han et al. 2016, Figure 2).

    Args:
        mask: which weights are kept, any shape; flattened in row-major order.
        bits_per_index: ``b``; distances up to ``2^b`` fit in one entry.

    Returns:
        ``(gaps, filler)``: each entry's distance from the previous one (``1 .. 2^b``,
        written as ``gap − 1``), and whether it is a filler zero.

    Example:
        >>> mask = torch.zeros(16, dtype=torch.bool)
        >>> mask[[1, 4, 15]] = True
        >>> gaps, filler = relative_indices(mask, 3)  # the paper's Figure 2
        >>> gaps.tolist(), filler.tolist()
        ([2, 3, 8, 3], [False, False, True, False])
    """
    _check_count("bits_per_index", bits_per_index)
    span = 2**bits_per_index
    positions = mask.bool().reshape(-1).nonzero().reshape(-1).cpu()
    gaps = torch.diff(positions, prepend=positions.new_full((1,), -1))
    entries = -(-gaps // span)  # ⌈g / 2^b⌉ entries per gap, the last one the weight
    last = entries.cumsum(0) - 1
    stream = torch.full((int(entries.sum()),), span, dtype=torch.int64)
    stream[last] = gaps - (entries - 1) * span
    filler = torch.ones_like(stream, dtype=torch.bool)
    filler[last] = False
    return stream, filler


def storage_bytes(
    mask: Tensor,
    *,
    bits_per_index: int,
    bits_per_value: int = FLOAT_BITS,
    codes: Tensor | None = None,
    codebook_size: int = 0,
    biases: int = 0,
    huffman: bool = False,
) -> LayerStorage:
    """The bytes a layer takes in Deep Compression's format (``.bytes`` of the result),
    part by part, with the dense float32 size and the compression ratio.

    Args:
        mask: the kept weights (boolean, the weight's shape).
        bits_per_index: bits of each relative index (paper: 8 conv, 5 fc; 0: dense).
        bits_per_value: bits of each stored value: 32 for float32 survivors, the code
            width for shared or quantised weights. Fillers take one value each.
        codes: the code of each weight (the weight's shape; read where ``mask`` is
            true), for Huffman coding the values; fillers store code 0, the zero.
        codebook_size: stored shared values (centroids, a scale), 32 bits each.
        biases: number of biases, 32 bits each.
        huffman: Huffman-code the relative indices, and the codes when given, instead
            of writing them in fixed width.

    Returns:
        The layer's :class:`LayerStorage`.

    Raises:
        ValueError: negative bit widths or counts, or ``codes`` of another shape.

    Example:
        >>> mask = torch.tensor([False, True, False, False, True])
        >>> storage_bytes(mask, bits_per_index=3, bits_per_value=32).bits  # 2·(3 + 32)
        70
    """
    _check_count("bits_per_value", bits_per_value)
    _check_count("codebook_size", codebook_size)
    _check_count("biases", biases)
    gaps, filler = relative_indices(mask, bits_per_index)
    entries = gaps.numel()
    index_bits = entries * bits_per_index
    value_bits = entries * bits_per_value
    if huffman and bits_per_index > 0:  # dense storage has no index stream to code
        index_bits = huffman_bits(symbol_counts(gaps - 1))
    if huffman and codes is not None:
        value_bits = huffman_bits(symbol_counts(_entry_codes(mask, codes, filler)))
    return LayerStorage(
        weights=mask.numel(),
        biases=biases,
        nonzero=entries - int(filler.sum()),
        fillers=int(filler.sum()),
        index_bits=index_bits,
        value_bits=value_bits,
        codebook_bits=codebook_size * FLOAT_BITS,
        bias_bits=biases * FLOAT_BITS,
    )


def paper_bits(module: nn.Module) -> int:
    """Deep Compression's bits for a layer's codes and relative indices: 8 for a
    convolution, 5 for a fully connected layer (Han et al. 2016, §2 and §3)."""
    return 8 if isinstance(module, CONV) else 5


def _entry_codes(mask: Tensor, codes: Tensor, filler: Tensor) -> Tensor:
    """The code of each stored entry: the kept weights' codes, 0 (zero) for fillers."""
    if codes.shape != mask.shape:
        raise ValueError(
            f"Expected codes of the mask's shape {tuple(mask.shape)}, got "
            f"{tuple(codes.shape)}. Pass one code per weight."
        )
    stream = torch.zeros(filler.shape, dtype=torch.int64)
    stream[~filler] = codes.reshape(-1)[mask.bool().reshape(-1)].long().cpu()
    return stream


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Expected {name} to be an integer >= 0, got {value!r}.")
