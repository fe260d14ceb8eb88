"""``latprune sweep --budgets 0.3,0.5,0.7``: one run per budget, and the accuracy-latency front.

Runs share the dense checkpoint and the latency table through the cache, so each budget costs its
plan, training, export and timing. A budget below the smallest reachable latency is recorded with
the floor the planner gave, not treated as an error. Writes ``sweep.json``, ``sweep.md`` and
``sweep.png`` (clean and corruption accuracy against measured latency, as a fraction of the dense
model timed in the same run, each point labelled with its budget).
"""
from __future__ import annotations

import dataclasses
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from latprune.errors import BadInput, BudgetBelowFloor
from latprune.io import write_bytes_atomic, write_json_atomic
from latprune.latency_tables.plots import pyplot, save_png
from latprune.pipeline.config import RunConfig
from latprune.pipeline.run import run

__all__ = ["parse_budgets", "SweepResult", "sweep", "plot_front", "render_sweep"]

log = logging.getLogger(__name__)


def parse_budgets(text: str) -> list[float]:
    try:
        vals = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise BadInput(f"--budgets takes comma-separated fractions such as 0.3,0.5,0.7, got {text!r}") from None
    if not vals or not all(0 < v <= 1 for v in vals):
        raise BadInput(f"--budgets must be fractions in (0, 1] of the dense latency, got {text!r}")
    return vals


@dataclasses.dataclass
class SweepResult:
    path: Path
    points: list[dict[str, Any]]
    exit_code: int


