"""AdaSAP's perturbations checked against hand computations on tiny models."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from latprune.errors import BadInput
from latprune.models.graph import ModelGraph
from latprune.models.surgery import pruned_copy
from latprune.pipeline.adasap import (
    OptimizerConfig,
    SharpnessStep,
    _scale_param_ids,
    adaptive_perturbation,
    neuron_partition,
    neuron_radii,
    uniform_perturbation,
)
from latprune.pipeline.plan import PlanConfig, build_plan, value_per_ms
from latprune.pipeline.schedule import ScheduleConfig, TrainPruneConfig, train_and_prune_
from latprune.pipeline.train import TrainConfig, sgd_step
from latprune.testing import TINY_MODELS, fake_table, model_cost_ms, residual_net, tiny_dataset

SHAPE = (3, 16, 16)


def _grads(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, *SHAPE, generator=g), torch.randint(0, 10, (8,), generator=g)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return x, y


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_neurons_partition_the_prunable_weights(name):
    model = TINY_MODELS[name]()
    nr = neuron_partition(ModelGraph(model, SHAPE))
    covered = {}
    for g in nr.groups:
        for p, rows in g.slices:
            assert len(rows) == g.size
            covered.setdefault(id(p), []).extend(rows.tolist())
    for p in model.parameters():
        if id(p) in covered:
            assert sorted(covered[id(p)]) == list(range(p.shape[0]))  # each row in exactly one neuron
    assert id(model.fc.weight) not in covered and any(p is model.fc.weight for p in nr.other)


def test_radii_order_and_range():
    model = residual_net()
    with torch.no_grad():
        model.b1[0].weight[3] *= 10  # the largest neuron
        model.b1[0].weight[4] *= 0.0  # a small one
    nr = neuron_partition(ModelGraph(model, SHAPE))
    cfg = OptimizerConfig(score="magnitude", rho_min=0.1, rho_max=1.5)
    radii = neuron_radii(nr, cfg)
    allr = torch.cat(radii)
    assert allr.min() == pytest.approx(0.1) and allr.max() == pytest.approx(1.5)
    b1 = radii[[g.name for g in nr.groups].index("b1.0")]
    assert b1[3] == pytest.approx(0.1)  # most important neuron: smallest ball
    assert b1[4] > b1[0] and b1[4] > b1[5]
    # hand computation of eq. 2 for one neuron
    scores = []
    for g in nr.groups:
        s = torch.zeros(g.size, dtype=torch.float64)
        for p, rows in g.slices:
            s += (p[rows].detach().double().reshape(g.size, -1) ** 2).sum(1)
        scores.append(s.sqrt())
    sc = torch.cat(scores)
    i = 7
    want = 1.5 - (sc[i] - sc.min()) / (sc.max() - sc.min()) * (1.5 - 0.1)
    assert allr[i] == pytest.approx(float(want))


def test_equal_scores_give_rho_max():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 14 * 14, 10))
    with torch.no_grad():
        model[0].weight.fill_(0.5)
        model[1].weight.fill_(1.0), model[1].bias.fill_(0.0)
    nr = neuron_partition(ModelGraph(model, SHAPE))
    radii = torch.cat(neuron_radii(nr, OptimizerConfig(score="magnitude", rho_min=0.2, rho_max=0.7)))
    assert torch.allclose(radii, torch.full_like(radii, 0.7), atol=0)


def _neuron_norms(nr, eps, scaled, eta, asam):
    """||T_i^-1 eps_i|| per neuron, from the slices, by hand."""
    out = []
    for g in nr.groups:
        sq = torch.zeros(g.size, dtype=torch.float64)
        for p, rows in g.slices:
            t = (p[rows].abs() + eta) if (asam and id(p) in scaled) else torch.ones_like(p[rows])
            sq += ((eps[p][rows] / t).double().reshape(g.size, -1) ** 2).sum(1)
        out.append(sq.sqrt())
    return torch.cat(out)


@pytest.mark.parametrize("form", ["asam", "sam"])
def test_per_neuron_ball_has_radius_rho_i(form):
    model = residual_net()
    _grads(model)
    nr = neuron_partition(ModelGraph(model, SHAPE))
    cfg = OptimizerConfig(score="magnitude", form=form, rho_min=0.05, rho_max=0.8)
    scaled = _scale_param_ids(model)
    eps = adaptive_perturbation(model, nr, cfg, scaled)
    norms = _neuron_norms(nr, eps, scaled, cfg.eta, form == "asam")
    torch.testing.assert_close(norms, torch.cat(neuron_radii(nr, cfg)), rtol=1e-5, atol=1e-7)
    # parameters in no neuron share one uniform ball of radius rho
    t = [(p.detach().abs() + cfg.eta) if (form == "asam" and id(p) in scaled) else 1.0 for p in nr.other]
    other = torch.sqrt(sum(((eps[p] / ti) ** 2).sum() for p, ti in zip(nr.other, t)))
    assert float(other) == pytest.approx(cfg.rho, rel=1e-5)


def test_asam_perturbation_matches_the_formula_for_one_neuron():
    model = residual_net()
    _grads(model)
    nr = neuron_partition(ModelGraph(model, SHAPE))
    cfg = OptimizerConfig(score="magnitude")
    eps = adaptive_perturbation(model, nr, cfg, _scale_param_ids(model))
    gi = [g.name for g in nr.groups].index("b1.0")
    rho = neuron_radii(nr, cfg)[gi][2]
    conv, bn = model.b1[0], model.b1[1]
    parts = [(conv.weight[2], conv.weight.grad[2], True), (bn.weight[2], bn.weight.grad[2], True),
             (bn.bias[2], bn.bias.grad[2], False)]
    t = [(w.abs() + 0.01) if sc else torch.ones_like(w) for w, _, sc in parts]
    norm = torch.sqrt(sum(((ti * g) ** 2).sum() for ti, (_, g, _) in zip(t, parts)))
    want = [rho * ti * ti * g / norm for ti, (_, g, _) in zip(t, parts)]
    torch.testing.assert_close(eps[conv.weight][2], want[0].float(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(eps[bn.weight][2], want[1].float(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(eps[bn.bias][2], want[2].float(), rtol=1e-5, atol=1e-8)


def test_global_normalisation_weights_by_rho_i():
    model = residual_net()
    _grads(model)
    nr = neuron_partition(ModelGraph(model, SHAPE))
    cfg = OptimizerConfig(score="magnitude", normalize="global", form="sam", rho_min=0.1, rho_max=1.0)
    eps = adaptive_perturbation(model, nr, cfg, set())
    total = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
    g = nr.groups[0]
    p, rows = g.slices[0]
    want = neuron_radii(nr, cfg)[0][0] * p.grad[rows][0] / total
    torch.testing.assert_close(eps[p][rows][0], want.float(), rtol=1e-5, atol=1e-8)


def test_uniform_asam_ball():
    model = residual_net()
    _grads(model)
    scaled = _scale_param_ids(model)
    eps = uniform_perturbation(model.parameters(), 0.5, True, 0.01, scaled)
    t = {p: (p.detach().abs() + 0.01) if id(p) in scaled else torch.ones_like(p) for p in model.parameters()}
    assert float(torch.sqrt(sum(((e / t[p]) ** 2).sum() for p, e in eps.items()))) == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("method", ["sam", "asam", "adasap"])
def test_step_descends_with_the_gradient_at_w_plus_eps_and_bn_stats_from_first_pass(method):
    model = residual_net().train()
    nr = neuron_partition(ModelGraph(model, SHAPE)) if method == "adasap" else None
    cfg = OptimizerConfig(score="magnitude", method=method, rho=0.3, rho_max=0.3)
    rule = SharpnessStep(model, cfg, nr)
    x, y = _grads(copy.deepcopy(model))
    # expected: grads at w, eps from them, grads at w + eps, SGD(lr=1) step from w
    ref = copy.deepcopy(model)
    ref_nr = neuron_partition(ModelGraph(ref, SHAPE)) if method == "adasap" else None
    ref.zero_grad()
    nn.functional.cross_entropy(ref(x), y).backward()  # first pass: updates BN stats once
    stats = [b.clone() for m in ref.modules() if isinstance(m, nn.BatchNorm2d) for b in (m.running_mean, m.running_var)]
    eps = SharpnessStep(ref, cfg, ref_nr).perturbation(ref)
    w0 = {n: p.detach().clone() for n, p in ref.named_parameters()}
    with torch.no_grad():
        for p, e in eps.items():
            p.add_(e)
    ref.zero_grad()
    nn.functional.cross_entropy(ref(x), y).backward()
    want = {n: w0[n] - p.grad for n, p in ref.named_parameters()}

    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    rule(model, x, y, opt)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], rtol=1e-4, atol=1e-5)
    got = [b for m in model.modules() if isinstance(m, nn.BatchNorm2d) for b in (m.running_mean, m.running_var)]
    for a, b in zip(got, stats):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("method", ["asam", "adasap"])
def test_sam_every_k_alternates_two_pass_steps_with_plain_ones_on_the_iteration_index(method):
    """K = 3: iterations 0 and 3 are the two-pass step (as K = 1 gives), 1, 2 and 4 plain SGD."""
    torch.manual_seed(0)
    model = residual_net().train()
    x, y = _grads(copy.deepcopy(model))

    def rule_for(m, every):
        nr = neuron_partition(ModelGraph(m, SHAPE)) if method == "adasap" else None
        cfg = OptimizerConfig(score="magnitude", method=method, rho=0.3, rho_max=0.3, sam_every=every)
        return SharpnessStep(m, cfg, nr)

    for it in range(5):
        a, b, c = (copy.deepcopy(model) for _ in range(3))
        rule, passes = rule_for(a, 3), []
        hook = a.register_forward_hook(lambda *_: passes.append(1))
        rule(a, x, y, torch.optim.SGD(a.parameters(), lr=1.0), iteration=it)
        hook.remove()
        rule_for(b, 1)(b, x, y, torch.optim.SGD(b.parameters(), lr=1.0), iteration=it)
        sgd_step(c, x, y, torch.optim.SGD(c.parameters(), lr=1.0))
        want = b if it % 3 == 0 else c
        assert len(passes) == (2 if it % 3 == 0 else 1)
        for (n, p), q in zip(a.named_parameters(), want.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0, msg=n)


def test_sam_every_must_be_a_positive_whole_number():
    with pytest.raises(BadInput, match="sam-every"):
        OptimizerConfig(sam_every=0)


@pytest.mark.parametrize("kw,match", [
    ({"rho_min": 1.0, "rho_max": 0.5}, "rho_min"),
    ({"rho": -0.1}, "non-negative"),
    ({"method": "lion"}, "--method"),
])
def test_bad_config_names_the_fix(kw, match):
    with pytest.raises(BadInput, match=match):
        OptimizerConfig(**kw)


class _Branches(nn.Module):
    """Two parallel conv+BN+ReLU branches of 16 channels; branch b's 5x5 kernel makes each of its
    channels cost more than branch a's 3x3."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 16, 5, 1, 2, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(torch.cat([self.a(x).mean((2, 3)), self.b(x).mean((2, 3))], 1))


