"""The training set as the loop reads it: tensors, or a ``torch.utils.data.Dataset``.

The loop draws each epoch's order of example indices from its own seeded generator and
asks for the examples of each mini-batch by index, so a resumed run (or a run split over
processes) reads exactly the same batches. A ``DataLoader`` brings its own order and is
refused: pass its ``dataset``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sized
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

from bayessparse.training.storage import fingerprint


class TensorData:
    """Images and labels held in two tensors (checked by the caller)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self.images[indices], self.labels[indices]

    def fingerprint(self) -> str:
        return fingerprint(self.images, self.labels)


class DatasetData:
    """A map-style dataset of ``(input, label)`` pairs, read one mini-batch at a time.

    Examples are read by index and stacked by ``default_collate``; each batch's labels
    are checked as they arrive. A resumed run must see the same data: its identity is the
    dataset's class, length, and first and last examples (reading all of it would cost a
    pass over the data).

    Args:
        dataset: the training set.
        classes: the network's number of outputs, which the labels must index.
    """

    def __init__(self, dataset: Dataset, classes: int) -> None:
        self.dataset, self.classes = dataset, classes

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        items = [self.example(i) for i in indices.tolist()]
        images, labels = default_collate(items)
        return images, check_labels(torch.as_tensor(labels), self.classes, indices)

    def example(self, index: int) -> tuple[Any, Any]:
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(
                f"Expected the dataset to give (input, label) pairs, got "
                f"{type(item).__name__} at index {index}. Return (x, y) from __getitem__."
            )
        return item[0], item[1]

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{type(self.dataset).__qualname__} {len(self)};".encode())
        for index in sorted({0, len(self) - 1}):
            x, y = self.example(index)
            h.update(fingerprint(torch.as_tensor(x), torch.as_tensor(y).reshape(-1)).encode())
        return h.hexdigest()


def check_labels(labels: Tensor, classes: int, indices: Tensor) -> Tensor:
    """``labels`` as int64 class indices in ``[0, classes)``.

    Raises:
        TypeError: labels that are not integers.
        ValueError: labels outside ``[0, classes)``, naming the dataset index of one.
    """
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(
            f"Expected integer class labels, got dataset labels of dtype {labels.dtype}. "
            "Return int labels (or torch.long tensors) from the dataset."
        )
    if labels.dim() != 1:
        raise ValueError(
            f"Expected one class index per example, got labels of shape "
            f"{tuple(labels.shape[1:])} per example. Return a single int label."
        )
    bad = (labels < 0) | (labels >= classes)
    if bool(bad.any()):
        position = int(bad.nonzero()[0])
        raise ValueError(
            f"Dataset labels must be class indices 0..{classes - 1} for a network with "
            f"{classes} outputs; example {int(indices[position])} has label "
            f"{int(labels[position])}. Fix the labels or the network's output size."
        )
    return labels.long()


def check_dataset(dataset: Any, labels: Any) -> Dataset:
    """``dataset`` if the loop can read it by index.

    Raises:
        TypeError: a ``DataLoader``, an iterable-style dataset, a dataset without a
            length, or labels given besides a dataset.
        ValueError: an empty dataset.
    """
    if isinstance(dataset, DataLoader):
        raise TypeError(
            "Expected images and labels, or a Dataset, got a DataLoader: the training loop "
            "draws its own seeded batch order (so that resuming is exact). Pass "
            "loader.dataset, and the batch size as batch_size."
        )
    if labels is not None:
        raise TypeError(
            f"Expected labels=None with a Dataset (it gives (input, label) pairs), got "
            f"{type(labels).__name__} labels. Drop the labels argument."
        )
    if isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized):
        raise TypeError(
            f"Expected a map-style Dataset with a length, got {type(dataset).__name__}. "
            "The loop reads examples by index in its own order; implement __len__ and "
            "__getitem__."
        )
    if len(dataset) == 0:
        raise ValueError("Expected at least one training example, got an empty dataset.")
    return cast(Dataset, dataset)


def dataset_tensors(dataset: Dataset) -> tuple[Tensor, Tensor] | None:
    """The two tensors of a ``TensorDataset`` of (images, labels), read directly."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1]
    return None
