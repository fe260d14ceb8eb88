"""The one-line baselines latprune is judged against: torch-pruning's ``MetaPruner`` with magnitude
importance, one ratio for every group (uniform) or one global ranking, the classifier kept, and
the ratio found by measurement so a baseline runs at a given latency.

    tp.pruner.MetaPruner(model, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
                         pruning_ratio=r, round_to=8, ignored_layers=[classifier]).step()
"""
from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from latprune.latency_tables.endtoend import PairConfig, measure_speedup
from latprune.latency_tables.runtimes import Backend
from latprune.models.graph import classifier_layers

__all__ = ["tp_pruned", "match_latency"]


def tp_pruned(dense: nn.Module, ratio: float, input_shape: tuple[int, int, int], round_to: int | None = 8,
              global_pruning: bool = False) -> nn.Module:
    """A pruned copy of ``dense`` (eval mode), as torch-pruning's ``MetaPruner`` makes it in one step."""
    m = copy.deepcopy(dense).eval()
    tp.pruner.MetaPruner(m, torch.zeros(1, *input_shape), importance=tp.importance.GroupMagnitudeImportance(p=2),
                         pruning_ratio=ratio, ignored_layers=classifier_layers(m), round_to=round_to,
                         global_pruning=global_pruning).step()
    return m


def match_latency(dense: nn.Module, target_ratio: float, backend: Backend, input_shape: tuple[int, int, int],
                  timing: PairConfig, round_to: int | None = 8, global_pruning: bool = False, steps: int = 8,
                  tolerance: float = 0.03) -> tuple[dict, list[dict]]:
    """Bisect the pruning ratio until the baseline's measured latency ratio (against ``dense``,
    interleaved) is within ``tolerance`` of ``target_ratio``. Returns the measured point closest to
    the target (``pruning_ratio``, ``measured_ratio``) and every point tried. With ``round_to``,
    torch-pruning can leave a group whole at high ratios, so the latency is not monotone in the
    ratio: the closest point is returned, not the last one."""
    lo, hi, trace = 0.0, 0.95, []
    for _ in range(steps):
        mid = (lo + hi) / 2
        model = tp_pruned(dense, mid, input_shape, round_to, global_pruning)
        r = measure_speedup(backend, dense, model, input_shape, timing).ratio
        trace.append({"pruning_ratio": mid, "measured_ratio": r})
        if abs(r / target_ratio - 1) <= tolerance:
            break
        lo, hi = (mid, hi) if r > target_ratio else (lo, mid)
    return min(trace, key=lambda t: abs(t["measured_ratio"] / target_ratio - 1)), trace
