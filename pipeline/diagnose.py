"""Why is it not faster? What limits the compact model's speed on the deployment runtime.

Three things a user can act on:
- **widths off the hardware grid**: output channels that are not a multiple of the width the
  runtime vectorises over (16 fp32 lanes with AVX-512, 8 with AVX2, 4 with NEON; 8 for fp16 tensor
  cores) pay for a padded tail; ``--round-to`` at that multiple avoids it;
- **time pruning cannot touch**: the table's prediction with every prunable group cut to its
  narrowest width (per-call overhead, pooling, adds, layers no group reaches, and what the
  narrowest layers still cost), as a share of the compact model's predicted latency: the rest is
  all that further pruning could win on this runtime;
- **provider fallbacks**: ONNX Runtime nodes that ran on another execution provider than the one
  requested, counted from ORT's own profile of one run of the exported file.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from latprune.latency_tables.endtoend import predicted_latency
from latprune.latency_tables.predict import LatencyModel
from latprune.latency_tables.runtimes import RUNTIMES, runtime_class
from latprune.latency_tables.table import Fingerprint, LatencyTable
from latprune.models.graph import ModelGraph, layer_dims

__all__ = ["hardware_multiple", "off_grid", "untouchable_share", "provider_placement", "diagnose"]


def hardware_multiple(fp: Fingerprint) -> int:
    """Channel multiple the runtime vectorises over (fp32 SIMD lanes on a CPU, tensor-core tiles on a GPU)."""
    dev = fp.device.lower()
    if (fp.runtime in RUNTIMES and runtime_class(fp.runtime).on_gpu) or "nvidia" in dev:
        return 8
    if "avx512" in dev:
        return 16
    if "avx2" in dev:
        return 8
    return 4


def off_grid(compact: ModelGraph, multiple: int) -> list[dict[str, Any]]:
    out = []
    for name, m in compact.model.named_modules():
        dims = layer_dims(m)
        if name in compact.classifier or dims is None:
            continue
        n = dims[1]
        if n % multiple:
            out.append({"layer": name, "channels": n, "next_multiple": -(-n // multiple) * multiple})
    return out


def untouchable_share(dense: ModelGraph, compact: ModelGraph, table: LatencyTable, unpruned: dict[str, str],
                      round_to: int) -> dict[str, Any]:
    """What pruning cannot remove: the table's prediction with every prunable group at its
    narrowest width (``round_to``; unpruned groups whole), as a share of the compact model's
    prediction. Also the layers no prunable group reaches at all."""
    groups = dense.groups
    lm = LatencyModel(table, dense.layer_widths(table.layer_keys))
    free = {g.name for g in groups if g.name not in unpruned and g.size > round_to}
    fixed = [lay for lay in lm.widths.dense
             if not ({lm.widths.out_group.get(lay)} | set(lm.widths.in_groups.get(lay, {}))) & free]
    floor = lm.predict({g.name: (round_to if g.name in free else g.size) for g in groups})
    dense_ms = lm.dense_ms()
    compact_ms = predicted_latency(compact, table)
    return {"share": floor / compact_ms, "floor_ratio": floor / dense_ms, "compact_ratio": compact_ms / dense_ms,
            "floor_ms": floor, "predicted_ms": compact_ms, "round_to": round_to,
            "intercept_ms": table.e2e.intercept_ms, "fixed_layers": fixed}


def provider_placement(onnx_path: str | os.PathLike, session_factory) -> dict[str, Any]:
    """Nodes per execution provider in one profiled run of ``onnx_path`` (ORT's own profile).

    ``session_factory(path, profile_prefix)`` creates the session the deployment runtime would,
    with ORT's profiler writing under ``profile_prefix``."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = session_factory(str(onnx_path), str(Path(tmp) / "ort"))
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        sess.run(None, {inp.name: np.zeros(shape, np.float32)})
        events = json.loads(Path(sess.end_profiling()).read_text())
    providers: Counter[str] = Counter()
    ops: dict[str, str] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and "provider" in args and e.get("name", "").endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            if node not in ops:
                ops[node] = args["provider"]
                providers[args["provider"]] += 1
    return {"nodes": len(ops), "per_provider": dict(providers), "session_providers": sess.get_providers()}


def diagnose(dense: ModelGraph, compact: ModelGraph, table: LatencyTable, unpruned: dict[str, str], round_to: int,
             fp: Fingerprint, requested_provider: str | None, onnx_path: Path | None,
             session_factory=None) -> dict[str, Any]:
    k = hardware_multiple(fp)
    out: dict[str, Any] = {"hardware_multiple": k, "off_grid": off_grid(compact, k),
                           "untouchable": untouchable_share(dense, compact, table, unpruned, round_to)}
    if session_factory is not None and onnx_path is not None:
        placed = provider_placement(onnx_path, session_factory)
        placed["requested"] = requested_provider
        placed["fallback_nodes"] = sum(n for p, n in placed["per_provider"].items() if p != requested_provider)
        out["providers"] = placed
    return out
