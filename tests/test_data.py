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
from mnist_subset import write_mnist_subset

from bayessparse.data import MNIST_DIR, DataError, Split, load_mnist, preprocess, save_mnist

SIZES = {"train": 6, "t10k": 4}
NAMES = [f"{p}-{k}-ubyte" for p in SIZES for k in ("images-idx3", "labels-idx1")]


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(root: Path, name: str, array: np.ndarray) -> None:
    """Replace one data file and its checksum, so only the content is wrong, not the sum."""
    (root / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
    write_checksums(root)


def write_checksums(root: Path) -> None:
    digests = {n: hashlib.sha256(gzip.decompress((root / f"{n}.gz").read_bytes())) for n in NAMES}
    lines = [f"{digest.hexdigest()}  {name}" for name, digest in digests.items()]
    (root / "SHA256SUMS.uncompressed").write_text("\n".join(lines) + "\n")


def write_fake_mnist(root: Path) -> dict[str, np.ndarray]:
    """A tiny MNIST-format data set with correct checksums."""
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in SIZES.items():
        arrays[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}-labels-idx1-ubyte"] = rng.integers(0, 10, n, dtype=np.uint8)
    for name, array in arrays.items():
        (root / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
    write_checksums(root)
    return arrays


def checksum_lines(root: Path) -> list[str]:
    return (root / "SHA256SUMS.uncompressed").read_text().splitlines()


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


def rewrite_checksums(root: Path, edit) -> None:
    """Rewrite SHA256SUMS.uncompressed as ``edit(digest, name) -> line``."""
    lines = [edit(*line.split()) for line in checksum_lines(root)]
    (root / "SHA256SUMS.uncompressed").write_text("\n".join(lines) + "\n")


def test_uppercase_checksums_are_accepted(tmp_path):
    write_fake_mnist(tmp_path)
    rewrite_checksums(tmp_path, lambda digest, name: f"{digest.upper()}  {name}")
    assert load_mnist(tmp_path)["test"].labels.shape == (4,)


def test_binary_markers_comments_blank_lines_crlf_and_bom_are_accepted(tmp_path):
    write_fake_mnist(tmp_path)
    rewrite_checksums(tmp_path, lambda digest, name: f"{digest} *{name}")  # sha256sum -b
    text = "\ufeff# sha256sum -b of the gunzipped files\n\n" + "\n".join(checksum_lines(tmp_path))
    (tmp_path / "SHA256SUMS.uncompressed").write_bytes(text.replace("\n", "\r\n").encode())
    assert load_mnist(tmp_path)["train"].images.shape == (6, 1, 28, 28)


@pytest.mark.parametrize(
    "bad_line",
    [
        "t10k-images-idx3-ubyte",  # one token
        "{digest}  t10k-images-idx3-ubyte  extra",  # three tokens
        "{short}  t10k-images-idx3-ubyte",  # digest too short
        "{nothex}  t10k-images-idx3-ubyte",  # 64 characters, not hex
        "SHA256 (t10k-images-idx3-ubyte) = {digest}",  # BSD-style tagged line
    ],
)
def test_malformed_checksum_line_names_file_line_number_and_format(tmp_path, bad_line):
    write_fake_mnist(tmp_path)
    lines = checksum_lines(tmp_path)
    digest = lines[0].split()[0]
    bad = bad_line.format(digest=digest, short=digest[:63], nothex="g" * 64)
    (tmp_path / "SHA256SUMS.uncompressed").write_text("\n".join([*lines[:2], bad]) + "\n")
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path)
    message = str(err.value)
    assert "Malformed line 3" in message and "SHA256SUMS.uncompressed" in message
    assert "'<sha256>  <file name without .gz>'" in message


def test_a_file_listed_twice_is_fine_with_one_digest_and_an_error_with_two(tmp_path):
    write_fake_mnist(tmp_path)
    lines = checksum_lines(tmp_path)
    path = tmp_path / "SHA256SUMS.uncompressed"
    digest, name = lines[1].split()
    path.write_text("\n".join([*lines, f"{digest.upper()} *{name}"]) + "\n")
    load_mnist(tmp_path)
    path.write_text("\n".join([*lines, f"{'0' * 64}  {name}"]) + "\n")
    with pytest.raises(DataError, match=r"'train-labels-idx1-ubyte' twice .*lines 2 and 5"):
        load_mnist(tmp_path)


def test_checksums_of_the_gz_files_get_a_hint(tmp_path):
    write_fake_mnist(tmp_path)
    rewrite_checksums(tmp_path, lambda digest, name: f"{digest}  {name}.gz")
    with pytest.raises(DataError, match=r"no checksum for .* must be of the uncompressed"):
        load_mnist(tmp_path)


def test_checksum_file_that_is_not_text(tmp_path):
    write_fake_mnist(tmp_path)
    (tmp_path / "SHA256SUMS.uncompressed").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="Checksum file .*SHA256SUMS.uncompressed.* is not text"):
        load_mnist(tmp_path)


