import copy

import onnx
import pytest
import torch

from latprune.errors import BadInput, ParityError
from latprune.export.onnx_export import export_onnx
from latprune.export.verify import check_parity
from latprune.pipeline.compact import load_compact, save_compact
from latprune.pipeline.models import ModelSpec
from latprune.pipeline.plan import PlanConfig, build_plan
from latprune.pipeline.prune import apply_plan_
from latprune.testing import fake_table

SHAPE = (3, 32, 32)
SPEC = ModelSpec("latprune.testing:residual_net", 10)


@pytest.fixture()
def pair():
    dense = SPEC.build().eval()
    plan = build_plan(dense, fake_table(dense, SHAPE), 0.4 * fake_table(dense, SHAPE).dense_ms, PlanConfig(), SHAPE)
    return dense, apply_plan_(copy.deepcopy(dense), plan, SHAPE).eval()


def test_export_is_checked_smaller_and_matches_torch(tmp_path, pair):
    dense, compact = pair
    d = export_onnx(dense, tmp_path / "dense.onnx", (4, *SHAPE), metadata={"k": "v"})
    c = export_onnx(compact, tmp_path / "model.onnx", (4, *SHAPE))
    onnx.checker.check_model(onnx.load(c.path), full_check=True)
    assert c.size_bytes < d.size_bytes
    assert {p.key: p.value for p in onnx.load(d.path).metadata_props}["k"] == "v"
    p = check_parity(compact, c.path, torch.randn(4, *SHAPE))
    assert p.max_abs_diff < 1e-4 and p.top1_agreement == 1.0
    assert not list(tmp_path.glob(".*tmp"))


def test_a_broken_export_is_caught(tmp_path, pair):
    dense, compact = pair
    path = export_onnx(compact, tmp_path / "model.onnx", (4, *SHAPE)).path
    with torch.no_grad():
        broken = copy.deepcopy(compact)
        broken.fc.bias.add_(1.0)  # the file no longer computes what this model computes
    with pytest.raises(ParityError, match="logits"):
        check_parity(broken, path, torch.randn(4, *SHAPE))


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
