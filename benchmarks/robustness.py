"""AdaSAP tested fairly (issue 12): clean and corrupted accuracy of pruned models, paired by seed.

    python benchmarks/robustness.py [--budgets 0.5] [--methods sgd asam adasap sgd_matched]
                                    [--seeds 0 1 2 3 4] [--train-subset 0] [--warmup-epochs 1]
                                    [--finetune-epochs 2] [--prune-steps 10] [--prune-every 30]
                                    [--robust-images 2000] [--out runs/bench-robustness-12]
                                    [--results benchmarks/results/robustness-12] [--probe]

Rows: the dense model (the bundled ResNet-20 unless ``--weights``), then SGD + HALP, ASAM + HALP,
AdaSAP_L and a compute-matched SGD + HALP (``sgd_matched``: as many gradient evaluations as
AdaSAP, its extra steps in fine-tuning) at each latency budget. Columns: measured latency,
params, test accuracy (whole test set), and on the first ``--robust-images`` test images the clean
accuracy, the corruption accuracy over all 15 corruptions and over the informative ones (the dense
model above 1.5 x chance, ``pipeline.robustness``), R_C, the validation accuracy right after the
last removal (and the validation loss), sharpness after warm-up and after the last removal, and the
step-time ratio. Then
per-seed paired differences against SGD + HALP: mean, bootstrap 95 % interval, sign count, and the
smallest difference these seeds could detect (2.8 x the SD of the paired differences / sqrt(n):
80 % power at a two-sided 5 % level, normal approximation).

Paired by design: every cell starts from one dense model; every method at a budget trains the
same architecture (the budget's plan is made and timed once, copied into each cell's run
directory, ``--floor-widths`` holds every removal at its widths and ``--correct-steps 0`` leaves no
corrective removal to differ), along the same schedule (one learning-rate schedule over the three
phases), and seed s gives every method the same data order. Only the optimizer differs.

Hours of CPU, over several sessions: every cell is a ``latprune run`` in its own run directory under
``--out`` (scratch; a killed cell resumes from its training checkpoint there), and its summary is
written to ``--results``, which is kept in git: a cell whose summary is there is never run again,
so the benchmark resumes on a clean checkout. ``--probe`` times 20 training iterations and prints
the cell count and an ETA first. Run it in the background.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from front import paired_ci

from latprune.io import write_json_atomic
from latprune.latency_tables.device import environment
from latprune.pipeline.config import RunConfig
from latprune.pipeline.stages import dense_stage, prepare
from latprune.pipeline.train import TrainConfig, train

BASELINE = "sgd"
TRAIN_IMAGES = 55_000  # Fashion-MNIST's training split less the 5,000 validation images


def _latprune(*args: str, log: Path) -> int:
    with open(log, "a") as f:
        f.write(f"\n$ latprune {' '.join(args)}\n")
        f.flush()
        return subprocess.run([sys.executable, "-m", "latprune.cli", *args], stdout=f,
                              stderr=subprocess.STDOUT).returncode


def parser(doc: str, results: str) -> argparse.ArgumentParser:
    """The flags every cell shares (this benchmark's and ``rho_sweep.py``'s)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--weights", default=None, help="the dense model (default: the bundled ResNet-20)")
    p.add_argument("--train-subset", type=int, default=0)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--finetune-epochs", type=float, default=2.0)
    p.add_argument("--prune-steps", type=int, default=10)
    p.add_argument("--prune-every", type=int, default=30)
    p.add_argument("--robust-images", type=int, default=2000)
    p.add_argument("--out", default="runs/bench-robustness-12", help="scratch: the plan and every cell's run directory")
    p.add_argument("--results", default=results,
                   help="each finished cell's summary (JSON, kept in git so that the benchmark resumes in a "
                        "later session on a clean checkout) and the aggregate")
    p.add_argument("--probe", action="store_true", help="time 20 training iterations, print the ETA, exit")
    return p


@dataclasses.dataclass(frozen=True)
class Arm:
    """One row of the benchmark: a ``latprune run --method`` and its own flags."""
    label: str
    method: str
    flags: tuple[str, ...] = ()
    finetune_epochs: float | None = None  # None: --finetune-epochs
    cost: float = 1.0  # gradient evaluations per step, for the ETA

    def finetune(self, a) -> float:
        return a.finetune_epochs if self.finetune_epochs is None else self.finetune_epochs


