"""Static int8 quantization of an ONNX model with ONNX Runtime's own tooling (issue 14).

``onnxruntime.quantization.quant_pre_process`` (shape inference, graph optimisation) then
``quantize_static`` in QDQ format: per-channel int8 weights, int8 activations calibrated on the
batches given (MinMax, Entropy or Percentile). Activations are quantized symmetrically (zero point
0) by default: TensorRT's explicit quantization accepts only that, so one QDQ file serves ONNX
Runtime and TensorRT alike (what symmetry costs on ORT CPU is measured, not assumed: README). What
is timed for an int8 latency table (the layer micro-models) and what is deployed
(``model.int8.onnx``) go through this one function. onnxruntime is imported on first use.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx

from latprune.errors import BadInput

__all__ = ["CALIBRATION_METHODS", "QuantConfig", "quantize_int8", "is_quantized"]

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized: the calibration method, per-channel weights, symmetric activations."""

    method: str = "minmax"
    per_channel: bool = True
    symmetric_activations: bool = True  # TensorRT's requirement; ORT CPU runs either

    def __post_init__(self):
        if self.method not in CALIBRATION_METHODS:
            raise BadInput(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {self.method!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"format": "QDQ", "weights": "int8", "activations": "int8"}


def quantize_int8(model: onnx.ModelProto | bytes, batches: Iterable[np.ndarray], cfg: QuantConfig = QuantConfig()
                  ) -> bytes:
    """``model`` (one float32 input) as a QDQ int8 model, calibrated on ``batches`` (arrays of the
    input's shape); returns the serialised file. The model is checked by ONNX's checker after."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)
    name = proto.graph.input[0].name
    feeds = [{name: np.ascontiguousarray(b, dtype=np.float32)} for b in batches]
    if not feeds:
        raise BadInput("int8 calibration needs at least one batch of inputs")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.method]
    with tempfile.TemporaryDirectory(prefix="latprune-int8-") as d:
        src, pre, out = Path(d) / "fp32.onnx", Path(d) / "pre.onnx", Path(d) / "int8.onnx"
        onnx.save(proto, str(src))
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                        extra_options={"ActivationSymmetric": cfg.symmetric_activations, "WeightSymmetric": True})
        q = onnx.load(str(out))
    onnx.checker.check_model(q)
    return q.SerializeToString()


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether ``model`` holds QuantizeLinear/DequantizeLinear pairs (a QDQ int8 file)."""
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)
