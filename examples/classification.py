"""Prune a trained classifier to half its measured latency from inside your own training loop.

    python examples/classification.py [--budget 0.5] [--iterations 600] [--out deploy]

The bundled ResNet-20 trained on Fashion-MNIST (``make data``), ONNX Runtime on this CPU, batch 32.
Everything but the four ``pruner`` calls and ``export_model`` is an ordinary PyTorch loop.
"""
import argparse
import itertools

import numpy as np
import torch
from torch import nn

import latprune
from latprune.latency_tables.profile import ProfileConfig
from latprune.models.registry import ModelSpec, bundled_weights
from latprune.pipeline.data import DataConfig, load_dataset

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--budget", type=float, default=0.5)
p.add_argument("--iterations", type=int, default=600)  # the first half prunes, the second fine-tunes
p.add_argument("--steps", type=int, default=10)
p.add_argument("--profile-step", type=int, default=8)  # the latency table's channel grid
p.add_argument("--fit-configs", type=int, default=8)  # pruned models the table's end-to-end term is fitted on
p.add_argument("--out", default="deploy")
a = p.parse_args()

data = load_dataset(DataConfig("fashion-mnist"))
model = ModelSpec("resnet20", data.num_classes).build()
model.load_state_dict(torch.load(bundled_weights("resnet20", "fashion-mnist", 10), weights_only=True))
example = torch.zeros(32, *data.input_shape)  # the deployment batch
table = ProfileConfig(a.profile_step, fit_configs=a.fit_configs)  # how the latency table is measured
pruner = latprune.LatencyPruner(model, example, budget=a.budget, runtime="ort", steps=a.steps,
                                every=max(a.iterations // (2 * a.steps), 1), profile=table)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, a.iterations)
rng = np.random.default_rng(0)
batches = itertools.chain.from_iterable(data.batches(data.train, 128, True, True, rng) for _ in itertools.count())
for it, (x, y) in zip(range(a.iterations), batches):
    nn.functional.cross_entropy(model(x), y).backward()
    pruner.observe()
    optimizer.step(), optimizer.zero_grad(), scheduler.step()
    if pruner.due(it):
        pruner.step(optimizer)  # channels removed; the optimizer and scheduler carry on
print(pruner.verify(optimizer))
model.eval()
with torch.no_grad():
    acc = np.mean([float((model(x).argmax(1) == y).float().mean()) for x, y in data.batches(data.test, 500)])
print(f"test accuracy {acc:.4f}; files: {latprune.export_model(model, example, a.out, dense=pruner.dense).report}")