# --- Data files: damaged gzip or idx, and contents that are not MNIST ---


def test_damaged_deflate_stream_is_a_data_error(tmp_path):
    write_fake_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    damaged = bytearray(path.read_bytes())
    damaged[10] ^= 0xFF  # first byte after the gzip header: zlib.error, not OSError
    path.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match="Corrupt data file .*t10k-images.*gzip"):
        load_mnist(tmp_path)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\x00\x00\x08\x03\x00\x00", r"promises 3 dimensions.* ends after 6 bytes"),
        (b"\x00\x00\x08\x04" + b"\x00\x01\x00\x00" * 4, r"header says shape \(65536, "),
        (b"\x00\x00\x0d\x01\x00\x00\x00\x00", r"not an idx file of unsigned bytes.*00 00 0d 01"),
    ],
)
def test_broken_idx_headers_are_data_errors(tmp_path, raw, match):
    write_fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw))
    write_checksums(tmp_path)
    with pytest.raises(DataError, match=match):
        load_mnist(tmp_path)


@pytest.mark.parametrize("images", [np.zeros((3, 32, 32)), np.zeros((3, 784)), np.zeros(784)])
def test_wrong_image_shape_names_file_shape_found_and_expected(tmp_path, images):
    write_fake_mnist(tmp_path)
    write_idx(tmp_path, "train-images-idx3-ubyte", images)
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path)
    message = str(err.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert f"found {images.shape}" in message and "expected (N, 28, 28)" in message


def test_wrong_label_shape_names_file_shape_found_and_expected(tmp_path):
    write_fake_mnist(tmp_path)
    write_idx(tmp_path, "t10k-labels-idx1-ubyte", np.zeros((4, 1)))
    with pytest.raises(
        DataError, match=r"t10k-labels-idx1-ubyte.gz.*found \(4, 1\), expected \(N,\)"
    ):
        load_mnist(tmp_path)


def test_labels_outside_0_to_9_name_file_values_count_and_range(tmp_path):
    write_fake_mnist(tmp_path)
    labels = np.array([3, 10, 255, 10, 12, 13, 14, 15, 0])
    write_idx(tmp_path, "t10k-labels-idx1-ubyte", labels)
    write_idx(tmp_path, "t10k-images-idx3-ubyte", np.zeros((9, 28, 28)))
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path)
    message = str(err.value)
    assert "t10k-labels-idx1-ubyte.gz" in message and "0..9" in message
    assert "7 of 9 examples" in message
    assert "found 10, 12, 13, 14, 15)" in message  # the first few distinct values


def test_image_and_label_counts_must_match(tmp_path):
    write_fake_mnist(tmp_path)
    write_idx(tmp_path, "t10k-labels-idx1-ubyte", np.zeros(3))
    with pytest.raises(DataError, match=r"4 images in .*t10k-images.* but 3 labels in .*t10k-l"):
        load_mnist(tmp_path)


def test_uncompressed_file_in_place_of_the_gz_gets_a_hint(tmp_path):
    write_fake_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
    path.unlink()
    with pytest.raises(DataError, match="Missing data file .* uncompressed .* gzip it"):
        load_mnist(tmp_path)


