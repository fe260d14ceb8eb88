"""Stage 2: turn a latency table, channel importances and a budget into a :class:`PruningPlan`.

The plan says, for every prunable channel group (torch-pruning's DependencyGraph), which channels
to keep. Latency is predicted from the table: the sum over layers of T(c_in, c_out) at the planned
widths, turned into a whole-model latency by the table's fitted end-to-end term
(:class:`~latprune.latency_tables.table.EndToEnd`, used by :class:`LatencyModel`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from latprune.errors import BadInput, BudgetBelowFloor
from latprune.io import write_json_atomic
from latprune.latency_tables.predict import LatencyModel
from latprune.latency_tables.profile import check_axes
from latprune.latency_tables.table import EndToEnd, LatencyTable
from latprune.models.graph import ModelGraph
from latprune.models.surgery import Removal, check_widths, prune_groups_
from latprune.models.widths import candidate_widths
from latprune.pipeline.importance import canonical_importance, group_importance, needs_batches, per_width
from latprune.pipeline.knapsack import BudgetUnreachable, GroupChoices, plan_widths, prefix_values
from latprune.pipeline.sensitivity import SensitivityCost, sensitivity_values

__all__ = ["PlanConfig", "GroupPlan", "PruningPlan", "PlanValues", "plan_values", "build_plan", "plan_for_widths",
           "build_param_plan", "narrower_plan", "apply_plan_", "count_params", "value_per_ms"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    round_to: int = 8
    importance: str = "halp"  # a name of pipeline.importance (deprecated spellings: l2, taylor)
    max_iter: int = 20
    halp_batches: int = 32  # minibatches the halp value averages over in a scoring pass (HALP: >= 32)
    # sensitivity: held-out batches the loss is measured on (as many training batches re-estimate
    # BatchNorm), and the most forward passes one estimate may take (over it, widths are subsampled)
    sensitivity_batches: int = 4
    sensitivity_passes: int = 1000
    # pipeline.search: candidate width sets scored on held-out data (0: the knapsack's plan alone),
    # the finalists that get a short fine-tune (its iterations), the held-out batches they are scored on
    search_candidates: int = 0
    search_finalists: int = 4
    search_iters: int = 30
    search_batches: int = 16
    search_seed: int = 0

    def __post_init__(self):
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1 channel, got {self.round_to}")
        object.__setattr__(self, "importance", canonical_importance(self.importance))
        if self.halp_batches < 1:
            raise ValueError(f"halp_batches must be >= 1, got {self.halp_batches}")
        if self.sensitivity_batches < 1 or self.sensitivity_passes < 1:
            raise BadInput(f"sensitivity batches and passes must be >= 1, got {self.sensitivity_batches}, "
                           f"{self.sensitivity_passes}")
        if self.search_candidates < 0 or self.search_finalists < 1 or self.search_iters < 0 or self.search_batches < 1:
            raise BadInput(f"search needs candidates >= 0, finalists >= 1, iterations >= 0 and batches >= 1, got "
                           f"{self.search_candidates}, {self.search_finalists}, {self.search_iters}, "
                           f"{self.search_batches}")

    @property
    def scoring_batches(self) -> int:
        """Training batches the importance criterion scores from (0: it needs none)."""
        if not needs_batches(self.importance):
            return 0
        return self.halp_batches

    @property
    def plan_batches(self) -> int:
        """Training batches the plan before training needs: the criterion's, and the search's (it
        re-estimates BatchNorm and fine-tunes its finalists on them)."""
        return self.halp_batches if self.search_candidates else self.scoring_batches

    @property
    def held_out_batches(self) -> int:
        """Validation batches the plan measures on (0: none): a per-width value's loss, the search's scores."""
        n = self.sensitivity_batches if per_width(self.importance) else 0
        return max(n, self.search_batches if self.search_candidates else 0)


@dataclasses.dataclass
class GroupPlan:
    name: str  # root layer of the torch-pruning group
    size: int
    keep: list[int]  # channel indices kept, in the root layer's order


@dataclasses.dataclass
class PruningPlan:
    target_ms: float
    predicted_ms: float
    dense_predicted_ms: float  # the model being planned, before this plan (the dense model at first)
    layers_ms: float  # the layer tables' sum at the planned widths
    e2e: dict  # the end-to-end term the prediction used: predicted = intercept_ms + slope * layers_ms
    groups: list[GroupPlan]
    layer_channels: dict[str, list[int]]  # layer -> [c_in, c_out] after pruning
    iterations: int
    history: list[dict]
    importance: str
    round_to: int
    unpruned: dict[str, str] = dataclasses.field(default_factory=dict)  # group -> why the knapsack left it whole
    value_cost: dict = dataclasses.field(default_factory=dict)  # sensitivity: forward passes, seconds
    search: dict = dataclasses.field(default_factory=dict)  # pipeline.search: every candidate scored, the chosen one

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PruningPlan":
        d = dict(d)
        d["groups"] = [GroupPlan(**g) for g in d["groups"]]
        return cls(**d)

    def save(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PruningPlan":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise BadInput(f"plan {path} does not exist: run `latprune plan` first") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise BadInput(f"plan {path} is corrupted ({e}): delete it and re-plan") from None


@dataclasses.dataclass
class PlanValues:
    """What the knapsack maximises: per-channel ``scores`` (a width keeps the highest), and for a
    per-width criterion (``sensitivity``) ``widths`` (group -> value at each candidate width on the
    ``round_to`` grid) with the ``cost`` of measuring them."""

    scores: dict[str, np.ndarray]
    widths: dict[str, np.ndarray] | None = None
    cost: SensitivityCost | None = None


def plan_values(graph: ModelGraph, cfg: PlanConfig, batches=None, held_out=None,
                scores: dict[str, np.ndarray] | None = None) -> PlanValues:
    """``cfg.importance``'s values on ``graph``: scored on ``batches`` (training batches) unless
    ``scores`` are given; a per-width criterion also measures its values on ``held_out`` batches,
    BatchNorm re-estimated on the first ``cfg.sensitivity_batches`` of ``batches``."""
    scores = _scores(graph, cfg, batches, scores)
    if not per_width(cfg.importance):
        return PlanValues(scores)
    if not batches or not held_out:
        raise ValueError(f"{cfg.importance} needs training batches and held-out batches")
    widths = {cg.name: candidate_widths(cg.size, cfg.round_to) for cg in graph.groups}
    vals, cost = sensitivity_values(graph, scores, widths, list(batches)[: cfg.sensitivity_batches],
                                    list(held_out)[: cfg.sensitivity_batches], cfg.sensitivity_passes)
    return PlanValues(scores, vals, cost)


def build_plan(graph: ModelGraph, table: LatencyTable, target_ms: float, cfg: PlanConfig, batches=None,
               min_widths: dict[str, int] | None = None, e2e: EndToEnd | None = None,
               scores: dict[str, np.ndarray] | None = None, held_out=None,
               values: PlanValues | None = None, warn_unpruned: bool = True) -> PruningPlan:
    """Plan which channels of ``graph.model`` to keep so the predicted latency is at most ``target_ms``.

    ``min_widths`` (by group) bounds how far each group may shrink: iterative pruning passes the
    final plan's widths, so intermediate steps never cut a group below where it must end. ``e2e``
    replaces the table's end-to-end term (the closed loop's corrected one). ``scores`` (per group,
    ``cfg.importance``'s values already computed, e.g. accumulated during training) replaces the
    scoring pass over ``batches``; ``values`` (from :func:`plan_values`) replaces both, and a per-width
    criterion needs either ``values`` or ``held_out`` batches to measure them on. ``warn_unpruned``:
    log the groups that stay whole as warnings (the plan before training) rather than debug lines
    (every pruning step plans again).
    """
    if target_ms <= 0:
        raise BadInput(f"latency target must be > 0 ms, got {target_ms}")
    groups = graph.groups
    unmeasured = table.unmeasured
    stale = [lay for cg in groups for lay in cg.producers if lay not in table.layer_keys and lay not in unmeasured]
    if stale:
        raise BadInput(f"latency table has no entry for layers {stale[:3]}: re-profile this model")
    check_axes(graph, table)
    unpruned = {}
    for cg in groups:
        why = [f"{lay}: {unmeasured[lay]}" for lay in cg.producers if lay in unmeasured]
        if why:
            unpruned[cg.name] = "not profiled (" + "; ".join(why) + ")"
        elif cg.size <= cfg.round_to:
            unpruned[cg.name] = f"{cg.size} channels, not more than --round-to {cfg.round_to}"
    for name, why in unpruned.items():
        log.log(logging.WARNING if warn_unpruned else logging.DEBUG, "group %s stays unpruned: %s", name, why)
    for name, why in graph.whole.items():  # not a group of the graph at all: reported, never planned
        log.log(logging.WARNING if warn_unpruned else logging.DEBUG, "group %s is left whole: %s", name, why)
    values = values or plan_values(graph, cfg, batches, held_out, scores)
    scores = values.scores
    lw = graph.layer_widths(table.layer_keys)
    lm = LatencyModel(table, lw, e2e)
    choices = []
    for cg in groups:
        ws = candidate_widths(cg.size, cfg.round_to)
        if cg.name in unpruned:
            ws = ws[-1:]
        if min_widths and cg.name in min_widths:
            ws = ws[ws >= min(min_widths[cg.name], cg.size)]
        if values.widths is None:
            kept = prefix_values(scores[cg.name], ws)
        else:
            by_width = dict(zip(candidate_widths(cg.size, cfg.round_to).tolist(), values.widths[cg.name]))
            kept = np.array([by_width[int(w)] for w in ws])
        choices.append(GroupChoices(cg.name, ws, kept))
    touches = {cg.name: _touch_fn(lm, lw.touched_by(cg.name)) for cg in groups}
    try:
        sol = plan_widths(choices, lm.predict, touches, target_ms, cfg.max_iter)
    except BudgetUnreachable as e:
        raise BudgetBelowFloor(
            f"budget {target_ms:.3f} ms is below the smallest reachable latency {e.floor_ms:.3f} ms "
            f"({e.floor_ms / e.dense_ms:.2f} of the predicted dense {e.dense_ms:.3f} ms): "
            "raise --budget or lower --round-to",
            e.floor_ms, e.dense_ms,
        ) from None
    log.info("plan: predicted %.3f ms for target %.3f ms (dense %.3f ms), %d iterations",
             sol.predicted_ms, target_ms, lm.dense_ms(), sol.iterations)
    return plan_for_widths(graph, table, sol.widths, scores, target_ms, cfg, e2e, unpruned, sol.iterations,
                           sol.history, values.cost.to_dict() if values.cost else {})


def plan_for_widths(graph: ModelGraph, table: LatencyTable, widths: dict[str, int], scores: dict[str, np.ndarray],
                    target_ms: float, cfg: PlanConfig, e2e: EndToEnd | None = None,
                    unpruned: dict[str, str] | None = None, iterations: int = 0, history: list[dict] | None = None,
                    value_cost: dict | None = None) -> PruningPlan:
    """The :class:`PruningPlan` keeping ``widths[group]`` channels of each group, the highest by
    ``scores``, its latency predicted by ``table`` (``e2e``: a corrected end-to-end term)."""
    lw = graph.layer_widths(table.layer_keys)
    lm = LatencyModel(table, lw, e2e)
    plans = []
    for cg in graph.groups:
        k = widths[cg.name]
        keep = np.sort(np.argsort(-scores[cg.name], kind="stable")[:k]).tolist()
        plans.append(GroupPlan(cg.name, cg.size, keep))
    return PruningPlan(
        target_ms=target_ms, predicted_ms=lm.predict(widths), dense_predicted_ms=lm.dense_ms(),
        layers_ms=lm.layers_ms(widths), e2e=lm.e2e.to_dict() | {"points": len(lm.e2e.points)}, groups=plans,
        layer_channels={lay: list(lw.widths(lay, widths)) for lay in lw.dense},
        iterations=iterations, history=history or [], importance=cfg.importance, round_to=cfg.round_to,
        unpruned={**graph.whole, **(unpruned or {})}, value_cost=value_cost or {},
    )


def _scores(graph: ModelGraph, cfg: PlanConfig, batches, given: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    if given is None:
        return group_importance(graph, cfg.importance, batches)
    sizes = graph.sizes()
    if {k: len(v) for k, v in given.items()} != sizes:
        raise ValueError("scores must hold one value per channel of every group of this model")
    return given


def _touch_fn(lm: LatencyModel, layers: list[str]):
    slope = lm.e2e.slope
    return lambda kept: slope * lm.layers_ms(kept, layers)


def value_per_ms(graph: ModelGraph, table: LatencyTable, scores: dict[str, np.ndarray], round_to: int,
                 e2e: EndToEnd | None = None) -> dict[str, np.ndarray]:
    """The knapsack's ranking key at the model's current widths: each channel's value (``scores``,
    per channel of each group) divided by the latency the table says one channel of its group saves,
    ``(L(now) - L(group one round_to step narrower)) / channels removed``. The knapsack removes
    channels in increasing order of this key, so the lowest are the next to go. A group that cannot
    narrow (at its narrowest grid width), or whose next step saves nothing (a flat stretch of the
    staircase), gets +inf: removing its channels buys no latency."""
    lm = LatencyModel(table, graph.layer_widths(table.layer_keys), e2e)
    now = dict(lm.widths.group_size)
    base = lm.predict(now)
    out = {}
    for name, size in now.items():
        ws = candidate_widths(size, round_to)  # ends with ``size`` itself
        saved = (base - lm.predict({**now, name: int(ws[-2])})) / (size - int(ws[-2])) if len(ws) > 1 else 0.0
        v = np.asarray(scores[name], dtype=float)
        out[name] = v / saved if saved > 0 else np.full_like(v, np.inf)
    return out


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_param_plan(graph: ModelGraph, table: LatencyTable, cfg: PlanConfig, keep: int | None = None,
                     max_params: int | None = None, batches=None,
                     scores: dict[str, np.ndarray] | None = None) -> PruningPlan:
    """AdaSAP_P's plan: the ``keep`` channels ranked highest *globally* (importance normalised per
    group, then compared across groups; every group keeps at least one channel), or, with
    ``max_params``, the largest such count whose pruned model has at most that many parameters
    (parameters grow with the count because the global top-n sets are nested: a binary search over
    pruned copies). No ``round_to`` here: this is the parameter-targeted ablation; the latency the
    table predicts for it is recorded, not constrained."""
    model, groups = graph.model, graph.groups
    scores = _scores(graph, cfg, batches, scores)
    names = [cg.name for cg in groups]
    owner = np.concatenate([np.full(cg.size, i) for i, cg in enumerate(groups)])
    local = np.concatenate([np.arange(cg.size) for cg in groups])
    order = np.argsort(-np.concatenate([scores[n] for n in names]), kind="stable")
    total = len(order)

    def plan_for(n: int) -> list[GroupPlan]:
        top = order[:n]
        out = []
        for i, cg in enumerate(groups):
            kept = np.sort(local[top[owner[top] == i]])
            if kept.size == 0:
                kept = np.array([int(np.argmax(scores[cg.name]))])
            out.append(GroupPlan(cg.name, cg.size, kept.tolist()))
        return out

    def params_for(n: int) -> int:
        probe = copy.deepcopy(model)
        return count_params(prune_groups_(ModelGraph(probe, graph.input_shape), {g.name: g.keep for g in plan_for(n)}))

    if max_params is not None:
        lo, hi = len(groups), total
        if params_for(lo) > max_params:
            raise BadInput(f"parameter target {max_params:,} is below the smallest reachable "
                           f"{params_for(lo):,} (one channel per group): raise --param-ratio")
        while lo < hi:  # largest n with params_for(n) <= max_params
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if params_for(mid) <= max_params else (lo, mid - 1)
        keep = lo
    elif keep is None:
        raise ValueError("build_param_plan needs keep or max_params")
    keep = int(min(max(keep, len(groups)), total))
    plans = plan_for(keep)
    lw = graph.layer_widths(table.layer_keys)
    lm = LatencyModel(table, lw)
    kept = {g.name: len(g.keep) for g in plans}
    predicted = lm.predict(kept)
    return PruningPlan(
        target_ms=predicted, predicted_ms=predicted, dense_predicted_ms=lm.dense_ms(),
        layers_ms=lm.layers_ms(kept), e2e=lm.e2e.to_dict() | {"points": len(lm.e2e.points)}, groups=plans,
        layer_channels={lay: list(lw.widths(lay, kept)) for lay in lw.dense},
        iterations=1, history=[{"kept_neurons": keep, "neurons": total}], importance=cfg.importance, round_to=1,
    )


def narrower_plan(graph: ModelGraph, table: LatencyTable, target_ms: float, cfg: PlanConfig,
                  **plan_kw: Any) -> PruningPlan | None:
    """The closed loop's corrective plan: :func:`build_plan` for ``target_ms`` on the current model
    (the narrowest reachable one when ``target_ms`` is below the floor), or None when that plan
    removes nothing. ``plan_kw``: the value (``scores=`` or ``values=``) and what else ``build_plan`` takes."""
    try:
        plan = build_plan(graph, table, target_ms, cfg, warn_unpruned=False, **plan_kw)
    except BudgetBelowFloor as e:
        plan = build_plan(graph, table, e.floor_ms, cfg, warn_unpruned=False, **plan_kw)
    return plan if any(len(g.keep) < g.size for g in plan.groups) else None


def apply_plan_(model: nn.Module, plan: PruningPlan, input_shape: tuple[int, int, int], record: Removal | None = None,
                graph: ModelGraph | None = None) -> nn.Module:
    """Remove the channels ``plan`` drops from ``model``, physically (``models.surgery``); fill
    ``record`` with what every touched layer kept. ``graph``: ``model``'s graph, when the caller has
    it (it is stale afterwards)."""
    graph = graph or ModelGraph(model, input_shape)
    sizes = graph.sizes()
    for gp in plan.groups:
        if gp.name in sizes and sizes[gp.name] != gp.size:
            raise BadInput(f"group {gp.name} has {sizes[gp.name]} channels, the plan expects {gp.size}: re-plan")
    prune_groups_(graph, {gp.name: gp.keep for gp in plan.groups}, record)
    check_widths(model, plan.layer_channels)
    return model
