"""``latprune bench``: dense against compact, trtexec-style, in one process.

Both models are loaded once and timed **interleaved in blocks** (``block`` calls of dense, then
``block`` of compact, repeated until each has ``iterations`` calls), so drift of a shared machine
hits both alike (../shared/BENCHMARKS.md). Each call is one sample; per model: p50, p90, p99,
mean, coefficient of variation (std / mean of the calls) and throughput (images / s at the mean).
The speedup is paired by block: the median over blocks of median(dense block) / median(compact
block), so a drift of the machine between blocks cancels (blocks of the two models taken side by
side share its state); its 95 % bootstrap interval resamples whole blocks. Without drift it
equals p50(dense) / p50(compact).

A claim is only as good as its spread: when either model's CV exceeds ``max_cv`` or the
interval's half-width exceeds ``max_ci`` of the speedup, the result is marked noisy and
``latprune bench`` exits 6 without ``--allow-noisy`` (the JSON is written either way).

Runtimes: ``ort`` (ONNX Runtime CPU; the run's ONNX files when their batch matches, else exported
again at ``--batch``), ``torch`` (eager CPU, the run's reloaded modules), ``trt`` (TensorRT
engines built from the ONNX files with one shared timing cache; GPU compute time between CUDA
events and end to end with host<->device copies, reported separately), and ``ort-cuda`` /
``ort-trt`` (onnxruntime-gpu's CUDA and TensorRT providers with IO binding: input and output stay
on the device; a session whose provider fell back to the CPU is refused). The GPU runtimes are
unverified: no GPU has been available to this project.
"""
from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from latprune.errors import BadInput
from latprune.export.int8 import INT8_FILES
from latprune.export.onnx_export import check_onnx, read_contract
from latprune.export.tensorrt import UNVERIFIED, build_engines
from latprune.io import check_writable_file, write_bytes_atomic, write_json_atomic
from latprune.latency_tables.device import environment, gpu_description
from latprune.latency_tables.runtimes import RUNTIMES, get_backend, runtime_class
from latprune.latency_tables.runtimes.base import resolve_precision
from latprune.latency_tables.runtimes.convert import input_dims, onnx_batch, onnx_bytes
from latprune.latency_tables.runtimes.tensorrt import EngineRunner, TensorrtBackend, TrtConfig, import_tensorrt
from latprune.latency_tables.timing import block_ratios, bootstrap_median_ci, latency_stats, time_blocks
from latprune.models.arch import load_compact, load_dense

