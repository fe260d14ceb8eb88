"""Latency backends: how one layer, or one whole model, is run as deployed and timed.

Each backend is a template: the public ``measure_*`` methods validate inputs and results
(latency finite and > 0), the private ``_*_runner`` methods build a zero-argument callable that
runs one batch. Backends register by name (``get_backend('ort')``); a miss lists the valid names.
Heavy runtimes are imported lazily.
"""
from __future__ import annotations

import abc
import logging
import math
from typing import Callable, ClassVar

import numpy as np

from latprune.errors import BadInput
from latprune.latency_tables.device import cpu_description
from latprune.latency_tables.table import Fingerprint, LayerSignature
from latprune.latency_tables.timing import Timing, time_interleaved

log = logging.getLogger(__name__)

_BACKENDS: dict[str, type["Backend"]] = {}


def register_backend(cls: type["Backend"]) -> type["Backend"]:
    _BACKENDS[cls.name] = cls
    return cls


def get_backend(name: str, threads: int = 2, batch: int = 32) -> "Backend":
    if name not in _BACKENDS:
        raise BadInput(f"unknown runtime {name!r}: use one of {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name](threads=threads, batch=batch)


class Backend(abc.ABC):
    name: ClassVar[str]
    dtype = "float32"

    def __init__(self, threads: int = 2, batch: int = 32):
        if threads < 1 or batch < 1:
            raise BadInput(f"threads and batch must be >= 1, got threads={threads}, batch={batch}")
        self.threads, self.batch = threads, batch

    # ---- public, validating ------------------------------------------------------------------
    def fingerprint(self, input_shape: tuple[int, int, int]) -> Fingerprint:
        return Fingerprint(
            device=cpu_description(), runtime=self.name, runtime_version=self.version(),
            provider=self.provider, threads=self.threads, batch=self.batch, dtype=self.dtype,
            input_shape=tuple(input_shape),
        )

    def layer_runner(self, sig: LayerSignature, c_in: int, c_out: int) -> Callable[[], object]:
        if not (1 <= c_in <= max(sig.c_in, 1) and 1 <= c_out <= max(sig.c_out, 1)):
            raise ValueError(f"widths ({c_in}, {c_out}) outside layer {sig.key}")
        if sig.kind == "dwconv" and c_in != c_out:
            raise ValueError(f"depthwise layer needs c_in == c_out, got {c_in}, {c_out}")
        return self._layer_runner(sig, c_in, c_out)

    def model_runner(self, model, input_shape: tuple[int, int, int]) -> Callable[[], object]:
        """``model`` is an ``nn.Module`` (exported first where the runtime needs it) or a path."""
        return self._model_runner(model, tuple(input_shape))

    def measure(self, fns: list[Callable[[], object]], rounds: int, min_round_s: float) -> list[Timing]:
        timings = time_interleaved(fns, rounds=rounds, min_round_s=min_round_s)
        for t in timings:
            m = t.median_ms
            if not (math.isfinite(m) and m > 0):
                raise RuntimeError(f"{self.name}: measured latency {m} ms is not a positive number")
        return timings

    # ---- private, per runtime ----------------------------------------------------------------
    provider: ClassVar[str] = ""

    @abc.abstractmethod
    def version(self) -> str: ...

    @abc.abstractmethod
    def _layer_runner(self, sig: LayerSignature, c_in: int, c_out: int) -> Callable[[], object]: ...

    @abc.abstractmethod
    def _model_runner(self, model, input_shape: tuple[int, int, int]) -> Callable[[], object]: ...


def _layer_input_shape(sig: LayerSignature, batch: int, c_in: int) -> tuple[int, ...]:
    return (batch, c_in) if sig.kind == "linear" else (batch, c_in, *sig.in_hw)


@register_backend
class OrtCpuBackend(Backend):
    """ONNX Runtime, CPU execution provider; layer micro-models are built with ``onnx.helper``."""

    name = "ort"
    provider = "CPUExecutionProvider"

    def version(self) -> str:
        return _import_ort().__version__

    def session(self, model_bytes_or_path):
        ort = _import_ort()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Two sessions timed interleaved on a small machine: no spinning, or the idle one steals cores.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(model_bytes_or_path, sess_options=so, providers=[self.provider])
        running = sess.get_providers()
        if not running or running[0] != self.provider:
            raise RuntimeError(f"asked ONNX Runtime for {self.provider}, but {running} is running")
        return sess

    def _runner(self, sess, shape: tuple[int, ...]) -> Callable[[], object]:
        name = sess.get_inputs()[0].name
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        return lambda: sess.run(None, {name: x})

    def _layer_runner(self, sig, c_in, c_out):
        model = layer_onnx(sig, c_in, c_out, self.batch)
        return self._runner(self.session(model.SerializeToString()), _layer_input_shape(sig, self.batch, c_in))

    def _model_runner(self, model, input_shape):
        from torch import nn

        if isinstance(model, nn.Module):
            from latprune.export.onnx_export import onnx_bytes

            model = onnx_bytes(model, (self.batch, *input_shape))
        elif not isinstance(model, bytes):
            model = str(model)  # a path to an .onnx file
        return self._runner(self.session(model), (self.batch, *input_shape))


@register_backend
class TorchCpuBackend(Backend):
    """PyTorch eager on the CPU, in inference mode; each layer runs as conv + BN + activation."""

    name = "torch"
    provider = "cpu"

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
