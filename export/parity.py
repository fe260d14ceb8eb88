"""Verify an exported model computes what PyTorch computes (parity), output by output.

Parity runs on real batches, every output compared by name: an element passes when
``|onnx - torch| <= atol + rtol * |torch|`` (numpy's ``allclose`` rule), and for a classifier's
2-D output the top-1 class must agree on at least ``min_top1`` of the images. The result names
the first output that diverged; the run writes it into the report and exits 3.

Speed is measured elsewhere (``latency_tables.endtoend.measure_speedup``), after parity holds.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterable

import numpy as np
import torch
from torch import nn

from latprune.errors import ParityError
from latprune.latency_tables.runtimes.ort import ort_session
from latprune.models.outputs import flatten_outputs

__all__ = ["ATOL", "RTOL", "MIN_TOP1", "OutputParity", "Parity", "compare_outputs", "check_parity"]

log = logging.getLogger(__name__)

ATOL, RTOL, MIN_TOP1 = 1e-4, 1e-4, 0.99  # fp32 on the CPU; fp16 engines need their own (export.tensorrt)


@dataclasses.dataclass(frozen=True)
class OutputParity:
    name: str
    max_abs_diff: float
    max_rel_diff: float  # max |diff| / max |torch output|
    worst_excess: float  # max of |diff| - (atol + rtol |torch|): <= 0 everywhere means it passes
    top1_agreement: float | None  # 2-D outputs only
    ok: bool


@dataclasses.dataclass(frozen=True)
class Parity:
    outputs: list[OutputParity]
    images: int
    batches: int
    atol: float
    rtol: float
    min_top1: float
    reference: str = "torch"
    runtime: str = "onnxruntime CPUExecutionProvider"

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def failed(self) -> str | None:
        """The first output that diverged, or None."""
        return next((o.name for o in self.outputs if not o.ok), None)

    # the headline figures of the first output (a classifier's logits)
    @property
    def max_abs_diff(self) -> float:
        return max(o.max_abs_diff for o in self.outputs)

    @property
    def top1_agreement(self) -> float | None:
        return self.outputs[0].top1_agreement

    def message(self) -> str:
        o = next((o for o in self.outputs if not o.ok), self.outputs[0])
        top1 = "" if o.top1_agreement is None else f", top-1 agreement {o.top1_agreement:.3f} (need {self.min_top1})"
        return (f"{self.runtime} output '{o.name}' {'diverges from' if not o.ok else 'matches'} {self.reference} on "
                f"{self.images} images: max abs diff {o.max_abs_diff:.3g}, relative {o.max_rel_diff:.3g} "
                f"(tolerance {self.atol:g} + {self.rtol:g} x |{self.reference}|){top1}")

    def to_dict(self) -> dict:
        return {"ok": self.ok, "failed_output": self.failed, "max_abs_diff": self.max_abs_diff,
                "top1_agreement": self.top1_agreement, "images": self.images,
                "batches": self.batches, "atol": self.atol, "rtol": self.rtol, "min_top1": self.min_top1,
                "reference": self.reference, "runtime": self.runtime,
                "outputs": [dataclasses.asdict(o) for o in self.outputs], "detail": self.message()}

    def raise_if_failed(self) -> "Parity":
        if not self.ok:
            raise ParityError(self.message())
        return self


def compare_outputs(names: list[str], got: list[list[np.ndarray]], ref: list[list[np.ndarray]], atol: float = ATOL,
                    rtol: float = RTOL, min_top1: float = MIN_TOP1, **kw) -> Parity:
    """``got[b][i]`` / ``ref[b][i]``: output ``i`` of batch ``b`` from the runtime and the reference."""
    outs = []
    for i, name in enumerate(names):
        g = np.concatenate([np.asarray(b[i], dtype=np.float64) for b in got])
        r = np.concatenate([np.asarray(b[i], dtype=np.float64) for b in ref])
        if g.shape != r.shape:
            outs.append(OutputParity(name, float("inf"), float("inf"), float("inf"), None, False))
            continue
        diff = np.abs(g - r)
        excess = float((diff - (atol + rtol * np.abs(r))).max()) if diff.size else 0.0
        top1 = float((g.argmax(1) == r.argmax(1)).mean()) if g.ndim == 2 and g.shape[1] > 1 else None
        ok = bool(np.isfinite(g).all()) and excess <= 0 and (top1 is None or top1 >= min_top1)
        outs.append(OutputParity(name, float(diff.max()), float(diff.max() / max(np.abs(r).max(), 1e-12)),
                                 excess, top1, ok))
    images = sum(len(b[0]) for b in ref)
    return Parity(outs, images, len(ref), atol, rtol, min_top1, **kw)


def check_parity(model: nn.Module, onnx_path: str | os.PathLike, batches: torch.Tensor | Iterable[torch.Tensor],
                 atol: float = ATOL, rtol: float = RTOL, min_top1: float = MIN_TOP1) -> Parity:
    """ONNX Runtime (CPU) against torch on ``batches`` (one tensor or several); does not raise:
    check ``.ok`` or call ``.raise_if_failed()``."""
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    model.eval()
    sess = ort_session(str(onnx_path))
    names = [o.name for o in sess.get_outputs()]
    got, ref = [], []
    for x in batches:
        with torch.no_grad():
            out = flatten_outputs(model(x))
        ref.append([o.numpy() for _, o in out])
        got.append(sess.run(None, {sess.get_inputs()[0].name: x.numpy()}))
    if len(ref[0]) != len(names):
        raise ParityError(f"the ONNX file has {len(names)} outputs, torch gives {len(ref[0])}: re-export the model")
    return compare_outputs(names, got, ref, atol, rtol, min_top1)