__all__ = ["BenchConfig", "compare", "backend_programs", "trt_programs", "bench", "render", "run_bench"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    runtime: str = "ort"
    batch: int | None = None  # None: the run's deployment batch
    threads: int = 2
    fp16: bool = False  # the older spelling of precision "fp16"
    precision: str | None = None  # fp32, fp16 or int8 (None: fp16 if fp16 else fp32)
    warmup_ms: float = 500.0  # per model, before the first timed call (trtexec --warmup)
    iterations: int = 300  # timed calls per model (trtexec --iterations)
    block: int = 10  # calls per model per interleaved block
    max_cv: float = 0.25  # per-call CV on the 2-core build machine runs 7-20 % (BENCHMARKS.md)
    max_ci: float = 0.05  # relative half-width of the speedup's 95 % interval
    allow_noisy: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise BadInput(f"--runtime must be one of {', '.join(RUNTIMES)} for bench, got {self.runtime!r}")
        if (self.batch is not None and self.batch < 1) or self.threads < 1:
            raise BadInput(f"--batch and --threads must be >= 1, got {self.batch}, {self.threads}")
        if self.iterations < 2 * self.block or self.block < 1:
            raise BadInput(f"--iterations ({self.iterations}) must be at least two blocks of {self.block} calls")
        if self.warmup_ms < 0:
            raise BadInput(f"--warmup must be >= 0 ms, got {self.warmup_ms}")
        if self.fp16 and not runtime_class(self.runtime).supports_fp16:
            ok = " or ".join(n for n in RUNTIMES if runtime_class(n).supports_fp16)
            raise BadInput(f"--fp16 needs --runtime {ok} (ONNX Runtime and torch on the CPU run fp32 or int8)")
        precision = resolve_precision(self.fp16, self.precision)
        runtime_class(self.runtime, precision=precision)
        object.__setattr__(self, "precision", precision)
        object.__setattr__(self, "fp16", precision == "fp16")

    @property
    def suffix(self) -> str:
        """What the precision adds to file names: ``-fp16``, ``-int8`` or nothing."""
        return "" if self.precision == "fp32" else f"-{self.precision}"


def compare(dense: np.ndarray, compact: np.ndarray, batch: int, cfg: BenchConfig) -> dict[str, Any]:
    """Statistics of both models, the speedup, its interval and the noise verdict."""
    d, c = latency_stats(dense, batch), latency_stats(compact, batch)
    lo, hi = bootstrap_median_ci(block_ratios(dense, compact), seed=cfg.seed)
    speedup = float(np.median(block_ratios(dense, compact)))
    reasons = [f"{k} CV {s['cv']:.1%} > {cfg.max_cv:.0%}" for k, s in (("dense", d), ("compact", c))
               if s["cv"] > cfg.max_cv]
    half = (hi - lo) / 2 / speedup
    if half > cfg.max_ci:
        reasons.append(f"speedup interval +-{half:.1%} > +-{cfg.max_ci:.0%}")
    return {"dense": d, "compact": c, "speedup": speedup, "speedup_ci95": [lo, hi], "ci_half_width": half,
            "blocks": int(dense.shape[0]), "noisy": bool(reasons), "noise_reasons": reasons}


# ---- programs per runtime ------------------------------------------------------------------------

def backend_programs(dense, compact, input_shape: tuple[int, int, int], cfg: BenchConfig, batch: int):
    """Runtimes behind a latency backend (ort, torch, ort-cuda, ort-trt). ``dense``/``compact``: ONNX
    paths with a matching batch, or modules (exported at ``batch`` where the runtime loads ONNX)."""
    # GPU providers: checked after session creation
    be = get_backend(cfg.runtime, cfg.threads, batch, precision=cfg.precision)
    fns = {k: be.model_runner(be.prepare_model(m, input_shape), input_shape)
           for k, m in (("dense", dense), ("compact", compact))}
    return {"latency": {k: (lambda f=f: be.time_call(f)) for k, f in fns.items()}}, {
        "runtime": be.name, "version": be.version(), "provider": be.provider, "device": be.device()}


def trt_programs(dense_onnx: Path, compact_onnx: Path, out_dir: Path, cfg: BenchConfig):
    trt_cfg = TrtConfig(fp16=cfg.fp16, int8=cfg.precision == "int8")
    eng = build_engines({"dense": dense_onnx, "compact": compact_onnx}, out_dir, trt_cfg)
    runners = {k: EngineRunner.from_file(e.path) for k, e in eng.items()}
    progs = {"gpu_compute": {k: r.gpu_compute_ms for k, r in runners.items()},
             "end_to_end": {k: r.end_to_end_ms for k, r in runners.items()}}
    return progs, {"runtime": TensorrtBackend.name, "version": import_tensorrt().__version__, "provider": "TensorRT",
                   "device": gpu_description(), "engines": {k: e.to_dict() for k, e in eng.items()}, "note": UNVERIFIED}


def bench(programs: dict[str, dict[str, Callable[[], float]]], batch: int, cfg: BenchConfig) -> dict[str, dict]:
    """``programs[metric][model]``; every program of every metric interleaved in one loop."""
    flat = {f"{m}/{k}": fn for m, per in programs.items() for k, fn in per.items()}
    t = time_blocks(flat, cfg.iterations, cfg.block, cfg.warmup_ms)
    return {m: compare(t[f"{m}/dense"], t[f"{m}/compact"], batch, cfg) for m in programs}


def render(result: dict[str, Any]) -> str:
    rt, cfg = result["runtime"], result["config"]
    lines = [f"latprune bench: {rt['runtime']} ({rt['version']}, {rt['provider']}) on {rt['device']}, batch "
             f"{result['batch']}, {cfg['threads']} threads, {cfg['iterations']} calls per model in blocks of "
             f"{cfg['block']}"]
    for metric, r in result["metrics"].items():
        lines += ["", f"[{metric}]",
                  f"{'model':<8} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'CV':>6} {'img/s':>9}"]
        for k in ("dense", "compact"):
            s = r[k]
            lines.append(f"{k:<8} {s['p50_ms']:>9.3f} {s['p90_ms']:>9.3f} {s['p99_ms']:>9.3f} {s['mean_ms']:>9.3f} "
                         f"{s['cv']:>6.1%} {s['throughput_ips']:>9.0f}")
        lo, hi = r["speedup_ci95"]
        lines.append(f"speedup {r['speedup']:.2f}x, paired by block (95% bootstrap interval {lo:.2f}-{hi:.2f} over "
                     f"{r['blocks']} blocks)"
                     + (f"  NOISY: {'; '.join(r['noise_reasons'])}" if r["noisy"] else ""))
    if rt.get("note"):
        lines += ["", rt["note"]]
    return "\n".join(lines)


def run_bench(cfg: BenchConfig, run_dir: str | Path | None = None, dense: str | Path | None = None,
              compact: str | Path | None = None, json_path: str | Path | None = None) -> dict[str, Any]:
    """Bench a run directory (``dense.onnx``/``model.onnx``, or the reloaded modules) or two ONNX
    files; write the JSON atomically and return it."""
    if run_dir is not None:
        run_dir = Path(run_dir)
        dense, compact = run_dir / "dense.onnx", run_dir / "model.onnx"
        if cfg.precision == "int8" and (run_dir / INT8_FILES["compact"]).exists():  # the deployed int8 files
            dense, compact = run_dir / INT8_FILES["dense"], run_dir / INT8_FILES["compact"]
    elif dense is None or compact is None:
        raise BadInput("bench needs a run directory, or both --dense and --compact ONNX files")
    if json_path is not None:
        check_writable_file(json_path, "--json")
    dense, compact = Path(dense), Path(compact)
    for p in (dense, compact):
        if not p.exists():
            raise BadInput(f"{p} does not exist: pass the directory of a finished `latprune run` (or `export`)")
        check_onnx(p)
    shape = read_contract(compact).get("input_shape") or _onnx_chw(compact)
    shape = tuple(int(v) for v in shape)
    file_batch = onnx_batch(compact)
    batch = cfg.batch or file_batch or 1
    modules = None
    if not runtime_class(cfg.runtime).loads_onnx or file_batch not in (None, batch):
        if run_dir is None:
            raise BadInput(f"--batch {batch} differs from the files' batch {file_batch} (or the runtime times "
                           f"modules: {cfg.runtime}): pass a run directory, from which bench rebuilds the models")
        modules = (load_dense(run_dir), load_compact(run_dir))
    if cfg.runtime == TensorrtBackend.name:
        out_dir = (run_dir or compact.parent) / f"engines-b{batch}{cfg.suffix}"
        files = (dense, compact)
        if modules is not None:  # engines need the static batch: export it
            files = tuple(write_bytes_atomic(out_dir / f"{k}-b{batch}.onnx", onnx_bytes(m, (batch, *shape)))
                          for k, m in zip(("dense", "compact"), modules))
        programs, info = trt_programs(files[0], files[1], out_dir, cfg)
    else:
        a, b = modules if modules is not None else (dense, compact)
        programs, info = backend_programs(a, b, shape, cfg, batch)
    log.info("timing dense and compact interleaved: %d calls each, blocks of %d", cfg.iterations, cfg.block)
    result = {
        "schema_version": 1, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "models": {"dense": str(dense), "compact": str(compact),
                   "source": ("onnx files" if modules is None
                              else f"reloaded from {run_dir}, exported at batch {batch}")},
        "batch": batch, "input_shape": [batch, *shape], "config": dataclasses.asdict(cfg), "runtime": info,
        "metrics": bench(programs, batch, cfg), "environment": environment(),
    }
    result["noisy"] = any(m["noisy"] for m in result["metrics"].values())
    if json_path is None:
        json_path = (run_dir or compact.parent) / f"bench-{cfg.runtime}-b{batch}{cfg.suffix}.json"
    result["json"] = str(write_json_atomic(json_path, result))
    return result


def _onnx_chw(path: Path) -> tuple[int, ...]:
    chw = input_dims(path)[1:]
    if None in chw:
        raise BadInput(f"{path} has no static input shape and no latprune contract: export it with static C, H, W")
    return tuple(chw)
