"""HALP's value checked against hand computations; the scoring pass leaves the model as it was."""
import numpy as np
import pytest
import torch
from torch import nn

from latprune.models.graph import ModelGraph
from latprune.pipeline.importance import HalpValue, group_importance, importance_names
from latprune.pipeline.plan import PlanConfig, build_plan
from latprune.testing import fake_table, residual_net

MAG = PlanConfig(importance="magnitude")  # needs no data batches

SHAPE = (3, 8, 8)


def _cb(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))


class FourBN(nn.Module):
    """A residual stream through four BatchNorms (stem, r1, r2 and the block output b), and one
    block-internal channel group with a single BatchNorm (a)."""

    def __init__(self):
        super().__init__()
        self.stem, self.r1, self.r2, self.a, self.b = _cb(3, 8), _cb(8, 8), _cb(8, 8), _cb(8, 4), _cb(4, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.r1(x)
        x = x + self.r2(x)
        x = x + self.b(torch.relu(self.a(x)))
        return self.fc(x.mean((2, 3)))


def _set_bn(model, gamma, grads: dict[str, float]):
    """Every BN: weight ``gamma``, bias 0; weight gradient ``grads[name]`` (0 for unnamed), bias gradient 0."""
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.fill_(gamma)
                m.bias.zero_()
            m.weight.grad = torch.full_like(m.weight, grads.get(name, 0.0))
            m.bias.grad = torch.full_like(m.bias, 1.0)  # times beta = 0: contributes nothing


def _groups(graph):
    stream = next(cg.name for cg in graph.groups if "stem.0" in cg.producers)
    return stream, "a.0"


def test_a_group_through_four_batchnorms_scores_four_times_a_single_one():
    model = FourBN()
    graph = ModelGraph(model, SHAPE)
    stream, inner = _groups(graph)
    assert {"stem.0", "r1.0", "r2.0", "b.0"} <= set(graph.group(stream)[0].producers)
    value = HalpValue(graph)
    _set_bn(model, 0.5, {"stem.1": 1.0, "r1.1": 1.0, "r2.1": 1.0, "b.1": 1.0, "a.1": 1.0})
    value.observe()
    s = value.scores()
    np.testing.assert_allclose(s[stream], np.full(8, 4 * 0.5))  # |sum over 4 BNs of gamma * dL/dgamma|
    np.testing.assert_allclose(s[inner], np.full(4, 0.5))


def test_signs_cancel_across_members_before_the_absolute_value_but_not_across_minibatches():
    model = FourBN()
    graph = ModelGraph(model, SHAPE)
    stream, _ = _groups(graph)
    value = HalpValue(graph)
    _set_bn(model, 2.0, {"stem.1": 1.0, "r1.1": -1.0, "r2.1": 1.0, "b.1": -1.0})
    value.observe()
    np.testing.assert_allclose(value.scores()[stream], np.zeros(8))  # +2 -2 +2 -2 in one minibatch
    value.reset()
    for sign in (1.0, -1.0):  # two minibatches with opposite gradients: |+8| and |-8|, mean 8
        _set_bn(model, 2.0, {n: sign for n in ("stem.1", "r1.1", "r2.1", "b.1")})
        value.observe()
    np.testing.assert_allclose(value.scores()[stream], np.full(8, 8.0))
    assert value.batches == 2


def test_a_group_without_batchnorm_falls_back_to_its_producers_weights():
    """HALP's fallback: |sum of w * dL/dw| over the producers' output rows, weights only."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=True), nn.ReLU(), nn.Conv2d(4, 5, 1, bias=False),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 10))
    graph = ModelGraph(model, SHAPE)
    value = HalpValue(graph)
    g = torch.Generator().manual_seed(0)
    conv = model[0]
    conv.weight.grad = torch.randn(conv.weight.shape, generator=g)
    conv.bias.grad = torch.randn(conv.bias.shape, generator=g)  # not part of the value
    assert value.observe()
    w, gw = conv.weight.detach(), conv.weight.grad
    want = (w * gw).reshape(4, -1).sum(1).abs().double().numpy()
    np.testing.assert_allclose(value.scores()["0"], want, rtol=1e-6)


def test_scoring_pass_observes_each_batch_and_leaves_the_model_alone():
    model = residual_net().eval()
    graph = ModelGraph(model, (3, 16, 16))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = group_importance(graph, "halp", batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not model.training
    # the same by hand: one backward per batch (train mode, as the scoring pass runs), observed separately
    value = HalpValue(graph)
    model.train()
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        value.observe()
    model.zero_grad(set_to_none=True)
    for name, s in value.scores().items():
        np.testing.assert_allclose(scores[name], s, rtol=1e-6)
    assert all((s >= 0).all() for s in scores.values())


def test_halp_plans_to_the_target_and_needs_batches():
    assert "halp" in importance_names()
    model = residual_net()
    table = fake_table(model, (3, 16, 16))
    graph = ModelGraph(model, (3, 16, 16))
    with pytest.raises(ValueError, match="needs data batches"):
        build_plan(graph, table, 0.6 * table.dense_ms, PlanConfig(importance="halp"))
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(2)]
    plan = build_plan(graph, table, 0.6 * table.dense_ms, PlanConfig(importance="halp"), batches)
    assert plan.importance == "halp" and plan.predicted_ms <= 0.6 * table.dense_ms
    assert PlanConfig(importance="halp").scoring_batches == 32 and MAG.scoring_batches == 0
    assert PlanConfig().importance == "halp"  # the default value for latency targets (issue 11)


@pytest.mark.parametrize("method", ["sgd", "sam"])
def test_step_rules_hand_the_gradients_before_the_update_to_observe(method):
    import copy

    from latprune.pipeline.adasap import OptimizerConfig, SharpnessStep
    from latprune.pipeline.train import sgd_step

    model = residual_net().train()
    ref = copy.deepcopy(model)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(ref(x), y).backward()
    seen = []
    rule = sgd_step if method == "sgd" else SharpnessStep(model, OptimizerConfig(method="sam", rho=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rule(model, x, y, opt, observe=lambda: seen.append({n: p.grad.clone() for n, p in model.named_parameters()}))
    assert len(seen) == 1  # once per step; for SAM the first pass's gradient, at the unperturbed weights
    for n, p in ref.named_parameters():
        torch.testing.assert_close(seen[0][n], p.grad)


def test_schedule_feeds_halp_from_the_training_steps_since_the_last_removal():
    from latprune.pipeline.adasap import OptimizerConfig
    from latprune.pipeline.schedule import ScheduleConfig, TrainPruneConfig, train_and_prune_
    from latprune.pipeline.train import TrainConfig
    from latprune.testing import tiny_dataset

    shape = (3, 16, 16)
    model, data = residual_net(), tiny_dataset(64, shape)
    table = fake_table(model, shape)
    final = build_plan(ModelGraph(model, shape), table, 0.5 * table.dense_ms, PlanConfig(importance="magnitude"))
    cfg = TrainPruneConfig(plan=PlanConfig(importance="halp", halp_batches=1),
                           schedule=ScheduleConfig(warmup_epochs=0.25, prune_steps=3, prune_every=2,
                                                   sharpness_rho=0.0, recalibrate_batches=1, width_floor=True),
                           optimizer=OptimizerConfig(method="sgd"),
                           finetune=TrainConfig(epochs=0.25, batch_size=8, warmup_iters=1))
    res = train_and_prune_(model, data, table, final, cfg, shape, progress=False)
    # 64 images, batches of 8: 2 warm-up iterations, then a removal every 2 pruning iterations
    assert [h["value_minibatches"] for h in res.history] == [4, 2, 2]
    assert res.history[-1]["widths"] == {g.name: len(g.keep) for g in final.groups}


def test_a_minibatch_with_non_finite_scores_is_skipped():
    model = FourBN()
    value = HalpValue(ModelGraph(model, SHAPE))
    _set_bn(model, 1.0, {"stem.1": float("nan")})
    assert not value.observe() and value.batches == 0
    _set_bn(model, 1.0, {"a.1": 1.0})
    assert value.observe() and value.batches == 1
    np.testing.assert_allclose(value.scores()["a.0"], np.ones(4))


def test_a_group_where_a_producer_has_no_batchnorm_uses_the_producers_weights():
    """A residual stream fed by a conv without BatchNorm (HALP: not every layer has its BN)."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.r = _cb(3, 8), nn.Conv2d(8, 8, 3, 1, 1, bias=False)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            return self.fc((x + self.r(x)).mean((2, 3)))

    model = Mixed()
    graph = ModelGraph(model, SHAPE)
    value = HalpValue(graph)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    value.observe()
    stream = next(cg.name for cg in graph.groups if "stem.0" in cg.producers)
    w = [model.stem[0].weight.detach(), model.r.weight.detach()]
    want = sum(x.reshape(8, -1).sum(1) for x in w).abs().double().numpy()
    np.testing.assert_allclose(value.scores()[stream], want, rtol=1e-6)


def test_a_torch_pruning_gradient_criterion_plugs_in_and_leaves_the_model_alone():
    """tp_criterion(gradients=True): torch-pruning's Taylor criterion as a plug-in scorer (it is no
    longer registered; this is the path a user's gradient criterion takes)."""
    import torch_pruning as tp

    from latprune.pipeline.importance import tp_criterion

    model = residual_net().eval()
    graph = ModelGraph(model, (3, 16, 16))
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = tp_criterion(lambda: tp.importance.GroupTaylorImportance(), gradients=True)(graph, batches)
    assert set(scores) == set(graph.sizes()) and all(len(scores[k]) == n for k, n in graph.sizes().items())
    assert any(np.abs(s).sum() > 0 for s in scores.values())  # gradients reached it
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training
    assert all(p.grad is None for p in model.parameters())