def test_value_per_ms_is_each_channels_value_over_what_its_groups_next_step_saves():
    model = residual_net()
    graph = ModelGraph(model, SHAPE)
    table = fake_table(model, SHAPE)
    rng = np.random.default_rng(0)
    scores = {cg.name: rng.random(cg.size) for cg in graph.groups}
    keys = value_per_ms(graph, table, scores, 8)
    dense = model_cost_ms(model, SHAPE)  # the truth the fake table was filled from, not the table
    for cg in graph.groups:
        if cg.size <= 8:  # at the narrowest grid width: removing buys nothing
            assert np.isinf(keys[cg.name]).all()
            continue
        saved = (dense - model_cost_ms(pruned_copy(model, {cg.name: cg.size - 8}, SHAPE), SHAPE)) / 8
        np.testing.assert_allclose(keys[cg.name], scores[cg.name] / saved, rtol=1e-9)


def test_planner_radii_give_the_largest_ball_to_the_channels_with_the_least_value_per_ms():
    model = _Branches()
    graph = ModelGraph(model, SHAPE)
    table = fake_table(model, SHAPE)
    a, b = (next(cg.name for cg in graph.groups if cg.name.startswith(x)) for x in ("a.", "b."))
    value = {a: np.full(16, 2.0), b: np.full(16, 2.0)}
    value[a][5] = 0.5  # one cheap-branch channel worth little
    keys = value_per_ms(graph, table, value, 8)
    assert keys[b][0] < keys[a][0]  # same value, b's channel saves more: b is pruned first
    nr = neuron_partition(graph)
    cfg = OptimizerConfig(rho_min=0.1, rho_max=0.9)  # score "planner", the default
    radii = dict(zip([g.name for g in nr.groups], neuron_radii(nr, cfg, keys)))
    # hand computation (eq. 2) over the three distinct keys: the lowest gets rho_max, the highest rho_min
    lo, hi = min(keys[b][0], keys[a][5]), keys[a][0]
    for name, j in ((a, 0), (a, 5), (b, 0)):
        assert float(radii[name][j]) == pytest.approx(0.9 - (keys[name][j] - lo) / (hi - lo) * 0.8)
    assert float(radii[a][0]) == pytest.approx(0.1)
    assert float(radii[b].min()) == float(radii[b].max())  # equal keys, equal balls
    with pytest.raises(ValueError, match="set_neuron_keys"):
        neuron_radii(nr, cfg)  # the planner's score cannot be guessed


