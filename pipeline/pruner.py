"""The Python API for a user's own training loop: :class:`LatencyPruner`, shaped like torch-pruning's
``MetaPruner`` with a latency budget instead of a pruning ratio.

    pruner = latprune.LatencyPruner(model, example_inputs, budget=0.5, runtime="ort", steps=10, every=30)
    for it, (x, y) in enumerate(loader):             # the user's loop, loss and optimizer
        loss = criterion(model(x), y); loss.backward()
        pruner.observe()                             # HALP's value from this minibatch's gradients
        optimizer.step(); optimizer.zero_grad()
        if pruner.due(it):
            pruner.step(optimizer)                   # physical removal; the optimizer follows in place
    result = pruner.verify(optimizer)                # measured latency against the budget (closed loop)

What each call does is what ``latprune run``'s schedule does (``pipeline.schedule``, AdaSAP_L's
latency target): the latency table of the model on the deployment runtime (profiled, or given),
HALP's value accumulated from the training gradients since the last removal (``importance="halp"``),
step r of R re-solving the latency knapsack over torch-pruning's coupled groups at
L_r = L_0 (L_T / L_0)^(r/R), with L_T = ``budget`` x the dense model's predicted latency, and
removing the channels physically. :meth:`LatencyPruner.verify` then times the compact model against
the dense one, interleaved on the runtime, and over the accepted window corrects the table's
end-to-end term from that measurement and removes more (the closed loop); fine-tune and verify again.

Models as users have them: any ``nn.Module`` taking one image batch; outputs a tensor, a tuple,
list, namedtuple or dict of tensors. The layers producing the outputs are never pruned on their
output side (``models.graph.output_layers``: a classifier, every head); ``ignored_layers`` (modules,
names, ``fnmatch`` patterns) are left whole too. Bad input raises
:class:`~latprune.errors.BadInput` naming the fix, before the model is touched.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from latprune.errors import BadInput, BudgetBelowFloor
from latprune.latency_tables.endtoend import PairConfig, measure_speedup, model_layers_ms, predicted_latency
from latprune.latency_tables.profile import ProfileConfig, profile_model
from latprune.latency_tables.runtimes import Backend, get_backend
from latprune.latency_tables.runtimes.convert import onnx_bytes
from latprune.latency_tables.store import LatencyStore
from latprune.latency_tables.table import LatencyTable
from latprune.models.graph import IgnoredLayer, ModelGraph
from latprune.models.outputs import input_shape_of, output_shapes
from latprune.models.surgery import Removal, follow_removal_, pruned_copy
from latprune.pipeline import distributed
from latprune.pipeline.adasap import LossFn, OptimizerConfig, SharpnessStep, cross_entropy_loss, neuron_partition
from latprune.pipeline.importance import HalpValue, group_importance, needs_batches, per_width, uses_halp
from latprune.pipeline.plan import (
    PlanConfig,
    PruningPlan,
    apply_plan_,
    build_plan,
    count_params,
    narrower_plan,
    plan_values,
    value_per_ms,
)

__all__ = ["KEY_REFRESH", "planner_key", "Verification", "LatencyPruner", "AdaSAP", "PruneResult", "prune"]

log = logging.getLogger(__name__)

MIN_OBSERVED = 1  # minibatches of gradients a halp step needs at least, without scoring batches
HALP_MINIBATCHES = 32  # HALP averages its value over min(32, every) minibatches before it trusts it
KEY_REFRESH = 10  # iterations between refreshes of AdaSAP's planner score (and after every removal)

Batches = Sequence[tuple[torch.Tensor, Any]]


def planner_key(graph: ModelGraph, table: LatencyTable, value: HalpValue | None, round_to: int,
                per_ms: bool = True) -> dict[str, np.ndarray]:
    """AdaSAP's neuron score (issue 12): every channel's value per millisecond its removal saves, at
    the current widths (``plan.value_per_ms``), so the channels the knapsack removes next get
    rho_max; ``per_ms=False`` (a parameter target, AdaSAP_P) ranks by the value alone. The value:
    HALP's, accumulated from the training gradients since the last removal (also for a per-width
    criterion, which has no per-channel score); the weights' magnitude for ``magnitude``, and before
    the first minibatch is seen."""
    scores = value.scores() if value is not None and value.batches else group_importance(graph, "magnitude")
    return value_per_ms(graph, table, scores, round_to) if per_ms else scores


@dataclasses.dataclass(frozen=True)
class Verification:
    """What :meth:`LatencyPruner.verify` measured: the compact model timed against the dense one,
    interleaved on the deployment runtime (``ratio`` = compact / dense), beside the budget.

    ``action``: ``accepted`` (within the window), ``under budget`` (below it: faster than asked),
    ``removed`` (over it: the closed loop removed more channels; fine-tune, then verify again) or
    ``over budget`` (over it, and nothing more could be removed, or ``correct=False``)."""

    measured_ratio: float
    ratio_ci95: tuple[float, float]
    predicted_ratio: float
    budget: float
    accepted_up_to: float
    dense_ms: float
    compact_ms: float
    params: int
    action: str

    @property
    def met(self) -> bool:
        return self.measured_ratio <= self.accepted_up_to

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"met": self.met}


class LatencyPruner:
    """Prune ``model`` in place to ``budget`` x its measured latency, from inside the user's loop.
    ``latprune run`` trains with this class too (``pipeline.schedule``): its removals and its closed
    loop's corrective removals are this class's :meth:`step` and :meth:`correct`.

    Args:
        model: the trained dense model (any ``nn.Module`` taking one image batch); pruned in place.
        example_inputs: one batch ``(N, C, H, W)`` as deployed: N is the deployment batch the
            latency is measured at, (C, H, W) the input the table is profiled for.
        budget: the compact model's latency as a fraction of the dense model's, in (0, 1].
        table: a :class:`LatencyTable` or the path of one (``latprune profile``) for this model and
            runtime; None profiles the model now (minutes for a ResNet; see ``profile``).
        runtime: a runtime name (``latprune.latency_tables.runtime_names()``: ``ort``, ...), a
            :class:`Backend` instance, or None (nothing is timed: :meth:`verify` is unavailable and
            ``table`` is required; a caller that measures by other means, as ``latprune run``).
        threads: the runtime's threads (a runtime name only).
        precision: what the deployed model computes in, ``fp32`` (default), ``fp16`` or ``int8``
            (a runtime name only; with a :class:`Backend`, its own precision holds): at ``int8``
            the table, the budget and :meth:`verify` speak int8 latency (QDQ models in the
            runtime's form, ``latency_tables.runtimes.quantize``); the deployed int8 file comes
            from ``latprune.export.int8.export_int8``.
        ignored_layers: modules, module names or ``fnmatch`` patterns (``"head.*"``) never pruned
            on their output side; a container is ignored whole.
        steps: removals R; the last one lands on ``target_ms``.
        every: iterations between removals (:meth:`due`).
        importance: ``halp`` (HALP's value from the gradients :meth:`observe` sees; the default) or
            ``magnitude`` (weights only, no :meth:`observe` needed); other criteria of
            ``pipeline.importance`` need ``scoring_batches`` (and a per-width one ``held_out``).
        round_to: channel multiple every pruned group keeps (8: what the kernels reward).
        profile: how a table is profiled when ``table`` is None.
        timing: how :meth:`verify` times the two models.
        window: the closed loop accepts a measured ratio up to ``window[1] x budget`` and aims at
            the window's middle when it removes more.
        target_ms: the predicted latency (the table's milliseconds) the last removal lands on;
            default ``budget`` x the dense model's predicted latency (``latprune run`` passes the
            predicted latency of the plan its closed loop validated by measurement before training).
        min_widths: per group, the narrowest width any removal leaves (``latprune run --floor-widths``
            passes that plan's widths, so the last removal lands on them).
        floor: without ``min_widths``, the first removal also solves the knapsack at ``target_ms``
            with the value observed so far (a one-shot plan) and no removal takes a group below its
            widths, so the last lands on them. False re-solves every step freely (HALP's schedule):
            on ResNet-20 at budget 0.5 that drifted to 8-channel residual streams (BENCHMARKS.md).
        scoring_batches: training batches ``(x, y)`` (or a callable returning them, called when
            first needed) a gradient criterion scores on when fewer than min(32, ``every``)
            minibatches were observed since the last removal.
        held_out: held-out batches a per-width criterion measures its losses on.
        plan_config: the planner's settings in full (:class:`~latprune.pipeline.plan.PlanConfig`);
            it carries ``importance`` and ``round_to``, so give those inside it, not beside it.
        store: the per-device latency store a profile reads and adds to
            (:class:`~latprune.latency_tables.store.LatencyStore`, or its file, e.g.
            ``~/.cache/latprune/latency-store.sqlite``, the one ``latprune`` uses); None: none.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, budget: float, *,
                 table: LatencyTable | str | os.PathLike | None = None, runtime: str | Backend | None = "ort",
                 threads: int = 2, precision: str = "fp32", ignored_layers: Iterable[IgnoredLayer] = (),
                 steps: int = 10, every: int = 30,
                 importance: str = "halp", round_to: int = 8, profile: ProfileConfig = ProfileConfig(),
                 timing: PairConfig = PairConfig(), window: tuple[float, float] = (0.90, 0.97),
                 target_ms: float | None = None, min_widths: dict[str, int] | None = None, floor: bool = True,
                 scoring_batches: Batches | Callable[[], Batches] | None = None, held_out: Batches | None = None,
                 plan_config: PlanConfig | None = None, store: LatencyStore | str | os.PathLike | None = None):
        if not isinstance(model, nn.Module):
            raise BadInput(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise BadInput(f"budget is a fraction of the dense latency in (0, 1], e.g. 0.5, got {budget!r}")
        self.input_shape = input_shape_of(example_inputs)
        for name, v in (("steps", steps), ("every", every), ("threads", threads), ("round_to", round_to)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BadInput(f"{name} must be an integer >= 1, got {v!r}")
        if not (isinstance(window, (tuple, list)) and len(window) == 2
                and all(isinstance(w, (int, float)) and not isinstance(w, bool) and np.isfinite(w) for w in window)
                and 0 < window[0] <= window[1]):
            raise BadInput(f"window must be (low, high) with 0 < low <= high, got {window!r}")
        for name, v, kind in (("profile", profile, ProfileConfig), ("timing", timing, PairConfig),
                              ("plan_config", plan_config, (PlanConfig, type(None)))):
            if not isinstance(v, kind):
                raise BadInput(f"{name} must be a {getattr(kind, '__name__', 'PlanConfig')}, got {v!r}")
        if store is not None and not isinstance(store, (LatencyStore, str, os.PathLike)):
            raise BadInput(f"store must be a LatencyStore or the path of a store file, got {type(store).__name__}")
        if table is not None and not isinstance(table, (LatencyTable, str, os.PathLike)):
            raise BadInput(f"table must be a LatencyTable or the path of a table.json, got {type(table).__name__}")
        if min_widths is not None and not (isinstance(min_widths, dict) and all(
                isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in min_widths.values())):
            raise BadInput(f"min_widths maps group names to widths >= 1, got {min_widths!r}")
        if target_ms is not None and not target_ms > 0:
            raise BadInput(f"target_ms must be a positive latency in the table's milliseconds, got {target_ms!r}")
        if plan_config is not None and (importance, round_to) != ("halp", 8):
            raise BadInput("plan_config carries importance and round_to: set them inside it, not beside it")
        self.plan_cfg = plan_config or PlanConfig(round_to=round_to, importance=importance)
        if per_width(self.plan_cfg.importance) and (held_out is None or scoring_batches is None):
            raise BadInput(f"importance {self.plan_cfg.importance!r} measures per-width losses on held-out data: "
                           "pass scoring_batches and held_out, or use 'halp' or 'magnitude'")
        if runtime is None and table is None:
            raise BadInput("runtime=None times nothing, so it cannot profile a table: pass table= (latprune profile)")
        self.model, self.budget, self.steps, self.every = model, float(budget), int(steps), int(every)
        self.ignored_layers = list(ignored_layers)
        self.timing, self.window = timing, (float(window[0]), float(window[1]))
        self.min_widths = dict(min_widths) if min_widths else None
        self.floor = bool(floor)
        self._scoring, self._held_out = scoring_batches, held_out
        self._outputs = _outputs_of(model, self.input_shape)
        self.graph = ModelGraph(model, self.input_shape, self.ignored_layers)  # names the bad ignored layer
        if not self.graph.groups:
            raise BadInput("no channel group of this model can be pruned (every layer is ignored or produces an "
                           "output): ignore fewer layers")
        names = [g.name for g in self.graph.groups]
        unknown = sorted(set(self.min_widths or ()) - set(names))
        if unknown:
            raise BadInput(f"min_widths names no channel group of this model ({', '.join(unknown[:3])}): the groups "
                           f"are {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}")
        self._check_outputs_kept()  # before a table is profiled: seconds, where profiling takes minutes
        if runtime is not None:  # a model torch.onnx refuses at this size is refused now, not after training
            onnx_bytes(model, (1, *self.input_shape))
        if runtime is None or isinstance(runtime, Backend):
            if precision != "fp32" and getattr(runtime, "precision", None) != precision:
                raise BadInput(f"precision={precision!r} applies to a runtime given by name: get_backend(..., "
                               f"precision={precision!r}) makes a runtime object that computes in it")
            self.backend = runtime
        else:
            self.backend = get_backend(runtime, threads, int(example_inputs.shape[0]), precision=precision)
        self.table = self._table(table, profile, store)
        self.dense_predicted_ms = predicted_latency(self.graph, self.table)
        self.target_ms = float(target_ms) if target_ms is not None else self.budget * self.dense_predicted_ms
        self._check_reachable()
        # what verify() times the compact model against (nothing to time without a runtime)
        self.dense = copy.deepcopy(model).cpu().eval() if self.backend is not None else None
        # HALP's value: ranks a halp plan; stands in for a per-width criterion's missing per-channel score
        imp = self.plan_cfg.importance
        self.value = HalpValue(self.graph) if uses_halp(imp) or per_width(imp) else None
        self.history: list[dict[str, Any]] = []
        self.verifications: list[Verification] = []
        self._e2e0, self._measured = self.table.e2e, []  # the closed loop corrects this term from these

    # ---- set-up checks (nothing here changes the model) ----
    def _table(self, table, profile: ProfileConfig, store) -> LatencyTable:
        if table is None:
            log.info("profiling %s on %s (no table given)", type(self.model).__name__, self.backend.name)
            with contextlib.ExitStack() as stack:
                if store is not None and not isinstance(store, LatencyStore):
                    store = stack.enter_context(LatencyStore(store))
                return profile_model(self.model, self.input_shape, self.backend, profile, progress=False,
                                     ignored=self.graph.ignored, store=store)
        if not isinstance(table, LatencyTable):
            table = LatencyTable.load(table)
        if self.backend is not None:
            table.check_compatible(self.backend.fingerprint(self.input_shape))
        missing = [p for g in self.graph.groups for p in g.producers
                   if p not in table.layer_keys and p not in table.unmeasured]
        if missing:
            raise BadInput(f"the latency table has no entry for layers {missing[:3]}: profile this model "
                           "(latprune profile, or table=None)")
        return table

    def _check_outputs_kept(self) -> None:
        """Pruning any group must leave every output's shape as it is (a head left whole); a model
        where it does not is refused here, naming the group, before anything is removed."""
        cut = {g.name: max(g.size - self.plan_cfg.round_to, 1) for g in self.graph.groups}
        if _shapes_after(self.model, cut, self.input_shape) == self._outputs:
            return
        for name, width in cut.items():
            after = _shapes_after(self.model, {name: width}, self.input_shape)
            if after != self._outputs:
                changed = next(k for k in self._outputs if after.get(k) != self._outputs[k])
                raise BadInput(f"pruning group {name} changes output {changed!r} from {self._outputs[changed]} to "
                               f"{after.get(changed)}: add the layer producing it to ignored_layers")

    def _check_reachable(self) -> None:
        try:
            weights_only = dataclasses.replace(self.plan_cfg, importance="magnitude")
            build_plan(self.graph, self.table, self.target_ms, weights_only, warn_unpruned=False)
        except BudgetBelowFloor as e:
            floor = e.floor_ms / self.dense_predicted_ms
            why = "raise the budget or ignore fewer layers"
            if self.table.unmeasured:  # layers the profiler cannot time keep their groups whole
                name, reason = next(iter(self.table.unmeasured.items()))
                why += (f"; {len(self.table.unmeasured)} layer(s) the profiler cannot measure keep their groups "
                        f"whole (e.g. {name}: {reason})")
            raise BadInput(f"budget {self.target_ms / self.dense_predicted_ms:.3f} is below the smallest latency "
                           f"this model reaches ({floor:.3f} of dense, predicted): {why}") from None

    # ---- the loop ----
    @property
    def removals(self) -> int:
        return len(self.history)

    @property
    def done(self) -> bool:
        """All ``steps`` removals made."""
        return self.removals >= self.steps

    def observe(self) -> None:
        """Add this minibatch's gradients (in ``.grad``, after ``loss.backward()`` and before
        ``optimizer.zero_grad()``) to HALP's value, reset at every removal. After the last removal it
        goes on accumulating over fine-tuning: a corrective removal (:meth:`verify`) ranks by it.
        A no-op for ``importance="magnitude"``."""
        if self.value is None:
            return
        if not any(p.grad is not None for p in self.model.parameters()):
            raise BadInput("observe() found no gradients: call it after loss.backward() and before "
                           "optimizer.zero_grad()")
        self.value.observe()

    def due(self, iteration: int) -> bool:
        """Whether a removal is due after (0-based) ``iteration``: every ``every`` iterations until
        ``steps`` removals are made."""
        return not self.done and (int(iteration) + 1) % self.every == 0

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """Make the next removal: re-solve the knapsack at this step's latency target with the value
        observed since the last removal and remove the channels it drops, physically. ``optimizer``
        (any ``torch.optim`` optimizer over the model's parameters) follows in place: its parameter
        groups point at the new parameters and its state is sliced (``models.surgery.follow_removal_``),
        so a scheduler or ``GradScaler`` holding it carries on. Under ``torch.distributed`` (a pruner
        on every rank, over ``ddp.module``) rank 0 decides and every rank removes the same channels;
        wrap the model again afterwards, on every rank: ``model = latprune.rewrap_ddp(model)`` (DDP's
        buckets hold the removed parameters). Returns this step's record (also in :attr:`history`)."""
        (plan, _, _), self.min_widths = distributed.on_main(lambda: (self.next_plan(), self.min_widths))
        self.apply(plan, optimizer)  # the floor the first decision fixed is every rank's too
        return self.history[-1]

    def next_plan(self) -> tuple[PruningPlan, float, int]:
        """The next removal's decision, nothing changed yet: (plan, its latency target, the observed
        minibatches its value averaged over; 0 for a scoring pass or a weights-only criterion).
        Step r of R aims at L_r = L_0 (L_T / L_0)^(r/R). :meth:`step` is ``apply(next_plan()[0])``;
        under torchrun one rank decides and every rank applies."""
        if self.done:
            raise BadInput(f"all {self.steps} removals are made: check pruner.due(it) or pruner.done before step()")
        r = self.removals + 1
        target = self.dense_predicted_ms * (self.target_ms / self.dense_predicted_ms) ** (r / self.steps)
        kw, observed = self._value_kw(correcting=False)
        if self.min_widths is None and self.floor:  # the one-shot plan every removal stays at or above
            final = build_plan(self.graph, self.table, self.target_ms, self.plan_cfg, warn_unpruned=False, **kw)
            self.min_widths = {g.name: len(g.keep) for g in final.groups}
        plan = build_plan(self.graph, self.table, target, self.plan_cfg, min_widths=self.min_widths,
                          warn_unpruned=False, **kw)
        return plan, target, observed

    def apply(self, plan: PruningPlan, optimizer: torch.optim.Optimizer | None = None) -> Removal:
        """Remove what ``plan`` (from :meth:`next_plan`) drops as the next removal step; ``optimizer``
        follows as in :meth:`step`. Returns what every touched layer kept."""
        rec = self._remove(plan, optimizer)
        r = self.removals + 1
        self.history.append({"step": r, "target_ms": plan.target_ms, "predicted_ms": plan.predicted_ms,
                             "predicted_ratio": plan.predicted_ms / self.dense_predicted_ms,
                             "params": count_params(self.model), "widths": {g.name: len(g.keep) for g in plan.groups}})
        log.info("removal %d/%d: predicted %.3f of dense, %d parameters", r, self.steps,
                 self.history[-1]["predicted_ratio"], self.history[-1]["params"])
        return rec

    def correct(self, measured_ratio: float, aim_ratio: float,
                optimizer: torch.optim.Optimizer | None = None) -> Removal | None:
        """The closed loop's corrective removal, for a model measured at ``measured_ratio`` of the
        dense latency, over what was asked: the table's end-to-end term (the one training planned
        with) is corrected from every measurement so far, the knapsack re-solved on the current model
        at ``aim_ratio`` on that measured scale, and the channels removed (``optimizer`` follows).
        Returns the removal, or None when no narrower plan exists (nothing changed). :meth:`verify`
        calls it; ``latprune run``'s corrective phase, which times by its own means, calls its two
        halves (:meth:`corrective_plan` on one rank, :meth:`apply_correction` on every rank)."""
        plan = distributed.on_main(lambda: self.corrective_plan(measured_ratio, aim_ratio))
        return None if plan is None else self.apply_correction(plan, measured_ratio, optimizer)

    def corrective_plan(self, measured_ratio: float, aim_ratio: float) -> PruningPlan | None:
        """:meth:`correct`'s decision, nothing changed: the plan on the corrected table, or None."""
        table, _ = self._corrected(measured_ratio)
        kw, _ = self._value_kw(correcting=True)
        values = plan_values(self.graph, self.plan_cfg, kw.get("batches"), kw.get("held_out"), kw.get("scores"))
        return narrower_plan(self.graph, table, aim_ratio * self.table.dense_ms, self.plan_cfg, values=values)

    def apply_correction(self, plan: PruningPlan, measured_ratio: float,
                         optimizer: torch.optim.Optimizer | None = None) -> Removal:
        """Keep the measurement, plan from now on with the corrected table, remove what ``plan``
        (from :meth:`corrective_plan` with the same measurement) drops."""
        table, point = self._corrected(measured_ratio)
        self._measured.append(point)
        self.table = table
        return self._remove(plan, optimizer)

    def _corrected(self, measured_ratio: float) -> tuple[LatencyTable, dict[str, float]]:
        point = {"layers_ms": model_layers_ms(self.graph, self.table),
                 "measured_ms": measured_ratio * self.table.dense_ms}
        return self.table.with_e2e(self._e2e0.corrected([*self._measured, point])), point

    def verify(self, optimizer: torch.optim.Optimizer | None = None, correct: bool = True) -> Verification:
        """Time the model against the dense one on the runtime (interleaved, ``timing``). Over the
        accepted window and with ``correct``, close the loop (:meth:`correct`, aiming at the window's
        middle; ``optimizer`` follows); fine-tune and call ``verify`` again."""
        if self.backend is None:
            raise BadInput("this pruner has no runtime to time on: construct it with runtime= (e.g. 'ort')")
        was_training = self.model.training
        compact = copy.deepcopy(self.model).cpu().eval()
        self.model.train(was_training)
        # under torch.distributed rank 0 times, every rank acts on its measurement
        speed = distributed.on_main(lambda: measure_speedup(self.backend, self.dense, compact, self.input_shape,
                                                            self.timing))
        lo, hi = self.window
        predicted = self.table.e2e.predict(model_layers_ms(self.graph, self.table)) / self.dense_predicted_ms
        params = count_params(self.model)  # of the model measured (a correction below removes more)
        if speed.ratio <= hi * self.budget:
            action = "under budget" if speed.ratio < lo * self.budget else "accepted"
        elif not correct or self.correct(speed.ratio, (lo + hi) / 2 * self.budget, optimizer) is None:
            action = "over budget"
        else:
            action = "removed"
        v = Verification(speed.ratio, tuple(1 / x for x in reversed(speed.speedup_ci95)), predicted, self.budget,
                         hi * self.budget, speed.dense["median_ms"], speed.compact_ms, params, action)
        self.verifications.append(v)
        log.info("verify: measured %.3f of dense (budget %.3f, accepted up to %.3f): %s", v.measured_ratio,
                 self.budget, v.accepted_up_to, action)
        return v

    # ---- checkpoints (latprune run resumes a killed run bit for bit) ----
    def state_dict(self) -> dict[str, Any]:
        """What continues this pruner on the model as it is now (its widths and weights are the
        caller's to save): removals made, the latency anchors, the closed loop's measurements and
        the value accumulated since the last removal. Plain types and tensors (``torch.save``)."""
        value = None if self.value is None else {
            "sums": {k: torch.from_numpy(v.copy()) for k, v in self.value.sums.items()}, "batches": self.value.batches}
        return {"history": copy.deepcopy(self.history), "dense_predicted_ms": self.dense_predicted_ms,
                "target_ms": self.target_ms, "min_widths": self.min_widths, "measured": copy.deepcopy(self._measured),
                "value": value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`, on a pruner built over the model as it was saved."""
        self.history = copy.deepcopy(state["history"])
        self.dense_predicted_ms, self.target_ms = float(state["dense_predicted_ms"]), float(state["target_ms"])
        self.min_widths = state["min_widths"]
        self._measured = copy.deepcopy(state["measured"])
        if self._measured:
            self.table = self.table.with_e2e(self._e2e0.corrected(self._measured))
        if self.value is not None and state.get("value") is not None:
            sums = {k: v.numpy().copy() for k, v in state["value"]["sums"].items()}
            if {k: len(v) for k, v in sums.items()} != self.value.sizes:
                raise BadInput("the pruner's saved value is for other widths: load the model as it was saved first")
            self.value.sums, self.value.batches = sums, int(state["value"]["batches"])

    # ---- internals ----
    def _value_kw(self, correcting: bool) -> tuple[dict[str, Any], int]:
        """How the next plan gets its value: HALP's, from the minibatches observed since the last
        removal once min(32, ``every``) were (HALP's averaging); else a scoring pass over
        ``scoring_batches`` (and ``held_out`` for a per-width criterion) when given; else the observed
        value however short, or, for a corrective removal after fine-tuning (nothing observed since
        the last removal), the weights' magnitude. Returns (``build_plan`` keywords, minibatches)."""
        v, imp = self.value, self.plan_cfg.importance
        if uses_halp(imp) and v is not None and v.batches >= min(HALP_MINIBATCHES, self.every):
            return {"scores": v.scores()}, v.batches
        batches = self._scoring() if callable(self._scoring) else self._scoring
        if batches is not None or not needs_batches(imp):
            return {"batches": batches, "held_out": self._held_out}, 0
        if uses_halp(imp) and v is not None and v.batches >= MIN_OBSERVED:
            return {"scores": v.scores()}, v.batches
        if correcting:
            return {"scores": group_importance(self.graph, "magnitude")}, 0
        if uses_halp(imp):
            raise BadInput("no gradients observed since the last removal: call pruner.observe() after each "
                           "loss.backward() (or use importance='magnitude')")
        raise BadInput(f"importance {imp!r} needs data: pass scoring_batches, or use 'halp' with observe()")

    def _remove(self, plan: PruningPlan, optimizer: torch.optim.Optimizer | None) -> Removal:
        before, rec = dict(self.model.named_parameters()), Removal()
        apply_plan_(self.model, plan, self.input_shape, record=rec, graph=self.graph)
        if optimizer is not None:
            follow_removal_(optimizer, before, self.model, rec)
        self.graph = ModelGraph(self.model, self.input_shape, self.ignored_layers)
        self.value = HalpValue(self.graph) if self.value is not None else None
        return rec


class AdaSAP:
    """AdaSAP's step rule (the paper's Algorithm 2, ``pipeline.adasap``) for a user's loop around a
    :class:`LatencyPruner`: while removals remain, each neuron is perturbed within its own radius,
    rho_max for the channels the pruner's knapsack would remove next (their value per millisecond
    saved, refreshed every :data:`KEY_REFRESH` steps and after every
    removal) down to rho_min for the ones it keeps longest; once the pruner is done, uniform ASAM
    (the paper's robustness-encouraging fine-tuning). Each call is one optimisation step:

        adasap = latprune.AdaSAP(pruner)
        for it, (x, y) in enumerate(loader):
            loss = adasap.step(x, y, optimizer)     # two passes, observes for the pruner, optimizer.step()
            if pruner.due(it):
                pruner.step(optimizer)

    Args:
        pruner: the :class:`LatencyPruner` whose model and plan the radii follow.
        rho_max, rho_min: the per-neuron radii (the default 0.1 with per-neuron normalisation:
            README, "AdaSAP radii").
        rho_norm: ``neuron`` (eq. 4 per neuron) or ``global`` (one norm over all neurons).
        rho: ASAM's uniform radius for fine-tuning and for parameters outside any neuron.
        sam_every: the two-pass step every K-th call, a plain step of the optimizer between.
        loss_fn: ``loss_fn(model, x, y) -> loss``; cross-entropy on the model's output by default
            (a multi-output model needs its own).
    """

    def __init__(self, pruner: LatencyPruner, *, rho_max: float = 0.1, rho_min: float = 0.01,
                 rho_norm: str = "neuron", rho: float = 0.5, sam_every: int = 1,
                 loss_fn: LossFn = cross_entropy_loss):
        self.pruner, self.loss_fn = pruner, loss_fn
        self.cfg = OptimizerConfig(method="adasap", rho=rho, rho_min=rho_min, rho_max=rho_max, normalize=rho_norm,
                                   sam_every=sam_every)
        self._rule = SharpnessStep(pruner.model, self.cfg, neuron_partition(pruner.graph), loss_fn=loss_fn)
        self._graph = pruner.graph
        self._finetune: SharpnessStep | None = None
        self.iteration = 0

    def step(self, x: torch.Tensor, y: Any, optimizer: torch.optim.Optimizer) -> float:
        """One step on batch ``(x, y)``: gradients (both passes), ``pruner.observe()`` on the first
        pass's, ``optimizer.step()``. Do not call ``observe`` yourself as well. Returns the loss."""
        p = self.pruner
        if p.done:
            if self._finetune is None:
                self._finetune = SharpnessStep(p.model, dataclasses.replace(self.cfg, method="asam"),
                                               loss_fn=self.loss_fn)
            rule, observe = self._finetune, None
        else:
            if p.graph is not self._graph:  # a removal replaced the parameters
                self._rule.rebind(p.graph)
                self._graph = p.graph
            if self._rule.keys is None or self.iteration % KEY_REFRESH == 0:
                self._rule.set_neuron_keys(planner_key(p.graph, p.table, p.value, p.plan_cfg.round_to))
            rule, observe = self._rule, p.observe
        loss = rule(p.model, x, y, optimizer, observe, self.iteration)
        self.iteration += 1
        return loss


@dataclasses.dataclass
class PruneResult:
    """What :func:`prune` did: the last verification, every removal, ``eval_fn`` before and after."""

    verification: Verification
    verifications: list[Verification]
    history: list[dict[str, Any]]
    before: Any
    after: Any
    dense_params: int
    params: int


def prune(model: nn.Module, example_inputs: torch.Tensor, budget: float, *, train_fn: Callable[[nn.Module], Any],
          eval_fn: Callable[[nn.Module], Any] | None = None, optimizer: torch.optim.Optimizer | None = None,
          lr: float = 0.01, steps: int = 10, every: int = 30, finetune: int = 300, corrections: int = 2,
          **pruner_kw: Any) -> PruneResult:
    """Prune ``model`` in place to ``budget`` in one call, for those who pass callbacks rather than
    write the loop: :class:`LatencyPruner`'s removals, then fine-tuning, then the closed loop.

    Args:
        model, example_inputs, budget: as :class:`LatencyPruner`.
        train_fn: ``train_fn(model) -> loss``: the loss (a scalar tensor, not yet backpropagated) of
            the next training minibatch; called once per iteration, the model in train mode.
        eval_fn: ``eval_fn(model) -> anything`` (e.g. validation accuracy), called before pruning
            and at the end; None skips it.
        optimizer: over ``model``'s parameters; default SGD (``lr``, momentum 0.9, weight decay 5e-4).
            It follows every removal in place.
        steps, every: removals and the iterations between them (``steps x every`` iterations).
        finetune: iterations after the last removal, and after each corrective removal.
        corrections: corrective removals :meth:`LatencyPruner.verify` may make at most.
        **pruner_kw: the other arguments of :class:`LatencyPruner` (``table``, ``runtime``,
            ``ignored_layers``, ``importance``, ``round_to``, ...).

    Returns:
        :class:`PruneResult`.
    """
    pruner = LatencyPruner(model, example_inputs, budget, steps=steps, every=every, **pruner_kw)
    before = eval_fn(model) if eval_fn is not None else None
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)

    def run(iterations: int) -> None:
        model.train()
        for it in range(iterations):
            train_fn(model).backward()
            pruner.observe()
            opt.step()
            opt.zero_grad()
            if pruner.due(it):
                pruner.step(opt)

    run(steps * every + finetune)
    v = pruner.verify(opt, correct=corrections > 0)
    for check in range(corrections):
        if v.action != "removed":
            break
        run(finetune)
        v = pruner.verify(opt, correct=check + 1 < corrections)  # the last check removes nothing untrained
    return PruneResult(v, list(pruner.verifications), pruner.history, before,
                       eval_fn(model) if eval_fn is not None else None, count_params(pruner.dense), count_params(model))


def _outputs_of(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Every output's shape for a batch of ``input_shape``; a model that cannot run on it is bad input."""
    try:
        return output_shapes(model, input_shape)
    except BadInput:
        raise
    except Exception as e:  # the user's forward on the user's example: its failure is about that input
        raise BadInput(f"model(example_inputs) fails ({type(e).__name__}: {str(e)[:120]}): pass one batch of the "
                       "images the model takes, shaped (N, C, H, W)") from e


def _shapes_after(model: nn.Module, widths: dict[str, int], input_shape: tuple[int, ...]) -> dict[str, tuple]:
    probe = pruned_copy(model, widths, input_shape)
    return output_shapes(probe, input_shape)
