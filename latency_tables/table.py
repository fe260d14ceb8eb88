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
from pathlib import Path
from typing import Any

import numpy as np

from latprune.errors import BadInput, one_line
from latprune.io import write_json_atomic

__all__ = ["SCHEMA_VERSION", "step_top", "LayerSignature", "Fingerprint", "LayerTable", "EndToEnd", "LatencyTable",
           "StaleSchema"]

SCHEMA_VERSION = 2  # 2: the end-to-end term (intercept + slope over the layer tables' sum)


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
    latprune_version: str = ""  # recorded, not matched: a table outlives the release that measured it

    # runtime_version is matched too: an ORT or TensorRT upgrade changes kernels and their timings
    MATCH_FIELDS = ("device", "runtime", "runtime_version", "provider", "threads", "batch", "dtype", "input_shape")

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
    # the runtime's staircase along each axis, in channels (adaptive sampling, ``latency_tables.sampling``):
    # a width costs what the top of its step costs, so the grid holds step tops and a lookup
    # interpolates between them at the top of the width's step. 1: no staircase assumed.
    period_in: int = 1
    period_out: int = 1

    def lookup(self, c_in: float, c_out: float) -> float:
        """Latency at (c_in, c_out), bilinear between grid points (linear for 1-D grids), each width
        first raised to the top of its step (:func:`step_top`) where the table has a period."""
        if self.signature.kind == "dwconv":
            c_in = c_out
        c_in = step_top(c_in, self.period_in, self.signature.c_in)
        c_out = step_top(c_out, self.period_out, self.signature.c_out)
        return float(_interp2(self.c_in_grid, self.c_out_grid, self.median_ms, c_in, c_out))


def step_top(c: float, period: int, dense: int) -> float:
    """The widest width of ``c``'s step of ``period`` channels (never above ``dense``): on a
    staircase, a width costs what its step's top costs."""
    if period <= 1:
        return c
    return float(min(math.ceil(c / period - 1e-9) * period, dense))


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


