"""Static int8 quantization of an ONNX model with ONNX Runtime's own tooling (issue 14).

``onnxruntime.quantization.quant_pre_process`` (shape inference, graph optimisation) then
``quantize_static`` in QDQ format: per-channel symmetric int8 weights, 8-bit activations calibrated
on the batches given (MinMax, Entropy or Percentile). The activations' type follows the runtime
(``Backend.quant_config``), because one file cannot serve both well:

- TensorRT's explicit quantization accepts only signed int8 with zero point 0 (:data:`TENSORRT`);
- ONNX Runtime's CPU provider runs such an S8S8 file *slower than fp32* on the build machine
  (AVX-512 VNNI; CIFAR ResNets at batch 32: 1.56-1.67x fp32's latency), while asymmetric uint8
  activations (U8S8, :data:`ORT_CPU`) run at 0.29-0.50x fp32's on four models (BENCHMARKS.md, "Int8").

So a run quantizes for its own runtime and says which in the file's metadata. What is timed for an
int8 latency table (the layer micro-models) and what is deployed (``model.int8.onnx``) go through
this one function. onnxruntime is imported on first use.
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

__all__ = ["CALIBRATION_METHODS", "ACTIVATION_TYPES", "QuantConfig", "ORT_CPU", "TENSORRT", "quantize_int8",
           "is_quantized"]

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("uint8", "int8")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized: the calibration method, per-channel weights, the activations'
    type and whether their zero point is fixed at 0 (symmetric). Weights are always symmetric int8."""

    method: str = "minmax"
    per_channel: bool = True
    activations: str = "uint8"
    symmetric_activations: bool = False
    # 7-bit weights: x86 int8 kernels without VNNI (AVX2, AVX-512F) add pairs of u8 x s8 products in
    # int16, which saturates with full-range weights (255 x 127 x 2 > 32767) and costs accuracy;
    # with 7-bit weights the pair fits. ORT's quantize_static(reduce_range=True).
    reduce_range: bool = False

    def __post_init__(self):
        if self.method not in CALIBRATION_METHODS:
            raise BadInput(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {self.method!r}")
        if self.activations not in ACTIVATION_TYPES:
            raise BadInput(f"activation type must be one of {', '.join(ACTIVATION_TYPES)}, got {self.activations!r}")

    def with_method(self, method: str) -> "QuantConfig":
        return dataclasses.replace(self, method=method)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"format": "QDQ", "weights": "int8"}


ORT_CPU = QuantConfig(activations="uint8", symmetric_activations=False)  # U8S8: ORT CPU's fast int8 kernels
TENSORRT = QuantConfig(activations="int8", symmetric_activations=True)  # S8S8, zero point 0: TensorRT's rule


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
                        activation_type={"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[cfg.activations],
                        weight_type=QuantType.QInt8, calibrate_method=method, reduce_range=cfg.reduce_range,
                        extra_options={"ActivationSymmetric": cfg.symmetric_activations, "WeightSymmetric": True})
        q = onnx.load(str(out))
    onnx.checker.check_model(q)
    return q.SerializeToString()


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether ``model`` holds QuantizeLinear/DequantizeLinear pairs (a QDQ int8 file)."""
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)
