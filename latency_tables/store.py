"""The per-device latency store: every measured layer entry, kept across models and runs.

One SQLite file (``<cache dir>/latency-store.sqlite``; no server). An entry is keyed by

* the **device key**: the fingerprint's device, runtime and its version, provider, threads, batch
  and dtype (not the model's input shape, which the layer's own shape carries, and not latprune's
  version: the store carries its own :data:`STORE_SCHEMA` instead, so a release does not throw the
  measurements away; a runtime upgrade does, through ``runtime_version``);
* the **layer shape**: the layer signature without its dense widths (kind, kernel, stride,
  padding, dilation, input size, activation), so a 3x3 conv on 56x56 inputs of ResNet-34 reuses
  ResNet-18's entries at the same widths;
* the widths ``(c_in, c_out)``.

It holds the median, its CV and the count of timed calls. Entries of two devices never mix: a
lookup names the whole device key. Concurrent writers (two profiles on one machine) are safe:
SQLite locks the file and each write is one short transaction. A file SQLite cannot read (a
damaged or truncated store) is moved aside (``.damaged-<time>``) and a new store started, with a
warning: the store is a cache of measurements, never the only copy of a result.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from latprune.errors import BadInput, one_line
from latprune.io import write_json_atomic
from latprune.latency_tables.table import Fingerprint, LayerSignature

__all__ = ["STORE_SCHEMA", "STORE_NAME", "Entry", "LatencyStore", "device_key", "shape_key"]

log = logging.getLogger(__name__)

STORE_SCHEMA = 1
STORE_NAME = "latency-store.sqlite"
DEVICE_FIELDS = ("device", "runtime", "runtime_version", "provider", "threads", "batch", "dtype")

_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    device TEXT NOT NULL, layer TEXT NOT NULL, c_in INTEGER NOT NULL, c_out INTEGER NOT NULL,
    median_ms REAL NOT NULL, cv REAL NOT NULL, count INTEGER NOT NULL, measured_at REAL NOT NULL,
    PRIMARY KEY (device, layer, c_in, c_out)
);
CREATE TABLE IF NOT EXISTS periods (
    device TEXT NOT NULL, kind TEXT NOT NULL, axis TEXT NOT NULL, period INTEGER NOT NULL,
    measured_at REAL NOT NULL, PRIMARY KEY (device, kind, axis)
);
"""


def device_key(fp: Fingerprint) -> str:
    """The store's key of a fingerprint: canonical JSON of :data:`DEVICE_FIELDS`."""
    return json.dumps({f: getattr(fp, f) for f in DEVICE_FIELDS}, sort_keys=True)


def shape_key(sig: LayerSignature) -> str:
    """The signature without its dense widths: what a measurement at given widths depends on."""
    k, s, p, d, hw = sig.kernel, sig.stride, sig.padding, sig.dilation, sig.in_hw
    return (f"{sig.kind}:k{k[0]}x{k[1]}:s{s[0]}x{s[1]}:p{p[0]}x{p[1]}:d{d[0]}x{d[1]}:in{hw[0]}x{hw[1]}"
            f":{sig.activation}")


@dataclasses.dataclass(frozen=True)
class Entry:
    median_ms: float
    cv: float
    count: int


