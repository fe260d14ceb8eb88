"""Whole-model timing: dense against a pruned configuration, and what the tables must predict.

The layer tables are fitted to the whole model (:class:`~latprune.latency_tables.table.EndToEnd`)
and validated on it here. Latency does not depend on weight values, so a configuration is the
model itself with channels physically removed (``models.surgery``), its weights whatever they are.

Every whole-model figure is a *ratio to the dense model timed interleaved with it* (A B A B ...,
../shared/BENCHMARKS.md), converted to milliseconds with the table's dense latency: on a shared
machine both models drift together, and the ratio is what a budget is checked on. A measurement
is ``repeats`` pairs of fresh sessions (on the 2-core build machine the same pair of models read
ratios 0.38-0.48 in fresh sessions a few seconds apart; one pair is not enough), and more pairs,
up to ``max_repeats``, while the ratio's 95 % interval is wider than ``max_ci``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from latprune.latency_tables.predict import LatencyModel
from latprune.latency_tables.runtimes import Backend
from latprune.latency_tables.table import EndToEnd, LatencyTable
from latprune.latency_tables.timing import Timing, bootstrap_ratio_ci, paired_ratio
from latprune.models.graph import ModelGraph
from latprune.models.surgery import pruned_copy
from latprune.models.widths import candidate_widths

__all__ = ["PairConfig", "SpeedResult", "measure_speedup", "measure_side_by_side",
           "model_layers_ms", "predicted_latency", "random_widths",
           "smallest_widths", "measure_configs", "fit_end_to_end", "validate_table"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PairConfig:
    rounds: int = 7  # interleaved rounds per pair of sessions
    min_round_s: float = 0.25
    repeats: int = 2  # pairs of fresh sessions, pooled
    max_repeats: int = 4  # more pairs while the ratio's interval is wider than max_ci
    max_ci: float = 0.04  # relative half-width of the ratio's 95 % interval

    def __post_init__(self):
        if self.rounds < 1 or self.repeats < 1 or self.max_repeats < self.repeats or self.min_round_s <= 0:
            raise ValueError(f"invalid timing settings {self}")


@dataclasses.dataclass(frozen=True)
class SpeedResult:
    dense: dict
    compact: dict
    speedup: float  # median over interleaved rounds of dense / compact round medians (timing.paired_ratio)
    speedup_ci95: tuple[float, float]
    ratio: float  # 1 / speedup, compact over dense: what the budget fraction is compared with
    repeats: list[float] = dataclasses.field(default_factory=list)  # the ratio of each pair of sessions

    @property
    def compact_ms(self) -> float:
        """The compact latency on the dense model's scale: dense median x paired ratio."""
        return self.dense["median_ms"] * self.ratio


def _one_set(backend: Backend, prepared: list, input_shape: tuple[int, int, int], cfg: PairConfig) -> list[Timing]:
    """One fresh session per model, timed interleaved for ``cfg.rounds`` rounds after a throwaway
    round (first measurements run slow); the sessions are released before returning."""
    fns = [backend.model_runner(m, input_shape) for m in prepared]
    backend.measure(fns, 1, cfg.min_round_s / 4)
    return backend.measure(fns, cfg.rounds, cfg.min_round_s)


def measure_speedup(backend: Backend, dense, compact, input_shape: tuple[int, int, int],
                    cfg: PairConfig = PairConfig()) -> SpeedResult:
    """Dense and compact interleaved in one process; ``dense``/``compact`` are ONNX paths or modules."""
    a, b = backend.prepare_model(dense, input_shape), backend.prepare_model(compact, input_shape)
    td, tc, ratios = Timing([]), Timing([]), []

    def one_pair():
        d, c = _one_set(backend, [a, b], input_shape, cfg)
        td.rounds.extend(d.rounds)
        tc.rounds.extend(c.rounds)
        ratios.append(1 / paired_ratio(d, c))

    for _ in range(cfg.repeats):
        one_pair()
    lo, hi = bootstrap_ratio_ci(td, tc)
    speedup = paired_ratio(td, tc)
    while len(ratios) < cfg.max_repeats and (hi - lo) / 2 > cfg.max_ci * speedup:
        log.info("speedup interval %.2f-%.2f is wide: timing another pair of sessions", lo, hi)
        one_pair()
        lo, hi = bootstrap_ratio_ci(td, tc)
        speedup = paired_ratio(td, tc)
    log.info("dense %.3f ms, compact %.3f ms (pooled medians): speedup %.2fx [%.2f, %.2f] paired by round, pairs %s",
             td.median_ms, tc.median_ms, speedup, lo, hi, ", ".join(f"{r:.3f}" for r in ratios))
    return SpeedResult(td.summary(), tc.summary(), speedup, (lo, hi), 1 / speedup, ratios)


