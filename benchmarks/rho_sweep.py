"""AdaSAP radius sweep, paper Table 7 style: loss and accuracy after a short adaptive run.

    python benchmarks/rho_sweep.py --weights DENSE.pt [--iters 120] [--lr 0.02] [--json OUT]

Starts every configuration from the same pre-trained dense ResNet-20 (e.g. the cached checkpoint
`~/.cache/latprune/checkpoints/dense-*.pt`) on the embedded Fashion-MNIST, trains ``--iters``
iterations with the adaptive step, and reports the last training loss and validation accuracy.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from latprune.latency_tables.device import environment
from latprune.models.cifar_resnet import resnet20
from latprune.models.graph import ModelGraph
from latprune.pipeline.adasap import OptimizerConfig, SharpnessStep, neuron_partition
from latprune.pipeline.data import DataConfig, load_dataset
from latprune.pipeline.train import TrainConfig, evaluate, sgd_step, train

GRID = [("neuron", 2.0), ("neuron", 0.5), ("neuron", 0.1), ("global", 2.0), ("global", 0.5)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", required=True)
    p.add_argument("--iters", type=int, default=120)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="runs/rho_sweep.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data = load_dataset(DataConfig(val_size=2000))
    base = resnet20()
    base.load_state_dict(torch.load(a.weights, map_location="cpu", weights_only=True))
    per_epoch = -(-len(data.train) // 128)
    cfg = TrainConfig(epochs=a.iters / per_epoch, lr=a.lr, warmup_iters=10)
    rows = [{"normalize": "-", "rho_max": 0.0, "method": "dense, no training", "loss": float("nan"),
             "val_accuracy": evaluate(base, data, data.val), "seconds": 0.0}]
    for norm, rho_max in [(None, None), *GRID]:
        m = copy.deepcopy(base)
        if norm is None:
            step, name = sgd_step, "sgd"
        else:
            sc = OptimizerConfig(normalize=norm, rho_max=rho_max, score="magnitude")
            step, name = SharpnessStep(m, sc, neuron_partition(ModelGraph(m, (3, 32, 32)))), "adasap"
        t0 = time.perf_counter()
        r = train(m, data, cfg, step=step, progress=False)
        rows.append({"normalize": norm or "-", "rho_max": rho_max or 0.0, "method": name, "loss": r.final_loss,
                     "val_accuracy": r.val_accuracy, "seconds": time.perf_counter() - t0})
    print(f"{'method':>18} {'normalize':>9} {'rho_max':>7} {'loss':>6} {'val acc':>7} {'s':>4}")
    for r in rows:
        print(f"{r['method']:>18} {r['normalize']:>9} {r['rho_max']:>7} {r['loss']:>6.3f} "
              f"{r['val_accuracy']:>7.4f} {r['seconds']:>4.0f}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"iters": a.iters, "lr": a.lr, "rows": rows, "environment": environment()},
                                       indent=1))
    print(a.json)


if __name__ == "__main__":
    main()
