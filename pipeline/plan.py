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
from typing import Any, Callable

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from latprune.errors import BadInput, BudgetBelowFloor
from latprune.latency_tables.table import EndToEnd, LatencyTable, write_json_atomic
from latprune.pipeline.groups import LayerWidths, dependency_graph, layer_widths, prunable_groups
from latprune.pipeline.knapsack import (BudgetUnreachable, GroupChoices, candidate_widths, plan_widths,
                                        prefix_values)

log = logging.getLogger(__name__)

_IMPORTANCE: dict[str, Callable[[], Any]] = {
    # Both normalise per group by the mean score, so scores compare across layers.
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2, normalizer="mean"),
    "taylor": lambda: tp.importance.GroupTaylorImportance(normalizer="mean"),
}


def get_importance(name: str):
    if name not in _IMPORTANCE:
        raise BadInput(f"unknown importance {name!r}: use one of {', '.join(_IMPORTANCE)}")
    return _IMPORTANCE[name]()


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    round_to: int = 8
    importance: str = "l2"
    max_iter: int = 20
    taylor_batches: int = 4  # batches whose gradients feed the Taylor criterion

    def __post_init__(self):
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1 channel, got {self.round_to}")
        if self.importance not in _IMPORTANCE:
            raise ValueError(f"importance must be one of {', '.join(_IMPORTANCE)}, got {self.importance!r}")


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
class LatencyModel:
    """Whole-model latency prediction for any assignment of group widths (torch-free):
    ``e2e.intercept_ms + e2e.slope * sum over layers of T(c_in, c_out)``.

    ``e2e`` defaults to the table's fitted term; the closed loop passes a corrected one.
    """

    table: LatencyTable
    widths: LayerWidths
    e2e: EndToEnd | None = None

    def __post_init__(self):
        self.e2e = self.e2e or self.table.e2e

    def layers_ms(self, kept: dict[str, int], layers=None) -> float:
        return sum(self.table.lookup(l, *self.widths.widths(l, kept)) for l in (layers or self.widths.dense))

    def predict(self, kept: dict[str, int]) -> float:
        return self.e2e.predict(self.layers_ms(kept))


def model_layers_ms(model: nn.Module, table: LatencyTable, input_shape: tuple[int, int, int]) -> float:
    """The layer tables' sum for ``model`` at its current widths."""
    groups = [cg for cg, _ in prunable_groups(model, dependency_graph(model, torch.zeros(1, *input_shape)))]
    lm = LatencyModel(table, layer_widths(model, groups, table.layer_keys))
    return lm.layers_ms(dict(lm.widths.group_size))


def predicted_latency(model: nn.Module, table: LatencyTable, input_shape: tuple[int, int, int]) -> float:
    """The table's whole-model prediction for ``model`` at its current widths."""
    return table.e2e.predict(model_layers_ms(model, table, input_shape))


def group_importance(model: nn.Module, dg, groups, criterion: str,
                     batches=None) -> dict[str, np.ndarray]:
    """Per-channel importance of each group, normalised per group (mean 1)."""
    imp = get_importance(criterion)
    if criterion == "taylor":
        if batches is None:
            raise ValueError("Taylor importance needs data batches for gradients")
        from latprune.pipeline.adasap import save_bn_stats, restore_bn_stats

        model.zero_grad()
        was_training, bn_state = model.training, save_bn_stats(model)
        model.train()
        for x, y in batches:
            nn.functional.cross_entropy(model(x), y).backward()
        restore_bn_stats(bn_state)  # scoring must not move BatchNorm's running statistics
        model.train(was_training)
    with torch.no_grad():
        scores = {cg.name: imp(g).detach().cpu().double().numpy() for cg, g in groups}
    if criterion == "taylor":
        model.zero_grad(set_to_none=True)
    for name, s in scores.items():
        if not np.all(np.isfinite(s)):
            scores[name] = np.nan_to_num(s, nan=0.0, posinf=0.0)
    return scores