@dataclasses.dataclass(frozen=True)
class EndToEnd:
    """Whole-model latency from the layer tables' sum S: ``intercept_ms + slope * S``.

    The layer tables do not add up to a whole model: each micro-model pays a runtime call and
    layout conversions the whole model does not, and the whole model runs ops no table covers
    (stem, pooling, adds, fc). Both parts are fitted on pruned configurations of the model timed end
    to end (``points``: the dense model, the smallest plan, random plans), by least squares on the
    relative error. One point gives the proportional model through it (intercept 0).
    """

    intercept_ms: float
    slope: float
    points: tuple[dict, ...] = ()  # {"label", "layers_ms", "measured_ms"}

    def predict(self, layers_ms: float) -> float:
        return self.intercept_ms + self.slope * layers_ms

    @classmethod
    def fit(cls, points: list[dict]) -> "EndToEnd":
        if not points:
            raise ValueError("the end-to-end term needs at least one measured configuration")
        s = np.array([p["layers_ms"] for p in points], float)
        m = np.array([p["measured_ms"] for p in points], float)
        if np.any(s <= 0) or np.any(m <= 0) or not (np.all(np.isfinite(s)) and np.all(np.isfinite(m))):
            raise ValueError("end-to-end points need positive, finite layers_ms and measured_ms")
        proportional = cls(0.0, float(np.sum(s * m / m**2) / np.sum(s * s / m**2)), tuple(points))
        if len(points) < 2 or np.ptp(s) < 1e-6 * s.max():
            return proportional
        # minimise sum(((a + b s - m) / m)^2): a weighted linear least-squares problem
        A = np.stack([np.ones_like(s), s], 1) / m[:, None]
        (a, b), *_ = np.linalg.lstsq(A, np.ones_like(m), rcond=None)
        if not (b > 0 and np.all(a + b * s > 0)):  # a fit no table could mean: keep it proportional
            return proportional
        return cls(float(a), float(b), tuple(points))

    def corrected(self, measured: list[dict]) -> "EndToEnd":
        """The term after a closed loop measured ``measured`` points near the target.

        One point: keep the slope, move the intercept through it (the table's local error is
        mostly an offset). Two or more: the secant through the two latest distinct ones, with the
        slope kept within [0.5, 2] x the fitted one. The fit's own points are kept as they were.
        """
        if not measured:
            return self
        last = measured[-1]
        slope = self.slope
        distinct = [p for p in measured[:-1] if abs(p["layers_ms"] - last["layers_ms"]) > 1e-3 * last["layers_ms"]]
        if distinct:
            prev = distinct[-1]
            secant = (last["measured_ms"] - prev["measured_ms"]) / (last["layers_ms"] - prev["layers_ms"])
            slope = float(np.clip(secant, 0.5 * self.slope, 2.0 * self.slope))
        return EndToEnd(float(last["measured_ms"] - slope * last["layers_ms"]), slope, self.points)

    def to_dict(self) -> dict[str, Any]:
        return {"intercept_ms": self.intercept_ms, "slope": self.slope, "points": list(self.points)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EndToEnd":
        slope = float(d["slope"])
        if not (math.isfinite(slope) and slope > 0 and math.isfinite(float(d["intercept_ms"]))):
            raise ValueError(f"end-to-end slope must be positive and finite, got {d['slope']}")
        return cls(float(d["intercept_ms"]), slope, tuple(d.get("points", ())))


@dataclasses.dataclass
class LatencyTable:
    """Per-layer tables for one model in one deployment setting, plus the end-to-end term.

    ``layer_keys`` maps each prunable layer of the model (by module name) to its signature key;
    layers sharing a signature share one :class:`LayerTable`. ``dense_ms`` is the measured
    end-to-end latency of the dense model; ``e2e`` turns the tables' sum at any widths into a
    whole-model prediction (:class:`EndToEnd`). ``meta["validation"]`` holds the prediction error on
    random pruned configurations when the table was validated (``latprune profile --validate K``).
    """

    fingerprint: Fingerprint
    layers: dict[str, LayerTable]
    layer_keys: dict[str, str]
    dense_ms: float
    e2e: EndToEnd
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def lookup(self, layer: str, c_in: float, c_out: float) -> float:
        return self.layers[self.layer_keys[layer]].lookup(c_in, c_out)

    # ``meta`` is free-form JSON in the file; these are the fields latprune itself reads.
    @property
    def unmeasured(self) -> dict[str, str]:
        """Layers the profiler could not measure, with the reason (their groups stay unpruned)."""
        return self.meta.get("unmeasured", {})

    @property
    def validation(self) -> dict[str, Any] | None:
        """``--validate K``'s record: ``k``, ``median_rel_err``, ``p90_rel_err``, ``max_rel_err``, ``points``."""
        return self.meta.get("validation")

    @property
    def entries(self) -> int | None:
        """Table entries measured when it was profiled."""
        return self.meta.get("entries")

    def with_e2e(self, e2e: EndToEnd) -> "LatencyTable":
        return dataclasses.replace(self, e2e=e2e)

    def measurements(self) -> dict[str, Any]:
        """What predictions depend on (for cache keys): everything but the validation record,
        which ``--validate`` may add to a table later without changing a single prediction."""
        d = self.to_dict()
        d["meta"] = {k: v for k, v in d["meta"].items() if k != "validation"}
        return d

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
            "e2e": self.e2e.to_dict(),
            "layer_keys": self.layer_keys,
            "layers": {
                k: {
                    "signature": dataclasses.asdict(t.signature),
                    "c_in_grid": t.c_in_grid,
                    "c_out_grid": t.c_out_grid,
                    "median_ms": np.asarray(t.median_ms).tolist(),
                    "cv": np.asarray(t.cv).tolist(),
                    "count": np.asarray(t.count).tolist(),
                    **({"period_in": t.period_in, "period_out": t.period_out}
                       if (t.period_in, t.period_out) != (1, 1) else {}),
                }
                for k, t in self.layers.items()
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatencyTable":
        if d.get("schema_version") != SCHEMA_VERSION:
            raise StaleSchema(d.get("schema_version"))
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
                int(t.get("period_in", 1)), int(t.get("period_out", 1)),
            )
            if min(layers[k].period_in, layers[k].period_out) < 1:
                raise ValueError(f"layer {k}: periods must be >= 1 channel")
        missing = set(d["layer_keys"].values()) - set(layers)
        if missing:
            raise ValueError(f"layer_keys name signatures with no table: {sorted(missing)[:3]}")
        dense = float(d["dense_ms"])
        if not (math.isfinite(dense) and dense > 0):
            raise ValueError(f"dense_ms must be positive, got {dense}")
        return cls(Fingerprint(**h), layers, dict(d["layer_keys"]), dense, EndToEnd.from_dict(d["e2e"]),
                   d.get("meta", {}))

    def save(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
            if not isinstance(d, dict):
                raise TypeError(f"the file holds a JSON {type(d).__name__}, not a table object")
            return cls.from_dict(d)
        except StaleSchema as e:
            raise BadInput(
                f"latency table {p} has schema {e.found!r}, this latprune reads schema {SCHEMA_VERSION}: "
                f"rebuild it with `latprune profile --model <model> --out <dir>` (or delete it; "
                "`latprune run` re-profiles)"
            ) from None
        except FileNotFoundError:
            raise BadInput(f"latency table {p} does not exist: run `latprune profile` first") from None
        except IsADirectoryError:
            raise BadInput(f"latency table {p} is a folder: pass the table.json file itself") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise BadInput(
                f"latency table {p} is truncated or corrupted ({type(e).__name__}: {one_line(e)}): "
                "delete it and re-profile"
            ) from None


class StaleSchema(ValueError):
    def __init__(self, found: Any):
        self.found = found
        super().__init__(f"latency table schema {found!r} is not {SCHEMA_VERSION}")
