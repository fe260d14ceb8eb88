"""Budgets -> measured latency, prediction and accuracy, on the embedded default.

    python benchmarks/budget.py [--budgets 0.3 0.5 0.7] [--model resnet20] [--finetune-epochs 2]
                                [--out runs/bench-budget] [--json BENCH.json]

Each budget is a full `latprune run` (pre-trained checkpoint and latency table come from the cache
after the first). Prints a table and writes JSON with the environment.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import latprune
from latprune.errors import BudgetBelowFloor
from latprune.latency_tables.device import environment
from latprune.pipeline.config import RunConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--finetune-epochs", type=float, default=2)
    p.add_argument("--out", default="runs/bench-budget")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows = []
    for b in a.budgets:
        cfg = RunConfig().with_overrides(model=a.model, out=f"{a.out}/{a.model}-b{b}", progress=False,
                                         budget={"fraction": b}, finetune={"epochs": a.finetune_epochs})
        t0 = time.perf_counter()
        try:
            r = latprune.run(cfg).report
        except BudgetBelowFloor as e:
            rows.append({"budget": b, "error": str(e)})
            continue
        cal = r["plan"]["calibration"]
        rows.append({
            "budget": b, "met": r["budget"]["met"], "measured_ratio": r["compact"]["latency_ms"] / r["dense"]["latency_ms"],
            "predicted_ratio": r["compact"]["predicted_ratio"], "speedup": r["speedup"], "ci95": r["speedup_ci95"],
            "dense_ms": r["dense"]["latency_ms"], "compact_ms": r["compact"]["latency_ms"],
            "dense_acc": r["dense"]["accuracy"], "compact_acc": r["compact"]["accuracy"],
            "macs_ratio": r["compact"]["macs"] / r["dense"]["macs"], "calibration_iters": len(cal),
            "wall_s": time.perf_counter() - t0,
        })
    print(f"{'budget':>6} {'met':>4} {'measured':>8} {'predicted':>9} {'speedup':>7} {'MACs':>5} {'acc dense':>9} {'acc compact':>11} {'iters':>5} {'wall s':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['budget']:>6} {r['error']}")
            continue
        print(f"{r['budget']:>6} {str(r['met']):>4} {r['measured_ratio']:>8.3f} {r['predicted_ratio']:>9.3f} "
              f"{r['speedup']:>7.2f} {r['macs_ratio']:>5.2f} {r['dense_acc']:>9.4f} {r['compact_acc']:>11.4f} "
              f"{r['calibration_iters']:>5} {r['wall_s']:>6.0f}")
    out = Path(a.json or f"{a.out}/budget.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "environment": environment()}, indent=1))
    print(out)


if __name__ == "__main__":
    main()
