"""HashedNets: a Linear layer whose weights are drawn from a few shared parameters.

The layer's virtual weight matrix ``V`` (``out × in``) is never stored: each entry reads
one of ``K`` real parameters through a hash, with a hashed sign,

    V_ij = ξ(i, j) · w_{h(i, j)},   h(i, j) ∈ {0 .. K−1},   ξ(i, j) ∈ {−1, +1},

so the layer holds ``K`` weights whatever its size, and the gradient of each parameter
is the signed sum of the gradients of the entries that read it,
``∂L/∂w_k = Σ_{h(i,j)=k} ξ(i, j) · ∂L/∂V_ij`` (autograd of the gather gives exactly
that). ``h`` and ``ξ`` are fixed, seeded integer hashes of the flat position ``i·in + j``
(MurmurHash3's 32-bit finaliser; the paper uses xxHash), computed once into buffers.

References:
    Chen, Wilson, Tyree, Weinberger, Chen. Compressing neural networks with the hashing
    trick. ICML 2015.
    Appleby. MurmurHash3 (2011): the ``fmix32`` finaliser.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

GOLDEN = 0x9E3779B9  # separates the seeds of the two hashes


def hash32(keys: np.ndarray, seed: int) -> np.ndarray:
    """MurmurHash3's ``fmix32`` of ``keys ^ fmix32(seed)``: seeded uint32 hashes.

    Args:
        keys: non-negative integers below 2^32.
        seed: any integer (taken modulo 2^32).
    """

    def fmix32(x: np.ndarray) -> np.ndarray:
        # uint32 array arithmetic wraps modulo 2^32, as the hash intends.
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x85EBCA6B)
        x = x ^ (x >> np.uint32(13))
        x = x * np.uint32(0xC2B2AE35)
        return x ^ (x >> np.uint32(16))

    mixed_seed = fmix32(np.array([seed % 2**32], dtype=np.uint32))
    return fmix32(keys.astype(np.uint32) ^ mixed_seed)


class HashedLinear(nn.Module):
    """A Linear layer with ``num_weights`` real parameters behind its ``out × in``
    virtual weight matrix (Chen et al. 2015): ``y = x Vᵀ + b``.

    Args:
        in_features: inputs.
        out_features: outputs.
        num_weights: ``K``, the real parameters (the compression is ``out·in / K``).
        bias: whether to add a (not hashed) bias, as the paper's layers do.
        seed: seeds ``h`` and ``ξ``; one seed gives one layout.

    Attributes:
        weight: the ``K`` real parameters, drawn like ``nn.Linear``'s weights,
            ``U(−1/√in, 1/√in)``, so that ``V`` has their distribution.
        bucket: ``h(i, j)``, int64 buffer ``(out, in)``.
        sign: ``ξ(i, j)``, ±1 buffer ``(out, in)``.

    Raises:
        ValueError: sizes below 1, or more than 2^32 virtual weights.
    """

    bucket: Tensor
    sign: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_weights: int,
        bias: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, size in (
            ("in_features", in_features),
            ("out_features", out_features),
            ("num_weights", num_weights),
        ):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"Expected {name} to be an integer >= 1, got {size!r}.")
        if in_features * out_features > 2**32:
            raise ValueError(
                f"Expected at most 2^32 virtual weights, got {out_features} x {in_features}. "
                "Split the layer."
            )
        self.in_features, self.out_features, self.seed = in_features, out_features, seed
        positions = np.arange(out_features * in_features, dtype=np.uint64)
        bucket = hash32(positions, seed) % np.uint32(num_weights)
        sign = 1.0 - 2.0 * (hash32(positions, seed + GOLDEN) >> np.uint32(31))
        shape = (out_features, in_features)
        self.register_buffer("bucket", torch.from_numpy(bucket.astype(np.int64)).reshape(shape))
        self.register_buffer("sign", torch.from_numpy(sign.astype(np.float32)).reshape(shape))
        bound = 1 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(num_weights).uniform_(-bound, bound))
        self.bias = (
            nn.Parameter(torch.empty(out_features).uniform_(-bound, bound)) if bias else None
        )

    def expanded_weight(self) -> Tensor:
        """The virtual weight matrix ``V_ij = ξ(i, j) · w_{h(i, j)}``."""
        # index_select, whose backward is one index_add_: 15x faster on CPU than
        # weight[bucket], whose backward is an accumulating index_put_.
        shared = self.weight.index_select(0, self.bucket.reshape(-1)).view_as(self.bucket)
        return self.sign.to(self.weight.dtype) * shared

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.expanded_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_weights={self.weight.numel()}, bias={self.bias is not None}, seed={self.seed}"
        )
