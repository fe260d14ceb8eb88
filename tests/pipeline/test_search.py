"""The plan search: candidates that all fit the budget, chosen by held-out accuracy after a short fine-tune."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from latprune.errors import BudgetBelowFloor
from latprune.latency_tables.predict import LatencyModel
from latprune.models.graph import ModelGraph
from latprune.models.surgery import pruned_copy
from latprune.models.widths import candidate_widths
from latprune.pipeline.calibrate import plan_to_budget
from latprune.pipeline.plan import PlanConfig, PlanValues, build_plan
from latprune.pipeline.schedule import ScheduleConfig, floors_at_plan
from latprune.pipeline.search import MEASURE_ROUNDS, perturbed_widths, search_plan, uniform_widths
from latprune.pipeline.train import bn_recalibrated
from latprune.testing import FakeBackend, fake_table, model_cost_ms, residual_net

SHAPE = (3, 8, 8)


class TwoBranches(nn.Module):
    """Two parallel conv+BN+ReLU branches, pooled and concatenated into a classifier that reads
    only the first branch: the second one's channels are worth nothing."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(32, 4)
        with torch.no_grad():
            self.fc.weight[:, 16:] = 0.0

    def forward(self, x):
        return self.fc(torch.cat([self.a(x).mean((2, 3)), self.b(x).mean((2, 3))], 1))


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, *SHAPE, generator=g) for _ in range(n)]


def _setup():
    torch.manual_seed(0)
    model = TwoBranches()
    train_x, val_x = _images(4, 1), _images(2, 2)
    # BatchNorm statistics from the training images, then labels from the model itself: the dense
    # model is exactly right on held-out data, and so is any candidate that keeps branch a whole
    model.load_state_dict(bn_recalibrated(model, [(x, None) for x in train_x]).state_dict())
    model.eval()
    with torch.no_grad():
        batches = [(x, model(x).argmax(1)) for x in train_x]
        held_out = [(x, model(x).argmax(1)) for x in val_x]
    graph = ModelGraph(model, SHAPE)
    return model, graph, batches, held_out


def _wrong_values(graph):
    """Per-width values that say branch a is worthless and branch b precious: the knapsack's mistake."""
    scores = {cg.name: np.arange(cg.size, 0, -1.0) for cg in graph.groups}  # keep channels 0, 1, ... first
    a = next(cg.name for cg in graph.groups if "a." in cg.name)
    ws = {cg.name: candidate_widths(cg.size, 8) for cg in graph.groups}
    vals = {n: (w - w[-1]) * (0.001 if n == a else 100.0) for n, w in ws.items()}
    return a, PlanValues(scores, vals)


def test_the_search_overrules_a_wrong_value_by_what_the_candidates_do_on_held_out_data():
    model, graph, batches, held_out = _setup()
    a, values = _wrong_values(graph)
    table = fake_table(model, SHAPE)
    before = copy.deepcopy(model.state_dict())
    target = 0.8 * table.dense_ms  # room for one branch at 16 channels, not both
    cfg = PlanConfig(importance="sensitivity", search_candidates=8, search_finalists=2, search_iters=0)
    knapsack = build_plan(graph, table, target, cfg, values=values)
    assert len(next(g for g in knapsack.groups if g.name == a).keep) == 8  # the value's choice: cut branch a
    plan = search_plan(graph, table, target, cfg, values, batches, held_out)
    assert len(next(g for g in plan.groups if g.name == a).keep) == 16  # held-out accuracy: keep branch a
    rows = plan.search["candidates"]
    assert sum(bool(r.get("chosen")) for r in rows) == 1
    assert {r["kind"] for r in rows if "finetuned_accuracy" in r} >= {"knapsack", "uniform"}
    chosen = next(r for r in rows if r.get("chosen"))
    assert chosen["finetuned_accuracy"] == 1.0 == max(r.get("finetuned_accuracy", 0) for r in rows)
    assert all(r["predicted_ms"] <= target * (1 + 1e-9) for r in rows)
    assert plan.predicted_ms <= target * (1 + 1e-9) and plan.search["cost"]["candidates"] == len(rows)
    for k, v in model.state_dict().items():  # the model itself is never touched
        assert torch.equal(v, before[k]), k


