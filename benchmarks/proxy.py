"""Does the plan search's score rank structures as fine-tuning does? (pipeline.search)

    python benchmarks/proxy.py [--out runs/bench-front] [--budget 0.7]

For every static structure of a ``benchmarks/front.py`` run whose cells were trained (OUT/cells,
OUT/structures-B.json), this computes, from the same dense model and with the search's own code
and settings: the held-out accuracy right after pruning with BatchNorm re-estimated (the search's
screen), and after the search's short fine-tune (``PlanConfig.search_iters`` SGD steps on the same
32 training batches, BatchNorm re-estimated; the search's decision), and prints them beside the
mean test accuracy the cells reached after 2 epochs, with Spearman's rank correlation over the
structures. Written to OUT/proxy-B.json. Nothing here is timed.
"""
from __future__ import annotations

import argparse
import copy
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from front import Bench

from latprune.io import write_json_atomic
from latprune.pipeline.plan import PlanConfig
from latprune.pipeline.search import SEARCH_TRAIN
from latprune.pipeline.train import bn_recalibrated, finetune_on_batches_, held_out_metrics


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/bench-front")
    p.add_argument("--budget", type=float, default=0.7)
    a = p.parse_args()
    out = Path(a.out)
    s = json.loads((out / f"structures-{a.budget}.json").read_text())
    final = defaultdict(list)
    for f in (out / "cells").glob(f"*-{a.budget}-*.json"):
        c = json.loads(f.read_text())
        if c["method"] != "iterative_halp":
            final[c["method"]].append(c["accuracy"])
    bench = Bench(argparse.Namespace(model="resnet20", out=a.out, train_subset=0, epochs=2.0, methods=[]))
    cfg = PlanConfig(search_candidates=1)
    train_batches = bench.batches(bench.data.train, 32)
    recal, held_out = train_batches[:8], bench.batches(bench.data.val, cfg.search_batches)
    rows = []
    for method in sorted(final):
        m = bench.build(method, s)
        bn_acc, _ = held_out_metrics(bn_recalibrated(m, recal), held_out)
        tuned = finetune_on_batches_(copy.deepcopy(m), train_batches, cfg.search_iters, SEARCH_TRAIN)
        ft_acc, ft_loss = held_out_metrics(bn_recalibrated(tuned, recal), held_out)
        rows.append({"method": method, "final_mean": float(np.mean(final[method])), "seeds": len(final[method]),
                     "bn_accuracy": bn_acc, "finetuned_accuracy": ft_acc, "finetuned_loss": ft_loss})
        print(f"{method:22s} final {rows[-1]['final_mean']:.4f} ({len(final[method])} seeds)  screen {bn_acc:.4f}  "
              f"after {cfg.search_iters} iterations {ft_acc:.4f}", flush=True)
    fin = [r["final_mean"] for r in rows]
    corr = {"screen": spearman([r["bn_accuracy"] for r in rows], fin),
            "finetuned": spearman([r["finetuned_accuracy"] for r in rows], fin)}
    print(f"Spearman rank correlation with the final accuracy: screen {corr['screen']:+.2f}, "
          f"after the short fine-tune {corr['finetuned']:+.2f} ({len(rows)} structures)")
    write_json_atomic(out / f"proxy-{a.budget}.json", {"command": f"python benchmarks/proxy.py --out {a.out} "
                                                       f"--budget {a.budget}", "rows": rows, "spearman": corr})


if __name__ == "__main__":
    main()
