import os

import pytest
import torch

# Never touch the user's cache from tests.
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
