"""``latprune run`` is a client of the Python API: its train-and-prune stage (``train_and_prune_``,
what the CLI calls) makes its removals and its corrective removals with ``LatencyPruner``, so a user
loop with observe / due / step / verify, given the same data order, learning rates and seeds, ends
with the same model, bit for bit. Timed on the deterministic FakeBackend: real timings steer the
closed loop, and two timings of one model differ."""
import copy
import math

import numpy as np
import torch
from torch import nn

import latprune
from latprune.latency_tables.endtoend import PairConfig, measure_speedup, predicted_latency
from latprune.models.graph import ModelGraph
from latprune.pipeline.adasap import OptimizerConfig
from latprune.pipeline.plan import PlanConfig, build_plan
from latprune.pipeline.schedule import LatencyGoal, ScheduleConfig, TrainPruneConfig, train_and_prune_
from latprune.pipeline.train import TrainConfig
from latprune.testing import FakeBackend, fake_table, residual_net, tiny_dataset

SHAPE = (3, 16, 16)
ONE = PairConfig(rounds=1, min_round_s=0.01, repeats=1, max_repeats=1)
SEED, BUDGET, WINDOW = 3, 0.6, (0.90, 0.97)
LR, BATCH, WARMUP_ITERS = 0.05, 8, 2
WARMUP, STEPS, EVERY, FINETUNE, CORRECT_ITERS, CORRECT_STEPS = 4, 2, 3, 4, 3, 2


def _lr_factor(total: int, warmup: int):
    """The learning-rate shape latprune run trains with: linear warm-up, then cosine to zero."""
    warmup = min(warmup, max(total // 5, 1))
    return lambda it: (it + 1) / warmup if it < warmup else 0.5 * (1 + math.cos(math.pi * (it - warmup) /
                                                                                 max(total - warmup, 1)))


def _optimizer(model):
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 0.0}],
                           lr=LR, momentum=0.9, nesterov=True)


def _batches(data, seed):
    """The shuffled, augmented order latprune run draws for a phase trained with ``seed``."""
    return data.batches(data.train, BATCH, shuffle=True, augment=True, rng=np.random.default_rng([seed, 0]))


def _user_loop(model, data, table, final, backend):
    pruner = latprune.LatencyPruner(model, torch.zeros(1, *SHAPE), BUDGET, table=table, runtime=backend,
                                    steps=STEPS, every=EVERY, importance="halp", round_to=8, timing=ONE,
                                    window=WINDOW, target_ms=final.predicted_ms, floor=False,
                                    # what a corrective removal after fine-tuning (nothing observed since the
                                    # last removal) scores HALP's value on, as latprune run: training batches
                                    scoring_batches=list(data.batches(data.train, BATCH)))
    opt = _optimizer(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(WARMUP + STEPS * EVERY + FINETUNE, WARMUP_ITERS))

    def iterate(batches, n, optimizer, scheduler, prune):
        for it, (x, y) in zip(range(n), batches):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if prune:
                pruner.observe()
            optimizer.step()
            scheduler.step()
            if prune == "steps" and pruner.due(it):
                pruner.step(optimizer)

    model.train()
    iterate(_batches(data, SEED), WARMUP, opt, sched, "observe")  # warm-up: the value accumulates already
    iterate(_batches(data, SEED + 1), STEPS * EVERY, opt, sched, "steps")
    iterate(_batches(data, SEED + 2), FINETUNE, opt, sched, None)
    v, corrections = pruner.verify(), 0
    while v.action == "removed":  # a short fine-tune of its own after each corrective removal
        corrections += 1
        opt = _optimizer(model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(CORRECT_ITERS, 0))
        iterate(_batches(data, SEED + 2 + corrections), CORRECT_ITERS, opt, sched, None)
        v = pruner.verify(correct=corrections < CORRECT_STEPS)
    return pruner, v


def test_a_user_loop_ends_with_the_clis_model_bit_for_bit():
    dense, data = residual_net(), tiny_dataset(64, SHAPE)
    table = fake_table(dense, SHAPE)
    # the device adds a third of the dense latency to every call: the table under-predicts, the closed loop cuts
    backend = FakeBackend(intercept_ms=0.3 * table.dense_ms)
    mag = PlanConfig(importance="magnitude")
    graph = ModelGraph(dense, SHAPE)
    final = build_plan(graph, table, BUDGET * predicted_latency(graph, table), mag)  # the plan stage's plan

    cli = copy.deepcopy(dense)
    frozen = copy.deepcopy(dense).eval()
    goal = LatencyGoal(lambda m: measure_speedup(backend, frozen, copy.deepcopy(m).eval(), SHAPE, ONE).ratio,
                       BUDGET, WINDOW)
    cfg = TrainPruneConfig(plan=PlanConfig(importance="halp", round_to=8),
                           schedule=ScheduleConfig(warmup_epochs=WARMUP / 8, prune_steps=STEPS, prune_every=EVERY,
                                                   sharpness_rho=0.0, correct_steps=CORRECT_STEPS,
                                                   correct_iters=CORRECT_ITERS),
                           optimizer=OptimizerConfig(method="sgd"),
                           finetune=TrainConfig(epochs=FINETUNE / 8, batch_size=BATCH, lr=LR,
                                                warmup_iters=WARMUP_ITERS))
    res = train_and_prune_(cli, data, table, final, cfg, SHAPE, seed=SEED, progress=False, goal=goal)

    user = copy.deepcopy(dense)
    pruner, v = _user_loop(user, data, table, final, backend)

    assert [h["widths"] for h in pruner.history] == [h["widths"] for h in res.history]
    assert [c["action"] for c in res.corrections][0] == "removed"  # the closed loop was exercised
    assert v.measured_ratio == res.corrections[-1]["measured_ratio"]
    a, b = cli.state_dict(), user.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert sum(p.numel() for p in user.parameters()) < sum(p.numel() for p in dense.parameters())
