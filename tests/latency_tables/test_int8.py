"""Int8 on ONNX Runtime's CPU provider (issue 14): models quantized with ORT's own tooling
(QDQ, per-channel int8 weights), timed as int8, tables fingerprinted with their precision, and the
deployed ``model.int8.onnx`` with its contract and top-1 parity."""
import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch

from latprune.errors import BadInput
from latprune.export.int8 import OnnxClassifier, export_int8, int8_parity
from latprune.export.onnx_export import contract_metadata, export_onnx, read_contract
from latprune.latency_tables import device
from latprune.latency_tables.device import saturating_int8
from latprune.latency_tables.layers import layer_input_shape, layer_onnx
from latprune.latency_tables.runtimes import Backend, get_backend, runtime_class
from latprune.latency_tables.runtimes import ort as ort_module
from latprune.latency_tables.runtimes.ort import ort_session
from latprune.latency_tables.runtimes.quantize import ORT_CPU, TENSORRT, QuantConfig, is_quantized, quantize_int8
from latprune.latency_tables.table import LayerSignature
from latprune.pipeline.config import DeployConfig, RunConfig
from latprune.pipeline.train import evaluate
from latprune.testing import fake_table, plain_net, tiny_dataset

pytest.importorskip("onnxruntime")
SIG = LayerSignature("conv", 16, 32, (3, 3), (1, 1), (1, 1), (1, 1), (8, 8), "relu")


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
@pytest.mark.parametrize("form", ["ort_cpu", "tensorrt"])
def test_a_quantized_layer_is_qdq_int8_and_computes_what_the_float_one_does(method, form):
    cfg = {"ort_cpu": ORT_CPU, "tensorrt": TENSORRT}[form].with_method(method)
    model = layer_onnx(SIG, 16, 32, 4)
    rng = np.random.default_rng(0)
    shape = layer_input_shape(SIG, 4, 16)
    q = onnx.load_from_string(quantize_int8(model, [rng.standard_normal(shape, dtype=np.float32)
                                                    for _ in range(2)], cfg))
    assert is_quantized(q) and not is_quantized(model)
    weights = [i for i in q.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert weights, "the convolution's weights are stored as int8"
    zero_points = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer if "zero_point" in i.name}
    activation_zp = [z for n, z in zero_points.items() if z.ndim == 0]  # per-tensor: activations
    assert activation_zp and all(z.dtype == (np.uint8 if form == "ort_cpu" else np.int8) for z in activation_zp)
    if form == "tensorrt":  # TensorRT's explicit quantization: signed, zero point 0 everywhere
        assert all(not z.any() for z in zero_points.values())
    else:
        assert any(z.any() for z in activation_zp), "asymmetric activations: some zero point is not 0"
    x = rng.standard_normal(shape, dtype=np.float32)
    y32 = ort_session(model.SerializeToString(), threads=1).run(None, {"X": x})[0]
    y8 = ort_session(q.SerializeToString(), threads=1).run(None, {"X": x})[0]
    assert np.abs(y8 - y32).mean() < 0.05 * np.abs(y32).mean()  # outside the calibrated range it clips


