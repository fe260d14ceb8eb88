"""Latency backends: how one layer, or one whole model, is run as deployed and timed.

Each backend is a template: the public methods (``layer_runner``, ``model_runner``, ``measure``)
validate inputs and results (latency finite and > 0), the private ``_*_runner`` methods build a
zero-argument callable that runs one batch, and ``_timer`` times one call. Backends register by
name (``get_backend('ort')``); a miss lists the valid names. Heavy runtimes are imported lazily.

| name | runtime | timed with |
|---|---|---|
| ``ort`` | ONNX Runtime, CPU execution provider | host clock |
| ``torch`` | PyTorch eager, CPU | host clock |
| ``torch-cuda`` | PyTorch eager, CUDA (fp32/fp16) | CUDA events |
| ``ort-cuda`` | ONNX Runtime, CUDA execution provider, IO binding | host clock (``Run`` syncs) |
| ``ort-trt`` | ONNX Runtime, TensorRT execution provider, IO binding | host clock (``Run`` syncs) |
| ``trt`` | TensorRT, native Python API: an engine per layer, shared timing cache | CUDA events |

The GPU rows are written against the documented APIs (TensorRT 10, onnxruntime-gpu, torch.cuda)
but have **not run on a GPU yet**: no GPU has been available to this project (README).
"""
from __future__ import annotations

import abc
import logging
import math
from typing import Callable, ClassVar

import numpy as np

from latprune.errors import BadInput
from latprune.latency_tables.device import cpu_description, gpu_description, latprune_version
from latprune.latency_tables.table import Fingerprint, LayerSignature
from latprune.latency_tables.timing import Timing, time_interleaved, wall_clock_ms

log = logging.getLogger(__name__)

_BACKENDS: dict[str, type["Backend"]] = {}


def register_backend(cls: type["Backend"]) -> type["Backend"]:
    _BACKENDS[cls.name] = cls
    return cls


RUNTIMES = ("ort", "torch", "torch-cuda", "ort-cuda", "ort-trt", "trt")


def get_backend(name: str, threads: int = 2, batch: int = 32, fp16: bool = False) -> "Backend":
    if name not in _BACKENDS:
        raise BadInput(f"unknown runtime {name!r}: use one of {', '.join(sorted(_BACKENDS))}")
    cls = _BACKENDS[name]
    if fp16 and not cls.supports_fp16:
        raise BadInput(f"--fp16 is not available on runtime {name}: use torch-cuda, ort-trt or trt")
    return cls(threads=threads, batch=batch, fp16=fp16)


