"""The ``sensitivity`` value: measured loss increase per (group, width), BatchNorm re-estimated."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from latprune.models.graph import ModelGraph
from latprune.models.widths import candidate_widths
from latprune.pipeline.importance import per_width, uses_halp
from latprune.pipeline.plan import PlanConfig, PlanValues, build_plan, plan_values
from latprune.pipeline.sensitivity import sensitivity_values
from latprune.pipeline.train import bn_recalibrated
from latprune.testing import fake_table, residual_net

SHAPE = (3, 8, 8)


class Head(nn.Module):
    """conv(3->16) + BN + ReLU, pooled, into a classifier that reads only channels 0-3."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 4)
        with torch.no_grad():
            self.fc.weight[:, 4:] = 0.0

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, *SHAPE, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def _loss(model, batches):
    with torch.no_grad():
        return float(torch.cat([nn.functional.cross_entropy(model(x), y, reduction="none") for x, y in batches]).mean())


def test_channels_the_classifier_never_reads_cost_nothing_and_the_others_cost_their_measured_loss():
    torch.manual_seed(0)
    model = Head()
    graph = ModelGraph(model, SHAPE)
    (name,) = [cg.name for cg in graph.groups]
    ranks = {name: np.r_[np.full(4, 10.0), np.linspace(9, 1, 12)]}  # channels 0-3 first
    widths = {name: np.array([2, 4, 8, 12, 16])}
    cal, held = _batches(3, 1), _batches(2, 2)
    before = copy.deepcopy(model.state_dict())
    vals, cost = sensitivity_values(graph, ranks, widths, cal, held, max_passes=10_000)
    # widths that keep channels 0-3 lose nothing: the classifier never reads the others, and
    # re-estimating BatchNorm on the same batches gives channels 0-3 the same statistics
    np.testing.assert_allclose(vals[name][1:], 0.0, atol=1e-6)
    # width 2 keeps channels 0 and 1: its value is minus the loss increase, computed here by hand
    base = _loss(bn_recalibrated(model, cal), held)
    two = copy.deepcopy(model)
    with torch.no_grad():
        two.fc.weight[:, 2:4] = 0.0  # the same as removing channels 2 and 3 from the classifier's input
    assert vals[name][0] == pytest.approx(-(_loss(bn_recalibrated(two, cal), held) - base), abs=1e-5)
    assert vals[name][0] != 0.0
    assert cost.evaluated == 4 and cost.interpolated == 0 and cost.passes == 5 * (3 + 2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_the_pass_budget_subsamples_widths_and_interpolates_between_them():
    torch.manual_seed(0)
    model = residual_net()
    graph = ModelGraph(model, (3, 16, 16))
    ranks = {cg.name: np.arange(cg.size, 0, -1.0) for cg in graph.groups}
    widths = {cg.name: candidate_widths(cg.size, 4) for cg in graph.groups}
    g = torch.Generator().manual_seed(0)
    cal = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g))]
    held = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g))]
    full, c_full = sensitivity_values(graph, ranks, widths, cal, held, max_passes=10_000)
    few, c_few = sensitivity_values(graph, ranks, widths, cal, held, max_passes=c_full.passes // 2)
    assert c_few.passes <= c_full.passes // 2 and c_few.interpolated > 0
    assert c_few.evaluated + c_few.interpolated == c_full.evaluated == sum(len(w) - 1 for w in widths.values())
    for n, ws in widths.items():
        assert few[n][-1] == 0.0 and few[n][0] == pytest.approx(full[n][0])  # the narrowest is always measured
        measured = np.isclose(few[n], full[n])
        # every width is either measured or linear between the measured widths around it
        np.testing.assert_allclose(few[n], np.interp(ws, ws[measured], few[n][measured]))


def test_the_planner_maximises_the_per_width_values():
    """A group whose truncation is made very costly stays whole; the halp score picks the channels."""
    torch.manual_seed(0)
    model = residual_net()
    graph = ModelGraph(model, (3, 16, 16))
    table = fake_table(model, (3, 16, 16))
    cfg = PlanConfig(importance="sensitivity")
    assert per_width("sensitivity") and uses_halp("sensitivity") and not per_width("halp")
    scores = {cg.name: np.arange(cg.size, 0, -1.0) for cg in graph.groups}
    ws = {cg.name: candidate_widths(cg.size, 8) for cg in graph.groups}
    costly = max(graph.groups, key=lambda cg: cg.size).name
    vals = {n: (w - w[-1]) * (100.0 if n == costly else 0.001) for n, w in ws.items()}
    plan = build_plan(graph, table, 0.7 * table.dense_ms, cfg, values=PlanValues(scores, vals))
    kept = {g.name: g.keep for g in plan.groups}
    assert len(kept[costly]) == next(cg.size for cg in graph.groups if cg.name == costly)
    assert plan.predicted_ms <= 0.7 * table.dense_ms + 1e-9
    assert all(k == list(range(len(k))) for k in kept.values())  # the highest-scored channels (scores descend)


def test_plan_values_measures_on_held_out_batches_and_records_the_cost():
    torch.manual_seed(0)
    model = residual_net()
    graph = ModelGraph(model, (3, 16, 16))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    cfg = PlanConfig(importance="sensitivity", halp_batches=2, sensitivity_batches=1)
    with pytest.raises(ValueError, match="held-out"):
        plan_values(graph, cfg, batches)
    v = plan_values(graph, cfg, batches, held_out=batches[1:])
    assert v.cost.passes == (v.cost.evaluated + 1) * 2 and set(v.widths) == set(v.scores)
    table = fake_table(model, (3, 16, 16))
    plan = build_plan(graph, table, 0.8 * table.dense_ms, cfg, batches, held_out=batches[1:])
    assert plan.value_cost["passes"] > 0 and plan.importance == "sensitivity"
