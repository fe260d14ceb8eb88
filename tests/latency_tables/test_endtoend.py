"""The end-to-end term, its fit and validation, and the closed loop, against a runtime whose
latency is a known function of the widths (``latprune.testing.FakeBackend``)."""
import copy

import numpy as np
import pytest

from latprune.errors import BadInput, BudgetBelowFloor
from latprune.latency_tables.endtoend import (
    SIDE_BY_SIDE,
    PairConfig,
    fit_end_to_end,
    measure_configs,
    measure_side_by_side,
    predicted_latency,
    random_widths,
    smallest_widths,
    validate_table,
)
from latprune.latency_tables.profile import ProfileConfig, isolated_outliers, profile_model
from latprune.latency_tables.table import EndToEnd
from latprune.models.graph import ModelGraph
from latprune.models.surgery import pruned_copy
from latprune.pipeline.calibrate import plan_to_budget
from latprune.pipeline.plan import PlanConfig, build_plan
from latprune.testing import FakeBackend, fake_table, model_cost_ms, residual_net

MAG2 = PlanConfig(round_to=2, importance="magnitude")  # needs no data batches
MAG4 = PlanConfig(round_to=4, importance="magnitude")  # needs no data batches

SHAPE = (3, 32, 32)
FAST = PairConfig(rounds=2, min_round_s=0.001, repeats=1, max_repeats=1)


def test_fit_recovers_an_affine_law_exactly():
    pts = [{"layers_ms": s, "measured_ms": 0.4 + 1.3 * s} for s in (1.0, 2.5, 4.0, 7.0)]
    e = EndToEnd.fit(pts)
    assert e.intercept_ms == pytest.approx(0.4) and e.slope == pytest.approx(1.3)


def test_one_point_gives_the_proportional_term():
    e = EndToEnd.fit([{"layers_ms": 8.0, "measured_ms": 6.0}])
    assert (e.intercept_ms, e.slope) == (0.0, pytest.approx(0.75))


def test_a_fit_with_negative_slope_falls_back_to_proportional():
    e = EndToEnd.fit([{"layers_ms": 1.0, "measured_ms": 5.0}, {"layers_ms": 2.0, "measured_ms": 4.0}])
    assert e.intercept_ms == 0.0 and e.slope > 0


def test_correction_passes_through_the_measured_point_then_takes_the_secant():
    e = EndToEnd(0.0, 1.0)
    one = e.corrected([{"layers_ms": 4.0, "measured_ms": 5.0}])
    assert one.slope == 1.0 and one.predict(4.0) == pytest.approx(5.0)
    two = e.corrected([{"layers_ms": 4.0, "measured_ms": 5.0}, {"layers_ms": 2.0, "measured_ms": 2.8}])
    assert two.slope == pytest.approx(1.1) and two.predict(2.0) == pytest.approx(2.8)
    steep = e.corrected([{"layers_ms": 4.0, "measured_ms": 9.0}, {"layers_ms": 2.0, "measured_ms": 1.0}])
    assert steep.slope == 2.0  # the secant (4.0) is clamped to 2x the fitted slope


def test_pruned_copy_has_the_asked_widths():
    model = residual_net()
    sizes = ModelGraph(model, SHAPE).sizes()
    small = pruned_copy(model, smallest_widths(sizes, 8), SHAPE)
    assert ModelGraph(small, SHAPE).sizes() == {g: min(8, n) for g, n in sizes.items()}
    assert ModelGraph(model, SHAPE).sizes() == sizes  # the original is untouched


def test_fit_recovers_the_runtime_law_and_validation_measures_zero_error():
    model = residual_net()
    backend = FakeBackend(intercept_ms=0.05, slope=1.2)
    table = fake_table(model, SHAPE)  # says intercept 0, slope 1: wrong for this runtime
    table.dense_ms = backend.intercept_ms + backend.slope * model_cost_ms(model, SHAPE)
    e2e = fit_end_to_end(ModelGraph(model, SHAPE), table, backend, n_random=3, step=8, cfg=FAST, progress=False)
    assert e2e.intercept_ms == pytest.approx(0.05, rel=1e-6) and e2e.slope == pytest.approx(1.2, rel=1e-6)
    assert [p["label"] for p in e2e.points] == ["dense", "smallest", "random0", "random1", "random2"]
    v = validate_table(ModelGraph(model, SHAPE), table.with_e2e(e2e), backend, k=4, step=8, cfg=FAST, progress=False)
    assert v["k"] == 4 and len(v["points"]) == 4
    assert v["median_rel_err"] < 1e-9 and v["p90_rel_err"] < 1e-9
    wrong = validate_table(ModelGraph(model, SHAPE), table, backend, k=4, step=8, cfg=FAST, progress=False)
    assert wrong["median_rel_err"] > 0.05  # the unfitted table is measurably off


