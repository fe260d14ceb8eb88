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
from typing import Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from latprune.errors import BadInput
from latprune.latency_tables.endtoend import PairConfig, fit_end_to_end
from latprune.latency_tables.runtimes import Backend
from latprune.latency_tables.table import EndToEnd, LatencyTable, LayerSignature, LayerTable
from latprune.models.graph import IgnoredLayer, ModelGraph
from latprune.models.widths import candidate_widths

__all__ = ["ProfileConfig", "layer_signatures", "isolated_outliers", "fixed_axes", "check_axes", "profile_model",
           "check_layers"]

log = logging.getLogger(__name__)


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

    def __post_init__(self):
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


def profile_model(model: nn.Module, input_shape: tuple[int, int, int], backend: Backend,
                  cfg: ProfileConfig = ProfileConfig(), progress: bool = True,
                  ignored: Iterable[IgnoredLayer] = ()) -> LatencyTable:
    """Every Conv2d and Linear layer of ``model`` timed alone on ``backend`` over a grid of widths
    (``cfg.step``), the dense model end to end, and the end-to-end term fitted on pruned
    configurations of the groups the planner may shrink (``ignored`` layers and the output layers
    stay whole in them, as in every plan: ``models.graph.ModelGraph``). An axis no plan can change
    (:func:`fixed_axes`) is measured at its dense width only."""
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
    grids, plan = {}, []
    for key, s in unique.items():
        ci = ([s.c_in] if s.kind == "dwconv" or "in" not in varies[key] else
              candidate_widths(s.c_in, cfg.step).tolist())
        co = candidate_widths(s.c_out, cfg.step).tolist() if "out" in varies[key] else [s.c_out]
        shape = (len(ci), len(co))
        grids[key] = (ci, co, np.zeros(shape), np.zeros(shape), np.zeros(shape, int))
        plan += [(key, i, o) for i in range(len(ci)) for o in range(len(co))]
    log.info("profiling %d layers (%d signatures, %d entries) on %s", len(sigs), len(unique), len(plan), backend.name)

    # A throwaway measurement: the first one in a process can be 2x slow even after warm-up.
    backend.measure([backend.layer_runner(next(iter(unique.values())), 1, 1)], 1, cfg.min_round_s)

    def measure_entry(key, i, o, rounds):
        s = unique[key]
        ci_grid, co_grid, med, cv, cnt = grids[key]
        c_out = co_grid[o]
        c_in = c_out if s.kind == "dwconv" else ci_grid[i]
        runner = backend.layer_runner(s, c_in, c_out)
        t = backend.measure([runner], rounds, cfg.min_round_s)[0]
        if t.cv > cfg.max_cv:  # noisy: measure again, longer, and keep the steadier of the two
            t2 = backend.measure([runner], 2 * rounds, cfg.min_round_s)[0]
            t = t2 if t2.cv < t.cv else t
        med[i, o], cv[i, o], cnt[i, o] = t.median_ms, t.cv, t.samples.size

    for key, i, o in tqdm(plan, desc="profile", unit="entry", disable=not progress):
        measure_entry(key, i, o, cfg.rounds)
    # An entry can be steady within itself and still wrong (the machine was slow for its whole
    # measurement): entries that break monotonicity against a grid neighbour are measured again.
    spikes = [(key, i, o) for key, g in grids.items() for i, o in isolated_outliers(g[2])]
    for key, i, o in spikes:
        measure_entry(key, i, o, 2 * cfg.rounds)
    if spikes:
        log.info("re-measured %d entries that broke monotonicity", len(spikes))

    dense = backend.measure([backend.model_runner(model, input_shape)], cfg.model_rounds, cfg.model_min_round_s)[0]
    layers = {k: LayerTable(unique[k], g[0], g[1], g[2], g[3], g[4]) for k, g in grids.items()}
    layer_keys = {name: s.key for name, s in sigs.items()}
    covered = sum(layers[layer_keys[n]].lookup(s.c_in, s.c_out) for n, s in sigs.items())
    log.info("dense %.3f ms end to end; layer tables sum to %.3f ms", dense.median_ms, covered)
    table = LatencyTable(
        fingerprint=backend.fingerprint(input_shape),
        layers=layers,
        layer_keys=layer_keys,
        dense_ms=dense.median_ms,
        e2e=EndToEnd.fit([{"label": "dense", "layers_ms": covered, "measured_ms": dense.median_ms}]),
        meta={"profile": dataclasses.asdict(cfg), "dense": dense.summary(), "entries": len(plan),
              "remeasured_outliers": len(spikes),
              "unmeasured": unmeasured, "fixed_axes": fixed, "ignored": list(graph.ignored)},
    )
    # the smallest plan is always among the fit's points: it anchors the floor the knapsack sees
    return table.with_e2e(fit_end_to_end(graph, table, backend, cfg.fit_configs, cfg.step,
                                         cfg.pair, progress=progress))


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
