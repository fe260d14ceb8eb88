"""latprune bench: statistics on known samples, interleaving, JSON, the noise refusal; TensorRT
export tests (skipped without a GPU and TensorRT)."""
import json

import numpy as np
import pytest

from latprune.cli import main
from latprune.errors import BadInput
from latprune.export.bench import BenchConfig, compare, run_bench
from latprune.latency_tables.timing import block_ratios, bootstrap_median_ci, latency_stats, time_blocks
from latprune.models.registry import ModelSpec

SHAPE = (3, 32, 32)


def bootstrap_speedup_ci(dense, compact):
    """The speedup's interval as bench computes it: resampled blocks of paired ratios."""
    return bootstrap_median_ci(block_ratios(dense, compact))
SPEC = ModelSpec("latprune.testing:residual_net", 10)


def test_latency_stats_on_a_known_sample():
    s = latency_stats(np.arange(1, 101, dtype=float), batch=8)
    assert s["p50_ms"] == pytest.approx(50.5) and s["p90_ms"] == pytest.approx(90.1)
    assert s["p99_ms"] == pytest.approx(99.01) and s["mean_ms"] == pytest.approx(50.5)
    assert s["cv"] == pytest.approx(np.std(np.arange(1, 101)) / 50.5)
    assert s["throughput_ips"] == pytest.approx(8 * 1000 / 50.5) and s["count"] == 100


def test_bootstrap_interval_on_known_samples():
    rng = np.random.default_rng(1)
    c = rng.normal(5.0, 0.25, size=(40, 10))
    lo, hi = bootstrap_speedup_ci(2 * c, c)
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)  # every block exactly 2x: no spread
    d = rng.normal(10.0, 0.5, size=(40, 10))
    lo, hi = bootstrap_speedup_ci(d, c)
    assert lo < 2.0 < hi and hi - lo < 0.1
    lo4, hi4 = bootstrap_speedup_ci(d[:4], c[:4])
    assert hi4 - lo4 > hi - lo  # fewer blocks, wider interval
    # the percentile interval, computed by hand with the same resampling
    per_block = [np.median(d[b]) / np.median(c[b]) for b in range(40)]
    idx = np.random.default_rng(0).integers(0, 40, size=(2000, 40))
    boot = [np.median([per_block[b] for b in row]) for row in idx]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])))


def test_paired_speedup_cancels_drift_between_blocks():
    rng = np.random.default_rng(2)
    c = rng.normal(5.0, 0.05, size=(20, 10))
    d = 2 * c * rng.normal(1.0, 0.01, size=(20, 10))
    # the machine slows by 1.6x between dense block 9 and compact block 9: dense has 10 fast
    # blocks, compact 9, so pooled medians fall on different sides of the step
    d_slow = d * np.where(np.arange(20) < 10, 1.0, 1.6)[:, None]
    c_slow = c * np.where(np.arange(20) < 9, 1.0, 1.6)[:, None]
    r = compare(d_slow, c_slow, 1, BenchConfig())
    assert r["speedup"] == pytest.approx(2.0, rel=0.02)
    assert r["dense"]["p50_ms"] / r["compact"]["p50_ms"] < 1.8  # the pooled ratio is thrown off
    lo, hi = r["speedup_ci95"]
    assert lo < 2.0 * 1.02 and hi > 2.0 * 0.98
    with pytest.raises(ValueError):
        bootstrap_speedup_ci(d[:1], c[:1])


def test_noise_verdict():
    rng = np.random.default_rng(0)
    quiet = compare(rng.normal(10, 0.1, (30, 10)), rng.normal(5, 0.05, (30, 10)), 1, BenchConfig())
    assert not quiet["noisy"] and quiet["speedup"] == pytest.approx(2.0, rel=0.02)
    loud = compare(rng.lognormal(2.3, 0.6, (30, 10)), rng.normal(5, 0.05, (30, 10)), 1, BenchConfig())
    assert loud["noisy"] and any("dense CV" in r for r in loud["noise_reasons"])


def test_blocks_are_interleaved():
    order = []
    progs = {k: (lambda k=k: order.append(k) or 1.0) for k in ("a", "b")}
    out = time_blocks(progs, iterations=6, block=3, warmup_ms=0)
    assert order == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert out["a"].shape == (2, 3)


def test_bad_bench_settings_are_refused():
    with pytest.raises(BadInput, match="two blocks"):
        BenchConfig(iterations=5, block=10)
    with pytest.raises(BadInput, match="--fp16 needs --runtime .*trt"):
        BenchConfig(fp16=True)
    with pytest.raises(BadInput, match="one of"):
        BenchConfig(runtime="tflite")


FAST = dict(iterations=20, block=5, warmup_ms=5, allow_noisy=True)


def test_bench_json_has_every_field(run_dir):
    r = run_bench(BenchConfig(**FAST), run_dir)
    saved = json.loads((run_dir / "bench-ort-b4.json").read_text())
    assert saved["batch"] == 4 and saved["input_shape"] == [4, *SHAPE] and saved["models"]["source"] == "onnx files"
    m = saved["metrics"]["latency"]
    for k in ("dense", "compact"):
        assert set(m[k]) >= {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "cv", "throughput_ips", "count"}
        assert m[k]["count"] == 20 and m[k]["p99_ms"] >= m[k]["p90_ms"] >= m[k]["p50_ms"] > 0
    assert m["speedup"] > 0 and m["compact"]["p50_ms"] > 0
    lo, hi = m["speedup_ci95"]
    assert lo <= hi and m["blocks"] == 4
    assert saved["runtime"]["provider"] == "CPUExecutionProvider" and saved["config"]["threads"] == 2
    assert {"python", "torch", "onnxruntime"} <= set(saved["environment"]) and r["json"].endswith(".json")


def test_bench_reexports_at_another_batch_and_runs_torch(run_dir):
    r = run_bench(BenchConfig(batch=2, **FAST), run_dir)
    assert r["input_shape"][0] == 2 and "reloaded" in r["models"]["source"]
    r = run_bench(BenchConfig(runtime="torch", **FAST), run_dir, json_path=run_dir / "t.json")
    assert r["runtime"]["runtime"] == "torch" and (run_dir / "t.json").exists()
    with pytest.raises(BadInput, match="pass a run directory"):
        run_bench(BenchConfig(batch=2, **FAST), dense=run_dir / "dense.onnx", compact=run_dir / "model.onnx")


def test_bench_cli_refuses_noisy_claims(run_dir, capsys):
    args = ["bench", str(run_dir), "--iterations", "20", "--block", "5", "--warmup", "5"]
    assert main([*args, "--max-cv", "0"]) == 6  # every real timing has some spread
    err = capsys.readouterr().err
    assert "NOISY" in err and "--allow-noisy" in err.strip().splitlines()[-1]
    assert main([*args, "--max-cv", "0", "--allow-noisy"]) == 0
    assert main(["bench", str(run_dir / "nothing")]) == 2
