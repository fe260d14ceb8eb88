"""The latency lookup table: measured per-layer latency over a (c_in, c_out) grid.

Free of torch on purpose (numpy only), so the knapsack and anything that reads a table can be
tested and reused without a model. A table is keyed by a :class:`Fingerprint` (device, runtime,
threads, batch, dtype, input size) and refuses to be used for a setting it was not measured for.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from latprune.errors import BadInput

SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LayerSignature:
    """What determines a prunable layer's latency, apart from its channel counts."""

    kind: str  # "conv", "dwconv" (depthwise: c_in == c_out == groups) or "linear"
    c_in: int  # dense widths: the grid spans [.., c_in] x [.., c_out]
    c_out: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    in_hw: tuple[int, int] = (1, 1)
    activation: str = "relu"

    def __post_init__(self):
        if self.kind not in ("conv", "dwconv", "linear"):
            raise ValueError(f"layer kind must be conv, dwconv or linear, got {self.kind!r}")

    @property
    def key(self) -> str:
        k, s, p, d, hw = self.kernel, self.stride, self.padding, self.dilation, self.in_hw
        return (
            f"{self.kind}:{self.c_in}x{self.c_out}:k{k[0]}x{k[1]}:s{s[0]}x{s[1]}:p{p[0]}x{p[1]}"
            f":d{d[0]}x{d[1]}:in{hw[0]}x{hw[1]}:{self.activation}"
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerSignature":
        t = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**t)


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """The setting a table was measured in. Two tables are interchangeable only if these match."""

    device: str
    runtime: str
    runtime_version: str
    provider: str
    threads: int
    batch: int
    dtype: str
    input_shape: tuple[int, int, int]  # C, H, W of one image

    MATCH_FIELDS = ("device", "runtime", "provider", "threads", "batch", "dtype", "input_shape")

    def mismatches(self, other: "Fingerprint") -> list[str]:
        out = []
        for f in self.MATCH_FIELDS:
            a, b = _norm(getattr(self, f)), _norm(getattr(other, f))
            if a != b:
                out.append(f"{f}: table has {a!r}, run wants {b!r}")
        return out


