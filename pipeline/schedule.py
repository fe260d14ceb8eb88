"""Stage 3: train and prune on a schedule (AdaSAP, Algorithm 2 and appendix A.4), physically.

Three phases, each a call of the trainer:

1. warm-up: ``warmup_epochs`` with the method's step rule (AdaSAP: adaptive per-neuron
   perturbations, so neurons about to be pruned settle in flat regions);
2. pruning: ``prune_steps`` (R) removals, one every ``prune_every`` iterations (paper: 30), with the
   same step rule. AdaSAP_L (``target="latency"``): the latency target shrinks geometrically,
   L_r = L_0 (L_T / L_0)^(r/R), and each step re-solves HALP's knapsack on the current model:
   the public API's :class:`~latprune.pipeline.pruner.LatencyPruner` makes these removals (and the
   closed loop's corrective ones), so ``latprune run`` and a user's own loop share one code path.
   AdaSAP_P (``target="params"``): step r keeps the k_r = m k^(r/R) neurons ranked highest
   globally (appendix A.4; its printed formula is garbled, this is its intent), the last step
   exactly meeting the parameter ratio. The paper zeroes pruned neurons (a mask);
   latprune removes them through torch-pruning at every step: a permanent mask, and every later
   step is cheaper. Momentum buffers follow the kept channels;
3. fine-tuning (robustness encouragement): ``finetune`` epochs with uniform ASAM (AdaSAP), or the
   method's own rule for the baselines (SGD + HALP, SAM + HALP, ASAM + HALP).

SAM's sharpness is measured after warm-up and after the last removal (paper section 4.5). The
whole state is checkpointed so that a killed run resumes bit for bit, and under torchrun every rank
trains its shard while rank 0 makes each pruning decision (``pipeline.distributed``).

For the latency target, the end point is the plan the closed loop validated by measurement before
training (``pipeline.calibrate``): L_T is its predicted latency and its widths bound every step from below
(re-solving freely at each step drifted, on ResNet-20, to every group at 8 channels: 0.84 accuracy
where the one-shot plan kept 0.89). The final model is measured again by ``verify``.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from latprune.errors import BadInput
from latprune.io import save_torch_atomic
from latprune.latency_tables.endtoend import model_layers_ms, predicted_latency
from latprune.latency_tables.table import LatencyTable
from latprune.models.arch import layer_shapes, reshape_
from latprune.models.graph import ModelGraph
from latprune.models.surgery import Removal
from latprune.pipeline import distributed
from latprune.pipeline.adasap import OptimizerConfig, SharpnessStep, neuron_partition
from latprune.pipeline.data import Dataset
from latprune.pipeline.importance import HalpValue, per_width, uses_halp
from latprune.pipeline.plan import (
    PlanConfig,
    PruningPlan,
    apply_plan_,
    build_param_plan,
    count_params,
)
from latprune.pipeline.pruner import KEY_REFRESH, LatencyPruner, planner_key
from latprune.pipeline.train import (
    LRSpan,
    Resume,
    TrainConfig,
    bn_recalibrated,
    held_out_metrics,
    make_optimizer,
    sgd_step,
    train,
)

__all__ = ["TARGETS", "PHASES", "ScheduleConfig", "floors_at_plan", "LatencyGoal",
           "ScheduleResult", "TrainPruneConfig", "prune_rule", "finetune_rule", "measure_sharpness",
           "train_and_prune_", "step_time_ratio"]

log = logging.getLogger(__name__)


TARGETS = ("latency", "params")
PHASES = ("warmup", "pruning", "finetune", "correct")
LR_SCHEDULES = ("one", "per-phase")
# 3: the optimizer state carried between phases (``carry``), AdaSAP's ``keys``; 4: the latency
# target's removals made by a LatencyPruner (its state under ``pruner``)
CHECKPOINT_VERSION = 4


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    warmup_epochs: float = 0.5
    prune_steps: int = 10  # R
    prune_every: int = 30  # iterations between removals (paper: 30)
    target: str = "latency"  # latency: AdaSAP_L (HALP knapsack); params: AdaSAP_P (global rank)
    param_ratio: float | None = None  # --target params: kept parameters / dense parameters
    checkpoint_every: int = 50  # iterations between training checkpoints (also at every removal)
    sharpness_rho: float = 0.05  # radius of the sharpness probe before and after pruning (0: skip)
    sharpness_steps: int = 3  # ascent steps of the probe
    sharpness_batches: int = 2  # fixed training batches the probe's loss is taken on
    # training batches BatchNorm statistics are re-estimated on for the validation accuracy right
    # after each removal, before any further training (0: not measured)
    recalibrate_batches: int = 8
    # latency target: False (default), the knapsack is re-solved freely at every step and the
    # architecture emerges (HALP's schedule), the corrective phase closing the loop at the end; True,
    # every step keeps each group at least as wide as the plan validated before training (the
    # one-shot architecture: only which channels survive is decided later)
    width_floor: bool = False
    # latency target, with a measuring callable: after fine-tuning the compact model is timed; over
    # the accepted window, the end-to-end term is corrected from that measurement, the knapsack
    # re-solved on the current model, the channels removed and ``correct_iters`` iterations of
    # fine-tuning run, at most ``correct_steps`` times
    correct_steps: int = 2
    correct_iters: int = 60
    measure_steps: bool = True  # time the model after every removal too (the report's per-step latency)
    # "one": warm-up, pruning and fine-tuning follow one learning-rate schedule (one warm-up, one
    # cosine to zero at the end of fine-tuning) and carry the optimizer's momentum from phase to
    # phase, as the AdaSAP paper trains; "per-phase": each phase its own warm-up and cosine from a
    # fresh optimizer (latprune before issue 12). The corrective phase keeps its own short schedule.
    lr_schedule: str = "one"

    def __post_init__(self):
        if self.warmup_epochs < 0:
            raise BadInput(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.prune_steps < 1 or self.prune_every < 1:
            raise BadInput(f"prune_steps and prune_every must be >= 1, got {self.prune_steps}, {self.prune_every}")
        if self.target not in TARGETS:
            raise BadInput(f"--target must be latency or params, got {self.target!r}")
        if self.target == "latency" and self.param_ratio is not None:
            raise BadInput("--param-ratio applies to --target params: add --target params or drop --param-ratio")
        if self.target == "params" and (self.param_ratio is None or not (0 < self.param_ratio < 1)):
            raise BadInput(f"--target params needs --param-ratio in (0, 1), e.g. 0.4, got {self.param_ratio}")
        if self.checkpoint_every < 0:
            raise BadInput(f"checkpoint_every must be >= 0 iterations, got {self.checkpoint_every}")
        if self.target == "params" and self.width_floor:
            raise BadInput("--target params has no plan to floor at: drop --floor-widths")
        if self.correct_steps < 0 or self.correct_iters < 0:
            raise BadInput(f"correct_steps and correct_iters must be >= 0, got {self.correct_steps}, "
                           f"{self.correct_iters}")
        if self.recalibrate_batches < 0:
            raise BadInput(f"recalibrate_batches must be >= 0, got {self.recalibrate_batches}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise BadInput(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.sharpness_rho < 0 or self.sharpness_steps < 1 or self.sharpness_batches < 1:
            raise BadInput("sharpness_rho must be >= 0, sharpness_steps and sharpness_batches >= 1")


def floors_at_plan(sched: ScheduleConfig, final: PruningPlan | None) -> bool:
    """Whether every removal keeps each group at least as wide as ``final`` (latency target only):
    asked for (``width_floor``), or ``final`` was chosen by the plan search (``pipeline.search``:
    its widths were measured under the budget and won on held-out data, so the steps go to them;
    an emerging architecture would discard that choice)."""
    return sched.target == "latency" and (sched.width_floor or bool(final is not None and final.search))


@dataclasses.dataclass(frozen=True)
class LatencyGoal:
    """What the latency target is held to by measurement: ``measure(model)`` times a model against
    the dense one on the deployment runtime and returns compact/dense (it must not change the
    model); the corrective phase accepts a measured ratio up to ``window[1] x wanted_ratio`` and
    reports one under ``window[0] x wanted_ratio`` as under budget. ``measure_step`` (default
    ``measure``) times the model after each removal, for the report: it may be quicker and noisier."""

    measure: Callable[[nn.Module], float]
    wanted_ratio: float
    window: tuple[float, float] = (0.90, 0.97)
    measure_step: Callable[[nn.Module], float] | None = None


@dataclasses.dataclass
class ScheduleResult:
    history: list[dict[str, Any]]  # one entry per removal
    final_predicted_ms: float
    phases: dict[str, dict[str, Any]]
    sharpness: dict[str, Any]
    resumed: list[dict[str, Any]]  # where each resume picked up (phase, iteration)
    corrections: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the corrective phase's checks
    e2e: dict[str, Any] | None = None  # the end-to-end term after the corrective phase (None: unchanged)


def prune_rule(graph: ModelGraph, sharp: OptimizerConfig) -> Any:
    """The method's step rule for warm-up and pruning (AdaSAP: adaptive per-neuron radii)."""
    if sharp.method == "sgd":
        return sgd_step
    if sharp.method in ("sam", "asam"):
        return SharpnessStep(graph.model, sharp)
    return SharpnessStep(graph.model, sharp, neuron_partition(graph))


