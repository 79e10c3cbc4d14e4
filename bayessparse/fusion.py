"""Per-weight maths fused into one pass by :func:`torch.compile`, on large tensors.

A sparse-VD KL and its gradient are a dozen elementwise operations per weight. Eager
PyTorch runs each as its own pass over memory, and on large layers those passes cost more
than the layer's matmuls. :class:`Fusible` runs a pure tensor function compiled (one
kernel for every shape, ``dynamic=True``) on tensors of at least :data:`MIN_NUMEL`
elements, and eagerly on smaller ones, when compiling is switched off, or after it failed
(no C++ compiler, an unsupported platform): the values agree to rounding either way.

The first compilation in a process takes seconds (later processes reuse torch's on-disk
cache). Switch it off with the environment variable ``BAYESSPARSE_COMPILE=0``; the test
suite does, except where it checks the compiled kernels against the eager ones.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# Below this many elements a compiled kernel saves less than a call costs.
MIN_NUMEL = 16_384


def compiling() -> bool:
    """Whether :class:`Fusible` functions may compile (``BAYESSPARSE_COMPILE`` is not 0)."""
    return os.environ.get("BAYESSPARSE_COMPILE", "1") != "0"


class Fusible:
    """``fn`` (tensors in, tensors out), compiled for large inputs, eager otherwise.

    Size is judged by the first argument, a tensor. Pass flat tensors (``reshape(-1)``),
    so that one compiled kernel serves every layer shape.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None
        self._failed = False

    def __call__(self, first: Tensor, *args: Any) -> Any:
        if self._failed or not compiling() or first.numel() < MIN_NUMEL:
            return self.fn(first, *args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True)
        try:
            return self._compiled(first, *args)
        except Exception as error:
            self._failed = True
            warnings.warn(
                f"torch.compile failed on {self.fn.__name__} ({type(error).__name__}: "
                f"{error}); bayessparse computes it eagerly from now on (same values, "
                "slower). Set BAYESSPARSE_COMPILE=0 to skip the attempt.",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.fn(first, *args)
