"""Stage 3: train and prune on a schedule (AdaSAP, Algorithm 2 and appendix A.4), physically.

Three phases, each a call of the trainer:

1. warm-up: ``warmup_epochs`` with the method's step rule (AdaSAP: adaptive per-neuron
   perturbations, so neurons about to be pruned settle in flat regions);
2. pruning: ``prune_steps`` (R) removals, one every ``prune_every`` iterations (paper: 30), with the
   same step rule. The latency target shrinks geometrically, L_r = L_0 (L_T / L_0)^(r/R), and each
   step re-solves HALP's knapsack on the current model. The paper zeroes pruned neurons (a mask);
   latprune removes them through torch-pruning at every step: a permanent mask, and every later
   step is cheaper. Momentum buffers follow the kept channels;
3. fine-tuning (robustness encouragement): ``finetune`` epochs with uniform ASAM (AdaSAP), or the
   method's own rule for the baselines (SGD + HALP, SAM + HALP, ASAM + HALP).

The end point is the plan the closed loop validated by measurement before training
(``pipeline.calibrate``): L_T is its predicted latency and its widths bound every step from below
(re-solving freely at each step drifted, on ResNet-20, to every group at 8 channels: 0.84 accuracy
where the one-shot plan kept 0.89). The final model is measured again by ``verify``.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from latprune.errors import BadInput
from latprune.latency_tables.table import LatencyTable
from latprune.pipeline.adasap import SharpnessConfig, SharpnessStep, neuron_partition
from latprune.pipeline.data import Dataset
from latprune.pipeline.plan import PlanConfig, PruningPlan, build_plan, predicted_latency
from latprune.pipeline.prune import Removal, apply_plan_
from latprune.pipeline.train import TrainConfig, make_optimizer, sgd_step, train

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    warmup_epochs: float = 0.5
    prune_steps: int = 5  # R
    prune_every: int = 30  # iterations between removals (paper: 30)

    def __post_init__(self):
        if self.warmup_epochs < 0:
            raise BadInput(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.prune_steps < 1 or self.prune_every < 1:
            raise BadInput(f"prune_steps and prune_every must be >= 1, got {self.prune_steps}, {self.prune_every}")


@dataclasses.dataclass
class ScheduleResult:
    history: list[dict[str, Any]]  # one entry per removal
    final_predicted_ms: float
    phases: dict[str, dict[str, Any]]


def step_rules(model: nn.Module, sharp: SharpnessConfig, input_shape) -> tuple[Any, Any]:
    """(rule for warm-up and pruning, rule for fine-tuning) of a method."""
    if sharp.method == "sgd":
        return sgd_step, sgd_step
    if sharp.method in ("sam", "asam"):
        rule = SharpnessStep(model, sharp)
        return rule, rule
    adaptive = SharpnessStep(model, sharp, neuron_partition(model, torch.zeros(1, *input_shape)))
    uniform = SharpnessStep(model, dataclasses.replace(sharp, method="asam"))
    return adaptive, uniform


def train_and_prune_(model: nn.Module, data: Dataset, table: LatencyTable, final: PruningPlan,
                     plan_cfg: PlanConfig, sched: ScheduleConfig, sharp: SharpnessConfig,
                     finetune: TrainConfig, input_shape: tuple[int, int, int], seed: int = 0,
                     progress: bool = True) -> ScheduleResult:
    """Warm up, prune R times down to the widths of ``final`` (a plan validated by measurement),
    fine-tune; in place. Each step re-solves the knapsack at L_r with the current importances, never
    cutting a group below its final width, so the last step lands on ``final``'s widths and which
    channels survive is decided by the importances after warm-up."""
    ex = torch.zeros(1, *input_shape)
    rule, ft_rule = step_rules(model, sharp, input_shape)
    phases: dict[str, dict[str, Any]] = {}
    cfg_a = dataclasses.replace(finetune, epochs=sched.warmup_epochs)
    phases["warmup"] = dataclasses.asdict(train(model, data, cfg_a, seed=seed, step=rule, progress=progress,
                                                desc="warm-up"))

    l0 = predicted_latency(model, table, input_shape)
    final_target_ms = final.predicted_ms
    floor = {g.name: len(g.keep) for g in final.groups}
    history: list[dict[str, Any]] = []
    last = {"predicted_ms": l0}

    def prune_step(it: int, m: nn.Module) -> Removal | None:
        if it % sched.prune_every:
            return None
        r = it // sched.prune_every
        target = l0 * (final_target_ms / l0) ** (r / sched.prune_steps)
        batches = None
        if plan_cfg.importance == "taylor":  # gradients of a few fixed batches at the current weights
            n = plan_cfg.taylor_batches * finetune.batch_size
            batches = list(data.batches(data.train, finetune.batch_size, limit=n))
        plan = build_plan(m, table, target, plan_cfg, input_shape, batches, min_widths=floor)
        rec = Removal()
        apply_plan_(m, plan, input_shape, record=rec)
        if isinstance(rule, SharpnessStep):
            rule.rebind(m, ex)  # the parameters were replaced
        n_params = sum(p.numel() for p in m.parameters())
        history.append({"step": r, "iteration": it, "target_ms": target, "predicted_ms": plan.predicted_ms,
                        "params": n_params, "widths": {g.name: len(g.keep) for g in plan.groups}})
        last["predicted_ms"] = plan.predicted_ms
        log.info("prune step %d/%d: target %.3f ms, predicted %.3f ms, %d params", r, sched.prune_steps, target,
                 plan.predicted_ms, n_params)
        return rec

    iters = sched.prune_steps * sched.prune_every
    per_epoch = max(int(np.ceil(len(data.train) / finetune.batch_size)), 1)
    cfg_b = dataclasses.replace(finetune, epochs=iters / per_epoch)
    phases["pruning"] = dataclasses.asdict(train(model, data, cfg_b, seed=seed + 1, step=rule, callbacks=[prune_step],
                                                 progress=progress, desc="prune"))
    if len(history) != sched.prune_steps:
        raise RuntimeError(f"pruning phase made {len(history)} of {sched.prune_steps} removals")
    if isinstance(ft_rule, SharpnessStep):
        ft_rule.rebind(model, ex)
    phases["finetune"] = dataclasses.asdict(train(model, data, finetune, seed=seed + 2, step=ft_rule, progress=progress,
                                                  desc="fine-tune"))
    return ScheduleResult(history, last["predicted_ms"], phases)


def step_time_ratio(model: nn.Module, data: Dataset, sharp: SharpnessConfig, cfg: TrainConfig,
                    input_shape: tuple[int, int, int], steps: int = 6, rounds: int = 3) -> float:
    """Time of one step of the method's (first-phase) rule over one SGD step, interleaved on the same
    batches, on copies of the model, outside the training RNG stream."""
    if sharp.method == "sgd":
        return 1.0
    rng = np.random.default_rng(12345)
    batches = [b for _, b in zip(range(steps), data.batches(data.train, cfg.batch_size, shuffle=True, rng=rng))]
    a, b = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    rule, _ = step_rules(a, sharp, input_shape)
    oa, ob = make_optimizer(a, cfg), make_optimizer(b, cfg)
    cpu_state = torch.get_rng_state()
    t_rule, t_sgd = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for x, y in batches:
            rule(a, x, y, oa)
        t_rule.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for x, y in batches:
            sgd_step(b, x, y, ob)
        t_sgd.append(time.perf_counter() - t0)
    torch.set_rng_state(cpu_state)
    return float(np.median(t_rule) / np.median(t_sgd))
