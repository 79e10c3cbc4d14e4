"""Compression beyond pruning: methods whose result is more than a mask.

Each takes a plain torch network (pruned in :mod:`torch.nn.utils.prune` format or not)
and counts what the result really stores:

* :func:`deep_compression` (Han, Mao, Dally 2016): k-means weight sharing with codebook
  fine-tuning (:func:`share_`, :func:`bake_`), Huffman coding (:func:`huffman_bits`),
  bytes per stage (:func:`storage_bytes`, relative indices with filler zeros);
* :func:`quantise_`: symmetric uniform quantisation (2–8 bits) and binarisation;
* :func:`bayesian_bits` (Louizos, Ullrich, Welling 2017): a layer's bit precision from
  its posterior variances, given as plain tensors;
* :class:`HashedLinear` (Chen et al. 2015): hashed weight sharing;
* :func:`factorise` / :func:`factorise_`: truncated SVD of Linear and Conv layers;
* :func:`distillation_loss` (Hinton, Vinyals, Dean 2015).

The package imports torch, numpy and the torch-only parts of bayessparse (the pruning
helpers): never Pyro, the Bayesian layers, the training loop or the harness.
"""

from bayessparse.compression.distillation import distillation_loss
from bayessparse.compression.hashing import HashedLinear
from bayessparse.compression.huffman import huffman_bits, huffman_lengths, symbol_counts
from bayessparse.compression.low_rank import Factorised, choose_rank, factorise, factorise_
from bayessparse.compression.pipeline import STAGES, CompressionReport, deep_compression
from bayessparse.compression.precision import BitPrecision, bayesian_bits, round_to_bits
from bayessparse.compression.quantise import binarise, quantise, quantise_
from bayessparse.compression.sharing import (
    CodebookWeight,
    SharedWeights,
    bake_,
    kmeans_1d,
    share_,
    share_weights,
    shared_weights,
)
from bayessparse.compression.storage import (
    LayerStorage,
    paper_bits,
    relative_indices,
    storage_bytes,
)

__all__ = [
    "STAGES",
    "BitPrecision",
    "CodebookWeight",
    "CompressionReport",
    "Factorised",
    "HashedLinear",
    "LayerStorage",
    "SharedWeights",
    "bake_",
    "bayesian_bits",
    "binarise",
    "choose_rank",
    "deep_compression",
    "distillation_loss",
    "factorise",
    "factorise_",
    "huffman_bits",
    "huffman_lengths",
    "kmeans_1d",
    "paper_bits",
    "quantise",
    "quantise_",
    "relative_indices",
    "round_to_bits",
    "share_",
    "share_weights",
    "shared_weights",
    "storage_bytes",
    "symbol_counts",
]
