
import math

import numpy as np
import pytest
import torch
from torch import nn

from latprune.models.graph import ModelGraph
from latprune.models.surgery import Removal, follow_removal_
from latprune.pipeline.plan import GroupPlan, PruningPlan, apply_plan_
from latprune.pipeline.train import LRSpan, TrainConfig, bn_recalibrated, evaluate, train
from latprune.testing import concat_net, residual_net, tiny_dataset

SHAPE = (3, 16, 16)
KEEP_STEM = [0, 2, 3, 5, 8, 9, 12, 15]
KEEP_B1 = list(range(0, 32, 2))


def _plan(model):
    groups = []
    for cg in ModelGraph(model, SHAPE).groups:
        keep = KEEP_STEM if "stem.0" in cg.producers else KEEP_B1 if cg.name == "b1.0" else list(range(cg.size))
        groups.append(GroupPlan(cg.name, cg.size, keep))
    return PruningPlan(1.0, 1.0, 1.0, 1.0, {}, groups, {}, 1, [], "magnitude", 8)


def _stepped(model, opt, n=2):
    for _ in range(n):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(4, *SHAPE)), torch.randint(0, 10, (4,))).backward()
        opt.step()


def test_momentum_follows_the_kept_channels_on_both_dimensions_in_place():
    model = residual_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _stepped(model, opt)
    old = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}
    before = dict(model.named_parameters())
    rec = Removal()
    apply_plan_(model, _plan(model), SHAPE, record=rec)
    follow_removal_(opt, before, model, rec)
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    assert not any(p in opt.state for p in before.values() if p not in set(model.parameters()))
    buf = {n: opt.state[p]["momentum_buffer"] for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        assert buf[n].shape == p.shape, n
    s, b = torch.tensor(KEEP_STEM), torch.tensor(KEEP_B1)
    torch.testing.assert_close(buf["stem.0.weight"], old["stem.0.weight"][s])
    torch.testing.assert_close(buf["stem.1.bias"], old["stem.1.bias"][s])
    torch.testing.assert_close(buf["a1.0.weight"], old["a1.0.weight"][:, s])
    torch.testing.assert_close(buf["b1.0.weight"], old["b1.0.weight"][b][:, s])
    torch.testing.assert_close(buf["b2.0.weight"], old["b2.0.weight"][:, b])
    torch.testing.assert_close(buf["fc.weight"], old["fc.weight"])  # proj group untouched
    _stepped(model, opt, 1)  # the same optimizer object trains the pruned model


def test_adam_moments_and_an_lr_scheduler_follow_a_removal():
    model = residual_net()
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.ndim > 1], "lr": 1e-3},
                             {"params": [p for p in model.parameters() if p.ndim <= 1], "lr": 2e-3}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _stepped(model, opt)
    sched.step()
    old = {n: (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone(), opt.state[p]["step"].clone())
           for n, p in model.named_parameters()}
    before = dict(model.named_parameters())
    rec = Removal()
    apply_plan_(model, _plan(model), SHAPE, record=rec)
    follow_removal_(opt, before, model, rec)
    s = torch.tensor(KEEP_STEM)
    st = opt.state[model.stem[0].weight]
    torch.testing.assert_close(st["exp_avg"], old["stem.0.weight"][0][s])
    torch.testing.assert_close(st["exp_avg_sq"], old["stem.0.weight"][1][s])
    assert float(st["step"]) == float(old["stem.0.weight"][2]) == 2.0  # scalar state kept as it was
    assert len(opt.param_groups[1]["params"]) == sum(1 for p in model.parameters() if p.ndim <= 1)
    _stepped(model, opt, 1)
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.5e-4, 5e-4])  # the scheduler still drives it


def test_training_continues_through_a_removal_with_momentum_kept(monkeypatch):
    import latprune.pipeline.train as tr

    model, data = residual_net(), tiny_dataset(64, SHAPE)
    seen = {}
    real = tr.follow_removal_

    def spy(opt, before, m, rec):
        real(opt, before, m, rec)
        seen["carried"] = sum(1 for p in m.parameters() if "momentum_buffer" in opt.state[p])
        seen["params"] = sum(1 for _ in m.parameters())

    monkeypatch.setattr(tr, "follow_removal_", spy)

    def prune_at_3(it, m):
        if it != 3:
            return None
        rec = Removal()
        apply_plan_(m, _plan(m), SHAPE, record=rec)
        seen["stem"] = m.stem[0].out_channels
        return rec

    res = train(model, data, TrainConfig(epochs=1, batch_size=8, warmup_iters=1), callbacks=[prune_at_3],
                progress=False)
    assert res.iterations == 8 and seen["stem"] == 8 and model.stem[0].out_channels == 8
    assert seen["carried"] == seen["params"]  # every parameter kept its momentum through the removal
    assert 0.0 <= evaluate(model, data, data.test) <= 1.0



