"""The one timing harness: the profiler, the closed loop, verify, bench and the TensorRT export use it.

Protocol (../shared/BENCHMARKS.md): warm up before timing, never time the first call; pin threads;
time programs interleaved so drift hits them alike, in *rounds* of a minimum duration
(:func:`time_interleaved`: A for 0.5 s, B for 0.5 s, ...) or in *blocks* of a fixed number of
calls (:func:`time_blocks`, trtexec-style: 10 calls of A, 10 of B, ...); report medians and
percentiles (:func:`latency_stats`), the coefficient of variation, and ratios paired by round or
block (the median of the per-round ratios) with a bootstrap interval that resamples rounds or
blocks (:func:`bootstrap_median_ci`).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import numpy as np

__all__ = ["Timing", "wall_clock_ms", "warmup", "time_interleaved", "time_blocks", "latency_stats", "paired_ratio",
           "block_ratios", "bootstrap_median_ci", "bootstrap_ratio_ci"]


@dataclasses.dataclass
class Timing:
    """Per-call latencies (ms) of one program, grouped by round."""

    rounds: list[list[float]]

    @property
    def samples(self) -> np.ndarray:
        return np.concatenate([np.asarray(r) for r in self.rounds])

    @property
    def round_medians(self) -> np.ndarray:
        return np.array([np.median(r) for r in self.rounds])

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples))

    @property
    def cv(self) -> float:
        m = self.round_medians
        return float(np.std(m) / np.mean(m)) if len(m) > 1 else 0.0

    def summary(self) -> dict[str, float]:
        """Median, p90 and mean of the calls; ``cv`` here is that of the per-round medians."""
        s = latency_stats(self.samples)
        return {"median_ms": s["p50_ms"], "p90_ms": s["p90_ms"], "mean_ms": s["mean_ms"], "cv": self.cv,
                "rounds": len(self.rounds), "count": s["count"]}


def latency_stats(samples_ms: np.ndarray, batch: int | None = None) -> dict[str, float]:
    """Per-call statistics: p50, p90, p99, mean, std, min, max, CV (std / mean of the calls), count,
    and with ``batch`` the throughput in images per second at the mean."""
    s = np.asarray(samples_ms, dtype=float).ravel()
    mean = float(s.mean())
    out = {"p50_ms": float(np.percentile(s, 50)), "p90_ms": float(np.percentile(s, 90)),
           "p99_ms": float(np.percentile(s, 99)), "mean_ms": mean, "std_ms": float(s.std()),
           "min_ms": float(s.min()), "max_ms": float(s.max()), "cv": float(s.std() / mean), "count": int(s.size)}
    if batch is not None:
        out["throughput_ips"] = batch * 1e3 / mean
    return out


def wall_clock_ms(fn: Callable[[], object]) -> float:
    """Host wall-clock time of one call, in ms: right for runtimes whose call returns when done."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def warmup(fn: Callable[[], object], min_calls: int = 3, min_s: float = 0.05,
           timer: Callable[[Callable[[], object]], float] = wall_clock_ms) -> None:
    t0, n = time.perf_counter(), 0
    while n < min_calls or time.perf_counter() - t0 < min_s:
        timer(fn)
        n += 1


def time_interleaved(
    fns: Sequence[Callable[[], object]],
    rounds: int = 5,
    min_round_s: float = 0.5,
    min_calls: int = 3,
    warmup_s: float = 0.2,
    timer: Callable[[Callable[[], object]], float] = wall_clock_ms,
) -> list[Timing]:
    """Time several programs in interleaved rounds; each round of each program lasts ``min_round_s``.

    ``timer`` times one call in ms: host wall clock by default, CUDA events for asynchronous GPU
    runtimes (``latency_tables.runtimes``).
    """
    if rounds < 1 or min_round_s <= 0:
        raise ValueError(f"need rounds >= 1 and min_round_s > 0, got {rounds}, {min_round_s}")
    for fn in fns:
        warmup(fn, min_s=warmup_s, timer=timer)
    out = [Timing([]) for _ in fns]
    for _ in range(rounds):
        for fn, t in zip(fns, out):
            times: list[float] = []
            start = time.perf_counter()
            while len(times) < min_calls or time.perf_counter() - start < min_round_s:
                times.append(timer(fn))
            t.rounds.append(times)
    return out


def paired_ratio(num: Timing, den: Timing) -> float:
    """Median over interleaved rounds of (round median of ``num``) / (round median of ``den``).

    Round i of both programs ran side by side, so a drift of the machine scales both; the ratio of
    pooled medians does not cancel drift between rounds or between processes (a pooled ratio was
    seen at 0.56 while its three pairs of sessions read 0.43-0.50)."""
    a, b = num.round_medians, den.round_medians
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired rounds needed, got {len(a)} and {len(b)}")
    return float(np.median(a / b))


def block_ratios(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Per block: median(``num`` block) / median(``den`` block), from ``[blocks, calls]`` arrays;
    block ``i`` of each was timed side by side, so drift of the machine scales both."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    if num.ndim != 2 or num.shape[0] != den.shape[0] or num.shape[0] < 2:
        raise ValueError(f"need [blocks, calls] arrays with >= 2 paired blocks, got {num.shape}, {den.shape}")
    return np.median(num, axis=1) / np.median(den, axis=1)


def bootstrap_median_ci(ratios: np.ndarray, n_boot: int = 2000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the median of paired ``ratios`` (one per round or block), resampling them."""
    r = np.asarray(ratios, float)
    idx = np.random.default_rng(seed).integers(0, len(r), size=(n_boot, len(r)))
    lo, hi = np.percentile(np.median(r[idx], axis=1), [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def bootstrap_ratio_ci(num: Timing, den: Timing, n_boot: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Confidence interval of :func:`paired_ratio`, resampling rounds."""
    return bootstrap_median_ci(num.round_medians / den.round_medians, n_boot, level, seed)


def time_blocks(programs: dict[str, Callable[[], float]], iterations: int, block: int,
                warmup_ms: float) -> dict[str, np.ndarray]:
    """Each program returns the latency of one call in ms (it times itself: host clock, CUDA
    events). Warm up each, then time them in interleaved blocks (A x block, B x block, A x block,
    ...): ``{name: [blocks, block]}``."""
    for fn in programs.values():
        warmup(fn, min_calls=0, min_s=warmup_ms / 1e3, timer=lambda f: f())
    n_blocks = math.ceil(iterations / block)
    out = {k: np.empty((n_blocks, block)) for k in programs}
    for b in range(n_blocks):
        for k, fn in programs.items():
            for i in range(block):
                out[k][b, i] = fn()
    for k, v in out.items():
        if not np.isfinite(v).all() or (v <= 0).any():
            raise RuntimeError(f"{k}: a timed call returned a latency that is not a positive number")
    return out
