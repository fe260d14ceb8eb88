"""Equal latency by interpolation: a latprune plan against torch-pruning's accuracy-latency curve.

    python benchmarks/front_interp.py [--model resnet20] [--weights FILE] [--out runs/bench-front-search]
                                      [--method oneshot_search] [--budgets 0.6 0.7] [--rounds 6] [--extra-ratios 0.25]

With ``round_to=8`` torch-pruning's latency moves in steps, so its ratio bisection
(``benchmarks/front.py``) cannot always land within +-3 % of latprune's plan. This script takes the
cells ``front.py`` already trained (OUT/cells, OUT/structures-B.json), builds every torch-pruning
uniform architecture those cells used (one per distinct pruning ratio, over all budgets) and
latprune's plan for each budget, times them all against the dense model in one interleaved pass
(``--rounds`` rounds, the median kept), and for each budget and seed interpolates torch-pruning's
accuracy linearly in measured latency between the two architectures that bracket latprune's plan
(the same seed's cells). ``--extra-ratios`` trains torch-pruning at more ratios first, as
``front.py`` trains its cells, where the bisection's own do not bracket a plan. Reported: the
per-seed paired difference, its mean and a bootstrap 95 % interval (a win only where the interval
excludes 0), written to OUT/interp.json and printed.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from front import BASELINE, FINAL, Bench, paired_ci

from latprune.io import write_json_atomic
from latprune.latency_tables.device import environment
from latprune.latency_tables.endtoend import measure_speedup
from latprune.pipeline.baselines import tp_pruned


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet20")
    p.add_argument("--weights", default=None, help="as front.py's --weights (the same dense model as its cells)")
    p.add_argument("--out", default="runs/bench-front-search")
    p.add_argument("--method", default="oneshot_search")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.7])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--extra-ratios", type=float, nargs="*", default=[],
                   help="torch-pruning uniform ratios to train too (OUT/cells/tp_uniform_r8-ratioR-SEED.json)")
    a = p.parse_args()
    out = Path(a.out)
    bench = Bench(argparse.Namespace(model=a.model, weights=a.weights, out=a.out, train_subset=0, epochs=2.0,
                                     methods=[a.method]))
    structures = {b: json.loads((out / f"structures-{b}.json").read_text()) for b in a.budgets}
    cells = [json.loads(f.read_text()) for f in sorted((out / "cells").glob("*.json"))]
    # accuracy of every torch-pruning uniform architecture, by pruning ratio and seed
    tp_acc: dict[float, dict[int, float]] = defaultdict(dict)
    for c in cells:
        if c["method"] == BASELINE and c["budget"] in structures:
            tp_acc[structures[c["budget"]][BASELINE]["pruning_ratio"]][c["seed"]] = c["accuracy"]
    # more points on torch-pruning's curve where the bisection's cells do not bracket a plan: the
    # same training, seeds and data order as front.py's cells (cached the same way)
    seeds = sorted({c["seed"] for c in cells if c["method"] == a.method})
    for r in a.extra_ratios:
        for seed in seeds:
            row = bench.cell(BASELINE, f"ratio{r:g}", seed, {BASELINE: {"pruning_ratio": r}})
            tp_acc[r][seed] = row["accuracy"]
    models = {f"tp {r:.4f}": tp_pruned(bench.dense, r, bench.shape, 8) for r in tp_acc}
    models |= {f"{a.method} {b}": bench.build(a.method, structures[b]) for b in a.budgets}
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(a.rounds):  # round-robin, every model against the dense one
        for k, m in models.items():
            times[k].append(measure_speedup(bench.backend, bench.dense, m, bench.shape, FINAL).ratio)
    lat = {k: float(np.median(v)) for k, v in times.items()}
    print("measured / dense (median of %d): " % a.rounds + ", ".join(f"{k} {v:.3f}" for k, v in lat.items()))
    curve = sorted((lat[f"tp {r:.4f}"], r) for r in tp_acc)
    results = []
    for b in a.budgets:
        ours = lat[f"{a.method} {b}"]
        below = [c for c in curve if c[0] <= ours]
        above = [c for c in curve if c[0] > ours]
        row = {"budget": b, "method": a.method, "measured_ratio": ours, "tp_curve": curve}
        if not below or not above:
            row["error"] = "torch-pruning's measured points do not bracket the plan: no interpolation"
            results.append(row)
            print(f"{b}: {row['error']}")
            continue
        (l0, r0), (l1, r1) = below[-1], above[0]
        w = (ours - l0) / (l1 - l0)
        acc = {c["seed"]: c["accuracy"] for c in cells if c["method"] == a.method and c["budget"] == b}
        seeds = sorted(set(acc) & set(tp_acc[r0]) & set(tp_acc[r1]))
        tp_at = {s: (1 - w) * tp_acc[r0][s] + w * tp_acc[r1][s] for s in seeds}
        d = np.array([acc[s] - tp_at[s] for s in seeds])
        row.update({"bracket": [{"measured_ratio": l0, "pruning_ratio": r0},
                                {"measured_ratio": l1, "pruning_ratio": r1}],
                    "weight": w, "seeds": seeds, "accuracy": [acc[s] for s in seeds],
                    "tp_interpolated": [tp_at[s] for s in seeds], **paired_ci(d)})
        results.append(row)
        print(f"{b}: {a.method} at {ours:.3f} of dense: {np.mean(row['accuracy']):.4f}; torch-pruning uniform r8 "
              f"interpolated between {l0:.3f} (ratio {r0:.3f}) and {l1:.3f} (ratio {r1:.3f}): "
              f"{np.mean(row['tp_interpolated']):.4f}; paired {row['mean']:+.4f} "
              f"({row['ci95'][0]:+.4f}, {row['ci95'][1]:+.4f}), {len(seeds)} seeds")
    write_json_atomic(out / "interp.json", {"command": "python benchmarks/front_interp.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(a).items() if v is not None),
        "times": times, "results": results, "environment": environment(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})


if __name__ == "__main__":
    main()
