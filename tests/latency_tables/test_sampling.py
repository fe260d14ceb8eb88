"""Adaptive sampling (latency_tables.sampling) and the profiler's time budget, on laws known exactly."""
import logging
import math

import numpy as np
import pytest
from torch import nn

from latprune.latency_tables import profile as profile_mod
from latprune.latency_tables.endtoend import PairConfig, model_layers_ms
from latprune.latency_tables.profile import ProfileConfig, lines_through, profile_model
from latprune.latency_tables.sampling import AxisGrid, LayerGrid, detect_period, refine, spread, step_tops
from latprune.latency_tables.store import LatencyStore
from latprune.latency_tables.table import LatencyTable, LayerSignature, step_top
from latprune.models.graph import ModelGraph
from latprune.models.surgery import pruned_copy
from latprune.pipeline.calibrate import plan_to_budget
from latprune.pipeline.plan import PlanConfig
from latprune.testing import FakeBackend, fake_cost_ms, residual_net

SIG = LayerSignature("conv", 256, 256, (3, 3), (1, 1), (1, 1), (1, 1), (16, 16))


def test_step_top_and_tops():
    assert [step_top(c, 16, 100) for c in (1, 16, 17, 96, 97, 100)] == [16, 16, 32, 96, 100, 100]
    assert step_top(13, 1, 100) == 13
    assert step_tops(64, 8, 16) == [16, 32, 48, 64]
    assert step_tops(60, 8, 16) == [16, 32, 48, 60]
    assert step_tops(64, 8, 1) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert spread(list(range(10)), 4) == [0, 3, 6, 9]
    assert spread([1, 2], 4) == [1, 2]


@pytest.mark.parametrize("period", [8, 16, 32, 64])
def test_detect_period_finds_the_staircase_within_noise(period):
    rng = np.random.default_rng(period)

    def along(w):  # a staircase of `period` channels, 1 % noise
        return 0.05 + 0.01 * math.ceil(w / period) * period * (1 + 0.01 * rng.standard_normal()), 0.01

    assert detect_period(along, 256, 8) == (1 if period == 8 else period)


def test_detect_period_cannot_tell_on_an_overhead_bound_or_narrow_layer():
    assert detect_period(lambda w: (1.0 + 1e-4 * w, 0.0), 256, 8) is None  # flat: overhead-bound
    assert detect_period(lambda w: (float(w), 0.0), 24, 8) is None  # three widths


def _kinked(ci, co):
    """Flat up to 128 output channels, then linear: one edge, at 128."""
    return ci * max(co, 128) / 1e3


def test_refinement_adds_lines_at_the_edge_not_in_the_flat_or_linear_parts():
    cands = step_tops(256, 8, 16)
    g = LayerGrid("k", SIG, 1, {"in": AxisGrid([256], [256]), "out": AxisGrid(cands, spread(cands, 4))})
    f = {("k", 256, o): (_kinked(256, o), 0.0) for o in g.axes["out"].grid}
    measured = []

    def measure(key, ci, co):
        measured.append(co)
        return _kinked(ci, co), 0.0

    done = refine([g], measure, f, tol=0.03, budget=100)
    assert done["stopped"] == "agreed" and not done["coarse"]
    added = sorted(set(g.axes["out"].grid) - set(spread(cands, 4)))
    assert added == sorted(measured)
    assert not [o for o in added if o < 96]  # the flat part [16, 96] is left alone
    assert any(96 < o <= 160 for o in added)  # the edge is bracketed
    assert len(added) <= 4  # a probe per linear interval, no more
    # the law is recovered: every candidate width within 3 % (the tolerance) of the truth
    lt_grid = g.axes["out"].grid
    for o in cands:
        pred = np.interp(o, lt_grid, [f[("k", 256, x)][0] for x in lt_grid])
        assert pred == pytest.approx(_kinked(256, o), rel=0.03)


def test_refinement_stops_at_its_budget_and_names_the_coarse_layers():
    cands = step_tops(256, 8, 1)
    g = LayerGrid("k", SIG, 1, {"in": AxisGrid([256], [256]), "out": AxisGrid(cands, spread(cands, 2))})

    def stairs(ci, co):  # steps of 64 channels the tables were not told about
        return math.ceil(co / 64) * 64 * ci / 1e3, 0.0

    f = {("k", 256, o): stairs(256, o) for o in g.axes["out"].grid}
    done = refine([g], lambda k, ci, co: stairs(ci, co), f, tol=0.03, budget=3)
    assert done == {"entries": 3, "lines": 3, "stopped": "budget", "coarse": ["k"]}
    done = refine([g], lambda k, ci, co: stairs(ci, co), f, tol=0.03, budget=100, deadline=0.0)
    assert done["stopped"] == "time" and done["entries"] == 0


