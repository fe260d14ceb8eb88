"""Stage 4b: verify the exported model computes what PyTorch computes, and measure the speedup.

Parity runs on a real batch. Dense and compact latencies come from interleaved runs in one
process (``latency_tables.endtoend.measure_speedup``, re-exported here): the ratio of their
medians is what the budget is checked on, with a bootstrap confidence interval over rounds.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import torch
from torch import nn

from latprune.errors import ParityError
from latprune.latency_tables.endtoend import PairConfig, SpeedResult, measure_speedup  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    max_rel_diff: float  # max |diff| / max |torch logits|
    top1_agreement: float
    batch: int
    atol: float
    rtol: float

    @property
    def ok(self) -> bool:
        return self.max_rel_diff <= self.rtol or self.max_abs_diff <= self.atol


def check_parity(model: nn.Module, onnx_path: str | os.PathLike, x: torch.Tensor,
                 atol: float = 1e-4, rtol: float = 1e-4, min_top1: float = 0.99) -> Parity:
    """Compare ONNX Runtime CPU with torch on batch ``x``; raise :class:`ParityError` on mismatch."""
    import onnxruntime as ort

    model.eval()
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    if got.shape != ref.shape:
        raise ParityError(f"ONNX output 'logits' has shape {got.shape}, torch gives {ref.shape}")
    diff = np.abs(got - ref)
    p = Parity(
        max_abs_diff=float(diff.max()), max_rel_diff=float(diff.max() / max(np.abs(ref).max(), 1e-12)),
        top1_agreement=float((got.argmax(1) == ref.argmax(1)).mean()), batch=len(x), atol=atol, rtol=rtol,
    )
    if not p.ok or p.top1_agreement < min_top1:
        raise ParityError(
            f"ONNX output 'logits' diverges from torch: max abs diff {p.max_abs_diff:.3g}, relative "
            f"{p.max_rel_diff:.3g} (tolerance {rtol:g}), top-1 agreement {p.top1_agreement:.3f}"
        )
    return p
