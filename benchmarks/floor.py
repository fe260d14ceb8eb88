"""The smallest reachable latency: a model with every prunable group at its narrowest width, against dense.

    python benchmarks/floor.py [--model resnet20] [--round-to 8] [--batch 32] [--pairs 4] [--json OUT]

The knapsack cannot go below this plan (every group cut to ``--round-to`` channels), so a budget
under its measured ratio is refused before training. It depends on the machine: fixed costs (the
runtime's per-call overhead, pooling, adds, the classifier) take a larger share of a faster CPU's
dense latency. Both models are timed interleaved in ``--pairs`` pairs of fresh sessions (each 7
rounds of 0.25 s, ../shared/BENCHMARKS.md); latency does not depend on weights, so the models are
untrained. Prints each pair's ratio and writes JSON with the machine's CPU flags.
"""
from __future__ import annotations

import argparse
from datetime import datetime, timezone

import numpy as np

from latprune.io import write_json_atomic
from latprune.latency_tables.device import environment
from latprune.latency_tables.endtoend import PairConfig, measure_speedup
from latprune.latency_tables.runtimes import get_backend
from latprune.models.graph import ModelGraph
from latprune.models.registry import ModelSpec
from latprune.models.surgery import pruned_copy
from latprune.models.widths import candidate_widths


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet20")
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--runtime", default="ort")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--json", default="runs/bench-floor.json")
    a = p.parse_args()
    shape = (3, a.size, a.size)
    dense = ModelSpec(a.model, 10).build().eval()
    sizes = ModelGraph(dense, shape).sizes()
    smallest = pruned_copy(dense, {g: int(candidate_widths(n, a.round_to)[0]) for g, n in sizes.items()}, shape)
    backend = get_backend(a.runtime, a.threads, a.batch)
    one_pair = PairConfig(rounds=7, min_round_s=0.25, repeats=1, max_repeats=1)
    pairs = []
    for i in range(a.pairs):
        s = measure_speedup(backend, dense, smallest, shape, one_pair)
        pairs.append({"ratio": s.ratio, "dense_ms": s.dense["median_ms"], "smallest_ms": s.compact_ms})
        print(f"pair {i}: smallest / dense = {s.ratio:.3f} (dense {s.dense['median_ms']:.3f} ms)", flush=True)
    ratios = np.array([r["ratio"] for r in pairs])
    print(f"{a.model} at round_to {a.round_to}, batch {a.batch}: floor {np.median(ratios):.3f} of dense "
          f"(pairs {ratios.min():.3f}-{ratios.max():.3f})")
    out = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "settings": vars(a),
           "fingerprint": backend.fingerprint(shape).device, "median_ratio": float(np.median(ratios)),
           "pairs": pairs, "environment": environment()}
    print(write_json_atomic(a.json, out))


if __name__ == "__main__":
    main()
