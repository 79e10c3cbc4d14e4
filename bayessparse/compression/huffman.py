"""Huffman coding of a stream of symbols, measured exactly: lengths and total bits.

Deep Compression's third stage Huffman-codes the weight codes and the relative indices
of each layer: frequent symbols get short codewords. Only the size matters here, so the
code is kept as its lengths; the size of a stream is ``Σ count_s · length_s`` bits.

References:
    Huffman. A method for the construction of minimum-redundancy codes. Proc. IRE 1952.
    Han, Mao, Dally. Deep compression: compressing deep neural networks with pruning,
    trained quantization and Huffman coding. ICLR 2016, §4.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch
from torch import Tensor


def huffman_lengths(counts: Tensor | Sequence[int]) -> Tensor:
    """The codeword length of each symbol in an optimal prefix code for ``counts``.

    Built with :mod:`heapq`: the two lightest subtrees merge until one is left, and every
    merge adds one bit to the codewords of the symbols under it. Ties break by insertion
    order, so the lengths are deterministic.

    Args:
        counts: how often each symbol ``0 .. n-1`` occurs (non-negative integers).

    Returns:
        An int64 tensor of lengths, 0 for the symbols that never occur; a stream of one
        distinct symbol gets 1 bit (a codeword cannot be empty).

    Raises:
        ValueError: if a count is negative.

    Example:
        >>> huffman_lengths([5, 2, 1, 1]).tolist()
        [1, 2, 3, 3]
    """
    counts = torch.as_tensor(counts, dtype=torch.int64).reshape(-1)
    if bool((counts < 0).any()):
        raise ValueError(f"Expected non-negative symbol counts, got {counts.tolist()!r}.")
    lengths = torch.zeros_like(counts)
    heap = [(int(c), s, [s]) for s, c in enumerate(counts.tolist()) if c > 0]
    if len(heap) == 1:
        lengths[heap[0][2]] = 1
    heapq.heapify(heap)
    order = len(counts)  # tie-breaker of merged subtrees, after every symbol
    while len(heap) > 1:
        weight_a, _, symbols_a = heapq.heappop(heap)
        weight_b, _, symbols_b = heapq.heappop(heap)
        merged = symbols_a + symbols_b
        lengths[merged] += 1
        heapq.heappush(heap, (weight_a + weight_b, order, merged))
        order += 1
    return lengths


def huffman_bits(counts: Tensor | Sequence[int]) -> int:
    """The exact size in bits of a stream Huffman-coded: ``Σ count_s · length_s``.

    The code table itself is not counted (as in Deep Compression's totals).

    Example:
        >>> huffman_bits([5, 2, 1, 1])  # lengths 1, 2, 3, 3
        15
    """
    counts = torch.as_tensor(counts, dtype=torch.int64).reshape(-1)
    return int((counts * huffman_lengths(counts)).sum())


def symbol_counts(stream: Tensor, num_symbols: int = 0) -> Tensor:
    """How often each symbol ``0 .. max`` (at least ``num_symbols`` of them) occurs in
    ``stream``, a tensor of non-negative integers."""
    return torch.bincount(stream.reshape(-1).long().cpu(), minlength=num_symbols)