def finetune_rule(model: nn.Module, sharp: OptimizerConfig) -> Any:
    """The method's step rule for fine-tuning (AdaSAP: uniform ASAM, robustness encouragement)."""
    if sharp.method == "sgd":
        return sgd_step
    return SharpnessStep(model, dataclasses.replace(sharp, method="asam") if sharp.method == "adasap" else sharp)


@torch.no_grad()
def _loss(model: nn.Module, batches) -> float:
    return float(np.mean([float(nn.functional.cross_entropy(model(x), y)) for x, y in batches]))


def measure_sharpness(model: nn.Module, batches, rho: float, steps: int = 3) -> float:
    """SAM's sharpness (Foret et al.; AdaSAP section 4.5): max over ||eps||_2 <= rho of
    L(w + eps) - L(w), estimated by ``steps`` normalised gradient-ascent steps projected on the
    ball, on fixed batches, in eval mode (BatchNorm statistics fixed). A lower bound of the true
    maximum. Runs on a copy: the model, its BN buffers and the RNG stream are untouched."""
    m = copy.deepcopy(model).eval()
    params = [p for p in m.parameters() if p.requires_grad]
    w0 = [p.detach().clone() for p in params]
    base = _loss(m, batches)
    best, step = base, rho / steps * 2
    for _ in range(steps):
        m.zero_grad(set_to_none=True)
        for x, y in batches:
            (nn.functional.cross_entropy(m(x), y) / len(batches)).backward()
        with torch.no_grad():
            gn = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None))
            if not torch.isfinite(gn) or gn == 0:
                break
            for p in params:
                if p.grad is not None:
                    p.add_(p.grad * (step / float(gn)))
            d = [p - w for p, w in zip(params, w0)]
            dn = float(torch.sqrt(sum((x.double() ** 2).sum() for x in d)))
            if dn > rho:  # project back onto the ball
                for p, w, x in zip(params, w0, d):
                    p.copy_(w + x * (rho / dn))
        best = max(best, _loss(m, batches))
    return best - base