def test_costly_layers_are_refined_first():
    cands = step_tops(256, 8, 1)

    def grid(key, layers):
        return LayerGrid(key, SIG, layers, {"in": AxisGrid([256], [256]), "out": AxisGrid(cands, spread(cands, 2))})

    def jump(key, ci, co):  # one edge, at 250 channels: bisection needs four probes to bracket it
        return (1.0 if co < 250 else 10.0), 0.0

    cheap, costly = grid("cheap", 1), grid("costly", 10)  # ten model layers share the costly signature
    f = {(k, 256, o): jump(k, 256, o) for k in ("cheap", "costly") for o in (8, 256)}
    refine([cheap, costly], jump, f, tol=0.03, budget=4)
    assert costly.axes["out"].grid == [8, 136, 200, 232, 248, 256] and cheap.axes["out"].grid == [8, 256]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(128, 64, 1), nn.BatchNorm2d(64), nn.ReLU())
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.c(self.b(self.a(x))).mean((2, 3)))


def _stairs(sig, ci, co):
    """ORT-like: steps of 32 input and 16 output channels, and a fixed cost per call."""
    ci = math.ceil(ci / 32) * 32 if sig.kind == "conv" else ci
    return fake_cost_ms(sig, ci, math.ceil(co / 16) * 16) + 0.02


def _max_error(table: LatencyTable) -> float:
    errs = []
    for lt in table.layers.values():
        s = lt.signature
        for ci in ([s.c_in] if s.c_in < 8 else range(8, s.c_in + 1, 8)):
            for co in ([s.c_out] if s.kind == "linear" else range(8, s.c_out + 1, 8)):
                errs.append(abs(lt.lookup(ci, co) / _stairs(s, ci, co) - 1))
    return max(errs)


def test_adaptive_profile_recovers_the_staircase_with_a_fraction_of_the_entries(tmp_path):
    model, shape = _Net().eval(), (3, 16, 16)
    grid_be, adaptive_be = FakeBackend(layer_cost=_stairs, noise=0.005), FakeBackend(layer_cost=_stairs, noise=0.005)
    grid = profile_model(model, shape, grid_be, ProfileConfig(fit_configs=2), progress=False)
    adaptive = profile_model(model, shape, adaptive_be, ProfileConfig(fit_configs=2, sampling="adaptive"),
                             progress=False)
    b = adaptive.layers[adaptive.layer_keys["b.0"]]
    assert (b.period_in, b.period_out) == (32, 16)
    assert adaptive.meta["sampling"]["periods"] == {"conv/in": 32, "conv/out": 16}
    assert set(b.c_out_grid) <= set(range(16, 129, 16)) and set(b.c_in_grid) <= {32, 64, 96, 128}
    assert len(adaptive_be.layers_timed) < len(grid_be.layers_timed) / 3
    assert _max_error(adaptive) <= max(0.03, _max_error(grid)) + 0.02  # within the tolerance and the noise
    back = LatencyTable.load(adaptive.save(tmp_path / "t.json"))  # the periods survive the file
    assert back.lookup("b.0", 40, 40) == pytest.approx(adaptive.lookup("b.0", 40, 40))
    assert b.lookup(40, 33) == b.lookup(64, 48) < b.lookup(64, 49)  # a width costs its step's top


def test_the_time_budget_stops_refinement_never_the_coarse_pass(monkeypatch, caplog):
    model, shape = _Net().eval(), (3, 16, 16)
    clock = [0.0]
    monkeypatch.setattr(profile_mod.time, "monotonic", lambda: clock[0])
    be = FakeBackend(layer_cost=_stairs)
    measure = be.measure

    def slow(fns, rounds, min_round_s):  # every layer measurement takes 10 s of the fake clock
        clock[0] += 10.0 * sum(hasattr(fn, "layer") for fn in fns)
        return measure(fns, rounds, min_round_s)

    monkeypatch.setattr(be, "measure", slow)
    monkeypatch.setattr("latprune.latency_tables.sampling.time.monotonic", lambda: clock[0])
    cfg = ProfileConfig(fit_configs=2, sampling="adaptive", max_minutes=1.0)
    with caplog.at_level(logging.INFO, logger="latprune.latency_tables.profile"):
        t = profile_model(model, shape, be, cfg, progress=False)
    s = t.meta["sampling"]
    assert s["stopped"] == "time" and s["coarse"]
    for g in t.layers.values():  # the coarse pass is whole: every coarse grid point is in every table
        if g.signature.kind == "conv":
            assert len(g.c_out_grid) >= min(cfg.coarse, len(step_tops(g.signature.c_out, 8, g.period_out)))
    assert "still coarse" in caplog.text
    assert "about" in caplog.text and "min more at this rate" in caplog.text  # the ETA after the first minute


def test_max_minutes_needs_adaptive_sampling():
    with pytest.raises(ValueError, match="drop --sampling grid"):
        ProfileConfig(sampling="grid", max_minutes=5)
    with pytest.raises(ValueError, match="sampling must be one of"):
        ProfileConfig(sampling="random")
    assert "coarse" not in ProfileConfig(sampling="grid").measurement_key()  # grid tables keep their old keys
    assert ProfileConfig(sampling="adaptive").measurement_key()["sampling"] == "adaptive"


