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
# --iterations: the first half prunes, the second fine-tunes; --profile-step: the latency table's channel grid;
# --fit-configs: pruned models the table's end-to-end term is fitted on
for flag, default in (("--budget", 0.5), ("--iterations", 600), ("--steps", 10), ("--profile-step", 8),
                      ("--fit-configs", 8), ("--out", "deploy")):
    p.add_argument(flag, type=type(default), default=default)
a = p.parse_args()

data = load_dataset(DataConfig("fashion-mnist"))
model = ModelSpec("resnet20", data.num_classes).build()
model.load_state_dict(torch.load(bundled_weights("resnet20", "fashion-mnist", 10), weights_only=True))
example = torch.zeros(32, *data.input_shape)  # the deployment batch
pruner = latprune.LatencyPruner(model, example, budget=a.budget, runtime="ort", steps=a.steps,
                                every=max(a.iterations // (2 * a.steps), 1),
                                profile=ProfileConfig(a.profile_step, fit_configs=a.fit_configs))  # the table
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, a.iterations)
batches = itertools.chain.from_iterable(data.batches(data.train, 128, True, True, np.random.default_rng(epoch))
                                        for epoch in itertools.count())


def train(iterations: int) -> None:
    for it, (x, y) in zip(range(iterations), batches):
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.observe()
        optimizer.step(), optimizer.zero_grad(), scheduler.step()
        if pruner.due(it):
            pruner.step(optimizer)  # channels removed; the optimizer and scheduler carry on


train(a.iterations)  # the first half prunes, the second fine-tunes
# measured over the budget, the closed loop removes more: fine-tune and measure again (the third check only measures)
while (v := pruner.verify(optimizer, correct=len(pruner.verifications) < 2)).action == "removed":
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, a.iterations // 4)
    train(a.iterations // 4)
print(v)
with torch.no_grad():
    acc = np.mean([float((model.eval()(x).argmax(1) == y).float().mean()) for x, y in data.batches(data.test, 500)])
print(f"test accuracy {acc:.4f}; files: {latprune.export_model(model, example, a.out, dense=pruner.dense).report}")
