"""ONNX Runtime: the CPU execution provider, and the CUDA and TensorRT providers of onnxruntime-gpu.

:func:`ort_session` is the one place an ONNX Runtime session is created (timing, parity, the
provider diagnosis): threads pinned, spin-waiting off, and the provider actually running checked,
because ORT falls back to the CPU silently. onnxruntime is an optional dependency (the ``cpu`` or
``gpu`` extra), imported on first use.
"""
from __future__ import annotations

import dataclasses
import tempfile
from typing import Callable

import numpy as np
import onnx

from latprune.errors import BadInput
from latprune.latency_tables.device import gpu_description, saturating_int8
from latprune.latency_tables.layers import layer_input_shape, layer_onnx
from latprune.latency_tables.runtimes.base import Backend, register_backend
from latprune.latency_tables.runtimes.quantize import ORT_CPU, QuantConfig, is_quantized

__all__ = ["import_ort", "ort_session", "check_provider", "OrtCpuBackend", "OrtCudaBackend", "OrtTensorrtBackend"]


def import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise BadInput(
            "onnxruntime is not installed: pip install 'latprune[cpu]' (or 'latprune[gpu]' on a GPU host)"
        ) from None
    return onnxruntime


def ort_session(model_bytes_or_path, provider: str = "CPUExecutionProvider", threads: int = 2,
                provider_options: dict | None = None, profile_prefix: str | None = None):
    """An ONNX Runtime session on ``provider``, as deployed (sequential, ``threads`` intra-op
    threads, all graph optimisations, no spinning); with ``profile_prefix`` ORT's profiler records
    every node and the provider that ran it. Fails unless ``provider`` is the one running."""
    ort = import_ort()
    available = ort.get_available_providers()
    if provider not in available:
        extra = "latprune[cpu]" if provider == "CPUExecutionProvider" else "latprune[gpu] (onnxruntime-gpu)"
        raise BadInput(f"ONNX Runtime here offers {available}, not {provider}: pip install '{extra}'"
                       " on a machine with the matching GPU and CUDA libraries")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Two sessions timed interleaved on a small machine: no spinning, or the idle one steals cores.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    providers = [(provider, provider_options or {})]
    if provider != "CPUExecutionProvider":
        # a node the GPU provider cannot run would silently run on the CPU: make it an error
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        if provider == "TensorrtExecutionProvider":
            providers.append(("CUDAExecutionProvider", {"device_id": 0}))
    try:
        sess = ort.InferenceSession(model_bytes_or_path, sess_options=so, providers=providers)
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidArgument, ...)
        raise RuntimeError(f"ONNX Runtime could not create a {provider} session: {str(e)[:300]}") from None
    check_provider(sess, provider)
    return sess


class _OrtBackend(Backend):
    """ONNX Runtime; layer micro-models are built with ``onnx.helper``. Subclasses pick the
    execution provider; after creating a session the provider actually running is checked."""

    library = "onnxruntime"

    def version(self) -> str:
        return import_ort().__version__

    def _provider_options(self) -> dict:
        return {}

    def session(self, model_bytes_or_path, profile_prefix: str | None = None):
        """A session as deployed; with ``profile_prefix``, ORT's profiler records every node and
        the provider that ran it (``pipeline.diagnose``)."""
        return ort_session(model_bytes_or_path, self.provider, self.threads, self._provider_options(), profile_prefix)

    def _runner(self, sess, shape: tuple[int, ...]) -> Callable[[], object]:
        name = sess.get_inputs()[0].name
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        return lambda: sess.run(None, {name: x})

    def _layer_runner(self, sig, c_in, c_out):
        model = layer_onnx(sig, c_in, c_out, self.batch)
        shape = layer_input_shape(sig, self.batch, c_in)
        data = self.quantized(model, shape) if self.precision == "int8" else model.SerializeToString()
        return self._runner(self.session(data), shape)

    def _model_runner(self, model, input_shape):
        model = self.prepare_model(model, input_shape)
        if not isinstance(model, bytes):
            model = str(model)  # a path to an .onnx file
        return self._runner(self.session(model), (self.batch, *input_shape))


def check_provider(sess, requested: str) -> None:
    """ORT falls back to the CPU silently when a provider cannot start (missing CUDA libraries, no
    GPU): fail unless ``requested`` is the provider running first."""
    running = sess.get_providers()
    if not running or running[0] != requested:
        raise BadInput(f"asked ONNX Runtime for {requested}, but {running} is running (it fell back silently): "
                       "check the GPU, the CUDA/TensorRT libraries and onnxruntime-gpu")


@register_backend
class OrtCpuBackend(_OrtBackend):
    """ONNX Runtime, CPU execution provider."""

    name = "ort"
    provider = "CPUExecutionProvider"
    supports_int8 = True  # QDQ int8 (runtimes.quantize); its kernels use AVX2 / AVX-512 VNNI where present

    def quant_config(self, method: str = "minmax") -> QuantConfig:
        """Asymmetric uint8 activations (U8S8): S8S8 runs slower than fp32 here (runtimes.quantize);
        7-bit weights on an x86 CPU without VNNI, where full-range U8S8 products saturate."""
        return dataclasses.replace(ORT_CPU.with_method(method), reduce_range=saturating_int8())


class _OrtGpuBackend(_OrtBackend):
    """ONNX Runtime on a GPU provider. Input and output stay on the device (IO binding), so a
    call times the model, not host-device copies; ``Run`` synchronises the provider's stream
    before it returns, so the host clock is the latency. Unverified on a GPU (module docstring)."""

    on_gpu = True

    def device(self) -> str:
        return gpu_description()

    def _runner(self, sess, shape):
        ort = import_ort()
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        binding = sess.io_binding()
        binding.bind_ortvalue_input(sess.get_inputs()[0].name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        for out in sess.get_outputs():
            binding.bind_output(out.name, "cuda", 0)
        return lambda: sess.run_with_iobinding(binding)


@register_backend
class OrtCudaBackend(_OrtGpuBackend):
    name = "ort-cuda"
    provider = "CUDAExecutionProvider"

    def _provider_options(self):
        return {"device_id": 0, "cudnn_conv_algo_search": "EXHAUSTIVE"}


@register_backend
class OrtTensorrtBackend(_OrtGpuBackend):
    name = "ort-trt"
    static_shapes = True
    provider = "TensorrtExecutionProvider"
    supports_fp16 = True
    supports_int8 = True  # explicit quantization: the QDQ file's scales (trt_int8_enable, no calibration table)

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.cache_dir = tempfile.mkdtemp(prefix="latprune-ort-trt-")  # engines of this process only

    def session(self, model_bytes_or_path, profile_prefix: str | None = None):
        """As deployed; a QDQ file gets ``trt_int8_enable`` whatever the backend's precision (its
        Q/DQ nodes say int8, and carry the scales: no calibration table). Parses the model once per
        session to decide; never run on a GPU (unverified, as the rest of this class)."""
        proto = (onnx.load_from_string(model_bytes_or_path) if isinstance(model_bytes_or_path, bytes)
                 else onnx.load(str(model_bytes_or_path)))
        options = {**self._provider_options(), "trt_int8_enable": self.precision == "int8" or is_quantized(proto)}
        return ort_session(model_bytes_or_path, self.provider, self.threads, options, profile_prefix)

    def _provider_options(self):
        return {"device_id": 0, "trt_fp16_enable": self.fp16, "trt_int8_enable": self.precision == "int8",
                "trt_builder_optimization_level": 3,
                "trt_timing_cache_enable": True, "trt_engine_cache_enable": True,
                "trt_engine_cache_path": self.cache_dir}