@dataclasses.dataclass(frozen=True)
class TrainPruneConfig:
    """What one train-and-prune run is made of: the planner's settings (importance, ``round_to``),
    the schedule (phases, removals, target), the optimizer (step rule) and the training settings
    of every phase (``finetune``: learning rate, batch; the warm-up and pruning phases use it too)."""

    plan: PlanConfig = PlanConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    finetune: TrainConfig = TrainConfig()


def train_and_prune_(model: nn.Module, data: Dataset, table: LatencyTable, final: PruningPlan | None,
                     cfg: TrainPruneConfig, input_shape: tuple[int, int, int], *, seed: int = 0,
                     progress: bool = True, checkpoint: Path | None = None, key: str = "",
                     hook: Callable[[str, int], None] | None = None, goal: LatencyGoal | None = None) -> ScheduleResult:
    """Warm up, prune R times, fine-tune, then hold the result to the budget by measurement; in place.

    ``target="latency"`` (AdaSAP_L): towards ``final``'s predicted latency (a plan validated by
    measurement; unused, may be None, for ``target="params"``). Each step re-solves the knapsack at
    L_r with the value accumulated since the last removal; by default freely, so the architecture
    emerges over the schedule (``width_floor``: never below ``final``'s widths, so the last step lands
    on them). With a ``goal``, every removal is timed (``measure_steps``) and, after fine-tuning, the
    corrective phase times the compact model: over the window, it corrects the table's end-to-end
    term from that measurement, re-solves on the current model, removes, fine-tunes
    ``correct_iters`` iterations and times again (at most ``correct_steps`` times); removed channels
    do not grow back, so a model under the window is only reported. ``target="params"`` (AdaSAP_P):
    step r keeps the k_r = m k^(r/R) globally top-ranked neurons, k found after warm-up so that the
    global ranking meets ``param_ratio``; the last step searches the count that meets it exactly.

    ``checkpoint`` (a file) is written atomically every ``sched.checkpoint_every`` iterations, at
    every removal and between phases, and resumed from when it exists with the same ``key``: the
    model's architecture and weights, optimizer state (momentum), schedule position, pruning history
    and RNG state, so a killed run ends with the same model, bit for bit, as an uninterrupted one
    (same threads). ``hook(phase, iteration)`` runs after every iteration (monitoring, tests).
    """
    return _Schedule(model, data, table, final, cfg, input_shape, seed, progress, checkpoint, key, hook, goal)()


