"""AdaSAP_P: global magnitude rank to a parameter ratio, k_r = m k^(r/R); the sharpness probe."""
import copy

import numpy as np
import pytest
import torch

from latprune.errors import BadInput
from latprune.models.graph import ModelGraph
from latprune.pipeline.adasap import OptimizerConfig
from latprune.pipeline.importance import group_importance
from latprune.pipeline.plan import PlanConfig, apply_plan_, build_param_plan, build_plan, count_params
from latprune.pipeline.schedule import ScheduleConfig, TrainPruneConfig, measure_sharpness, train_and_prune_
from latprune.pipeline.train import TrainConfig
from latprune.testing import fake_table, residual_net, tiny_dataset

MAG = PlanConfig(importance="magnitude")  # needs no data batches

SHAPE = (3, 16, 16)


def _scores(model):
    graph = ModelGraph(model, SHAPE)
    return graph.groups, group_importance(graph, "magnitude")


def test_param_plan_keeps_the_global_top_n():
    model = residual_net()
    groups, scores = _scores(model)
    n = 30
    plan = build_param_plan(ModelGraph(model, SHAPE), fake_table(model, SHAPE), MAG, keep=n)
    flat = sorted(((s, g, i) for g, v in scores.items() for i, s in enumerate(v)), reverse=True)
    top = {(g, i) for _, g, i in flat[:n]}
    for gp in plan.groups:
        want = sorted(i for g, i in top if g == gp.name) or [int(np.argmax(scores[gp.name]))]
        assert gp.keep == want, gp.name
    assert plan.round_to == 1 and plan.predicted_ms < plan.dense_predicted_ms


def test_param_plan_meets_the_parameter_target_with_the_most_neurons():
    model = residual_net()
    p0, table = count_params(model), fake_table(model, SHAPE)
    plan = build_param_plan(ModelGraph(model, SHAPE), table, MAG, max_params=int(0.5 * p0))
    n = plan.history[0]["kept_neurons"]
    pruned = apply_plan_(copy.deepcopy(model), plan, SHAPE)
    assert count_params(pruned) <= 0.5 * p0
    one_more = build_param_plan(ModelGraph(model, SHAPE), table, PlanConfig(importance="magnitude"), keep=n + 1)
    assert count_params(apply_plan_(copy.deepcopy(model), one_more, SHAPE)) > 0.5 * p0
    with pytest.raises(BadInput, match="raise --param-ratio"):
        build_param_plan(ModelGraph(model, SHAPE), table, PlanConfig(importance="magnitude"), max_params=10)


def test_params_schedule_follows_the_exponential_neuron_count():
    model, data = residual_net(), tiny_dataset(64, SHAPE)
    table = fake_table(model, SHAPE)
    p0 = count_params(model)
    m = sum(cg.size for cg in ModelGraph(model, SHAPE).groups)
    sched = ScheduleConfig(warmup_epochs=0.25, prune_steps=3, prune_every=2, target="params", param_ratio=0.4,
                           sharpness_batches=1)
    res = train_and_prune_(model, data, table, None,
                           TrainPruneConfig(
                               plan=PlanConfig(importance="magnitude"),
                               schedule=sched,
                               optimizer=OptimizerConfig(rho=0.1, rho_max=0.1),
                               finetune=TrainConfig(epochs=0.25, batch_size=8, warmup_iters=1)),
                           SHAPE, progress=False)
    h = res.history
    assert len(h) == 3 and h[-1]["target"] == {"params": int(0.4 * p0)}
    assert count_params(model) <= 0.4 * p0 and h[-1]["params"] == count_params(model)
    k = h[-1]["neurons"] / m  # the final kept fraction; earlier steps follow m k^(r/R) (k set after warm-up)
    for step in h[:-1]:
        want = step["target"]["neurons"]
        assert abs(step["neurons"] - want) <= len(step["widths"])  # groups keep >= 1 channel
        assert want == pytest.approx(m * k ** (step["step"] / 3), abs=0.05 * m)
    assert [s["neurons"] for s in h] == sorted((s["neurons"] for s in h), reverse=True)
    assert set(res.sharpness) >= {"pre_pruning", "post_pruning"}


def test_sharpness_probe_is_a_nonnegative_loss_increase_and_leaves_the_model_alone():
    model, data = residual_net().train(), tiny_dataset(32, SHAPE)
    batches = list(data.batches(data.train, 16))
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    s_small = measure_sharpness(model, batches, rho=0.01, steps=3)
    s_big = measure_sharpness(model, batches, rho=0.5, steps=3)
    assert 0 <= s_small < s_big
    assert measure_sharpness(model, batches, rho=0.0, steps=1) == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()) and model.training


@pytest.mark.parametrize("kw,match", [
    ({"param_ratio": 0.4}, "add --target params"),
    ({"target": "params"}, "needs --param-ratio"),
    ({"target": "params", "param_ratio": 1.5}, "needs --param-ratio"),
    ({"target": "flops"}, "latency or params"),
    ({"sharpness_rho": -1.0}, "sharpness_rho"),
])
def test_bad_schedule_names_the_fix(kw, match):
    with pytest.raises(BadInput, match=match):
        ScheduleConfig(**kw)


def test_taylor_scoring_leaves_batchnorm_statistics_alone():
    model, data = residual_net().eval(), tiny_dataset(32, SHAPE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = group_importance(ModelGraph(model, SHAPE), "taylor", list(data.batches(data.train, 16)))
    assert all(np.all(np.isfinite(s)) for s in scores.values()) and not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_last_latency_step_lands_on_a_floor_plan_despite_rounding():
    """A validated plan at the floor (every group at its smallest width): at r = R the target is the
    plan's own prediction, which the pruned model's sum may exceed by a rounding error."""
    import dataclasses

    from latprune.errors import BudgetBelowFloor

    model, data = residual_net(), tiny_dataset(64, SHAPE)
    table = fake_table(model, SHAPE)
    with pytest.raises(BudgetBelowFloor) as e:
        build_plan(ModelGraph(model, SHAPE), table, 1e-9, PlanConfig(importance="magnitude"))
    floor = build_plan(ModelGraph(model, SHAPE), table, e.value.floor_ms, PlanConfig(importance="magnitude"))
    final = dataclasses.replace(floor, predicted_ms=floor.predicted_ms * (1 - 1e-12))
    res = train_and_prune_(model, data, table, final,
                           TrainPruneConfig(
                               plan=PlanConfig(importance="magnitude"),
                               schedule=ScheduleConfig(warmup_epochs=0.25, prune_steps=2, prune_every=2,
                                                       sharpness_rho=0.0),
                               optimizer=OptimizerConfig(method="sgd"),
                               finetune=TrainConfig(epochs=0.25, batch_size=8, warmup_iters=1)),
                           SHAPE, progress=False)
    assert res.history[-1]["widths"] == {g.name: len(g.keep) for g in floor.groups}
