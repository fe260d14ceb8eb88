import copy
import os

import pytest
import torch

from latprune.export.onnx_export import export_onnx
from latprune.models.arch import save_compact
from latprune.models.graph import ModelGraph
from latprune.models.registry import ModelSpec
from latprune.pipeline.plan import PlanConfig, apply_plan_, build_plan
from latprune.testing import fake_table

# Never touch the user's cache from tests (set before any latprune import reads it: the config's
# default cache directory is resolved when a RunConfig is made, not at import).
os.environ.setdefault("LATPRUNE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "latprune"))


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401

        has_trt = has_gpu
    except ImportError:
        has_trt = False
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU on this machine"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="TensorRT and a GPU are needed (pip install 'latprune[trt]')"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


RUN_SPEC, RUN_SHAPE = ModelSpec("latprune.testing:residual_net", 10), (3, 32, 32)


@pytest.fixture()
def run_dir(tmp_path):
    """A finished run's deployment files without training: dense and compact (fake-table plan)
    models, their weights, arch.json, and ONNX files at batch 4."""
    dense = RUN_SPEC.build().eval()
    table = fake_table(dense, RUN_SHAPE)
    plan = build_plan(ModelGraph(dense, RUN_SHAPE), table, 0.4 * table.dense_ms, PlanConfig(importance="magnitude"))
    compact = apply_plan_(copy.deepcopy(dense), plan, RUN_SHAPE).eval()
    save_compact(compact, RUN_SPEC, tmp_path)
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    export_onnx(dense, tmp_path / "dense.onnx", (4, *RUN_SHAPE))
    export_onnx(compact, tmp_path / "model.onnx", (4, *RUN_SHAPE))
    return tmp_path
