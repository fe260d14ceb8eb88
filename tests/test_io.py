"""The one atomic writer and the cache's integrity check (latprune.io), with a disk that fills up."""
import logging
import os

import numpy as np
import pytest
import torch

import latprune.io as lio
from latprune.errors import CannotWrite
from latprune.io import save_npy_atomic, save_torch_atomic, seal, verified, write_json_atomic
from latprune.testing import DiskFull


@pytest.mark.parametrize("writer", [
    lambda p: write_json_atomic(p, {"a": list(range(1000))}),
    lambda p: save_npy_atomic(np.arange(10_000), p),
    lambda p: save_torch_atomic({"w": torch.randn(100, 100)}, p),
], ids=["json", "npy", "torch"])
def test_a_write_that_fails_half_way_leaves_nothing_and_says_so_in_one_line(tmp_path, monkeypatch, writer):
    path = tmp_path / "sub" / "artifact"
    path.parent.mkdir()
    path.write_bytes(b"the previous version")
    fdopen = os.fdopen
    monkeypatch.setattr(lio.os, "fdopen", lambda fd, mode: DiskFull(fdopen(fd, mode)))
    with pytest.raises(CannotWrite) as e:
        writer(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "No space left on device" in msg and "errno 28" in msg
    assert path.read_bytes() == b"the previous version", "the old file stands until a whole new one replaces it"
    assert [p.name for p in path.parent.iterdir()] == ["artifact"], "the temporary file is removed"
    monkeypatch.undo()
    writer(path)  # the next attempt writes it whole
    assert path.stat().st_size > len(b"the previous version")


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CannotWrite, match="cannot write .*file/sub/a.json"):
        write_json_atomic(tmp_path / "file" / "sub" / "a.json", {})


def test_sealed_entries_verify_and_damaged_ones_are_deleted(tmp_path, caplog):
    p = save_npy_atomic(np.arange(1000), tmp_path / "entry.npy")
    assert verified(p) is None and not p.exists(), "an entry without a digest is not trusted"
    seal(save_npy_atomic(np.arange(1000), p))
    assert verified(p) == p and np.array_equal(np.load(p), np.arange(1000))
    blob = bytearray(p.read_bytes())
    blob[-1] ^= 1
    p.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="latprune.io"):
        assert verified(p) is None
    assert f"cached {p} is damaged (its sha256 does not match)" in caplog.text
    assert not p.exists() and not list(tmp_path.iterdir()), "the entry and its digest are deleted"
    assert verified(tmp_path / "missing.npy") is None
