"""Deployment gates: verdicts read off a report, and the exit status they give.

The gates, in the order the exit status is chosen (``latprune.errors.GATE_EXIT``): ``parity`` and
``onnx_shrink`` (3), ``int8_parity`` (3, ``--precision int8``), ``tensorrt_parity`` (3, runtime
``trt``), ``latency`` or ``params`` (4: the budget), ``accuracy`` and ``corruption_accuracy`` (5,
with ``--max-accuracy-drop`` / ``--max-corruption-drop``; at int8 they judge the deployed int8
file against the dense model the user gave). A new gate is a verdict here and an exit status in ``GATE_EXIT``.
Nothing here measures: every value comes from the report the stages' artifacts made.
"""
from __future__ import annotations

from typing import Any

from latprune.errors import GATE_EXIT
from latprune.pipeline.config import GateConfig, RunConfig

__all__ = ["budget_verdict", "check_gates", "failed", "exit_code"]


def budget_verdict(cfg: RunConfig, dense_ms: float, compact_ms: float, d_params: int, c_params: int) -> dict[str, Any]:
    """report.json ``budget``: what was asked for (a latency budget, or AdaSAP_P's parameter ratio)
    and whether the measured compact model met it."""
    if cfg.schedule.target == "params":
        ratio = c_params / d_params
        return {"target": "params", "param_ratio": cfg.schedule.param_ratio, "achieved_param_ratio": ratio,
                "met": ratio <= cfg.schedule.param_ratio, "fraction": None, "target_ms": None, "requested_ms": None}
    target = cfg.budget.ms if cfg.budget.ms is not None else cfg.budget.fraction * dense_ms
    return {"target": "latency", "fraction": cfg.budget.fraction if cfg.budget.ms is None else target / dense_ms,
            "target_ms": target, "requested_ms": cfg.budget.ms, "met": compact_ms <= target}


def check_gates(cfg: GateConfig, r: dict[str, Any]) -> list[dict[str, Any]]:
    """Every deployment gate with its verdict, in the order their exit status is chosen, read off a
    report (``report.json`` without its ``gates``)."""
    p, sh, b = r["parity"], r["onnx"]["shrink"], r["budget"]
    gates = [{"name": "parity", "ok": p["ok"], "detail": p["detail"]},
             {"name": "onnx_shrink", "ok": sh["ok"], "detail": sh.get("detail") or
              f"model.onnx is {sh['ratio']:.2f} of dense.onnx ({sh['compact_bytes']:,} / {sh['dense_bytes']:,} bytes)"}]
    q = r.get("int8")
    if q:
        gates.append({"name": "int8_parity", "ok": q["parity"]["ok"], "detail": q["parity"]["detail"]})
    if r.get("tensorrt"):
        trt = r["tensorrt"]["parity"]
        gates.append({"name": "tensorrt_parity", "ok": trt["ok"], "detail": trt["detail"]})
    if b["target"] == "params":
        gates.append({"name": "params", "ok": b["met"], "limit": b["param_ratio"], "value": b["achieved_param_ratio"],
                      "detail": f"kept parameter ratio {b['achieved_param_ratio']:.3f} "
                                f"for at most {b['param_ratio']:.3f}"})
    else:
        c = r["compact"]["latency_ms"]
        gates.append({"name": "latency", "ok": b["met"], "limit": b["target_ms"], "value": c,
                      "detail": f"compact {c:.3f} ms for a budget of {b['target_ms']:.3f} ms"})
    deployed = q["compact"] if q else r["compact"]  # what ships: at int8, model.int8.onnx
    what = "model.int8.onnx" if q else "compact"
    limit = cfg.max_accuracy_drop
    if limit is not None:
        drop = r["dense"]["accuracy"] - deployed["accuracy"]
        gates.append({"name": "accuracy", "ok": drop <= limit + 1e-12, "limit": limit, "value": drop,
                      "detail": f"clean accuracy {r['dense']['accuracy']:.4f} (dense) -> {deployed['accuracy']:.4f} "
                                f"({what}): drop {drop:.4f} for at most {limit:.4f}"})
    limit, rob = cfg.corruption_limit, r.get("robustness")
    deployed_rob = (q["compact"].get("robustness") if q else rob)
    if limit is not None and rob and deployed_rob:
        drop = rob["dense"]["corruption_acc"] - deployed_rob["corruption_acc"]
        gates.append({"name": "corruption_accuracy", "ok": drop <= limit + 1e-12, "limit": limit, "value": drop,
                      "detail": f"corruption accuracy {rob['dense']['corruption_acc']:.4f} (dense) -> "
                                f"{deployed_rob['corruption_acc']:.4f} ({what}): "
                                f"drop {drop:.4f} for at most {limit:.4f}"})
    return gates


def failed(gates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [g for g in gates if not g["ok"]]


def exit_code(gates: list[dict[str, Any]]) -> int:
    """0, or the status of the first failed gate (parity 3, latency 4, accuracy 5)."""
    bad = failed(gates)
    return GATE_EXIT[bad[0]["name"]] if bad else 0
