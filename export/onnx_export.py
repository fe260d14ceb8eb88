"""ONNX export: one self-contained file, checked structurally before anything else uses it."""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from latprune.latency_tables.table import write_bytes_atomic

log = logging.getLogger(__name__)

OPSET = 17


@dataclasses.dataclass(frozen=True)
class OnnxArtifact:
    path: Path
    opset: int
    input_shape: tuple[int, ...]
    size_bytes: int


def onnx_bytes(model: nn.Module, input_shape: tuple[int, ...], opset: int = OPSET,
               metadata: dict[str, str] | None = None) -> bytes:
    """Serialise ``model`` (eval mode, static shape) to ONNX and run the full checker on it.

    Uses the TorchScript exporter (``dynamo=False``): ~0.02 s for a small model against 0.7-2.6 s
    for the dynamo exporter, and always a single file with the weights inside.
    """
    import onnx

    was_training = model.training
    model.eval()
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                model, (torch.zeros(input_shape),), buf, input_names=["input"], output_names=["logits"],
                opset_version=opset, dynamo=False, do_constant_folding=True,
            )
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buf.getvalue())
    for k, v in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...],
                opset: int = OPSET, metadata: dict[str, str] | None = None) -> OnnxArtifact:
    """Export to ``path`` atomically (the file appears only once checked and complete)."""
    data = onnx_bytes(model, input_shape, opset, metadata)
    p = write_bytes_atomic(path, data)
    log.info("exported %s (%.1f kB)", p, len(data) / 1e3)
    return OnnxArtifact(p, opset, tuple(input_shape), len(data))
