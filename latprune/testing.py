"""Tiny models and a deterministic latency table for tests (and for anyone testing a plug-in).

The models cover the coupling patterns the knapsack and torch-pruning must handle: a plain conv
stack, a residual net with a projection shortcut, a depthwise inverted-residual net, and a concat.
``fake_table`` costs every layer as c_in * c_out * k^2 * h * w / stride^2 (a MAC count), so
planning tests are exact and need no timing. :class:`FakeBackend` is a test double of a runtime
whose whole-model latency is a known function of the model's widths (``intercept_ms + slope x``
that cost summed over layers): the closed loop and the end-to-end fit are tested against it.
"""
from __future__ import annotations

import collections
import errno
import os
from typing import Callable

import numpy as np
import torch
from torch import nn

from latprune.latency_tables.profile import layer_signatures
from latprune.latency_tables.runtimes import Backend
from latprune.latency_tables.table import EndToEnd, Fingerprint, LatencyTable, LayerSignature, LayerTable
from latprune.latency_tables.timing import Timing
from latprune.models.widths import candidate_widths
from latprune.pipeline.data import Dataset, Split

__all__ = ["PlainNet", "ResidualNet", "DepthwiseNet", "ConcatNet", "BrokenExportNet", "TwoHeadNet", "plain_net",
           "residual_net", "depthwise_net", "concat_net", "broken_export_net", "TINY_MODELS", "fake_cost_ms",
           "fake_table", "model_cost_ms", "FakeBackend", "tiny_dataset", "DiskFull"]


def _cbr(c_in, c_out, k=3, s=1, groups=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU())


class PlainNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(_cbr(3, 16), _cbr(16, 32, s=2), _cbr(32, 32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class ResidualNet(nn.Module):
    """Stem, one identity block, one block with a 1x1 projection shortcut."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = _cbr(3, 16)
        self.a1, self.a2 = _cbr(16, 16), nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.b1 = _cbr(16, 32, s=2)
        self.b2 = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32))
        self.proj = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.a2(self.a1(x)))
        x = torch.relu(self.proj(x) + self.b2(self.b1(x)))
        return self.fc(x.mean((2, 3)))


class DepthwiseNet(nn.Module):
    """An inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, with a residual add."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = _cbr(3, 16)
        self.expand, self.dw = _cbr(16, 32, k=1), _cbr(32, 32, groups=32)
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.fc(x.mean((2, 3)))


class ConcatNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = _cbr(3, 16)
        self.left, self.right = _cbr(16, 16), _cbr(16, 24)
        self.merge = _cbr(40, 32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.merge(torch.cat([self.left(x), self.right(x)], 1))
        return self.fc(x.mean((2, 3)))


class TwoHeadNet(nn.Module):
    """Multi-output: a residual trunk, a classifier and a dense-prediction head (a 1x1 conv map),
    returned as a tuple, a dict (``as_dict``) or a namedtuple (``as_named``)."""

    Out = collections.namedtuple("Out", ["logits", "boxes"])

    def __init__(self, num_classes: int = 10, as_dict: bool = False, as_named: bool = False):
        super().__init__()
        self.as_dict, self.as_named = as_dict, as_named
        self.stem = _cbr(3, 16)
        self.a1, self.a2 = _cbr(16, 32), nn.Sequential(nn.Conv2d(32, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.neck = _cbr(16, 24, s=2)
        self.fc = nn.Linear(24, num_classes)
        self.box = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = self.neck(torch.relu(x + self.a2(self.a1(x))))
        logits, boxes = self.fc(x.mean((2, 3))), self.box(x).flatten(2).transpose(1, 2)
        if self.as_dict:
            return {"logits": logits, "boxes": boxes}
        if self.as_named:
            return self.Out(logits, boxes)
        return logits, boxes


def plain_net(num_classes: int = 10) -> nn.Module:
    return PlainNet(num_classes)


def residual_net(num_classes: int = 10) -> nn.Module:
    return ResidualNet(num_classes)


class BrokenExportNet(ResidualNet):
    """A deliberately broken export: while ONNX export traces it, the logits gain 0.5, so the file
    computes something other than the module (the kind of bug parity checks exist for)."""

    def forward(self, x):
        y = super().forward(x)
        return y + 0.5 if torch.onnx.is_in_onnx_export() else y


def broken_export_net(num_classes: int = 10) -> nn.Module:
    return BrokenExportNet(num_classes)


def depthwise_net(num_classes: int = 10) -> nn.Module:
    return DepthwiseNet(num_classes)


def concat_net(num_classes: int = 10) -> nn.Module:
    return ConcatNet(num_classes)


TINY_MODELS = {"plain": plain_net, "residual": residual_net, "depthwise": depthwise_net, "concat": concat_net}


def fake_cost_ms(sig, c_in: float, c_out: float) -> float:
    """A MAC count in units of 1e6 MACs, as milliseconds: deterministic, monotone in both widths."""
    if sig.kind == "linear":
        return c_in * c_out / 1e6
    h, w = sig.in_hw
    per_out = (1 if sig.kind == "dwconv" else c_in) * sig.kernel[0] * sig.kernel[1]
    return per_out * c_out * (h // sig.stride[0]) * (w // sig.stride[1]) / 1e6


def fake_table(model: nn.Module, input_shape=(3, 32, 32), step: int = 8, batch: int = 1,
               overhead_ms: float = 0.0) -> LatencyTable:
    """A :class:`LatencyTable` filled from :func:`fake_cost_ms` instead of measurements; the layers
    a profile would leave unmeasured (and their groups unpruned) are listed as a profile lists them."""
    unmeasured: dict[str, str] = {}
    sigs = layer_signatures(model, input_shape, unmeasured)
    layers = {}
    for s in sigs.values():
        ci = [s.c_in] if s.kind == "dwconv" else candidate_widths(s.c_in, step).tolist()
        co = candidate_widths(s.c_out, step).tolist()
        med = np.array([[fake_cost_ms(s, (o if s.kind == "dwconv" else i), o) for o in co] for i in ci])
        layers[s.key] = LayerTable(s, ci, co, med, np.zeros_like(med), np.ones_like(med, dtype=int))
    fp = Fingerprint("fake-device", "fake", "0", "none", 1, batch, "float32", tuple(input_shape))
    dense_layers = sum(layers[s.key].lookup(s.c_in, s.c_out) for s in sigs.values())
    e2e = EndToEnd(overhead_ms, 1.0, ({"label": "dense", "layers_ms": dense_layers,
                                       "measured_ms": overhead_ms + dense_layers},))
    return LatencyTable(fp, layers, {n: s.key for n, s in sigs.items()}, overhead_ms + dense_layers, e2e,
                        {"unmeasured": unmeasured} if unmeasured else {})


def model_cost_ms(model: nn.Module, input_shape=(3, 32, 32)) -> float:
    """:func:`fake_cost_ms` summed over the model's layers at their current widths."""
    return sum(fake_cost_ms(s, s.c_in, s.c_out) for s in layer_signatures(model, input_shape).values())


class FakeBackend(Backend):
    """A runtime whose latency is known exactly: a layer costs ``fake_cost_ms``, a whole model
    ``intercept_ms + slope * model_cost_ms(model)``. Nothing is run or timed; for tests only."""

    name = "fake"
    provider = "none"
    library = "latprune.testing"
    loads_onnx = False  # it "times" nn.Modules

    def __init__(self, intercept_ms: float = 0.0, slope: float = 1.0, batch: int = 1,
                 layer_cost: Callable[[LayerSignature, int, int], float] | None = None, noise: float = 0.0,
                 seed: int = 0):
        super().__init__(threads=1, batch=batch)
        self.intercept_ms, self.slope = intercept_ms, slope
        self.layer_cost = layer_cost or fake_cost_ms  # a layer's true latency (e.g. a staircase, for tests)
        self.noise = noise  # relative spread of each timed round around the true latency
        self.rng = np.random.default_rng(seed)
        self.models_timed = 0
        self.layers_timed: list[tuple[str, int, int]] = []  # (signature key, c_in, c_out) of every layer measured

    def version(self) -> str:
        return "0"

    def fingerprint(self, input_shape):
        return Fingerprint("fake-device", "fake", "0", "none", 1, self.batch, "float32", tuple(input_shape))

    def _layer_runner(self, sig, c_in, c_out):
        def run():
            return None

        run.latency_ms = self.layer_cost(sig, c_in, c_out)
        run.layer = (sig.key, c_in, c_out)
        return run

    def _model_runner(self, model, input_shape):
        self.models_timed += 1

        def run():
            return None

        run.latency_ms = self.intercept_ms + self.slope * model_cost_ms(model, input_shape)
        return run

    def measure(self, fns, rounds, min_round_s):
        self.layers_timed += [fn.layer for fn in fns if hasattr(fn, "layer")]
        return [Timing([[fn.latency_ms * (1 + self.noise * self.rng.standard_normal()) if self.noise else fn.latency_ms]
                        * 3 for _ in range(rounds)]) for fn in fns]


def tiny_dataset(n: int = 64, shape=(3, 16, 16), num_classes: int = 10, seed: int = 0):
    """A deterministic in-memory :class:`~latprune.pipeline.data.Dataset` of random images."""
    rng = np.random.default_rng(seed)

    def split(k):
        return Split(rng.integers(0, 255, (k, *shape), dtype=np.uint8), rng.integers(0, num_classes, k))

    return Dataset("tiny", "memory", split(n), split(16), split(16), [str(i) for i in range(num_classes)],
                   (0.5,) * shape[0], (0.25,) * shape[0])


class DiskFull:
    """A file on a disk that fills up: its first ``write`` puts half the bytes down, then raises
    ENOSPC; everything else is the wrapped file's. For the write-fault tests."""

    def __init__(self, f):
        self.f = f

    def write(self, b):
        self.f.write(bytes(b)[: max(len(b) // 2, 1)])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, k):
        return getattr(self.f, k)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
