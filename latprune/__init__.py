"""latprune: prune a trained CNN to a measured latency budget on a given device and runtime.

The pipeline, one stage per module: ``latency_tables`` (profile) -> ``pipeline.plan`` (HALP
knapsack) -> ``pipeline.prune`` / ``pipeline.train`` (physical removal, fine-tune) -> ``export``
(ONNX, parity, interleaved timing) -> ``pipeline.report``. Heavy imports happen on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["run", "load", "RunConfig", "profile_model", "build_plan", "apply_plan_", "export_onnx",
           "LatencyTable", "PruningPlan"]

_LAZY = {
    "run": ("latprune.pipeline.run", "run"),
    "load": ("latprune.pipeline.compact", "load_compact"),
    "RunConfig": ("latprune.pipeline.config", "RunConfig"),
    "profile_model": ("latprune.latency_tables.profile", "profile_model"),
    "LatencyTable": ("latprune.latency_tables.table", "LatencyTable"),
    "build_plan": ("latprune.pipeline.plan", "build_plan"),
    "PruningPlan": ("latprune.pipeline.plan", "PruningPlan"),
    "apply_plan_": ("latprune.pipeline.prune", "apply_plan_"),
    "export_onnx": ("latprune.export.onnx_export", "export_onnx"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'latprune' has no attribute {name!r}")
