"""latprune: prune a trained CNN to a measured latency budget on a given device and runtime.

The pipeline, in layers (README, "Architecture"): ``latprune.models`` (registry, dependency graph,
surgery, saved architectures) -> ``latprune.latency_tables`` (tables, prediction, timing,
runtimes) -> ``latprune.export`` (ONNX, parity, TensorRT engines, bench) -> ``latprune.pipeline``
(importance, knapsack, plan, AdaSAP, schedule, stages, report) -> this package's CLI and API.
The public API below is loaded on first use (PEP 562), so importing a low layer (the torch-free
knapsack or table) does not import the whole pipeline.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LatencyPruner", "AdaSAP", "prune", "PruneResult", "Verification", "rewrap_ddp", "export_model",
           "Deployment", "run",
           "load", "load_dense", "RunConfig", "profile_model", "build_plan", "apply_plan_", "export_onnx",
           "LatencyTable", "PruningPlan", "ModelGraph"]

_LAZY = {
    "LatencyPruner": ("latprune.pipeline.pruner", "LatencyPruner"),
    "AdaSAP": ("latprune.pipeline.pruner", "AdaSAP"),
    "prune": ("latprune.pipeline.pruner", "prune"),
    "PruneResult": ("latprune.pipeline.pruner", "PruneResult"),
    "Verification": ("latprune.pipeline.pruner", "Verification"),
    "rewrap_ddp": ("latprune.pipeline.distributed", "rewrap_ddp"),
    "export_model": ("latprune.export.deploy", "export_model"),
    "Deployment": ("latprune.export.deploy", "Deployment"),
    "run": ("latprune.pipeline.run", "run"),
    "load": ("latprune.models.arch", "load_compact"),
    "load_dense": ("latprune.models.arch", "load_dense"),
    "RunConfig": ("latprune.pipeline.config", "RunConfig"),
    "profile_model": ("latprune.latency_tables.profile", "profile_model"),
    "LatencyTable": ("latprune.latency_tables.table", "LatencyTable"),
    "ModelGraph": ("latprune.models.graph", "ModelGraph"),
    "build_plan": ("latprune.pipeline.plan", "build_plan"),
    "PruningPlan": ("latprune.pipeline.plan", "PruningPlan"),
    "apply_plan_": ("latprune.pipeline.plan", "apply_plan_"),
    "export_onnx": ("latprune.export.onnx_export", "export_onnx"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'latprune' has no attribute {name!r}")
