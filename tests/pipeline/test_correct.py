"""The corrective phase: a model measured over the budget after training is cut again, on the
deterministic FakeBackend (its latency is known exactly, so every decision can be checked)."""
import copy

import pytest

from latprune.latency_tables.endtoend import PairConfig, measure_speedup
from latprune.models.graph import ModelGraph
from latprune.pipeline.adasap import OptimizerConfig
from latprune.pipeline.plan import PlanConfig, build_plan
from latprune.pipeline.schedule import LatencyGoal, ScheduleConfig, TrainPruneConfig, train_and_prune_
from latprune.pipeline.train import TrainConfig
from latprune.testing import FakeBackend, fake_table, model_cost_ms, residual_net, tiny_dataset

SHAPE = (3, 16, 16)
ONE = PairConfig(rounds=1, min_round_s=0.01, repeats=1, max_repeats=1)


def _run(intercept: float, wanted: float, correct_steps: int = 2, measure_steps: bool = True):
    """Plan to ``wanted`` x dense on a table that believes latency is the layers' sum, on a device
    that adds ``intercept`` x dense to every call: the table under-predicts the ratio."""
    model, data = residual_net(), tiny_dataset(64, SHAPE)
    table = fake_table(model, SHAPE)
    dense = copy.deepcopy(model).eval()
    backend = FakeBackend(intercept_ms=intercept * table.dense_ms)
    timed = []

    def measure(m):
        timed.append(model_cost_ms(m, SHAPE))
        return measure_speedup(backend, dense, copy.deepcopy(m).eval(), SHAPE, ONE).ratio

    mag = PlanConfig(importance="magnitude")
    final = build_plan(ModelGraph(model, SHAPE), table, wanted * 0.935 * table.dense_ms, mag)
    cfg = TrainPruneConfig(plan=mag,
                           schedule=ScheduleConfig(warmup_epochs=0.25, prune_steps=2, prune_every=2, sharpness_rho=0.0,
                                                   recalibrate_batches=0, correct_steps=correct_steps, correct_iters=3,
                                                   measure_steps=measure_steps),
                           optimizer=OptimizerConfig(method="sgd"),
                           finetune=TrainConfig(epochs=0.25, batch_size=8, warmup_iters=1))
    res = train_and_prune_(model, data, table, final, cfg, SHAPE, progress=False, goal=LatencyGoal(measure, wanted))
    true_ratio = (backend.intercept_ms + model_cost_ms(model, SHAPE)) / (backend.intercept_ms + model_cost_ms(dense,
                                                                                                           SHAPE))
    return res, true_ratio, table, timed


def test_a_model_measured_over_budget_is_cut_until_it_meets_it():
    res, ratio, table, _ = _run(intercept=0.3, wanted=0.6)
    actions = [c["action"] for c in res.corrections]
    assert actions[0] == "removed" and actions[-1] in ("accepted", "under budget")
    assert ratio <= 0.97 * 0.6 + 1e-9  # the model really meets the budget on the device
    assert res.corrections[-1]["measured_ratio"] == pytest.approx(ratio)
    first = res.corrections[0]
    assert first["measured_ratio"] > 0.97 * 0.6  # the schedule alone, planned on the table, missed
    # the corrected term passes through the measured point (one point: the slope is kept)
    e2e = first["e2e"]
    assert e2e["intercept_ms"] + e2e["slope"] * first["layers_ms"] == pytest.approx(
        first["measured_ratio"] * table.dense_ms)
    assert res.e2e is not None and all(c.get("finetuned", True) for c in res.corrections)
    assert {f"correct{c['check']}" for c in res.corrections if c["action"] == "removed"} <= set(res.phases)


def test_a_model_the_table_predicts_exactly_is_checked_once_and_kept():
    res, ratio, _, timed = _run(intercept=0.0, wanted=0.6)
    assert [c["action"] for c in res.corrections] in (["accepted"], ["under budget"])
    assert res.e2e is None and res.corrections[0]["measured_ratio"] == pytest.approx(ratio)
    # every removal was timed too, and its measured ratio is the device's
    assert all(h["measured_ratio"] is not None for h in res.history) and len(timed) == len(res.history) + 1


def test_corrective_removals_are_bounded():
    res, ratio, _, timed = _run(intercept=0.3, wanted=0.6, correct_steps=0, measure_steps=False)
    assert [c["action"] for c in res.corrections] == ["over budget, corrective steps used up"]
    assert ratio > 0.97 * 0.6 and len(timed) == 1  # only the final check was timed
    assert all(h["measured_ratio"] is None for h in res.history)
