"""A detector pruned to a latency budget (issue 13): SSDlite-MobileNetV3 on synthetic Fashion-MNIST detection.

    python benchmarks/detection.py [--budget 0.6] [--seeds 0] [--out runs/bench-detection]
                                   [--results benchmarks/results/detection] [-- EXAMPLE FLAGS]

Each seed is one run of ``examples/detection.py`` (the user-facing script, so the benchmark measures
what a user runs): the dense SSD trained once on 3,000 synthetic 96 x 96 canvases (cached in OUT,
shared by every seed), its mAP on 500 test canvases, then ``LatencyPruner`` on its raw head outputs
(backbone and neck pruned, ``ssd.head`` ignored), ONNX Runtime on this CPU at deployment batch 8,
fine-tuning, the closed loop's verification, export with parity. Per seed: mAP@0.5 and
mAP@[.5:.95] before and after, the measured latency ratio (dense and compact timed interleaved),
the budget met or not, parameters. A seed's summary is kept in RESULTS (in git): it is not run again.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from latprune.io import write_json_atomic
from latprune.latency_tables.device import environment

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "detection.py"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=0.6)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default="runs/bench-detection")
    p.add_argument("--results", default="benchmarks/results/detection")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags for examples/detection.py")
    a = p.parse_args()
    extra = [x for x in a.extra if x != "--"]
    out, results = Path(a.out), Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in a.seeds:
        summary = results / f"b{a.budget:g}-s{s}.json"
        if not summary.exists():
            cmd = [sys.executable, str(EXAMPLE), "--budget", str(a.budget), "--seed", str(s),
                   "--dense", str(out / "ssdlite-dense.pt"), "--out", str(out / f"deploy-b{a.budget:g}-s{s}"),
                   "--json", str(out / f"b{a.budget:g}-s{s}.json"), *extra]
            t0 = time.time()
            with open(out / "log.txt", "a") as log:
                log.write(f"\n$ {' '.join(cmd)}\n")
                log.flush()
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
            print(f"seed {s}: exit {code}, {time.time() - t0:.0f} s", flush=True)
            if code:
                continue
            r = json.loads((out / f"b{a.budget:g}-s{s}.json").read_text())
            write_json_atomic(summary, {**r, "command": " ".join(sys.argv), "environment": environment(),
                                        "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        rows.append(json.loads(summary.read_text()))
    if not rows:
        return
    env = rows[0]["environment"]
    print(f"\nSSDlite-MobileNetV3, synthetic Fashion-MNIST detection, budget {a.budget} of measured ORT CPU latency; "
          f"{env['cpu']}, {env['cpu_count']} cores")
    print("| seed | dense mAP@0.5 | compact mAP@0.5 | dense mAP@[.5:.95] | compact mAP@[.5:.95] | after the schedule "
          "| final measured ratio | budget met | params dense -> after the schedule -> final |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d, c, v = r["dense_map"], r["compact_map"], r["verify"]
        first = r.get("verifications", [v])[0]  # measured right after the last scheduled removal
        print(f"| {r['args']['seed']} | {d['map_50']:.4f} | {c['map_50']:.4f} | {d['map_50_95']:.4f} | "
              f"{c['map_50_95']:.4f} | {first['measured_ratio']:.3f} ({first['action']}) | {v['measured_ratio']:.3f} "
              f"[{v['ratio_ci95'][0]:.3f}, {v['ratio_ci95'][1]:.3f}] | {'yes' if v['met'] else 'no'} ({v['action']}) | "
              f"{r['dense_params']:,} -> {r['removals'][-1]['params']:,} -> {r['compact_params']:,} |")
    drop = [r["dense_map"]["map_50"] - r["compact_map"]["map_50"] for r in rows]
    print(f"mAP@0.5 drop: mean {np.mean(drop):+.4f} over {len(rows)} seed(s)")


if __name__ == "__main__":
    main()
