"""Stage 3a: physically remove the channels a plan drops, through torch-pruning.

``apply_plan_`` mutates the model in place (trailing underscore): convs, BNs and linears are
replaced by smaller ones; nothing is masked.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from latprune.errors import BadInput
from latprune.pipeline.groups import dependency_graph, prunable_groups
from latprune.pipeline.plan import PruningPlan

log = logging.getLogger(__name__)


def apply_plan_(model: nn.Module, plan: PruningPlan, input_shape: tuple[int, int, int]) -> nn.Module:
    dg = dependency_graph(model, torch.zeros(1, *input_shape))
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
        sub.prune()
    _check_widths(model, plan)
    return model


def _check_widths(model: nn.Module, plan: PruningPlan) -> None:
    mods = dict(model.named_modules())
    for name, (c_in, c_out) in plan.layer_channels.items():
        m = mods[name]
        got = (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
        if tuple(got) != (c_in, c_out):
            raise RuntimeError(f"after pruning, {name} has widths {got}, the plan expected {(c_in, c_out)}")
