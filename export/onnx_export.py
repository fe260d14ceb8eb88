"""ONNX export: one self-contained file, checked structurally before anything else uses it.

The file carries its preprocessing contract in ``metadata_props`` (input shape, channel order,
scale, resize, mean, std, class names; JSON under ``latprune.preprocessing``), so a deployer
needs nothing but the file. Static batch by default (what a runtime optimises best);
``dynamic_batch`` names the first axis ``batch`` on input and output.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from torch import nn

from latprune.errors import BadInput, one_line
from latprune.io import check_file, write_bytes_atomic
from latprune.latency_tables.runtimes.convert import OPSET, onnx_bytes

__all__ = ["OnnxArtifact", "contract_metadata", "export_onnx", "check_onnx", "read_contract", "check_shrink"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OnnxArtifact:
    path: Path
    opset: int
    input_shape: tuple[int | str, ...]  # "batch" in front when the batch axis is dynamic
    size_bytes: int
    sha256: str

    @property
    def dynamic_batch(self) -> bool:
        return isinstance(self.input_shape[0], str)

    def to_dict(self) -> dict:
        return {"file": self.path.name, "opset": self.opset, "input_shape": list(self.input_shape),
                "dynamic_batch": self.dynamic_batch, "size_bytes": self.size_bytes, "sha256": self.sha256}


def contract_metadata(preprocessing: dict, **extra: str) -> dict[str, str]:
    """``metadata_props`` for the file: the whole contract as JSON, plus the fields a model viewer
    (Netron) shows at a glance as separate keys."""
    meta = {"latprune.preprocessing": json.dumps(preprocessing, sort_keys=True)}
    for k in ("input_shape", "channel_order", "mean", "std", "classes", "resize", "scale", "layout"):
        if k in preprocessing:
            v = preprocessing[k]
            meta[f"latprune.{k}"] = v if isinstance(v, str) else json.dumps(v)
    meta.update({f"latprune.{k}": v for k, v in extra.items()})
    return meta


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...],
                opset: int = OPSET, metadata: dict[str, str] | None = None,
                dynamic_batch: bool = False) -> OnnxArtifact:
    """Export to ``path`` atomically (the file appears only once checked and complete)."""
    data = onnx_bytes(model, input_shape, opset, metadata, dynamic_batch)
    p = write_bytes_atomic(path, data)
    log.info("exported %s (%.1f kB)", p, len(data) / 1e3)
    shape = ("batch", *input_shape[1:]) if dynamic_batch else tuple(input_shape)
    return OnnxArtifact(p, opset, shape, len(data), hashlib.sha256(data).hexdigest())


def check_onnx(path: str | os.PathLike) -> Path:
    """``path`` is a readable ONNX model file (its graph, without external data), or :class:`BadInput`
    naming it."""
    what = "an .onnx file written by `latprune run` or torch.onnx.export"
    p, fix = check_file(path, "the ONNX file", what), f"pass {what}"
    try:
        m = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, OSError) as e:  # what protobuf and onnx raise on a foreign file
        raise BadInput(f"{p} is not an ONNX model ({type(e).__name__}: {one_line(e, 80)}): {fix}") from None
    if not m.graph.input or not m.graph.output:  # an empty file parses as an empty model
        raise BadInput(f"{p} is not an ONNX model (no graph inputs or outputs): {fix}")
    return p


def read_contract(path: str | os.PathLike) -> dict:
    """The preprocessing contract stored in an exported file ({} when it has none)."""
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props["latprune.preprocessing"]) if "latprune.preprocessing" in props else {}


def check_shrink(dense: OnnxArtifact, compact: OnnxArtifact, dense_params: int, compact_params: int) -> dict:
    """A compact model with fewer parameters must give a smaller file; one that did not shrink
    means pruning was a mask, or the exporter kept the dense weights. Returns the gate's record
    (``ok`` and, when it fails, ``detail`` saying why); the run reports it and exits 3."""
    ok = compact.size_bytes < dense.size_bytes or compact_params >= dense_params
    res = {"ok": ok, "dense_bytes": dense.size_bytes, "compact_bytes": compact.size_bytes,
           "ratio": compact.size_bytes / dense.size_bytes, "dense_params": dense_params,
           "compact_params": compact_params}
    if not ok:
        res["detail"] = (f"{compact.path.name} ({compact.size_bytes:,} bytes) is not smaller than {dense.path.name} "
                         f"({dense.size_bytes:,} bytes) although the model has {compact_params:,} of {dense_params:,} "
                         "parameters: the channels were not removed from the exported graph")
    return res
