"""AdaSAP's perturbations checked against hand computations on tiny models."""
import copy

import pytest
import torch
from torch import nn

from latprune.errors import BadInput
from latprune.models.graph import ModelGraph
from latprune.pipeline.adasap import (
    OptimizerConfig,
    SharpnessStep,
    _scale_param_ids,
    adaptive_perturbation,
    neuron_partition,
    neuron_radii,
    uniform_perturbation,
)
from latprune.testing import TINY_MODELS, residual_net

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
    cfg = OptimizerConfig(rho_min=0.1, rho_max=1.5)
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
    radii = torch.cat(neuron_radii(nr, OptimizerConfig(rho_min=0.2, rho_max=0.7)))
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
    cfg = OptimizerConfig(form=form, rho_min=0.05, rho_max=0.8)
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
    cfg = OptimizerConfig()
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
    cfg = OptimizerConfig(normalize="global", form="sam", rho_min=0.1, rho_max=1.0)
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
    cfg = OptimizerConfig(method=method, rho=0.3, rho_max=0.3)
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


@pytest.mark.parametrize("kw,match", [
    ({"rho_min": 1.0, "rho_max": 0.5}, "rho_min"),
    ({"rho": -0.1}, "non-negative"),
    ({"method": "lion"}, "--method"),
])
def test_bad_config_names_the_fix(kw, match):
    with pytest.raises(BadInput, match=match):
        OptimizerConfig(**kw)
