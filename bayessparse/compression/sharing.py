"""Weight sharing by k-means, Deep Compression's second stage, and codebook fine-tuning.

The surviving weights of each layer are clustered by Lloyd's k-means on the real line,
from centroids spaced linearly between their minimum and maximum (the paper's best
initialisation: it keeps the few large weights, which matter most, their own
centroids). The layer then stores a codebook and one code per weight:
``W = codebook[index] · mask``. Fine-tuning trains the codebook: with ``W`` computed from
it, autograd gives each centroid the sum of the gradients of the weights that share it,
``∂L/∂c_k = Σ_{i: index_i = k} mask_i · ∂L/∂W_i`` (the paper's §3 and Figure 3), which
:func:`share_` arranges with :mod:`torch.nn.utils.parametrize`; :func:`bake_` turns
the layer back into a plain one.

Code 0 is the zero of the pruned weights and of the storage's filler entries, so a
``b``-bit layer has ``2^b − 1`` centroids (the paper counts ``2^b`` shared weights and
does not say which code its fillers hold).

References:
    Han, Mao, Dally. Deep compression: compressing deep neural networks with pruning,
    trained quantization and Huffman coding. ICLR 2016, §3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from bayessparse.pruning.base import current_mask, leaf_name

MAX_ITERATIONS = 100


@dataclass(frozen=True)
class SharedWeights:
    """A layer's weight as a codebook and codes: ``weight = codebook[index] · mask``.

    Attributes:
        codebook: ``(2^bits,)`` shared values; ``codebook[0]`` is 0.
        index: the code of each weight (int64, the weight's shape), 0 where pruned.
        mask: the kept weights (bool, the weight's shape).
    """

    codebook: Tensor
    index: Tensor
    mask: Tensor

    def weight(self) -> Tensor:
        """The weight the codes stand for."""
        return self.codebook[self.index] * self.mask

    @property
    def num_centroids(self) -> int:
        """Stored centroids: the codebook but its implicit zero."""
        return self.codebook.numel() - 1


def kmeans_1d(
    values: Tensor, num_clusters: int, max_iterations: int = MAX_ITERATIONS
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means of scalars from centroids spaced linearly over ``[min, max]``.

    Each iteration assigns every value to its nearest centroid (a binary search among
    the midpoints of the sorted centroids) and moves each centroid to the mean of its
    values; an empty cluster keeps its centroid. It stops when no assignment changes.

    Args:
        values: the values to cluster (any shape; flattened).
        num_clusters: ``k >= 1``.
        max_iterations: at most this many assignment steps.

    Returns:
        ``(centroids, assignment)``: ``k`` centroids in ascending order, the means of
        their values, and the cluster of each value.

    Raises:
        ValueError: ``num_clusters`` or ``max_iterations`` below 1.
    """
    for name, number in (("num_clusters", num_clusters), ("max_iterations", max_iterations)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"Expected {name} to be an integer >= 1, got {number!r}.")
    values = values.detach().reshape(-1)
    if values.numel() == 0:
        return values.new_zeros(num_clusters), values.new_zeros(0, dtype=torch.int64)
    centroids = torch.linspace(float(values.min()), float(values.max()), num_clusters)
    centroids = centroids.to(values)
    assignment = values.new_full(values.shape, -1, dtype=torch.int64)
    for _ in range(max_iterations):
        nearest = torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)
        if torch.equal(nearest, assignment):
            break
        assignment = nearest
        sums = values.new_zeros(num_clusters).index_add_(0, assignment, values)
        counts = torch.bincount(assignment, minlength=num_clusters)
        # Sorted again: rounding may swap two nearly equal means, and the search needs order.
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids).sort().values
    return centroids, assignment


def least_squares_codebook(weight: Tensor, index: Tensor, num_codes: int) -> Tensor:
    """The codebook closest to ``weight`` for given codes: each code's mean weight.

    A code with no weight gets 0; the weights of code 0, the pruned ones, are zero.
    """
    flat, codes = weight.detach().reshape(-1), index.reshape(-1)
    sums = flat.new_zeros(num_codes).index_add_(0, codes, flat)
    counts = torch.bincount(codes, minlength=num_codes)
    return torch.where(counts > 0, sums / counts.clamp(min=1), sums)


