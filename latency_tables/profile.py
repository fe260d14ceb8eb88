"""Stage 1: profile a model's prunable layers into a :class:`LatencyTable`.

Every conv and linear layer is measured as it runs deployed (conv + folded BN + activation) on a
(c_in, c_out) grid at multiples of ``step`` up to its dense widths, at the deployment batch and
input size. Layers with identical signatures are measured once. Then the whole model: the dense
model, the smallest plan and a few random plans are timed end to end, and the table's end-to-end
term is fitted on them (``latency_tables.endtoend``), so a prediction is of the whole model.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from latprune.errors import BadInput
from latprune.latency_tables.endtoend import PairConfig, fit_end_to_end
from latprune.latency_tables.predict import LatencyModel
from latprune.latency_tables.runtimes import Backend
from latprune.latency_tables.sampling import (
    AxisGrid,
    LayerGrid,
    detect_period,
    period_window,
    refine,
    spread,
    step_tops,
)
from latprune.latency_tables.store import Entry, LatencyStore, device_key, shape_key
from latprune.latency_tables.table import EndToEnd, LatencyTable, LayerSignature, LayerTable, step_top
from latprune.models.graph import IgnoredLayer, ModelGraph

__all__ = ["SAMPLINGS", "ProfileConfig", "layer_signatures", "isolated_outliers", "fixed_axes", "check_axes",
           "profile_model", "lines_through", "check_layers"]

log = logging.getLogger(__name__)

SAMPLINGS = ("auto", "grid", "adaptive")  # how a layer's (c_in, c_out) grid is chosen (CLI --sampling)
AUTO_GRID_LIMIT = 1000  # "auto": the full grid up to this many entries (~5 min on 2 CPU cores), else adaptive
ADAPTIVE_ONLY = ("sampling", "coarse", "refine_tol", "refine_budget", "max_minutes")
ETA_AFTER_S = 60.0  # the profiler's ETA comes from the rate over this first stretch


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    step: int = 8  # grid step in channels; use round_to so the knapsack sees every choice it can make
    rounds: int = 3  # interleaved rounds per table entry
    min_round_s: float = 0.02  # each round of an entry lasts at least this long
    max_cv: float = 0.10  # entries noisier than this (CV of round medians) are measured again
    model_rounds: int = 5  # rounds for the dense end-to-end measurement
    model_min_round_s: float = 0.3
    fit_configs: int = 8  # random pruned configurations the end-to-end term is fitted on (plus the smallest)
    fit_rounds: int = 7  # interleaved rounds (against the dense model) per configuration
    fit_round_s: float | None = None  # seconds per round; None: 10 x min_round_s
    validate: int = 0  # random pruned configurations timed end to end to measure the prediction error
    # "grid": every candidate pair; "adaptive": step period, coarse grid, refinement (latency_tables.sampling);
    # "auto": grid where it has at most AUTO_GRID_LIMIT entries, adaptive above
    sampling: str = "auto"
    coarse: int = 4  # adaptive: step tops per axis in the coarse grid
    refine_tol: float = 0.03  # adaptive: neighbours closer than this (relative, or their noise) agree
    refine_budget: float = 1.0  # adaptive: refinement entries, as a multiple of the coarse pass's
    max_minutes: float | None = None  # adaptive: stop refining (never the coarse pass) after this long

    def __post_init__(self):
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"profile sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}")
        if self.coarse < 2 or self.refine_tol <= 0 or self.refine_budget < 0:
            raise ValueError("adaptive sampling needs coarse >= 2 widths per axis, refine_tol > 0 and "
                             "refine_budget >= 0")
        if self.max_minutes is not None and not (self.max_minutes > 0 and math.isfinite(self.max_minutes)):
            raise ValueError(f"--max-minutes must be a positive number of minutes, got {self.max_minutes}")
        if self.max_minutes is not None and self.sampling == "grid":
            raise ValueError("--max-minutes bounds the adaptive refinement: drop --sampling grid (the full grid has "
                             "no refinement to stop)")
        if self.step < 1:
            raise ValueError(f"profile step must be >= 1 channel, got {self.step}")
        if self.rounds < 1 or self.model_rounds < 1:
            raise ValueError("profile rounds must be >= 1")
        if self.min_round_s <= 0 or self.model_min_round_s <= 0 or (self.fit_round_s or 1) <= 0:
            raise ValueError("profile round durations must be > 0 seconds")
        if self.fit_configs < 0 or self.fit_rounds < 1:
            raise ValueError("profile fit_configs must be >= 0 and fit_rounds >= 1")
        if self.validate < 0:
            raise ValueError(f"--validate needs K >= 0 configurations, got {self.validate}")

    def measurement_key(self) -> dict:
        """The settings that change what the table holds (validation only adds its error)."""
        d = dataclasses.asdict(self)
        d.pop("validate")
        if self.sampling == "grid":  # the adaptive settings change nothing on the full grid
            for k in ADAPTIVE_ONLY:
                d.pop(k)
        return d

    @property
    def pair(self) -> PairConfig:
        """How each pruned configuration is timed against the dense model for the fit and validation."""
        return PairConfig(rounds=self.fit_rounds, min_round_s=self.fit_round_s or 10 * self.min_round_s,
                          repeats=1, max_repeats=2)


def layer_signatures(model: nn.Module, input_shape: tuple[int, int, int],
                     unmeasured: dict[str, str] | None = None) -> dict[str, LayerSignature]:
    """Signature of every Conv2d and Linear layer, with the input size seen in a forward pass.

    Layers the profiler cannot measure (grouped but not depthwise convs, 1-D/3-D and transposed
    convs, linears on more than 2-D input) and layers the eval-mode forward never runs (training-only
    auxiliary heads) go into ``unmeasured`` with the reason; the planner leaves the groups they
    produce unpruned.
    """
    sigs: dict[str, LayerSignature] = {}
    hooks = []
    unmeasured = {} if unmeasured is None else unmeasured

    def hook(name):
        def fn(mod, inputs, _out):
            x = inputs[0]
            if isinstance(mod, nn.Conv2d):
                depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
                if mod.groups > 1 and not depthwise:
                    kind = None
                    unmeasured[name] = f"grouped convolution (groups={mod.groups}, not depthwise)"
                else:
                    kind = "dwconv" if depthwise else "conv"
                if kind:
                    sigs[name] = LayerSignature(
                        kind, mod.in_channels, mod.out_channels, tuple(mod.kernel_size), tuple(mod.stride),
                        tuple(mod.padding), tuple(mod.dilation), tuple(x.shape[-2:]), "relu",
                    )
            elif isinstance(mod, nn.Linear):
                if x.dim() == 2:
                    sigs[name] = LayerSignature("linear", mod.in_features, mod.out_features, activation="none")
                else:
                    unmeasured[name] = f"linear layer on {x.dim()}-D input"

        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            hooks.append(mod.register_forward_hook(hook(name)))
        elif isinstance(mod, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            unmeasured[name] = f"{type(mod).__name__} (the profiler measures Conv2d and Linear)"
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and name not in sigs and name not in unmeasured:
            unmeasured[name] = "not run at inference (a training-only branch, e.g. auxiliary logits): costs no latency"
    return sigs


def isolated_outliers(med: np.ndarray, high: float = 1.25, low: float = 0.8) -> list[tuple[int, int]]:
    """Grid entries that break monotonicity by a margin: above ``high`` x an entry with more
    channels (the next one along either axis), or below ``low`` x an entry with fewer.

    Latency does not fall as channels are added (a staircase at worst), so such an entry is a
    measurement that went wrong, or its neighbour is: both are measured again.
    """
    out = []
    n_i, n_o = med.shape
    for i in range(n_i):
        for o in range(n_o):
            up = [med[a, b] for a, b in ((i + 1, o), (i, o + 1)) if a < n_i and b < n_o]
            down = [med[a, b] for a, b in ((i - 1, o), (i, o - 1)) if a >= 0 and b >= 0]
            if (up and med[i, o] > high * max(up)) or (down and med[i, o] < low * min(down)):
                out.append((i, o))
    return out


def fixed_axes(graph: ModelGraph, layers) -> dict[str, list[str]]:
    """For each of ``layers`` (table layers of ``graph.model``), the channel axes no plan on this graph
    can change: ``out`` when no prunable group prunes its outputs, ``in`` when none feeds its inputs
    (a depthwise layer's input follows its output). The profiler measures such an axis at its dense
    width only; a plan on a graph that could change it needs a new table."""
    lw = graph.layer_widths(layers)
    out = {}
    for name in lw.dense:
        axes = [a for a, free in (("in", name in lw.in_groups or (name in lw.depthwise and name in lw.out_group)),
                                  ("out", name in lw.out_group)) if not free]
        if axes:
            out[name] = axes
    return out


def check_axes(graph: ModelGraph, table: LatencyTable) -> None:
    """Refuse a table that measured an axis at one width where a plan on ``graph`` can change it
    (the table was profiled with more layers ignored than this graph ignores)."""
    fixed = table.meta.get("fixed_axes") or {}
    if not fixed:
        return
    now = fixed_axes(graph, [n for n in table.layer_keys if n in dict(graph.model.named_modules())])
    wrong = sorted(n for n, axes in fixed.items() if set(axes) - set(now.get(n, ())))
    if wrong:
        raise BadInput(f"the latency table measured layer {wrong[0]} (and {len(wrong) - 1} more) at its dense width "
                       f"only (profiled with ignored layers {table.meta.get('ignored', [])}), but this plan may change "
                       "it: profile again with the same ignored layers as the plan")


class _Entries:
    """The layer entries of one profile: measured once each, taken from the latency store where it
    has them (and written to it as they are measured), with the progress bar and the ETA."""

    def __init__(self, backend: Backend, cfg: ProfileConfig, unique: dict[str, LayerSignature],
                 store: LatencyStore | None, input_shape, progress: bool):
        self.backend, self.cfg, self.unique, self.store = backend, cfg, unique, store
        self.f: dict[tuple[str, int, int], tuple[float, float]] = {}  # (key, c_in, c_out) -> (median ms, cv)
        self.count: dict[tuple[str, int, int], int] = {}
        self.dev = device_key(backend.fingerprint(input_shape)) if store is not None else ""
        self.stored = {k: store.get_layer(self.dev, shape_key(s)) for k, s in unique.items()} if store else {}
        self.new = self.reused = 0
        self.bar = tqdm(total=0, desc="profile", unit="entry", disable=not progress)
        self.t0 = time.monotonic()
        self.eta_said = False
        self.warmed = False

    def in_store(self, key: str, c_in: int, c_out: int) -> bool:
        return (c_in, c_out) in self.stored.get(key, {})

    def plan(self, entries: list[tuple[str, int, int]], what: str) -> None:
        """Say how many entries ``what`` needs and how many of them the store already has."""
        todo = [e for e in dict.fromkeys(entries) if e not in self.f]
        have = sum(self.in_store(*e) for e in todo)
        self.bar.total += len(todo)
        self.bar.refresh()
        log.info("%s: %d entries planned, %d of them in the latency store, %d to measure", what, len(todo), have,
                 len(todo) - have)

    def __call__(self, key: str, c_in: int, c_out: int) -> tuple[float, float]:
        at = (key, c_in, c_out)
        if at in self.f:
            return self.f[at]
        hit = self.stored.get(key, {}).get((c_in, c_out))
        if hit is not None:
            self.f[at], self.count[at] = (hit.median_ms, hit.cv), hit.count
            self.reused += 1
        else:
            self.measure(key, c_in, c_out, self.cfg.rounds)
            self.new += 1
            self._eta()
        self.bar.update(1)
        return self.f[at]

    def measure(self, key: str, c_in: int, c_out: int, rounds: int) -> None:
        """Time one entry now (again, if it was measured), keep it and store it."""
        cfg, s = self.cfg, self.unique[key]
        if not self.warmed:  # a throwaway measurement: the first one in a process can be 2x slow
            self.backend.measure([self.backend.layer_runner(s, 1, 1)], 1, cfg.min_round_s)
            self.warmed = True
        runner = self.backend.layer_runner(s, c_in, c_out)
        t = self.backend.measure([runner], rounds, cfg.min_round_s)[0]
        if t.cv > cfg.max_cv:  # noisy: measure again, longer, and keep the steadier of the two
            t2 = self.backend.measure([runner], 2 * rounds, cfg.min_round_s)[0]
            t = t2 if t2.cv < t.cv else t
        at = (key, c_in, c_out)
        self.f[at], self.count[at] = (t.median_ms, t.cv), int(t.samples.size)
        if self.store is not None:
            self.store.put(self.dev, shape_key(s), c_in, c_out, Entry(t.median_ms, t.cv, int(t.samples.size)))

    def _eta(self) -> None:
        elapsed = time.monotonic() - self.t0
        if self.eta_said or elapsed < ETA_AFTER_S:
            return
        self.eta_said = True
        left = max(self.bar.total - self.bar.n - 1, 0)
        rate = self.new / elapsed
        log.info("profile: %d entries measured in the first %.0f s (%.1f/s); %d planned entries left: about %.0f "
                 "min more at this rate (entries in the store cost nothing)", self.new, elapsed, rate, left,
                 left / rate / 60)

    def close(self) -> None:
        self.bar.close()
        log.info("profile: %d entries measured, %d taken from the latency store, in %.0f s", self.new, self.reused,
                 time.monotonic() - self.t0)


def profile_model(model: nn.Module, input_shape: tuple[int, int, int], backend: Backend,
                  cfg: ProfileConfig = ProfileConfig(), progress: bool = True,
                  ignored: Iterable[IgnoredLayer] = (), store: LatencyStore | None = None) -> LatencyTable:
    """Every Conv2d and Linear layer of ``model`` timed alone on ``backend`` over a grid of widths
    (``cfg.sampling``: every pair at ``cfg.step`` spacing, or an adaptive grid,
    ``latency_tables.sampling``), the dense model end to end, and the end-to-end term fitted on
    pruned configurations of the groups the planner may shrink (``ignored`` layers and the output
    layers stay whole in them, as in every plan: ``models.graph.ModelGraph``). An axis no plan can
    change (:func:`fixed_axes`) is measured at its dense width only. With a ``store``
    (``latency_tables.store``), entries it holds for this device are not measured again, and new
    ones are added to it as they are measured (a killed profile keeps them)."""
    graph = ModelGraph(model, input_shape, ignored)  # an untraceable model fails here, before any timing
    unmeasured: dict[str, str] = {}
    sigs = layer_signatures(model, input_shape, unmeasured)
    if not sigs:
        raise BadInput("the model has no Conv2d or Linear layer the profiler can measure: nothing to prune")
    fixed = fixed_axes(graph, sigs)
    for name, why in unmeasured.items():
        log.warning("layer %s is not profiled (%s): it stays unpruned", name, why)
    narrow = sorted(n for n, s in sigs.items() if s.kind != "linear" and max(s.c_in, s.c_out) <= cfg.step
                    and s.c_out > 1)
    if narrow and len(narrow) == len(sigs):
        raise BadInput(f"--profile-step {cfg.step} is not smaller than any layer's width: every layer would be "
                       "measured at its full width only; lower --profile-step")
    if narrow:
        log.warning("%d layer(s) are no wider than the grid step %d and are measured at full width only "
                    "(e.g. %s): lower --profile-step to see them shrink", len(narrow), cfg.step, narrow[0])
    unique: dict[str, LayerSignature] = {}
    for s in sigs.values():
        unique.setdefault(s.key, s)
    # an axis no plan can change (no prunable group reaches it, in any layer of the signature) is
    # measured at its dense width only
    varies = {key: ({"in", "out"} - set.intersection(*[set(fixed.get(n, ())) for n, t in sigs.items() if t.key == key]))
              for key in unique}
    entries = _Entries(backend, cfg, unique, store, input_shape, progress)
    mode = cfg.sampling
    if mode == "auto":
        full = sum(len(ci) * len(co) for ci, co in (_axis_widths(s, varies[k], cfg.step) for k, s in unique.items()))
        mode = "adaptive" if full > AUTO_GRID_LIMIT else "grid"
        log.info("--sampling auto: the full grid at step %d has %d entries: %s sampling (--sampling grid or "
                 "adaptive chooses)", cfg.step, full, mode)
    log.info("profiling %d layers (%d signatures, %s sampling) on %s", len(sigs), len(unique), mode, backend.name)
    try:
        if mode == "adaptive":
            axes, periods, sampling = _adaptive(sigs, unique, varies, cfg, entries)
        else:
            axes, periods, sampling = _full_grid(unique, varies, cfg, entries), {}, None
        grids = {}
        for key, (ci, co) in axes.items():
            shape = (len(ci), len(co))
            med, cv, cnt = np.zeros(shape), np.zeros(shape), np.zeros(shape, int)
            for i, c_in in enumerate(ci):
                for o, c_out in enumerate(co):
                    med[i, o], cv[i, o] = entries(key, _c_in(unique[key], c_in, c_out), c_out)
                    cnt[i, o] = entries.count[(key, _c_in(unique[key], c_in, c_out), c_out)]
            grids[key] = (ci, co, med, cv, cnt)
        # An entry can be steady within itself and still wrong (the machine was slow for its whole
        # measurement): entries that break monotonicity against a grid neighbour are measured again.
        spikes = [(key, i, o) for key, g in grids.items() for i, o in isolated_outliers(g[2])]
        for key, i, o in spikes:
            ci, co, med, cv, cnt = grids[key]
            c_in = _c_in(unique[key], ci[i], co[o])
            entries.measure(key, c_in, co[o], 2 * cfg.rounds)
            (med[i, o], cv[i, o]), cnt[i, o] = entries.f[(key, c_in, co[o])], entries.count[(key, c_in, co[o])]
        if spikes:
            log.info("re-measured %d entries that broke monotonicity", len(spikes))
    finally:
        entries.close()

    dense = backend.measure([backend.model_runner(model, input_shape)], cfg.model_rounds, cfg.model_min_round_s)[0]
    layers = {k: LayerTable(unique[k], g[0], g[1], g[2], g[3], g[4], *periods.get(k, (1, 1)))
              for k, g in grids.items()}
    layer_keys = {name: s.key for name, s in sigs.items()}
    covered = sum(layers[layer_keys[n]].lookup(s.c_in, s.c_out) for n, s in sigs.items())
    log.info("dense %.3f ms end to end; layer tables sum to %.3f ms", dense.median_ms, covered)
    meta = {"profile": dataclasses.asdict(cfg), "dense": dense.summary(),
            "entries": int(sum(g[2].size for g in grids.values())), "measured": entries.new,
            "from_store": entries.reused, "remeasured_outliers": len(spikes),
            "unmeasured": unmeasured, "fixed_axes": fixed, "ignored": list(graph.ignored)}
    meta["sampling_mode"] = mode
    if sampling is not None:
        meta["sampling"] = sampling
    table = LatencyTable(
        fingerprint=backend.fingerprint(input_shape),
        layers=layers,
        layer_keys=layer_keys,
        dense_ms=dense.median_ms,
        e2e=EndToEnd.fit([{"label": "dense", "layers_ms": covered, "measured_ms": dense.median_ms}]),
        meta=meta,
    )
    # the smallest plan is always among the fit's points: it anchors the floor the knapsack sees
    return table.with_e2e(fit_end_to_end(graph, table, backend, cfg.fit_configs, cfg.step,
                                         cfg.pair, progress=progress))


def lines_through(graph: ModelGraph, table: LatencyTable, layer_channels: dict[str, tuple[int, int]],
                  backend: Backend, cfg: ProfileConfig = ProfileConfig(),
                  store: LatencyStore | None = None) -> tuple[LatencyTable, dict]:
    """The table with a grid line measured through each width a plan gives a layer where the table
    only interpolates (``layer_channels``: layer -> (c_in, c_out), as ``PruningPlan.layer_channels``).

    The knapsack picks the widths where an interpolated table flatters most (a staircase's cheap
    side between two grid points), so those are the widths worth measuring: on each axis of each
    signature whose grid lacks the width (raised to its step's top), a new row or column, every
    entry of it measured (or taken from ``store``) as the profile measures. The end-to-end term is
    then refitted on its own timed points, their layer sums recomputed from the new grid (no model
    is timed again). Returns the table (``table`` itself when nothing was missing) and what was
    done: ``lines`` added, entries ``measured`` and ``from_store``, ``layers`` touched."""
    want: dict[str, tuple[set[int], set[int]]] = {}
    for name, (c_in, c_out) in layer_channels.items():
        key = table.layer_keys.get(name)
        if key is None:
            continue
        lt = table.layers[key]
        d = lt.signature
        ins, outs = want.setdefault(key, (set(), set()))
        outs.add(int(step_top(c_out, lt.period_out, d.c_out)))
        if d.kind != "dwconv":  # a depthwise layer's input follows its output: its table has one c_in row
            ins.add(int(step_top(c_in, lt.period_in, d.c_in)))
    todo = {k: (sorted(i - set(table.layers[k].c_in_grid)), sorted(o - set(table.layers[k].c_out_grid)))
            for k, (i, o) in want.items()}
    todo = {k: v for k, v in todo.items() if v[0] or v[1]}
    if not todo:
        return table, {"lines": 0, "measured": 0, "from_store": 0, "layers": []}
    unique = {k: table.layers[k].signature for k in todo}
    entries = _Entries(backend, cfg, unique, store, graph.input_shape, progress=False)
    layers = dict(table.layers)
    try:
        grids = {}
        for key, (ins, outs) in todo.items():
            lt = table.layers[key]
            ci, co = sorted({*lt.c_in_grid, *ins}), sorted({*lt.c_out_grid, *outs})
            grids[key] = (lt, ci, co, {(i, o) for i in ci for o in co
                                       if i not in lt.c_in_grid or o not in lt.c_out_grid})
        entries.plan([(k, _c_in(g[0].signature, i, o), o) for k, g in grids.items() for i, o in g[3]],
                     "grid lines through the plan's widths")
        for key, (lt, ci, co, new) in grids.items():
            shape = (len(ci), len(co))
            med, cv, cnt = np.zeros(shape), np.zeros(shape), np.zeros(shape, int)
            for a, i in enumerate(ci):
                for b, o in enumerate(co):
                    if (i, o) in new:
                        at = (key, _c_in(lt.signature, i, o), o)
                        (med[a, b], cv[a, b]), cnt[a, b] = entries(*at), entries.count[at]
                    else:
                        x, y = lt.c_in_grid.index(i), lt.c_out_grid.index(o)
                        med[a, b], cv[a, b], cnt[a, b] = lt.median_ms[x, y], lt.cv[x, y], lt.count[x, y]
            layers[key] = LayerTable(lt.signature, ci, co, med, cv, cnt, lt.period_in, lt.period_out)
    finally:
        entries.close()
    done = {"lines": sum(len(i) + len(o) for i, o in todo.values()), "measured": entries.new,
            "from_store": entries.reused, "layers": sorted(todo)}
    out = dataclasses.replace(table, layers=layers,
                              meta={**table.meta, "plan_lines": [*table.meta.get("plan_lines", []), done]})
    return out.with_e2e(_refit(graph, out)), done


def _refit(graph: ModelGraph, table: LatencyTable) -> EndToEnd:
    """The end-to-end term fitted again on its points, their layer sums from ``table`` (the dense
    point at the dense widths, the others at their recorded widths); kept where a point lacks them."""
    points = table.e2e.points
    if any("widths" not in p and p.get("label") != "dense" for p in points) or not points:
        return table.e2e
    lm = LatencyModel(table, graph.layer_widths(table.layer_keys))
    dense = dict(lm.widths.group_size)
    if any(set(p.get("widths", {})) - set(dense) for p in points):  # fitted on another grouping of the model
        return table.e2e
    return EndToEnd.fit([{**p, "layers_ms": lm.layers_ms({**dense, **p.get("widths", {})})} for p in points])


def _c_in(s: LayerSignature, c_in: int, c_out: int) -> int:
    """The input width a layer runs at: a depthwise layer's follows its output."""
    return c_out if s.kind == "dwconv" else c_in


def _axis_widths(s: LayerSignature, varies: set[str], step: int, periods: tuple[int, int] = (1, 1)):
    """The widths each axis may be measured at: step tops at ``step`` spacing, or the dense width
    alone where no plan can change the axis (a depthwise layer's input follows its output)."""
    ci = ([s.c_in] if s.kind == "dwconv" or "in" not in varies else step_tops(s.c_in, step, periods[0]))
    co = step_tops(s.c_out, step, periods[1]) if "out" in varies else [s.c_out]
    return ci, co


def _full_grid(unique, varies, cfg: ProfileConfig, entries: _Entries) -> dict[str, tuple[list[int], list[int]]]:
    axes = {key: _axis_widths(s, varies[key], cfg.step) for key, s in unique.items()}
    entries.plan([(k, _c_in(unique[k], i, o), o) for k, (ci, co) in axes.items() for i in ci for o in co], "grid")
    return axes


def _adaptive(sigs, unique, varies, cfg: ProfileConfig, entries: _Entries):
    """Step periods, the coarse grid, then refinement within the budget and the deadline
    (``latency_tables.sampling``). Returns each signature's axes, periods, and the record."""
    deadline = None if cfg.max_minutes is None else entries.t0 + 60 * cfg.max_minutes
    periods = _periods(unique, varies, cfg, entries)
    layer_grids = []
    for key, s in unique.items():
        ci, co = _axis_widths(s, varies[key], cfg.step, _layer_periods(s, periods))
        layer_grids.append(LayerGrid(key, s, sum(t.key == key for t in sigs.values()),
                                     {"in": AxisGrid(ci, spread(ci, cfg.coarse)),
                                      "out": AxisGrid(co, spread(co, cfg.coarse))}))
    coarse = [(g.key, _c_in(g.sig, i, o), o) for g in layer_grids for i, o in g.entries()]
    entries.plan(coarse, "coarse pass")
    for at in coarse:
        entries(*at)
    budget = int(round(cfg.refine_budget * len(coarse)))
    log.info("refinement: up to %d more entries where neighbours disagree beyond noise and %.0f %%%s", budget,
             100 * cfg.refine_tol, "" if deadline is None else f", until {cfg.max_minutes:g} min have passed")
    f = {(k, i, o): v for (k, i, o), v in entries.f.items()}  # keyed by the grid's c_in (dwconv: the dense one)

    def measure(key, c_in, c_out):
        return entries(key, _c_in(unique[key], c_in, c_out), c_out)

    for g in layer_grids:  # a depthwise grid's one c_in row is the dense width: key its entries by it
        if g.sig.kind == "dwconv":
            for i, o in g.entries():
                f[(g.key, i, o)] = entries.f[(g.key, o, o)]
    entries.bar.total += budget
    done = refine(layer_grids, measure, f, cfg.refine_tol, budget, deadline)
    entries.bar.total = entries.bar.n
    entries.bar.refresh()
    if done["coarse"]:
        log.warning("refinement stopped (%s) with %d signature(s) still coarse where neighbours disagree (e.g. %s): "
                    "raise --max-minutes or the refinement budget for a finer table", done["stopped"],
                    len(done["coarse"]), done["coarse"][0])
    axes = {g.key: (g.axes["in"].grid, g.axes["out"].grid) for g in layer_grids}
    per = {g.key: _layer_periods(g.sig, periods) for g in layer_grids}
    record = {**done, "coarse_entries": len(coarse), "budget": budget,
              "periods": {f"{k}/{a}": v for (k, a), v in periods.items()}}
    return axes, per, record


def _layer_periods(s: LayerSignature, periods: dict[tuple[str, str], int]) -> tuple[int, int]:
    """The (c_in, c_out) periods a layer is sampled and looked up with: its kind's detected ones; 1
    on linear layers and on a depthwise layer's input (it follows the output)."""
    return (periods.get((s.kind, "in"), 1) if s.kind == "conv" else 1,
            periods.get((s.kind, "out"), 1) if s.kind != "linear" else 1)


def _periods(unique, varies, cfg: ProfileConfig, entries: _Entries) -> dict[tuple[str, str], int]:
    """The staircase period of each (layer kind, axis), from the store or detected now on the
    widest-compute layer of that kind (``sampling.detect_period``) and stored; 1 where the window
    could not tell (the layers are too narrow or overhead-bound: no staircase is assumed)."""
    out = {}
    for kind, axis in (("conv", "in"), ("conv", "out"), ("dwconv", "out")):
        known = entries.store.get_period(entries.dev, kind, axis) if entries.store is not None else None
        if known is not None:
            out[(kind, axis)] = known
            continue
        cands = [(k, s) for k, s in unique.items() if s.kind == kind and axis in varies[k]
                 and (s.c_in if axis == "in" else s.c_out) >= 8 * cfg.step]
        if not cands:
            continue
        key, s = max(cands, key=lambda ks: _macs(ks[1]))
        dense = s.c_in if axis == "in" else s.c_out
        if axis == "in":
            along = (lambda w, key=key, s=s: entries(key, w, s.c_out))
        else:
            along = (lambda w, key=key, s=s: entries(key, _c_in(s, s.c_in, w), w))
        widths = period_window(dense, cfg.step)
        entries.plan([(key, w, s.c_out) if axis == "in" else (key, _c_in(s, s.c_in, w), w) for w in widths],
                     f"step period of {kind} layers along c_{axis}")
        p = detect_period(along, dense, cfg.step, cfg.refine_tol)
        if p is None:
            log.info("step period of %s layers along c_%s: not detectable on %s (too narrow or overhead-bound); "
                     "none assumed", kind, axis, key)
            continue
        log.info("step period of %s layers along c_%s: %d channels (detected on %s)", kind, axis, p, key)
        out[(kind, axis)] = p
        if entries.store is not None:
            entries.store.put_period(entries.dev, kind, axis, p)
    return out


def _macs(s: LayerSignature) -> float:
    h, w = s.in_hw
    per = (1 if s.kind == "dwconv" else s.c_in) * s.kernel[0] * s.kernel[1]
    return per * s.c_out * h * w / (s.stride[0] * s.stride[1])


def check_layers(model: nn.Module, table: LatencyTable, backend: Backend, input_shape: tuple[int, int, int],
                 rounds: int = 3, min_round_s: float = 0.02) -> list[dict]:
    """Every profiled layer of ``model`` (pruned or not) measured at its current widths, beside
    what the table predicts there: the per-layer side of "did the table tell the truth"."""
    out = []
    for name, s in layer_signatures(model, input_shape).items():
        if name not in table.layer_keys:
            continue
        dense_sig = table.layers[table.layer_keys[name]].signature
        c_in = s.c_out if s.kind == "dwconv" else s.c_in
        t = backend.measure([backend.layer_runner(dense_sig, c_in, s.c_out)], rounds, min_round_s)[0]
        out.append({"layer": name, "c_in": c_in, "c_out": s.c_out, "dense_c_in": dense_sig.c_in,
                    "dense_c_out": dense_sig.c_out, "predicted_ms": table.lookup(name, c_in, s.c_out),
                    "measured_ms": t.median_ms,
                    "dense_predicted_ms": table.lookup(name, dense_sig.c_in, dense_sig.c_out),
                    "cv": t.cv})
    return out
