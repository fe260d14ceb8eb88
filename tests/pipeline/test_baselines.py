"""torch-pruning's one-line baselines, and their ratio found by (fake, deterministic) measurement."""
import pytest
import torch

from latprune.latency_tables.endtoend import PairConfig, measure_speedup
from latprune.pipeline.baselines import match_latency, tp_pruned
from latprune.testing import FakeBackend, residual_net

SHAPE = (3, 16, 16)
ONE = PairConfig(rounds=1, min_round_s=0.01, repeats=1, max_repeats=1)


def test_uniform_pruning_keeps_the_classifier_and_rounds_to_eight():
    dense = residual_net().eval()
    m = tp_pruned(dense, 0.5, SHAPE, round_to=8)
    convs = {n: mod.out_channels for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d)}
    assert all(c % 8 == 0 for c in convs.values()) and convs["b1.0"] == 16  # 32 -> 16
    assert m.fc.out_features == 10 and dense.b1[0].out_channels == 32  # the dense model is untouched
    assert m(torch.zeros(2, *SHAPE)).shape == (2, 10)


def test_the_ratio_is_bisected_to_the_measured_target():
    dense = residual_net().eval()
    backend = FakeBackend(intercept_ms=1.0)
    best, trace = match_latency(dense, 0.6, backend, SHAPE, ONE, round_to=None, tolerance=0.03)
    assert abs(best["measured_ratio"] / 0.6 - 1) <= 0.03 and best == trace[-1]
    again = measure_speedup(backend, dense, tp_pruned(dense, best["pruning_ratio"], SHAPE, None), SHAPE, ONE).ratio
    assert again == pytest.approx(best["measured_ratio"])
    # measured ratios fall as the pruning ratio grows, and the search moved towards the target
    pts = sorted((t["pruning_ratio"], t["measured_ratio"]) for t in trace)
    assert all(a[1] >= b[1] for a, b in zip(pts, pts[1:]))
