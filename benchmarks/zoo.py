"""Which torchvision architectures the Python API prunes and exports (issue 13: "expect torchvision
architectures other than the tests' to be tried"). Not a speed or accuracy benchmark: for each
model (random init, 10 classes), ``LatencyPruner`` on ``testing.fake_table`` (a MAC-count table
that lists unmeasurable layers as a profile does) and ``FakeBackend``, 2 removals to 0.6 of the
predicted latency, magnitude ranking, a training step between, then ``export_model`` (ONNX, parity).
A model that cannot be pruned must be refused with one ``BadInput`` line; anything else is a bug.

    python benchmarks/zoo.py [--size 64] [--models resnet18 ...] [--out benchmarks/results/zoo.json]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torchvision

import latprune
from latprune.errors import BadInput
from latprune.io import write_json_atomic
from latprune.latency_tables.device import environment
from latprune.models.outputs import classification_loss, flatten_outputs
from latprune.testing import FakeBackend, fake_table

MODELS = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
          "shufflenet_v2_x0_5", "squeezenet1_0", "densenet121", "googlenet", "mnasnet0_5", "vgg11_bn",
          "resnext50_32x4d", "convnext_tiny", "inception_v3"]

MIN_SIZE = {"inception_v3": 299}  # its design size: the auxiliary head pools 5x5 (stride 3), then a 5x5 conv


def try_model(name: str, size: int) -> dict:
    kw = {"num_classes": 10} | ({"aux_logits": True, "init_weights": True} if name in ("googlenet", "inception_v3")
                                else {})
    model = getattr(torchvision.models, name)(**kw)
    size = max(size, MIN_SIZE.get(name, 0))
    shape, example = (3, size, size), torch.zeros(2, 3, size, size)
    t0 = time.perf_counter()
    try:
        pruner = latprune.LatencyPruner(model, example, 0.6, table=fake_table(model, shape, batch=2),
                                        runtime=FakeBackend(batch=2), steps=2, every=1, importance="magnitude")
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(0)
        model.train()
        for it in range(2):
            x, y = torch.randn(4, *shape, generator=g), torch.randint(0, 10, (4,), generator=g)
            classification_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if pruner.due(it):
                pruner.step(opt)
        with tempfile.TemporaryDirectory() as d:
            dep = latprune.export_model(model.eval(), example, d, dense=pruner.dense, check=False)
        return {"model": name, "size": size,
                "result": "pruned and exported" if dep.parity.ok else "exported, parity failed",
                "parity": dep.parity.message(), "max_abs_logit": _max_abs_logit(model, example),
                "predicted_ratio": pruner.history[-1]["predicted_ratio"],
                "params": [sum(p.numel() for p in pruner.dense.parameters()), pruner.history[-1]["params"]],
                "groups_left_whole": len(pruner.graph.whole), "outputs": list(dep.outputs),
                "seconds": round(time.perf_counter() - t0, 1)}
    except BadInput as e:
        return {"model": name, "size": size, "result": "refused", "message": str(e),
                "seconds": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def _max_abs_logit(model, example) -> float:
    """How large the random-init model's outputs are: float32 parity is elementwise, so outputs of
    1e7 (an untrained deep net without trained BatchNorm) can differ by tens between runtimes."""
    return max(float(t.abs().max()) for _, t in flatten_outputs(model.eval()(torch.randn_like(example))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--out", default="benchmarks/results/zoo.json")
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in a.models:
        rows.append(try_model(name, a.size))
        r = rows[-1]
        print(f"{name:20s} {r['result']:20s} " + (f"ratio {r['predicted_ratio']:.3f}, {r['groups_left_whole']} groups "
                                                   f"whole" if "predicted_ratio" in r else r["message"]), flush=True)
    write_json_atomic(a.out, {"command": f"python benchmarks/zoo.py --size {a.size}",
                              "torchvision": torchvision.__version__, "rows": rows, "environment": environment()})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
