"""Budgets -> measured latency, and the knapsack plan against uniform pruning at equal latency.

    python benchmarks/budget.py [--budgets 0.3 0.5 0.7] [--model resnet20] [--finetune-epochs 1]
                                [--train-subset 10000] [--seed 0] [--importance magnitude|halp]
                                [--out runs/bench-budget]

On the embedded default (Fashion-MNIST, the cached pre-trained dense model and latency table):

1. For each budget, latprune's plan: the HALP knapsack on the table, through the closed loop
   (planned widths timed against the dense model, the table corrected, re-solved).
2. Two baselines from torch-pruning, uniform magnitude pruning (``GroupMagnitudeImportance(p=2)``,
   the same ratio in every group, classifier kept), without and with ``round_to=8``. For each, the
   ratio is searched (bisection) so that its *measured* latency reaches the knapsack plan's.
3. All three are fine-tuned alike (one-shot pruning, then SGD for ``--finetune-epochs``, same
   seed and data order) and timed once more against the dense model, interleaved.

Prints a table and writes JSON (every row, the widths, the search, the environment) to
OUT/budget-IMPORTANCE.json.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch_pruning as tp

from latprune.errors import BudgetBelowFloor
from latprune.latency_tables.device import environment
from latprune.latency_tables.endtoend import PairConfig, measure_speedup
from latprune.models.graph import output_channels
from latprune.pipeline import stages
from latprune.pipeline.baselines import tp_pruned
from latprune.pipeline.calibrate import plan_to_budget
from latprune.pipeline.config import RunConfig
from latprune.pipeline.importance import importance_names
from latprune.pipeline.plan import apply_plan_
from latprune.pipeline.train import TrainConfig, evaluate, train

SEARCH = PairConfig(rounds=5, min_round_s=0.2, repeats=1, max_repeats=2)
FINAL = PairConfig(rounds=9, min_round_s=0.3, repeats=2, max_repeats=4)


def search_ratio(dense, target_ratio: float, round_to: int | None, backend, shape, steps: int = 7):
    """Largest kept width (smallest pruning ratio) whose measured latency ratio is <= target; when no
    ratio tried reaches the target, the one measured fastest (the search's trace says so: with
    round_to 8, torch-pruning leaves a model whole at high ratios, which then measures as dense)."""
    lo, hi, best, trace = 0.0, 0.95, None, []
    for _ in range(steps):
        mid = (lo + hi) / 2
        r = measure_speedup(backend, dense, tp_pruned(dense, mid, shape, round_to), shape, SEARCH).ratio
        trace.append({"pruning_ratio": mid, "measured_ratio": r})
        if r <= target_ratio:
            hi, best = mid, (mid if best is None else min(best, mid))
        else:
            lo = mid
    if best is None:  # unreachable for this baseline: its fastest model, not the last ratio tried
        best = min(trace, key=lambda t: t["measured_ratio"])["pruning_ratio"]
    return best, trace



def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--finetune-epochs", type=float, default=1.0)
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--importance", choices=importance_names(), default="magnitude",
                   help="the knapsack's channel importance")
    p.add_argument("--out", default="runs/bench-budget")
    a = p.parse_args()
    cfg = RunConfig().with_overrides(model=a.model, out=f"{a.out}/base", progress=False, seed=a.seed,
                                     data={"train_subset": a.train_subset},
                                     plan={"importance": a.importance, "search_candidates": 0})  # the knapsack alone
    inp, rd = stages.prepare(cfg)
    dense_art = stages.dense_stage(inp, rd)
    table = stages.profile_stage(inp, rd, dense_art)
    dense, shape, backend = dense_art.model, inp.input_shape, inp.backend
    ft = TrainConfig(epochs=a.finetune_epochs, lr=0.02, warmup_iters=20)
    dense_acc = evaluate(dense, inp.data, inp.data.test)
    rows, out = [], Path(a.out) / f"budget-{a.importance}.json"
    for b in a.budgets:
        t0 = time.perf_counter()
        batches = None
        if cfg.plan.scoring_batches:
            n = cfg.plan.scoring_batches * cfg.finetune.batch_size
            batches = list(inp.data.batches(inp.data.train, cfg.finetune.batch_size, limit=n))
        try:
            cal = plan_to_budget(dense_art.graph, table, b, cfg.plan, backend, cfg.budget.calibrate_iters,
                                 (cfg.budget.window_low, cfg.budget.window_high), cfg.budget.timing, batches)
        except BudgetBelowFloor as e:
            rows.append({"budget": b, "method": "knapsack", "error": str(e)})
            print(f"{b}: {e}", flush=True)
            continue
        models = {"knapsack": apply_plan_(copy.deepcopy(dense), cal.plan, shape)}
        searches = {}
        for label, rt in (("uniform", None), ("uniform round_to 8", 8)):
            ratio, trace = search_ratio(dense, cal.measured_ratio, rt, backend, shape)
            reached = any(t["measured_ratio"] <= cal.measured_ratio for t in trace)
            models[label] = tp_pruned(dense, ratio, shape, rt)
            searches[label] = {"pruning_ratio": ratio, "trace": trace, "reached_target": reached}
        for label, m in models.items():
            train(m, inp.data, ft, seed=a.seed, progress=False, desc=label)
            s = measure_speedup(backend, dense, m.eval(), shape, FINAL)
            macs, params = tp.utils.count_ops_and_params(m, torch.zeros(1, *shape))
            rows.append({"budget": b, "method": label,
                         "importance": a.importance if label == "knapsack" else "magnitude",
                         "widths": output_channels(m), "measured_ratio": s.ratio, "pair_ratios": s.repeats,
                         "measured_over_target": s.ratio / b, "calibrated_ratio": cal.measured_ratio,
                         "calibration_iters": len(cal.history), "params": int(params), "macs": int(macs),
                         "accuracy": evaluate(m, inp.data, inp.data.test), "dense_accuracy": dense_acc,
                         "search": searches.get(label), "wall_s": time.perf_counter() - t0})
            print(f"{b} {label}: measured {s.ratio:.3f} ({s.ratio / b:.3f} x budget), accuracy "
                  f"{rows[-1]['accuracy']:.4f}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"rows": rows, "finetune": dataclasses.asdict(ft), "dense_accuracy": dense_acc,
                                   "environment": environment()}, indent=1))
    print(f"\n{'budget':>6} {'method':<19} {'measured':>8} {'/budget':>7} {'params':>7} {'MACs M':>7} {'accuracy':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['budget']:>6} {r['method']:<19} {r['error']}")
            continue
        print(f"{r['budget']:>6} {r['method']:<19} {r['measured_ratio']:>8.3f} {r['measured_over_target']:>7.3f} "
              f"{r['params']:>7,} {r['macs'] / 1e6:>7.2f} {r['accuracy']:>8.4f}")
    print(f"dense accuracy {dense_acc:.4f}; {out}")


if __name__ == "__main__":
    main()
