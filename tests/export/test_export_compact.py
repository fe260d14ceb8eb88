import copy
import json

import numpy as np
import onnx
import pytest
import torch

from latprune.errors import BadInput, ParityError
from latprune.export.onnx_export import check_shrink, contract_metadata, export_onnx, read_contract
from latprune.export.parity import check_parity, compare_outputs
from latprune.latency_tables.runtimes.convert import OPSET, onnx_batch
from latprune.models.arch import load_compact, load_dense, save_compact
from latprune.models.graph import ModelGraph
from latprune.models.registry import ModelSpec
from latprune.pipeline.plan import PlanConfig, apply_plan_, build_plan, count_params
from latprune.testing import fake_table

SHAPE = (3, 32, 32)
SPEC = ModelSpec("latprune.testing:residual_net", 10)


@pytest.fixture()
def pair():
    dense = SPEC.build().eval()
    plan = build_plan(ModelGraph(dense, SHAPE), fake_table(dense, SHAPE), 0.4 * fake_table(dense, SHAPE).dense_ms,
                      PlanConfig(importance="magnitude"))
    return dense, apply_plan_(copy.deepcopy(dense), plan, SHAPE).eval()


def test_export_is_checked_smaller_and_matches_torch(tmp_path, pair):
    dense, compact = pair
    meta = contract_metadata({"input_shape": [3, 32, 32], "mean": [0.5], "std": [0.25], "classes": ["a", "b"],
                              "channel_order": "RGB"}, model="residual_net")
    d = export_onnx(dense, tmp_path / "dense.onnx", (4, *SHAPE), metadata=meta)
    c = export_onnx(compact, tmp_path / "model.onnx", (4, *SHAPE), metadata=meta)
    onnx.checker.check_model(onnx.load(c.path), full_check=True)
    assert c.size_bytes < d.size_bytes
    assert check_shrink(d, c, count_params(dense), count_params(compact))["ok"]
    assert read_contract(c.path)["classes"] == ["a", "b"] and onnx_batch(c.path) == 4
    props = {p.key: p.value for p in onnx.load(d.path).metadata_props}
    assert props["latprune.model"] == "residual_net" and json.loads(props["latprune.mean"]) == [0.5]
    assert onnx.load(c.path).opset_import[0].version == OPSET == c.opset
    p = check_parity(compact, c.path, [torch.randn(4, *SHAPE), torch.randn(4, *SHAPE)])
    assert p.ok and p.images == 8 and p.batches == 2 and p.failed is None
    assert p.max_abs_diff < 1e-4 and p.top1_agreement == 1.0
    assert p.to_dict()["outputs"][0]["name"] == "logits"
    assert not list(tmp_path.glob(".*tmp"))


def test_dynamic_batch_export_runs_at_any_batch(tmp_path, pair):
    _, compact = pair
    c = export_onnx(compact, tmp_path / "model.onnx", (4, *SHAPE), dynamic_batch=True)
    assert c.dynamic_batch and c.input_shape[0] == "batch" and onnx_batch(c.path) is None
    assert check_parity(compact, c.path, [torch.randn(1, *SHAPE), torch.randn(7, *SHAPE)]).ok
    static = export_onnx(compact, tmp_path / "static.onnx", (4, *SHAPE))
    assert check_parity(compact, static.path, torch.randn(4, *SHAPE)).ok
    with pytest.raises(Exception):  # a static file refuses another batch
        check_parity(compact, static.path, torch.randn(7, *SHAPE))


def test_a_broken_export_is_caught_and_names_the_output(tmp_path, pair):
    dense, compact = pair
    path = export_onnx(compact, tmp_path / "model.onnx", (4, *SHAPE)).path
    with torch.no_grad():
        broken = copy.deepcopy(compact)
        broken.fc.bias.add_(1.0)  # the file no longer computes what this model computes
    p = check_parity(broken, path, torch.randn(4, *SHAPE))
    assert not p.ok and p.failed == "logits" and p.max_abs_diff == pytest.approx(1.0, abs=1e-4)
    assert "'logits' diverges" in p.message()
    with pytest.raises(ParityError, match="logits"):
        p.raise_if_failed()


def test_a_file_that_did_not_shrink_fails_the_gate(tmp_path, pair):
    dense, compact = pair
    d = export_onnx(dense, tmp_path / "dense.onnx", (4, *SHAPE))
    masked = export_onnx(dense, tmp_path / "masked.onnx", (4, *SHAPE))  # "pruned" by a mask: same file
    res = check_shrink(d, masked, count_params(dense), count_params(compact))
    assert not res["ok"] and "not smaller" in res["detail"]


