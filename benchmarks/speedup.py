"""Dense vs compact end-to-end latency of a finished run, at several batch sizes.

    python benchmarks/speedup.py RUN_DIR [--batches 1 32] [--runtime ort] [--rounds 9] [--json OUT]

Both models are exported at each batch (static shape) and timed interleaved in one process
(../shared/BENCHMARKS.md). Latency does not depend on weight values, so the dense model is rebuilt
from the run's model spec. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from latprune.latency_tables.device import environment
from latprune.latency_tables.endtoend import PairConfig, measure_speedup
from latprune.latency_tables.runtimes import get_backend
from latprune.models.arch import load_compact
from latprune.models.registry import ModelSpec


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--runtime", default="ort")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--round-s", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3, help="pairs of fresh sessions, pooled")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    run = Path(a.run_dir)
    arch = json.loads((run / "arch.json").read_text())
    dense = ModelSpec(**arch["model"]).build().eval()
    compact = load_compact(run)
    shape = tuple(json.loads((run / "report.json").read_text())["runtime"]["input_shape"][1:])
    rows = []
    for b in a.batches:
        backend = get_backend(a.runtime, a.threads, b)
        s = measure_speedup(backend, dense, compact, shape, PairConfig(a.rounds, a.round_s, a.repeats, a.repeats))
        rows.append({"batch": b, "dense_ms": s.dense["median_ms"], "compact_ms": s.compact["median_ms"],
                     "dense_cv": s.dense["cv"], "compact_cv": s.compact["cv"], "speedup": s.speedup,
                     "ci95": list(s.speedup_ci95)})
    print(f"{'batch':>5} {'dense ms':>9} {'compact ms':>10} {'speedup':>8} {'95% CI':>13} {'cv d/c':>11}")
    for r in rows:
        print(f"{r['batch']:>5} {r['dense_ms']:>9.3f} {r['compact_ms']:>10.3f} {r['speedup']:>8.2f} "
              f"{r['ci95'][0]:>6.2f}-{r['ci95'][1]:<6.2f} {r['dense_cv']:.3f}/{r['compact_cv']:.3f}")
    out = Path(a.json or run / "speedup_benchmark.json")
    out.write_text(json.dumps({"run": str(run), "runtime": a.runtime, "threads": a.threads, "rows": rows,
                               "environment": environment()}, indent=1))
    print(out)


if __name__ == "__main__":
    main()
