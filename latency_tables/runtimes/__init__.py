"""Runtimes a latency table and a deployed model are timed on, behind one registry.

| name | runtime | timed with |
|---|---|---|
| ``ort`` | ONNX Runtime, CPU execution provider (fp32; int8: QDQ files, ``runtimes.quantize``) | host clock |
| ``torch`` | PyTorch eager, CPU | host clock |
| ``torch-cuda`` | PyTorch eager, CUDA (fp32/fp16) | CUDA events |
| ``ort-cuda`` | ONNX Runtime, CUDA execution provider, IO binding | host clock (``Run`` syncs) |
| ``ort-trt`` | ONNX Runtime, TensorRT execution provider, IO binding | host clock (``Run`` syncs) |
| ``trt`` | TensorRT, native Python API: an engine per layer, shared timing cache | CUDA events |

One module per runtime family (``ort``, ``torch_eager``, ``tensorrt``), each registering its
backends with :func:`~latprune.latency_tables.runtimes.base.register_backend`; importing this
package registers them all, and :data:`RUNTIMES` is what they registered. A new runtime is a new
module here, imported below. The GPU rows are written against the documented APIs but have
**not run on a GPU yet** (README).
"""
from latprune.latency_tables.runtimes import ort, tensorrt, torch_eager  # noqa: F401 (they register)
from latprune.latency_tables.runtimes.base import (
    PRECISIONS,
    Backend,
    get_backend,
    register_backend,
    runtime_class,
    runtime_names,
)

__all__ = ["PRECISIONS", "Backend", "get_backend", "register_backend", "runtime_class", "runtime_names", "RUNTIMES"]

RUNTIMES = runtime_names()
