"""The trained dense model shipped with the package, and the run starting from it."""
import hashlib
import io
import json

import torch

from latprune.models.registry import BUNDLED_WEIGHTS, ModelSpec, bundled_weights
from latprune.pipeline import stages
from latprune.pipeline.config import RunConfig


def test_bundled_resnet20_matches_its_record_and_loads_strictly():
    path = bundled_weights("resnet20", "fashion-mnist", 10)
    assert path is not None and path.name == BUNDLED_WEIGHTS[("resnet20", "fashion-mnist", 10)]
    record = json.loads(path.with_name(path.name + ".json").read_text())
    blob = path.read_bytes()
    assert hashlib.sha256(blob).hexdigest() == record["sha256"] and len(blob) == record["bytes"]
    assert record["model"] == "resnet20" and record["data"] == "fashion-mnist" and "command" in record
    model = ModelSpec("resnet20", 10).build()
    model.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))  # strict: every key, every shape


def test_only_the_shipped_combination_has_bundled_weights():
    assert bundled_weights("resnet56", "fashion-mnist", 10) is None
    assert bundled_weights("resnet20", "cifar10", 10) is None
    assert bundled_weights("resnet20", "fashion-mnist", 100) is None


def test_the_default_run_starts_from_the_bundled_model_unless_told_not_to(tmp_path):
    cfg = RunConfig().with_overrides(out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), progress=False,
                                     data={"test_subset": 10})
    inp, rd = stages.prepare(cfg)
    dense = stages.dense_stage(inp, rd)
    assert dense.info["source"] == "bundled"
    want = torch.load(bundled_weights("resnet20", "fashion-mnist", 10), weights_only=True)
    assert all(torch.equal(want[k], v) for k, v in dense.model.state_dict().items())
    off = RunConfig().with_overrides(out=str(tmp_path / "run2"), cache_dir=str(tmp_path / "cache"), progress=False,
                                     bundled_weights=False, pretrain={"epochs": 0.0}, data={"test_subset": 10})
    inp2, rd2 = stages.prepare(off)
    assert stages.dense_stage(inp2, rd2).info.get("source") != "bundled"