def arms(a) -> dict[str, Arm]:
    _, prune_epochs = _epochs(a)
    # AdaSAP evaluates two gradients a step in every phase: the matched SGD takes the difference in fine-tuning
    matched_ft = 2 * a.finetune_epochs + a.warmup_epochs + prune_epochs
    return {"sgd": Arm("SGD + HALP", "sgd"), "sam": Arm("SAM + HALP", "sam", cost=2.0),
            "asam": Arm("ASAM + HALP", "asam", cost=2.0), "adasap": Arm("AdaSAP_L", "adasap", cost=2.0),
            "sgd_matched": Arm("SGD + HALP, compute-matched", "sgd", finetune_epochs=matched_ft)}


def _epochs(a) -> tuple[int, float]:
    per_epoch = math.ceil((a.train_subset or TRAIN_IMAGES) / 128)
    return per_epoch, a.prune_steps * a.prune_every / per_epoch


def cell_flags(a, extra=()) -> list[str]:
    return ["--no-progress", *(["--weights", a.weights] if a.weights else []), "--train-subset", str(a.train_subset),
            "--warmup-epochs", str(a.warmup_epochs), "--prune-steps", str(a.prune_steps), "--prune-every",
            str(a.prune_every), "--robust-images", str(a.robust_images), "--floor-widths", "--correct-steps", "0",
            *extra]


def run_cells(a, table: dict[str, Arm], names: list[str], flags: list[str]) -> tuple[list[dict], dict | None]:
    """Every (budget, seed, arm) cell: a ``latprune run`` in OUT, its summary in RESULTS (skipped once there)."""
    out, results = Path(a.out), Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    (results / "cells").mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    cells, dense = [], None
    for b in a.budgets:
        todo = [(s, m) for s in a.seeds for m in names if not _summary(results, b, m, s).exists()]
        plan = _plan(a, b, flags, log) if todo else None
        if todo and plan is None:
            continue
        for s in a.seeds:
            for m in names:
                path = _summary(results, b, m, s)
                if not path.exists():
                    arm, d = table[m], out / f"b{b}-{m}-s{s}"
                    if not (d / "plan.json").exists():  # the budget's plan, timed once, shared by all cells
                        d.mkdir(parents=True, exist_ok=True)
                        for f in PLAN_FILES:
                            shutil.copy2(plan / f, d / f)
                    ft = arm.finetune(a)
                    t0 = time.time()
                    code = _latprune("run", "--budget", str(b), "--method", arm.method, "--seed", str(s), "--out",
                                     str(d), "--finetune-epochs", str(ft), "--table", str(plan / "table.json"),
                                     *flags, *arm.flags, log=log)
                    print(f"cell b{b} {m} seed {s}: exit {code}, {time.time() - t0:.0f} s", flush=True)
                    if code not in (0, 4):
                        continue
                    r = json.loads((d / "report.json").read_text())
                    write_json_atomic(path, {"budget": b, "method": m, "seed": s, "arm": dataclasses.asdict(arm),
                                             "finetune_epochs": ft, **_cell(r), "dense": _dense(r),
                                             "environment": r.get("environment"), "time": _now()})
                c = json.loads(path.read_text())
                cell_dense = c.pop("dense")
                dense = dense or cell_dense  # every cell starts from the same dense model
                cells.append(c)
    return cells, dense


PLAN_FILES = ("plan.json", "calibration.json", "table.json", "stages.json")


def _plan(a, b: float, flags: list[str], log: Path) -> Path | None:
    """The budget's plan, made and timed once: kept in RESULTS/plan-bB (plan, calibration, the latency
    table it was made with, its stage key) so that a later session trains the same architecture
    (its cells load that table: another machine's fingerprint is refused, not mixed)."""
    kept = Path(a.results) / f"plan-b{b}"
    if all((kept / f).exists() for f in PLAN_FILES):
        return kept
    base = Path(a.out) / f"plan-b{b}"
    if not (base / "calibration.json").exists():  # the plan made from the table file the cells will load
        table = Path(a.out) / "table" / "table.json"
        code = 0 if table.exists() else _latprune("profile", "--out", str(table.parent), *flags, log=log)
        code = code or _latprune("plan", "--budget", str(b), "--out", str(base), "--table", str(table), *flags, log=log)
        if code:
            print(f"budget {b}: planning failed (exit {code}), see {log}")
            return None
    kept.mkdir(parents=True, exist_ok=True)
    for f in ("plan.json", "calibration.json", "table.json"):
        shutil.copy2(base / f, kept / f)
    key = json.loads((base / "stages.json").read_text())["plan"]
    write_json_atomic(kept / "stages.json", {"plan": key})  # the plan stage's key alone: the cells train anew
    return kept


