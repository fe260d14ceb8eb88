"""Timing primitives shared by the profiler and the end-to-end verification.

Protocol (../shared/BENCHMARKS.md): warm up before timing, never time the first call; pin threads;
time programs interleaved in rounds (A B A B ...) so drift hits them alike; report medians, the
coefficient of variation of per-round medians, and ratios paired by round (the median of the
per-round ratios) with a bootstrap interval over rounds.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np


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
        s = self.samples
        return {
            "median_ms": self.median_ms,
            "p90_ms": float(np.percentile(s, 90)),
            "mean_ms": float(np.mean(s)),
            "cv": self.cv,
            "rounds": len(self.rounds),
            "count": int(s.size),
        }


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
    runtimes (``latency_tables.backends``).
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


def bootstrap_ratio_ci(
    num: Timing, den: Timing, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Confidence interval of :func:`paired_ratio`, resampling rounds."""
    r = num.round_medians / den.round_medians
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(r), size=(n_boot, len(r)))
    ratios = np.median(r[idx], axis=1)
    lo, hi = np.percentile(ratios, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)