def test_parity_tolerance_is_allclose_per_element():
    ref = [[np.array([[10.0, 0.0], [0.0, 1.0]])]]
    near = [[np.array([[10.0009, 0.0], [0.0, 1.0]])]]  # 9e-4 <= 1e-4 + 1e-4 * 10: relative to a large value
    over = [[np.array([[10.0012, 0.0], [0.0, 1.0]])]]  # 1.2e-3 > 1.1e-3
    far = [[np.array([[10.0, 0.0003], [0.0, 1.0]])]]  # 3e-4 > 1e-4 + 1e-4 * 0: near zero only atol counts
    assert compare_outputs(["y"], near, ref).ok
    assert not compare_outputs(["y"], over, ref).ok
    assert not compare_outputs(["y"], far, ref).ok
    swapped = [[np.array([[0.0, 10.0], [0.0, 1.0]])]]
    assert compare_outputs(["y"], swapped, ref, atol=100).outputs[0].top1_agreement == 0.5  # within atol, wrong class
    assert not compare_outputs(["y"], swapped, ref, atol=100).ok
    two = compare_outputs(["a", "b"], [[ref[0][0], far[0][0]]], [[ref[0][0], ref[0][0]]])
    assert two.failed == "b" and two.outputs[0].ok


def test_reload_rebuilds_the_compact_model_without_pickles(tmp_path, pair):
    dense, compact = pair
    save_compact(compact, SPEC, tmp_path)
    back = load_compact(tmp_path)
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(back(x), compact(x))
    assert back.stem[0].out_channels == compact.stem[0].out_channels
    state = torch.load(tmp_path / "model.pt", weights_only=True)  # a plain state dict
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_reload_needs_a_run_dir(tmp_path):
    with pytest.raises(BadInput, match="arch.json"):
        load_compact(tmp_path)


def test_reload_of_the_dense_model_and_its_absence(tmp_path, pair):
    dense, compact = pair
    save_compact(compact, SPEC, tmp_path)
    with pytest.raises(BadInput, match="dense.pt"):
        load_dense(tmp_path)
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    back = load_dense(tmp_path)
    with pytest.warns(DeprecationWarning, match="load_dense"):  # the old spelling still loads it
        load_compact(tmp_path, "dense")
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(back(x), dense(x))


def test_gates_pick_the_exit_status_of_the_first_failure():
    from latprune.pipeline.config import GateConfig, RunConfig
    from latprune.pipeline.gates import check_gates
    from latprune.pipeline.run import RunResult

    def _gates(cfg, r):
        return check_gates(cfg.gates, r)

    r = {"parity": {"ok": True, "detail": "ok"}, "onnx": {"shrink": {"ok": True, "ratio": 0.5, "compact_bytes": 1,
                                                                    "dense_bytes": 2}},
         "budget": {"target": "latency", "met": True, "target_ms": 5.0},
         "compact": {"latency_ms": 4.0, "accuracy": 0.80},
         "dense": {"accuracy": 0.83}, "robustness": {"corruption_acc": 0.30, "dense": {"corruption_acc": 0.40}}}
    cfg = RunConfig(gates=GateConfig(max_accuracy_drop=0.05))  # corruption gate defaults to the same 0.05
    gates = _gates(cfg, r)
    assert [g["name"] for g in gates] == ["parity", "onnx_shrink", "latency", "accuracy", "corruption_accuracy"]
    assert gates[3]["ok"] and gates[3]["value"] == pytest.approx(0.03)
    assert not gates[4]["ok"] and gates[4]["value"] == pytest.approx(0.10)
    res = RunResult(None, None, {**r, "gates": gates})
    assert res.exit_code == 5 and [g["name"] for g in res.failed_gates] == ["corruption_accuracy"]
    r["budget"]["met"] = False
    assert RunResult(None, None, {**r, "gates": _gates(cfg, r)}).exit_code == 4
    r["parity"]["ok"] = False
    assert RunResult(None, None, {**r, "gates": _gates(cfg, r)}).exit_code == 3
    assert RunResult(None, None, {**r, "gates": _gates(RunConfig(), r)}).exit_code == 3
    with pytest.raises(BadInput, match="fraction of accuracy"):
        GateConfig(max_accuracy_drop=2)


def test_at_int8_the_gates_judge_the_int8_file_and_its_parity_fails_with_3():
    from latprune.pipeline.config import GateConfig
    from latprune.pipeline.gates import check_gates, exit_code

    r = {"parity": {"ok": True, "detail": "ok"}, "onnx": {"shrink": {"ok": True, "ratio": 0.5, "compact_bytes": 1,
                                                                    "dense_bytes": 2}},
         "budget": {"target": "latency", "met": True, "target_ms": 5.0},
         "compact": {"latency_ms": 4.0, "accuracy": 0.82}, "dense": {"accuracy": 0.83},
         "robustness": {"corruption_acc": 0.39, "dense": {"corruption_acc": 0.40}},
         "int8": {"parity": {"ok": True, "detail": "top-1 0.99"},
                  "compact": {"accuracy": 0.77, "robustness": {"corruption_acc": 0.31}}}}
    gates = check_gates(GateConfig(max_accuracy_drop=0.05), r)
    assert [g["name"] for g in gates] == ["parity", "onnx_shrink", "int8_parity", "latency", "accuracy",
                                          "corruption_accuracy"]
    assert gates[4]["value"] == pytest.approx(0.06) and not gates[4]["ok"]  # 0.83 -> 0.77, not 0.83 -> 0.82
    assert gates[5]["value"] == pytest.approx(0.09) and "model.int8.onnx" in gates[5]["detail"]
    assert exit_code(gates) == 5
    r["int8"]["parity"]["ok"] = False
    assert exit_code(check_gates(GateConfig(), r)) == 3
