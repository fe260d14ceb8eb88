import copy

import pytest
import torch

from latprune.latency_tables.profile import ProfileConfig, profile_model
from latprune.latency_tables.runtimes.convert import onnx_bytes
from latprune.models.graph import ModelGraph
from latprune.pipeline.plan import GroupPlan, PlanConfig, PruningPlan, apply_plan_, build_plan
from latprune.testing import TINY_MODELS, FakeBackend, fake_table, residual_net

MAG8 = PlanConfig(round_to=8, importance="magnitude")  # needs no data batches

SHAPE = (3, 32, 32)


def groups_of(model):
    return ModelGraph(model, SHAPE).groups


def test_residual_channels_form_one_group():
    gs = {g.name: g for g in groups_of(residual_net())}
    coupled = [g for g in gs.values() if "stem.0" in g.producers]
    assert len(coupled) == 1
    assert set(coupled[0].producers) >= {"stem.0", "a2.0"}  # the add ties the stem to the block output
    proj = [g for g in gs.values() if "proj.0" in g.producers][0]
    assert "b2.0" in proj.producers and ("fc", 32) in proj.consumers
    assert not any("fc" in g.producers for g in gs.values())  # the classifier output is never pruned


def test_concat_consumer_sees_both_branches():
    model = TINY_MODELS["concat"]()
    graph = ModelGraph(model, SHAPE)
    gs, lw = graph.groups, graph.layer_widths(["merge.0"])
    assert sum(lw.in_groups["merge.0"].values()) == 40
    kept = {g.name: g.size for g in gs}
    kept["left.0"] = 8
    assert lw.widths("merge.0", kept) == (32, 32)


def _plan_keeping(model, keep_fn):
    gs = groups_of(model)
    plans = [GroupPlan(g.name, g.size, keep_fn(g)) for g in gs]
    return PruningPlan(1.0, 1.0, 1.0, 0.0, {}, plans, {}, 1, [], "l2", 8)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_physical_removal_runs_and_shrinks(name):
    model = TINY_MODELS[name]().eval()
    n_params = sum(p.numel() for p in model.parameters())
    plan = _plan_keeping(model, lambda g: list(range(0, g.size, 2)))
    pruned = apply_plan_(copy.deepcopy(model), plan, SHAPE)
    assert pruned(torch.randn(2, *SHAPE)).shape == (2, 10)
    assert sum(p.numel() for p in pruned.parameters()) < n_params
    assert not any(hasattr(m, "weight_mask") for m in pruned.modules())  # removed, not masked


def test_coupled_channels_are_removed_together_and_kept_weights_survive():
    model = residual_net().eval()
    keep = [1, 3, 4, 8, 9, 10, 12, 15]
    plan = _plan_keeping(model, lambda g: keep if "stem.0" in g.producers else list(range(g.size)))
    pruned = apply_plan_(copy.deepcopy(model), plan, SHAPE)
    assert pruned.stem[0].out_channels == pruned.a2[0].out_channels == 8
    assert pruned.a1[0].in_channels == pruned.b1[0].in_channels == pruned.proj[0].in_channels == 8
    torch.testing.assert_close(pruned.stem[0].weight, model.stem[0].weight[keep])
    torch.testing.assert_close(pruned.a1[0].weight, model.a1[0].weight[:, keep])
    torch.testing.assert_close(pruned.stem[1].running_mean, model.stem[1].running_mean[keep])


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_plan_meets_the_predicted_budget_on_the_round_to_grid(name):
    model = TINY_MODELS[name]()
    table = fake_table(model, SHAPE, step=8)
    for frac in (0.4, 0.7):
        plan = build_plan(ModelGraph(model, SHAPE), table, frac * table.dense_ms, MAG8)
        assert plan.predicted_ms <= frac * table.dense_ms + 1e-9
        for g in plan.groups:
            assert len(g.keep) % 8 == 0 or len(g.keep) == g.size
            assert len(g.keep) >= min(8, g.size)
        pruned = apply_plan_(copy.deepcopy(model), plan, SHAPE)
        assert pruned(torch.randn(1, *SHAPE)).shape == (1, 10)


def test_plan_keeps_the_most_important_channels():
    model = residual_net()
    with torch.no_grad():
        model.b1[0].weight.mul_(0.01)
        model.b1[0].weight[[5, 7]] *= 1000  # two channels far larger than the rest
    table = fake_table(model, SHAPE)
    plan = build_plan(ModelGraph(model, SHAPE), table, 0.5 * table.dense_ms, PlanConfig(importance="magnitude"))
    g = next(g for g in plan.groups if g.name == "b1.0")
    assert len(g.keep) < g.size and {5, 7} <= set(g.keep)


def test_taylor_importance_uses_gradients():
    model = residual_net()
    table = fake_table(model, SHAPE)
    batches = [(torch.randn(8, *SHAPE), torch.randint(0, 10, (8,)))]
    with pytest.warns(DeprecationWarning, match="'taylor' now means 'halp'"):
        cfg = PlanConfig(importance="taylor")
    plan = build_plan(ModelGraph(model, SHAPE), table, 0.6 * table.dense_ms, cfg, batches)
    assert plan.importance == "halp" and plan.predicted_ms <= 0.6 * table.dense_ms
    assert all(p.grad is None for p in model.parameters())


def test_budget_below_floor_says_what_is_reachable():
    from latprune.errors import BadInput

    model = residual_net()
    table = fake_table(model, SHAPE)
    with pytest.raises(BadInput, match=r"smallest reachable latency .* raise --budget"):
        build_plan(ModelGraph(model, SHAPE), table, 0.01 * table.dense_ms, PlanConfig(importance="magnitude"))


class GroupedNet(torch.nn.Module):
    """A ResNeXt-style block: a grouped (not depthwise) 3x3 conv between two 1x1 convs."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.reduce = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(32))
        self.expand = nn.Sequential(nn.Conv2d(32, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        return self.fc(self.expand(torch.relu(self.grouped(self.reduce(self.stem(x))))).mean((2, 3)))


def test_groups_through_a_grouped_conv_are_left_whole_in_every_stage():
    model = GroupedNet()
    graph = ModelGraph(model, SHAPE)
    assert set(graph.whole) == {"reduce.0", "grouped.0"} and "groups=4" in graph.whole["grouped.0"]
    assert set(graph.sizes()) == {"stem.0", "expand.0"}
    # the end-to-end fit's random configurations only draw the groups the graph offers
    table = profile_model(model, SHAPE, FakeBackend(), ProfileConfig(step=8, fit_configs=6), progress=False)
    plan = build_plan(graph, table, 0.6 * table.dense_ms, PlanConfig(importance="magnitude"))
    assert plan.unpruned["grouped.0"].startswith("grouped convolution")
    apply_plan_(model, plan, SHAPE)
    assert model.grouped[0].in_channels == model.grouped[0].out_channels == 32
    assert model(torch.zeros(2, *SHAPE)).shape == (2, 10)
    assert onnx_bytes(model, (1, *SHAPE))  # the export that used to fail on a cut group count
