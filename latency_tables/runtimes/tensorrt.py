"""TensorRT through its native Python API (the ``[trt]`` extra): engines built from ONNX bytes and the
ONE engine runner, used by the latency backend, the TensorRT export's parity and ``latprune bench``.

**Unverified on a GPU.** Written against TensorRT 10's documented Python API
(``Builder.create_network(0)``, ``OnnxParser``, ``IBuilderConfig.builder_optimization_level``,
``create_timing_cache``/``set_timing_cache``, ``build_serialized_network``,
``IExecutionContext.set_tensor_address``/``execute_async_v3``) with torch CUDA tensors as device
buffers; no GPU has been lent to this project, so it has never run (its tests are marked
``tensorrt`` and skip here).

Build settings are fixed so two builds are comparable: the same builder optimisation level, static
shapes (the ONNX file's), fp32, fp16 or int8, and one timing cache shared by every build (dense and
compact), so the compact engine cannot win by a luckier tactic search (TensorRT #4730).

Int8 is TensorRT's *explicit* quantization: the engine is built from a QDQ file
(``runtimes.quantize``: signed int8, zero point 0 for weights and activations, which is what
TensorRT accepts) with the INT8 builder flag and no calibrator; the FP16 flag is set beside it so
layers the file leaves in float may run in half precision, as TensorRT's own int8 guidance does.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from latprune.errors import BadInput
from latprune.latency_tables.device import gpu_description
from latprune.latency_tables.layers import layer_input_shape, layer_onnx
from latprune.latency_tables.runtimes.base import Backend, cuda_event_ms, register_backend, require_cuda
from latprune.latency_tables.runtimes.quantize import is_quantized

__all__ = ["TrtConfig", "import_tensorrt", "build_serialized", "EngineRunner", "TensorrtBackend"]


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise BadInput("TensorRT is not installed: pip install 'latprune[trt]' on a GPU host "
                       "(its wheels come from NVIDIA's index)") from None
    return tensorrt


def torch_dtype(trt, dt):
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT64: torch.int64, trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool}
    if dt not in table:
        raise RuntimeError(f"TensorRT tensor type {dt} has no torch buffer type here")
    return table[dt]


@dataclasses.dataclass(frozen=True)
class TrtConfig:
    fp16: bool = False
    int8: bool = False  # explicit quantization from a QDQ file (the FP16 flag is set beside it)
    opt_level: int = 3  # builder optimisation level, fixed for every build (0-5)
    workspace_mib: int = 2048


def build_serialized(onnx_model: bytes, cfg: TrtConfig, timing_cache: bytes = b"", logger=None) -> tuple[bytes, bytes]:
    """(serialised engine, updated timing cache) for an ONNX model with static shapes."""
    trt = import_tensorrt()
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: every network is explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_model):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = cfg.opt_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer names and tactics in the inspector
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
    if cfg.fp16 or cfg.int8:
        config.set_flag(trt.BuilderFlag.FP16)
    if cfg.int8:  # the scales come from the file's Q/DQ nodes: no calibrator
        config.set_flag(trt.BuilderFlag.INT8)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the engine (its log above says why)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


class EngineRunner:
    """One deserialised engine, its execution context and torch CUDA buffers on a private stream.
    Calling the runner executes the engine once (asynchronously, on ``stream``); inputs start as
    seeded random data, :meth:`infer` copies real ones in."""

    def __init__(self, engine: bytes, logger=None):
        require_cuda("trt")
        trt = self.trt = import_tensorrt()
        self.logger = logger or trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(engine)
        if self.engine is None:
            raise RuntimeError("TensorRT cannot deserialize the engine: built by another TensorRT version?")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.inputs, self.outputs, self.host = {}, {}, {}
        gen = torch.Generator().manual_seed(0)
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"engine tensor {name} has a dynamic shape {shape}: export with a static batch")
            dtype = torch_dtype(trt, self.engine.get_tensor_dtype(name))
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            buf = (torch.randn(shape, generator=gen).to("cuda", dtype) if is_input
                   else torch.empty(shape, dtype=dtype, device="cuda"))
            self.host[name] = torch.zeros(shape, dtype=dtype).pin_memory()  # pinned: async copies
            (self.inputs if is_input else self.outputs)[name] = buf
            if not self.context.set_tensor_address(name, buf.data_ptr()):
                raise RuntimeError(f"TensorRT refused the device buffer of {name}")
        torch.cuda.synchronize()

    @classmethod
    def from_file(cls, path: str | Path) -> "EngineRunner":
        return cls(Path(path).read_bytes())

    def __call__(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        """Host in, host out: copy up, run, copy down, synchronise."""
        (name, buf), = self.inputs.items()
        with torch.cuda.stream(self.stream):
            buf.copy_(torch.from_numpy(np.ascontiguousarray(x)).to(buf.dtype))
            self()
            outs = [b.float().cpu().numpy() for b in self.outputs.values()]
        self.stream.synchronize()
        return outs

    def gpu_compute_ms(self) -> float:
        """GPU time of one execution between CUDA events on the engine's stream (no copies)."""
        return cuda_event_ms(self, self.stream)

    def end_to_end_ms(self) -> float:
        """Host clock around pinned host->device copy, execution, device->host copy and sync."""
        t0 = time.perf_counter()
        with torch.cuda.stream(self.stream):
            for name, buf in self.inputs.items():
                buf.copy_(self.host[name], non_blocking=True)
            self()
            for name, buf in self.outputs.items():
                self.host[name].copy_(buf, non_blocking=True)
        self.stream.synchronize()
        return (time.perf_counter() - t0) * 1e3


