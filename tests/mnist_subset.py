"""A small slice of the bundled MNIST written to disk, for tests that need a --data-dir."""

from __future__ import annotations

import functools
from pathlib import Path

from bayessparse.data import Split, load_mnist, save_mnist


@functools.cache
def _subset(n_train: int, n_test: int) -> dict[str, Split]:
    sizes = {"train": n_train, "test": n_test}
    # Clones, so the cache does not keep the full 60000 images alive through the slices.
    return {
        name: Split(split.images[: sizes[name]].clone(), split.labels[: sizes[name]].clone())
        for name, split in load_mnist().items()
    }


def write_mnist_subset(root: Path, n_train: int = 600, n_test: int = 200) -> Path:
    """Write the first ``n_train`` training and ``n_test`` test examples of MNIST to ``root``.

    The bundled copy is read once per size per test session (about a second); each call
    after that only writes the small files. Returns ``root``, ready for ``load_mnist`` or
    the CLI's ``--data-dir``.
    """
    return save_mnist(_subset(n_train, n_test), root)