def sweep(cfg: RunConfig, budgets: list[float]) -> SweepResult:
    if cfg.schedule.target == "params":
        raise BadInput("sweep runs latency budgets: drop --target params")
    out = Path(cfg.out or f"runs/{cfg.model.replace(':', '_').replace('/', '_')}-sweep-{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    points, codes, dense = [], [], None
    for b in budgets:
        sub = cfg.with_overrides(out=str(out / f"budget-{b:.2f}"), budget={"fraction": b, "ms": None})
        log.info("sweep: budget %.2f -> %s", b, sub.out)
        try:
            res = run(sub)
        except BudgetBelowFloor as e:
            log.warning("sweep: budget %.2f is below the reachable floor: %s", b, e)
            points.append({"budget": b, "status": "below floor", "floor_ms": e.floor_ms, "detail": str(e),
                           "floor_ratio": e.floor_ms / e.dense_ms if e.dense_ms else None})
            continue
        r = res.report
        codes.append(res.exit_code)
        rob = r.get("robustness") or {}
        dense = dense or {"latency_ms": r["dense"]["latency_ms"], "accuracy": r["dense"]["accuracy"],
                          "corruption_acc": (rob.get("dense") or {}).get("corruption_acc")}
        points.append({
            "budget": b, "status": "ok" if not res.failed_gates else "gate failed", "run_dir": str(res.run_dir),
            "failed_gates": [g["name"] for g in res.failed_gates], "met": r["budget"]["met"],
            "latency_ms": r["compact"]["latency_ms"], "dense_latency_ms": r["dense"]["latency_ms"],
            "latency_ratio": r["compact"]["latency_ms"] / r["dense"]["latency_ms"], "speedup": r["speedup"],
            "speedup_ci95": r["speedup_ci95"], "accuracy": r["compact"]["accuracy"],
            "dense_accuracy": r["dense"]["accuracy"], "corruption_acc": rob.get("corruption_acc"),
            "dense_corruption_acc": (rob.get("dense") or {}).get("corruption_acc"),
            "params": r["compact"]["params"], "macs": r["compact"]["macs"],
        })
    result = {"model": cfg.model, "data": cfg.data.name, "runtime": cfg.deploy.runtime, "batch": cfg.deploy.batch,
              "budgets": budgets, "dense": dense, "points": points}
    write_json_atomic(out / "sweep.json", result)
    if dense:
        plot_front(result, out / "sweep.png")
    write_bytes_atomic(out / "sweep.md", render_sweep(result).encode())
    return SweepResult(out / "sweep.json", points, next((c for c in codes if c), 0))


def plot_front(s: dict[str, Any], path: Path) -> Path:
    plt = pyplot()

    ok = sorted((p for p in s["points"] if "latency_ratio" in p), key=lambda p: p["latency_ratio"])
    floors = [p["floor_ratio"] for p in s["points"] if p.get("floor_ratio")]
    panels = [("accuracy", "clean test accuracy")]
    if s["dense"].get("corruption_acc") is not None:
        panels.append(("corruption_acc", "corruption accuracy (mean of 75)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        if floors:
            ax.axvspan(0, floors[0], color="#f2d7d5", zorder=0)
        for p in s["points"]:
            ax.axvline(p["budget"], color="#d62728" if p["status"] == "below floor" else "#1f77b4", ls=":", lw=0.9)
        ax.plot([p["latency_ratio"] for p in ok] + [1.0], [p[key] for p in ok] + [s["dense"][key]], "-",
                color="#9aa5b1", zorder=1)
        ax.scatter([1.0], [s["dense"][key]], marker="*", s=200, color="black", zorder=3)
        ax.scatter([p["latency_ratio"] for p in ok], [p[key] for p in ok], s=55, zorder=3,
                   color=["#1f77b4" if p["met"] else "#d62728" for p in ok])
        for p in ok:
            ax.annotate(f"budget {p['budget']:.2f}: {p['latency_ratio']:.2f} of dense, {p['speedup']:.2f}x",
                        (p["latency_ratio"], p[key]), textcoords="offset points", xytext=(-4, 8), ha="right",
                        fontsize=7)
        ax.set_xlabel(f"measured latency / dense latency ({s['runtime']}, batch {s['batch']})")
        ax.set_ylabel(label)
        ax.set_xlim(0, 1.05)
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.15 * (hi - lo))  # room for the labels
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], marker="*", color="black", ls="", ms=12, label="dense"),
               Line2D([], [], marker="o", color="#1f77b4", ls="", label="compact, budget met"),
               Line2D([], [], marker="o", color="#d62728", ls="", label="compact, budget missed"),
               Line2D([], [], color="#1f77b4", ls=":", label="budget asked for")]
    if floors:
        handles += [Line2D([], [], color="#d62728", ls=":", label="budget below the floor (not run)"),
                    Patch(color="#f2d7d5", label=f"unreachable: under the floor, {floors[0]:.2f} of dense (predicted)")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(f"{s['model']} on {s['data']}: accuracy against measured latency, one run per budget "
                 f"(dense {s['dense']['latency_ms']:.2f} ms per batch)", fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return save_png(fig, path)


def render_sweep(s: dict[str, Any]) -> str:
    lines = [f"# latprune sweep: {s['model']} on {s['data']}, {s['runtime']}, batch {s['batch']}", "",
             "| budget | status | latency / dense | speedup (95% interval) | accuracy | corruption accuracy | run |",
             "|---:|---|---:|---|---:|---:|---|"]
    d = s.get("dense")
    if d:
        lines.append(f"| dense | | 1.000 | 1.00x | {d['accuracy']:.4f} | {_f(d.get('corruption_acc'))} | |")
    for p in s["points"]:
        if "latency_ratio" not in p:
            lines.append(f"| {p['budget']:.2f} | {p['status']} | | | | | {p['detail']} |")
            continue
        st = p["status"] + (f" ({', '.join(p['failed_gates'])})" if p["failed_gates"] else "")
        lo, hi = p["speedup_ci95"]
        lines.append(f"| {p['budget']:.2f} | {st} | {p['latency_ratio']:.3f} | "
                     f"{p['speedup']:.2f}x ({lo:.2f}-{hi:.2f}) | "
                     f"{p['accuracy']:.4f} | {_f(p['corruption_acc'])} | {p['run_dir']} |")
    if d:
        lines += ["", "![accuracy-latency front](sweep.png)"]
    return "\n".join(lines) + "\n"


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"
