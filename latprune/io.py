"""The one atomic writer: every file latprune writes appears whole or not at all.

Each writer writes a temporary file in the destination folder, flushes and fsyncs it, then
renames it over the destination (``os.replace`` is atomic on POSIX and Windows), so a run killed
mid-write (OOM killer, pre-emption, a full disk) never leaves a truncated artifact. A write that
fails (ENOSPC, EIO, EACCES: any ``OSError``) removes its temporary file and raises
:class:`~latprune.errors.CannotWrite`, one line naming the file. Free of torch:
``save_torch_atomic`` takes torch from the object's own module when it is called.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np

from latprune.errors import BadInput, CannotWrite

__all__ = ["check_file", "check_writable_dir", "check_writable_file",
           "write_atomic", "write_bytes_atomic", "write_json_atomic", "save_npy_atomic", "save_torch_atomic",
           "seal", "verified", "cache_key"]

log = logging.getLogger(__name__)


def check_file(path: str | os.PathLike, flag: str, what: str) -> Path:
    """``path`` is an existing, readable regular file, or :class:`BadInput` naming ``flag`` and ``what``
    to pass instead (checked where an input enters, before anything is written)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise BadInput(f"{flag} {path} does not exist: pass {what}")
    if p.is_dir():
        raise BadInput(f"{flag} {path} is a folder: pass {what}, the file itself")
    if not os.access(p, os.R_OK):
        raise BadInput(f"{flag} {path} is not readable: fix its permissions")
    return p


def check_writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """``path`` is a folder latprune can create or write in: not a file, not under a file, its nearest
    existing folder writable; otherwise :class:`BadInput` naming ``flag``."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise BadInput(f"{flag} {path} is a file, not a folder: pass a folder path")
    _check_creatable(p, path, flag)
    return p


def check_writable_file(path: str | os.PathLike, flag: str) -> Path:
    """``path`` is a file latprune can create or replace: not a folder, not under a file."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise BadInput(f"{flag} {path} is a folder: pass a file path")
    _check_creatable(p.parent, path, flag)
    return p


def _check_creatable(p: Path, shown: str | os.PathLike, flag: str) -> None:
    up = p
    while not up.exists() and up != up.parent:
        up = up.parent
    if not up.is_dir():
        raise BadInput(f"{flag} {shown} lies under {up}, which is a file, not a folder: pass a path under a folder")
    if not os.access(up, os.W_OK | os.X_OK):
        raise BadInput(f"{flag} {shown}: {up} is not writable: pass a writable folder or fix its permissions")


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as e:
        raise CannotWrite.of(p, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CannotWrite.of(p, e) from e
        raise
    return p


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda f: f.write(data))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """JSON, indented, with a trailing newline."""
    return write_bytes_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def save_npy_atomic(arr, path: str | os.PathLike) -> Path:
    """A numpy array in ``.npy`` format."""
    return write_atomic(path, lambda f: np.save(f, arr))


def save_torch_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` (state dicts, checkpoints). torch is imported here, on use, so that this
    module and the torch-free modules built on it (the latency table, the knapsack) load without it."""
    import torch

    return write_atomic(path, lambda f: torch.save(obj, f))


def seal(path: str | os.PathLike) -> Path:
    """Record the sha256 of the whole file ``path`` beside it (``.NAME.sha256``): a cache entry is
    trusted on a later read only while its content still matches (:func:`verified`)."""
    p = Path(path)
    write_bytes_atomic(_digest_path(p), _sha256(p).encode())
    return p


def verified(path: str | os.PathLike) -> Path | None:
    """``path`` if it exists and still matches the digest :func:`seal` recorded. A damaged entry (or
    one with no digest, from an older latprune or a write cut short) is named in the log, deleted
    with its digest, and None is returned: the caller rebuilds it, never uses it."""
    p = Path(path)
    digest = _digest_path(p)
    if not p.exists():
        digest.unlink(missing_ok=True)
        return None
    if digest.exists() and digest.read_text().strip() == _sha256(p):
        return p
    log.warning("cached %s is damaged (%s): deleted, rebuilding it", p,
                "its sha256 does not match" if digest.exists() else "no digest recorded")
    p.unlink(missing_ok=True)
    digest.unlink(missing_ok=True)
    return None


def _digest_path(p: Path) -> Path:
    return p.with_name(f".{p.name}.sha256")


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(**parts: Any) -> str:
    """A short, stable key of JSON-able inputs (stage keys, cache file names)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
