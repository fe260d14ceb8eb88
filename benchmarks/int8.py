"""Int8 in the loop (issue 14): what int8 buys on ONNX Runtime's CPU provider, how well an int8 table
predicts, and what `latprune run --precision int8` delivers against the same run in fp32.

    python benchmarks/int8.py [--parts speed symmetry tables runs] [--seeds 0] [--budgets 0.5]
                              [--threads 2] [--out runs/bench-int8] [--results benchmarks/results/int8]
                              [--run-flags LATPRUNE_RUN_FLAGS...]

- ``speed``: per case (ResNet-20 and ResNet-56 at 32x32, batch 32; torchvision ResNet-18 and
  MobileNetV2 at 224x224, batch 1) the dense model in fp32, in ONNX Runtime's int8 form (uint8
  activations, U8S8) and in TensorRT's form (signed symmetric activations, S8S8), timed side by side
  (``latency_tables.endtoend.measure_side_by_side``: 11 interleaved rounds of 0.4 s, 3 sets of
  fresh sessions), each as a ratio to fp32 with its 95 % interval. Random weights and random-normal
  calibration: latency does not depend on either.
- ``symmetry``: the bundled ResNet-20's test accuracy in fp32 and in both int8 forms, calibrated on
  512 training images (what symmetric activations cost in accuracy).
- ``tables``: per case the table built in fp32 and in int8 and its prediction error on 10 random
  pruned configurations (``benchmarks/table_accuracy.measure_case``).
- ``runs``: ``latprune run --budget B`` in fp32 and with ``--precision int8`` on the embedded
  default (bundled ResNet-20, Fashion-MNIST), one run per budget and seed: measured latency /
  budget, and the accuracy of dense fp32, dense int8, compact fp32 and compact int8 (a budget the
  run refuses, e.g. below the int8 model's reachable floor, is recorded with its one-line reason).

Every part writes one JSON per cell under ``--results`` (kept in git) and skips cells already
there, so the benchmark resumes; ``--out`` holds the runs' directories (scratch).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import torch
from table_accuracy import measure_case

from latprune.export.int8 import OnnxClassifier
from latprune.io import write_bytes_atomic, write_json_atomic
from latprune.latency_tables.device import environment
from latprune.latency_tables.endtoend import PairConfig, measure_side_by_side
from latprune.latency_tables.runtimes import get_backend
from latprune.latency_tables.runtimes.convert import onnx_bytes
from latprune.latency_tables.runtimes.quantize import ORT_CPU, TENSORRT, quantize_int8
from latprune.models.registry import ModelSpec, bundled_weights
from latprune.pipeline.config import RunConfig
from latprune.pipeline.data import load_dataset
from latprune.pipeline.train import evaluate

SPEED_CASES = ["resnet20:32:32", "resnet56:32:32", "resnet18:224:1", "mobilenet_v2:224:1"]
TABLE_CASES = ["resnet20:32:32:8", "resnet56:32:32:8", "resnet18:224:1:64", "mobilenet_v2:224:1:64"]
TIMING = PairConfig(rounds=11, min_round_s=0.4, repeats=3, max_repeats=3)
FORMS = {"int8_u8s8": ORT_CPU, "int8_s8s8": TENSORRT}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _cell(path: Path, make) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    r = {**make(), "environment": environment(), "time": _now()}
    write_json_atomic(path, r)
    return r


def speed(case: str, threads: int) -> dict:
    name, size, batch = case.split(":")
    size, batch = int(size), int(batch)
    shape = (3, size, size)
    fp32 = onnx_bytes(ModelSpec(name, 10).build().eval(), (batch, *shape))
    x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
    models = {"fp32": fp32, **{k: quantize_int8(onnx.load_from_string(fp32), [x], q) for k, q in FORMS.items()}}
    r = measure_side_by_side(get_backend("ort", threads, batch), models, shape, TIMING)
    return {"case": case, "threads": threads, "timing": TIMING.__dict__,
            "models": {k: {"ms": v["ms"], "ratio": v["ratio"], "ratio_ci95": v["ratio_ci95"], "cv": v["cv"],
                           "median_ms": v["median_ms"]} for k, v in r.items()}}


def symmetry(out: Path) -> dict:
    cfg = RunConfig()
    data = load_dataset(cfg.data)
    spec = ModelSpec("resnet20", data.num_classes)
    model = spec.build()
    model.load_state_dict(torch.load(bundled_weights("resnet20", data.name, 10), weights_only=True))
    model.eval()
    shape = (32, *data.input_shape)
    fp32 = onnx_bytes(model, shape)
    rng = np.random.default_rng(0)
    calib = [x.numpy() for x, _ in data.batches(data.train, 32, shuffle=True, rng=rng, limit=512)]
    acc = {"fp32": evaluate(model, data, data.test)}
    for k, q in FORMS.items():
        path = write_bytes_atomic(out / f"resnet20-{k}.onnx", quantize_int8(onnx.load_from_string(fp32), calib, q))
        acc[k] = evaluate(OnnxClassifier(path), data, data.test)
    return {"model": "resnet20 (bundled)", "data": data.name, "calibration_images": 512, "test_images": len(data.test),
            "accuracy": acc}


def run_cell(precision: str, seed: int, budget: float, out: Path, flags: list[str]) -> dict:
    d = out / f"run-{precision}-b{budget}-s{seed}"
    args = [sys.executable, "-m", "latprune.cli", "run", "--budget", str(budget), "--seed", str(seed), "--out", str(d),
            "--no-progress", "--precision", precision, *flags]
    log = out / f"run-{precision}-b{budget}-s{seed}.log"
    with open(log, "a") as f:
        rc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc == 2:  # refused as bad input (e.g. a budget below the reachable floor): a result, recorded
        error = [line for line in log.read_text().splitlines() if line.startswith("latprune: error")]
        return {"precision": precision, "seed": seed, "budget": budget, "flags": flags, "exit": rc,
                "refused": error[-1:]}
    if rc not in (0, 4):
        raise SystemExit(f"latprune run failed with exit {rc}: see {log}")
    r = json.loads((d / "report.json").read_text())
    q = r.get("int8") or {}
    return {"precision": precision, "seed": seed, "budget": budget, "flags": flags, "exit": rc,
            "met": r["budget"]["met"],
            "dense_ms": r["dense"]["latency_ms"], "compact_ms": r["compact"]["latency_ms"],
            "target_ms": r["budget"]["target_ms"], "ratio": r["compact"]["latency_ms"] / r["dense"]["latency_ms"],
            "speedup_ci95": r["speedup_ci95"], "params": r["compact"]["params"],
            "accuracy": {"dense_fp32": r["dense"]["accuracy"], "compact_fp32": r["compact"]["accuracy"],
                         "dense_int8": (q.get("dense") or {}).get("accuracy"),
                         "compact_int8": (q.get("compact") or {}).get("accuracy")},
            "corruption": {"dense_fp32": (r.get("robustness") or {}).get("dense", {}).get("corruption_acc"),
                           "compact_fp32": (r.get("robustness") or {}).get("corruption_acc"),
                           "dense_int8": ((q.get("dense") or {}).get("robustness") or {}).get("corruption_acc"),
                           "compact_int8": ((q.get("compact") or {}).get("robustness") or {}).get("corruption_acc")},
            "latencies": q.get("latencies"), "int8_parity": (q.get("parity") or {}).get("top1_agreement"),
            "stage_seconds": r["stage_seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["speed", "symmetry", "tables", "runs"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5])
    p.add_argument("--precisions", nargs="+", default=["fp32", "int8"], help="runs: the precisions run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--speed-cases", nargs="+", default=SPEED_CASES)
    p.add_argument("--table-cases", nargs="+", default=TABLE_CASES)
    p.add_argument("--run-flags", nargs=argparse.REMAINDER, default=[],
                   help="more `latprune run` flags for the runs (last on the line), e.g. the demo's shorter schedule")
    p.add_argument("--out", default="runs/bench-int8")
    p.add_argument("--results", default="benchmarks/results/int8")
    a = p.parse_args()
    out, res = Path(a.out), Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    res.mkdir(parents=True, exist_ok=True)
    if "speed" in a.parts:
        for case in a.speed_cases:
            r = _cell(res / f"speed-{case.replace(':', '-')}.json", lambda: speed(case, a.threads))
            print(f"speed {case}: " + ", ".join(f"{k} {v['ms']:.3f} ms ({v['ratio']:.3f} of fp32, "
                                                 f"{v['ratio_ci95'][0]:.3f}-{v['ratio_ci95'][1]:.3f})"
                                                 for k, v in r["models"].items()), flush=True)
    if "symmetry" in a.parts:
        r = _cell(res / "symmetry-accuracy.json", lambda: symmetry(out))
        print("symmetry: " + ", ".join(f"{k} {v:.4f}" for k, v in r["accuracy"].items()), flush=True)
    if "tables" in a.parts:
        for case in a.table_cases:
            for precision in ("fp32", "int8"):
                r = _cell(res / f"table-{case.replace(':', '-')}-{precision}.json",
                          lambda: measure_case(case, "ort", a.threads, 10, precision, out))
                print(f"table {case} {precision}: {r['entries']} entries in {r['build_s']:.0f} s, median error "
                      f"{100 * r['median_rel_err']:.1f} %, p90 {100 * r['p90_rel_err']:.1f} %", flush=True)
    if "runs" in a.parts:
        for budget in a.budgets:
            for seed in a.seeds:
                for precision in a.precisions:
                    r = _cell(res / f"run-{precision}-b{budget}-s{seed}.json",
                              lambda: run_cell(precision, seed, budget, out, a.run_flags))
                    if r.get("refused"):
                        print(f"run {precision} budget {budget} seed {seed}: refused: {r['refused']}", flush=True)
                        continue
                    print(f"run {precision} budget {budget} seed {seed}: {r['compact_ms']:.3f} ms for "
                          f"{r['target_ms']:.3f} ({'met' if r['met'] else 'MISSED'}), accuracy " + ", ".join(
                              f"{k} {v:.4f}" for k, v in r["accuracy"].items() if v is not None), flush=True)

if __name__ == "__main__":
    main()
