import itertools

import numpy as np
import pytest

from latprune.models.widths import candidate_widths
from latprune.pipeline.knapsack import BudgetUnreachable, GroupChoices, plan_widths, prefix_values, solve_mckp


def brute_force(values, costs, cap):
    best, arg = -np.inf, None
    for choice in itertools.product(*[range(len(v)) for v in values]):
        c = sum(costs[g][j] for g, j in enumerate(choice))
        v = sum(values[g][j] for g, j in enumerate(choice))
        if c <= cap + 1e-9 and v > best:
            best, arg = v, choice
    return best, arg


@pytest.mark.parametrize("seed", range(25))
def test_mckp_matches_brute_force_on_integer_instances(seed):
    rng = np.random.default_rng(seed)
    groups = rng.integers(2, 5)
    values = [np.sort(rng.random(rng.integers(1, 5))) for _ in range(groups)]
    costs = [np.sort(rng.integers(0, 12, size=len(v))).astype(float) for v in values]
    cap = float(rng.integers(0, 30))
    want, _ = brute_force(values, costs, cap)
    got = solve_mckp(values, costs, cap)
    if not np.isfinite(want):
        assert got is None
        return
    assert got is not None
    assert sum(costs[g][j] for g, j in enumerate(got)) <= cap
    assert sum(values[g][j] for g, j in enumerate(got)) == pytest.approx(want)


@pytest.mark.parametrize("seed", range(10))
def test_mckp_float_costs_stay_feasible_and_near_optimal(seed):
    rng = np.random.default_rng(100 + seed)
    values = [np.sort(rng.random(4)) for _ in range(4)]
    costs = [np.sort(rng.random(4)) - 0.5 for _ in range(4)]  # negative costs: savings
    cap = float(rng.random())
    want, _ = brute_force(values, costs, cap)
    got = solve_mckp(values, costs, cap, bins=20000)
    if got is None:
        assert not np.isfinite(want)
        return
    assert sum(costs[g][j] for g, j in enumerate(got)) <= cap + 1e-12
    assert sum(values[g][j] for g, j in enumerate(got)) >= want - 0.05


def test_candidate_widths_round_inside_the_choice():
    assert candidate_widths(64, 8).tolist() == [8, 16, 24, 32, 40, 48, 56, 64]
    assert candidate_widths(20, 8).tolist() == [8, 16, 20]
    assert candidate_widths(3, 8).tolist() == [3]


def test_prefix_values_sum_the_top_scores():
    assert prefix_values(np.array([1.0, 5.0, 3.0, 2.0]), np.array([1, 2, 4])).tolist() == [5.0, 8.0, 11.0]


def test_plan_widths_is_optimal_when_latency_is_separable():
    rng = np.random.default_rng(0)
    groups, unit = [], {}
    for i in range(4):
        ws = np.array([8, 16, 24, 32])
        groups.append(GroupChoices(f"g{i}", ws, prefix_values(rng.random(32), ws)))
        unit[f"g{i}"] = int(rng.integers(1, 4))

    def predict(w):
        return float(sum(unit[g] * k for g, k in w.items()))

    touches = {g.name: (lambda w, n=g.name: float(unit[n] * w[n])) for g in groups}
    target = 0.55 * predict({g.name: 32 for g in groups})
    target = float(np.floor(target))
    sol = plan_widths(groups, predict, touches, target)
    assert sol.predicted_ms <= target
    best, arg = brute_force([g.values for g in groups], [unit[g.name] * g.widths.astype(float) for g in groups], target)
    assert sol.value == pytest.approx(best)


def test_plan_widths_bilinear_latency_ends_feasible():
    ws = np.array([8, 16, 24, 32])
    groups = [GroupChoices(n, ws, prefix_values(np.linspace(2, 0.1, 32), ws)) for n in "abc"]

    def predict(w):  # a chain of layers: cost = c_in * c_out, as convolutions behave
        return float(3 * w["a"] + w["a"] * w["b"] + w["b"] * w["c"] + 10 * w["c"])

    def layers(names):
        def f(w):
            parts = {"a": 3 * w["a"] + w["a"] * w["b"], "b": w["a"] * w["b"] + w["b"] * w["c"],
                     "c": w["b"] * w["c"] + 10 * w["c"]}
            return float(parts[names])
        return f

    dense = predict({"a": 32, "b": 32, "c": 32})
    for frac in (0.3, 0.5, 0.8):
        sol = plan_widths(groups, predict, {n: layers(n) for n in "abc"}, frac * dense)
        assert sol.predicted_ms <= frac * dense
        assert sol.predicted_ms >= 0.6 * frac * dense  # and uses most of the budget


def test_unreachable_budget_reports_the_floor():
    ws = np.array([8, 16])
    g = [GroupChoices("a", ws, np.array([1.0, 2.0]))]
    with pytest.raises(BudgetUnreachable) as e:
        plan_widths(g, lambda w: float(w["a"]), {"a": lambda w: float(w["a"])}, 4.0)
    assert e.value.floor_ms == 8.0
