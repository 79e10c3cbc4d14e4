"""Max-pooling over non-overlapping windows as elementwise maxima, for faster inference.

torch's CPU max-pool kernel for contiguous (N, C, H, W) tensors is slow: on LeNet-5's
2×2 pools at batch 100 it takes 4–12× as long as two elementwise ``torch.maximum`` of
strided views, which give the same values (``benchmarks/compact_speed.py``). In a
compacted network, whose convolutions have lost most of their channels, the pools become
most of the forward time and hide the pruning's speed-up. :func:`block_max_pools_`
swaps such pools for :class:`BlockMaxPool`; :func:`~bayessparse.export` does so on the
network it writes, and ``evaluate`` on the dense network it times against, so that a
speed-up compares like with like.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


class BlockMaxPool(nn.Module):
    """The maximum over each non-overlapping window of the last ``len(kernel_size)``
    dimensions: ``nn.MaxPoolNd(kernel_size)`` (stride = kernel, no padding, floor mode),
    computed one dimension at a time as maxima of strided views.

    Args:
        kernel_size: the window, one size per pooled dimension.
    """

    def __init__(self, kernel_size: tuple[int, ...]) -> None:
        super().__init__()
        self.kernel_size = tuple(kernel_size)
        # (dimension from the end, window), the innermost first: its windows are
        # adjacent in memory; a window of 1 changes nothing.
        dims = enumerate(self.kernel_size, -len(self.kernel_size))
        self._windows = [(dim, size) for dim, size in reversed(list(dims)) if size > 1]

    def forward(self, input: Tensor) -> Tensor:
        x = input
        for dim, size in self._windows:
            windows = x.shape[dim] // size
            if x.shape[dim] != windows * size:  # floor mode: the last partial window goes
                x = x.narrow(dim, 0, windows * size)
            x = functools.reduce(torch.maximum, x.unflatten(dim, (windows, size)).unbind(dim))
        return x

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"


def block_max_pools_(net: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.MaxPool1d/2d/3d`` module of ``net`` whose windows do
    not overlap (stride equal to the kernel, no padding, no dilation, floor mode, no
    indices returned) by the equivalent :class:`BlockMaxPool`; other pools, and pooling
    called as a function inside a ``forward``, are left as they are. Returns ``net``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.MaxPool2d(3, 1))
        >>> x = torch.randn(2, 1, 9, 9)
        >>> expected = net(x)
        >>> block_max_pools_(net)[1:]
        Sequential(
          (1): BlockMaxPool(kernel_size=(2, 2))
          (2): MaxPool2d(kernel_size=3, stride=1, padding=0, dilation=1, ceil_mode=False)
        )
        >>> torch.equal(net(x), expected)
        True
    """
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            window = _block_window(child)
            if window is not None:
                setattr(parent, name, BlockMaxPool(window))
    return net


def _block_window(module: nn.Module) -> tuple[int, ...] | None:
    """The window of a max-pool module whose windows tile its input, else ``None``."""
    if not isinstance(module, _MAX_POOLS) or module.ceil_mode or module.return_indices:
        return None
    dims = next(i for i, kind in enumerate(_MAX_POOLS, 1) if isinstance(module, kind))
    kernel, stride, padding, dilation = (
        _per_dim(value, dims)
        for value in (module.kernel_size, module.stride, module.padding, module.dilation)
    )
    if stride != kernel or any(padding) or any(d != 1 for d in dilation):
        return None
    return kernel


def _per_dim(value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims
