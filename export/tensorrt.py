"""TensorRT deployment artifacts (the ``[trt]`` extra): ONNX file -> ``.engine`` files through one
timing cache, layer information (``IEngineInspector``), parity against ONNX Runtime, and latency
with and without host<->device copies. Building and running engines is the runtime's job
(``latency_tables.runtimes.tensorrt``: ``build_serialized``, the one ``EngineRunner``).

**Unverified on a GPU**: no GPU has been lent to this project, so this has never run; its tests
are marked ``tensorrt`` and skip here, and the README and every report that uses it say so.

Build settings are fixed so two builds are comparable: the same builder optimisation level, static
shapes (the ONNX file's), fp32, fp16 or int8 (from a QDQ file), and one timing cache file shared by every build of a run
(dense and compact), so the compact engine cannot win by a luckier tactic search (TensorRT #4730).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from latprune.export.parity import ATOL, MIN_TOP1, RTOL, Parity, compare_outputs
from latprune.io import write_bytes_atomic, write_json_atomic
from latprune.latency_tables.runtimes.base import require_cuda
from latprune.latency_tables.runtimes.ort import ort_session
from latprune.latency_tables.runtimes.tensorrt import EngineRunner, TrtConfig, build_serialized, import_tensorrt
from latprune.latency_tables.timing import latency_stats, time_blocks

__all__ = ["UNVERIFIED", "EngineArtifact", "layer_information", "build_engines", "engine_parity", "engine_latency"]

log = logging.getLogger(__name__)

UNVERIFIED = "TensorRT path unverified on GPU: no GPU has been available to latprune's developers"
FP16_ATOL, FP16_RTOL = 5e-2, 5e-2  # fp16 engines against fp32 ONNX Runtime
INT8_MIN_TOP1 = 0.98  # int8 engines against the same QDQ file on ONNX Runtime CPU: top-1 only


@dataclasses.dataclass(frozen=True)
class EngineArtifact:
    path: Path
    layers_json: Path
    size_bytes: int
    build_s: float
    fp16: bool
    opt_level: int
    timing_cache: Path
    int8: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.path.name, "layers": self.layers_json.name, "size_bytes": self.size_bytes,
                "build_s": self.build_s, "fp16": self.fp16, "int8": self.int8, "opt_level": self.opt_level,
                "timing_cache": self.timing_cache.name, "verified_on_gpu": False, "note": UNVERIFIED}


def layer_information(engine_bytes: bytes) -> dict[str, Any]:
    """The engine inspector's per-layer information (fused layers, tactics, formats) as JSON."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
    inspector = engine.create_engine_inspector()
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def build_engines(onnx_files: dict[str, Path], out_dir: Path,
                  cfg: TrtConfig = TrtConfig()) -> dict[str, EngineArtifact]:
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
        out[name] = EngineArtifact(path, layers, len(engine), build_s, cfg.fp16, cfg.opt_level, cache_path, cfg.int8)
        log.info("built %s in %.1f s (%.1f MB)", path, build_s, len(engine) / 1e6)
    return out


def engine_parity(engine_path: Path, onnx_path: Path, batches: Iterable[np.ndarray], precision: str = "fp32"
                  ) -> Parity:
    """The engine against ONNX Runtime CPU running ``onnx_path`` on the same batches: fp16 engines
    with looser tolerances; int8 engines (``onnx_path`` is the QDQ file they were built from) by
    top-1 agreement only, as two int8 kernels round differently."""
    runner = EngineRunner.from_file(engine_path)
    sess = ort_session(str(onnx_path))
    got, ref = [], []
    for x in batches:
        ref.append(sess.run(None, {sess.get_inputs()[0].name: x}))
        got.append(runner.infer(x))
    atol, rtol, top1 = {"fp32": (ATOL, RTOL, MIN_TOP1), "fp16": (FP16_ATOL, FP16_RTOL, MIN_TOP1),
                        "int8": (float("inf"), 0.0, INT8_MIN_TOP1)}[precision]
    return compare_outputs([o.name for o in sess.get_outputs()], got, ref, atol, rtol, top1,
                           reference="onnxruntime CPU", runtime=f"TensorRT {precision} engine")


def engine_latency(engine_path: Path, iterations: int = 200, warmup_ms: float = 500.0) -> dict[str, dict[str, float]]:
    """GPU compute (CUDA events, no copies) and end to end (with host<->device copies), timed
    interleaved in blocks by the one timing harness; per-call statistics of each."""
    runner = EngineRunner.from_file(engine_path)
    t = time_blocks({"gpu_compute": runner.gpu_compute_ms, "end_to_end": runner.end_to_end_ms}, iterations, 10,
                    warmup_ms)
    return {k: latency_stats(v) for k, v in t.items()}
