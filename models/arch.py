"""The compact model as data next to its weights: rebuild it without re-pruning or pickling classes.

``arch.json`` holds the dense model's :class:`ModelSpec` and the shape of every layer that pruning
changed; ``model.pt`` holds a plain state dict. :func:`load_compact` builds the dense model,
reshapes those layers to the recorded widths, and loads the weights with ``weights_only=True``.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latprune.errors import BadInput
from latprune.io import save_torch_atomic, write_json_atomic
from latprune.models.registry import ModelSpec

__all__ = ["ARCH_VERSION", "layer_shapes", "save_compact", "reshape_", "load_compact", "load_dense"]

ARCH_VERSION = 1
_SHAPED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


def layer_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            shapes[name] = {"in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            shapes[name] = {"in_features": m.in_features, "out_features": m.out_features}
        elif isinstance(m, nn.BatchNorm2d):
            shapes[name] = {"num_features": m.num_features}
    return shapes


def save_compact(model: nn.Module, spec: ModelSpec, run_dir: str | os.PathLike) -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    arch = {"version": ARCH_VERSION, "model": {"name": spec.name, "num_classes": spec.num_classes},
            "layers": layer_shapes(model)}
    w = save_torch_atomic(model.state_dict(), run_dir / "model.pt")
    a = write_json_atomic(run_dir / "arch.json", arch)
    return a, w


def reshape_(model: nn.Module, layers: dict[str, dict[str, Any]]) -> nn.Module:
    """Give every listed layer the recorded shape (fresh, uninitialised weights of that shape)."""
    mods = dict(model.named_modules())
    for name, shape in layers.items():
        m = mods.get(name)
        if m is None:
            raise BadInput(f"arch.json names layer {name!r} that the model does not have: wrong model spec?")
        if isinstance(m, nn.Conv2d):
            m.in_channels, m.out_channels, m.groups = shape["in_channels"], shape["out_channels"], shape["groups"]
            m.weight = nn.Parameter(torch.empty(m.out_channels, m.in_channels // m.groups, *m.kernel_size))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(m.out_channels))
        elif isinstance(m, nn.Linear):
            m.in_features, m.out_features = shape["in_features"], shape["out_features"]
            m.weight = nn.Parameter(torch.empty(m.out_features, m.in_features))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(m.out_features))
        elif isinstance(m, nn.BatchNorm2d):
            n = m.num_features = shape["num_features"]
            if m.affine:
                m.weight, m.bias = nn.Parameter(torch.empty(n)), nn.Parameter(torch.empty(n))
            if m.track_running_stats:
                m.running_mean, m.running_var = torch.zeros(n), torch.ones(n)
        else:
            raise BadInput(f"cannot reshape layer {name} of type {type(m).__name__}")
    return model


def load_dense(run_dir: str | os.PathLike) -> nn.Module:
    """``latprune.load_dense``: the dense model a run pruned (its weights are saved at export)."""
    return _load(run_dir, "dense")


def load_compact(run_dir: str | os.PathLike, which: str = "compact") -> nn.Module:
    """``latprune.load``: the compact model of a run directory, in eval mode. Built from
    ``arch.json`` and a plain state dict loaded with ``weights_only=True``: no pickled classes.
    ``which="dense"`` is the older spelling of :func:`load_dense` (deprecated: it warns)."""
    if which not in ("compact", "dense"):
        raise BadInput(f"which must be 'compact' or 'dense', got {which!r}")
    if which == "dense":
        warnings.warn("latprune.load(run_dir, 'dense') is deprecated: use latprune.load_dense(run_dir)",
                      DeprecationWarning, stacklevel=2)
    return _load(run_dir, which)


def _load(run_dir: str | os.PathLike, which: str) -> nn.Module:
    run_dir = Path(run_dir)
    try:
        arch = json.loads((run_dir / "arch.json").read_text())
    except FileNotFoundError:
        raise BadInput(f"{run_dir} has no arch.json: pass the directory of a finished latprune run") from None
    if arch.get("version") != ARCH_VERSION:
        raise BadInput(f"arch.json version {arch.get('version')} is not {ARCH_VERSION}: upgrade latprune")
    model = ModelSpec(**arch["model"]).build()
    if which == "compact":
        reshape_(model, arch["layers"])
    weights = run_dir / ("model.pt" if which == "compact" else "dense.pt")
    if not weights.exists():
        raise BadInput(f"{run_dir} has no {weights.name}: it is written by `latprune export` (or run); export first")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
