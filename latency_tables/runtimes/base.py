"""The runtime contract and its registry (the runtimes themselves: ``latprune.latency_tables.runtimes``).

Each backend is a template: the public methods (``layer_runner``, ``model_runner``, ``measure``)
validate inputs and results (latency finite and > 0), the private ``_*_runner`` methods build a
zero-argument callable that runs one batch, and ``_timer`` times one call. Backends register by
name (``get_backend('ort')``); a miss lists the valid names. Heavy runtimes are imported lazily.
"""
from __future__ import annotations

import abc
import logging
import math
from typing import Callable, ClassVar

import numpy as np
import onnx
import torch
from torch import nn

from latprune.errors import BadInput
from latprune.latency_tables.device import cpu_description, latprune_version
from latprune.latency_tables.runtimes.convert import onnx_bytes
from latprune.latency_tables.runtimes.quantize import TENSORRT, QuantConfig, is_quantized, quantize_int8
from latprune.latency_tables.table import Fingerprint, LayerSignature
from latprune.latency_tables.timing import Timing, time_interleaved, wall_clock_ms

__all__ = ["PRECISIONS", "Backend", "register_backend", "get_backend", "runtime_names", "runtime_class",
           "cuda_event_ms", "require_cuda", "resolve_precision"]

log = logging.getLogger(__name__)

_BACKENDS: dict[str, type["Backend"]] = {}
PRECISIONS = ("fp32", "fp16", "int8")  # what the deployed model computes in (int8: QDQ, runtimes.quantize)
DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}  # the fingerprint's name of each


def register_backend(cls: type["Backend"]) -> type["Backend"]:
    """Class decorator: make a runtime available by its ``name`` (CLI choices, configs, docs)."""
    _BACKENDS[cls.name] = cls
    return cls


def runtime_names() -> tuple[str, ...]:
    """Every registered runtime, in registration order: the single source of the names."""
    return tuple(_BACKENDS)


def runtime_class(name: str, fp16: bool = False, precision: str | None = None) -> type["Backend"]:
    """The registered class of runtime ``name`` (its capabilities, without starting it)."""
    if name not in _BACKENDS:
        raise BadInput(f"unknown runtime {name!r}: use one of {', '.join(sorted(_BACKENDS))}")
    cls = _BACKENDS[name]
    precision = resolve_precision(fp16, precision)
    if precision == "fp16" and not cls.supports_fp16:
        fp16_ok = ", ".join(n for n, c in _BACKENDS.items() if c.supports_fp16)
        raise BadInput(f"--fp16 is not available on runtime {name}: use {fp16_ok}")
    if precision == "int8" and not cls.supports_int8:
        int8_ok = ", ".join(n for n, c in _BACKENDS.items() if c.supports_int8)
        raise BadInput(f"--precision int8 is not available on runtime {name}: use {int8_ok}")
    return cls


def get_backend(name: str, threads: int = 2, batch: int = 32, fp16: bool = False,
                precision: str | None = None) -> "Backend":
    """Runtime ``name`` for ``batch`` images on ``threads`` threads, computing in ``precision``
    (``fp16=True`` is the older spelling of ``precision="fp16"``)."""
    cls = runtime_class(name, fp16, precision)
    return cls(threads=threads, batch=batch, precision=resolve_precision(fp16, precision))


def resolve_precision(fp16: bool, precision: str | None) -> str:
    """The precision asked for by ``--precision`` and its older alias ``--fp16`` (None: fp32)."""
    if precision is None:
        return "fp16" if fp16 else "fp32"
    if precision not in PRECISIONS:
        raise BadInput(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if fp16 and precision != "fp16":
        raise BadInput(f"--fp16 and --precision {precision} disagree: give one of them")
    return precision


class Backend(abc.ABC):
    name: ClassVar[str]
    supports_fp16: ClassVar[bool] = False
    supports_int8: ClassVar[bool] = False  # times QDQ int8 models (runtimes.quantize)
    loads_onnx: ClassVar[bool] = True  # whole models are timed from ONNX files (else as nn.Modules)
    static_shapes: ClassVar[bool] = False  # engines built for one input shape (no dynamic batch)
    on_gpu: ClassVar[bool] = False
    library: ClassVar[str] = ""  # the package that runs the model: onnxruntime, torch, tensorrt

    def __init__(self, threads: int = 2, batch: int = 32, fp16: bool = False, precision: str | None = None):
        if threads < 1 or batch < 1:
            raise BadInput(f"threads and batch must be >= 1, got threads={threads}, batch={batch}")
        self.threads, self.batch = threads, batch
        self.precision = resolve_precision(fp16, precision)
        if not {"fp32": True, "fp16": self.supports_fp16, "int8": self.supports_int8}[self.precision]:
            raise BadInput(f"runtime {self.name} does not run {self.precision} here: use fp32 on it")
        self.fp16 = self.precision == "fp16"

    @property
    def dtype(self) -> str:
        """The precision as the table's fingerprint names it: a table of another precision is
        refused. Int8 names the activation form too (``int8-u8s8``, ``int8-s8s8``): the two run at
        very different speeds (``runtimes.quantize``)."""
        if self.precision != "int8":
            return DTYPES[self.precision]
        return f"int8-{'u8' if self.quant_config().activations == 'uint8' else 's8'}s8"

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
        so timing it in several fresh sessions does not export it each time. At int8 a float
        model is quantized first; a QDQ file (such as ``model.int8.onnx``) is timed as it is."""
        if self.loads_onnx and isinstance(model, nn.Module):
            model = onnx_bytes(model, (self.batch, *input_shape))
        if self.precision != "int8" or not self.loads_onnx:
            return model
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
        return model if is_quantized(proto) else self.quantized(proto, (self.batch, *input_shape))

    def quant_config(self, method: str = "minmax") -> QuantConfig:
        """How int8 files for this runtime are quantized (``runtimes.quantize``): signed symmetric
        activations (TensorRT's rule) unless the runtime runs another form faster."""
        return TENSORRT.with_method(method)

    def quantized(self, model: onnx.ModelProto, shape: tuple[int, ...]) -> bytes:
        """``model`` quantized for timing (int8) as :meth:`quant_config` says. Latency does not
        depend on the calibrated scales, so one seeded standard-normal batch calibrates it; the
        deployed file is calibrated on images (``export.int8``). Both go through ``runtimes.quantize``."""
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        return quantize_int8(model, [x], self.quant_config())

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


def cuda_event_ms(fn: Callable[[], object], stream=None) -> float:
    """GPU time of one call, in ms, between two CUDA events recorded on ``stream`` (default: the
    current one) around it."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    fn()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end)


def require_cuda(runtime: str) -> None:
    if not torch.cuda.is_available():
        raise BadInput(f"runtime {runtime} needs a CUDA GPU and none is visible here: use --runtime ort or torch")