from latprune.errors import BadInput  # noqa: E402
from latprune.latency_tables.endtoend import predicted_latency  # noqa: E402
from latprune.pipeline.adasap import OptimizerConfig  # noqa: E402
from latprune.pipeline.plan import PlanConfig, build_plan  # noqa: E402
from latprune.pipeline.schedule import ScheduleConfig, TrainPruneConfig, step_time_ratio, train_and_prune_  # noqa: E402
from latprune.testing import fake_table  # noqa: E402

MAG = PlanConfig(importance="magnitude")  # needs no data batches


@pytest.mark.parametrize("method,importance", [("adasap", "magnitude"), ("sgd", "taylor")])
def test_schedule_prunes_r_times_along_a_shrinking_target(method, importance):
    model, data = residual_net(), tiny_dataset(64, SHAPE)
    table = fake_table(model, SHAPE)
    plan = build_plan(ModelGraph(model, SHAPE), table, 0.4 * table.dense_ms, PlanConfig(importance="magnitude"))
    final = plan.predicted_ms
    res = train_and_prune_(model, data, table, plan,
                           TrainPruneConfig(
                               plan=PlanConfig(importance=importance),
                               schedule=ScheduleConfig(warmup_epochs=0.25, prune_steps=3, prune_every=2,
                                                       width_floor=True),
                               optimizer=OptimizerConfig(method=method, rho=0.1, rho_max=0.1),
                               finetune=TrainConfig(epochs=0.25, batch_size=8, warmup_iters=1)),
                           SHAPE, progress=False)
    targets = [h["target_ms"] for h in res.history]
    assert [h["iteration"] for h in res.history] == [2, 4, 6]
    ratio = final / table.dense_ms
    assert targets == pytest.approx([table.dense_ms * ratio ** (r / 3) for r in (1, 2, 3)])
    assert all(h["predicted_ms"] <= h["target_ms"] + 1e-9 for h in res.history)
    assert predicted_latency(ModelGraph(model, SHAPE), table) == pytest.approx(res.final_predicted_ms)
    assert res.final_predicted_ms <= final + 1e-9 and set(res.phases) == {"warmup", "pruning", "finetune"}
    assert res.history[-1]["widths"] == {g.name: len(g.keep) for g in plan.groups}  # lands on the plan
    assert all(0 <= h["val_accuracy_after_removal"] <= 1 for h in res.history)