def test_a_removal_clears_the_planner_key_and_the_schedule_sets_it_again(monkeypatch):
    """During train_and_prune_, every adasap step of warm-up and pruning has a key matching the
    current widths (refreshed every KEY_REFRESH iterations and right after each removal)."""
    seen = []
    real = neuron_radii

    def spy(neurons, cfg, keys=None):
        assert keys is not None and all(len(keys[g.name]) == g.size for g in neurons.groups)
        seen.append(sum(g.size for g in neurons.groups))
        return real(neurons, cfg, keys)

    monkeypatch.setattr("latprune.pipeline.adasap.neuron_radii", spy)
    model, data = residual_net(), tiny_dataset(64, SHAPE)
    table = fake_table(model, SHAPE)
    plan = build_plan(ModelGraph(model, SHAPE), table, 0.5 * table.dense_ms, PlanConfig(importance="magnitude"))
    train_and_prune_(model, data, table, plan,
                     TrainPruneConfig(plan=PlanConfig(importance="halp", halp_batches=2),
                                      schedule=ScheduleConfig(warmup_epochs=0.25, prune_steps=2, prune_every=2,
                                                              recalibrate_batches=0, sharpness_rho=0.0),
                                      optimizer=OptimizerConfig(rho=0.1, rho_max=0.1),
                                      finetune=TrainConfig(epochs=0.25, batch_size=8, warmup_iters=1)),
                     SHAPE, progress=False)
    assert len(seen) == 2 + 4  # warm-up and pruning steps (fine-tuning is uniform ASAM)
    assert seen[-1] < seen[0]  # the keys followed the removals
