"""Layer widths as a function of group widths, and the widths a group may take (numpy only).

A channel group (``models.graph``) is a set of channels removed together; :class:`LayerWidths`
maps the kept width of every group to every table layer's (c_in, c_out), which is what a latency
table is looked up with. Free of torch, like the table and the knapsack that use it.
"""
from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["LayerWidths", "candidate_widths"]


@dataclasses.dataclass(frozen=True)
class LayerWidths:
    """Every table layer's dense widths and which groups feed them."""

    dense: dict[str, tuple[int, int]]  # layer -> (c_in, c_out)
    out_group: dict[str, str]  # layer -> group pruning its output channels
    in_groups: dict[str, dict[str, int]]  # layer -> {group: input channels from it}
    group_size: dict[str, int]
    depthwise: frozenset[str] = frozenset()  # layers whose input channels follow their output

    def widths(self, layer: str, kept: dict[str, int]) -> tuple[int, int]:
        c_in, c_out = self.dense[layer]
        for g, n in self.in_groups.get(layer, {}).items():
            c_in -= round(n * (1 - kept[g] / self.group_size[g]))
        if layer in self.out_group:
            c_out = kept[self.out_group[layer]]
        if layer in self.depthwise:
            c_in = c_out
        return max(c_in, 1), max(c_out, 1)

    def touched_by(self, group: str) -> list[str]:
        return [layer for layer in self.dense
                if self.out_group.get(layer) == group or group in self.in_groups.get(layer, {})]


def candidate_widths(n: int, step: int) -> np.ndarray:
    """Widths a group of ``n`` channels may keep (and the grid a layer is profiled on): multiples
    of ``step`` below ``n``, and ``n`` itself."""
    if step < 1:
        raise ValueError(f"round_to must be >= 1, got {step}")
    return np.array([*range(step, n, step), n], dtype=int)