def test_bn_recalibration_uses_the_calibration_batches_on_a_copy():
    model = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2)).train()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 2, 3, 3, generator=g) * 3 + 1, None) for _ in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cal = bn_recalibrated(model, batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    with torch.no_grad():
        h = [model[0](x) for x, _ in batches]  # equal batches: the cumulative average is the overall mean
    want_mean = torch.stack([x.mean((0, 2, 3)) for x in h]).mean(0)
    want_var = torch.stack([x.transpose(0, 1).reshape(2, -1).var(1, unbiased=True) for x in h]).mean(0)
    torch.testing.assert_close(cal[1].running_mean, want_mean)
    torch.testing.assert_close(cal[1].running_var, want_var)
    assert not cal.training and int(cal[1].num_batches_tracked) == 3


def test_step_time_ratio_is_measured_for_two_pass_methods():
    model, data = residual_net(), tiny_dataset(64, SHAPE)
    r = step_time_ratio(model, data, OptimizerConfig(method="asam"), TrainConfig(batch_size=8), SHAPE, steps=2,
                        rounds=1)
    assert np.isfinite(r) and r > 0  # a measured ratio; its size is for benchmarks, not tests
    assert step_time_ratio(model, data, OptimizerConfig(method="sgd"), TrainConfig(batch_size=8), SHAPE) == 1.0


@pytest.mark.parametrize("width_floor", [True, False])
def test_emerging_schedule_re_solves_without_the_validated_widths(width_floor):
    """The validated plan keeps the costliest group whole. With the floor every step keeps it whole;
    without it the knapsack re-solves freely and cuts it, still landing under the final target."""
    model, data = residual_net(), tiny_dataset(64, SHAPE)
    table = fake_table(model, SHAPE)
    graph = ModelGraph(model, SHAPE)
    stream = next(cg for cg in graph.groups if "stem.0" in cg.producers)
    final = build_plan(graph, table, 0.6 * table.dense_ms, MAG, min_widths={stream.name: stream.size})
    assert {g.name: len(g.keep) for g in final.groups}[stream.name] == stream.size
    cfg = TrainPruneConfig(plan=PlanConfig(importance="magnitude"),
                           schedule=ScheduleConfig(warmup_epochs=0.25, prune_steps=3, prune_every=2, sharpness_rho=0.0,
                                                   recalibrate_batches=0, width_floor=width_floor),
                           optimizer=OptimizerConfig(method="sgd"),
                           finetune=TrainConfig(epochs=0.25, batch_size=8, warmup_iters=1))
    res = train_and_prune_(model, data, table, final, cfg, SHAPE, progress=False)
    kept = [h["widths"][stream.name] for h in res.history]
    assert all(h["predicted_ms"] <= h["target_ms"] + 1e-9 for h in res.history)
    assert res.final_predicted_ms <= final.predicted_ms + 1e-9
    if width_floor:
        assert kept == [stream.size] * 3
    else:
        assert kept[-1] < stream.size


def test_width_floor_is_for_latency_targets():
    assert not ScheduleConfig().width_floor  # the architecture emerges by default (issue 11)
    with pytest.raises(BadInput, match="--target params has no plan to floor at"):
        ScheduleConfig(target="params", param_ratio=0.5, width_floor=True)


@pytest.mark.parametrize("lr_schedule", ["one", "per-phase"])
def test_one_learning_rate_schedule_runs_across_warmup_pruning_and_finetuning(monkeypatch, lr_schedule):
    """64 images in batches of 8: warm-up 2 iterations, pruning 3 x 2, fine-tuning 4; 12 in all."""
    lrs, fresh = [], []
    sgd_step_fn = torch.optim.SGD.step

    def recording_step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        fresh.append(not any("momentum_buffer" in self.state.get(p, {}) for g in self.param_groups
                             for p in g["params"]))
        return sgd_step_fn(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    model, data = residual_net(), tiny_dataset(64, SHAPE)
    table = fake_table(model, SHAPE)
    plan = build_plan(ModelGraph(model, SHAPE), table, 0.5 * table.dense_ms, MAG)
    res = train_and_prune_(model, data, table, plan,
                           TrainPruneConfig(plan=MAG, schedule=ScheduleConfig(
                               warmup_epochs=0.25, prune_steps=3, prune_every=2, recalibrate_batches=0,
                               sharpness_rho=0.0, lr_schedule=lr_schedule),
                                            optimizer=OptimizerConfig(method="sgd"),
                                            finetune=TrainConfig(epochs=0.5, batch_size=8, lr=0.1, warmup_iters=2)),
                           SHAPE, progress=False)
    assert len(lrs) == 12
    if lr_schedule == "one":
        # one warm-up (2 iterations), then one cosine to zero over the 10 that remain
        want = [0.05, 0.1] + [0.05 * (1 + math.cos(math.pi * i / 10)) for i in range(10)]
        assert lrs == pytest.approx(want)
        assert fresh == [True] + [False] * 11  # momentum carried across both phase boundaries
        assert [res.phases[p]["lr_span"] for p in ("warmup", "pruning", "finetune")] == [
            {"offset": 0, "total": 12}, {"offset": 2, "total": 12}, {"offset": 8, "total": 12}]
    else:  # each phase its own warm-up and cosine, from a fresh optimizer
        assert [i for i, f in enumerate(fresh) if f] == [0, 2, 8]
        assert lrs[0] == lrs[2] == lrs[8] and "lr_span" not in res.phases["pruning"]


def test_a_training_run_longer_than_its_span_is_refused():
    model, data = residual_net(), tiny_dataset(64, SHAPE)
    with pytest.raises(ValueError, match="past the schedule"):
        train(model, data, TrainConfig(epochs=1.0, batch_size=8), span=LRSpan(offset=4, total=10), progress=False)


def test_a_concat_consumer_cut_by_two_groups_keeps_the_right_momentum_columns():
    model = concat_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _stepped(model, opt)
    old = opt.state[model.merge[0].weight]["momentum_buffer"].clone()
    sizes = ModelGraph(model, SHAPE).sizes()
    keep = {"left.0": [1, 3, 5, 7, 9, 11, 13, 15], "right.0": list(range(8, 24))}
    plan = PruningPlan(1.0, 1.0, 1.0, 1.0, {}, [GroupPlan(g, n, keep.get(g, list(range(n)))) for g, n in sizes.items()],
                       {}, 1, [], "magnitude", 8)
    before, rec = dict(model.named_parameters()), Removal()
    apply_plan_(model, plan, SHAPE, record=rec)
    follow_removal_(opt, before, model, rec)
    cols = torch.tensor(keep["left.0"] + [16 + i for i in keep["right.0"]])  # the concat: left's 16, then right's 24
    torch.testing.assert_close(opt.state[model.merge[0].weight]["momentum_buffer"], old[:, cols])
