"""Runtimes on a GPU: torch-cuda, onnxruntime-gpu providers and native TensorRT. Marked ``gpu`` /
``tensorrt``: skipped (never faked) without a CUDA GPU and TensorRT; unverified until they run."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from latprune.export.bench import BenchConfig, run_bench
from latprune.export.tensorrt import build_engines, engine_latency, engine_parity
from latprune.io import write_bytes_atomic
from latprune.latency_tables.profile import ProfileConfig, profile_model
from latprune.latency_tables.runtimes import get_backend
from latprune.latency_tables.runtimes.quantize import quantize_int8
from latprune.latency_tables.runtimes.tensorrt import TrtConfig
from latprune.latency_tables.table import LayerSignature
from latprune.models.graph import ModelGraph
from latprune.pipeline.adasap import OptimizerConfig, SharpnessStep, neuron_partition
from latprune.testing import residual_net
from tests.conftest import RUN_SHAPE as BENCH_SHAPE

FAST = ProfileConfig(step=16, rounds=2, min_round_s=0.002, model_rounds=2, model_min_round_s=0.01,
                     fit_configs=2, fit_rounds=3)
CONV = LayerSignature("conv", 16, 16, (3, 3), (1, 1), (1, 1), in_hw=(8, 8))
BENCH_FAST = {"iterations": 20, "block": 5, "warmup_ms": 5.0, "allow_noisy": True}
SHAPE = (3, 16, 16)


@pytest.mark.gpu
def test_torch_cuda_profile_of_a_tiny_model():
    table = profile_model(residual_net(), (3, 16, 16), get_backend("torch-cuda", 1, 2), FAST, progress=False)
    assert table.fingerprint.provider == "cuda" and "driver" in table.fingerprint.device
    assert all(np.all(t.median_ms > 0) for t in table.layers.values())


@pytest.mark.gpu
def test_ort_cuda_runs_on_the_gpu():
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    b = get_backend("ort-cuda", 1, 2)
    (t,) = b.measure([b.layer_runner(CONV, 16, 16)], 2, 0.01)
    assert t.median_ms > 0


@pytest.mark.tensorrt
@pytest.mark.parametrize("fp16", [False, True])
def test_tensorrt_layer_engine_and_shared_timing_cache(fp16):
    b = get_backend("trt", 1, 2, fp16=fp16)
    (t,) = b.measure([b.layer_runner(CONV, 16, 16)], 2, 0.01)
    size = len(b.timing_cache)
    b.layer_runner(CONV, 16, 8)
    assert t.median_ms > 0 and size > 0 and len(b.timing_cache) >= size


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_int8_layer_engine_from_a_qdq_micro_model():
    b = get_backend("trt", 1, 2, precision="int8")
    (t,) = b.measure([b.layer_runner(CONV, 16, 16)], 2, 0.01)
    assert t.median_ms > 0 and b.fingerprint((3, 8, 8)).dtype == "int8-s8s8"


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_export_parity_and_latency(run_dir, tmp_path, precision):
    x = np.random.default_rng(0).standard_normal((4, *BENCH_SHAPE), dtype=np.float32)
    files = {"dense": run_dir / "dense.onnx", "model": run_dir / "model.onnx"}
    if precision == "int8":  # explicit quantization: engines from the QDQ files
        files = {k: write_bytes_atomic(tmp_path / f"{k}.int8.onnx", quantize_int8(onnx.load(str(f)), [x]))
                 for k, f in files.items()}
    eng = build_engines(files, run_dir, TrtConfig(fp16=precision == "fp16", int8=precision == "int8"))
    assert (run_dir / "model.engine").exists() and (run_dir / "timing.cache").stat().st_size > 0
    assert json.loads((run_dir / "model.layers.json").read_text())["Layers"]
    assert engine_parity(eng["model"].path, files["model"], [x], precision).ok
    lat = engine_latency(eng["model"].path, iterations=50)
    assert lat["end_to_end"]["p50_ms"] >= lat["gpu_compute"]["p50_ms"] > 0


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_bench_trt_reports_compute_and_end_to_end(run_dir):
    r = run_bench(BenchConfig(runtime="trt", **BENCH_FAST), run_dir)
    assert set(r["metrics"]) == {"gpu_compute", "end_to_end"}


@pytest.mark.gpu
@pytest.mark.parametrize("runtime", ["ort-cuda", "ort-trt"])
def test_bench_on_onnxruntime_gpu_providers(run_dir, runtime):
    r = run_bench(BenchConfig(runtime=runtime, **BENCH_FAST), run_dir)
    assert r["runtime"]["provider"] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@pytest.mark.gpu
def test_fp16_step_on_cuda_matches_fp32_direction():
    model = residual_net().cuda().train()
    nr = neuron_partition(ModelGraph(model, SHAPE))
    scaler = torch.amp.GradScaler("cuda")
    rule = SharpnessStep(model, OptimizerConfig(), nr, scaler=scaler)
    x, y = torch.randn(8, *SHAPE, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    before = [p.detach().clone() for p in model.parameters()]
    loss = rule(model, x, y, torch.optim.SGD(model.parameters(), lr=0.1))
    assert loss == loss and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
