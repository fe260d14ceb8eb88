"""Whole-model latency predicted from a table for any assignment of group widths (numpy only).

``e2e.intercept_ms + e2e.slope * sum over layers of T(c_in, c_out)``: the layer tables at the
widths the groups imply (:class:`~latprune.models.widths.LayerWidths`), turned into a whole-model
latency by the table's fitted end-to-end term (:class:`~latprune.latency_tables.table.EndToEnd`).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

from latprune.latency_tables.table import EndToEnd, LatencyTable
from latprune.models.widths import LayerWidths

__all__ = ["LatencyModel"]


@dataclasses.dataclass
class LatencyModel:
    """The prediction for one model's groups. ``e2e`` defaults to the table's fitted term; the
    closed loop passes a corrected one (or a table that carries it)."""

    table: LatencyTable
    widths: LayerWidths
    e2e: EndToEnd | None = None

    def __post_init__(self):
        self.e2e = self.e2e or self.table.e2e

    def layers_ms(self, kept: dict[str, int], layers: Iterable[str] | None = None) -> float:
        return sum(self.table.lookup(name, *self.widths.widths(name, kept)) for name in (layers or self.widths.dense))

    def predict(self, kept: dict[str, int]) -> float:
        return self.e2e.predict(self.layers_ms(kept))

    def dense_ms(self) -> float:
        """The prediction with every group whole."""
        return self.predict(dict(self.widths.group_size))