def _summary(results: Path, b: float, m: str, s: int) -> Path:
    return results / "cells" / f"b{b}-{m}-s{s}.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def main() -> None:
    p = parser(__doc__, "benchmarks/results/robustness-12")
    p.add_argument("--methods", nargs="+", default=["sgd", "asam", "adasap", "sgd_matched"],
                   choices=["sgd", "sam", "asam", "adasap", "sgd_matched"])
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more latprune run flags for every cell (e.g. --sam-every 2, --neuron-score magnitude)")
    a = p.parse_args()
    table = arms(a)
    if a.probe:
        probe(a, table, a.methods)
        return
    cells, dense = run_cells(a, table, a.methods, cell_flags(a, a.extra))
    finish(a, table, cells, dense, BASELINE, "robustness.json")


def finish(a, table: dict[str, Arm], cells: list[dict], dense: dict | None, baseline: str, name: str) -> None:
    rows = _aggregate(cells, list(table))
    paired = _paired(cells, baseline)
    result = {"scale": vars(a), "dense": dense, "arms": {k: dataclasses.asdict(v) for k, v in table.items()},
              "rows": rows, "paired": paired, "cells": cells, "environment": environment(), "time": _now()}
    write_json_atomic(Path(a.results) / name, result)
    _print(dense, rows, paired, table, baseline)
    print(f"wrote {Path(a.results) / name}")


def probe(a, table: dict[str, Arm], names: list[str]) -> None:
    """Time 20 dense SGD iterations; print the cells still to run and an ETA."""
    per_epoch, prune_epochs = _epochs(a)
    todo = [(b, s, m) for b in a.budgets for s in a.seeds for m in names
            if not _summary(Path(a.results), b, m, s).exists()]
    cfg = RunConfig().with_overrides(weights=a.weights, out=f"{a.out}/probe", progress=False)
    inp, rd = prepare(cfg)
    dense, data = dense_stage(inp, rd), inp.data
    m = copy.deepcopy(dense.model)
    t0 = time.perf_counter()
    train(m, data, TrainConfig(epochs=20 / per_epoch), progress=False)
    it_s = (time.perf_counter() - t0) / 20

    def iters(arm: Arm) -> float:
        return per_epoch * (a.warmup_epochs + arm.finetune(a)) + a.prune_steps * a.prune_every

    # pruned models train faster after the removals; + the corruption evaluation and the final timing
    secs = sum(0.75 * it_s * iters(table[m]) * table[m].cost + 120 for _, _, m in todo)
    print(f"{len(todo)} cells to run; dense SGD {it_s:.3f} s/iteration; about {secs / 3600:.1f} h "
          f"(plus one plan per budget)")


def _cell(r: dict) -> dict:
    rob, c, t = r["robustness"], r["compact"], r["training"]
    last = (t.get("prune_history") or [{}])[-1]
    return {"latency_ms": c["latency_ms"], "ratio": c["latency_ms"] / r["dense"]["latency_ms"],
            "speedup": r["speedup"], "met": r["budget"]["met"], "params": c["params"], "test_acc": c["accuracy"],
            "clean_acc": rob["clean_acc"], "corruption_acc": rob["corruption_acc"],
            "informative_acc": rob["informative_acc"], "informative": rob["informative"], "R_C": rob["R_C"],
            "per_corruption": rob["per_corruption"], "step_time_ratio": t["step_time_ratio"],
            "after_pruning": last.get("val_accuracy_after_removal"),
            "after_pruning_loss": last.get("val_loss_after_removal"),
            "sharpness_pre": (t.get("sharpness") or {}).get("pre_pruning"),
            "sharpness_post": (t.get("sharpness") or {}).get("post_pruning"),
            "train_s": r["stage_seconds"].get("train_and_prune")}