def test_preprocess_rejects_an_empty_training_split():
    empty = Split(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(DataError, match="training split is empty"):
        preprocess({"train": empty, "test": empty})


# --- save_mnist: the inverse of load_mnist ---


def test_save_then_load_round_trips_exactly(tmp_path):
    write_fake_mnist(tmp_path / "a")
    data = load_mnist(tmp_path / "a")
    assert save_mnist(data, tmp_path / "b") == tmp_path / "b"
    again = load_mnist(tmp_path / "b")
    for name in ("train", "test"):
        assert torch.equal(again[name].images, data[name].images)
        assert torch.equal(again[name].labels, data[name].labels)
    # The same format as the original files, byte for byte once uncompressed.
    for name in NAMES:
        a, b = (gzip.decompress((tmp_path / d / f"{name}.gz").read_bytes()) for d in "ab")
        assert a == b
    by_name = sorted(checksum_lines(tmp_path / "a"), key=lambda line: line.split()[1])
    assert checksum_lines(tmp_path / "b") == by_name


def test_save_accepts_uint8_images_without_channel_and_any_size_including_zero(tmp_path):
    images = torch.arange(3 * 28 * 28).reshape(3, 28, 28).remainder(256).to(torch.uint8)
    splits = {
        "train": Split(images, torch.tensor([0, 9, 5])),
        "test": Split(images[:0], torch.zeros(0, dtype=torch.int32)),
    }
    data = load_mnist(save_mnist(splits, tmp_path))
    assert torch.equal(data["train"].images[:, 0], images.float())
    assert data["train"].labels.tolist() == [0, 9, 5]
    assert data["test"].images.shape == (0, 1, 28, 28) and data["test"].labels.shape == (0,)


def test_save_writes_identical_bytes_every_time(tmp_path):
    write_fake_mnist(tmp_path / "a")
    data = load_mnist(tmp_path / "a")
    save_mnist(data, tmp_path / "b")
    save_mnist(data, tmp_path / "c")
    for name in [f"{n}.gz" for n in NAMES] + ["SHA256SUMS.uncompressed"]:
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()


def test_subset_of_the_bundled_mnist_is_quick_to_write_and_loads_back(tmp_path):
    data = load_mnist(write_mnist_subset(tmp_path, n_train=600, n_test=200))
    assert data["train"].images.shape == (600, 1, 28, 28)
    assert data["test"].labels.shape == (200,)
    assert set(data["train"].labels.tolist()) == set(range(10))


def good_splits() -> dict[str, Split]:
    images = torch.zeros(2, 1, 28, 28)
    labels = torch.tensor([1, 2])
    return {"train": Split(images, labels), "test": Split(images, labels)}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"images": torch.zeros(2, 3, 28, 28)},
            r"shape \(2, 3, 28, 28\), expected \(N, 1, 28, 28\)",
        ),
        ({"images": torch.zeros(2, 32, 32)}, r"shape \(2, 32, 32\)"),
        ({"images": torch.full((2, 28, 28), 0.5)}, r"not whole numbers in 0..255"),
        ({"images": torch.full((2, 28, 28), 256.0)}, r"not whole numbers .*256"),
        ({"images": torch.full((2, 28, 28), -1.0)}, r"not whole numbers .*-1"),
        ({"images": torch.full((2, 28, 28), float("nan"))}, r"not whole numbers"),
        ({"images": torch.zeros(2, 28, 28, dtype=torch.bool)}, r"dtype bool, expected numbers"),
        ({"labels": torch.tensor([1.0, 2.0])}, r"dtype float32, expected an integer dtype"),
        ({"labels": torch.tensor([1, 10])}, r"1 of the test labels .* 0..9 \(found 10\)"),
        ({"labels": torch.tensor([-1, 3])}, r"outside the valid range 0..9 \(found -1\)"),
        ({"labels": torch.tensor([[1], [2]])}, r"labels have shape \(2, 1\), expected \(N,\)"),
        ({"labels": torch.tensor([1, 2, 3])}, r"2 images but 3 labels"),
        ({"labels": [1, 2]}, r"test labels as a torch.Tensor, got list"),
    ],
)
def test_save_rejects_bad_input_and_writes_nothing(tmp_path, change, match):
    splits = good_splits()
    splits["test"] = splits["test"]._replace(**change)
    with pytest.raises(DataError, match=match):
        save_mnist(splits, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_needs_exactly_train_and_test(tmp_path):
    with pytest.raises(DataError, match=r"exactly the splits 'train' and 'test', got \['train'\]"):
        save_mnist({"train": good_splits()["train"]}, tmp_path)


def test_save_does_not_overwrite_unless_asked(tmp_path):
    save_mnist(good_splits(), tmp_path)
    with pytest.raises(FileExistsError, match="already holds .*overwrite=True"):
        save_mnist(good_splits(), tmp_path)
    splits = good_splits()
    splits["test"] = Split(torch.zeros(1, 28, 28), torch.tensor([7]))
    save_mnist(splits, tmp_path, overwrite=True)
    assert load_mnist(tmp_path)["test"].labels.tolist() == [7]


def test_save_refuses_the_package_copy(tmp_path, monkeypatch):
    # A stand-in for MNIST_DIR, so a broken check cannot clobber the real bundled files.
    monkeypatch.setattr("bayessparse.data.MNIST_DIR", tmp_path.resolve())
    with pytest.raises(DataError, match="Refusing to write into the package's own MNIST copy"):
        save_mnist(good_splits(), tmp_path, overwrite=True)
    assert list(tmp_path.iterdir()) == []
