"""Adaptive sampling of the layer tables (``latprune profile --sampling adaptive``).

The full grid measures every (c_in, c_out) pair at the candidate spacing: its size grows with the
square of the width (ResNet-50 at step 8: tens of thousands of entries). Most of those points
carry no information: latency is monotone in both widths and, between the runtime's staircase
edges, close to linear. Here each layer's grid is built instead as

1. **the step period** of the runtime along each axis (:func:`detect_period`): on one wide layer,
   a window of widths at the candidate spacing; the widest period whose steps are flat within
   noise. It is a property of the device, runtime and dtype, detected once and kept in the
   latency store. A width then costs what the top of its step costs (``table.step_top``), so the
   grid needs only step tops;
2. **a coarse grid**: ``coarse`` step tops per axis, evenly spread, the dense width included;
3. **refinement** (:func:`refine`): a grid line is added in the middle of an interval whose two
   ends disagree beyond their measured noise (and beyond ``tol``); an interval whose new middle
   agrees with the straight line through its ends is left as it is. One queue over all layers,
   ordered by the error an interval can hide (its ends' difference, times the number of model
   layers sharing the signature) per entry the new line costs: the costly layers get the fine
   grid, the cheap ones stay coarse. The queue stops at the budget of entries, at the deadline,
   or when no interval disagrees.

Every grid stays a full (c_in x c_out) product, so a :class:`~latprune.latency_tables.table.LayerTable`
holds it unchanged, with its periods.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import numpy as np

from latprune.latency_tables.table import LayerSignature, step_top
from latprune.models.widths import candidate_widths

__all__ = ["Measure", "AxisGrid", "step_tops", "spread", "period_window", "detect_period", "LayerGrid", "refine"]

# (signature key, c_in, c_out) -> (median ms, cv of round medians)
Measure = Callable[[str, int, int], tuple[float, float]]
NOISE_SIGMAS = 3.0  # neighbours "disagree" when they differ by more than this many CVs (and tol)


def step_tops(dense: int, step: int, period: int) -> list[int]:
    """The widths worth measuring on one axis: the top of each step of ``period`` channels among
    the candidate widths at ``step`` spacing (all of them where ``period`` is 1)."""
    return sorted({int(step_top(w, period, dense)) for w in candidate_widths(dense, step)})


def spread(cands: list[int], k: int) -> list[int]:
    """``k`` of ``cands`` evenly spread by index, the first and the last included."""
    if len(cands) <= k:
        return list(cands)
    idx = np.unique(np.round(np.linspace(0, len(cands) - 1, k)).astype(int))
    return [cands[i] for i in idx]


def _tol(v: tuple[float, float], tol: float) -> float:
    """How far from ``v`` a value may lie and still agree with it: ``tol`` relative, or the noise."""
    return max(tol, NOISE_SIGMAS * v[1]) * v[0]


def period_window(dense: int, step: int, window: int = 16) -> list[int]:
    """The widths :func:`detect_period` measures along an axis: the first ``window`` multiples of ``step``."""
    return list(range(step, dense + 1, step))[:window]


def detect_period(along: Callable[[int], tuple[float, float]], dense: int, step: int, tol: float = 0.03,
                  window: int = 16) -> int | None:
    """The runtime's staircase period along one axis of one layer, in channels, from the first
    ``window`` widths at ``step`` spacing (``along(w)``: median and cv at width ``w``).

    The widest of 8, 4 and 2 x ``step`` whose steps are flat (every width within noise of its
    step's top) with at least two whole steps in the window; 1 when none is; None when the window
    cannot tell (fewer than 4 widths, or latency rises less than 20 % across it: overhead-bound).
    """
    widths = period_window(dense, step, window)
    if len(widths) < 4:
        return None
    f = {w: along(w) for w in widths}
    if f[widths[-1]][0] < 1.2 * f[widths[0]][0]:
        return None
    for period in (8 * step, 4 * step, 2 * step):
        if 2 * period > widths[-1]:
            continue
        pairs = [(w, math.ceil(w / period) * period) for w in widths]
        pairs = [(w, top) for w, top in pairs if top in f and top != w]
        if pairs and all(abs(f[w][0] - f[top][0]) <= max(_tol(f[w], tol), _tol(f[top], tol)) for w, top in pairs):
            return period
    return 1


@dataclasses.dataclass
class AxisGrid:
    cands: list[int]  # the widths that may be measured (step tops)
    grid: list[int]  # the ones chosen so far
    smooth: set[tuple[int, int]] = dataclasses.field(default_factory=set)  # intervals checked linear


@dataclasses.dataclass
class LayerGrid:
    """One signature's grid while it is refined."""

    key: str
    sig: LayerSignature
    layers: int  # model layers sharing the signature
    axes: dict[str, AxisGrid]  # "in", "out"

    def entries(self) -> list[tuple[int, int]]:
        return [(i, o) for i in self.axes["in"].grid for o in self.axes["out"].grid]


def _at(axis: str, x: int, other: int) -> tuple[int, int]:
    return (x, other) if axis == "in" else (other, x)


def _candidates(g: LayerGrid, f: dict, tol: float) -> list[tuple[float, str, int, int, int, int]]:
    """(priority, axis, a, b, middle, cost) of each interval of ``g`` whose ends disagree."""
    out = []
    for axis, other in (("in", "out"), ("out", "in")):
        ax, lines = g.axes[axis], g.axes[other].grid
        for a, b in zip(ax.grid, ax.grid[1:]):
            between = [c for c in ax.cands if a < c < b]
            if not between or (a, b) in ax.smooth:
                continue
            gaps = []
            for o in lines:
                fa, fb = f[(g.key, *_at(axis, a, o))], f[(g.key, *_at(axis, b, o))]
                gaps.append((abs(fb[0] - fa[0]), abs(fb[0] - fa[0]) > max(_tol(fa, tol), _tol(fb, tol))))
            if any(disagree for _, disagree in gaps):
                cost = len(lines)
                out.append((max(d for d, _ in gaps) * g.layers / cost, axis, a, b, between[len(between) // 2], cost))
    return out


def refine(grids: list[LayerGrid], measure: Measure, f: dict, tol: float, budget: int,
           deadline: float | None = None, on_entry: Callable[[], None] | None = None) -> dict:
    """Refine ``grids`` in place (``f`` holds every measured entry by ``(key, c_in, c_out)`` and
    receives the new ones; ``measure`` measures one) until no interval disagrees, ``budget``
    entries were spent, or ``time.monotonic()`` passes ``deadline``. Returns what happened:
    ``entries`` spent, ``lines`` added, ``stopped`` ("agreed", "budget" or "time") and ``coarse``:
    the signatures left with disagreeing intervals."""
    queue = {g.key: _candidates(g, f, tol) for g in grids}
    by_key = {g.key: g for g in grids}
    spent, lines, stopped = 0, 0, "agreed"
    while True:
        open_ = [(c, k) for k, cs in queue.items() for c in cs]
        if not open_:
            break
        if deadline is not None and time.monotonic() > deadline:
            stopped = "time"
            break
        fitting = [(c, k) for c, k in open_ if spent + c[5] <= budget]
        if not fitting:
            stopped = "budget"
            break
        (_, axis, a, b, m, cost), key = max(fitting, key=lambda ck: ck[0][0])
        g = by_key[key]
        other = "out" if axis == "in" else "in"
        for o in g.axes[other].grid:
            at = (key, *_at(axis, m, o))
            if at not in f:
                f[at] = measure(*at)
                if on_entry:
                    on_entry()
        spent, lines = spent + cost, lines + 1
        ax = g.axes[axis]
        ax.grid = sorted([*ax.grid, m])
        linear = True
        for o in g.axes[other].grid:
            fa, fm, fb = (f[(key, *_at(axis, x, o))] for x in (a, m, b))
            line = fa[0] + (m - a) / (b - a) * (fb[0] - fa[0])
            linear &= abs(fm[0] - line) <= _tol(fm, tol)
        if linear:
            ax.smooth |= {(a, m), (m, b)}
        queue[key] = _candidates(g, f, tol)
    coarse = sorted(k for k, cs in queue.items() if cs)
    return {"entries": spent, "lines": lines, "stopped": stopped if coarse else "agreed", "coarse": coarse}
