"""One call from a pruned ``nn.Module`` to deployment files: :func:`export_model`.

The Python API's counterpart of ``latprune run``'s export stage, for a model pruned in the user's
own loop (``latprune.LatencyPruner``): single-file ONNX with every output named
(``models.outputs``), the input shape and the outputs' names and shapes in the file's metadata
contract, parity with torch output by output, the file-shrink check against the dense model when
it is given, and ``export.json`` recording all of it. Detection models are exported as they
return: raw head outputs (box decoding and NMS stay in the user's runtime; README, "Python API").
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from latprune.errors import BadInput, ParityError
from latprune.export.onnx_export import OnnxArtifact, check_shrink, contract_metadata, export_onnx
from latprune.export.parity import ATOL, MIN_TOP1, RTOL, Parity, check_parity
from latprune.io import write_json_atomic
from latprune.latency_tables.device import latprune_version
from latprune.latency_tables.runtimes.convert import OPSET
from latprune.models.outputs import input_shape_of, output_shapes

__all__ = ["Deployment", "export_model"]

log = logging.getLogger(__name__)

PARITY_BATCHES = 3  # seeded random batches parity runs on beside the example inputs


@dataclasses.dataclass(frozen=True)
class Deployment:
    """What :func:`export_model` wrote and checked."""

    model: OnnxArtifact
    dense: OnnxArtifact | None
    parity: Parity
    shrink: dict[str, Any] | None
    outputs: dict[str, list[int]]  # name -> shape at the example batch
    report: Path  # export.json

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "dense": self.dense.to_dict() if self.dense else None,
                "parity": self.parity.to_dict(), "shrink": self.shrink, "outputs": self.outputs}


def export_model(model: nn.Module, example_inputs: torch.Tensor, out_dir: str | os.PathLike, *,
                 dense: nn.Module | None = None, preprocessing: dict[str, Any] | None = None, opset: int = OPSET,
                 dynamic_batch: bool = False, parity_inputs: Iterable[torch.Tensor] | None = None,
                 atol: float = ATOL, rtol: float = RTOL, min_top1: float = MIN_TOP1, check: bool = True) -> Deployment:
    """Export ``model`` to ``out_dir/model.onnx`` (and ``dense`` to ``dense.onnx``) and check it.

    Args:
        model: the (pruned) model; exported in eval mode, left in the mode it was in.
        example_inputs: one batch ``(N, C, H, W)``; N is the file's static batch unless ``dynamic_batch``.
        out_dir: the folder the files go to (created; files appear only complete).
        dense: the model before pruning, exported beside it for the shrink check and side-by-side timing.
        preprocessing: the input contract stored in the file (mean, std, channel order, classes, ...).
        opset: the ONNX opset.
        dynamic_batch: name the batch axis ``batch`` on the input and every output.
        parity_inputs: batches parity runs on (default: ``example_inputs`` and
            ``PARITY_BATCHES`` seeded standard-normal batches of its shape).
        atol, rtol, min_top1: parity tolerances (``export.parity``).
        check: raise :class:`ParityError` when parity fails or the file did not shrink (after writing
            ``export.json``, which records why).

    Returns:
        :class:`Deployment`: the artifacts, parity per output, the shrink check, the outputs' shapes.
    """
    input_shape_of(example_inputs)
    if any(p.device.type != "cpu" for p in model.parameters()):  # exported and compared on the CPU
        model = copy.deepcopy(model).cpu()
    if dense is not None and any(p.device.type != "cpu" for p in dense.parameters()):
        dense = copy.deepcopy(dense).cpu()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out} is a file: pass a folder to export into")
    shape = tuple(int(d) for d in example_inputs.shape)
    outputs = {k: [shape[0], *v[1:]] for k, v in output_shapes(model, shape[1:]).items()}
    contract = {"input_shape": list(shape), **(preprocessing or {})}
    meta = contract_metadata(contract, version=latprune_version(), outputs=json.dumps(outputs),
                             batch="dynamic" if dynamic_batch else str(shape[0]))
    out.mkdir(parents=True, exist_ok=True)
    art = export_onnx(model, out / "model.onnx", shape, opset, meta, dynamic_batch)
    d = export_onnx(dense, out / "dense.onnx", shape, opset, meta, dynamic_batch) if dense is not None else None
    if parity_inputs is None:
        g = torch.Generator().manual_seed(0)
        parity_inputs = [example_inputs.detach().cpu(),
                         *(torch.randn(shape, generator=g) for _ in range(PARITY_BATCHES))]
    was_training = model.training
    try:
        parity = check_parity(model, art.path, [x.detach().cpu() for x in parity_inputs], atol, rtol, min_top1)
    finally:
        model.train(was_training)
    shrink = None
    if dense is not None:
        shrink = check_shrink(d, art, sum(p.numel() for p in dense.parameters()),
                              sum(p.numel() for p in model.parameters()))
    report = out / "export.json"
    dep = Deployment(art, d, parity, shrink, outputs, report)
    write_json_atomic(report, dep.to_dict())
    (log.info if parity.ok else log.error)("parity: %s", parity.message())
    if check and not parity.ok:
        raise ParityError(parity.message())
    if check and shrink is not None and not shrink["ok"]:
        raise ParityError(shrink["detail"])
    return dep