class Backend(abc.ABC):
    name: ClassVar[str]
    supports_fp16: ClassVar[bool] = False
    loads_onnx: ClassVar[bool] = True  # whole models are timed from ONNX files (else as nn.Modules)

    def __init__(self, threads: int = 2, batch: int = 32, fp16: bool = False):
        if threads < 1 or batch < 1:
            raise BadInput(f"threads and batch must be >= 1, got threads={threads}, batch={batch}")
        self.threads, self.batch, self.fp16 = threads, batch, fp16

    @property
    def dtype(self) -> str:
        return "float16" if self.fp16 else "float32"

    # ---- public, validating ------------------------------------------------------------------
    def device(self) -> str:
        """The device in the fingerprint: CPU model and SIMD flags, or GPU name and driver."""
        return cpu_description()

    def fingerprint(self, input_shape: tuple[int, int, int]) -> Fingerprint:
        return Fingerprint(
            device=self.device(), runtime=self.name, runtime_version=self.version(),
            provider=self.provider, threads=self.threads, batch=self.batch, dtype=self.dtype,
            input_shape=tuple(input_shape), latprune_version=latprune_version(),
        )

    def layer_runner(self, sig: LayerSignature, c_in: int, c_out: int) -> Callable[[], object]:
        if not (1 <= c_in <= max(sig.c_in, 1) and 1 <= c_out <= max(sig.c_out, 1)):
            raise ValueError(f"widths ({c_in}, {c_out}) outside layer {sig.key}")
        if sig.kind == "dwconv" and c_in != c_out:
            raise ValueError(f"depthwise layer needs c_in == c_out, got {c_in}, {c_out}")
        return self._layer_runner(sig, c_in, c_out)

    def model_runner(self, model, input_shape: tuple[int, int, int]) -> Callable[[], object]:
        """``model`` is an ``nn.Module`` (exported first where the runtime needs it), a path, or
        what :meth:`prepare_model` returned."""
        return self._model_runner(model, tuple(input_shape))

    def prepare_model(self, model, input_shape: tuple[int, int, int]):
        """Convert ``model`` once into what this runtime loads (ONNX bytes, where ``loads_onnx``),
        so timing it in several fresh sessions does not export it each time."""
        from torch import nn

        if self.loads_onnx and isinstance(model, nn.Module):
            from latprune.export.onnx_export import onnx_bytes

            return onnx_bytes(model, (self.batch, *input_shape))
        return model

    def time_call(self, fn: Callable[[], object]) -> float:
        """Latency of one call of ``fn``, in ms, on this runtime's clock."""
        return self._timer(fn)

    def measure(self, fns: list[Callable[[], object]], rounds: int, min_round_s: float) -> list[Timing]:
        timings = time_interleaved(fns, rounds=rounds, min_round_s=min_round_s, timer=self._timer)
        for t in timings:
            m = t.median_ms
            if not (math.isfinite(m) and m > 0):
                raise RuntimeError(f"{self.name}: measured latency {m} ms is not a positive number")
        return timings

    # ---- private, per runtime ----------------------------------------------------------------
    provider: ClassVar[str] = ""

    def _timer(self, fn: Callable[[], object]) -> float:
        return wall_clock_ms(fn)

    @abc.abstractmethod
    def version(self) -> str: ...

    @abc.abstractmethod
    def _layer_runner(self, sig: LayerSignature, c_in: int, c_out: int) -> Callable[[], object]: ...

    @abc.abstractmethod
    def _model_runner(self, model, input_shape: tuple[int, int, int]) -> Callable[[], object]: ...


def _layer_input_shape(sig: LayerSignature, batch: int, c_in: int) -> tuple[int, ...]:
    return (batch, c_in) if sig.kind == "linear" else (batch, c_in, *sig.in_hw)


class _OrtBackend(Backend):
    """ONNX Runtime; layer micro-models are built with ``onnx.helper``. Subclasses pick the
    execution provider; after creating a session the provider actually running is checked."""

    def version(self) -> str:
        return _import_ort().__version__

    def _provider_options(self) -> dict:
        return {}

    def session(self, model_bytes_or_path, profile_prefix: str | None = None):
        """A session as deployed; with ``profile_prefix``, ORT's profiler records every node and
        the provider that ran it (``pipeline.diagnose``)."""
        ort = _import_ort()
        available = ort.get_available_providers()
        if self.provider not in available:
            extra = "latprune[cpu]" if self.provider == "CPUExecutionProvider" else "latprune[gpu] (onnxruntime-gpu)"
            raise BadInput(f"ONNX Runtime here offers {available}, not {self.provider}: pip install '{extra}'"
                           " on a machine with the matching GPU and CUDA libraries")
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Two sessions timed interleaved on a small machine: no spinning, or the idle one steals cores.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        providers = [(self.provider, self._provider_options())]
        if self.provider != "CPUExecutionProvider":
            # a node the GPU provider cannot run would silently run on the CPU: make it an error
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
            if self.provider == "TensorrtExecutionProvider":
                providers.append(("CUDAExecutionProvider", {"device_id": 0}))
        try:
            sess = ort.InferenceSession(model_bytes_or_path, sess_options=so, providers=providers)
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidArgument, ...)
            raise RuntimeError(f"ONNX Runtime could not create a {self.provider} session: {str(e)[:300]}") from None
        check_provider(sess, self.provider)
        return sess

    def _runner(self, sess, shape: tuple[int, ...]) -> Callable[[], object]:
        name = sess.get_inputs()[0].name
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        return lambda: sess.run(None, {name: x})

    def _layer_runner(self, sig, c_in, c_out):
        model = layer_onnx(sig, c_in, c_out, self.batch)
        return self._runner(self.session(model.SerializeToString()), _layer_input_shape(sig, self.batch, c_in))

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