def test_closed_loop_corrects_a_wrong_table_into_the_window():
    model = residual_net()
    backend = FakeBackend(intercept_ms=0.08, slope=1.3)  # the truth
    table = fake_table(model, SHAPE, step=2)  # predicts intercept 0, slope 1
    table.dense_ms = backend.intercept_ms + backend.slope * model_cost_ms(model, SHAPE)
    cal = plan_to_budget(ModelGraph(model, SHAPE), table, 0.6, MAG2, backend, iters=6,
                         window=(0.90, 0.97), timing=FAST)
    assert 0.90 * 0.6 <= cal.measured_ratio <= 0.97 * 0.6
    assert len(cal.history) >= 2, "the first plan, on the wrong table, must be off the window"
    assert cal.history[0]["measured_ratio"] > 0.97 * 0.6  # the wrong table is optimistic
    # the corrected term predicts what the runtime measures for the chosen plan
    probe_ms = backend.intercept_ms + backend.slope * model_cost_ms(
        pruned_copy(model, {g.name: len(g.keep) for g in cal.plan.groups}, SHAPE), SHAPE)
    assert cal.table.e2e.predict(cal.plan.layers_ms) == pytest.approx(probe_ms, rel=0.05)
    assert probe_ms / table.dense_ms == pytest.approx(cal.measured_ratio)


def test_closed_loop_stops_when_the_table_is_right():
    model = residual_net()
    backend = FakeBackend(intercept_ms=0.0, slope=1.0)
    table = fake_table(model, SHAPE, step=2)
    cal = plan_to_budget(ModelGraph(model, SHAPE), table, 0.6, MAG2, backend, iters=4, timing=FAST)
    assert len(cal.history) == 1 and 0.90 * 0.6 <= cal.measured_ratio <= 0.97 * 0.6


def test_budget_below_the_floor_is_refused_before_any_timing():
    model = residual_net()
    backend = FakeBackend()
    table = fake_table(model, SHAPE, overhead_ms=1.0)
    with pytest.raises(BudgetBelowFloor, match="raise --budget"):
        plan_to_budget(ModelGraph(model, SHAPE), table, 0.05, PlanConfig(importance="magnitude"), backend, timing=FAST)
    assert backend.models_timed == 0


def test_plan_prediction_is_the_affine_term_of_the_layer_sum():
    model = residual_net()
    table = fake_table(model, SHAPE).with_e2e(EndToEnd(0.3, 2.0))
    plan = build_plan(ModelGraph(model, SHAPE), table, 0.5 * table.dense_ms, MAG4)
    assert plan.predicted_ms == pytest.approx(0.3 + 2.0 * plan.layers_ms)
    assert predicted_latency(ModelGraph(model, SHAPE), table) == pytest.approx(0.3 + 2.0 * model_cost_ms(model, SHAPE))
    assert np.isclose(plan.e2e["slope"], 2.0)


def test_isolated_outliers_are_spikes_not_steps():
    step = np.array([[0.5, 0.5, 0.8, 0.8], [0.6, 0.6, 0.9, 0.9]])
    assert isolated_outliers(step) == []
    spike = np.array([[0.3, 0.9, 0.35, 0.4], [0.35, 0.4, 0.45, 0.5]])
    assert (0, 1) in isolated_outliers(spike) and (1, 3) not in isolated_outliers(spike)
    assert isolated_outliers(np.array([[1.0, 2.0], [2.0, 4.0]])) == []  # doubling per step is real
    dip = np.array([[0.3, 0.35, 0.4], [0.4, 0.1, 0.5], [0.5, 0.55, 0.6]])
    assert isolated_outliers(dip) == [(1, 1)]


class SpikyBackend(FakeBackend):
    """The fake runtime, but the first timing of one layer width comes out 4x too slow."""

    def __init__(self, spike_at):
        super().__init__()
        self.spike_at, self.spiked = spike_at, False

    def _layer_runner(self, sig, c_in, c_out):
        run = super()._layer_runner(sig, c_in, c_out)
        if (c_in, c_out) == self.spike_at and not self.spiked:
            self.spiked, run.latency_ms = True, 4 * run.latency_ms
        return run


def test_a_spiked_table_entry_is_measured_again():
    model = residual_net()
    cfg = ProfileConfig(step=8, fit_configs=1)
    table = profile_model(model, SHAPE, SpikyBackend(spike_at=(8, 8)), cfg, progress=False)
    exact = fake_table(model, SHAPE, step=8)
    assert 1 <= table.meta["remeasured_outliers"] <= 3  # the spike, and at most its lower neighbours
    for k, t in table.layers.items():  # on the table's grid (an axis no plan can change has one point)
        want = [[exact.layers[k].lookup(i, o) for o in t.c_out_grid] for i in t.c_in_grid]
        np.testing.assert_allclose(t.median_ms, want)


