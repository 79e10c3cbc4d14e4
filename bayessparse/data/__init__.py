"""Offline, checksum-verified MNIST.

The package ships its own copy of the four MNIST idx ``.gz`` files and their SHA-256
checksums (of the uncompressed files), so no download ever happens. Any other directory
with the same files can be used instead; :func:`save_mnist` writes one, e.g. a subset.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import re
import zlib
from collections.abc import Mapping
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
_CHECKSUM_FORMAT = "'<sha256>  <file name without .gz>'"
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_IMAGE_SIZE = (28, 28)
_NUM_CLASSES = 10
# zlib's default level: near level 9's size for a tenth of its time on the full training set.
_GZIP_LEVEL = 6


class Split(NamedTuple):
    """A data split: ``images`` (N, 1, 28, 28) float32 and ``labels`` (N,) int64."""

    images: Tensor
    labels: Tensor


class DataError(ValueError):
    """A data file is missing, corrupt, or not in the expected format."""


def _read_checksums(root: Path) -> dict[str, str]:
    """Parse ``sha256sum`` output: ``{file name: lower-case hex digest}``."""
    path = root / CHECKSUM_FILE
    if not path.is_file():
        raise DataError(
            f"Missing checksum file {str(path)!r}. The MNIST directory must hold the four idx "
            f".gz files and {CHECKSUM_FILE} (lines {_CHECKSUM_FORMAT}); "
            f"the package's own copy is in {str(MNIST_DIR)!r}."
        )
    try:
        # utf-8-sig: a checksum file saved by a Windows editor starts with a byte-order mark.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"Checksum file {str(path)!r} is not text ({err}). Regenerate it with "
            f"'sha256sum' on the uncompressed idx files: lines {_CHECKSUM_FORMAT}."
        ) from err
    sums: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        # sha256sum -c skips blank lines and '#' comments too.
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, digest = _parse_checksum_line(path, number, line)
        if name in sums and sums[name] != digest:
            raise DataError(
                f"Checksum file {str(path)!r} lists {name!r} twice with different digests "
                f"(lines {first_line[name]} and {number}). Keep the line with the right one."
            )
        sums[name] = digest
        first_line.setdefault(name, number)
    return sums


def _parse_checksum_line(path: Path, number: int, line: str) -> tuple[str, str]:
    """One ``sha256sum`` line as ``(file name, lower-case digest)``."""
    tokens = line.split()
    if len(tokens) != 2 or not _SHA256_HEX.fullmatch(tokens[0]):
        raise DataError(
            f"Malformed line {number} in checksum file {str(path)!r}: {line.strip()!r}. "
            f"Expected {_CHECKSUM_FORMAT}: a 64-digit hex SHA-256, whitespace, a file name."
        )
    digest, name = tokens
    # A leading '*' is sha256sum's binary-mode marker, not part of the name.
    return name.removeprefix("*"), digest.lower()


def _checksum_for(sums: dict[str, str], root: Path, name: str) -> str:
    if name in sums:
        return sums[name]
    hint = ""
    if f"{name}.gz" in sums:
        # A common mistake: running sha256sum on the .gz files instead of their contents.
        hint = (
            f" It lists {name + '.gz'!r}, but the checksums must be of the uncompressed "
            f"files: regenerate them with 'gunzip -c {name}.gz | sha256sum'."
        )
    raise DataError(f"{CHECKSUM_FILE} in {str(root)!r} has no checksum for {name!r}.{hint}")


def read_idx(path: Path, expected_sha256: str | None = None) -> np.ndarray:
    """Read one gzipped idx file, checking the SHA-256 of its uncompressed bytes.

    Args:
        path: the ``.gz`` file.
        expected_sha256: hex digest of the uncompressed bytes (any case); ``None`` skips it.

    Returns:
        The array, with the shape the idx header gives.

    Raises:
        DataError: if the file is missing, not gzip, fails its checksum, or is not idx.
    """
    if not path.is_file():
        hint = ""
        if path.suffix == ".gz" and path.with_suffix("").is_file():
            hint = f" An uncompressed {path.with_suffix('').name!r} is there: gzip it."
        raise DataError(
            f"Missing data file {str(path)!r}. Point the loader at a directory with the "
            f"MNIST idx .gz files, or use the package's own copy in {str(MNIST_DIR)!r}.{hint}"
        )
    raw = _gunzip(path)
    if expected_sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != expected_sha256.lower():
            raise DataError(
                f"Corrupt data file {str(path)!r}: SHA-256 of its contents is {digest}, "
                f"expected {expected_sha256}. Replace it with an intact copy."
            )
    return _parse_idx(path, raw)


def _gunzip(path: Path) -> bytes:
    data = path.read_bytes()
    try:
        return gzip.decompress(data)
    # OSError: bad header or CRC; EOFError: truncated; zlib.error: damaged deflate stream.
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"Corrupt data file {str(path)!r}: not a readable gzip file ({err}). Replace it "
            "with an intact copy."
        ) from err


def _parse_idx(path: Path, raw: bytes) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{str(path)!r} is not an idx file of unsigned bytes: it starts with "
            f"{raw[:4].hex(' ')!r}, expected '00 00 08 <ndim>'."
        )
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DataError(
            f"Corrupt data file {str(path)!r}: its idx header promises {ndim} dimensions, "
            f"but the file ends after {len(raw)} bytes."
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=offset)
    # math.prod, not np.prod: huge header dimensions must not overflow to a match.
    if data.size != math.prod(shape):
        raise DataError(
            f"Corrupt data file {str(path)!r}: header says shape {shape}, but it holds "
            f"{data.size} values."
        )
    return data.reshape(shape)


def _check_images(path: Path, images: np.ndarray) -> None:
    if images.ndim != 3 or images.shape[1:] != _IMAGE_SIZE:
        raise DataError(
            f"Wrong image shape in {str(path)!r}: found {images.shape}, expected (N, 28, 28) "
            "(N grey-scale 28x28 MNIST images). Use 28x28 images, e.g. written by save_mnist."
        )


def _check_labels(path: Path, labels: np.ndarray) -> None:
    if labels.ndim != 1:
        raise DataError(
            f"Wrong label shape in {str(path)!r}: found {labels.shape}, expected (N,) "
            "(one label per image)."
        )
    bad = labels >= _NUM_CLASSES  # uint8, so never negative
    if bad.any():
        values = ", ".join(str(v) for v in np.unique(labels[bad])[:5])
        raise DataError(
            f"Bad labels in {str(path)!r}: {int(bad.sum())} of {labels.size} examples have "
            f"labels outside the valid range 0..9 (found {values}). Fix or drop those examples."
        )


def load_mnist(root: str | Path | None = None) -> dict[str, Split]:
    """Load MNIST as raw pixel values in [0, 255] (float32) and int64 labels.

    Args:
        root: directory with the four idx ``.gz`` files and ``SHA256SUMS.uncompressed``;
            ``None`` uses the copy shipped with the package.

    Returns:
        ``{"train": Split, "test": Split}``; the bundled copy has 60000 and 10000 examples,
        another directory may hold any number (e.g. a subset written by :func:`save_mnist`).

    Raises:
        DataError: a file is missing, corrupt, or holds something other than 28x28 images
            and labels 0..9 (the message names the file and the fix).
    """
    root = MNIST_DIR if root is None else Path(root)
    if not root.is_dir():
        problem = "is a file, not a directory" if root.exists() else "does not exist"
        raise DataError(
            f"MNIST directory {str(root)!r} {problem}. Pass a directory with the idx .gz "
            f"files, or None for the package's own copy."
        )
    sums = _read_checksums(root)
    expected = {key: _checksum_for(sums, root, name) for key, name in _FILES.items()}
    return {split: _load_split(root, split, expected) for split in ("train", "test")}


def _load_split(root: Path, split: str, sums: dict[tuple[str, str], str]) -> Split:
    image_path = root / f"{_FILES[split, 'images']}.gz"
    label_path = root / f"{_FILES[split, 'labels']}.gz"
    images = read_idx(image_path, sums[split, "images"])
    _check_images(image_path, images)
    labels = read_idx(label_path, sums[split, "labels"])
    _check_labels(label_path, labels)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"MNIST {split} split has {images.shape[0]} images in {str(image_path)!r} but "
            f"{labels.shape[0]} labels in {str(label_path)!r}. Both files must list the same "
            "examples."
        )
    return Split(
        torch.from_numpy(images.astype(np.float32)).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
    )


def save_mnist(splits: Mapping[str, Split], root: str | Path, *, overwrite: bool = False) -> Path:
    """Write splits in the raw format :func:`load_mnist` reads; the inverse of loading.

    Writes the four gzipped idx files (uint8) and ``SHA256SUMS.uncompressed``, byte for
    byte reproducibly, so ``load_mnist(save_mnist(splits, root))`` gives ``splits`` back.
    For instance, a small subset for quick runs::

        data = load_mnist()
        subset = {name: Split(s.images[:600], s.labels[:600]) for name, s in data.items()}
        save_mnist(subset, "mnist-600")

    Args:
        splits: ``{"train": Split, "test": Split}``, raw as :func:`load_mnist` returns them
            (not :func:`preprocess`-ed): images (N, 1, 28, 28) or (N, 28, 28) of whole
            numbers 0..255, labels (N,) of an integer dtype with values 0..9.
        root: directory to write to; created if missing.
        overwrite: replace MNIST files that are already in ``root``.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        DataError: ``splits`` is not as described (nothing is written then), or ``root``
            is the package's own copy.
        FileExistsError: ``root`` already holds MNIST files and ``overwrite`` is false.
    """
    arrays = _validated_arrays(splits)
    root = Path(root)
    _check_writable(root, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for (split, kind), name in sorted(_FILES.items(), key=lambda item: item[1]):
        raw = _idx_bytes(arrays[split, kind])
        (root / f"{name}.gz").write_bytes(gzip.compress(raw, _GZIP_LEVEL, mtime=0))
        lines.append(f"{hashlib.sha256(raw).hexdigest()}  {name}\n")
    # Written last: an interrupted save leaves no checksum file, or an old one that the new
    # files fail, never a directory that loads a mix of old and new data without complaint.
    (root / CHECKSUM_FILE).write_text("".join(lines), encoding="utf-8")
    return root


def _check_writable(root: Path, overwrite: bool) -> None:
    if root.resolve() == MNIST_DIR:
        raise DataError(
            f"Refusing to write into the package's own MNIST copy {str(root)!r}; choose "
            "another directory."
        )
    names = [f"{name}.gz" for name in _FILES.values()] + [CHECKSUM_FILE]
    existing = [name for name in names if (root / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{str(root)!r} already holds {', '.join(existing)}. Choose an empty directory "
            "or pass overwrite=True to replace them."
        )


def _validated_arrays(splits: Mapping[str, Split]) -> dict[tuple[str, str], np.ndarray]:
    if sorted(splits) != ["test", "train"]:
        raise DataError(
            f"save_mnist needs exactly the splits 'train' and 'test', got {sorted(splits)}."
        )
    arrays: dict[tuple[str, str], np.ndarray] = {}
    for split in ("train", "test"):
        images = _to_numpy(splits[split].images, f"{split} images")
        labels = _to_numpy(splits[split].labels, f"{split} labels")
        arrays[split, "images"] = _images_as_uint8(split, images)
        arrays[split, "labels"] = _labels_as_uint8(split, labels)
        if len(images) != len(labels):
            raise DataError(
                f"The {split} split has {len(images)} images but {len(labels)} labels; "
                "pass one label per image."
            )
    return arrays


def _to_numpy(value: object, what: str) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise DataError(f"Expected the {what} as a torch.Tensor, got {type(value).__name__}.")


def _images_as_uint8(split: str, images: np.ndarray) -> np.ndarray:
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.shape[1:] != _IMAGE_SIZE:
        raise DataError(
            f"The {split} images have shape {images.shape}, expected (N, 1, 28, 28) or "
            "(N, 28, 28)."
        )
    if images.dtype.kind not in "uif":
        raise DataError(f"The {split} images have dtype {images.dtype}, expected numbers.")
    with np.errstate(invalid="ignore"):  # NaN compares false: caught below, no warning
        whole = images.dtype.kind != "f" or bool(np.all(images == np.round(images)))
        in_range = images.size == 0 or (images.min() >= 0 and images.max() <= 255)
    if not (whole and in_range):
        raise DataError(
            f"The {split} images are not whole numbers in 0..255 (found values in "
            f"[{images.min()}, {images.max()}]). Pass raw pixel values as load_mnist returns "
            "them, not preprocess()'s output."
        )
    return images.astype(np.uint8)


def _labels_as_uint8(split: str, labels: np.ndarray) -> np.ndarray:
    if labels.ndim != 1:
        raise DataError(f"The {split} labels have shape {labels.shape}, expected (N,).")
    if labels.dtype.kind not in "ui":
        raise DataError(
            f"The {split} labels have dtype {labels.dtype}, expected an integer dtype "
            "(e.g. torch.int64)."
        )
    bad = (labels < 0) | (labels >= _NUM_CLASSES)
    if bad.any():
        values = ", ".join(str(v) for v in np.unique(labels[bad])[:5])
        raise DataError(
            f"{int(bad.sum())} of the {split} labels are outside the valid range 0..9 "
            f"(found {values}); MNIST labels are the digits 0..9."
        )
    return labels.astype(np.uint8)


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(dim.to_bytes(4, "big") for dim in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def preprocess(splits: dict[str, Split]) -> dict[str, Split]:
    """The sparse VD papers' preprocessing: pixels / 256 minus the mean training image.

    Raises:
        DataError: the training split is empty, so it has no mean image.
    """
    if len(splits["train"].images) == 0:
        raise DataError("The training split is empty, so it has no mean image to subtract.")
    mean_image = (splits["train"].images / 256.0).mean(dim=0, keepdim=True)
    return {
        name: Split(split.images / 256.0 - mean_image, split.labels)
        for name, split in splits.items()
    }


def hold_out(split: Split, size: int, seed: int = 0) -> tuple[Split, Split]:
    """Split off ``size`` random examples of ``split``: ``(the rest, the held-out ones)``.

    The choice depends on ``seed`` only, so a run and its later evaluation hold out the
    same examples. Hold validation data out of the *training* split, never the test set.

    Raises:
        ValueError: if ``size`` is negative or leaves no example to train on.
    """
    n = split.images.shape[0]
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < n:
        raise ValueError(
            f"Expected a validation size in [0, {n - 1}] for {n} training examples, got {size!r}."
        )
    if size == 0:  # nothing to copy
        return split, Split(split.images[:0], split.labels[:0])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    rest, held = order[size:].sort().values, order[:size].sort().values
    return (
        Split(split.images[rest], split.labels[rest]),
        Split(split.images[held], split.labels[held]),
    )
