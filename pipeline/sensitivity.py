"""The ``sensitivity`` value (NetAdapt, Yang et al. 2018; FastNAS in NVIDIA Model Optimizer): for
every channel group and candidate width, the loss increase measured on held-out batches after
truncating that group alone to that width (its channels ranked by ``halp``), BatchNorm statistics
re-estimated on training batches so a narrower layer is judged with statistics that fit it.

Its unit is loss (mean cross-entropy per image); the planner maximises minus the sum over groups,
i.e. it assumes the groups' increases add up, which holds to first order. The value is per
(group, width), not per channel: it feeds the knapsack's per-width values directly; which channels
a width keeps is still decided by the ``halp`` score.

Cost: one deep copy and trace per (group, width) evaluated, plus ``recalibrate + held_out`` forward
passes of one batch each. ``max_passes`` bounds the forward passes of one estimate: over it, only
every k-th candidate width of each group is measured (the widest and narrowest always) and the
others are interpolated linearly. The cost is returned (passes, evaluated widths, seconds).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Sequence

import numpy as np

from latprune.models.graph import ModelGraph
from latprune.models.surgery import prune_groups_
from latprune.pipeline.train import bn_recalibrated, held_out_metrics

__all__ = ["SensitivityCost", "sensitivity_values"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SensitivityCost:
    passes: int  # forward passes of one batch
    evaluated: int  # (group, width) pairs measured
    interpolated: int  # (group, width) pairs interpolated from measured neighbours
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _subsample(widths: np.ndarray, stride: int) -> np.ndarray:
    """Every ``stride``-th candidate below the dense width, the narrowest always included."""
    below = np.arange(len(widths) - 1)
    keep = set(below[::-1][::stride].tolist()) | ({0} if len(below) else set())
    return np.array(sorted(keep), dtype=int)


def sensitivity_values(graph: ModelGraph, ranks: dict[str, np.ndarray], widths: dict[str, np.ndarray],
                       recalibrate: Sequence, held_out: Sequence,
                       max_passes: int = 1000) -> tuple[dict[str, np.ndarray], SensitivityCost]:
    """``{group: -(loss increase) at each of widths[group]}`` (0 at the dense width) and the cost.

    ``ranks[group]``: a per-channel score; truncating to width w keeps the w highest. ``widths``:
    each group's ascending candidate widths, the last its current width. ``recalibrate``: training
    batches for BatchNorm statistics; ``held_out``: batches the loss is measured on. The model is
    never modified (every truncation happens on a copy).
    """
    t0 = time.perf_counter()
    model = graph.model
    per_eval = len(recalibrate) + len(held_out)
    longest = max((len(w) for w in widths.values()), default=1)

    def passes_at(stride: int) -> int:
        return (sum(len(_subsample(np.asarray(w), stride)) for w in widths.values()) + 1) * per_eval

    stride = 1  # the densest sampling that fits max_passes (at worst the widest and narrowest width)
    while passes_at(stride) > max_passes and stride < longest:
        stride += 1
    base = held_out_metrics(bn_recalibrated(model, recalibrate), held_out)[1]
    passes, evaluated, interpolated = per_eval, 0, 0
    out: dict[str, np.ndarray] = {}
    for name, ws in widths.items():
        ws = np.asarray(ws, dtype=int)
        vals = np.full(len(ws), np.nan)
        vals[-1] = 0.0  # the current width: nothing truncated
        order = np.argsort(-np.asarray(ranks[name], float), kind="stable")
        for i in _subsample(ws, stride):
            probe = copy.deepcopy(model)
            g = ModelGraph(probe, graph.input_shape)
            prune_groups_(g, {name: np.sort(order[: int(ws[i])]).tolist()})
            vals[i] = -(held_out_metrics(bn_recalibrated(probe, recalibrate), held_out)[1] - base)
            passes += per_eval
            evaluated += 1
        missing = np.isnan(vals)
        if missing.any():  # linear in width between measured neighbours
            vals[missing] = np.interp(ws[missing], ws[~missing], vals[~missing])
            interpolated += int(missing.sum())
        out[name] = vals
    cost = SensitivityCost(passes, evaluated, interpolated, time.perf_counter() - t0)
    log.info("sensitivity: %d widths measured, %d interpolated, %d forward passes, %.1f s", evaluated,
             interpolated, passes, cost.seconds)
    return out, cost
