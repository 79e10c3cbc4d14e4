"""Files that survive crashes: atomic writes, verified checkpoints, run folders owned by one run.

Every file a run writes goes through :func:`atomic_write`: a temporary file unique to the
writer, flushed to disk, then renamed over the target, so a crash or a full disk leaves the
old file or the new one, never a mixture, and two writers never share a temporary file.
Checkpoints carry a SHA-256 of their contents and are read back with
``torch.load(weights_only=True)``: a damaged file is refused, and nothing is unpickled.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import pickle
import secrets
from pathlib import Path
from typing import Any, ClassVar

import filelock
import torch
from torch import Tensor

# A checkpoint file is this line, the SHA-256 of the rest in hex, a newline, then the bytes
# of torch.save(state).
_MAGIC = b"bayessparse-checkpoint-v1 "
_DIGEST_HEX = 64


class StorageError(OSError):
    """A file could not be written; the previous version of the file is intact."""


class CheckpointError(ValueError):
    """A checkpoint is damaged, not a checkpoint, or from a different run."""


class RunFolderBusy(RuntimeError):
    """Another process is using the run folder."""


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, intact.

    Raises:
        StorageError: the write failed (e.g. the disk is full); the temporary file is
            removed and the previous ``path`` is untouched.
    """
    path = Path(path)
    # Unique per writer; created like any file (the umask applies, unlike mkstemp's 0600).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        reason = "the disk is full" if err.errno == errno.ENOSPC else err.strerror or str(err)
        failure = StorageError(
            f"Could not write {str(path)!r}: {reason}. The previous version of the file, if "
            "any, is intact; free space or choose another output directory and retry."
        )
        failure.errno = err.errno
        raise failure from err
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def to_strict_json(obj: Any) -> str:
    """``obj`` as strict JSON: non-finite floats (NaN, ±inf) become ``null``."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(obj), indent=2, allow_nan=False)


def torch_bytes(obj: Any) -> bytes:
    """``torch.save(obj)`` as bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) atomically, with a checksum.

    Raises:
        StorageError: the write failed; the previous checkpoint is intact.
    """
    payload = torch_bytes(state)
    digest = hashlib.sha256(payload).hexdigest().encode()
    atomic_write(path, _MAGIC + digest + b"\n" + payload)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, verifying its checksum.

    Loaded with ``torch.load(weights_only=True)``: no arbitrary objects are unpickled.

    Raises:
        CheckpointError: the file is not a bayessparse checkpoint or is damaged.
    """
    path = Path(path)
    raw = path.read_bytes()
    header_end = len(_MAGIC) + _DIGEST_HEX
    if not raw.startswith(_MAGIC) or raw[header_end : header_end + 1] != b"\n":
        raise CheckpointError(
            f"{str(path)!r} is not a bayessparse checkpoint (or was written by an older "
            "version). Remove it, or start the run in another output directory."
        )
    digest, payload = raw[len(_MAGIC) : header_end].decode(), raw[header_end + 1 :]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is damaged: its contents do not match its SHA-256. "
            "Restore it from a backup, or remove it to start the run again."
        )
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} holds objects other than tensors and plain data, which "
            "are not loaded (weights_only=True). Only load checkpoints that bayessparse wrote."
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"Checkpoint {str(path)!r} does not hold a state dict.")
    return state


def fingerprint(*tensors: Tensor) -> str:
    """SHA-256 (hex) of the shapes, dtypes and values of ``tensors``: a data set's identity."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)} {t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class RunFolder:
    """A directory owned by one run at a time, for as long as the ``with`` block runs.

    Entering creates the directory (and its parents), takes an exclusive lock on
    ``.lock`` inside it (an OS file lock, released by the OS when the process dies, so a
    crashed run never leaves it stuck), records the owner's pid, and removes temporary
    files that killed writers left behind.

    Raises (on entering):
        NotADirectoryError: ``path`` exists and is not a directory.
        RunFolderBusy: another process holds the folder.
    """

    LOCK = ".lock"
    OWNER = ".owner"
    # Folders this process holds: resolved path -> [lock, depth]. Entering a held folder
    # again (train() inside the CLI's run) nests instead of deadlocking on our own lock.
    _held: ClassVar[dict[Path, list[Any]]] = {}

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __enter__(self) -> RunFolder:
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(
                f"Output directory {str(self.path)!r} is a file. Choose a directory path."
            )
        self.path.mkdir(parents=True, exist_ok=True)
        # Resolved now: at exit the working directory may be gone (a relative path would
        # then fail to resolve and hide the error that ended the run).
        key = self._key = self.path.resolve()
        if key in self._held:
            self._held[key][1] += 1
            return self
        lock = filelock.FileLock(self.path / self.LOCK, timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise RunFolderBusy(
                f"Run folder {str(self.path)!r} is in use by another run (pid {self._owner()})."
                " Wait for it to finish, or choose another output directory."
            ) from None
        self._held[key] = [lock, 1]
        (self.path / self.OWNER).write_text(f"{os.getpid()}\n")
        for stale in self.path.glob(".*.tmp"):
            stale.unlink(missing_ok=True)  # ours to remove: no other writer holds the folder
        return self

    def _owner(self) -> str:
        try:
            return (self.path / self.OWNER).read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def __exit__(self, *exc: object) -> None:
        key = self._key
        entry = self._held[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._held[key]
            (self.path / self.OWNER).unlink(missing_ok=True)
            entry[0].release()

    def __truediv__(self, name: str) -> Path:
        return self.path / name
