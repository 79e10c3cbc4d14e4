"""Offline, checksum-verified MNIST.

The package ships its own copy of the four MNIST idx ``.gz`` files and their SHA-256
checksums (of the uncompressed files), so no download ever happens. Any other directory
with the same files can be used instead.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

MNIST_DIR = Path(__file__).resolve().parent / "mnist"
CHECKSUM_FILE = "SHA256SUMS.uncompressed"
_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8}


class Split(NamedTuple):
    """A data split: ``images`` (N, 1, 28, 28) float32 and ``labels`` (N,) int64."""

    images: Tensor
    labels: Tensor


class DataError(ValueError):
    """A data file is missing, corrupt, or not in the expected format."""


def _read_checksums(root: Path) -> dict[str, str]:
    path = root / CHECKSUM_FILE
    if not path.is_file():
        raise DataError(
            f"Missing checksum file {str(path)!r}. The MNIST directory must hold the four idx "
            f".gz files and {CHECKSUM_FILE} (lines '<sha256>  <file name without .gz>'); "
            f"the package's own copy is in {str(MNIST_DIR)!r}."
        )
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            sums[name.lstrip("*")] = digest
    return sums


def read_idx(path: Path, expected_sha256: str | None = None) -> np.ndarray:
    """Read one gzipped idx file, checking the SHA-256 of its uncompressed bytes.

    Raises:
        DataError: if the file is missing, not gzip, fails its checksum, or is not idx.
    """
    if not path.is_file():
        raise DataError(
            f"Missing data file {str(path)!r}. Point the loader at a directory with the "
            f"MNIST idx .gz files, or use the package's own copy in {str(MNIST_DIR)!r}."
        )
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as err:
        raise DataError(
            f"Corrupt data file {str(path)!r}: not a readable gzip file ({err}). Replace it "
            "with an intact copy."
        ) from err
    if expected_sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != expected_sha256:
            raise DataError(
                f"Corrupt data file {str(path)!r}: SHA-256 of its contents is {digest}, "
                f"expected {expected_sha256}. Replace it with an intact copy."
            )
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{str(path)!r} is not an idx file of unsigned bytes.")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(
            f"Corrupt data file {str(path)!r}: header says shape {shape}, but it holds "
            f"{data.size} values."
        )
    return data.reshape(shape)


def load_mnist(root: str | Path | None = None) -> dict[str, Split]:
    """Load MNIST as raw pixel values in [0, 255] (float32) and int64 labels.

    Args:
        root: directory with the four idx ``.gz`` files and ``SHA256SUMS.uncompressed``;
            ``None`` uses the copy shipped with the package.

    Returns:
        ``{"train": Split, "test": Split}`` with 60000 and 10000 examples.

    Raises:
        DataError: a file is missing or corrupt (the message names the file and the fix).
    """
    root = MNIST_DIR if root is None else Path(root)
    if not root.is_dir():
        raise DataError(
            f"MNIST directory {str(root)!r} does not exist. Pass a directory with the idx .gz "
            f"files, or None for the package's own copy."
        )
    sums = _read_checksums(root)
    arrays = {}
    for key, name in _FILES.items():
        if name not in sums:
            raise DataError(f"{CHECKSUM_FILE} in {str(root)!r} has no checksum for {name!r}.")
        arrays[key] = read_idx(root / f"{name}.gz", sums[name])
    splits = {}
    for split in ("train", "test"):
        images = torch.from_numpy(arrays[split, "images"].astype(np.float32)).unsqueeze(1)
        labels = torch.from_numpy(arrays[split, "labels"].astype(np.int64))
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"MNIST {split} split has {images.shape[0]} images but {labels.shape[0]} labels."
            )
        splits[split] = Split(images, labels)
    return splits


def preprocess(splits: dict[str, Split]) -> dict[str, Split]:
    """The sparse VD papers' preprocessing: pixels / 256 minus the mean training image."""
    mean_image = (splits["train"].images / 256.0).mean(dim=0, keepdim=True)
    return {
        name: Split(split.images / 256.0 - mean_image, split.labels)
        for name, split in splits.items()
    }
