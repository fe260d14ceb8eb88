"""Train a dense model properly and write it as a plain state dict (the shipped ResNet-20 is made here).

    python benchmarks/train_dense.py [--model resnet20] [--epochs 20] [--lr 0.1] [--seed 0]
                                     [--out models/weights/resnet20-fashion-mnist.pt]

SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128, linear warm-up then cosine to zero,
random crop (pad 4) and horizontal flip, on the embedded Fashion-MNIST training split less the
5,000 validation images latprune holds out (``DataConfig.split_seed``, the same for every run seed).
Resumable: it trains through ``pipeline.train.pretrained``, which checkpoints every epoch in the
cache and reuses a finished model. Prints validation and test accuracy and the file's sha256, and
writes them with the command, machine and date beside the weights (``<out>.json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from latprune.io import save_torch_atomic, write_json_atomic
from latprune.latency_tables.device import environment
from latprune.models.registry import ModelSpec
from latprune.pipeline.config import default_cache_dir
from latprune.pipeline.data import DataConfig, load_dataset
from latprune.pipeline.train import TrainConfig, evaluate, pretrained


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet20")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--epochs", type=float, default=20)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="models/weights/resnet20-fashion-mnist.pt")
    a = p.parse_args()
    data_cfg = DataConfig(name=a.data)
    data = load_dataset(data_cfg)
    spec = ModelSpec(a.model, data.num_classes)
    cfg = TrainConfig(epochs=a.epochs, lr=a.lr)
    t0 = time.perf_counter()
    key = {"model": {"name": spec.name, "num_classes": spec.num_classes}, "data": data.source,
           "data_cfg": {"name": data_cfg.name, "val_size": data_cfg.val_size}, "purpose": "train_dense"}
    model, info = pretrained(spec.build(), data, cfg, Path(default_cache_dir()), key, a.seed, progress=True)
    model.eval()
    val, test = evaluate(model, data, data.val), evaluate(model, data, data.test)
    out = save_torch_atomic(model.state_dict(), a.out)  # a plain state dict
    blob = Path(out).read_bytes()
    sha = hashlib.sha256(blob).hexdigest()
    meta = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join(shlex.quote(x) for x in sys.argv), "model": spec.name,
            "data": data.name, "val_size": data_cfg.val_size, "split_seed": data_cfg.split_seed,
            "train_images": len(data.train),
            "train": dataclasses.asdict(cfg), "val_accuracy": val,
            "test_accuracy": test, "sha256": sha, "bytes": len(blob), "train_s": time.perf_counter() - t0,
            "resumed_or_cached": info.get("cached", False), "environment": environment()}
    write_json_atomic(str(out) + ".json", meta)
    print(f"{spec.name} on {data.name}: val {val:.4f}, test {test:.4f}; {out} ({len(blob)} bytes, sha256 {sha})")


if __name__ == "__main__":
    main()