class LatencyStore:
    """The store in file ``path`` (created with its folder if missing)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise BadInput(f"latency store {self.path} is a folder: pass the store file itself")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInput(f"cannot create the latency store's folder {self.path.parent}: {e.strerror}: "
                           "pass another --cache-dir") from None
        self._db = self._open()

    # ---- opening, checking, rebuilding -------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        # autocommit mode; writes open their own short IMMEDIATE transaction (see _write)
        db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        db.execute("PRAGMA busy_timeout = 60000")
        return db

    def _open(self) -> sqlite3.Connection:
        try:
            db = self._connect()
            ok = db.execute("PRAGMA quick_check").fetchone()
            if not ok or ok[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {ok[0] if ok else 'no answer'}")
            db.executescript(_DDL)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(STORE_SCHEMA),))
            elif row[0] != str(STORE_SCHEMA):
                db.close()
                return self._rebuild(f"store schema {row[0]}, this latprune writes schema {STORE_SCHEMA}")
            return db
        except sqlite3.OperationalError as e:  # cannot open or lock it: the file may be fine, keep it
            raise BadInput(f"cannot open the latency store {self.path}: {one_line(e)}: fix its permissions, wait "
                           "for the profile holding it, or pass another --cache-dir") from None
        except sqlite3.DatabaseError as e:  # not a database, truncated, malformed pages
            with contextlib.suppress(Exception):
                db.close()
            return self._rebuild(f"damaged ({one_line(e)})")

    def _rebuild(self, why: str) -> sqlite3.Connection:
        aside = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        try:
            for suffix in ("", "-journal", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    os.replace(src, Path(str(aside) + suffix))
        except OSError as e:
            raise BadInput(f"latency store {self.path} is {why} and cannot be moved aside ({e.strerror}): delete it "
                           "or pass another --cache-dir") from None
        log.warning("latency store %s is %s: moved it to %s and started a new one (its entries are measured "
                    "again when needed)", self.path, why, aside.name)
        db = self._connect()
        db.executescript(_DDL)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(STORE_SCHEMA),))
        return db

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "LatencyStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            raise BadInput(f"cannot write the latency store {self.path}: {one_line(e)}: free disk space, fix its "
                           "permissions, or pass another --cache-dir") from None

    # ---- entries -----------------------------------------------------------------------------
    def get_layer(self, device: str, layer: str) -> dict[tuple[int, int], Entry]:
        """Every stored entry of one layer shape on one device, by ``(c_in, c_out)``."""
        rows = self._db.execute("SELECT c_in, c_out, median_ms, cv, count FROM entries WHERE device = ? AND layer = ?",
                                (device, layer)).fetchall()
        return {(ci, co): Entry(m, cv, n) for ci, co, m, cv, n in rows}

    def put(self, device: str, layer: str, c_in: int, c_out: int, entry: Entry) -> None:
        if not (math.isfinite(entry.median_ms) and entry.median_ms > 0):
            raise ValueError(f"a stored latency must be positive and finite, got {entry.median_ms}")
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (device, layer, int(c_in), int(c_out), float(entry.median_ms), float(entry.cv),
                        int(entry.count), time.time()))

    def get_period(self, device: str, kind: str, axis: str) -> int | None:
        row = self._db.execute("SELECT period FROM periods WHERE device = ? AND kind = ? AND axis = ?",
                               (device, kind, axis)).fetchone()
        return None if row is None else int(row[0])

    def put_period(self, device: str, kind: str, axis: str, period: int) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO periods VALUES (?, ?, ?, ?, ?)",
                       (device, kind, axis, int(period), time.time()))

    # ---- inspecting, cleaning, moving -------------------------------------------------------
    def summary(self) -> list[dict[str, Any]]:
        """One row per device key: its fields, entries, layer shapes, median CV, oldest and newest."""
        rows = self._db.execute(
            "SELECT device, COUNT(*), COUNT(DISTINCT layer), MIN(measured_at), MAX(measured_at), "
            "SUM(cv > 0.1) FROM entries GROUP BY device ORDER BY device").fetchall()
        out = []
        for dev, n, layers, t0, t1, noisy in rows:
            periods = {f"{k}/{a}": p for k, a, p in self._db.execute(
                "SELECT kind, axis, period FROM periods WHERE device = ?", (dev,))}
            out.append({**json.loads(dev), "entries": n, "layer_shapes": layers, "noisy_entries": int(noisy or 0),
                        "oldest": t0, "newest": t1, "periods": periods, "key": dev})
        return out

    def prune(self, devices: Iterable[str] | None = None, older_than_s: float | None = None,
              max_cv: float | None = None) -> int:
        """Delete entries of ``devices`` (all devices: None), measured more than ``older_than_s`` ago,
        or with a CV above ``max_cv``; the conditions combine with AND. Returns how many went."""
        where, args = [], []
        if devices is not None:
            devices = list(devices)
            where.append(f"device IN ({','.join('?' * len(devices))})")
            args += devices
        if older_than_s is not None:
            where.append("measured_at < ?")
            args.append(time.time() - older_than_s)
        if max_cv is not None:
            where.append("cv > ?")
            args.append(max_cv)
        sql = "DELETE FROM entries" + (" WHERE " + " AND ".join(where) if where else "")
        with self._write() as db:
            n = db.execute(sql, args).rowcount
            if devices is not None and older_than_s is None and max_cv is None:
                db.execute(f"DELETE FROM periods WHERE device IN ({','.join('?' * len(devices))})", devices)
        self._db.execute("VACUUM")
        return n

    def export(self, path: str | os.PathLike, devices: Iterable[str] | None = None) -> int:
        """Write the entries (of ``devices``, or all) to a JSON file another machine can import."""
        devices = None if devices is None else set(devices)
        entries = [r for r in self._db.execute(
            "SELECT device, layer, c_in, c_out, median_ms, cv, count, measured_at FROM entries ORDER BY 1, 2, 3, 4")
            if devices is None or r[0] in devices]
        periods = [r for r in self._db.execute("SELECT device, kind, axis, period, measured_at FROM periods")
                   if devices is None or r[0] in devices]
        write_json_atomic(path, {"latprune_store_schema": STORE_SCHEMA, "entries": entries, "periods": periods})
        return len(entries)

    def import_(self, path: str | os.PathLike, replace: bool = False) -> tuple[int, list[str]]:
        """Merge an exported file: new entries are added; an entry already here is kept unless
        ``replace``. Returns the entries added or replaced, and the device keys in the file."""
        p = Path(path).expanduser()
        try:
            d = json.loads(p.read_text())
            if not isinstance(d, dict) or d.get("latprune_store_schema") != STORE_SCHEMA:
                raise ValueError(f"not a latprune store export of schema {STORE_SCHEMA}")
            entries = [(str(a), str(b), int(c), int(e), float(m), float(cv), int(n), float(t))
                       for a, b, c, e, m, cv, n, t in d["entries"]]
            periods = [(str(a), str(b), str(c), int(e), float(t)) for a, b, c, e, t in d.get("periods", [])]
            for dev in {e[0] for e in entries} | {p[0] for p in periods}:
                if set(json.loads(dev)) != set(DEVICE_FIELDS):
                    raise ValueError(f"device key {dev[:60]} is not a latprune device key")
        except FileNotFoundError:
            raise BadInput(f"{path} does not exist: pass a file written by `latprune tables export`") from None
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise BadInput(f"{path} is not a latency store export ({one_line(e)}): pass a file written by "
                           "`latprune tables export`") from None
        bad = [e for e in entries if not (math.isfinite(e[4]) and e[4] > 0 and e[2] > 0 and e[3] > 0)]
        if bad:
            raise BadInput(f"{path} holds {len(bad)} entries with non-positive widths or latency: it is damaged; "
                           "export it again")
        verb = "REPLACE" if replace else "IGNORE"
        with self._write() as db:
            before = db.total_changes
            db.executemany(f"INSERT OR {verb} INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)", entries)
            n = db.total_changes - before
            db.executemany(f"INSERT OR {verb} INTO periods VALUES (?, ?, ?, ?, ?)", periods)
        return n, sorted({e[0] for e in entries})