def measure_side_by_side(backend: Backend, models: dict[str, Any], input_shape: tuple[int, int, int],
                         cfg: PairConfig = PairConfig()) -> dict[str, dict[str, Any]]:
    """Several models (ONNX paths, modules, or what ``backend.prepare_model`` returned) timed
    interleaved in ``cfg.repeats`` sets of fresh sessions, and more sets, up to ``cfg.max_repeats``,
    while a ratio's 95 % interval is wider than ``cfg.max_ci`` (as :func:`measure_speedup`); per
    model its pooled timing summary and its ``ratio`` to the first model (paired by round, with a
    95 % bootstrap interval over rounds), and ``ms`` = the first model's median x that ratio, so
    drift between rounds cancels as in :func:`measure_speedup`."""
    names = list(models)
    prepared = [backend.prepare_model(models[k], input_shape) for k in names]
    pooled = [Timing([]) for _ in names]

    def one_set():
        for t, new in zip(pooled, _one_set(backend, prepared, input_shape, cfg)):
            t.rounds.extend(new.rounds)

    def widest() -> float:  # the largest relative half-width of a speedup's interval
        ref = pooled[0]
        return max(((hi - lo) / 2 / paired_ratio(ref, t) for t in pooled[1:]
                    for lo, hi in [bootstrap_ratio_ci(ref, t)]), default=0.0)

    sets = 0
    while sets < cfg.repeats or (sets < cfg.max_repeats and widest() > cfg.max_ci):
        if sets >= cfg.repeats:
            log.info("a ratio's interval is wider than %.0f %%: timing another set of sessions", 100 * cfg.max_ci)
        one_set()
        sets += 1
    ref = pooled[0]
    out = {}
    for k, t in zip(names, pooled):
        ratio = 1 / paired_ratio(ref, t)
        lo, hi = bootstrap_ratio_ci(ref, t)
        out[k] = {**t.summary(), "ratio": ratio, "ratio_ci95": [1 / hi, 1 / lo], "ms": ref.median_ms * ratio,
                  "sets": sets}
    log.info("side by side: %s", ", ".join(f"{k} {v['ms']:.3f} ms" for k, v in out.items()))
    return out


# ---- what the table predicts for a model ------------------------------------------------------

def model_layers_ms(graph: ModelGraph, table: LatencyTable) -> float:
    """The layer tables' sum for ``graph.model`` at its current widths."""
    lm = LatencyModel(table, graph.layer_widths(table.layer_keys))
    return lm.layers_ms(dict(lm.widths.group_size))


def predicted_latency(graph: ModelGraph, table: LatencyTable) -> float:
    """The table's whole-model prediction for ``graph.model`` at its current widths."""
    return table.e2e.predict(model_layers_ms(graph, table))


# ---- configurations ---------------------------------------------------------------------------

def random_widths(sizes: dict[str, int], step: int, rng: np.random.Generator) -> dict[str, int]:
    """A width per group drawn uniformly from its grid (multiples of ``step`` and the full width)."""
    return {g: int(rng.choice(candidate_widths(n, step))) for g, n in sizes.items()}


def smallest_widths(sizes: dict[str, int], step: int) -> dict[str, int]:
    return {g: int(candidate_widths(n, step)[0]) for g, n in sizes.items()}


SIDE_BY_SIDE = 5  # pruned configurations timed in one set of sessions beside the dense model
_DENSE = "dense"  # the dense model's name among them