def _dense(r: dict) -> dict:
    rob = r["robustness"]["dense"]
    return {"latency_ms": r["dense"]["latency_ms"], "params": r["dense"]["params"], "test_acc": r["dense"]["accuracy"],
            "clean_acc": rob["clean_acc"], "corruption_acc": rob["corruption_acc"],
            "informative_acc": rob["informative_acc"], "informative": rob["informative"], "R_C": rob["R_C"]}


METRICS = ("test_acc", "clean_acc", "corruption_acc", "informative_acc", "after_pruning", "after_pruning_loss")
LOWER_IS_BETTER = ("after_pruning_loss",)


def _aggregate(cells: list[dict], order: list[str]) -> list[dict]:
    rows = []
    for key in sorted({(c["budget"], c["method"]) for c in cells}, key=lambda k: (-k[0], order.index(k[1]))):
        cs = [c for c in cells if (c["budget"], c["method"]) == key]
        row = {"budget": key[0], "method": key[1], "seeds": len(cs), "met": sum(c["met"] for c in cs)}
        for f in ("latency_ms", "ratio", "params", "R_C", "step_time_ratio", "sharpness_pre", "sharpness_post",
                  *METRICS):
            v = np.array([np.nan if c.get(f) is None else c[f] for c in cs], dtype=float)
            row[f] = [float(np.nanmean(v)), float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0]
        rows.append(row)
    return rows


def _paired(cells: list[dict], baseline: str) -> list[dict]:
    """Per budget, method and metric: the per-seed differences against ``baseline``, their mean,
    bootstrap 95 % interval, sign count and the smallest difference these seeds could detect."""
    out = []
    by = {(c["budget"], c["method"], c["seed"]): c for c in cells}
    for b, m in sorted({(c["budget"], c["method"]) for c in cells if c["method"] != baseline}):
        seeds = sorted(s for (bb, mm, s) in by if (bb, mm) == (b, m) and (b, baseline, s) in by)
        if len(seeds) < 2:
            continue
        for f in METRICS:
            d = np.array([by[(b, m, s)][f] - by[(b, baseline, s)][f] for s in seeds
                          if by[(b, m, s)].get(f) is not None and by[(b, baseline, s)].get(f) is not None])
            if len(d) < 2:
                continue
            ci = paired_ci(d)
            out.append({"budget": b, "method": m, "metric": f, **ci, "positive": int((d > 0).sum()),
                        "detectable": float(2.8 * d.std(ddof=1) / np.sqrt(len(d)))})
    return out


def _print(dense: dict | None, rows: list[dict], paired: list[dict], table: dict[str, Arm], baseline: str) -> None:
    def pm(x, nd=4):
        return f"{x[0]:.{nd}f} +- {x[1]:.{nd}f}"

    if dense:
        print(f"dense: test {dense['test_acc']:.4f}, clean {dense['clean_acc']:.4f}, corruption "
              f"{dense['corruption_acc']:.4f}, informative {dense['informative_acc']:.4f} "
              f"({', '.join(dense['informative'])})")
    print(f"{'budget':>6} {'method':<28} {'n':>2} {'ratio':>14} {'params':>8} {'test acc':>16} {'corr acc (15)':>16} "
          f"{'corr acc (inf.)':>16} {'after pruning':>16} {'step x':>6}")
    for r in rows:
        print(f"{r['budget']:>6} {table[r['method']].label:<28} {r['seeds']:>2} {pm(r['ratio'], 3):>14} "
              f"{r['params'][0]:>8.0f} {pm(r['test_acc']):>16} {pm(r['corruption_acc']):>16} "
              f"{pm(r['informative_acc']):>16} {pm(r['after_pruning']):>16} {r['step_time_ratio'][0]:>6.2f}")
    for q in paired:
        print(f"{q['budget']} {table[q['method']].label} - {table[baseline].label}, {q['metric']}: {q['mean']:+.4f} "
              f"({q['ci95'][0]:+.4f}, {q['ci95'][1]:+.4f}), {q['positive']}/{q['n']} seeds positive, "
              f"detectable +-{q['detectable']:.4f}{_verdict(q)}")


def _verdict(q: dict) -> str:
    better, worse = ("loss", "win") if q["metric"] in LOWER_IS_BETTER else ("win", "loss")
    return " WIN" if q[better] else " LOSS" if q[worse] else ""


if __name__ == "__main__":
    main()