class _Schedule:
    """The state of one train-and-prune run; everything a checkpoint must hold is an attribute."""

    def __init__(self, model, data, table, final, cfg: TrainPruneConfig, input_shape, seed, progress, checkpoint, key,
                 hook, goal: LatencyGoal | None):
        self.model, self.data, self.final, self.goal = model, data, final, goal
        self._table = table  # the parameter target's; the latency target's lives in its pruner (corrected there)
        self.plan_cfg, self.sched, self.sharp, self.ft = cfg.plan, cfg.schedule, cfg.optimizer, cfg.finetune
        self.input_shape, self.seed, self.progress = input_shape, seed, progress
        self.checkpoint, self.key, self.hook = checkpoint, key, hook
        self._graph: ModelGraph | None = None  # of the model as it is now; None after a change
        # halp: the value accumulated from the training steps' own gradients since the last removal
        self._value: HalpValue | None = None
        self._value_state: dict[str, Any] | None = None  # a checkpoint's sums, until the value is rebuilt
        self.history: list[dict[str, Any]] = []
        self.phases: dict[str, dict[str, Any]] = {}
        self.sharpness: dict[str, Any] = {}
        self.resumed: list[dict[str, Any]] = []
        self.corrections: list[dict[str, Any]] = []
        self.corrected_e2e: dict[str, Any] | None = None  # the corrective phase's end-to-end term
        # the latency target's removals and corrective removals: the public API's LatencyPruner
        self.pruner: LatencyPruner | None = None
        self._pruner_state: dict[str, Any] | None = None  # a checkpoint's, until the pruner is made
        self.p0: int | None = None  # parameters when pruning starts
        self.k: float | None = None  # params target: final kept fraction of neurons
        self.m: int | None = None  # params target: neurons when pruning starts
        # lr_schedule "one": the optimizer state the next phase starts from (the last phase's, at its end)
        self.carry: dict | None = None
        self.keys: dict[str, np.ndarray] | None = None  # AdaSAP's planner score, as last refreshed

    @property
    def table(self) -> LatencyTable:
        """The latency table planned with (the latency target's, corrected by its closed loop)."""
        return self.pruner.table if self.pruner is not None else self._table

    @property
    def graph(self) -> ModelGraph:
        """The model's dependency graph, traced again only after a removal or a resume changed it
        (the latency target's pruner keeps it)."""
        if self.pruner is not None:
            return self.pruner.graph
        if self._graph is None:
            self._graph = ModelGraph(self.model, self.input_shape)
        return self._graph

    @property
    def value(self) -> HalpValue | None:
        """HALP's value over the current model's groups, fed by every training step of warm-up and
        pruning (``observe``) and reset at every removal; None for criteria that do not rank by it
        (except a per-width value under AdaSAP's planner score: HALP's value stands in for its
        missing per-channel score there)."""
        imp = self.plan_cfg.importance
        if not (uses_halp(imp) or (self.sharp.uses_planner_key and per_width(imp))):
            return None
        if self.pruner is not None:
            return self.pruner.value
        if self._value is None:
            self._value = HalpValue(self.graph)
            if self._value_state is not None:  # resumed: continue the checkpoint's averages
                self._value.sums = {k: v.numpy().copy() for k, v in self._value_state["sums"].items()}
                self._value.batches = int(self._value_state["batches"])
                self._value_state = None
        return self._value

    def _observe(self) -> None:
        (self.pruner or self.value).observe()

    def _make_pruner(self) -> None:
        """The latency target's :class:`LatencyPruner` over the model as it is now (after a resume,
        as it was saved, its state restored): R removals towards ``final``'s predicted latency, never
        below ``final``'s widths when the steps are floored there."""
        if self.sched.target != "latency":
            return
        floors = {g.name: len(g.keep) for g in self.final.groups} if floors_at_plan(self.sched, self.final) else None
        # the budget only scales the pruner's own verify(), which the schedule does not use (it has ``goal``)
        budget = self.goal.wanted_ratio if self.goal is not None else \
            min(1.0, self.final.predicted_ms / self.final.dense_predicted_ms)
        self.pruner = LatencyPruner(
            self.model, torch.zeros(1, *self.input_shape), budget, table=self._table, runtime=None,
            steps=self.sched.prune_steps, every=self.sched.prune_every, target_ms=self.final.predicted_ms,
            min_widths=floors, floor=False, scoring_batches=lambda: self._scoring_batches, held_out=self._held_out,
            plan_config=self.plan_cfg, **({"window": self.goal.window} if self.goal is not None else {}))
        if self._pruner_state is not None:
            self.pruner.load_state_dict(self._pruner_state)
            self._pruner_state = None

    def _changed(self) -> None:
        """The model's layers were replaced (a removal, a resume): graph and value start again."""
        self._graph, self._value = None, None

    def _accumulated_scores(self) -> tuple[dict[str, np.ndarray] | None, int]:
        """(scores, minibatches) from the training gradients when enough were seen since the last
        removal (HALP: min(32, iterations between removals)); else (None, 0): a scoring pass."""
        v = self.value
        if uses_halp(self.plan_cfg.importance) and v is not None and v.batches >= min(32, self.sched.prune_every):
            return v.scores(), v.batches
        return None, 0

    def _neuron_keys(self) -> dict[str, np.ndarray]:
        return planner_key(self.graph, self.table, self.value, self.plan_cfg.round_to,
                           per_ms=self.sched.target == "latency")

    def _keyed(self, rule, resume) -> list:
        """Give ``rule`` the planner's key now (the checkpoint's when resuming inside the phase) and
        the callback that refreshes it every :data:`KEY_REFRESH` iterations and after a removal."""
        if not (self.sharp.uses_planner_key and isinstance(rule, SharpnessStep)):
            return []
        if resume is None or self.keys is None:
            self.keys = self._neuron_keys()
        rule.set_neuron_keys(self.keys)

        def refresh(it: int, m: nn.Module) -> None:
            if rule.keys is None or it % KEY_REFRESH == 0:  # None: a removal rebound the rule
                self.keys = self._neuron_keys()
                rule.set_neuron_keys(self.keys)

        return [refresh]

    # ---- checkpoints ----
    def _state(self, phase: str, resume: Resume | None) -> dict[str, Any]:
        # the torch RNG travels in ``resume`` (train() reseeds at every phase start)
        return {"version": CHECKPOINT_VERSION, "key": self.key, "phase": phase,
                "train": resume.to_dict() if resume else None,
                "layers": layer_shapes(self.model), "model": self.model.state_dict(),
                "history": self.history, "phases": self.phases, "sharpness": self.sharpness,
                "resumed": self.resumed, "p0": self.p0, "k": self.k, "m": self.m,
                "pruner": self.pruner.state_dict() if self.pruner is not None else None,
                "corrections": self.corrections, "corrected_e2e": self.corrected_e2e, "carry": self.carry,
                "keys": None if self.keys is None else {k: torch.from_numpy(v.copy()) for k, v in self.keys.items()},
                "value": None if self._value is None else {
                    "sums": {k: torch.from_numpy(v.copy()) for k, v in self._value.sums.items()},
                    "batches": self._value.batches}}

    def _save(self, phase: str, resume: Resume | None) -> None:
        if self.checkpoint is not None and distributed.is_main():
            save_torch_atomic(self._state(phase, resume), self.checkpoint)

    def _load(self) -> tuple[str, Resume | None]:
        """(phase to continue, where inside it) from the checkpoint; the start without one."""
        if self.checkpoint is None or not self.checkpoint.exists():
            return PHASES[0], None
        try:
            ck = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:  # a torn file cannot happen (atomic writes), a foreign one can
            log.warning("ignoring unreadable training checkpoint %s (%s)", self.checkpoint, str(e)[:80])
            return PHASES[0], None
        if ck.get("version") != CHECKPOINT_VERSION or ck.get("key") != self.key:
            log.info("training checkpoint %s is for other settings: starting over", self.checkpoint)
            return PHASES[0], None
        reshape_(self.model, ck["layers"])
        self._changed()
        self._value_state = ck.get("value")
        self.model.load_state_dict(ck["model"])
        self._pruner_state = ck["pruner"]
        for a in ("history", "phases", "sharpness", "resumed", "p0", "k", "m", "corrections", "corrected_e2e",
                  "carry"):
            setattr(self, a, ck[a])
        self.keys = None if ck.get("keys") is None else {k: v.numpy().copy() for k, v in ck["keys"].items()}
        resume = Resume.from_dict(ck["train"]) if ck["train"] else None
        it = resume.iteration if resume else 0
        self.resumed.append({"phase": ck["phase"], "iteration": it})
        log.info("resuming training from %s, phase %s, iteration %d (%d removals done)", self.checkpoint,
                 ck["phase"], it, len(self.history))
        return ck["phase"], resume

    # ---- phases ----
    def __call__(self) -> ScheduleResult:
        phase, resume = self._load()
        self._make_pruner()
        start = PHASES.index(phase) if phase in PHASES else len(PHASES)  # "done": nothing left
        for i in range(start, len(PHASES)):
            getattr(self, f"_{PHASES[i]}")(resume)
            resume = None  # only the first phase run continues from inside
            self._save(PHASES[i + 1] if i + 1 < len(PHASES) else "done", None)
        distributed.barrier()  # every rank has finished with the checkpoint
        if self.checkpoint is not None and distributed.is_main():
            self.checkpoint.unlink(missing_ok=True)
        return ScheduleResult(self.history, predicted_latency(self.graph, self.table),
                              self.phases, self.sharpness, self.resumed, self.corrections, self.corrected_e2e)

    @property
    def _per_epoch(self) -> int:
        return max(int(np.ceil(len(self.data.train) / self.ft.batch_size)), 1)

    def _phase_iters(self) -> dict[str, int]:
        """Iterations of warm-up, pruning and fine-tuning, as :func:`train` counts them."""
        return {"warmup": max(int(round(self.sched.warmup_epochs * self._per_epoch)), 0),
                "pruning": self.sched.prune_steps * self.sched.prune_every,
                "finetune": max(int(round(self.ft.epochs * self._per_epoch)), 0)}

    def _span(self, phase: str) -> LRSpan | None:
        """Where ``phase`` sits in the one learning-rate schedule (None: its own schedule)."""
        if self.sched.lr_schedule != "one":
            return None
        n = self._phase_iters()
        order = list(n)
        return LRSpan(sum(n[q] for q in order[: order.index(phase)]), sum(n.values()))

    def _train(self, phase: str, cfg: TrainConfig, seed: int, rule, resume, callbacks=(), observe=None,
               save_phase: str | None = None, span: LRSpan | None = None) -> None:
        hooks = [lambda it: self.hook(phase, it)] if self.hook else []
        res = train(self.model, self.data, cfg, seed=seed, step=rule, callbacks=callbacks, progress=self.progress,
                    desc=phase, resume=resume, save=lambda m, r: self._save(save_phase or phase, r),
                    save_every=self.sched.checkpoint_every, hooks=hooks, observe=observe, span=span,
                    optimizer_state=self.carry if span is not None else None)
        if span is not None:
            self.carry = res.optimizer_state
        self.phases[phase] = res.summary() | ({"lr_span": dataclasses.asdict(span)} if span is not None else {})

    def _warmup(self, resume) -> None:
        rule = prune_rule(self.graph, self.sharp)
        self._train("warmup", dataclasses.replace(self.ft, epochs=self.sched.warmup_epochs), self.seed, rule, resume,
                    callbacks=self._keyed(rule, resume), observe=self._observe if self.value is not None else None,
                    span=self._span("warmup"))

    def _probe_batches(self):
        n = self.sched.sharpness_batches * self.ft.batch_size
        return list(self.data.batches(self.data.train, self.ft.batch_size, limit=n))

    def _probe(self, when: str) -> None:
        if self.sched.sharpness_rho > 0:
            s = distributed.on_main(lambda: measure_sharpness(self.model, self._probe_batches(),
                                                              self.sched.sharpness_rho, self.sched.sharpness_steps))
            self.sharpness.update({when: s, "rho": self.sched.sharpness_rho, "steps": self.sched.sharpness_steps,
                                   "images": self.sched.sharpness_batches * self.ft.batch_size})
            log.info("sharpness %s: %.4f (rho %.3g)", when, s, self.sched.sharpness_rho)

    def _pruning(self, resume) -> None:
        sched = self.sched
        if resume is None:  # the phase starts here: measure where pruning starts from
            self._probe("pre_pruning")
            self.p0 = count_params(self.model)
            if sched.target == "params":
                plan = distributed.on_main(lambda: build_param_plan(
                    self.graph, self.table, self.plan_cfg, max_params=int(sched.param_ratio * self.p0),
                    batches=self._scoring_batches, scores=self._accumulated_scores()[0]))
                self.m = plan.history[0]["neurons"]
                self.k = plan.history[0]["kept_neurons"] / self.m
        rule = prune_rule(self.graph, self.sharp)

        def prune_step(it: int, m: nn.Module) -> Removal | None:
            if it % sched.prune_every:
                return None
            r = it // sched.prune_every
            if self.pruner is not None:  # the latency target: the API's step, decided on one rank, made on all
                plan, target_ms, value_batches = distributed.on_main(self.pruner.next_plan)
                rec = self.pruner.apply(plan)
                target = {"latency_ms": target_ms}
                if self.pruner.removals != r:
                    raise RuntimeError(f"removal {r} of the schedule is the pruner's {self.pruner.removals}")
            else:
                plan, target, value_batches = distributed.on_main(lambda: self._param_plan_step(r))
                rec = Removal()
                apply_plan_(m, plan, self.input_shape, record=rec, graph=self.graph)
                self._changed()  # the next use traces the pruned model again
            if isinstance(rule, SharpnessStep):
                rule.rebind(self.graph)  # the parameters were replaced
            n_params = count_params(m)
            acc, loss = distributed.on_main(lambda: self._held_out_after_removal(m))
            measured = None
            if self.goal is not None and sched.measure_steps and sched.target == "latency":
                measured = distributed.on_main(lambda: (self.goal.measure_step or self.goal.measure)(m))
            self.history.append({"step": r, "iteration": it, "target": target, "target_ms": plan.target_ms,
                                 "predicted_ms": plan.predicted_ms, "predicted_ratio": plan.predicted_ms /
                                 self.table.dense_ms, "measured_ratio": measured, "params": n_params,
                                 "neurons": sum(len(g.keep) for g in plan.groups),
                                 "widths": {g.name: len(g.keep) for g in plan.groups},
                                 "val_accuracy_after_removal": acc, "val_loss_after_removal": loss,
                                 "value_minibatches": value_batches})
            log.info("prune step %d/%d: target %s, predicted %.3f ms, %d params%s", r, sched.prune_steps,
                     ", ".join(f"{k} {v:.4g}" for k, v in target.items()), plan.predicted_ms, n_params,
                     "" if acc is None else f", val accuracy {acc:.4f} right after the removal")
            return rec

        cfg_b = dataclasses.replace(self.ft, epochs=self._phase_iters()["pruning"] / self._per_epoch)
        self._train("pruning", cfg_b, self.seed + 1, rule, resume, callbacks=[prune_step, *self._keyed(rule, resume)],
                    observe=self._observe if self.value is not None else None, span=self._span("pruning"))
        if len(self.history) != sched.prune_steps:
            raise RuntimeError(f"pruning phase made {len(self.history)} of {sched.prune_steps} removals")
        self._probe("post_pruning")

    def _held_out_after_removal(self, m: nn.Module) -> tuple[float | None, float | None]:
        """(validation accuracy, mean validation cross-entropy) of the model just pruned, BatchNorm
        statistics re-estimated on fixed training batches (on a copy: training, its RNG and resume are
        unaffected): the cheapest check of what a value function removed."""
        n = self.sched.recalibrate_batches
        if not n:
            return None, None
        batches = list(self.data.batches(self.data.train, self.ft.batch_size, limit=n * self.ft.batch_size))
        return held_out_metrics(bn_recalibrated(m, batches), self.data.batches(self.data.val, 500))

    @functools.cached_property
    def _scoring_batches(self):
        """Fixed training batches a gradient criterion scores on when it has no training gradients."""
        if not self.plan_cfg.scoring_batches:
            return None
        n = self.plan_cfg.scoring_batches * self.ft.batch_size
        return list(self.data.batches(self.data.train, self.ft.batch_size, limit=n))

    @functools.cached_property
    def _held_out(self):
        """Fixed validation batches a per-width value (sensitivity) measures its loss on."""
        if not per_width(self.plan_cfg.importance):
            return None
        n = self.plan_cfg.sensitivity_batches * self.ft.batch_size
        return list(self.data.batches(self.data.val, self.ft.batch_size, limit=n))

    def _param_plan_step(self, r: int) -> tuple[PruningPlan, Any, int]:
        """The parameter target's step ``r``: its plan, its target, and how many training minibatches
        the value averaged over (0: the criterion's own scoring pass, or a criterion without data)."""
        R = self.sched.prune_steps
        scores, n = self._accumulated_scores()
        if r == R:  # land on the parameter target exactly
            budget = int(self.sched.param_ratio * self.p0)
            return build_param_plan(self.graph, self.table, self.plan_cfg, max_params=budget,
                                    batches=self._scoring_batches, scores=scores), {"params": budget}, n
        keep = int(round(self.m * self.k ** (r / R)))
        return build_param_plan(self.graph, self.table, self.plan_cfg, keep=keep,
                                batches=self._scoring_batches, scores=scores), {"neurons": keep}, n

    def _finetune(self, resume) -> None:
        ft_rule = finetune_rule(self.model, self.sharp)
        self._train("finetune", self.ft, self.seed + 2, ft_rule, resume, span=self._span("finetune"))

    def _correct(self, resume) -> None:
        """The closed loop after training: time the compact model; over the window, correct the
        end-to-end term from the measurement, re-solve on the current model, remove, fine-tune
        briefly; repeat at most ``correct_steps`` times. ``resume``: killed inside a corrective
        fine-tune, which is finished first (its removal is already in the model)."""
        goal, sched = self.goal, self.sched
        if goal is None or sched.target != "latency":
            return
        lo, hi = goal.window
        last = self.corrections[-1] if self.corrections else None
        if last is not None and last["action"] == "removed" and not last.get("finetuned"):
            self._correct_finetune(resume)  # killed after a corrective removal: finish its fine-tuning
        while True:
            ratio = float(distributed.on_main(lambda: goal.measure(self.model)))
            layers = model_layers_ms(self.graph, self.table)
            row = {"check": len(self.corrections) + 1, "measured_ratio": ratio,
                   "predicted_ratio": predicted_latency(self.graph, self.table) / self.table.dense_ms,
                   "wanted_ratio": goal.wanted_ratio, "layers_ms": layers, "params": count_params(self.model)}
            removals = sum(1 for c in self.corrections if c.get("action") == "removed")
            if ratio <= hi * goal.wanted_ratio:
                row["action"] = "under budget" if ratio < lo * goal.wanted_ratio else "accepted"
            elif removals >= sched.correct_steps:
                row["action"] = "over budget, corrective steps used up"
            else:  # the API's corrective removal: decided on one rank, made on all
                aim = (lo + hi) / 2 * goal.wanted_ratio
                plan = distributed.on_main(lambda: self.pruner.corrective_plan(ratio, aim))
                if plan is None:
                    row["action"] = "over budget, no narrower plan on the grid"
                else:
                    self.pruner.apply_correction(plan, ratio)
                    e2e = self.table.e2e  # corrected from every measurement, from the term training planned with
                    self.corrected_e2e = e2e.to_dict()
                    row.update({"action": "removed", "finetuned": False, "target_ms": aim * self.table.dense_ms,
                                "predicted_ms": plan.predicted_ms,
                                "e2e": {"intercept_ms": e2e.intercept_ms, "slope": e2e.slope},
                                "widths": {g.name: len(g.keep) for g in plan.groups},
                                "params_after": count_params(self.model)})
            self.corrections.append(row)
            log.info("budget check %d: measured %.3f of dense (wanted %.3f, accepted up to %.3f): %s", row["check"],
                     ratio, goal.wanted_ratio, hi * goal.wanted_ratio, row["action"])
            if row["action"] != "removed":
                return
            self._save("correct", None)
            self._correct_finetune(None)

    def _correct_finetune(self, resume) -> None:
        n = len(self.corrections)
        cfg = dataclasses.replace(self.ft, epochs=self.sched.correct_iters / self._per_epoch,
                                  warmup_iters=min(self.ft.warmup_iters, self.sched.correct_iters // 4))
        self._train(f"correct{n}", cfg, self.seed + 2 + n, finetune_rule(self.model, self.sharp), resume,
                    save_phase="correct")
        self.corrections[-1]["finetuned"] = True


def step_time_ratio(model: nn.Module, data: Dataset, sharp: OptimizerConfig, cfg: TrainConfig,
                    input_shape: tuple[int, int, int], steps: int = 6, rounds: int = 3) -> float:
    """Time of one step of the method's (first-phase) rule over one SGD step, interleaved on the same
    batches, on copies of the model, outside the training RNG stream."""
    if sharp.method == "sgd":
        return 1.0
    rng = np.random.default_rng(12345)
    steps = -(-steps // sharp.sam_every) * sharp.sam_every  # whole periods of the two-pass alternation
    batches = [b for _, b in zip(range(steps), data.batches(data.train, cfg.batch_size, shuffle=True, rng=rng))]
    a, b = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    rule = prune_rule(ModelGraph(a, input_shape), sharp)
    if isinstance(rule, SharpnessStep) and sharp.uses_planner_key:  # the key's values do not change the step's cost
        rule.set_neuron_keys({g.name: np.arange(g.size, dtype=float) for g in rule.neurons.groups})
    oa, ob = make_optimizer(a, cfg), make_optimizer(b, cfg)
    cpu_state = torch.get_rng_state()
    t_rule, t_sgd = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(batches):  # iterations 0..steps-1: sam_every's alternation included
            rule(a, x, y, oa, iteration=i)
        t_rule.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for x, y in batches:
            sgd_step(b, x, y, ob)
        t_sgd.append(time.perf_counter() - t0)
    torch.set_rng_state(cpu_state)
    return float(np.median(t_rule) / np.median(t_sgd))
