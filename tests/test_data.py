"""The offline MNIST loader: parsing, checksums, and errors that name the file and the fix."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bayessparse.data import MNIST_DIR, DataError, load_mnist, preprocess

SIZES = {"train": 6, "t10k": 4}


def write_fake_mnist(root: Path) -> dict[str, np.ndarray]:
    """A tiny MNIST-format data set with correct checksums."""
    rng = np.random.default_rng(0)
    arrays, sums = {}, []
    for prefix, n in SIZES.items():
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            raw = bytes([0, 0, 8, array.ndim]) + b"".join(
                struct.pack(">I", d) for d in array.shape
            )
            raw += array.tobytes()
            (root / f"{name}.gz").write_bytes(gzip.compress(raw))
            sums.append(f"{hashlib.sha256(raw).hexdigest()}  {name}")
            arrays[name] = array
    (root / "SHA256SUMS.uncompressed").write_text("\n".join(sums) + "\n")
    return arrays


def test_loads_idx_files_with_shapes_dtypes_and_values(tmp_path):
    arrays = write_fake_mnist(tmp_path)
    data = load_mnist(tmp_path)
    train = data["train"]
    assert train.images.shape == (6, 1, 28, 28) and train.images.dtype == torch.float32
    assert train.labels.dtype == torch.int64
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(data["test"].labels.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_preprocessing_divides_by_256_and_centres_on_the_training_mean(tmp_path):
    write_fake_mnist(tmp_path)
    raw = load_mnist(tmp_path)
    data = preprocess(raw)
    assert torch.allclose(data["train"].images.mean(0), torch.zeros(1, 28, 28), atol=1e-6)
    mean = (raw["train"].images / 256).mean(0)
    assert torch.allclose(data["test"].images, raw["test"].images / 256 - mean)


def test_missing_directory_file_and_checksum_list(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(tmp_path / "nowhere")
    write_fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="Missing data file .*t10k-labels"):
        load_mnist(tmp_path)
    (tmp_path / "SHA256SUMS.uncompressed").unlink()
    with pytest.raises(DataError, match="Missing checksum file"):
        load_mnist(tmp_path)


def test_corrupt_files_are_caught_by_gzip_or_checksum(tmp_path):
    write_fake_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated download
    with pytest.raises(DataError, match="Corrupt data file .*train-labels.*gzip"):
        load_mnist(tmp_path)
    raw = bytearray(gzip.decompress(good))
    raw[-1] ^= 1  # one flipped label
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="SHA-256 .* expected"):
        load_mnist(tmp_path)


def test_bundled_copy_matches_the_shared_data_checksums():
    # The package carries its own MNIST; its checksum file is the shared one.
    shared = MNIST_DIR.parents[2] / ".." / "shared" / "data" / "mnist" / "SHA256SUMS.uncompressed"
    if shared.is_file():
        assert (MNIST_DIR / "SHA256SUMS.uncompressed").read_text() == shared.read_text()
    assert sorted(p.name for p in MNIST_DIR.glob("*.gz")) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ]


@pytest.mark.slow
def test_bundled_mnist_loads_in_full(tmp_path):
    shutil.copytree(MNIST_DIR, tmp_path / "mnist")
    data = load_mnist(tmp_path / "mnist")
    assert data["train"].images.shape == (60000, 1, 28, 28)
    assert data["test"].labels.shape == (10000,)
    assert data["train"].images.max() == 255
