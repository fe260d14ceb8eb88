"""How well does a latency table predict the measured end-to-end latency of pruned models?

    python benchmarks/table_accuracy.py [--cases resnet20:32:32 resnet56:32:32 resnet18:32:32 ...]
                                        [--validate 10] [--runtime ort] [--threads 2] [--precision fp32]
                                        [--store runs/bench-tables/store.sqlite]
                                        [--json runs/bench-tables/table_accuracy.json]

A case is MODEL:INPUT:BATCH[:STEP[:SAMPLING[:BUDGET]]] (STEP: the grid step in channels, default 8;
SAMPLING: grid, the default, or adaptive: ``latency_tables.sampling``; BUDGET: its refinement
budget, a multiple of the coarse pass's entries, default 1). For each case: build the table as
``latprune profile`` does (layer grid, dense timing, end-to-end fit), timed; then time
``--validate`` random pruned configurations (widths drawn on the grid, channels physically removed,
not the fit's configurations) end to end against the dense model and compare with the table's
prediction. Random weights: latency does not depend on them. Without ``--store`` every case starts
cold; with it, the cases share one latency store in that order (a later model reuses the layer
shapes an earlier one measured: "measured" and "from store" say how many). Prints one row per case
and writes JSON with every point and the environment.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from pathlib import Path

from latprune.latency_tables.device import environment
from latprune.latency_tables.endtoend import validate_table
from latprune.latency_tables.plots import plot_validation
from latprune.latency_tables.profile import ProfileConfig, profile_model
from latprune.latency_tables.runtimes import PRECISIONS, get_backend
from latprune.latency_tables.store import LatencyStore
from latprune.models.graph import ModelGraph
from latprune.models.registry import ModelSpec

DEFAULT_CASES = ["resnet20:32:32", "resnet20:32:1", "resnet56:32:32", "resnet56:32:1", "resnet18:32:32",
                 "resnet18:32:1", "mobilenet_v2:32:32", "mobilenet_v2:32:1", "resnet18:224:1:64",
                 "mobilenet_v2:224:1:32"]


def measure_case(case: str, runtime: str = "ort", threads: int = 2, validate: int = 10, precision: str = "fp32",
                 plot_dir: Path | None = None, store: Path | None = None, validate_step: int | None = None) -> dict:
    """One case: the table built as ``latprune profile`` builds it (timed), then its prediction
    error on ``validate`` random pruned configurations timed end to end (also ``benchmarks/int8.py``)."""
    name, size, batch, *rest = case.split(":")
    size, batch = int(size), int(batch)
    step = int(rest[0]) if rest else 8
    sampling = rest[1] if len(rest) > 1 else "grid"
    budget = float(rest[2]) if len(rest) > 2 else ProfileConfig.refine_budget
    model = ModelSpec(name, 10 if size <= 64 else 1000).build().eval()
    shape = (3, size, size)
    backend = get_backend(runtime, threads, batch, precision=precision)
    cfg = ProfileConfig(step=step, sampling=sampling, refine_budget=budget)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        db = stack.enter_context(LatencyStore(store)) if store else None
        table = profile_model(model, shape, backend, cfg, progress=False, store=db)
    build_s = time.perf_counter() - t0
    # the validation's widths: multiples of validate_step (default the case's step: on a full grid's own points)
    v = validate_table(ModelGraph(model, shape), table, backend, validate, validate_step or step, cfg.pair,
                       progress=False)
    if plot_dir is not None:
        suffix = "" if precision == "fp32" else f"-{precision}"
        plot_validation(dataclasses.replace(table, meta={**table.meta, "validation": v}),
                        plot_dir / f"validation-{name}-{size}-b{batch}{suffix}.png")
    return {"case": case, "model": name, "input": size, "batch": batch, "step": step, "precision": precision,
            "sampling": sampling, "refine_budget": budget, "validate_step": validate_step or step,
            "measured": table.meta.get("measured"),
            "from_store": table.meta.get("from_store"),
            "sampling_record": table.meta.get("sampling"), "store": str(store) if store else None,
            "entries": table.entries, "signatures": len(table.layers), "build_s": build_s,
            "dense_ms": table.dense_ms, "e2e": table.e2e.to_dict(),
            "median_rel_err": v["median_rel_err"], "p90_rel_err": v["p90_rel_err"],
            "max_rel_err": v["max_rel_err"], "points": v["points"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    p.add_argument("--validate", type=int, default=10)
    p.add_argument("--runtime", default="ort")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--validate-step", type=int,
                   help="draw the validation's widths at this spacing (default: each case's grid step; 8, the "
                        "knapsack's, compares coarse grids and adaptive tables off their own points)")
    p.add_argument("--store", type=Path, help="one latency store shared by the cases, in order (default: each cold)")
    p.add_argument("--json", default="runs/bench-tables/table_accuracy.json")
    a = p.parse_args()
    out = Path(a.json)
    done = json.loads(out.read_text())["rows"] if out.exists() else []
    rows = [r for r in done if r["case"] in a.cases]
    for case in a.cases:
        if any(r["case"] == case for r in rows):
            continue  # resumable: a finished case is kept
        rows.append(measure_case(case, a.runtime, a.threads, a.validate, a.precision, out.parent, a.store,
                                 a.validate_step))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"rows": rows, "environment": environment()}, indent=1))
        r = rows[-1]
        print(f"{case}: {r['entries']} entries ({r['measured']} measured, {r['from_store']} from the store) in "
              f"{r['build_s']:.0f} s, dense {r['dense_ms']:.3f} ms, "
              f"median error {100 * r['median_rel_err']:.1f} %, p90 {100 * r['p90_rel_err']:.1f} %", flush=True)
    print(f"\n{'model':<13} {'input':>5} {'batch':>5} {'step':>4} {'sampling':>8} {'entries':>7} {'measured':>8} "
          f"{'build s':>7} {'dense ms':>9} {'median err':>10} {'p90 err':>8} {'max err':>8}")
    for r in rows:
        print(f"{r['model']:<13} {r['input']:>5} {r['batch']:>5} {r['step']:>4} {r.get('sampling', 'grid'):>8} "
              f"{r['entries']:>7} {r.get('measured') or r['entries']:>8} {r['build_s']:>7.0f} "
              f"{r['dense_ms']:>9.3f} {100 * r['median_rel_err']:>9.1f}% {100 * r['p90_rel_err']:>7.1f}% "
              f"{100 * r['max_rel_err']:>7.1f}%")
    print(out)


if __name__ == "__main__":
    main()