def test_the_search_is_off_by_default_and_deterministic_when_on():
    model, graph, batches, held_out = _setup()
    _, values = _wrong_values(graph)
    table = fake_table(model, SHAPE)
    target = 0.8 * table.dense_ms
    off = PlanConfig(importance="sensitivity")
    assert search_plan(graph, table, target, off, values, None, None) == build_plan(graph, table, target, off,
                                                                                   values=values)
    on = PlanConfig(importance="sensitivity", search_candidates=6, search_finalists=2, search_iters=3)
    with pytest.raises(ValueError, match="held-out"):
        search_plan(graph, table, target, on, values, batches, None)
    one, two = (search_plan(graph, table, target, on, values, batches, held_out) for _ in range(2))
    assert one.search["candidates"] == two.search["candidates"] and one.groups == two.groups
    assert all("finetuned_loss" in r for r in one.search["candidates"] if r["kind"] in ("knapsack", "uniform"))


def test_uniform_widths_are_the_widest_single_fraction_that_fits():
    grid = {"x": np.array([8, 16, 24, 32]), "y": np.array([8, 16])}

    def predict(w):
        return float(w["x"] + w["y"])

    assert uniform_widths(grid, predict, 48.0) == {"x": 32, "y": 16}
    assert uniform_widths(grid, predict, 30.0) == {"x": 16, "y": 8}  # f = 0.5: 16 of 32, 8 of 16
    assert uniform_widths(grid, predict, 1.0) == {"x": 8, "y": 8}  # nothing fits: the narrowest


def test_perturbed_widths_fit_and_leave_no_group_that_could_still_widen():
    model = residual_net()
    graph = ModelGraph(model, (3, 16, 16))
    table = fake_table(model, (3, 16, 16))
    lm = LatencyModel(table, graph.layer_widths(table.layer_keys))
    grid = {cg.name: candidate_widths(cg.size, 8) for cg in graph.groups}
    target = 0.6 * table.dense_ms
    parent = uniform_widths(grid, lm.predict, target)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(10):
        w = perturbed_widths(parent, grid, lm.predict, target, rng)
        assert lm.predict(w) <= target and all(int(k) in grid[n] for n, k in w.items())
        for n, ws in grid.items():  # maximal: widening any one group a step breaks the budget
            i = list(ws).index(w[n])
            if i + 1 < len(ws):
                assert lm.predict({**w, n: int(ws[i + 1])}) > target
        seen.add(tuple(sorted(w.items())))
    assert len(seen) > 1  # the perturbations do differ


RES = (3, 16, 16)


def _random_batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, *RES, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


def test_a_measured_search_lets_only_candidates_the_runtime_puts_under_the_budget_compete():
    torch.manual_seed(0)
    model = residual_net()
    graph = ModelGraph(model, RES)
    table = fake_table(model, RES, step=2)
    dense_cost = model_cost_ms(model, RES)
    timed = []

    def measure(m):  # the runtime: 20 % faster than the table says, for every structure
        timed.append(1)
        return 0.8 * model_cost_ms(m, RES) / dense_cost

    cfg = PlanConfig(round_to=2, importance="magnitude", search_candidates=12, search_finalists=2, search_iters=2)
    values = PlanValues({cg.name: np.arange(cg.size, 0, -1.0) for cg in graph.groups})
    accept = 0.6
    plan = search_plan(graph, table, 0.6 * table.dense_ms, cfg, values, _random_batches(3, 0), _random_batches(2, 1),
                       measure=measure, accept_ratio=accept)
    rows = plan.search["candidates"]
    assert len(timed) == plan.search["cost"]["timings"] == sum(len(r["measured_ratios"]) for r in rows)
    assert any("@" in r["kind"] for r in rows)  # proposals above the table's target, for the runtime to judge
    for r in rows:
        assert r["measured_ratio"] == pytest.approx(0.8 * r["predicted_ms"] / table.dense_ms)
        assert len(r["measured_ratios"]) in (1, MEASURE_ROUNDS)
        assert ("bn_accuracy" in r) == (r["measured_ratio"] <= accept)  # only those measured under compete
    chosen = next(r for r in rows if r.get("chosen"))
    assert chosen["measured_ratio"] <= accept
    # the table alone would have refused it: the measurement let a wider plan in
    assert any(r["predicted_ms"] > 0.6 * table.dense_ms for r in rows if "bn_accuracy" in r)