class _OrtGpuBackend(_OrtBackend):
    """ONNX Runtime on a GPU provider. Input and output stay on the device (IO binding), so a
    call times the model, not host-device copies; ``Run`` synchronises the provider's stream
    before it returns, so the host clock is the latency. Unverified on a GPU (module docstring)."""

    def device(self) -> str:
        return gpu_description()

    def _runner(self, sess, shape):
        ort = _import_ort()
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
    provider = "TensorrtExecutionProvider"
    supports_fp16 = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        import tempfile

        self.cache_dir = tempfile.mkdtemp(prefix="latprune-ort-trt-")  # engines of this process only

    def _provider_options(self):
        return {"device_id": 0, "trt_fp16_enable": self.fp16, "trt_builder_optimization_level": 3,
                "trt_timing_cache_enable": True, "trt_engine_cache_enable": True,
                "trt_engine_cache_path": self.cache_dir}


@register_backend
class TorchCpuBackend(Backend):
    """PyTorch eager on the CPU, in inference mode; each layer runs as conv + BN + activation."""

    name = "torch"
    provider = "cpu"
    loads_onnx = False

    def version(self) -> str:
        import torch

        return torch.__version__

    def _module_runner(self, module, shape):
        import torch

        torch.set_num_threads(self.threads)
        module = module.eval()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))

        def run():
            with torch.inference_mode():
                return module(x)

        return run

    def _layer_runner(self, sig, c_in, c_out):
        return self._module_runner(layer_module(sig, c_in, c_out), _layer_input_shape(sig, self.batch, c_in))

    def _model_runner(self, model, input_shape):
        from torch import nn

        if not isinstance(model, nn.Module):
            raise BadInput("the torch runtime times nn.Modules, not ONNX files: use --runtime ort")
        return self._module_runner(model, (self.batch, *input_shape))


@register_backend
class TorchCudaBackend(TorchCpuBackend):
    """PyTorch eager on CUDA (fp32, or fp16 weights and inputs), timed with CUDA events on the
    current stream. Unverified on a GPU (module docstring)."""

    name = "torch-cuda"
    provider = "cuda"
    supports_fp16 = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        require_cuda(self.name)

    def device(self) -> str:
        return gpu_description()

    def _module_runner(self, module, shape):
        import copy

        import torch

        dtype = torch.float16 if self.fp16 else torch.float32
        module = copy.deepcopy(module).eval().to("cuda", dtype)  # a copy: the caller's model stays put
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to("cuda", dtype)

        def run():
            with torch.inference_mode():
                return module(x)

        return run

    def _timer(self, fn):
        return cuda_event_ms(fn)


@register_backend
class TensorrtBackend(Backend):
    """TensorRT through its native Python API (the ``[trt]`` extra): each layer micro-model and each
    whole model is parsed from ONNX and built into an engine (fp32 or fp16, builder optimisation
    level fixed, one timing cache shared by every build of this backend), run with
    ``execute_async_v3`` on its own stream and timed with CUDA events on that stream. Device
    buffers are torch CUDA tensors. Unverified on a GPU (module docstring)."""

    name = "trt"
    provider = "TensorRT"
    supports_fp16 = True
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
        """Serialised engine for an ONNX model (static shapes), through the shared timing cache."""
        from latprune.export.tensorrt import TrtConfig, build_serialized

        plan, self.timing_cache = build_serialized(onnx_model, TrtConfig(self.fp16, self.OPT_LEVEL),
                                                   self.timing_cache, self.logger)
        return plan

    def _engine_runner(self, onnx_model: bytes):
        import torch

        trt = self.trt
        engine = trt.Runtime(self.logger).deserialize_cuda_engine(self.build_engine(onnx_model))
        context = engine.create_execution_context()
        stream = torch.cuda.Stream()
        buffers = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(engine.get_tensor_shape(name))
            dtype = torch_dtype(trt, engine.get_tensor_dtype(name))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                buffers[name] = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to("cuda", dtype)
            else:
                buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
            if not context.set_tensor_address(name, buffers[name].data_ptr()):
                raise RuntimeError(f"TensorRT refused the device buffer of {name}")
        torch.cuda.synchronize()

        def run():
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")

        run.stream, run.keep = stream, (engine, context, buffers)  # keep them alive with the runner
        return run

    def _layer_runner(self, sig, c_in, c_out):
        return self._engine_runner(layer_onnx(sig, c_in, c_out, self.batch).SerializeToString())

    def _model_runner(self, model, input_shape):
        model = self.prepare_model(model, input_shape)
        if not isinstance(model, bytes):
            from pathlib import Path

            model = Path(model).read_bytes()
        return self._engine_runner(model)

    def _timer(self, fn):
        return cuda_event_ms(fn, getattr(fn, "stream", None))


