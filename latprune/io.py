"""The one atomic writer: every file latprune writes appears whole or not at all.

Each writer writes a temporary file in the destination folder, flushes and fsyncs it, then
renames it over the destination (``os.replace`` is atomic on POSIX and Windows), so a run killed
mid-write (OOM killer, pre-emption, a full disk) never leaves a truncated artifact. Free of torch:
``save_torch_atomic`` takes torch from the object's own module when it is called.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np

__all__ = ["write_atomic", "write_bytes_atomic", "write_json_atomic", "save_npy_atomic", "save_torch_atomic",
           "cache_key"]


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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


def cache_key(**parts: Any) -> str:
    """A short, stable key of JSON-able inputs (stage keys, cache file names)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