def test_each_runtime_quantizes_in_its_own_form(monkeypatch):
    ort = get_backend("ort", precision="int8")
    assert ort.quant_config("entropy") == dataclasses.replace(ORT_CPU.with_method("entropy"),
                                                               reduce_range=saturating_int8())
    # 7-bit weights exactly where full-range U8S8 products saturate: x86 without VNNI
    for flags, reduced in (({"avx2"}, True), ({"avx2", "avx512f"}, True), ({"avx2", "avx512f", "avx512_vnni"}, False),
                           ({"avx2", "avx_vnni"}, False), ({"asimd"}, False)):
        monkeypatch.setattr(device, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert device.saturating_int8() is reduced
    monkeypatch.setattr(ort_module, "saturating_int8", lambda: True)
    assert ort.quant_config().reduce_range and ort.quant_config().to_dict()["reduce_range"] is True
    assert runtime_class("trt").quant_config is Backend.quant_config  # TensorRT and ort-trt: signed, symmetric
    assert Backend.quant_config(None) == TENSORRT


def test_bad_calibration_settings_are_refused():
    with pytest.raises(BadInput, match="calibration method must be one of minmax"):
        QuantConfig("kl")
    with pytest.raises(BadInput, match="at least one batch"):
        quantize_int8(layer_onnx(SIG, 16, 32, 1), [])


def test_the_int8_backend_times_quantized_layers_and_models_and_says_so_in_its_fingerprint():
    b = get_backend("ort", threads=1, batch=2, precision="int8")
    assert b.dtype == "int8-u8s8" and b.fingerprint((3, 16, 16)).dtype == "int8-u8s8"  # ORT CPU's form
    [t] = b.measure([b.layer_runner(SIG, 8, 16)], rounds=2, min_round_s=0.001)
    assert t.median_ms > 0
    prepared = b.prepare_model(plain_net(), (3, 16, 16))
    assert is_quantized(onnx.load_from_string(prepared))
    assert b.prepare_model(prepared, (3, 16, 16)) is prepared  # an int8 file is timed as it is
    [t] = b.measure([b.model_runner(prepared, (3, 16, 16))], rounds=2, min_round_s=0.001)
    assert t.median_ms > 0


def test_a_table_of_another_precision_is_refused_naming_it():
    wanted = get_backend("ort", threads=1, batch=2, precision="int8").fingerprint((3, 16, 16))
    table = fake_table(plain_net(), (3, 16, 16), batch=2)
    fp32 = dataclasses.replace(table, fingerprint=dataclasses.replace(wanted, dtype="float32"))
    with pytest.raises(BadInput, match="float32.*int8|int8.*float32"):
        fp32.check_compatible(wanted)
    s8s8 = dataclasses.replace(table, fingerprint=dataclasses.replace(wanted, dtype="int8-s8s8"))
    with pytest.raises(BadInput, match="int8-s8s8.*int8-u8s8|int8-u8s8.*int8-s8s8"):  # the other int8 form
        s8s8.check_compatible(wanted)
    dataclasses.replace(table, fingerprint=wanted).check_compatible(wanted)  # the same setting passes


@pytest.mark.parametrize("name", ["torch", "torch-cuda", "ort-cuda"])
def test_int8_on_a_runtime_without_it_is_one_clear_error(name):
    with pytest.raises(BadInput, match=f"--precision int8 is not available on runtime {name}: use ort"):
        get_backend(name, precision="int8")


def test_fp16_and_precision_must_agree():
    with pytest.raises(BadInput, match="disagree"):
        get_backend("ort", fp16=True, precision="int8")
    with pytest.raises(BadInput, match="precision must be one of fp32, fp16, int8"):
        get_backend("ort", precision="int4")
    assert get_backend("ort", threads=1).precision == "fp32"


def test_the_int8_file_carries_the_contract_and_how_it_was_quantized_and_agrees_on_top1(tmp_path):
    torch.manual_seed(0)
    model = plain_net().eval()
    data = tiny_dataset(64, (3, 16, 16))
    fp32 = export_onnx(model, tmp_path / "model.onnx", (8, 3, 16, 16),
                       metadata=contract_metadata({"input_shape": [8, 3, 16, 16], "mean": [0.5] * 3}))
    images = [x.numpy() for x, _ in data.batches(data.train, 8)]
    art = export_int8(fp32.path, tmp_path / "model.int8.onnx", images[:4], QuantConfig("entropy"), "test images")
    q = onnx.load(str(art.path))
    assert is_quantized(q) and art.size_bytes < fp32.size_bytes  # int8 weights
    assert read_contract(art.path) == read_contract(fp32.path)
    meta = json.loads({p.key: p.value for p in q.metadata_props}["latprune.int8"])
    assert meta["method"] == "entropy" and meta["calibration_images"] == 32 and meta["format"] == "QDQ"
    assert meta["activations"] == "uint8" and meta["calibration_source"] == "test images"
    parity = int8_parity(fp32.path, art.path, images[4:], threads=1)
    assert parity.images == 32 and parity.top1_agreement is not None and parity.top1_agreement > 0.5
    assert parity.ok == (parity.top1_agreement >= 0.98)
    assert not int8_parity(fp32.path, art.path, images[4:], min_top1=1.01, threads=1).ok


@pytest.mark.parametrize("dynamic", [False, True])
def test_an_onnx_file_is_scored_like_the_module_it_came_from(tmp_path, dynamic):
    torch.manual_seed(0)
    model = plain_net().eval()
    data = tiny_dataset(50, (3, 16, 16))  # 50 images: the last chunk of 8 is padded
    art = export_onnx(model, tmp_path / "m.onnx", (8, 3, 16, 16), dynamic_batch=dynamic)
    scored = OnnxClassifier(art.path, threads=1)
    assert scored.batch == (None if dynamic else 8)
    x, _ = next(data.batches(data.train, 50))
    with torch.no_grad():
        torch.testing.assert_close(scored(x), model(x), atol=1e-4, rtol=1e-4)
    assert evaluate(scored, data, data.train, batch_size=20) == evaluate(model, data, data.train, batch_size=20)


def test_precision_in_the_run_config_and_its_fp16_alias():
    assert DeployConfig(runtime="trt", fp16=True).precision == "fp16"  # configs written before --precision
    assert DeployConfig(runtime="trt", precision="fp16").fp16
    assert not DeployConfig(precision="int8").fp16
    with pytest.raises(BadInput, match="--fp16 and --precision int8 disagree"):
        DeployConfig(precision="int8", fp16=True)
    with pytest.raises(BadInput, match="--precision int8 is not available on runtime torch: use ort"):
        DeployConfig(runtime="torch", precision="int8")
    with pytest.raises(BadInput, match="--calibration-images 16 is less than one deployment batch"):
        DeployConfig(precision="int8", calibration_images=16)
    with pytest.raises(BadInput, match="--calibration must be one of minmax"):
        DeployConfig(precision="int8", calibration="kl")
    d = RunConfig(deploy=DeployConfig(precision="int8")).to_dict()
    assert RunConfig.from_dict(d).deploy == DeployConfig(precision="int8")
