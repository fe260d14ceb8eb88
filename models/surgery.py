"""Physical channel removal through torch-pruning, and optimizer state that follows it.

:func:`prune_groups_` mutates the model in place (trailing underscore): convs, BNs and linears are
replaced by smaller ones; nothing is masked. It can record which channels each layer kept
(:class:`Removal`), so an optimizer can follow the parameters in place (:func:`follow_removal_`):
torch-pruning replaces the Parameter objects, and a momentum buffer must be sliced on both its
output and input dimensions, never reset. The graph it pruned through describes the model as it
was: build a new :class:`~latprune.models.graph.ModelGraph` of the pruned model.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import torch
from torch import nn

from latprune.errors import BadInput
from latprune.models.graph import ModelGraph, layer_dims

__all__ = ["Removal", "prune_groups_", "pruned_copy", "follow_removal_", "check_widths"]


@dataclasses.dataclass
class Removal:
    """Channels each layer kept, by module name, as indices into its widths before the removal."""

    out_keep: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    in_keep: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def prune_groups_(graph: ModelGraph, keep: dict[str, Sequence[int]], record: Removal | None = None) -> nn.Module:
    """Keep only channels ``keep[group]`` (indices in the root layer's order) of each named group of
    ``graph.model``; fill ``record`` with what every touched layer kept. Returns the model."""
    dg, names = graph.dg, graph.names
    # per (layer, output side): the original indices of the channels it has now. Groups are removed one
    # after another and each sees the layer as the previous ones left it (a concat's consumer is cut
    # by every group feeding it), so indices are mapped back before they are recorded.
    alive: dict[tuple[str, bool], list[int]] = {}
    for name, kept in keep.items():
        try:
            cg, group = graph.group(name)
        except KeyError:
            raise BadInput(f"plan names group {name!r} that this model does not have: re-plan for this model") from None
        drop = sorted(set(range(cg.size)) - {int(i) for i in kept})
        if not drop:
            continue
        root, handler = group[0].dep.target.module, group[0].dep.handler
        sub = dg.get_pruning_group(root, handler, idxs=drop)
        if not dg.check_pruning_group(sub):
            raise RuntimeError(f"torch-pruning refuses to prune {len(drop)} channels of {name}")
        for item in sub:
            mod = item.dep.target.module
            if mod in names and record is not None:
                out = dg.is_out_channel_pruning_fn(item.dep.handler)
                key = (names[mod], out)
                if key not in alive:
                    pruner = dg.get_pruner_of_module(mod)
                    alive[key] = list(range(pruner.get_out_channels(mod) if out else pruner.get_in_channels(mod)))
                gone = {int(getattr(i, "idx", i)) for i in item.idxs}
                alive[key] = [orig for now, orig in enumerate(alive[key]) if now not in gone]
        sub.prune()
    if record is not None:
        for (name, out), kept in alive.items():
            (record.out_keep if out else record.in_keep)[name] = torch.tensor(kept, dtype=torch.long)
    return graph.model


def pruned_copy(model: nn.Module, widths: dict[str, int], input_shape: tuple[int, int, int]) -> nn.Module:
    """A copy of ``model`` (eval mode) with each group cut to its first ``widths[g]`` channels,
    physically: what an end-to-end timing of a width assignment runs (latency does not depend on
    which channels are kept, nor on weight values)."""
    probe = copy.deepcopy(model).eval()
    return prune_groups_(ModelGraph(probe, input_shape), {g: range(k) for g, k in widths.items()})


def _sliced(buf: torch.Tensor, mod: str, shape: torch.Size, removal: Removal) -> torch.Tensor:
    """``buf`` (state of a parameter of layer ``mod`` before the removal) cut to the kept channels
    on dim 0 (outputs) and dim 1 (inputs), so that it has ``shape``."""
    if buf.shape[0] != shape[0] and mod in removal.out_keep:
        buf = buf.index_select(0, removal.out_keep[mod].to(buf.device))
    if buf.dim() > 1 and buf.shape[1] != shape[1] and mod in removal.in_keep:
        buf = buf.index_select(1, removal.in_keep[mod].to(buf.device))
    return buf


@torch.no_grad()
def follow_removal_(optimizer: torch.optim.Optimizer, before: dict[str, nn.Parameter], model: nn.Module,
                    removal: Removal) -> None:
    """Make ``optimizer`` follow a removal, in place: every parameter it held (``before``: the
    model's ``named_parameters()`` taken just before :func:`prune_groups_` replaced them) is swapped
    for the model's new parameter of the same name, in the same group and position, and every state
    tensor shaped like the old parameter (SGD's momentum, Adam's moments) is sliced to the kept
    channels; scalar state (Adam's step) is kept. The optimizer object, its parameter groups, learning
    rates and anything holding it (an LR scheduler, a ``GradScaler``) carry on unchanged."""
    name_of = {id(p): n for n, p in before.items()}
    now = dict(model.named_parameters())
    for group in optimizer.param_groups:
        for i, old in enumerate(group["params"]):
            name = name_of.get(id(old))
            new = now.get(name) if name is not None else None
            if new is None or new is old:
                continue
            group["params"][i] = new
            state = optimizer.state.pop(old, None)
            if not state:
                continue
            mod = name.rsplit(".", 1)[0]
            moved = {}
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.shape == old.shape and v.dim() > 0:
                    v = _sliced(v, mod, new.shape, removal).clone()
                    if v.shape != new.shape:
                        raise RuntimeError(f"optimizer state {k!r} of {name} is {tuple(v.shape)} after slicing, "
                                           f"the parameter is {tuple(new.shape)}")
                moved[k] = v
            optimizer.state[new] = moved


def check_widths(model: nn.Module, layer_channels: dict[str, Sequence[int]]) -> None:
    """Fail unless every listed layer has the (c_in, c_out) a plan expected after pruning."""
    mods = dict(model.named_modules())
    for name, (c_in, c_out) in layer_channels.items():
        got = layer_dims(mods[name])
        if tuple(got) != (c_in, c_out):
            raise RuntimeError(f"after pruning, {name} has widths {got}, the plan expected {(c_in, c_out)}")