def share_weights(
    weight: Tensor,
    mask: Tensor | None = None,
    bits: int = 5,
    max_iterations: int = MAX_ITERATIONS,
) -> SharedWeights:
    """Cluster the kept weights into ``2^bits − 1`` shared values by :func:`kmeans_1d`.

    Args:
        weight: the weight (pruned entries are ignored).
        mask: the kept weights; all if None.
        bits: bits per code (paper: 8 for convolutions, 5 for fully connected layers).
        max_iterations: Lloyd iterations at most.

    Returns:
        The :class:`SharedWeights`; its codebook holds each cluster's mean.

    Raises:
        ValueError: ``bits`` outside 1..16, or a mask of another shape.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"Expected bits to be an integer in 1..16, got {bits!r}.")
    mask = torch.ones_like(weight, dtype=torch.bool) if mask is None else mask.bool()
    if mask.shape != weight.shape:
        raise ValueError(
            f"Expected a mask of the weight's shape {tuple(weight.shape)}, got "
            f"{tuple(mask.shape)}."
        )
    _, assignment = kmeans_1d(weight[mask], 2**bits - 1, max_iterations)
    index = torch.zeros_like(weight, dtype=torch.int64)
    index[mask] = assignment + 1
    codebook = least_squares_codebook(weight * mask, index, 2**bits)
    return SharedWeights(codebook, index, mask)


class CodebookWeight(nn.Module):
    """The parametrisation ``weight = codebook[index] · mask`` of a shared layer.

    Its ``right_inverse`` is :func:`least_squares_codebook`, so registering it on a
    layer turns the layer's weight into the codebook that reproduces it best.

    Args:
        index: the code of each weight.
        mask: the kept weights.
        num_codes: the codebook's size.
        was_pruned: whether the layer was pruned in :mod:`torch.nn.utils.prune` format,
            which :func:`bake_` restores.
    """

    index: Tensor
    mask: Tensor

    def __init__(self, index: Tensor, mask: Tensor, num_codes: int, was_pruned: bool) -> None:
        super().__init__()
        self.register_buffer("index", index)
        self.register_buffer("mask", mask)
        self.num_codes = num_codes
        self.was_pruned = was_pruned

    def forward(self, codebook: Tensor) -> Tensor:
        # index_select, whose backward is one index_add_: 50x faster on CPU than
        # codebook[index], whose backward is an accumulating index_put_.
        shared = codebook.index_select(0, self.index.reshape(-1)).view_as(self.index)
        return shared * self.mask

    def right_inverse(self, weight: Tensor) -> Tensor:
        return least_squares_codebook(weight * self.mask, self.index, self.num_codes)


def share_(
    module: nn.Module, bits: int = 5, max_iterations: int = MAX_ITERATIONS
) -> SharedWeights:
    """Share the kept weights of a Linear or Conv layer, in place, for fine-tuning.

    The layer's ``weight`` becomes ``codebook[index] · mask`` through a
    :mod:`torch.nn.utils.parametrize` parametrisation whose only parameter is the
    codebook (``module.parametrizations.weight.original``): an optimiser over the
    layer's parameters trains the centroids, each by the summed gradient of its weights.
    A layer pruned in :mod:`torch.nn.utils.prune` format keeps its mask in the
    parametrisation.

    Args:
        module: a layer with a ``weight``, plain or in prune format.
        bits: bits per code; ``2^bits − 1`` centroids.
        max_iterations: Lloyd iterations at most.

    Returns:
        The :class:`SharedWeights` at the start.
    """
    mask = current_mask(module)
    weight = getattr(module, leaf_name(module)).detach()  # weight_orig when pruned
    shared = share_weights(weight if mask is None else weight * mask, mask, bits, max_iterations)
    if mask is not None:
        torch_prune.remove(module, "weight")
    # The parametrisation's right_inverse turns the weight into shared.codebook.
    parametrization = CodebookWeight(
        shared.index, shared.mask, shared.codebook.numel(), was_pruned=mask is not None
    )
    parametrize.register_parametrization(module, "weight", parametrization)
    return shared


def shared_weights(module: nn.Module) -> SharedWeights:
    """The codebook and codes of a layer shared by :func:`share_`, as they are now."""
    parametrization, codebook = _codebook_weight(module)
    return SharedWeights(codebook.detach().clone(), parametrization.index, parametrization.mask)


def bake_(module: nn.Module) -> SharedWeights:
    """Undo :func:`share_`: a plain ``weight`` holding the shared values, in prune format
    again if it was; returns the final :class:`SharedWeights`."""
    was_pruned = _codebook_weight(module)[0].was_pruned
    shared = shared_weights(module)
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    if was_pruned:
        torch_prune.custom_from_mask(module, "weight", shared.mask)
    return shared


def _codebook_weight(module: nn.Module) -> tuple[CodebookWeight, Tensor]:
    """The layer's :class:`CodebookWeight` and the codebook it reads."""
    found = getattr(getattr(module, "parametrizations", None), "weight", None)
    if found is None or not isinstance(found[0], CodebookWeight):
        raise ValueError(
            f"Expected a layer shared by share_(), got {type(module).__name__} without a "
            "codebook parametrisation. Call share_(module, bits) first."
        )
    return found[0], found.original
