"""The deployed int8 file (issue 14): ``model.int8.onnx`` beside ``model.onnx``.

The fp32 export, quantized statically by ONNX Runtime's own tooling (``latency_tables.runtimes.quantize``:
QDQ, per-channel int8 weights, 8-bit activations in the deployment runtime's form: uint8 for ONNX
Runtime's CPU provider, symmetric int8 for TensorRT) and calibrated on real training images, so the
file a user deploys is the one the int8 latency table and the closed loop timed (they quantize the
same way). The fp32 file's metadata contract is carried over, with how the file was
quantized (``latprune.int8``: method, per-channel, symmetric, calibration images) added.

Parity for int8 is not elementwise (quantization moves every logit): the int8 file must agree
with the fp32 file on the top-1 class of at least ``min_top1`` of the images (0.98 by default).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
from torch import nn

from latprune.export.onnx_export import OnnxArtifact
from latprune.export.parity import Parity, compare_outputs
from latprune.io import write_bytes_atomic
from latprune.latency_tables.runtimes.convert import input_dims
from latprune.latency_tables.runtimes.ort import ort_session
from latprune.latency_tables.runtimes.quantize import QuantConfig, quantize_int8

__all__ = ["INT8_MIN_TOP1", "INT8_FILES", "export_int8", "int8_parity", "OnnxClassifier"]

log = logging.getLogger(__name__)

INT8_MIN_TOP1 = 0.98  # top-1 agreement of the int8 file with the fp32 one
INT8_FILES = {"dense": "dense.int8.onnx", "compact": "model.int8.onnx"}  # in a run directory


def export_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calibration: Sequence[np.ndarray],
                cfg: QuantConfig, source: str = "") -> OnnxArtifact:
    """Quantize the exported fp32 file at ``fp32_path`` to ``out_path`` (written atomically),
    calibrated on ``calibration`` (input batches of the file's shape: real images, as deployed);
    ``source`` says in the file's metadata where those images came from."""
    proto = onnx.load(str(fp32_path))
    q = onnx.load_from_string(quantize_int8(proto, calibration, cfg))
    images = int(sum(len(b) for b in calibration))
    props = {p.key: p.value for p in proto.metadata_props}
    props["latprune.int8"] = json.dumps(cfg.to_dict() | {"calibration_images": images, "calibration_source": source},
                                        sort_keys=True)
    del q.metadata_props[:]
    for k, v in props.items():
        entry = q.metadata_props.add()
        entry.key, entry.value = k, v
    data = q.SerializeToString()
    path = write_bytes_atomic(out_path, data)
    log.info("exported %s (%.1f kB, int8 %s calibration on %d images)", path, len(data) / 1e3, cfg.method, images)
    dims = input_dims(path)
    shape = tuple("batch" if d is None else d for d in dims)
    opset = next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx"))
    return OnnxArtifact(Path(path), opset, shape, len(data), hashlib.sha256(data).hexdigest())


def int8_parity(fp32_path: str | os.PathLike, int8_path: str | os.PathLike, batches: Sequence[np.ndarray],
                min_top1: float = INT8_MIN_TOP1, threads: int = 2) -> Parity:
    """The int8 file against the fp32 file on ONNX Runtime's CPU provider, output by output: top-1
    agreement only (no elementwise tolerance). Does not raise: check ``.ok``."""
    ref_sess, sess = ort_session(str(fp32_path), threads=threads), ort_session(str(int8_path), threads=threads)
    name = ref_sess.get_inputs()[0].name
    names = [o.name for o in ref_sess.get_outputs()]
    ref = [ref_sess.run(None, {name: np.asarray(x, dtype=np.float32)}) for x in batches]
    got = [sess.run(None, {sess.get_inputs()[0].name: np.asarray(x, dtype=np.float32)}) for x in batches]
    return compare_outputs(names, got, ref, atol=float("inf"), rtol=0.0, min_top1=min_top1, reference="fp32 ONNX",
                           runtime="onnxruntime CPUExecutionProvider int8")


class OnnxClassifier(nn.Module):
    """An ONNX file on ONNX Runtime's CPU provider behind ``nn.Module``'s call, so the accuracy and
    corruption evaluations that score the torch models score a deployed file unchanged
    (``pipeline.train.evaluate``, ``pipeline.robustness``). A file with a static batch is fed in
    chunks of that batch, the last one padded (the padding's outputs are dropped). CPU tensors in
    and out; no gradients."""

    def __init__(self, path: str | os.PathLike, threads: int = 2):
        super().__init__()
        self.path = Path(path)
        self.session = ort_session(str(path), threads=threads)
        self.input_name = self.session.get_inputs()[0].name
        self.batch = input_dims(path)[0]  # None: dynamic

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        if self.batch is None:
            return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])
        outs = []
        for i in range(0, len(x), self.batch):
            chunk = x[i:i + self.batch]
            n = len(chunk)
            if n < self.batch:
                chunk = np.concatenate([chunk, np.zeros((self.batch - n, *chunk.shape[1:]), np.float32)])
            outs.append(self.session.run(None, {self.input_name: chunk})[0][:n])
        return torch.from_numpy(np.concatenate(outs))