@register_backend
class TensorrtBackend(Backend):
    """TensorRT through its native Python API (the ``[trt]`` extra): each layer micro-model and each
    whole model is parsed from ONNX and built into an engine (fp32, fp16 or int8 from a QDQ file, builder optimisation
    level fixed, one timing cache shared by every build of this backend), run with
    ``execute_async_v3`` on its own stream and timed with CUDA events on that stream. Device
    buffers are torch CUDA tensors. Unverified on a GPU (module docstring)."""

    name = "trt"
    library = "tensorrt"
    static_shapes = True
    on_gpu = True
    provider = "TensorRT"
    supports_fp16 = True
    supports_int8 = True  # from QDQ files (runtimes.quantize), explicit quantization
    OPT_LEVEL = 3  # fixed, so builds of the dense and compact models are comparable

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        require_cuda(self.name)
        self.trt = import_tensorrt()
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.timing_cache = b""  # serialised; grows with every build

    def version(self) -> str:
        return self.trt.__version__

    def device(self) -> str:
        return gpu_description()

    def build_engine(self, onnx_model: bytes) -> bytes:
        """Serialised engine for an ONNX model (static shapes), through the shared timing cache; a
        QDQ file is built with the INT8 flag whatever the backend's precision (its Q/DQ nodes say
        int8), so an fp32 backend times an fp32 file and an int8 file side by side."""
        int8 = self.precision == "int8" or is_quantized(onnx.load_from_string(onnx_model))
        cfg = TrtConfig(self.fp16, int8, self.OPT_LEVEL)
        plan, self.timing_cache = build_serialized(onnx_model, cfg, self.timing_cache, self.logger)
        return plan

    def _engine_runner(self, onnx_model: bytes) -> EngineRunner:
        return EngineRunner(self.build_engine(onnx_model), self.logger)

    def _layer_runner(self, sig, c_in, c_out):
        model = layer_onnx(sig, c_in, c_out, self.batch)
        if self.precision == "int8":
            return self._engine_runner(self.quantized(model, layer_input_shape(sig, self.batch, c_in)))
        return self._engine_runner(model.SerializeToString())

    def _model_runner(self, model, input_shape):
        model = self.prepare_model(model, input_shape)
        if not isinstance(model, bytes):
            model = Path(model).read_bytes()
        return self._engine_runner(model)

    def _timer(self, fn):
        return cuda_event_ms(fn, getattr(fn, "stream", None))


