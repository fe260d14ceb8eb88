"""HALP's latency-saliency knapsack, free of torch (numpy only).

Each channel group keeps a prefix of its channels ranked by importance; its choices are widths on
the ``round_to`` grid (rounding happens inside the choice, not after). A multiple-choice knapsack
DP picks one width per group to maximise kept importance under a latency capacity.

Latency is not separable over groups: a conv's cost depends on the widths of its input *and* output
groups. :func:`plan_widths` linearises around the current widths (every layer a group touches is
costed with the neighbours at their current widths, so a group also sees what it saves its
consumers), solves, and re-solves at the new widths until the plan stops changing (HALP re-solves
at every pruning step for the same reason). It returns the best plan whose *exact* prediction fits.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

import numpy as np

__all__ = ["solve_mckp", "GroupChoices", "PlanSolution", "plan_widths", "BudgetUnreachable", "prefix_values"]

log = logging.getLogger(__name__)


def solve_mckp(values: Sequence[np.ndarray], costs: Sequence[np.ndarray], capacity: float,
               bins: int = 4000) -> list[int] | None:
    """Multiple-choice knapsack: pick one option per group, max sum(values) s.t. sum(costs) <= capacity.

    Costs may be negative (savings); they are shifted per group and discretised into ``bins``
    steps, rounding each cost *up*, so a returned choice never exceeds the capacity. Returns the
    option index per group, or ``None`` when even the cheapest options do not fit. Exact for integer
    costs when ``capacity`` (after shifting) is at most ``bins``.
    """
    if len(values) != len(costs):
        raise ValueError("values and costs need one array per group")
    base = [float(np.min(c)) for c in costs]
    cap = capacity - sum(base)
    if cap < -1e-12:
        return None
    cap = max(cap, 0.0)
    integral = all(np.allclose(c, np.round(c)) for c in costs) and float(cap).is_integer() and cap <= bins
    if integral:
        scale, n_bins = 1.0, int(cap)
    elif cap > 1e-12 * max(1.0, max(float(np.max(c)) - b for c, b in zip(costs, base))):
        scale, n_bins = bins / cap, bins
    else:
        scale, n_bins = 1.0, 0
    NEG = -np.inf
    best = np.full(n_bins + 1, NEG)
    best[0] = 0.0
    picks = []
    for v, c, b in zip(values, costs, base):
        w = np.minimum(np.ceil((np.asarray(c, float) - b) * scale - 1e-9), n_bins + 1).astype(int)
        new = np.full(n_bins + 1, NEG)
        arg = np.full(n_bins + 1, -1, dtype=int)
        for j, (vj, wj) in enumerate(zip(np.asarray(v, float), w)):
            if wj > n_bins:
                continue
            cand = np.full(n_bins + 1, NEG)
            cand[wj:] = best[: n_bins + 1 - wj] + vj
            better = cand > new
            new[better], arg[better] = cand[better], j
        best = new
        picks.append(arg)
    if not np.isfinite(best).any():
        return None
    # walk back from the best reachable total cost
    k = int(np.nanargmax(np.where(np.isfinite(best), best, NEG)))
    choice = []
    for (c, b), arg in zip(reversed(list(zip(costs, base))), reversed(picks)):
        j = int(arg[k])
        choice.append(j)
        k -= int(min(np.ceil((float(c[j]) - b) * scale - 1e-9), n_bins + 1))
    return choice[::-1]


@dataclasses.dataclass(frozen=True)
class GroupChoices:
    """One channel group: its candidate widths and the kept importance at each."""

    name: str
    widths: np.ndarray  # ascending candidate widths; the last is the dense width
    values: np.ndarray  # sum of the top-`width` normalised importances


@dataclasses.dataclass(frozen=True)
class PlanSolution:
    widths: dict[str, int]
    predicted_ms: float
    value: float
    iterations: int
    history: list[dict]


def plan_widths(groups: Sequence[GroupChoices], predict: Callable[[dict[str, int]], float],
                touches: dict[str, Callable[[dict[str, int]], float]], target_ms: float,
                max_iter: int = 20, bins: int = 4000) -> PlanSolution:
    """Choose a width per group so ``predict(widths) <= target_ms`` with maximal kept importance.

    ``predict`` gives the whole-model latency of a width assignment; ``touches[g](widths)`` the
    latency of just the layers group ``g`` touches (its producers and consumers).
    """
    # Targets often come from predictions themselves (iterative pruning's last step aims at the
    # validated plan's own prediction); float sums taken in another order differ by rounding, so
    # a relative difference under 1e-9 counts as equal rather than as an unreachable budget.
    target_ms = target_ms * (1 + 1e-9)
    dense = {g.name: int(g.widths[-1]) for g in groups}
    smallest = {g.name: int(g.widths[0]) for g in groups}
    floor = predict(smallest)
    if floor > target_ms:
        raise BudgetUnreachable(floor, predict(dense))
    by_name = {g.name: g for g in groups}

    def value(w):
        return sum(float(by_name[n].values[list(by_name[n].widths).index(k)]) for n, k in w.items())

    cur, best, history = dict(dense), None, []
    it = 0
    for it in range(1, max_iter + 1):
        costs = []
        for g in groups:
            base = touches[g.name](cur)
            costs.append(np.array([touches[g.name]({**cur, g.name: int(k)}) - base for k in g.widths]))
        slack = target_ms - predict(cur)
        choice = solve_mckp([g.values for g in groups], costs, slack, bins)
        if choice is None:  # linearisation says nothing fits: fall back to the smallest widths
            new = dict(smallest)
        else:
            new = {g.name: int(g.widths[j]) for g, j in zip(groups, choice)}
        p = predict(new)
        history.append({"iteration": it, "predicted_ms": p, "value": value(new)})
        if p <= target_ms and (best is None or value(new) > value(best)):
            best = dict(new)
        if new == cur:
            break
        cur = new
    best = _fill_greedily(best or smallest, groups, predict, target_ms)
    return PlanSolution(best, predict(best), value(best), it, history)


def _fill_greedily(widths, groups, predict, target_ms):
    """Spend leftover budget: widen the group with the best importance gain per ms while it fits."""
    w = dict(widths)
    while True:
        p0, cands = predict(w), []
        for g in groups:
            ws = list(g.widths)
            i = ws.index(w[g.name])
            if i + 1 < len(ws):
                trial = {**w, g.name: int(ws[i + 1])}
                p = predict(trial)
                if p <= target_ms:
                    gain = float(g.values[i + 1] - g.values[i])
                    cands.append((gain / max(p - p0, 1e-9), g.name, int(ws[i + 1])))
        if not cands:
            return w
        _, name, k = max(cands)
        w[name] = k


class BudgetUnreachable(Exception):
    def __init__(self, floor_ms: float, dense_ms: float):
        self.floor_ms, self.dense_ms = floor_ms, dense_ms
        super().__init__(f"smallest reachable predicted latency is {floor_ms:.3f} ms")


def prefix_values(importance: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Kept importance for each candidate width: the sum of the top-k scores."""
    s = np.sort(np.asarray(importance, float))[::-1]
    cs = np.concatenate([[0.0], np.cumsum(s)])
    return cs[np.asarray(widths)]
