"""The accuracy-latency front: latprune's planners against torch-pruning at equal measured latency.

    python benchmarks/front.py [--model resnet20] [--weights FILE] [--budgets 0.5 0.7] [--seeds 0 1 2]
                               [--methods tp_uniform_r8 iterative_halp ...] [--epochs 2]
                               [--train-subset 0] [--out runs/bench-front] [--probe]

Dense model: ``--weights``, else the bundled trained one where the package ships it (resnet20 on
Fashion-MNIST), else ``latprune``'s pre-training; latency table: the cached one for this machine (profiled if missing).
For each budget B:

1. **Structures, one quiet pass before any training** (cached in OUT/structures-B.json). Latency
   does not depend on weights, so every static method is pruned from a copy and timed against the
   dense model in this one process (interleaved pairs of sessions): latprune's one-shot plans (the
   knapsack through the closed loop, one per value: ``magnitude``, ``halp``, ``sensitivity``),
   then torch-pruning uniform and global magnitude pruning with ``round_to=8`` (``MetaPruner``, the
   classifier ignored), each ratio bisected until its measured ratio is within +-3 % of the
   one-shot ``halp`` plan's (the one-line baseline at latprune's latency), and random widths on the
   ``round_to`` grid that the table predicts under the same plan (channels by magnitude; a floor).
2. **Cells** (method x budget x seed; cached in OUT/cells/, so the benchmark resumes): every method
   fine-tunes with plain SGD (lr 0.02, warm-up 20, cosine, batch 128) for ``--epochs`` epochs of
   the training split, seed and data order the same for every method. ``iterative_halp``
   (latprune's default planner: R=10 removals, one every 30 iterations, the knapsack re-solved
   freely with HALP's value from the training gradients, then the corrective phase against the
   measured budget) counts its warm-up and pruning iterations against the same total. Accuracy is
   taken right after pruning (BatchNorm re-estimated on 8 training batches) and after training;
   each trained model is timed against the dense model once more.
3. **Report** (OUT/front.json, OUT/front.md, OUT/front.png): per method and budget, measured
   latency / dense, params, MACs, accuracies (mean +- std over seeds), per-stage widths, and the
   paired per-seed difference against ``tp_uniform_r8`` with a bootstrap 95 % interval of its mean
   (a win only where the interval excludes 0).

``--probe`` times a few training iterations and prints the cell count and an ETA, then exits.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp

from latprune.errors import BudgetBelowFloor
from latprune.io import write_bytes_atomic, write_json_atomic
from latprune.latency_tables.device import environment
from latprune.latency_tables.endtoend import PairConfig, measure_speedup
from latprune.latency_tables.plots import pyplot, save_png
from latprune.latency_tables.predict import LatencyModel
from latprune.latency_tables.table import EndToEnd, LatencyTable
from latprune.models.graph import ModelGraph, output_channels
from latprune.models.widths import candidate_widths
from latprune.pipeline import stages
from latprune.pipeline.adasap import OptimizerConfig
from latprune.pipeline.baselines import match_latency, tp_pruned
from latprune.pipeline.calibrate import LIGHT_TIMING, plan_to_budget
from latprune.pipeline.config import RunConfig
from latprune.pipeline.importance import group_importance
from latprune.pipeline.plan import PlanConfig, PruningPlan, apply_plan_, plan_for_widths
from latprune.pipeline.schedule import LatencyGoal, ScheduleConfig, TrainPruneConfig, train_and_prune_
from latprune.pipeline.search import perturbed_widths
from latprune.pipeline.train import TrainConfig, bn_recalibrated, evaluate, train

SEARCH = PairConfig(rounds=5, min_round_s=0.2, repeats=1, max_repeats=2)
FINAL = PairConfig(rounds=7, min_round_s=0.25, repeats=2, max_repeats=4)
# latprune's one-shot plans: the knapsack with each value, and the plan search (pipeline.search) over
# the halp knapsack's plan, the uniform widths and their perturbations
ONESHOT = {"magnitude": {"importance": "magnitude"}, "halp": {"importance": "halp"},
           "sensitivity": {"importance": "sensitivity"}, "search": {"importance": "halp", "search_candidates": 24}}
METHODS = ("tp_uniform_r8", "tp_global_r8", *(f"oneshot_{v}" for v in ONESHOT), "iterative_halp", "random")
BASELINE = "tp_uniform_r8"


def random_widths(graph: ModelGraph, table: LatencyTable, target_ms: float, round_to: int, seed: int) -> dict:
    """Random widths on the grid, then narrowed and widened at random (``search.perturbed_widths``)
    until the table predicts they spend ``target_ms``."""
    rng = np.random.default_rng(seed)
    grid = {cg.name: candidate_widths(cg.size, round_to) for cg in graph.groups}
    predict = LatencyModel(table, graph.layer_widths(table.layer_keys)).predict
    return perturbed_widths({n: int(rng.choice(ws)) for n, ws in grid.items()}, grid, predict, target_ms, rng,
                            moved=0.0)


def magnitude_plan(graph: ModelGraph, table: LatencyTable, widths: dict[str, int], target_ms: float) -> PruningPlan:
    """``widths``, each group keeping its channels of largest magnitude."""
    return plan_for_widths(graph, table, widths, group_importance(graph, "magnitude"), target_ms,
                           PlanConfig(importance="magnitude"))


class Bench:
    def __init__(self, a):
        self.a = a
        self.cfg = RunConfig().with_overrides(model=a.model, weights=a.weights, out=f"{a.out}/base", progress=False,
                                              data={"train_subset": a.train_subset})
        self.inp, rd = stages.prepare(self.cfg)
        self.dense_art = stages.dense_stage(self.inp, rd)
        self.table = stages.profile_stage(self.inp, rd, self.dense_art)
        self.dense, self.shape, self.backend = self.dense_art.model, self.inp.input_shape, self.inp.backend
        self.data, self.out = self.inp.data, Path(a.out)
        self.per_epoch = int(np.ceil(len(self.data.train) / 128))
        self.ft = TrainConfig(epochs=a.epochs, lr=0.02, warmup_iters=20)

    def batches(self, split, n):
        return list(self.data.batches(split, 128, limit=n * 128))

    # ---- 1. structures ----
    def structures(self, budget: float) -> dict:
        path = self.out / f"structures-{budget}.json"
        if not path.exists():
            wanted = [v for v in ONESHOT if v != "halp" and f"oneshot_{v}" in self.a.methods]
            s = self._structures(budget, ["halp", *wanted])  # halp: iterative_halp's target, random's table
        else:
            s = json.loads(path.read_text())
            missing = [v for v in ONESHOT if f"oneshot_{v}" not in s and f"oneshot_{v}" in self.a.methods]
            if not missing or "error" in s.get("oneshot_halp", {}):
                return s
            # a method added after the pass: its plan, then every static method already there timed
            # again beside it in one interleaved pass (between processes, ratios drift)
            self._plans(budget, missing, s)
            s.setdefault("retimed", []).append(self._retime(s))
        write_json_atomic(path, s)
        return s

    def _plans(self, budget: float, values: list[str], s: dict) -> dict:
        g, b, plans = self.dense_art.graph, self.cfg.budget, {}
        for v in values:
            pc = PlanConfig(**ONESHOT[v])
            try:
                cal = plan_to_budget(g, self.table, budget, pc, self.backend, b.calibrate_iters,
                                     (b.window_low, b.window_high), b.timing, batches=self.batches(self.data.train, 32),
                                     held_out=self.batches(self.data.val, max(pc.held_out_batches, 4)))
            except BudgetBelowFloor as e:
                s[f"oneshot_{v}"] = {"error": str(e)}
                continue
            plans[v] = cal
            s[f"oneshot_{v}"] = {"plan": cal.plan.to_dict(), "measured_ratio": cal.measured_ratio,
                                 "value_cost": cal.plan.value_cost, "search": cal.plan.search.get("cost")}
            print(f"{budget} oneshot_{v}: measured {cal.measured_ratio:.3f}", flush=True)
        return plans

    def _retime(self, s: dict, rounds: int = 2) -> dict:
        methods = [m for m in METHODS if m != "iterative_halp" and "error" not in s.get(m, {"error": ""})]
        models = {m: self.build(m, s) for m in methods}
        out = {m: [] for m in methods}
        for _ in range(rounds):
            for m in methods:
                out[m].append(measure_speedup(self.backend, self.dense, models[m], self.shape, FINAL).ratio)
        print("retimed: " + ", ".join(f"{m} {np.median(r):.3f}" for m, r in out.items()), flush=True)
        return {"time": _now(), "ratios": out}

    def _structures(self, budget: float, values: list[str]) -> dict:
        g = self.dense_art.graph
        s: dict = {"budget": budget, "time": _now()}
        plans = self._plans(budget, values, s)
        if "halp" not in plans:  # below the smallest reachable latency on this machine: no cells
            print(f"budget {budget} skipped: {s['oneshot_halp']['error']}", flush=True)
            return s
        aim_by = self.a.aim if self.a.aim.removeprefix("oneshot_") in plans else "oneshot_halp"
        aim = plans[aim_by.removeprefix("oneshot_")].measured_ratio
        s["aim_method"] = aim_by
        for name, glob in (("tp_uniform_r8", False), ("tp_global_r8", True)):
            if name not in self.a.methods and name != BASELINE:
                continue
            best, trace = match_latency(self.dense, aim, self.backend, self.shape, SEARCH, 8, glob)
            s[name] = {"pruning_ratio": best["pruning_ratio"], "measured_ratio": best["measured_ratio"],
                       "within_3pct": abs(best["measured_ratio"] / aim - 1) <= 0.03, "trace": trace}
            print(f"{budget} {name}: ratio {best['pruning_ratio']:.3f}, measured {best['measured_ratio']:.3f} "
                  f"(aim {aim:.3f})", flush=True)
        if "random" not in self.a.methods:
            s["aim_ratio"] = aim
            s["e2e"] = plans["halp"].table.e2e.to_dict()
            return s
        target = plans["halp"].plan.predicted_ms
        w = random_widths(g, plans["halp"].table, target, 8, seed=int(budget * 1000))
        s["random"] = {"widths": w, "target_ms": target}
        s["random"]["measured_ratio"] = measure_speedup(self.backend, self.dense, self.build("random", s),
                                                        self.shape, self.cfg.budget.timing).ratio
        s["aim_ratio"] = aim
        s["e2e"] = plans["halp"].table.e2e.to_dict()
        return s

    def build(self, method: str, s: dict) -> torch.nn.Module:
        if method.startswith("oneshot_"):
            return apply_plan_(copy.deepcopy(self.dense), PruningPlan.from_dict(s[method]["plan"]), self.shape)
        if method.startswith("tp_"):
            return tp_pruned(self.dense, s[method]["pruning_ratio"], self.shape, 8, method == "tp_global_r8")
        if method == "random":
            plan = magnitude_plan(self.dense_art.graph, self.table, s["random"]["widths"],
                                  s["random"].get("target_ms", float("nan")))  # older passes: not recorded
            return apply_plan_(copy.deepcopy(self.dense), plan, self.shape)
        raise ValueError(method)

    # ---- 2. cells ----
    def cell(self, method: str, budget: float, seed: int, s: dict) -> dict:
        path = self.out / "cells" / f"{method}-{budget}-{seed}.json"
        if path.exists():
            return json.loads(path.read_text())
        t0 = time.perf_counter()
        recal = self.batches(self.data.train, 8)
        row: dict = {"method": method, "budget": budget, "seed": seed}
        if method == "iterative_halp":
            m = copy.deepcopy(self.dense)
            sched = ScheduleConfig(warmup_epochs=0.25, prune_steps=10, prune_every=30, sharpness_rho=0.0,
                                   recalibrate_batches=8)
            used = int(round(sched.warmup_epochs * self.per_epoch)) + sched.prune_steps * sched.prune_every
            ft = dataclasses.replace(self.ft, epochs=max(self.a.epochs - used / self.per_epoch, 0.0))
            final = PruningPlan.from_dict(s["oneshot_halp"]["plan"])
            table = self.table.with_e2e(EndToEnd.from_dict(s["e2e"]))
            b = self.cfg.budget

            def timer(pairs):
                return lambda mm: measure_speedup(self.backend, self.dense, copy.deepcopy(mm).eval(), self.shape,
                                                  pairs).ratio

            goal = LatencyGoal(timer(b.timing), budget, (b.window_low, b.window_high),
                               measure_step=timer(LIGHT_TIMING))
            res = train_and_prune_(m, self.data, table, final,
                                   TrainPruneConfig(PlanConfig(importance="halp"), sched, OptimizerConfig(method="sgd"),
                                                    ft), self.shape, seed=seed, progress=False, goal=goal)
            row["after_pruning"] = res.history[-1]["val_accuracy_after_removal"]
            row["after_pruning_split"] = "val"
            row["steps"] = [{k: h[k] for k in ("step", "predicted_ratio", "measured_ratio", "params",
                                               "val_accuracy_after_removal")} for h in res.history]
            row["corrections"] = res.corrections
            row["iterations"] = used + int(round(ft.epochs * self.per_epoch)) + sum(
                sched.correct_iters for c in res.corrections if c["action"] == "removed")
        else:
            m = self.build(method, s)
            row["after_pruning"] = evaluate(bn_recalibrated(m, recal), self.data, self.data.test)
            row["after_pruning_split"] = "test"
            train(m, self.data, self.ft, seed=seed, progress=False, desc=method)
            row["iterations"] = int(round(self.ft.epochs * self.per_epoch))
        m.eval()
        macs, params = tp.utils.count_ops_and_params(m, torch.zeros(1, *self.shape))
        sp = measure_speedup(self.backend, self.dense, m, self.shape, FINAL)
        row.update({"accuracy": evaluate(m, self.data, self.data.test), "measured_ratio": sp.ratio,
                    "pair_ratios": sp.repeats, "structure_ratio": s.get(method, {}).get("measured_ratio"),
                    "params": int(params), "macs": int(macs), "widths": output_channels(m),
                    "wall_s": time.perf_counter() - t0, "time": _now()})
        write_json_atomic(path, row)
        print(f"{budget} {method} seed {seed}: accuracy {row['accuracy']:.4f} (after pruning "
              f"{row['after_pruning']:.4f}), measured {sp.ratio:.3f}, {row['wall_s']:.0f} s", flush=True)
        return row


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def paired(rows: list[dict], method: str, budget: float, seeds) -> dict | None:
    by = {(r["method"], r["seed"]): r["accuracy"] for r in rows if r["budget"] == budget}
    d = np.array([by[(method, s)] - by[(BASELINE, s)] for s in seeds if (method, s) in by and (BASELINE, s) in by])
    return paired_ci(d) if len(d) >= 2 else None


def paired_ci(d: np.ndarray, n_boot: int = 10_000) -> dict:
    """Mean of the per-seed differences ``d`` and a bootstrap 95 % interval of it."""
    idx = np.random.default_rng(0).integers(0, len(d), size=(n_boot, len(d)))
    lo, hi = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    return {"mean": float(d.mean()), "ci95": [float(lo), float(hi)], "n": int(len(d)), "per_seed": d.tolist(),
            "win": bool(lo > 0), "loss": bool(hi < 0)}


def report(out: Path, rows: list[dict], budgets, seeds, methods, dense_acc: float, meta: dict) -> None:
    lines = ["| budget | method | measured / dense | params | MACs (M) | after pruning | after training | "
             f"paired diff vs {BASELINE} (95 % CI) | seeds |", "|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    summary = []
    for b in budgets:
        for m in methods:
            rs = [r for r in rows if r["budget"] == b and r["method"] == m]
            if not rs:
                continue
            acc = np.array([r["accuracy"] for r in rs])
            pr = np.array([r["after_pruning"] for r in rs])
            lat = np.array([r["measured_ratio"] for r in rs])
            p = paired(rows, m, b, seeds) if m != BASELINE else None
            summary.append({"budget": b, "method": m, "seeds": [r["seed"] for r in rs],
                            "measured_ratio": float(lat.mean()), "params": float(np.mean([r["params"] for r in rs])),
                            "macs": float(np.mean([r["macs"] for r in rs])), "accuracy_mean": float(acc.mean()),
                            "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                            "after_pruning_mean": float(pr.mean()), "paired_vs_baseline": p,
                            "widths": rs[0]["widths"]})
            pd = "" if p is None else f"{p['mean']:+.4f} ({p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f})"
            lines.append(f"| {b} | {m} | {lat.mean():.3f} | {summary[-1]['params']:,.0f} | "
                         f"{summary[-1]['macs'] / 1e6:.2f} | {pr.mean():.4f} | {acc.mean():.4f} +- "
                         f"{summary[-1]['accuracy_std']:.4f} | {pd} | {len(rs)} |")
    write_json_atomic(out / "front.json", {**meta, "dense_accuracy": dense_acc, "summary": summary, "rows": rows})
    md = "\n".join([f"Dense test accuracy {dense_acc:.4f}. After pruning: BatchNorm re-estimated, test set "
                    "(iterative_halp: validation set, after the last removal).", "", *lines, ""])
    write_bytes_atomic(out / "front.md", md.encode())
    print(md)
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        if rs:
            ax.scatter([r["measured_ratio"] for r in rs], [r["accuracy"] for r in rs], label=m, s=18)
    ax.axhline(dense_acc, color="gray", lw=0.8, ls="--", label="dense")
    ax.set_xlabel("measured latency / dense (ORT CPU)")
    ax.set_ylabel("test accuracy after training")
    ax.legend(fontsize=7)
    save_png(fig, out / "front.png")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet20")
    p.add_argument("--weights", default=None,
                   help="the dense model's state dict (default: the bundled one, else latprune's pre-training)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--epochs", type=float, default=2.0, help="training per cell, pruning iterations included")
    p.add_argument("--train-subset", type=int, default=0)
    p.add_argument("--out", default="runs/bench-front")
    p.add_argument("--aim", default="oneshot_search", choices=[f"oneshot_{v}" for v in ONESHOT],
                   help="the latprune plan whose measured latency the torch-pruning baselines are bisected to "
                        "(oneshot_halp when that plan is not among --methods)")
    p.add_argument("--retime", type=int, default=0, metavar="ROUNDS",
                   help="after the cells, time every static structure again in one interleaved pass of ROUNDS rounds")
    p.add_argument("--probe", action="store_true", help="print the cell count and an ETA, then exit")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in ("latprune.pipeline.search", "latprune.pipeline.calibrate"):
        logging.getLogger(name).setLevel(logging.INFO)
    bench = Bench(a)
    cells = [(m, b, s) for b in a.budgets for s in a.seeds for m in a.methods]
    todo = [c for c in cells if not (bench.out / "cells" / f"{c[0]}-{c[1]}-{c[2]}.json").exists()]
    if a.probe:
        m = copy.deepcopy(bench.dense)
        t0 = time.perf_counter()
        train(m, bench.data, dataclasses.replace(bench.ft, epochs=20 / bench.per_epoch), progress=False)
        it_s = (time.perf_counter() - t0) / 20
        per_cell = it_s * a.epochs * bench.per_epoch * 0.8 + 40  # pruned models train faster; + timing
        print(f"{len(cells)} cells, {len(todo)} to run; dense training {it_s:.3f} s/iteration; about "
              f"{per_cell / 60:.1f} min a cell, {len(todo) * per_cell / 3600:.1f} h in all (plus the structure passes)")
        return
    dense_acc = evaluate(bench.dense, bench.data, bench.data.test)
    structures = {b: bench.structures(b) for b in a.budgets}  # every timing pass before any training
    rows = []
    for m, b, s in cells:
        if "error" not in structures[b].get("oneshot_halp", {}):
            rows.append(bench.cell(m, b, s, structures[b]))
    for b in a.budgets if a.retime else ():  # every static structure timed again, interleaved, after training
        if "error" not in structures[b].get("oneshot_halp", {}):
            structures[b].setdefault("retimed", []).append(bench._retime(structures[b], a.retime))
            write_json_atomic(bench.out / f"structures-{b}.json", structures[b])
    meta = {"command": "python benchmarks/front.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(a).items()
        if k not in ("probe", "retime") and v is not None), "dense": bench.dense_art.info,
            "finetune": dataclasses.asdict(bench.ft),
            "structures": structures, "environment": environment(), "time": _now()}
    report(bench.out, rows, a.budgets, a.seeds, a.methods, dense_acc, meta)


if __name__ == "__main__":
    main()