def test_plan_to_budget_with_the_search_meets_the_window_on_a_wrong_table():
    torch.manual_seed(0)
    model = residual_net()
    backend = FakeBackend(intercept_ms=0.08, slope=1.3)  # the truth; the table predicts intercept 0, slope 1
    table = fake_table(model, RES, step=2)
    table.dense_ms = backend.intercept_ms + backend.slope * model_cost_ms(model, RES)
    cfg = PlanConfig(round_to=2, importance="magnitude", search_candidates=8, search_finalists=2, search_iters=2)
    cal = plan_to_budget(ModelGraph(model, RES), table, 0.6, cfg, backend, iters=6, window=(0.90, 0.97),
                         batches=_random_batches(3, 0), held_out=_random_batches(2, 1))
    assert cal.measured_ratio <= 0.97 * 0.6
    assert all("search" in h for h in cal.history)
    probe_ms = backend.intercept_ms + backend.slope * model_cost_ms(
        pruned_copy(model, {g.name: len(g.keep) for g in cal.plan.groups}, RES), RES)
    assert probe_ms / table.dense_ms == pytest.approx(cal.measured_ratio)
    assert cal.table.e2e.predict(cal.plan.layers_ms) == pytest.approx(probe_ms, rel=1e-6)
    # the plan's own prediction is the corrected table's: the pruning steps aim at it, floored at its widths
    assert cal.plan.predicted_ms == pytest.approx(cal.table.e2e.predict(cal.plan.layers_ms))


def test_plan_to_budget_with_the_search_refuses_a_budget_below_the_tables_floor_before_any_candidate():
    model = residual_net()
    backend = FakeBackend()
    table = fake_table(model, RES, step=2)
    cfg = PlanConfig(round_to=2, importance="magnitude", search_candidates=8, search_finalists=2, search_iters=2)
    with pytest.raises(BudgetBelowFloor):
        plan_to_budget(ModelGraph(model, RES), table, 0.01, cfg, backend, window=(0.90, 0.97),
                       batches=_random_batches(3, 0), held_out=_random_batches(2, 1))
    assert backend.models_timed == 0  # refused by the table: no candidate was built or timed


def test_a_searched_plan_floors_the_schedule_at_its_widths():
    model, graph, batches, held_out = _setup()
    _, values = _wrong_values(graph)
    table = fake_table(model, SHAPE)
    target = 0.8 * table.dense_ms
    knapsack = build_plan(graph, table, target, PlanConfig(importance="sensitivity"), values=values)
    searched = search_plan(graph, table, target, PlanConfig(importance="sensitivity", search_candidates=4,
                                                            search_finalists=1, search_iters=0),
                           values, batches, held_out)
    assert not floors_at_plan(ScheduleConfig(), knapsack)  # the architecture emerges by default
    assert floors_at_plan(ScheduleConfig(width_floor=True), knapsack)
    assert floors_at_plan(ScheduleConfig(), searched)  # the search chose the widths: the steps go to them
    assert not floors_at_plan(ScheduleConfig(target="params", param_ratio=0.5), searched)  # no latency plan
