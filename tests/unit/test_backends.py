import numpy as np
import onnxruntime as ort
import pytest
import torch

from latprune.errors import BadInput
from latprune.latency_tables.backends import get_backend, layer_module, layer_onnx
from latprune.latency_tables.profile import ProfileConfig, layer_signatures, profile_model
from latprune.latency_tables.table import LayerSignature
from latprune.latency_tables.timing import Timing, bootstrap_ratio_ci
from latprune.testing import depthwise_net, residual_net

FAST = ProfileConfig(step=16, rounds=2, min_round_s=0.002, model_rounds=2, model_min_round_s=0.01)


def test_unknown_runtime_lists_the_valid_ones():
    with pytest.raises(BadInput, match="use one of ort, torch"):
        get_backend("tensorflow")


@pytest.mark.parametrize("kind", ["conv", "dwconv", "linear"])
def test_onnx_micro_model_computes_the_layer(kind):
    sig = LayerSignature(kind, 16, 16, (3, 3) if kind != "linear" else (1, 1), (1, 1),
                         (1, 1) if kind != "linear" else (0, 0), in_hw=(8, 8) if kind != "linear" else (1, 1),
                         activation="relu" if kind != "linear" else "none")
    proto = layer_onnx(sig, 16, 8 if kind != "dwconv" else 16, batch=2)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(tuple(d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim)).astype(np.float32)
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


def test_depthwise_layers_are_profiled_on_the_diagonal():
    table = profile_model(depthwise_net(), (3, 16, 16), get_backend("ort", 1, 1), FAST, progress=False)
    dw = table.layers[table.layer_keys["dw.0"]]
    assert dw.signature.kind == "dwconv" and dw.c_in_grid == [32] and dw.c_out_grid == [16, 32]


def test_bootstrap_interval_brackets_the_ratio():
    a = Timing([[10.0, 10.2], [9.8, 10.1], [10.3, 10.0], [10.1, 9.9], [10.0, 10.0]])
    b = Timing([[5.0, 5.1], [4.9, 5.0], [5.2, 5.0], [5.0, 5.0], [5.1, 4.9]])
    lo, hi = bootstrap_ratio_ci(a, b)
    assert lo <= a.median_ms / b.median_ms <= hi
    assert 1.9 < lo and hi < 2.1
