"""Stage 4b: verify the exported model computes what PyTorch computes, and measure the speedup.

Parity runs on a real batch. Dense and compact latencies come from one interleaved run in one
process (../shared/BENCHMARKS.md): the ratio of their medians is what the budget is checked on,
with a bootstrap confidence interval over rounds.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import torch
from torch import nn

from latprune.errors import ParityError
from latprune.latency_tables.backends import Backend
from latprune.latency_tables.timing import bootstrap_ratio_ci

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


@dataclasses.dataclass(frozen=True)
class SpeedResult:
    dense: dict
    compact: dict
    speedup: float
    speedup_ci95: tuple[float, float]
    ratio: float  # compact / dense medians: what the budget fraction is compared with


def measure_speedup(backend: Backend, dense, compact, input_shape: tuple[int, int, int],
                    rounds: int = 7, min_round_s: float = 0.5) -> SpeedResult:
    """Dense and compact interleaved in one process; ``dense``/``compact`` are ONNX paths or modules."""
    fns = [backend.model_runner(dense, input_shape), backend.model_runner(compact, input_shape)]
    backend.measure(fns, 1, min_round_s / 4)  # throwaway round: first measurements run slow
    td, tc = backend.measure(fns, rounds, min_round_s)
    lo, hi = bootstrap_ratio_ci(td, tc)
    speedup = td.median_ms / tc.median_ms
    log.info("dense %.3f ms, compact %.3f ms: speedup %.2fx [%.2f, %.2f]", td.median_ms, tc.median_ms, speedup, lo, hi)
    return SpeedResult(td.summary(), tc.summary(), speedup, (lo, hi), tc.median_ms / td.median_ms)
