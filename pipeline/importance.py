"""Channel importance: every criterion the planner and AdaSAP rank channels by, in one registry.

A criterion is registered by name with :func:`register_importance`; the names are the CLI's
``--importance`` choices. A criterion is a *scorer*, ``scorer(graph, batches) -> {group: scores}``
with one score per channel of every group of a :class:`~latprune.models.graph.ModelGraph`;
torch-pruning-shaped criteria (``criterion(group) -> Tensor[n_channels]``, so ``tp.importance.*``
plugs in directly) become scorers through :func:`tp_criterion`.

- ``magnitude``: L2 norm of the group's weights, normalised per group (mean 1). Summed over a
  plan it is about the number of kept channels: the knapsack then keeps channels, not loss.
- ``halp``: HALP's value (Shen et al. 2022, NVlabs/HALP), in units of loss: see :class:`HalpValue`.
  Not normalised, so a group that feeds more layers is worth more. The default.
- ``sensitivity``: a per-width value, not a per-channel one (``pipeline.sensitivity``: the
  measured loss increase of truncating each group to each width); its per-channel scorer, which
  decides *which* channels a width keeps, is ``halp``'s. :func:`per_width` says a criterion is so.

Old names accepted with a deprecation warning (:data:`DEPRECATED_IMPORTANCE`): ``l2``, the older
spelling of ``magnitude``, and ``taylor``, which now means ``halp``: the criterion it named,
torch-pruning's ``GroupTaylorImportance`` on gradients summed over a few batches, never scored
BatchNorm layers (1.6.x) and let the signs of those sums cancel; it is retired.

Gradient-based criteria need batches: they run in train mode and restore BatchNorm's running
statistics afterwards (:func:`save_bn_stats`, :func:`restore_bn_stats`), so scoring never moves
the model, and leave no gradients behind.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from latprune.errors import BadInput
from latprune.models.graph import ModelGraph, restore_bn_stats, save_bn_stats
from latprune.models.outputs import classification_loss

__all__ = ["DEPRECATED_IMPORTANCE", "Scorer", "register_importance", "tp_criterion", "importance_names",
           "canonical_importance", "needs_batches", "per_width", "uses_halp", "group_importance", "HalpValue"]

Scorer = Callable[[ModelGraph, Any], dict[str, np.ndarray]]  # (graph, batches or None) -> per-group scores


@dataclasses.dataclass(frozen=True)
class _Entry:
    scorer: Scorer
    needs_batches: bool
    per_width: bool = False  # the planner's values are measured per (group, width) (pipeline.sensitivity)


_IMPORTANCE: dict[str, _Entry] = {}
DEPRECATED_IMPORTANCE = {"l2": "magnitude", "taylor": "halp"}  # old name -> the criterion it means now
_RETIRED = {"taylor": "torch-pruning's Taylor criterion is retired (it never scored BatchNorm layers)"}


def register_importance(name: str, needs_batches: bool = False, per_width: bool = False):
    """Decorator for a scorer ``(graph, batches) -> {group name: np.ndarray[n_channels]}``;
    ``per_width``: the scorer only ranks channels inside a group, the planner's values are
    measured per width (``pipeline.sensitivity``)."""
    def deco(scorer: Scorer) -> Scorer:
        _IMPORTANCE[name] = _Entry(scorer, needs_batches, per_width)
        return scorer

    return deco


def tp_criterion(factory: Callable[[], Any], gradients: bool = False) -> Scorer:
    """A scorer from a torch-pruning-shaped criterion (``criterion(group) -> Tensor``); with
    ``gradients``, the loss gradients of all batches are summed first (one backward per batch)."""
    def scorer(graph: ModelGraph, batches) -> dict[str, np.ndarray]:
        imp = factory()
        with _gradients(graph.model, batches if gradients else None) as run:
            for x, y in run:
                classification_loss(graph.model(x), y).backward()
            with torch.no_grad():
                return {cg.name: imp(g).detach().cpu().double().numpy() for cg, g in graph.tp_groups()}

    return scorer


register_importance("magnitude")(tp_criterion(lambda: tp.importance.GroupMagnitudeImportance(p=2, normalizer="mean")))


class HalpValue:
    """HALP's channel value, in units of loss: the first-order estimate of how much the loss rises
    when the channel is removed, averaged over minibatches.

    Per channel and per minibatch: ``|sum over the group's BatchNorm layers of (gamma * dL/dgamma +
    beta * dL/dbeta)|`` at that channel; the sum runs with sign over every BatchNorm the coupled
    channel passes through (a residual channel feeds several), and the absolute value is taken
    after the sum. A group in which not every producer (conv or linear whose output channels the
    group prunes) is followed by a BatchNorm falls back to ``|sum over its producers' output rows
    of w * dL/dw|`` (weights only). A minibatch whose scores are not all finite is skipped. The value
    is the mean of these per-minibatch absolute values over the minibatches :meth:`observe` counted
    since the last :meth:`reset`; it is not normalised across groups. This follows HALP's
    ``ChannelImportance`` (NVlabs/HALP ``prune/importance.py``: ``_calculate_first_order_taylor``,
    ``update_neuron_metric``), with torch-pruning's groups standing in for its configured ones.

    Call :meth:`observe` after each backward pass, with the gradients of one minibatch in ``.grad``.
    """

    def __init__(self, graph: ModelGraph):
        self.terms: dict[str, list[tuple[list[nn.Parameter], torch.Tensor, torch.Tensor]]] = {}
        self.sizes = graph.sizes()
        for cg, group in graph.tp_groups():
            bn, producers, seen = [], [], set()
            for item in group:
                mod = item.dep.target.module
                if id(mod) in seen:
                    continue
                rows = torch.tensor(item.idxs, dtype=torch.long)
                root = torch.tensor(item.root_idxs, dtype=torch.long)
                if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine:
                    seen.add(id(mod))
                    bn.append(([mod.weight, mod.bias], rows, root))
                elif isinstance(mod, (nn.Conv2d, nn.Linear)) and graph.dg.is_out_channel_pruning_fn(item.dep.handler):
                    seen.add(id(mod))
                    producers.append(([mod.weight], rows, root))
            # BatchNorm terms when every producer has its BatchNorm (HALP's all_layer_has_bn)
            self.terms[cg.name] = bn if bn and len(bn) >= len(producers) else producers
        self.reset()

    def reset(self) -> None:
        self.sums = {name: np.zeros(n) for name, n in self.sizes.items()}
        self.batches = 0

    @torch.no_grad()
    def observe(self) -> bool:
        """Add this minibatch's per-channel |sum of p * dL/dp| to the running sums; False (and
        nothing added) when a score is not finite."""
        now = {}
        for name, terms in self.terms.items():
            s = torch.zeros(self.sizes[name], dtype=torch.float64)
            for params, rows, root in terms:
                for p in params:
                    if p.grad is None:
                        continue
                    t = (p.index_select(0, rows) * p.grad.index_select(0, rows)).double()
                    s.index_add_(0, root, t.reshape(len(rows), -1).sum(1))
            now[name] = s.abs().numpy()
            if not np.isfinite(now[name]).all():
                return False
        for name, s in now.items():
            self.sums[name] += s
        self.batches += 1
        return True

    def scores(self) -> dict[str, np.ndarray]:
        if not self.batches:
            raise ValueError("HALP's value needs at least one observed minibatch")
        return {name: s / self.batches for name, s in self.sums.items()}


@register_importance("halp", needs_batches=True)
def _halp(graph: ModelGraph, batches) -> dict[str, np.ndarray]:
    """A scoring pass: one backward per batch, each observed separately (gradients are not summed
    across batches, so their signs do not cancel before the absolute value)."""
    value = HalpValue(graph)
    with _gradients(graph.model, batches) as run:
        for x, y in run:
            graph.model.zero_grad(set_to_none=True)
            classification_loss(graph.model(x), y).backward()
            value.observe()
    return value.scores()


register_importance("sensitivity", needs_batches=True, per_width=True)(_halp)


class _gradients:
    """Context for a scoring pass: train mode, gradients cleared before and after, BatchNorm
    running statistics restored; yields the batches (none when ``batches`` is None)."""

    def __init__(self, model: nn.Module, batches: Iterable | None):
        self.model, self.batches = model, batches

    def __enter__(self):
        self.was_training, self.bn = self.model.training, save_bn_stats(self.model)
        if self.batches is not None:
            self.model.zero_grad(set_to_none=True)
            self.model.train()
        return list(self.batches or ())

    def __exit__(self, *exc):
        if self.batches is not None:
            restore_bn_stats(self.bn)  # scoring must not move BatchNorm's running statistics
            self.model.zero_grad(set_to_none=True)
        self.model.train(self.was_training)
        return False


def importance_names() -> tuple[str, ...]:
    return tuple(_IMPORTANCE)


def canonical_importance(name: str) -> str:
    """``name``, or the current spelling of a deprecated one (with a warning)."""
    if name in DEPRECATED_IMPORTANCE:
        new = DEPRECATED_IMPORTANCE[name]
        why = f"{_RETIRED[name]}: {name!r} now means {new!r}" if name in _RETIRED else f"it is called {new!r} now"
        warnings.warn(f"importance {name!r} is deprecated: {why}", DeprecationWarning, stacklevel=2)
        return new
    if name not in _IMPORTANCE:
        raise BadInput(f"unknown importance {name!r}: use one of {', '.join(_IMPORTANCE)}")
    return name


def needs_batches(name: str) -> bool:
    """Whether the criterion scores from data (gradients) rather than from the weights alone."""
    return _IMPORTANCE[canonical_importance(name)].needs_batches


def uses_halp(name: str) -> bool:
    """Whether the criterion ranks channels by HALP's value (which training can accumulate, :class:`HalpValue`)."""
    return _IMPORTANCE[canonical_importance(name)].scorer is _halp


def per_width(name: str) -> bool:
    """Whether the criterion's planner values are measured per (group, width), not summed per channel."""
    return _IMPORTANCE[canonical_importance(name)].per_width


def group_importance(graph: ModelGraph, criterion: str, batches=None) -> dict[str, np.ndarray]:
    """Per-channel importance of each group of ``graph`` under ``criterion`` (non-finite scores
    count as 0)."""
    entry = _IMPORTANCE[canonical_importance(criterion)]
    if entry.needs_batches and batches is None:
        raise ValueError(f"{criterion} importance needs data batches for gradients")
    scores = entry.scorer(graph, batches if entry.needs_batches else None)
    return {name: np.nan_to_num(np.asarray(s, dtype=float), nan=0.0, posinf=0.0, neginf=0.0)
            for name, s in scores.items()}
