"""TensorRT deployment (the ``[trt]`` extra): ONNX file -> ``.engine``, layer information, parity
against ONNX Runtime, and latency with and without host<->device copies.

**Unverified on a GPU.** This module is written against TensorRT 10's documented Python API
(``Builder.create_network(0)``, ``OnnxParser``, ``IBuilderConfig.builder_optimization_level``,
``create_timing_cache``/``set_timing_cache``, ``build_serialized_network``,
``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``,
``IExecutionContext.set_tensor_address``/``execute_async_v3``) with torch CUDA tensors as device
buffers, but no GPU has been lent to this project, so it has never run: its tests are marked
``tensorrt`` and skip here, and the README and every report that uses it say so.

Build settings are fixed so two builds are comparable: the same builder optimisation level, static
shapes (the ONNX file's), fp32 or fp16, and one timing cache file shared by every build of a run
(dense and compact), so the compact engine cannot win by a luckier tactic search (TensorRT #4730).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from latprune.latency_tables.backends import torch_dtype, import_tensorrt, require_cuda
from latprune.latency_tables.table import write_bytes_atomic, write_json_atomic
from latprune.latency_tables.timing import warmup as _warmup

log = logging.getLogger(__name__)

UNVERIFIED = "TensorRT path unverified on GPU: no GPU has been available to latprune's developers"
FP16_ATOL, FP16_RTOL = 5e-2, 5e-2  # fp16 engines against fp32 ONNX Runtime


@dataclasses.dataclass(frozen=True)
class TrtConfig:
    fp16: bool = False
    opt_level: int = 3  # builder optimisation level, fixed for every build (0-5)
    workspace_mib: int = 2048


@dataclasses.dataclass(frozen=True)
class EngineArtifact:
    path: Path
    layers_json: Path
    size_bytes: int
    build_s: float
    fp16: bool
    opt_level: int
    timing_cache: Path

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.path.name, "layers": self.layers_json.name, "size_bytes": self.size_bytes,
                "build_s": self.build_s, "fp16": self.fp16, "opt_level": self.opt_level,
                "timing_cache": self.timing_cache.name, "verified_on_gpu": False, "note": UNVERIFIED}


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
    if cfg.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the engine (its log above says why)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def layer_information(engine_bytes: bytes) -> dict[str, Any]:
    """The engine inspector's per-layer information (fused layers, tactics, formats) as JSON."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
    inspector = engine.create_engine_inspector()
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def build_engines(onnx_files: dict[str, Path], out_dir: Path, cfg: TrtConfig = TrtConfig()) -> dict[str, EngineArtifact]:
    """Build ``{name: onnx file}`` into ``out_dir/<name>.engine`` (+ ``<name>.layers.json``), in
    order, through one timing cache file ``out_dir/timing.cache`` that persists between runs."""
    require_cuda("trt")
    cache_path = out_dir / "timing.cache"
    cache = cache_path.read_bytes() if cache_path.exists() else b""
    out = {}
    for name, onnx_path in onnx_files.items():
        t0 = time.perf_counter()
        engine, cache = build_serialized(Path(onnx_path).read_bytes(), cfg, cache)
        build_s = time.perf_counter() - t0
        path = write_bytes_atomic(out_dir / f"{name}.engine", engine)
        layers = write_json_atomic(out_dir / f"{name}.layers.json", layer_information(engine))
        write_bytes_atomic(cache_path, cache)
        out[name] = EngineArtifact(path, layers, len(engine), build_s, cfg.fp16, cfg.opt_level, cache_path)
        log.info("built %s in %.1f s (%.1f MB)", path, build_s, len(engine) / 1e6)
    return out


class EngineRunner:
    """One engine, its execution context and torch CUDA buffers on a private stream."""

    def __init__(self, engine_path: str | os.PathLike):
        import torch

        require_cuda("trt")
        trt = self.trt = import_tensorrt()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT cannot deserialize {engine_path}: built by another TensorRT version?")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.inputs, self.outputs, self.host = {}, {}, {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"engine tensor {name} has a dynamic shape {shape}: export with a static batch")
            dtype = torch_dtype(trt, self.engine.get_tensor_dtype(name))
            buf = torch.zeros(shape, dtype=dtype, device="cuda")
            self.host[name] = torch.zeros(shape, dtype=dtype).pin_memory()  # pinned: async copies
            (self.inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs)[name] = buf
            if not self.context.set_tensor_address(name, buf.data_ptr()):
                raise RuntimeError(f"TensorRT refused the device buffer of {name}")

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        """Host in, host out: copy up, run, copy down, synchronise."""
        import torch

        (name, buf), = self.inputs.items()
        with torch.cuda.stream(self.stream):
            buf.copy_(torch.from_numpy(np.ascontiguousarray(x)).to(buf.dtype))
            self.execute()
            outs = [b.float().cpu().numpy() for b in self.outputs.values()]
        self.stream.synchronize()
        return outs

    def gpu_compute_ms(self) -> float:
        """GPU time of one execution between CUDA events on the engine's stream (no copies)."""
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        self.execute()
        end.record(self.stream)
        end.synchronize()
        return start.elapsed_time(end)

    def end_to_end_ms(self) -> float:
        """Host clock around pinned host->device copy, execution, device->host copy and sync."""
        t0 = time.perf_counter()
        with self._on_stream():
            for name, buf in self.inputs.items():
                buf.copy_(self.host[name], non_blocking=True)
            self.execute()
            for name, buf in self.outputs.items():
                self.host[name].copy_(buf, non_blocking=True)
        self.stream.synchronize()
        return (time.perf_counter() - t0) * 1e3

    def _on_stream(self):
        import torch

        return torch.cuda.stream(self.stream)


def engine_parity(engine_path: Path, onnx_path: Path, batches: Iterable[np.ndarray], fp16: bool = False):
    """The engine against ONNX Runtime CPU on the same batches (fp16 engines: looser tolerances)."""
    import onnxruntime as ort

    from latprune.export.verify import ATOL, MIN_TOP1, RTOL, compare_outputs

    runner = EngineRunner(engine_path)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got, ref = [], []
    for x in batches:
        ref.append(sess.run(None, {sess.get_inputs()[0].name: x}))
        got.append(runner.infer(x))
    atol, rtol = (FP16_ATOL, FP16_RTOL) if fp16 else (ATOL, RTOL)
    return compare_outputs([o.name for o in sess.get_outputs()], got, ref, atol, rtol, MIN_TOP1,
                           reference="onnxruntime CPU", runtime=f"TensorRT {'fp16' if fp16 else 'fp32'} engine")


def engine_latency(engine_path: Path, iterations: int = 200, warmup_s: float = 0.5) -> dict[str, dict[str, float]]:
    """GPU compute (CUDA events, no copies) and end to end (with host<->device copies), separately."""
    runner = EngineRunner(engine_path)
    out = {}
    for label, fn in (("gpu_compute", runner.gpu_compute_ms), ("end_to_end", runner.end_to_end_ms)):
        _warmup(fn, min_s=warmup_s, timer=lambda f: f())
        s = np.array([fn() for _ in range(iterations)])
        out[label] = {"median_ms": float(np.median(s)), "p90_ms": float(np.percentile(s, 90)),
                      "p99_ms": float(np.percentile(s, 99)), "mean_ms": float(s.mean()),
                      "cv": float(s.std() / s.mean()), "count": int(s.size)}
    return out
