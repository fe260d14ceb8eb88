import numpy as np
import onnxruntime as ort
import pytest
import torch

from latprune.errors import BadInput
from latprune.latency_tables.endtoend import PairConfig, validate_table
from latprune.latency_tables.layers import layer_module, layer_onnx
from latprune.latency_tables.profile import ProfileConfig, layer_signatures, profile_model
from latprune.latency_tables.runtimes import get_backend
from latprune.latency_tables.runtimes.ort import check_provider
from latprune.latency_tables.table import LayerSignature
from latprune.latency_tables.timing import Timing, bootstrap_ratio_ci, paired_ratio
from latprune.models.graph import ModelGraph
from latprune.testing import depthwise_net, residual_net

FAST = ProfileConfig(step=16, rounds=2, min_round_s=0.002, model_rounds=2, model_min_round_s=0.01,
                     fit_configs=2, fit_rounds=3)


def test_unknown_runtime_lists_the_valid_ones():
    with pytest.raises(BadInput, match="use one of ort, ort-cuda, ort-trt, torch, torch-cuda, trt"):
        get_backend("tensorflow")


@pytest.mark.parametrize("kind", ["conv", "dwconv", "linear"])
def test_onnx_micro_model_computes_the_layer(kind):
    sig = LayerSignature(kind, 16, 16, (3, 3) if kind != "linear" else (1, 1), (1, 1),
                         (1, 1) if kind != "linear" else (0, 0), in_hw=(8, 8) if kind != "linear" else (1, 1),
                         activation="relu" if kind != "linear" else "none")
    proto = layer_onnx(sig, 16, 8 if kind != "dwconv" else 16, batch=2)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(
        tuple(d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim)).astype(np.float32)
    y = sess.run(None, {"X": x})[0]
    from onnx import numpy_helper

    w = torch.from_numpy(numpy_helper.to_array(proto.graph.initializer[0]).copy())
    xt = torch.from_numpy(x)
    if kind == "linear":
        ref = xt @ w.T
    else:
        ref = torch.relu(torch.nn.functional.conv2d(xt, w, padding=1, groups=16 if kind == "dwconv" else 1))
    np.testing.assert_allclose(y, ref.numpy(), atol=1e-4)
    assert layer_module(sig, 16, 8 if kind != "dwconv" else 16)


@pytest.mark.parametrize("runtime", ["ort", "torch"])
def test_real_profile_of_a_tiny_model(runtime):
    model = residual_net()
    backend = get_backend(runtime, threads=1, batch=2)
    table = profile_model(model, (3, 16, 16), backend, FAST, progress=False)
    assert set(table.layer_keys) == set(layer_signatures(model, (3, 16, 16)))
    for t in table.layers.values():
        assert np.all(np.isfinite(t.median_ms)) and np.all(t.median_ms > 0)
        assert np.all(t.count >= 2)
    assert table.dense_ms > 0
    assert table.fingerprint.runtime == runtime and table.fingerprint.batch == 2
    assert table.fingerprint.input_shape == (3, 16, 16)
    assert [p["label"] for p in table.e2e.points] == ["dense", "smallest", "random0", "random1"]
    assert table.e2e.slope > 0 and table.e2e.predict(table.e2e.points[0]["layers_ms"]) > 0


def test_real_ort_table_validates_on_a_tiny_model():
    model, shape = residual_net(), (3, 16, 16)
    backend = get_backend("ort", threads=1, batch=8)
    table = profile_model(model, shape, backend, FAST, progress=False)
    v = validate_table(ModelGraph(model, shape), table, backend, k=3, step=16, cfg=PairConfig(3, 0.02, 1, 1),
                       progress=False)
    assert v["k"] == 3 and len(v["points"]) == 3
    for p in v["points"]:
        assert p["measured_ms"] > 0 and p["predicted_ms"] > 0 and 0 < p["ratio"] <= 1.5
    # loose: whole-model times here are ~0.1 ms; the benchmark measures the real error (BENCHMARKS.md)
    assert v["median_rel_err"] < 0.5 and v["p90_rel_err"] >= v["median_rel_err"]


def test_depthwise_layers_are_profiled_on_the_diagonal():
    table = profile_model(depthwise_net(), (3, 16, 16), get_backend("ort", 1, 1), FAST, progress=False)
    dw = table.layers[table.layer_keys["dw.0"]]
    assert dw.signature.kind == "dwconv" and dw.c_in_grid == [32] and dw.c_out_grid == [16, 32]


def test_bootstrap_interval_brackets_the_ratio():
    a = Timing([[10.0, 10.2], [9.8, 10.1], [10.3, 10.0], [10.1, 9.9], [10.0, 10.0]])
    b = Timing([[5.0, 5.1], [4.9, 5.0], [5.2, 5.0], [5.0, 5.0], [5.1, 4.9]])
    lo, hi = bootstrap_ratio_ci(a, b)
    assert lo <= a.median_ms / b.median_ms <= hi and lo <= paired_ratio(a, b) <= hi
    assert 1.9 < lo and hi < 2.1
    # paired by round: a machine twice as slow in the second half leaves the ratio alone
    slow_a = Timing([*a.rounds, *[[2 * x for x in r] for r in a.rounds]])
    slow_b = Timing([*b.rounds, *[[2 * x for x in r] for r in b.rounds]])
    assert paired_ratio(slow_a, slow_b) == pytest.approx(paired_ratio(a, b), rel=0.01)


# ---- providers and GPU runtimes ----------------------------------------------------------------

CONV = LayerSignature("conv", 16, 16, (3, 3), (1, 1), (1, 1), in_hw=(8, 8))


def test_a_gpu_provider_missing_from_onnxruntime_names_the_extra():
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(BadInput, match=r"not CUDAExecutionProvider: pip install 'latprune\[gpu\]"):
        get_backend("ort-cuda", 1, 1).layer_runner(CONV, 16, 16)


def test_a_silent_cpu_fallback_is_refused():
    # A real CPU session checked against a GPU request: what get_providers() shows after ORT fell back.
    sess = ort.InferenceSession(layer_onnx(CONV, 16, 16, 1).SerializeToString(), providers=["CPUExecutionProvider"])
    check_provider(sess, "CPUExecutionProvider")
    with pytest.raises(BadInput, match=r"asked ONNX Runtime for CUDAExecutionProvider, but \['CPUExecutionProvider'\]"):
        check_provider(sess, "CUDAExecutionProvider")


def test_per_node_cpu_fallback_is_an_error(monkeypatch):
    # Pretend the CUDA provider is installed: ORT then places every node on the CPU (no CUDA here),
    # which session.disable_cpu_ep_fallback turns into an error instead of a silent CPU timing.
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises((RuntimeError, BadInput), match="CUDAExecutionProvider"):
        get_backend("ort-cuda", 1, 1).layer_runner(CONV, 16, 16)


def test_fp16_only_where_the_runtime_has_it():
    with pytest.raises(BadInput, match="--fp16 is not available on runtime ort"):
        get_backend("ort", fp16=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")
@pytest.mark.parametrize("runtime", ["torch-cuda", "trt"])
def test_gpu_runtimes_refuse_a_machine_without_a_gpu(runtime):
    with pytest.raises(BadInput, match="needs a CUDA GPU"):
        get_backend(runtime)
