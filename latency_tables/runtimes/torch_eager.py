"""PyTorch eager, on the CPU or on CUDA (timed with CUDA events)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from latprune.errors import BadInput
from latprune.latency_tables.device import gpu_description
from latprune.latency_tables.layers import layer_input_shape, layer_module
from latprune.latency_tables.runtimes.base import Backend, cuda_event_ms, register_backend, require_cuda

__all__ = ["TorchCpuBackend", "TorchCudaBackend"]


@register_backend
class TorchCpuBackend(Backend):
    """PyTorch eager on the CPU, in inference mode; each layer runs as conv + BN + activation."""

    name = "torch"
    library = "torch"
    provider = "cpu"
    loads_onnx = False

    def version(self) -> str:
        return torch.__version__

    def _module_runner(self, module, shape):
        torch.set_num_threads(self.threads)
        module = module.eval()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))

        def run():
            with torch.inference_mode():
                return module(x)

        return run

    def _layer_runner(self, sig, c_in, c_out):
        return self._module_runner(layer_module(sig, c_in, c_out), layer_input_shape(sig, self.batch, c_in))

    def _model_runner(self, model, input_shape):
        if not isinstance(model, nn.Module):
            raise BadInput("the torch runtime times nn.Modules, not ONNX files: use --runtime ort")
        return self._module_runner(model, (self.batch, *input_shape))


@register_backend
class TorchCudaBackend(TorchCpuBackend):
    """PyTorch eager on CUDA (fp32, or fp16 weights and inputs), timed with CUDA events on the
    current stream. Unverified on a GPU (module docstring)."""

    name = "torch-cuda"
    on_gpu = True
    provider = "cuda"
    supports_fp16 = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        require_cuda(self.name)

    def device(self) -> str:
        return gpu_description()

    def _module_runner(self, module, shape):
        dtype = torch.float16 if self.fp16 else torch.float32
        module = copy.deepcopy(module).eval().to("cuda", dtype)  # a copy: the caller's model stays put
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to("cuda", dtype)

        def run():
            with torch.inference_mode():
                return module(x)

        return run

    def _timer(self, fn):
        return cuda_event_ms(fn)