def _norm(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


@dataclasses.dataclass
class LayerTable:
    """Median latency (ms) of one layer signature at each grid point, with its spread and count."""

    signature: LayerSignature
    c_in_grid: list[int]
    c_out_grid: list[int]
    median_ms: np.ndarray  # [len(c_in_grid), len(c_out_grid)]
    cv: np.ndarray  # coefficient of variation of per-round medians
    count: np.ndarray  # timed calls behind each median

    def lookup(self, c_in: float, c_out: float) -> float:
        """Latency at (c_in, c_out), bilinear between grid points (linear for 1-D grids)."""
        if self.signature.kind == "dwconv":
            c_in = c_out
        return float(_interp2(self.c_in_grid, self.c_out_grid, self.median_ms, c_in, c_out))


def _interp_axis(grid: list[int], x: float) -> tuple[int, int, float]:
    g = grid
    if len(g) == 1:
        return 0, 0, 0.0
    x = min(max(x, 0.0), g[-1])
    j = int(np.searchsorted(g, x))
    if j == 0:  # below the smallest grid point: extrapolate linearly towards 0 channels
        return 0, 1, (x - g[0]) / (g[1] - g[0])
    if j >= len(g):
        j = len(g) - 1
    return j - 1, j, (x - g[j - 1]) / (g[j] - g[j - 1])


def _interp2(gi: list[int], go: list[int], z: np.ndarray, ci: float, co: float) -> float:
    i0, i1, ti = _interp_axis(gi, ci)
    o0, o1, to = _interp_axis(go, co)
    a = z[i0, o0] * (1 - to) + z[i0, o1] * to
    b = z[i1, o0] * (1 - to) + z[i1, o1] * to
    return max(float(a * (1 - ti) + b * ti), 0.0)


def channel_grid(width: int, step: int) -> list[int]:
    """Multiples of ``step`` up to ``width``, plus ``width`` itself."""
    if width <= step:
        return [width]
    pts = list(range(step, width + 1, step))
    if pts[-1] != width:
        pts.append(width)
    return pts


@dataclasses.dataclass
class LatencyTable:
    """Per-layer tables for one model in one deployment setting, plus its end-to-end dense latency.

    ``layer_keys`` maps each prunable layer of the model (by module name) to its signature key;
    layers sharing a signature share one :class:`LayerTable`. ``dense_ms`` is the measured
    end-to-end latency of the dense model: what no table covers (stem, pooling, adds, per-op
    overhead) is estimated as ``dense_ms`` minus the tables' sum at dense widths.
    """

    fingerprint: Fingerprint
    layers: dict[str, LayerTable]
    layer_keys: dict[str, str]
    dense_ms: float
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def lookup(self, layer: str, c_in: float, c_out: float) -> float:
        return self.layers[self.layer_keys[layer]].lookup(c_in, c_out)

    def check_compatible(self, wanted: Fingerprint, force: bool = False) -> None:
        diffs = self.fingerprint.mismatches(wanted)
        if diffs and not force:
            raise BadInput(
                "latency table was measured for another setting ("
                + "; ".join(diffs)
                + "): re-profile, or pass --force to use it anyway"
            )

    # ---- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        fp = dataclasses.asdict(self.fingerprint)
        return {
            "schema_version": self.schema_version,
            "header": fp,
            "meta": self.meta,
            "dense_ms": self.dense_ms,
            "layer_keys": self.layer_keys,
            "layers": {
                k: {
                    "signature": dataclasses.asdict(t.signature),
                    "c_in_grid": t.c_in_grid,
                    "c_out_grid": t.c_out_grid,
                    "median_ms": np.asarray(t.median_ms).tolist(),
                    "cv": np.asarray(t.cv).tolist(),
                    "count": np.asarray(t.count).tolist(),
                }
                for k, t in self.layers.items()
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatencyTable":
        if d.get("schema_version") != SCHEMA_VERSION:
            raise BadInput(
                f"latency table schema {d.get('schema_version')!r} is not {SCHEMA_VERSION}: "
                "re-profile with this latprune version"
            )
        h = dict(d["header"])
        h["input_shape"] = tuple(h["input_shape"])
        layers = {}
        for k, t in d["layers"].items():
            sig = LayerSignature.from_dict(t["signature"])
            med = np.asarray(t["median_ms"], dtype=float)
            shape = (len(t["c_in_grid"]), len(t["c_out_grid"]))
            if med.shape != shape or not np.all(np.isfinite(med)) or np.any(med <= 0):
                raise ValueError(f"layer {k}: median_ms must be positive, finite, shape {shape}")
            layers[k] = LayerTable(
                sig, list(t["c_in_grid"]), list(t["c_out_grid"]), med,
                np.asarray(t["cv"], dtype=float), np.asarray(t["count"], dtype=int),
            )
        missing = set(d["layer_keys"].values()) - set(layers)
        if missing:
            raise ValueError(f"layer_keys name signatures with no table: {sorted(missing)[:3]}")
        dense = float(d["dense_ms"])
        if not (math.isfinite(dense) and dense > 0):
            raise ValueError(f"dense_ms must be positive, got {dense}")
        return cls(Fingerprint(**h), layers, dict(d["layer_keys"]), dense, d.get("meta", {}))

    def save(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        p = Path(path)
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except FileNotFoundError:
            raise BadInput(f"latency table {p} does not exist: run `latprune profile` first") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise BadInput(
                f"latency table {p} is truncated or corrupted ({type(e).__name__}: {e}): "
                "delete it and re-profile"
            ) from None


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON to a temp file in the same folder, then rename: never a half-written file."""
    return write_bytes_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
