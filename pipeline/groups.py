"""Channel groups from torch-pruning's DependencyGraph, and the layer widths they imply.

A group is a set of channels that must be removed together (residual adds, concats, depthwise
convs). It is identified by its root layer (the conv or linear whose output channels it prunes)
and indexed in the root's channel order. :class:`LayerWidths` maps group widths to every layer's
(c_in, c_out), which is what the latency table is looked up with.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
import torch_pruning as tp
from torch import nn

from latprune.pipeline.models import classifier_layers


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    name: str  # the root layer's module name
    size: int  # dense channel count
    producers: tuple[str, ...]  # layers whose output channels this group prunes
    consumers: tuple[tuple[str, int], ...]  # (layer, input channels of it that belong to this group)


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
        return [l for l in self.dense if self.out_group.get(l) == group or group in self.in_groups.get(l, {})]


def dependency_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    was_training = model.training
    model.eval()
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    finally:
        model.train(was_training)


def prunable_groups(model: nn.Module, dg: tp.DependencyGraph,
                    ignored: Iterable[nn.Module] = ()) -> list[tuple[ChannelGroup, "tp.Group"]]:
    """All groups the knapsack may shrink. The classifier's output is never pruned."""
    names = {m: n for n, m in model.named_modules()}
    ignored = list(ignored) + classifier_layers(model)
    out = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
        root = group[0].dep.target.module
        producers, consumers = [], []
        for item in group:
            mod, handler = item.dep.target.module, item.dep.handler
            if not isinstance(mod, (nn.Conv2d, nn.Linear)) or mod not in names:
                continue
            if dg.is_out_channel_pruning_fn(handler):
                producers.append(names[mod])
            else:
                consumers.append((names[mod], len(item.idxs)))
        size = len(group[0].idxs)
        out.append((ChannelGroup(names[root], size, tuple(producers), tuple(consumers)), group))
    return out


def layer_widths(model: nn.Module, groups: list[ChannelGroup], layers: Iterable[str]) -> LayerWidths:
    mods = dict(model.named_modules())
    dense, out_group, in_groups, depthwise = {}, {}, {}, set()
    for name in layers:
        m = mods[name]
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels:
            depthwise.add(name)
        dense[name] = (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
    for g in groups:
        for p in g.producers:
            if p in dense:
                out_group[p] = g.name
        for c, n in g.consumers:
            if c in dense and out_group.get(c) != g.name:  # depthwise: input follows its own output
                in_groups.setdefault(c, {})[g.name] = n
    return LayerWidths(dense, out_group, in_groups, {g.name: g.size for g in groups}, frozenset(depthwise))