def build_plan(model: nn.Module, table: LatencyTable, target_ms: float, cfg: PlanConfig,
               input_shape: tuple[int, int, int], batches=None,
               min_widths: dict[str, int] | None = None, e2e: EndToEnd | None = None) -> PruningPlan:
    """Plan which channels of ``model`` to keep so the predicted latency is at most ``target_ms``.

    ``min_widths`` (by group) bounds how far each group may shrink: iterative pruning passes the
    final plan's widths, so intermediate steps never cut a group below where it must end. ``e2e``
    replaces the table's end-to-end term (the closed loop's corrected one).
    """
    if target_ms <= 0:
        raise BadInput(f"latency target must be > 0 ms, got {target_ms}")
    dg = dependency_graph(model, torch.zeros(1, *input_shape))
    groups = prunable_groups(model, dg)
    unmeasured = table.meta.get("unmeasured", {})
    stale = [l for cg, _ in groups for l in cg.producers if l not in table.layer_keys and l not in unmeasured]
    if stale:
        raise BadInput(f"latency table has no entry for layers {stale[:3]}: re-profile this model")
    unpruned = {}
    for cg, _ in groups:
        why = [f"{l}: {unmeasured[l]}" for l in cg.producers if l in unmeasured]
        if why:
            unpruned[cg.name] = "not profiled (" + "; ".join(why) + ")"
        elif cg.size <= cfg.round_to:
            unpruned[cg.name] = f"{cg.size} channels, not more than --round-to {cfg.round_to}"
    for name, why in unpruned.items():  # once per run: iterative steps (min_widths) plan again
        log.log(logging.DEBUG if min_widths else logging.WARNING, "group %s stays unpruned: %s", name, why)
    scores = group_importance(model, dg, groups, cfg.importance, batches)
    lw = layer_widths(model, [cg for cg, _ in groups], table.layer_keys)
    lm = LatencyModel(table, lw, e2e)
    choices = []
    for cg, _ in groups:
        ws = candidate_widths(cg.size, cfg.round_to)
        if cg.name in unpruned:
            ws = ws[-1:]
        if min_widths and cg.name in min_widths:
            ws = ws[ws >= min(min_widths[cg.name], cg.size)]
        choices.append(GroupChoices(cg.name, ws, prefix_values(scores[cg.name], ws)))
    touches = {cg.name: _touch_fn(lm, lw.touched_by(cg.name)) for cg, _ in groups}
    try:
        sol = plan_widths(choices, lm.predict, touches, target_ms, cfg.max_iter)
    except BudgetUnreachable as e:
        raise BudgetBelowFloor(
            f"budget {target_ms:.3f} ms is below the smallest reachable latency {e.floor_ms:.3f} ms "
            f"({e.floor_ms / e.dense_ms:.2f} of the predicted dense {e.dense_ms:.3f} ms): "
            "raise --budget or lower --round-to",
            e.floor_ms, e.dense_ms,
        ) from None
    plans = []
    for cg, _ in groups:
        k = sol.widths[cg.name]
        keep = np.sort(np.argsort(-scores[cg.name], kind="stable")[:k]).tolist()
        plans.append(GroupPlan(cg.name, cg.size, keep))
    dense_kept = dict(lw.group_size)
    log.info("plan: predicted %.3f ms for target %.3f ms (dense %.3f ms), %d iterations",
             sol.predicted_ms, target_ms, lm.predict(dense_kept), sol.iterations)
    return PruningPlan(
        target_ms=target_ms, predicted_ms=sol.predicted_ms, dense_predicted_ms=lm.predict(dense_kept),
        layers_ms=lm.layers_ms(sol.widths), e2e=lm.e2e.to_dict() | {"points": len(lm.e2e.points)}, groups=plans,
        layer_channels={l: list(lw.widths(l, sol.widths)) for l in lw.dense},
        iterations=sol.iterations, history=sol.history, importance=cfg.importance, round_to=cfg.round_to,
        unpruned=unpruned,
    )


def _touch_fn(lm: LatencyModel, layers: list[str]):
    slope = lm.e2e.slope
    return lambda kept: slope * lm.layers_ms(kept, layers)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_param_plan(model: nn.Module, table: LatencyTable, cfg: PlanConfig, input_shape: tuple[int, int, int],
                     keep: int | None = None, max_params: int | None = None, batches=None) -> PruningPlan:
    """AdaSAP_P's plan: the ``keep`` channels ranked highest *globally* (importance normalised per
    group, then compared across groups; every group keeps at least one channel), or, with
    ``max_params``, the largest such count whose pruned model has at most that many parameters
    (parameters grow with the count because the global top-n sets are nested: a binary search over
    pruned copies). No ``round_to`` here: this is the parameter-targeted ablation; the latency the
    table predicts for it is recorded, not constrained."""
    from latprune.pipeline.prune import apply_plan_

    dg = dependency_graph(model, torch.zeros(1, *input_shape))
    groups = prunable_groups(model, dg)
    scores = group_importance(model, dg, groups, cfg.importance, batches)
    names = [cg.name for cg, _ in groups]
    owner = np.concatenate([np.full(cg.size, i) for i, (cg, _) in enumerate(groups)])
    local = np.concatenate([np.arange(cg.size) for cg, _ in groups])
    order = np.argsort(-np.concatenate([scores[n] for n in names]), kind="stable")
    total = len(order)

    def plan_for(n: int) -> list[GroupPlan]:
        top = order[:n]
        out = []
        for i, (cg, _) in enumerate(groups):
            kept = np.sort(local[top[owner[top] == i]])
            if kept.size == 0:
                kept = np.array([int(np.argmax(scores[cg.name]))])
            out.append(GroupPlan(cg.name, cg.size, kept.tolist()))
        return out

    def params_for(n: int) -> int:
        probe = PruningPlan(0.0, 0.0, 0.0, 0.0, {}, plan_for(n), {}, 0, [], cfg.importance, 1)
        return count_params(apply_plan_(copy.deepcopy(model), probe, input_shape))

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
    lw = layer_widths(model, [cg for cg, _ in groups], table.layer_keys)
    lm = LatencyModel(table, lw)
    kept = {g.name: len(g.keep) for g in plans}
    predicted = lm.predict(kept)
    return PruningPlan(
        target_ms=predicted, predicted_ms=predicted, dense_predicted_ms=lm.predict(dict(lw.group_size)),
        layers_ms=lm.layers_ms(kept), e2e=lm.e2e.to_dict() | {"points": len(lm.e2e.points)}, groups=plans, layer_channels={l: list(lw.widths(l, kept)) for l in lw.dense},
        iterations=1, history=[{"kept_neurons": keep, "neurons": total}], importance=cfg.importance, round_to=1,
    )