def test_axes_no_plan_can_change_are_measured_once_and_a_wider_plan_is_refused():
    model = residual_net()
    full = profile_model(model, SHAPE, FakeBackend(), ProfileConfig(step=8, fit_configs=1), progress=False)
    lean = profile_model(model, SHAPE, FakeBackend(), ProfileConfig(step=8, fit_configs=1), progress=False,
                         ignored=["b1"])
    assert lean.meta["fixed_axes"]["b1.0"] == ["out"] and lean.meta["fixed_axes"]["b2.0"] == ["in"]
    assert "fc" in lean.meta["fixed_axes"] and "out" in lean.meta["fixed_axes"]["fc"]  # the classifier's outputs
    assert lean.meta["entries"] < full.meta["entries"]
    build_plan(ModelGraph(model, SHAPE, ["b1"]), lean, 0.7 * lean.dense_ms, PlanConfig(importance="magnitude"))
    with pytest.raises(BadInput, match="profile again with the same ignored layers"):
        build_plan(ModelGraph(model, SHAPE), lean, 0.7 * lean.dense_ms, PlanConfig(importance="magnitude"))


def test_side_by_side_gives_each_model_its_ratio_to_the_first():
    dense = residual_net().eval()
    graph = ModelGraph(dense, SHAPE)
    half = pruned_copy(dense, {g: max(n // 2, 1) for g, n in graph.sizes().items()}, SHAPE)
    r = measure_side_by_side(FakeBackend(intercept_ms=0.5), {"dense": dense, "half": half, "again": dense}, SHAPE,
                             FAST)
    assert list(r) == ["dense", "half", "again"]
    assert r["dense"]["ratio"] == 1.0 and r["again"]["ratio"] == pytest.approx(1.0)
    want = (0.5 + model_cost_ms(half, SHAPE)) / (0.5 + model_cost_ms(dense, SHAPE))
    assert r["half"]["ratio"] == pytest.approx(want) and r["half"]["ms"] == pytest.approx(want * r["dense"]["ms"])
    lo, hi = r["half"]["ratio_ci95"]
    assert lo <= r["half"]["ratio"] <= hi


def test_side_by_side_times_more_sets_only_while_a_ratio_is_uncertain():
    dense = residual_net().eval()
    half = pruned_copy(dense, {g: max(n // 2, 1) for g, n in ModelGraph(dense, SHAPE).sizes().items()}, SHAPE)
    models = {"dense": dense, "half": half}
    steady = PairConfig(rounds=5, min_round_s=0.001, repeats=1, max_repeats=3, max_ci=0.04)
    assert measure_side_by_side(FakeBackend(), models, SHAPE, steady)["half"]["sets"] == 1
    noisy = measure_side_by_side(FakeBackend(noise=0.3), models, SHAPE, steady)
    assert noisy["half"]["sets"] == 3 and noisy["half"]["rounds"] == 15


def test_configurations_go_beside_one_dense_model_a_few_at_a_time():
    """The fit and the validation convert the dense model once and time the configurations in sets
    of at most SIDE_BY_SIDE beside it; each point is still its own ratio to dense."""
    model = residual_net().eval()
    graph = ModelGraph(model, SHAPE)
    table = profile_model(model, SHAPE, FakeBackend(intercept_ms=0.5), ProfileConfig(step=8, fit_configs=0),
                          progress=False)
    backend = FakeBackend(intercept_ms=0.5)
    peak, prepared = [0], []
    measure = backend.measure
    prepare = backend.prepare_model

    def counting_measure(fns, rounds, min_round_s):
        peak[0] = max(peak[0], len(fns))
        return measure(fns, rounds, min_round_s)

    def counting_prepare(m, shape):  # a conversion gives a new object (ONNX bytes for ORT)
        prepared.append(m)
        return copy.deepcopy(prepare(m, shape)) if m is model else prepare(m, shape)

    backend.measure, backend.prepare_model = counting_measure, counting_prepare
    rng = np.random.default_rng(0)
    configs = [(f"c{i}", random_widths(graph.sizes(), 8, rng)) for i in range(7)]
    points = measure_configs(graph, table, backend, configs, FAST, progress=False)
    assert [p["label"] for p in points] == [c[0] for c in configs]
    assert peak[0] <= SIDE_BY_SIDE + 1 and sum(m is model for m in prepared) == 1
    for p, (_, widths) in zip(points, configs):
        want = (0.5 + model_cost_ms(pruned_copy(model, widths, SHAPE), SHAPE)) / (0.5 + model_cost_ms(model, SHAPE))
        assert p["ratio"] == pytest.approx(want) and p["measured_ms"] == pytest.approx(want * table.dense_ms)
