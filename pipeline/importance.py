"""Channel importance: every criterion the planner and AdaSAP rank channels by, in one registry.

A criterion has torch-pruning's shape, ``criterion(group) -> Tensor[n_channels]`` (so
``tp.importance.*`` plugs in directly), and is registered by name with
:func:`register_importance`; the names are the CLI's ``--importance`` choices. Scores are
normalised per group (mean 1) so that they compare across groups. ``l2`` is the older spelling
of ``magnitude`` and is accepted with a deprecation warning.

Gradient-based criteria (``taylor``) need batches: :func:`group_importance` runs them in train
mode and restores BatchNorm's running statistics afterwards (:func:`save_bn_stats`,
:func:`restore_bn_stats`), so scoring never moves the model.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from latprune.errors import BadInput
from latprune.models.graph import ModelGraph

__all__ = ["DEPRECATED_IMPORTANCE", "register_importance", "importance_names", "canonical_importance",
           "get_importance", "needs_gradients", "group_importance", "save_bn_stats", "restore_bn_stats"]

_IMPORTANCE: dict[str, tuple[Callable[[], Any], bool]] = {}  # name -> (factory, needs gradients)
DEPRECATED_IMPORTANCE = {"l2": "magnitude"}  # old spelling -> name


def register_importance(name: str, needs_gradients: bool = False):
    """Decorator for a zero-argument factory of a torch-pruning-shaped criterion."""
    def deco(factory: Callable[[], Any]) -> Callable[[], Any]:
        _IMPORTANCE[name] = (factory, needs_gradients)
        return factory

    return deco


@register_importance("magnitude")
def _magnitude():
    return tp.importance.GroupMagnitudeImportance(p=2, normalizer="mean")  # L2 of the group's weights


@register_importance("taylor", needs_gradients=True)
def _taylor():
    return tp.importance.GroupTaylorImportance(normalizer="mean")


def importance_names() -> tuple[str, ...]:
    return tuple(_IMPORTANCE)


def canonical_importance(name: str) -> str:
    """``name``, or the current spelling of a deprecated one (with a warning)."""
    if name in DEPRECATED_IMPORTANCE:
        new = DEPRECATED_IMPORTANCE[name]
        warnings.warn(f"importance {name!r} is deprecated: it is called {new!r} now", DeprecationWarning, stacklevel=2)
        return new
    if name not in _IMPORTANCE:
        raise BadInput(f"unknown importance {name!r}: use one of {', '.join(_IMPORTANCE)}")
    return name


def get_importance(name: str):
    return _IMPORTANCE[canonical_importance(name)][0]()


def needs_gradients(name: str) -> bool:
    return _IMPORTANCE[canonical_importance(name)][1]


def group_importance(graph: ModelGraph, criterion: str, batches=None) -> dict[str, np.ndarray]:
    """Per-channel importance of each group of ``graph``, normalised per group (mean 1)."""
    model, imp = graph.model, get_importance(criterion)
    grads = needs_gradients(criterion)
    if grads:
        if batches is None:
            raise ValueError(f"{criterion} importance needs data batches for gradients")
        model.zero_grad()
        was_training, bn_state = model.training, save_bn_stats(model)
        model.train()
        for x, y in batches:
            nn.functional.cross_entropy(model(x), y).backward()
        restore_bn_stats(bn_state)  # scoring must not move BatchNorm's running statistics
        model.train(was_training)
    with torch.no_grad():
        scores = {cg.name: imp(g).detach().cpu().double().numpy() for cg, g in graph.tp_groups()}
    if grads:
        model.zero_grad(set_to_none=True)
    for name, s in scores.items():
        if not np.all(np.isfinite(s)):
            scores[name] = np.nan_to_num(s, nan=0.0, posinf=0.0)
    return scores


def save_bn_stats(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for b in (m.running_mean, m.running_var, m.num_batches_tracked):
                if b is not None:
                    out.append((b, b.detach().clone()))
    return out


@torch.no_grad()
def restore_bn_stats(state) -> None:
    for buf, saved in state:
        buf.copy_(saved)
