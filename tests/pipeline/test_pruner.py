"""The Python API in a user's own loop: LatencyPruner (observe / due / step / verify) and export_model."""
import json
import math

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import latprune
from latprune.errors import BadInput, ParityError
from latprune.latency_tables.endtoend import PairConfig
from latprune.latency_tables.profile import ProfileConfig, profile_model
from latprune.latency_tables.runtimes import get_backend
from latprune.models.graph import ModelGraph, resolve_ignored
from latprune.models.outputs import classification_loss, flatten_outputs
from latprune.pipeline.train import sgd_step
from latprune.testing import (
    FakeBackend,
    TwoHeadNet,
    broken_export_net,
    fake_table,
    model_cost_ms,
    plain_net,
    residual_net,
)

SHAPE = (3, 16, 16)
FAST = PairConfig(rounds=1, repeats=1, max_repeats=1)


def _pruner(model, budget=0.5, batch=2, **kw):
    kw.setdefault("table", fake_table(model, SHAPE, batch=batch))
    kw.setdefault("runtime", FakeBackend(batch=batch))
    return latprune.LatencyPruner(model, torch.zeros(batch, *SHAPE), budget, timing=FAST, **kw)


def _loss(out, y):
    return sum(nn.functional.cross_entropy(t.reshape(len(y), -1)[:, :10], y) for _, t in flatten_outputs(out))