def test_auto_sampling_measures_the_full_grid_of_a_small_model_only(monkeypatch):
    monkeypatch.setattr(profile_mod, "AUTO_GRID_LIMIT", 300)
    small, wide = residual_net(), _Net().eval()  # about 90 and 408 grid entries at step 8
    t_small = profile_model(small, (3, 16, 16), FakeBackend(), ProfileConfig(fit_configs=1), progress=False)
    t_wide = profile_model(wide, (3, 16, 16), FakeBackend(), ProfileConfig(fit_configs=1), progress=False)
    assert t_small.meta["sampling_mode"] == "grid" and "sampling" not in t_small.meta
    assert t_wide.meta["sampling_mode"] == "adaptive" and t_wide.entries < 300


def test_lines_through_a_plans_widths_measure_what_the_table_only_interpolated(tmp_path):
    model, shape = _Net().eval(), (3, 16, 16)
    graph = ModelGraph(model, shape)
    be = FakeBackend(layer_cost=_stairs)
    table = profile_model(model, shape, be, ProfileConfig(step=32, fit_configs=3, sampling="grid"), progress=False)
    b = table.layers[table.layer_keys["b.0"]]
    assert 40 not in b.c_out_grid and b.lookup(128, 40) < _stairs(b.signature, 128, 40)  # interpolation flatters
    before = len(be.layers_timed)
    with LatencyStore(tmp_path / "s.sqlite") as store:
        new, done = lines_through(graph, table, {"b.0": (128, 40), "c.0": (128, 64)}, be, ProfileConfig(step=32), store)
        timed = [e for e in be.layers_timed[before:] if e[1:] != (1, 1)]  # not the throwaway warm-up
        assert done["lines"] == 1 and done["measured"] == len(b.c_in_grid) == len(timed)
        assert sorted(e[1] for e in timed) == b.c_in_grid and {e[2] for e in timed} == {40}
        nb = new.layers[new.layer_keys["b.0"]]
        assert 40 in nb.c_out_grid and nb.lookup(128, 40) == pytest.approx(_stairs(b.signature, 128, 40))
        for ci in b.c_in_grid:  # the old entries are kept as they were
            for co in b.c_out_grid:
                assert nb.lookup(ci, co) == b.lookup(ci, co)
        assert lines_through(graph, new, {"b.0": (128, 40)}, be, ProfileConfig(step=32), store)[1]["lines"] == 0
        again, done2 = lines_through(graph, table, {"b.0": (128, 40)}, FakeBackend(layer_cost=_stairs),
                                     ProfileConfig(step=32), store)
        assert (done2["measured"], done2["from_store"]) == (0, len(b.c_in_grid))
    assert new.meta["plan_lines"] == [done] and table.meta.get("plan_lines") is None
    # the end-to-end term is refitted on its own points, their layer sums from the new grid
    for p in new.e2e.points[1:]:
        probe = pruned_copy(model, p["widths"], shape)
        assert p["layers_ms"] == pytest.approx(model_layers_ms(ModelGraph(probe, shape), new))
        assert p["measured_ms"] == next(q for q in table.e2e.points if q["label"] == p["label"])["measured_ms"]


def test_the_closed_loop_plans_on_lines_measured_through_the_knapsacks_widths():
    model, shape = _Net().eval(), (3, 16, 16)
    graph = ModelGraph(model, shape)
    be = FakeBackend(layer_cost=_stairs)
    table = profile_model(model, shape, be, ProfileConfig(step=32, fit_configs=3, sampling="grid"), progress=False)
    cfg = PlanConfig(round_to=8, importance="magnitude")
    fast = PairConfig(rounds=2, min_round_s=0.001, repeats=1, max_repeats=1)

    def lines(t, channels):
        return lines_through(graph, t, channels, be, ProfileConfig(step=32))

    cal = plan_to_budget(graph, table, 0.6, cfg, be, timing=fast, lines=lines, line_rounds=5)
    rounds = cal.table.meta["plan_lines"]
    assert rounds and rounds[0]["lines"] > 0 and len(rounds) < 5  # it converged: the last plan was on lines
    plain = plan_to_budget(graph, table, 0.6, cfg, be, timing=fast)
    assert plain.table.layers is table.layers and "plan_lines" not in plain.table.meta
    off = [n for n, (_, c_out) in plain.plan.layer_channels.items()
           if c_out not in table.layers[table.layer_keys[n]].c_out_grid]
    assert off, "without lines the knapsack plans between the grid's points"
    for name, (c_in, c_out) in cal.plan.layer_channels.items():
        lt = cal.table.layers[cal.table.layer_keys[name]]
        assert c_out in lt.c_out_grid and (c_in in lt.c_in_grid or lt.signature.kind == "dwconv")