def measure_configs(graph: ModelGraph, table: LatencyTable, backend: Backend,
                    configs: list[tuple[str, dict[str, int]]], cfg: PairConfig, progress: bool = True,
                    desc: str = "end to end") -> list[dict[str, Any]]:
    """Time each configuration (group widths) of ``graph.model`` against the dense model; a point each.

    The dense model is converted once; the configurations go in sets of up to :data:`SIDE_BY_SIDE`
    beside it (:func:`measure_side_by_side`: interleaved rounds, each ratio paired by round), so
    the dense model is not timed again for every configuration, and at most that many + 1 sessions
    are alive at once."""
    model, input_shape, points = graph.model, graph.input_shape, []
    dense = backend.prepare_model(model, input_shape)
    chunks = math.ceil(len(configs) / SIDE_BY_SIDE)
    size = math.ceil(len(configs) / chunks) if configs else 0
    with tqdm(total=len(configs), desc=desc, unit="model", disable=not progress) as bar:
        for start in range(0, len(configs), max(size, 1)):
            chunk = configs[start:start + size]
            probes = {label: pruned_copy(model, widths, input_shape) for label, widths in chunk}
            if _DENSE in probes:
                raise ValueError(f"a configuration may not be labelled {_DENSE!r}")
            r = measure_side_by_side(backend, {_DENSE: dense, **probes}, input_shape, cfg)
            for label, widths in chunk:
                points.append({"label": label,
                               "layers_ms": model_layers_ms(ModelGraph(probes[label], input_shape), table),
                               "measured_ms": r[label]["ratio"] * table.dense_ms, "ratio": r[label]["ratio"],
                               "ratio_ci95": r[label]["ratio_ci95"], "widths": widths})
            bar.update(len(chunk))
    return points


def fit_end_to_end(graph: ModelGraph, table: LatencyTable, backend: Backend, n_random: int, step: int,
                   cfg: PairConfig, seed: int = 0, progress: bool = True) -> EndToEnd:
    """Fit the table's end-to-end term on the dense model, the smallest plan and ``n_random`` random
    plans (widths on the grid), each timed against the dense model."""
    sizes = graph.sizes()
    rng = np.random.default_rng(seed)
    configs = [("smallest", smallest_widths(sizes, step))]
    configs += [(f"random{i}", random_widths(sizes, step, rng)) for i in range(n_random)]
    dense_point = {"label": "dense", "layers_ms": model_layers_ms(graph, table), "measured_ms": table.dense_ms,
                   "ratio": 1.0}
    points = [dense_point, *measure_configs(graph, table, backend, configs, cfg, progress, "fit")]
    e2e = EndToEnd.fit(points)
    log.info("end-to-end term: %.3f ms + %.3f x layer tables (%d points)", e2e.intercept_ms, e2e.slope, len(points))
    return e2e


def validate_table(graph: ModelGraph, table: LatencyTable, backend: Backend, k: int, step: int, cfg: PairConfig,
                   seed: int = 1, progress: bool = True) -> dict[str, Any]:
    """Prediction error on ``k`` random pruned configurations (not the fit's: another seed).

    Returns ``{"k", "median_rel_err", "p90_rel_err", "points"}``, each point with its prediction;
    the error is |predicted - measured| / measured, the measured value dense-relative (see above).
    """
    if k < 1:
        raise ValueError(f"--validate needs K >= 1 configurations, got {k}")
    rng = np.random.default_rng(10_000 + seed)
    configs = [(f"validate{i}", random_widths(graph.sizes(), step, rng)) for i in range(k)]
    points = measure_configs(graph, table, backend, configs, cfg, progress, "validate")
    for p in points:
        p["predicted_ms"] = table.e2e.predict(p["layers_ms"])
        p["rel_err"] = abs(p["predicted_ms"] - p["measured_ms"]) / p["measured_ms"]
    err = np.array([p["rel_err"] for p in points])
    out = {"k": k, "median_rel_err": float(np.median(err)), "p90_rel_err": float(np.percentile(err, 90)),
           "max_rel_err": float(err.max()), "timing": dataclasses.asdict(cfg), "points": points}
    log.info("validation on %d random configurations: median error %.1f %%, p90 %.1f %%", k,
             100 * out["median_rel_err"], 100 * out["p90_rel_err"])
    return out