def _user_loop(model, pruner, iterations, seed=0, scheduler=False):
    """The README's loop: the user's optimizer, loss and (optionally) LR scheduler."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if scheduler else None
    g = torch.Generator().manual_seed(seed)
    for it in range(iterations):
        x, y = torch.randn(8, *SHAPE, generator=g), torch.randint(0, 10, (8,), generator=g)
        _loss(model(x), y).backward()
        pruner.observe()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        if pruner.due(it):
            pruner.step(opt)
    return opt, sched


@pytest.mark.parametrize("factory", [plain_net, residual_net])
def test_a_user_loop_prunes_to_the_budget_physically(factory):
    model = factory()
    dense_cost, out_shape = model_cost_ms(model, SHAPE), model(torch.zeros(1, *SHAPE)).shape
    pruner = _pruner(model, 0.5, steps=3, every=2)
    opt, _ = _user_loop(model, pruner, 8)
    assert pruner.done and pruner.removals == 3
    ratios = [h["predicted_ratio"] for h in pruner.history]
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] <= 0.5 + 1e-9  # L_r falls to the target
    assert model_cost_ms(model, SHAPE) / dense_cost <= 0.5 + 1e-9  # channels removed, not masked
    assert model(torch.zeros(1, *SHAPE)).shape == out_shape
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert not pruner.due(9)  # no removal left
    # the first removal fixed a one-shot plan's widths as the floor: every step stays above, the last lands on it
    assert pruner.min_widths and all(h["widths"][g] >= w for h in pruner.history for g, w in pruner.min_widths.items())
    assert pruner.history[-1]["widths"] == pruner.min_widths


def test_without_a_floor_every_step_is_solved_freely():
    model = residual_net()
    pruner = _pruner(model, 0.5, steps=3, every=2, floor=False)
    _user_loop(model, pruner, 8)
    assert pruner.done and pruner.min_widths is None


def test_an_lr_scheduler_on_the_users_optimizer_keeps_working_across_steps():
    model = residual_net()
    pruner = _pruner(model, 0.6, steps=2, every=2)
    opt, sched = _user_loop(model, pruner, 6, scheduler=True)
    assert pruner.done and sched.optimizer is opt
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** 3)  # StepLR(2, 0.5) after 6 steps
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())


@pytest.mark.parametrize("kw", [{}, {"as_dict": True}, {"as_named": True}])
def test_multi_output_models_keep_their_outputs_and_an_ignored_layer_stays_whole(kw, tmp_path):
    model = TwoHeadNet(**kw)
    shapes = {n: t.shape for n, t in flatten_outputs(model(torch.zeros(1, *SHAPE)))}
    cost = model_cost_ms(model, SHAPE)
    pruner = _pruner(model, 0.6, steps=2, every=2, ignored_layers=["a1"])
    assert {"fc", "box"} <= pruner.graph.classifier  # both heads found without being named
    assert "a1.0" not in pruner.graph.sizes()
    dense = pruner.dense
    _user_loop(model, pruner, 4)
    assert model.a1[0].out_channels == 32  # ignored: whole
    assert model_cost_ms(model, SHAPE) <= 0.6 * cost + 1e-9  # the rest was pruned to the budget
    assert {n: t.shape for n, t in flatten_outputs(model(torch.zeros(1, *SHAPE)))} == shapes
    dep = latprune.export_model(model, torch.randn(2, *SHAPE), tmp_path, dense=dense)
    names = list(shapes)
    assert [o.name for o in onnx.load(str(dep.model.path)).graph.output] == names
    assert dep.parity.ok and [o.name for o in dep.parity.outputs] == names and dep.shrink["ok"]
    meta = {p.key: p.value for p in onnx.load(str(dep.model.path)).metadata_props}
    assert list(json.loads(meta["latprune.outputs"])) == names
    assert json.loads((tmp_path / "export.json").read_text())["parity"]["ok"]


def test_ignored_layers_accept_modules_names_and_wildcards():
    model = residual_net()
    assert resolve_ignored(model, [model.a1]) == ["a1", "a1.0", "a1.1", "a1.2"]
    assert resolve_ignored(model, ["b*.0"]) == ["b1.0", "b2.0"]
    assert "b1.0" not in ModelGraph(model, SHAPE, ["b*.0"]).sizes()


def test_verify_measures_and_closes_the_loop_when_the_table_was_optimistic():
    model = residual_net()
    cost = model_cost_ms(model, SHAPE)
    # the runtime pays a fixed 0.5 x dense cost per call that the table does not know: after the
    # schedule the measured ratio is well over the predicted one
    pruner = _pruner(model, 0.6, runtime=FakeBackend(intercept_ms=0.5 * cost, batch=2), steps=2, every=2)
    opt, _ = _user_loop(model, pruner, 4)
    trained = model_cost_ms(model, SHAPE)
    v = pruner.verify(opt)
    assert v.measured_ratio > v.predicted_ratio and not v.met and v.action == "removed"
    assert model_cost_ms(model, SHAPE) < trained  # the corrected term asked for more: removed
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    again = pruner.verify(opt)  # (the user fine-tunes here)
    assert again.met and again.measured_ratio < v.measured_ratio and again.params < v.params


def test_verify_accepts_a_model_the_table_predicted_exactly():
    model = plain_net()
    pruner = _pruner(model, 0.6, steps=1, every=1, importance="magnitude")
    pruner.step()
    v = pruner.verify()
    assert v.met and v.action in ("accepted", "under budget")
    assert v.measured_ratio == pytest.approx(v.predicted_ratio, rel=1e-6)
    assert v.to_dict()["met"] is True


def _unchanged(model, before):
    state = model.state_dict()
    return state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)


@pytest.mark.parametrize("bad", [
    {"budget": 0}, {"budget": 1.5}, {"budget": math.nan}, {"budget": -0.2}, {"budget": "0.5"},
    {"example": torch.zeros(3, 16, 16)}, {"example": torch.zeros(2, 1, 16, 16)}, {"example": [1, 2]},
    {"ignored_layers": ["no_such_layer"]}, {"ignored_layers": [nn.Conv2d(3, 3, 1)]},
    {"budget": 0.01}, {"importance": "sensitivity"}, {"steps": 0},
])
def test_bad_input_raises_one_clear_error_and_leaves_the_model_alone(bad):
    model = residual_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = {k: v for k, v in bad.items() if k not in ("budget", "example")}
    with pytest.raises(BadInput) as e:
        latprune.LatencyPruner(model, bad.get("example", torch.zeros(2, *SHAPE)), bad.get("budget", 0.5),
                               table=fake_table(model, SHAPE, batch=2), runtime=FakeBackend(batch=2), **kw)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300
    assert _unchanged(model, before)


def test_a_model_torch_pruning_cannot_trace_is_refused_by_name():
    import torchvision

    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    with pytest.raises(BadInput, match="torch-pruning cannot trace ShuffleNetV2"):
        latprune.LatencyPruner(model, torch.zeros(1, 3, 32, 32), 0.5, runtime=FakeBackend(batch=1))


def test_a_table_for_another_batch_is_refused():
    model = plain_net()
    with pytest.raises(BadInput):
        latprune.LatencyPruner(model, torch.zeros(4, *SHAPE), 0.5, table=fake_table(model, SHAPE, batch=2),
                               runtime=FakeBackend(batch=4))


def test_steps_need_observed_gradients_and_stop_after_the_last():
    model = plain_net()
    pruner = _pruner(model, 0.7, steps=1, every=1)
    with pytest.raises(BadInput, match="observe"):
        pruner.observe()  # no backward yet
    with pytest.raises(BadInput, match="observe"):
        pruner.step()  # halp needs gradients
    nn.functional.cross_entropy(model(torch.randn(4, *SHAPE)), torch.randint(0, 10, (4,))).backward()
    pruner.observe()
    pruner.step()
    with pytest.raises(BadInput, match="removals are made"):
        pruner.step()
    # fine-tuning goes on feeding the value, which a corrective removal then ranks by (not the weights' magnitude)
    nn.functional.cross_entropy(model(torch.randn(4, *SHAPE)), torch.randint(0, 10, (4,))).backward()
    pruner.observe()
    kw, observed = pruner._value_kw(correcting=True)
    assert observed == 1 and pruner.value.batches == 1 and "scores" in kw


def test_a_head_the_graph_cannot_see_is_named_before_anything_is_removed():
    class Detached(nn.Module):  # the second output leaves the autograd graph torch-pruning traces
        def __init__(self):
            super().__init__()
            self.body, self.tail = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1)

        def forward(self, x):
            h = self.body(x)
            return self.tail(h).mean((2, 3)), h.detach().mean((2, 3))

    model = Detached()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BadInput, match="ignored_layers"):
        _pruner(model, 0.5)
    assert _unchanged(model, before)


def test_export_model_refuses_a_file_that_computes_something_else(tmp_path):
    with pytest.raises(ParityError, match="diverges"):
        latprune.export_model(broken_export_net(), torch.randn(2, *SHAPE), tmp_path)
    report = json.loads((tmp_path / "export.json").read_text())
    assert report["parity"]["ok"] is False
    assert np.isfinite(report["parity"]["max_abs_diff"])


def test_the_public_surface_is_all():
    for name in latprune.__all__:
        assert getattr(latprune, name) is not None


def test_adasap_drives_a_user_loop_observing_once_per_step_then_fine_tunes_with_asam():
    model = residual_net()
    pruner = _pruner(model, 0.6, steps=2, every=3)
    adasap = latprune.AdaSAP(pruner, rho_max=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for it in range(9):
        x, y = torch.randn(8, *SHAPE, generator=g), torch.randint(0, 10, (8,), generator=g)
        loss = adasap.step(x, y, opt)
        assert math.isfinite(loss)
        if pruner.due(it):
            assert pruner.value.batches == 3  # one observation per two-pass step, not two
            assert set(adasap._rule.keys) == set(pruner.graph.sizes())  # radii follow the planner's key
            pruner.step(opt)
    assert pruner.done and adasap._finetune is not None and adasap._finetune.cfg.method == "asam"
    assert model_cost_ms(model, SHAPE) <= 0.6 * model_cost_ms(residual_net(), SHAPE) + 1e-9


def test_adasap_takes_the_users_loss_for_a_multi_output_model():
    model = TwoHeadNet(as_dict=True)
    pruner = _pruner(model, 0.7, steps=1, every=2)
    seen = []

    def loss_fn(m, x, y):
        out = m(x)
        seen.append(sorted(out))
        return nn.functional.cross_entropy(out["logits"], y) + out["boxes"].pow(2).mean()

    adasap = latprune.AdaSAP(pruner, loss_fn=loss_fn)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for it in range(3):
        adasap.step(torch.randn(4, *SHAPE), torch.randint(0, 10, (4,)), opt)
        if pruner.due(it):
            pruner.step(opt)
    assert pruner.done and seen[0] == ["boxes", "logits"] and len(seen) == 6  # two passes per step


def test_prune_in_one_call_with_callbacks():
    model = residual_net()
    dense_cost = model_cost_ms(model, SHAPE)
    g = torch.Generator().manual_seed(0)
    calls = {"train": 0, "eval": 0}

    def train_fn(m):
        calls["train"] += 1
        assert m.training
        x, y = torch.randn(8, *SHAPE, generator=g), torch.randint(0, 10, (8,), generator=g)
        return nn.functional.cross_entropy(m(x), y)

    def eval_fn(m):
        calls["eval"] += 1
        return sum(p.numel() for p in m.parameters())

    res = latprune.prune(model, torch.zeros(2, *SHAPE), 0.6, train_fn=train_fn, eval_fn=eval_fn, steps=2, every=2,
                         finetune=3, table=fake_table(model, SHAPE, batch=2), runtime=FakeBackend(batch=2), timing=FAST)
    assert calls == {"train": 2 * 2 + 3, "eval": 2} and len(res.history) == 2
    assert res.before == res.dense_params > res.after == res.params
    assert res.verification.met and model_cost_ms(model, SHAPE) <= 0.6 * dense_cost + 1e-9


def test_auxiliary_logits_train_with_their_loss_and_the_layers_feeding_them_follow_removals():
    import torchvision  # heavy: imported by the tests that build its models

    shape = (3, 64, 64)
    model = torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=True)
    table = profile_model(model, shape, FakeBackend(batch=2), ProfileConfig(step=64, fit_configs=1), progress=False)
    assert table.unmeasured["aux1.fc1"].startswith("not run at inference")  # no deployment latency
    pruner = latprune.LatencyPruner(model, torch.zeros(2, *shape), 0.8, table=table, runtime=FakeBackend(batch=2),
                                    steps=1, every=1, timing=FAST)
    assert {"fc", "aux1.fc2", "aux2.fc2"} <= pruner.graph.classifier  # traced in training mode: every head
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(4, *shape), torch.randint(0, 10, (4,))
    model.train()
    classification_loss(model(x), y).backward()  # main + 0.4 x each auxiliary cross-entropy
    pruner.observe()
    opt.step()
    pruner.step(opt)
    assert model.inception4a.branch1.conv.out_channels < 192 or model.inception4b.branch1.conv.out_channels < 160
    sgd_step(model, x, y, opt)  # the CLI's step rule trains the pruned model, auxiliary heads included
    assert model.eval()(x[:2]).shape == (2, 10)


def test_prune_never_ends_on_an_untrained_corrective_removal():
    model = residual_net()
    cost = model_cost_ms(model, SHAPE)
    g = torch.Generator().manual_seed(0)

    def train_fn(m):
        x, y = torch.randn(8, *SHAPE, generator=g), torch.randint(0, 10, (8,), generator=g)
        return nn.functional.cross_entropy(m(x), y)

    # the runtime's fixed cost the table does not know keeps every check over budget
    res = latprune.prune(model, torch.zeros(2, *SHAPE), 0.6, train_fn=train_fn, steps=2, every=2, finetune=2,
                         corrections=1, table=fake_table(model, SHAPE, batch=2), timing=FAST,
                         runtime=FakeBackend(intercept_ms=2.0 * cost, batch=2))
    assert [v.action for v in res.verifications][0] == "removed" and len(res.verifications) == 2
    assert res.verification.action != "removed"  # the last check only measures


class _ChannelsLastMLP(nn.Module):
    """A ConvNeXt-like block: a Linear on (N, H, W, C), which the profiler cannot time."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.mlp = nn.Linear(16, 32)
        self.back = nn.Linear(32, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        x = self.back(torch.relu(self.mlp(x))).permute(0, 3, 1, 2)
        return self.fc(x.mean((2, 3)))


def test_layers_the_profiler_cannot_time_are_named_when_they_leave_nothing_to_prune():
    model = _ChannelsLastMLP()
    table = fake_table(model, SHAPE, batch=2)
    assert set(table.unmeasured) == {"mlp", "back"}  # listed as a profile lists them
    with pytest.raises(BadInput, match=r"cannot measure keep their groups whole \(e.g. mlp: linear layer on 4-D"):
        _pruner(model, 0.5, table=table)


def test_a_model_torch_onnx_cannot_export_at_this_size_is_one_clear_error(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(72, 10))
    with pytest.raises(BadInput, match=r"torch.onnx cannot export Sequential at input \(1, 3, 6, 6\).*use the input"):
        latprune.export_model(model, torch.zeros(1, 3, 6, 6), tmp_path / "d")
    assert not list((tmp_path / "d").glob("*.onnx"))
    with pytest.raises(BadInput, match="torch.onnx cannot export"):  # refused before anything is pruned
        _pruner(model, 0.5, table=None, runtime=FakeBackend(batch=1), batch=1)


def test_precision_int8_plans_against_an_int8_table_and_refuses_an_fp32_one():
    model = plain_net().eval()
    fp32_table = fake_table(model, SHAPE, batch=2)
    with pytest.raises(BadInput, match="int8-u8s8"):  # the fp32 table's fingerprint says float32
        latprune.LatencyPruner(model, torch.zeros(2, *SHAPE), 0.5, table=fp32_table, runtime="ort", threads=1,
                               precision="int8")
    with pytest.raises(BadInput, match="precision='int8' applies to a runtime given by name"):
        _pruner(plain_net().eval(), precision="int8")  # a FakeBackend object computes in fp32
    table = profile_model(model, SHAPE, get_backend("ort", 1, 2, precision="int8"),
                          ProfileConfig(step=16, rounds=1, min_round_s=0.001, model_rounds=1, model_min_round_s=0.005,
                                        fit_configs=1, fit_rounds=1), progress=False)
    p = latprune.LatencyPruner(model, torch.zeros(2, *SHAPE), 0.9, table=table, runtime="ort", threads=1,
                               precision="int8")
    assert p.backend.precision == "int8" and p.table.fingerprint.dtype == "int8-u8s8"


def test_a_profile_through_the_api_reads_and_fills_the_store(tmp_path):
    model = plain_net()
    first, again = FakeBackend(batch=2), FakeBackend(batch=2)
    for backend in (first, again):
        latprune.LatencyPruner(model, torch.zeros(2, *SHAPE), 0.6, runtime=backend, timing=FAST,
                               profile=ProfileConfig(fit_configs=1), store=tmp_path / "store.sqlite")
    assert first.layers_timed and not again.layers_timed  # the second profile measured nothing
    with pytest.raises(BadInput, match="store must be a LatencyStore"):
        latprune.LatencyPruner(model, torch.zeros(2, *SHAPE), 0.6, runtime=FakeBackend(batch=2), store=3)