def torch_dtype(trt, dt):
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT64: torch.int64, trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool}
    if dt not in table:
        raise RuntimeError(f"TensorRT tensor type {dt} has no torch buffer type here")
    return table[dt]


def cuda_event_ms(fn: Callable[[], object], stream=None) -> float:
    """GPU time of one call, in ms, between two CUDA events recorded on ``stream`` (default: the
    current one) around it."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    fn()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end)


def require_cuda(runtime: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise BadInput(f"runtime {runtime} needs a CUDA GPU and none is visible here: use --runtime ort or torch")


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise BadInput("TensorRT is not installed: pip install 'latprune[trt]' on a GPU host "
                       "(its wheels come from NVIDIA's index)") from None
    return tensorrt


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise BadInput(
            "onnxruntime is not installed: pip install 'latprune[cpu]' (or 'latprune[gpu]' on a GPU host)"
        ) from None
    return onnxruntime


def layer_module(sig: LayerSignature, c_in: int, c_out: int):
    """The layer as PyTorch runs it deployed: conv + BN + activation, or a linear layer."""
    from torch import nn

    if sig.kind == "linear":
        return nn.Linear(c_in, c_out)
    groups = c_out if sig.kind == "dwconv" else 1
    layers = [
        nn.Conv2d(c_in, c_out, sig.kernel, sig.stride, sig.padding, sig.dilation, groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if sig.activation == "relu":
        layers.append(nn.ReLU(inplace=True))
    elif sig.activation == "relu6":
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


def layer_onnx(sig: LayerSignature, c_in: int, c_out: int, batch: int):
    """The layer as ONNX Runtime runs it deployed: Conv with BN folded into its bias, + activation.

    Built with ``onnx.helper`` (about a millisecond) rather than through an exporter.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x_shape = list(_layer_input_shape(sig, batch, c_in))
    nodes, inits = [], []
    if sig.kind == "linear":
        w = rng.standard_normal((c_out, c_in), dtype=np.float32) * 0.1
        inits += [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(c_out, np.float32), "B")]
        nodes.append(helper.make_node("Gemm", ["X", "W", "B"], ["Y"], transB=1))
        y_rank = 2
    else:
        groups = c_out if sig.kind == "dwconv" else 1
        w = rng.standard_normal((c_out, c_in // groups, *sig.kernel), dtype=np.float32) * 0.1
        inits += [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(c_out, np.float32), "B")]
        act = sig.activation in ("relu", "relu6")
        nodes.append(
            helper.make_node(
                "Conv", ["X", "W", "B"], ["C" if act else "Y"], kernel_shape=list(sig.kernel),
                strides=list(sig.stride), pads=[*sig.padding, *sig.padding],
                dilations=list(sig.dilation), group=groups,
            )
        )
        if sig.activation == "relu":
            nodes.append(helper.make_node("Relu", ["C"], ["Y"]))
        elif sig.activation == "relu6":
            nodes.append(helper.make_node("Clip", ["C", "lo", "hi"], ["Y"]))
            inits += [numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")]
        y_rank = 4
    graph = helper.make_graph(
        nodes, "layer",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * y_rank)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
