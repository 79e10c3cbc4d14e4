"""Reuse of freed tensor memory on CPU (glibc's malloc), so that a step's large tensors
are not fresh pages every step.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves blocks above its
mmap threshold (128 KiB, raised adaptively up to 32 MiB) with fresh ``mmap`` pages and
gives them back on ``free``: a step that allocates the same weight-sized tensors every
time (a sparse-VD pass's mean weight and variance, their gradients) then pays a page
fault and the kernel's zeroing for every 4 KiB of each. On a 784-4000-4000-10 MLP
(19 M weights) that was 94,000 page faults per SVI step (370 MiB) and about a third of
its time. :func:`keep_freed_memory` raises the mmap threshold to 1 GiB and the trim
threshold to 2 GiB, so that large blocks come from the heap and a freed one is reused
by the next step: no page faults after the first steps.

The cost is that the process keeps its peak heap instead of returning freed memory to
the system. :func:`~bayessparse.training.train` calls it once per process; set the
environment variable ``BAYESSPARSE_MALLOPT=0`` to keep glibc's defaults. Elsewhere than
glibc (macOS, musl, Windows) it does nothing; PyTorch's tuning guide's alternatives
(jemalloc or tcmalloc by ``LD_PRELOAD``, ``THP_MEM_ALLOC_ENABLE=1``) apply there.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 1 << 31

_applied = False


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve and keep large blocks in its heap (module docstring);
    once per process. Returns whether the setting is in effect."""
    global _applied
    if _applied:
        return True
    if os.environ.get("BAYESSPARSE_MALLOPT", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    # musl's mallopt is a stub that returns 0: nothing is changed there.
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _applied
