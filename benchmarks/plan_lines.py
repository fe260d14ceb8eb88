"""Does measuring the table's grid lines through the knapsack's widths make its plans land where predicted?

    python benchmarks/plan_lines.py [--cases resnet18:224:1:64:grid resnet50:224:1:8:adaptive]
                                    [--budgets 0.4 0.5 0.6 0.7] [--seeds 0 1 2] [--rounds 3]
                                    [--threads 2] [--out runs/bench-plan-lines]

A case is MODEL:INPUT:BATCH:STEP:SAMPLING (the table: ``latprune profile --profile-step STEP
--sampling SAMPLING``, built once per case through a latency store in ``--out``, random weights:
latency does not depend on them). For each seed (the model's random initialisation, so the
magnitude importance and hence the plans differ) and budget B, with the knapsack at
``--round-to 8`` (the CLI default):

* **table**: the plan for B x dense on the table as profiled, pruned into a copy and timed end to
  end against the dense model (``endtoend.measure_speedup``);
* **lines**: up to ``--rounds`` rounds of plan, then measure the grid lines its widths lack
  (``profile.lines_through``, what ``latprune run --plan-lines`` does before its closed loop),
  then the final plan timed the same way.

Both arms start from the same table and the same weights (paired). Per arm: the prediction error
at the plan, (predicted - measured) / measured, and the miss, (measured - B) / B, i.e. how far the
first timed plan lands from the budget the closed loop must meet. Cells are cached in
``--out/cells`` and resumed; the summary gives mean |error| per arm and the paired difference
(table - lines) with a bootstrap 95 % interval over cells (``front.paired_ci``).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from front import paired_ci

from latprune.errors import BudgetBelowFloor
from latprune.io import write_json_atomic
from latprune.latency_tables.device import environment
from latprune.latency_tables.endtoend import PairConfig, measure_speedup
from latprune.latency_tables.profile import ProfileConfig, lines_through, profile_model
from latprune.latency_tables.runtimes import get_backend
from latprune.latency_tables.store import LatencyStore
from latprune.latency_tables.table import LatencyTable
from latprune.models.graph import ModelGraph
from latprune.models.registry import ModelSpec
from latprune.pipeline.calibrate import lines_through_plans
from latprune.pipeline.plan import PlanConfig, apply_plan_, build_plan

PLAN = PlanConfig(round_to=8, importance="magnitude")  # weights only: no data needed
TIMING = PairConfig(rounds=7, min_round_s=0.25, repeats=2, max_repeats=4)  # the closed loop's default timing


def _model(name: str, size: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ModelSpec(name, 10 if size <= 64 else 1000).build().eval()


def _timed(backend, model, plan, shape) -> float:
    probe = apply_plan_(copy.deepcopy(model), plan, shape)
    return measure_speedup(backend, model, probe, shape, TIMING).ratio


def run_case(case: str, budgets: list[float], seeds: list[int], rounds: int, threads: int, out: Path) -> list[dict]:
    name, size, batch, step, sampling = case.split(":")
    size, batch, step = int(size), int(batch), int(step)
    shape = (3, size, size)
    backend = get_backend("ort", threads, batch)
    pcfg = ProfileConfig(step=step, sampling=sampling)
    tag = case.replace(":", "-")
    cells = out / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    rows = []
    with LatencyStore(out / "store.sqlite") as store:
        table_file = out / f"table-{tag}.json"
        if table_file.exists():
            table = LatencyTable.load(table_file)
        else:
            t0 = time.perf_counter()
            table = profile_model(_model(name, size, 0), shape, backend, pcfg, progress=False, store=store)
            table.meta["build_s"] = time.perf_counter() - t0
            table.save(table_file)
        for seed in seeds:
            model = _model(name, size, seed)
            graph = ModelGraph(model, shape)

            def lines(t, channels, graph=graph):
                return lines_through(graph, t, channels, backend, pcfg, store)

            for b in budgets:
                cell = cells / f"{tag}-b{b}-s{seed}.json"
                if cell.exists():
                    rows.append(json.loads(cell.read_text()))
                    continue
                target = b * table.dense_ms
                try:
                    plan0 = build_plan(graph, table, target, PLAN, warn_unpruned=False)
                except BudgetBelowFloor as e:
                    print(f"{case} seed {seed} budget {b}: skipped ({e})", flush=True)
                    continue
                m0 = _timed(backend, model, plan0, shape)
                t0 = time.perf_counter()
                try:  # what plan_to_budget does before its closed loop, with the same rounds
                    t = lines_through_plans(graph, table, target, PLAN, None, lines, rounds)
                    plan1 = build_plan(graph, t, target, PLAN, warn_unpruned=False)
                except BudgetBelowFloor as e:  # the measured lines put the budget below the floor
                    print(f"{case} seed {seed} budget {b}: skipped, with the lines: {e}", flush=True)
                    continue
                lines_s = time.perf_counter() - t0
                spent = t.meta.get("plan_lines", [])[len(table.meta.get("plan_lines", [])):]
                m1 = _timed(backend, model, plan1, shape)
                row = {"case": case, "seed": seed, "budget": b,
                       "table": {"predicted": plan0.predicted_ms / table.dense_ms, "measured": m0},
                       "lines": {"predicted": plan1.predicted_ms / t.dense_ms, "measured": m1,
                                 "rounds": spent, "seconds": lines_s,
                                 "converged": len(spent) < rounds}}
                for arm in ("table", "lines"):
                    r = row[arm]
                    r["error"] = (r["predicted"] - r["measured"]) / r["measured"]
                    r["miss"] = (r["measured"] - b) / b
                write_json_atomic(cell, row)
                rows.append(row)
                print(f"{case} seed {seed} budget {b}: table predicted {row['table']['predicted']:.3f} measured "
                      f"{m0:.3f}; lines predicted {row['lines']['predicted']:.3f} measured {m1:.3f} "
                      f"({sum(d['measured'] for d in spent)} entries measured, "
                      f"{sum(d['from_store'] for d in spent)} from the store, {lines_s:.0f} s)", flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    out = {}
    for case in sorted({r["case"] for r in rows}):
        rs = [r for r in rows if r["case"] == case]
        s = {"cells": len(rs)}
        for what in ("error", "miss"):
            a = np.array([abs(r["table"][what]) for r in rs])
            b = np.array([abs(r["lines"][what]) for r in rs])
            ci = paired_ci(a - b)
            s[what] = {"table_mean_abs": float(a.mean()), "lines_mean_abs": float(b.mean()),
                       "paired_diff": ci["mean"], "ci95": ci["ci95"], "win": ci["win"], "loss": ci["loss"]}
        s["entries_measured"] = int(sum(d["measured"] for r in rs for d in r["lines"]["rounds"]))
        s["entries_from_store"] = int(sum(d["from_store"] for r in rs for d in r["lines"]["rounds"]))
        s["lines_seconds_median"] = float(np.median([r["lines"]["seconds"] for r in rs]))
        out[case] = s
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["resnet18:224:1:64:grid", "resnet50:224:1:8:adaptive"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.4, 0.5, 0.6, 0.7])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/bench-plan-lines"))
    a = p.parse_args()
    rows = [r for case in a.cases for r in run_case(case, a.budgets, a.seeds, a.rounds, a.threads, a.out)]
    s = summary(rows)
    for case, v in s.items():
        print(f"{case}: {v['cells']} cells; |prediction error| table {100 * v['error']['table_mean_abs']:.1f} %, "
              f"lines {100 * v['error']['lines_mean_abs']:.1f} %, paired diff {100 * v['error']['paired_diff']:.1f} "
              f"[{100 * v['error']['ci95'][0]:.1f}, {100 * v['error']['ci95'][1]:.1f}] points; |miss of the budget| "
              f"table {100 * v['miss']['table_mean_abs']:.1f} %, lines {100 * v['miss']['lines_mean_abs']:.1f} %, "
              f"paired diff {100 * v['miss']['paired_diff']:.1f} [{100 * v['miss']['ci95'][0]:.1f}, "
              f"{100 * v['miss']['ci95'][1]:.1f}]; {v['entries_measured']} entries measured")
    write_json_atomic(a.out / "plan_lines.json", {"summary": s, "rows": rows, "environment": environment(),
                                                 "command": " ".join(["python benchmarks/plan_lines.py",
                                                                      *sys.argv[1:]])})


if __name__ == "__main__":
    main()
