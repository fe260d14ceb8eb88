"""Stage 3a: physically remove the channels a plan drops, through torch-pruning.

``apply_plan_`` mutates the model in place (trailing underscore): convs, BNs and linears are
replaced by smaller ones; nothing is masked. It can record which channels each layer kept
(:class:`Removal`), so optimizer state can follow the parameters (:func:`carry_momentum_`):
torch-pruning replaces the Parameter objects, and a momentum buffer must be sliced on both its
output and input dimensions, never reset.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from latprune.errors import BadInput
from latprune.pipeline.groups import dependency_graph, prunable_groups
from latprune.pipeline.plan import PruningPlan

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Removal:
    """Channels each layer kept, by module name, as indices into its widths before the removal."""

    out_keep: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    in_keep: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def apply_plan_(model: nn.Module, plan: PruningPlan, input_shape: tuple[int, int, int],
                record: Removal | None = None) -> nn.Module:
    """Remove the channels ``plan`` drops; fill ``record`` with what every touched layer kept."""
    dg = dependency_graph(model, torch.zeros(1, *input_shape))
    names = {m: n for n, m in model.named_modules()}
    removed: dict[tuple[str, bool], set[int]] = {}
    sizes: dict[tuple[str, bool], int] = {}
    groups = {cg.name: (cg, g) for cg, g in prunable_groups(model, dg)}
    for gp in plan.groups:
        if gp.name not in groups:
            raise BadInput(f"plan names group {gp.name!r} that this model does not have: re-plan for this model")
        cg, group = groups[gp.name]
        if cg.size != gp.size:
            raise BadInput(f"group {gp.name} has {cg.size} channels, the plan expects {gp.size}: re-plan")
        drop = sorted(set(range(gp.size)) - set(gp.keep))
        if not drop:
            continue
        root, handler = group[0].dep.target.module, group[0].dep.handler
        sub = dg.get_pruning_group(root, handler, idxs=drop)
        if not dg.check_pruning_group(sub):
            raise RuntimeError(f"torch-pruning refuses to prune {len(drop)} channels of {gp.name}")
        for item in sub:
            mod = item.dep.target.module
            if mod in names and record is not None:
                out = dg.is_out_channel_pruning_fn(item.dep.handler)
                key = (names[mod], out)
                pruner = dg.get_pruner_of_module(mod)
                sizes[key] = (pruner.get_out_channels(mod) if out else pruner.get_in_channels(mod))
                removed.setdefault(key, set()).update(int(getattr(i, "idx", i)) for i in item.idxs)
        sub.prune()
    _check_widths(model, plan)
    if record is not None:
        for (name, out), gone in removed.items():
            keep = torch.tensor(sorted(set(range(sizes[(name, out)])) - gone), dtype=torch.long)
            (record.out_keep if out else record.in_keep)[name] = keep
    return model


@torch.no_grad()
def carry_momentum_(optimizer: torch.optim.Optimizer, old: dict[str, torch.Tensor], model: nn.Module,
                    removal: Removal) -> None:
    """Give ``optimizer`` (built on the pruned model) the momentum buffers ``old`` held, by parameter
    name, sliced to the kept channels on dim 0 (outputs) and dim 1 (inputs)."""
    for pname, p in model.named_parameters():
        buf = old.get(pname)
        if buf is None:
            continue
        mod = pname.rsplit(".", 1)[0]
        if buf.shape[0] != p.shape[0] and mod in removal.out_keep:
            buf = buf.index_select(0, removal.out_keep[mod].to(buf.device))
        if buf.dim() > 1 and buf.shape[1] != p.shape[1] and mod in removal.in_keep:
            buf = buf.index_select(1, removal.in_keep[mod].to(buf.device))
        if buf.shape != p.shape:
            raise RuntimeError(f"momentum of {pname} is {tuple(buf.shape)} after slicing, parameter is {tuple(p.shape)}")
        optimizer.state[p]["momentum_buffer"] = buf.clone()


def _check_widths(model: nn.Module, plan: PruningPlan) -> None:
    mods = dict(model.named_modules())
    for name, (c_in, c_out) in plan.layer_channels.items():
        m = mods[name]
        got = (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
        if tuple(got) != (c_in, c_out):
            raise RuntimeError(f"after pruning, {name} has widths {got}, the plan expected {(c_in, c_out)}")
