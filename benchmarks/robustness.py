"""The AdaSAP paper's Table 2 at small scale: clean and corrupted accuracy of pruned models.

    python benchmarks/robustness.py [--budgets 0.5 0.3] [--methods sgd asam adasap] [--seeds 0 1 2]
                                    [--train-subset 10000] [--finetune-epochs 2] [--robust-images 1000]
                                    [--out runs/bench-robustness] [--json runs/bench-robustness/robustness.json]

Rows: the dense model, then SGD + HALP, ASAM + HALP and AdaSAP_L at each latency budget (a fraction
of the dense ORT CPU latency), mean +- std over seeds. Columns: measured latency, speedup, params,
clean accuracy (whole test set), and on the first ``--robust-images`` test images the clean
accuracy, the corruption accuracy (mean of 15 CIFAR-10-C-style corruptions x 5 severities) and R_C.

Paired by design: every cell starts from one dense checkpoint (pre-trained once, full training
set, passed as ``--weights``), every method at a budget trains the same architecture (the budget's
plan is made and timed once, then copied into each cell's run directory, where ``latprune run``
reuses it as it reuses any finished stage), and seed s gives every method the same data order.

Hours of CPU: every cell is a ``latprune run`` in its own run directory and is skipped once its
report exists; a killed cell resumes from its training checkpoint. Run it in the background and
run it again after an interruption.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from latprune.latency_tables.device import environment
from latprune.pipeline.config import RunConfig
from latprune.pipeline.stages import dense_stage, prepare

LABELS = {"sgd": "SGD + HALP", "sam": "SAM + HALP", "asam": "ASAM + HALP", "adasap": "AdaSAP_L"}


def _latprune(*args: str, log: Path) -> int:
    with open(log, "a") as f:
        f.write(f"\n$ latprune {' '.join(args)}\n")
        f.flush()
        return subprocess.run([sys.executable, "-m", "latprune.cli", *args], stdout=f,
                              stderr=subprocess.STDOUT).returncode


def dense_weights(out: Path, common: list[str], log: Path) -> Path:
    """Pre-train (or find in the cache) the dense model with the default full-data settings."""
    d = out / "dense"
    if not (d / "weights.json").exists():
        code = _latprune("profile", "--no-progress", "--out", str(d), *common, log=log)
        if code:
            sys.exit(f"pre-training the dense model failed (exit {code}): see {log}")
        cfg = RunConfig.from_dict(json.loads((d / "config.json").read_text()))
        path = dense_stage(*prepare(cfg)).info["path"]
        (d / "weights.json").write_text(json.dumps({"path": path}))
    return Path(json.loads((d / "weights.json").read_text())["path"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3])
    p.add_argument("--methods", nargs="+", default=["sgd", "asam", "adasap"], choices=list(LABELS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--finetune-epochs", type=float, default=2)
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--robust-images", type=int, default=1000)
    p.add_argument("--round-to", type=int, default=4, help="4 so that a 0.3 budget is reachable on ResNet-20")
    p.add_argument("--out", default="runs/bench-robustness")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    weights = dense_weights(out, [], log)
    cell_args = ["--no-progress", "--weights", str(weights), "--train-subset", str(a.train_subset),
                 "--finetune-epochs", str(a.finetune_epochs), "--warmup-epochs", str(a.warmup_epochs),
                 "--robust-images", str(a.robust_images), "--round-to", str(a.round_to)]
    cells, dense = [], None
    for b in a.budgets:
        base = out / f"plan-b{b}"
        if not (base / "calibration.json").exists():
            code = _latprune("plan", "--budget", str(b), "--out", str(base), *cell_args, log=log)
            if code:
                print(f"budget {b}: planning failed (exit {code}), see {log}")
                continue
        for s in a.seeds:
            for m in a.methods:
                d = out / f"b{b}-{m}-s{s}"
                if not (d / "report.json").exists():
                    if not (d / "plan.json").exists():  # the budget's plan, timed once, shared by all cells
                        d.mkdir(parents=True, exist_ok=True)
                        for f in ("plan.json", "calibration.json", "table.json"):
                            shutil.copy2(base / f, d / f)
                        keys = json.loads((base / "stages.json").read_text())
                        (d / "stages.json").write_text(json.dumps({"plan": keys["plan"]}))
                    t0 = time.time()
                    code = _latprune("run", "--budget", str(b), "--method", m, "--seed", str(s), "--out", str(d),
                                     *cell_args, log=log)
                    print(f"cell b{b} {m} seed {s}: exit {code}, {time.time() - t0:.0f} s", flush=True)
                    if code not in (0, 4):
                        continue
                r = json.loads((d / "report.json").read_text())
                cells.append({"budget": b, "method": m, "seed": s, **_cell(r)})
                dense = dense or _dense(r)  # every cell starts from the same dense model
    rows = _aggregate(cells)
    result = {"scale": vars(a), "weights": str(weights), "dense": dense, "rows": rows, "cells": cells,
              "environment": environment()}
    path = Path(a.json or out / "robustness.json")
    path.write_text(json.dumps(result, indent=1))
    _print(dense, rows)
    print(f"wrote {path}")


def _cell(r: dict) -> dict:
    rob, c = r["robustness"], r["compact"]
    return {"latency_ms": c["latency_ms"], "ratio": c["latency_ms"] / r["dense"]["latency_ms"],
            "speedup": r["speedup"], "met": r["budget"]["met"], "params": c["params"], "test_acc": c["accuracy"],
            "clean_acc": rob["clean_acc"], "corruption_acc": rob["corruption_acc"], "R_C": rob["R_C"],
            "per_corruption": rob["per_corruption"], "step_time_ratio": r["training"]["step_time_ratio"],
            "sharpness": r["training"].get("sharpness"), "train_s": r["stage_seconds"].get("train_and_prune")}


def _dense(r: dict) -> dict:
    rob = r["robustness"]["dense"]
    return {"latency_ms": r["dense"]["latency_ms"], "params": r["dense"]["params"], "test_acc": r["dense"]["accuracy"],
            "clean_acc": rob["clean_acc"], "corruption_acc": rob["corruption_acc"], "R_C": rob["R_C"]}


def _aggregate(cells: list[dict]) -> list[dict]:
    rows = []
    for key in sorted({(c["budget"], c["method"]) for c in cells}, key=lambda k: (-k[0], list(LABELS).index(k[1]))):
        cs = [c for c in cells if (c["budget"], c["method"]) == key]
        row = {"budget": key[0], "method": key[1], "seeds": len(cs), "met": sum(c["met"] for c in cs)}
        for f in ("latency_ms", "ratio", "speedup", "params", "test_acc", "clean_acc", "corruption_acc", "R_C",
                  "step_time_ratio"):
            v = np.array([c[f] for c in cs], dtype=float)
            row[f] = [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0]
        rows.append(row)
    return rows


def _print(dense: dict | None, rows: list[dict]) -> None:
    def pm(x, nd=4):
        return f"{x[0]:.{nd}f} +- {x[1]:.{nd}f}"

    print(f"{'budget':>6} {'method':<12} {'n':>2} {'met':>3} {'ms':>14} {'speedup':>14} {'params':>8} "
          f"{'test acc':>16} {'clean acc':>16} {'corr acc':>16} {'R_C':>16} {'step x':>6}")
    if dense:
        print(f"{'1.0':>6} {'dense':<12} {'':>2} {'':>3} {dense['latency_ms']:>14.3f} {'1.00':>14} "
              f"{dense['params']:>8} "
              f"{dense['test_acc']:>16.4f} {dense['clean_acc']:>16.4f} {dense['corruption_acc']:>16.4f} "
              f"{dense['R_C']:>16.4f} {'':>6}")
    for r in rows:
        print(f"{r['budget']:>6} {LABELS[r['method']]:<12} {r['seeds']:>2} {r['met']:>3} {pm(r['latency_ms'], 3):>14} "
              f"{pm(r['speedup'], 2):>14} {r['params'][0]:>8.0f} {pm(r['test_acc']):>16} {pm(r['clean_acc']):>16} "
              f"{pm(r['corruption_acc']):>16} {pm(r['R_C']):>16} {r['step_time_ratio'][0]:>6.2f}")


if __name__ == "__main__":
    main()
