"""Prune a detector's backbone and neck to a latency budget in your own training loop, heads kept whole.

    python examples/detection.py [--budget 0.6] [--epochs 15] [--out deploy-detection] [--json FILE]

torchvision's SSDlite-MobileNetV3 (random init, nothing downloaded) on synthetic detection data:
Fashion-MNIST items pasted on 96 x 96 canvases (``latprune.pipeline.detection``). The dense model is
trained first (cached in --dense), then pruned with ``LatencyPruner`` on its raw head outputs (what
is deployed: box decoding and NMS stay in your runtime), fine-tuned, verified on ONNX Runtime and
exported. mAP@0.5 and mAP@[.5:.95] (pycocotools) before and after.
"""
import argparse
import itertools
import math
import time
from pathlib import Path

import numpy as np
import torch

import latprune
from latprune.io import write_json_atomic
from latprune.latency_tables.profile import ProfileConfig
from latprune.pipeline.data import DataConfig, load_dataset
from latprune.pipeline.detection import CanvasConfig, RawHeads, detection_loss, mean_ap, ssdlite, synthetic_detection

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--budget", type=float, default=0.6)  # 0.5 is below the floor with the heads whole at round_to 64
p.add_argument("--canvas", type=int, default=96)
p.add_argument("--train", type=int, default=3000)  # training canvases
p.add_argument("--test", type=int, default=500)
p.add_argument("--epochs", type=int, default=15)  # dense training
p.add_argument("--finetune-epochs", type=float, default=3)  # after the last removal
p.add_argument("--steps", type=int, default=10)
p.add_argument("--round-to", type=int, default=64)  # kept widths: multiples of the table's grid, nothing interpolated
p.add_argument("--corrections", type=int, default=2)  # corrective removals the closed loop may make
p.add_argument("--every", type=int, default=30)
p.add_argument("--deploy-batch", type=int, default=8)
p.add_argument("--threads", type=int, default=2)  # ONNX Runtime's threads for the latency table and verify
p.add_argument("--profile-step", type=int, default=64)  # MobileNetV3 at step 8 would be 23,164 table entries
p.add_argument("--fit-configs", type=int, default=8)  # pruned models the table's end-to-end term is fitted on
p.add_argument("--seed", type=int, default=0)
p.add_argument("--dense", default="runs/detection/ssdlite-dense.pt")
p.add_argument("--out", default="deploy-detection")
p.add_argument("--json")
a = p.parse_args()
torch.manual_seed(a.seed)
data = load_dataset(DataConfig("fashion-mnist"))
train = synthetic_detection(data.train, a.train, CanvasConfig(a.canvas, seed=0), data.classes)
test = synthetic_detection(data.test, a.test, CanvasConfig(a.canvas, seed=1), data.classes)
ssd = ssdlite(len(data.classes), a.canvas)
rng = np.random.default_rng(a.seed)


def sgd(iterations, lr=0.05):
    """SGD with momentum, weight decay on weights only, a linear warm-up then a cosine to zero."""
    decay = [q for q in ssd.parameters() if q.ndim > 1]
    rest = [q for q in ssd.parameters() if q.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 4e-5}, {"params": rest}], lr=lr, momentum=0.9)
    warm = min(50, iterations // 5 + 1)

    def factor(i):
        return (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(iterations - warm, 1)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def batches():
    return itertools.chain.from_iterable(train.batches(32, True, rng) for _ in itertools.count())


t0 = time.time()
if Path(a.dense).exists():
    ssd.load_state_dict(torch.load(a.dense, weights_only=True))
else:
    n = a.epochs * math.ceil(a.train / 32)
    opt, sched = sgd(n)
    ssd.train()
    for _, (x, t) in zip(range(n), batches()):
        detection_loss(ssd, x, t).backward()
        opt.step(), opt.zero_grad(), sched.step()
    Path(a.dense).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ssd.state_dict(), a.dense)
dense_map, train_s = mean_ap(ssd, test), time.time() - t0
print(f"dense: mAP@0.5 {dense_map['map_50']:.4f}, mAP@[.5:.95] {dense_map['map_50_95']:.4f}")

model, example = RawHeads(ssd), torch.zeros(a.deploy_batch, 3, a.canvas, a.canvas)
table = ProfileConfig(a.profile_step, fit_configs=a.fit_configs)  # how the latency table is measured
pruner = latprune.LatencyPruner(model, example, budget=a.budget, runtime="ort", threads=a.threads,
                                ignored_layers=["ssd.head"], steps=a.steps, every=a.every, round_to=a.round_to,
                                profile=table)
n = a.steps * a.every + int(a.finetune_epochs * math.ceil(a.train / 32))
opt, sched = sgd(n, lr=0.01)
ssd.train()
for it, (x, t) in zip(range(n), batches()):
    detection_loss(ssd, x, t).backward()
    pruner.observe()
    opt.step(), opt.zero_grad(), sched.step()
    if pruner.due(it):
        pruner.step(opt)  # backbone and neck channels removed; the heads keep their outputs
result = pruner.verify(opt)
for check in range(a.corrections):  # the closed loop cut more: fine-tune one epoch, time again
    if result.action != "removed":
        break
    opt, sched = sgd(math.ceil(a.train / 32), lr=0.01)
    for x, t in train.batches(32, True, rng):
        detection_loss(ssd, x, t).backward()
        opt.step(), opt.zero_grad(), sched.step()
    result = pruner.verify(opt, correct=check + 1 < a.corrections)  # the last check removes nothing untrained
compact_map = mean_ap(ssd, test)
dep = latprune.export_model(model, example, a.out, dense=pruner.dense)
summary = {"dense_map": dense_map, "compact_map": compact_map, "verify": result.to_dict(), "removals": pruner.history,
           "verifications": [v.to_dict() for v in pruner.verifications],  # a corrective removal before the last
           "parity_ok": dep.parity.ok, "files": str(dep.report), "args": vars(a), "seconds": time.time() - t0,
           "dense_train_s": train_s, "dense_params": sum(q.numel() for q in pruner.dense.parameters()),
           "compact_params": sum(q.numel() for q in model.parameters())}
print(f"compact: mAP@0.5 {compact_map['map_50']:.4f}, mAP@[.5:.95] {compact_map['map_50_95']:.4f}; latency "
      + " -> ".join(f"{v.measured_ratio:.3f} ({v.action})" for v in pruner.verifications)
      + f" of dense (budget {a.budget}); files in {a.out}")
if a.json:
    write_json_atomic(a.json, summary)
