"""One object per model state: torch-pruning's DependencyGraph, its channel groups, the classifier.

A group is a set of channels that must be removed together (residual adds, concats, depthwise
convs). It is identified by its root layer (the conv or linear whose output channels it prunes)
and indexed in the root's channel order. :class:`ModelGraph` traces the model once; everything
that needs groups (planning, surgery, AdaSAP's neurons, the table's predictions) takes the graph.
After a removal the model has changed: build a new graph of it.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
import torch_pruning as tp
from torch import nn

from latprune.models.widths import LayerWidths

__all__ = ["ChannelGroup", "ModelGraph", "classifier_layers", "layer_dims", "output_channels"]


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    name: str  # the root layer's module name
    size: int  # dense channel count
    producers: tuple[str, ...]  # layers whose output channels this group prunes
    consumers: tuple[tuple[str, int], ...]  # (layer, input channels of it that belong to this group)


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose outputs are class logits: never pruned on their output side."""
    last = None
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = m
    return [last] if last is not None else []


def layer_dims(m: nn.Module) -> tuple[int, int] | None:
    """(inputs, outputs) of a Conv2d or Linear layer; None for any other module."""
    if isinstance(m, nn.Conv2d):
        return m.in_channels, m.out_channels
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    return None


def output_channels(model: nn.Module) -> dict[str, int]:
    """Output channels of every Conv2d and Linear layer, by module name."""
    return {n: dims[1] for n, m in model.named_modules() if (dims := layer_dims(m)) is not None}


class ModelGraph:
    """torch-pruning's DependencyGraph of ``model`` as it is now, traced once on a zero batch of
    ``input_shape``, and the channel groups the planner may shrink (the classifier's output and
    ``ignored`` layers are never pruned)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], ignored: Iterable[nn.Module] = ()):
        self.model, self.input_shape = model, tuple(input_shape)
        was_training = model.training
        param = next(model.parameters(), None)
        example = torch.zeros(1, *input_shape, device=param.device if param is not None else "cpu")
        model.eval()
        try:
            self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
        finally:
            model.train(was_training)
        self.names = {m: n for n, m in model.named_modules()}
        self.classifier = {self.names[m] for m in classifier_layers(model) if m in self.names}
        ignored = list(ignored) + classifier_layers(model)
        self._groups: dict[str, tuple[ChannelGroup, tp.Group]] = {}
        for group in self.dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
            root = group[0].dep.target.module
            producers, consumers = [], []
            for item in group:
                mod, handler = item.dep.target.module, item.dep.handler
                if not isinstance(mod, (nn.Conv2d, nn.Linear)) or mod not in self.names:
                    continue
                if self.dg.is_out_channel_pruning_fn(handler):
                    producers.append(self.names[mod])
                else:
                    consumers.append((self.names[mod], len(item.idxs)))
            cg = ChannelGroup(self.names[root], len(group[0].idxs), tuple(producers), tuple(consumers))
            self._groups[cg.name] = (cg, group)

    @property
    def groups(self) -> list[ChannelGroup]:
        return [cg for cg, _ in self._groups.values()]

    def sizes(self) -> dict[str, int]:
        return {cg.name: cg.size for cg in self.groups}

    def group(self, name: str) -> tuple[ChannelGroup, tp.Group]:
        """The group and torch-pruning's own group object (``KeyError`` for an unknown name)."""
        return self._groups[name]

    def tp_groups(self) -> list[tuple[ChannelGroup, tp.Group]]:
        return list(self._groups.values())

    def layer_widths(self, layers: Iterable[str]) -> LayerWidths:
        """How the widths of ``layers`` (table layers) follow the group widths."""
        mods = dict(self.model.named_modules())
        dense, out_group, in_groups, depthwise = {}, {}, {}, set()
        for name in layers:
            m = mods[name]
            if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels:
                depthwise.add(name)
            dense[name] = layer_dims(m)
        for g in self.groups:
            for p in g.producers:
                if p in dense:
                    out_group[p] = g.name
            for c, n in g.consumers:
                if c in dense and out_group.get(c) != g.name:  # depthwise: input follows its own output
                    in_groups.setdefault(c, {})[g.name] = n
        return LayerWidths(dense, out_group, in_groups, self.sizes(), frozenset(depthwise))
