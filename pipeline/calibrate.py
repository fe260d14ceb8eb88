"""Closed loop between the table's prediction and the measured latency, before any training.

Latency does not depend on weight values, so a plan can be checked before channels are removed
for good: prune a copy with the planned widths, time it end to end against the dense model
(interleaved), and if the measured ratio is over the accepted window or under it, correct the
table's end-to-end term from the measured points (:meth:`EndToEnd.corrected`) and re-solve. A
bounded number of times; every iteration is recorded, and the corrected term goes on to the
iterative pruning steps.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Callable

from latprune.errors import BudgetBelowFloor
from latprune.latency_tables.endtoend import PairConfig, measure_speedup
from latprune.latency_tables.runtimes import Backend
from latprune.latency_tables.table import LatencyTable
from latprune.models.graph import ModelGraph
from latprune.pipeline.plan import PlanConfig, PruningPlan, apply_plan_, build_plan, plan_values
from latprune.pipeline.search import search_plan

__all__ = ["LIGHT_TIMING", "CalibratedPlan", "plan_to_budget", "lines_through_plans"]

# one quick timing (one pair of sessions): what a pruning step and each search candidate get; the
# search takes the median of several, round-robin
LIGHT_TIMING = PairConfig(rounds=5, min_round_s=0.15, repeats=1, max_repeats=1)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CalibratedPlan:
    """The plan artifact: the validated plan and the table it was validated with (its end-to-end
    term as the closed loop corrected it: what the pruning steps plan with)."""

    plan: PruningPlan
    wanted_ratio: float  # budget as a fraction of dense latency
    measured_ratio: float | None  # compact/dense measured for the chosen plan (None: not calibrated)
    history: list[dict]
    table: LatencyTable  # with the corrected end-to-end term (the profiled table's when not calibrated)


def plan_to_budget(graph: ModelGraph, table: LatencyTable, wanted_ratio: float, cfg: PlanConfig,
                   backend: Backend, iters: int = 4,
                   window: tuple[float, float] = (0.90, 0.98), timing: PairConfig = PairConfig(),
                   batches=None, held_out=None, lines: Callable[[LatencyTable, dict], tuple[LatencyTable, dict]]
                   | None = None, line_rounds: int = 3) -> CalibratedPlan:
    """Plan for ``wanted_ratio`` x dense latency, corrected by measurement until it lands in range.

    A plan is accepted when its measured ratio lies in ``window`` x ``wanted_ratio``; the knapsack
    aims at the window's middle. The window's top stays under 1.0 so that the final timing, minutes
    later, still lands under the budget (BENCHMARKS.md, "Timing drift"). Without a plan in the
    window, the best plan measured under its top is kept, else the fastest one measured.
    ``batches``: training batches a data-driven value scores on; ``held_out``: the batches a
    per-width value measures its loss on. Weights do not change here: the values are computed once.
    With ``cfg.search_candidates``, each plan is the best of that many candidates at the target
    (``pipeline.search``, on the same batches). ``lines(table, layer_channels)``: grid lines
    measured through a plan's widths (``latency_tables.profile.lines_through``), at most
    ``line_rounds`` rounds of plan-then-measure before the first plan is timed (:func:`lines_through_plans`).
    """
    model, input_shape = graph.model, graph.input_shape
    lo, hi = window
    if not (0 < lo < hi <= 1):
        raise ValueError(f"calibration window must satisfy 0 < lo < hi <= 1, got {window}")
    aim = (lo + hi) / 2
    target = aim * wanted_ratio * table.dense_ms
    e2e, measured, history, seen, tried = table.e2e, [], [], {}, []
    values = plan_values(graph, cfg, batches, held_out)
    if lines is not None:
        table = lines_through_plans(graph, table, target, cfg, values, lines, line_rounds)
    if cfg.search_candidates:
        return _searched(graph, table, wanted_ratio, cfg, backend, iters, window, timing, values, batches, held_out)
    for i in range(max(iters, 1)):
        try:
            plan = build_plan(graph, table, target, cfg, e2e=e2e, values=values, warn_unpruned=i == 0)
        except BudgetBelowFloor as e:
            if i == 0 and e.floor_ms > wanted_ratio * table.dense_ms:
                raise  # even the table says the budget cannot be reached
            plan = build_plan(graph, table, e.floor_ms, cfg, e2e=e2e, values=values, warn_unpruned=False)
        widths = tuple(len(g.keep) for g in plan.groups)
        if widths in seen:  # the corrected table chose a plan already measured: nothing new to learn
            history.append({**seen[widths], "iteration": i + 1, "repeat_of": seen[widths]["iteration"]})
            break
        probe = apply_plan_(copy.deepcopy(model), plan, input_shape)
        speed = measure_speedup(backend, model, probe, input_shape, timing)
        row = {"iteration": i + 1, "target_ratio": target / table.dense_ms,
               "predicted_ratio": plan.predicted_ms / table.dense_ms, "measured_ratio": speed.ratio,
               "pair_ratios": speed.repeats, "layers_ms": plan.layers_ms,
               "e2e": {"intercept_ms": e2e.intercept_ms, "slope": e2e.slope},
               "dense_ms": speed.dense["median_ms"], "compact_ms": speed.compact["median_ms"]}
        history.append(row)
        seen[widths] = row
        tried.append((speed.ratio, plan, e2e))
        log.info("calibration %d: predicted %.3f, measured %.3f of dense (window %.3f-%.3f)", i + 1,
                 row["predicted_ratio"], speed.ratio, lo * wanted_ratio, hi * wanted_ratio)
        if lo * wanted_ratio <= speed.ratio <= hi * wanted_ratio:
            break
        # the table's error at this plan, in ms of the table's dense latency: correct and re-solve
        measured.append({"layers_ms": plan.layers_ms, "measured_ms": speed.ratio * table.dense_ms})
        e2e = table.e2e.corrected(measured)  # always from the fitted term: the clamp stays relative to it
    under = [t for t in tried if t[0] <= hi * wanted_ratio]
    # the slowest plan under the window's top (the most channels), else the fastest plan seen
    ratio, plan, used = max(under, key=lambda t: t[0]) if under else min(tried, key=lambda t: t[0])
    return CalibratedPlan(plan, wanted_ratio, ratio, history, table.with_e2e(used))


def lines_through_plans(graph: ModelGraph, table: LatencyTable, target_ms: float, cfg: PlanConfig, values,
                        lines: Callable[[LatencyTable, dict], tuple[LatencyTable, dict]], rounds: int) -> LatencyTable:
    """Plan, measure the grid lines the plan's widths lack, plan again on the finer table, until a
    plan's widths are all measured entries or ``rounds`` rounds are spent. The knapsack picks the
    widths an interpolated table flatters most; after this the closed loop times a plan whose
    layers the table measured rather than guessed. Each round's record is in the returned table's
    ``meta["plan_lines"]`` (``latency_tables.profile.lines_through``)."""
    for r in range(rounds):
        try:
            plan = build_plan(graph, table, target_ms, cfg, values=values, warn_unpruned=False)
        except BudgetBelowFloor:
            break  # the closed loop plans at the floor and says so
        table, done = lines(table, plan.layer_channels)
        if not done["lines"]:
            break
        log.info("grid lines through the plan's widths (round %d): %d lines on %d signatures, %d entries measured, "
                 "%d from the latency store; planning again", r + 1, done["lines"], len(done["layers"]),
                 done["measured"], done["from_store"])
    return table


def _searched(graph: ModelGraph, table: LatencyTable, wanted_ratio: float, cfg: PlanConfig, backend: Backend,
              iters: int, window: tuple[float, float], timing: PairConfig, values, batches,
              held_out) -> CalibratedPlan:
    """The plan search (``pipeline.search``) with the measurement in it: candidates proposed by the
    table around the window's middle, each timed against the dense model (one pair of sessions of
    ``timing``, at most :data:`LIGHT_TIMING`'s rounds and round length; the median of several),
    those measured under the window's top scored on held-out data. When none
    is, the end-to-end term is corrected through the fastest candidate's measurement and the search
    runs again (at most ``iters`` searches). The term is then moved through the chosen plan's
    measurement, for the pruning steps."""
    model, input_shape = graph.model, graph.input_shape
    lo, hi = window
    aim = (lo + hi) / 2 * wanted_ratio * table.dense_ms

    light = PairConfig(min(timing.rounds, LIGHT_TIMING.rounds), min(timing.min_round_s, LIGHT_TIMING.min_round_s),
                       1, 1)

    def measure(m) -> float:
        return measure_speedup(backend, model, m, input_shape, light).ratio

    e2e, history = table.e2e, []
    def search(target: float, i: int) -> PruningPlan:
        return search_plan(graph, table, target, cfg, values, batches, held_out, e2e=e2e, warn_unpruned=i == 0,
                           measure=measure, accept_ratio=hi * wanted_ratio)

    for i in range(max(iters, 1)):
        target = aim
        try:
            plan = search(target, i)
        except BudgetBelowFloor as e:  # raised by the knapsack, before any candidate is built
            if i == 0 and e.floor_ms > wanted_ratio * table.dense_ms:
                raise  # even the table says the budget cannot be reached
            target = e.floor_ms
            plan = search(target, i)
        chosen = next(r for r in plan.search["candidates"] if r.get("chosen"))
        ratio = chosen["measured_ratio"]
        history.append({"iteration": i + 1, "search": plan.search["cost"], "target_ratio": target / table.dense_ms,
                        "predicted_ratio": plan.predicted_ms / table.dense_ms, "measured_ratio": ratio,
                        "pair_ratios": chosen["measured_ratios"], "layers_ms": plan.layers_ms,
                        "e2e": {"intercept_ms": e2e.intercept_ms, "slope": e2e.slope}})
        log.info("plan search %d: chose a plan measured at %.3f of dense (window %.3f-%.3f)", i + 1, ratio,
                 lo * wanted_ratio, hi * wanted_ratio)
        # the table's error at the chosen plan (the fastest one when none fitted), in ms of its dense latency
        e2e = table.e2e.corrected([{"layers_ms": plan.layers_ms, "measured_ms": ratio * table.dense_ms}])
        if ratio <= hi * wanted_ratio:
            break
    # the plan's prediction under the corrected term (its measurement), which the pruning steps aim at
    plan = dataclasses.replace(plan, predicted_ms=e2e.predict(plan.layers_ms),
                               e2e=e2e.to_dict() | {"points": len(e2e.points)})
    return CalibratedPlan(plan, wanted_ratio, ratio, history, table.with_e2e(e2e))
