"""Sharpness-aware step rules: uniform SAM/ASAM and AdaSAP's adaptive per-neuron perturbation.

AdaSAP (Adaptive Sharpness-Aware Pruning, ../shared/seeds/000_*.txt, section 3.1):

* a *neuron* is one output channel of a torch-pruning group: that channel's slice of every
  producer in the group (conv/linear rows, BN gamma_i and beta_i). Consumers' input slices belong
  to the consumers' own neurons, so neurons partition the prunable weights (eq. 1). Parameters in
  no neuron (the classifier, layers no group prunes) are perturbed with the uniform radius ``rho``.
* neurons are scored (``score``): by default (``planner``) with the pruner's own ranking key, the
  channel's value under the plan's value function per millisecond its removal saves
  (:func:`~latprune.pipeline.plan.value_per_ms`, set by the schedule through
  :meth:`SharpnessStep.set_neuron_keys`), so the channels the knapsack would remove next get the
  largest ball, which is the paper's point; or, as ablations, at each step by L2 magnitude or first-order Taylor
  |w . g| of the neuron's weights. Then s_min and s_max over all neurons (eq. 2) give neuron i the radius
  rho_i = rho_max - (s_i - s_min) / (s_max - s_min) * (rho_max - rho_min): unimportant neurons get
  the larger ball (every rho_i = rho_max when s_max = s_min).
* ASAM form (eq. 4): eps_i = rho_i * T_i^2 g_i / ||T_i g_i|| with T_i = |w_i| + eta on weights and
  1 on biases (as in Kwon et al.'s code), so ||T_i^-1 eps_i|| = rho_i. The paper's eq. 5 prints
  ||g_i|| in the denominator; eq. 4 and ASAM give ||T_i g_i||, which is what is implemented.
  SAM form: eps_i = rho_i * g_i / ||g_i||.
* ``normalize="global"`` divides by one global ||T g|| instead, rho_i acting as per-neuron weights
  (closer to ASAM's single ball; per-neuron normalisation makes the total perturbation about
  sqrt(number of neurons) times larger).

Then the second forward/backward runs at w + eps with BatchNorm running statistics frozen (only the
first pass updates them), w is restored and the base optimizer steps with the second gradients.
``sam_every=K`` does this on every K-th iteration only, plain steps of the base optimizer between
(a cost knob: about (K + 1) / K forward-backward passes per step instead of 2).
Under DistributedDataParallel the first pass runs in ``no_sync``. On CUDA a GradScaler may be
passed (fp16 autocast); that path needs a GPU and has not run here (its test is GPU-only).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from latprune.errors import BadInput
from latprune.models.graph import ModelGraph, restore_bn_stats, save_bn_stats
from latprune.models.outputs import classification_loss

__all__ = ["LossFn", "cross_entropy_loss", "METHODS", "RHO_NORMS", "NEURON_SCORES", "OptimizerConfig", "NeuronGroup",
           "Neurons", "neuron_partition", "uniform_perturbation", "neuron_radii", "adaptive_perturbation",
           "SharpnessStep"]

METHODS = ("sgd", "sam", "asam", "adasap")
RHO_NORMS = ("neuron", "global")  # AdaSAP: one norm per neuron (eq. 4 read literally) or one over all
# AdaSAP's per-neuron scores for rho_i: the planner's ranking key (given from outside, refreshed by
# the schedule), or the neuron's weights' magnitude or |w . g| (computed each step)
NEURON_SCORES = ("planner", "magnitude", "taylor")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The step rule of warm-up, pruning and fine-tuning (config section ``optimizer``, formerly
    ``sharpness``; "sharpness" now only names the probe of ``ScheduleConfig.sharpness_rho``)."""

    method: str = "adasap"  # sgd | sam | asam | adasap
    rho: float = 0.5  # uniform radius: SAM/ASAM fine-tuning, and AdaSAP's params outside any neuron
    # AdaSAP's per-neuron radii. The paper (A.5) uses 0.01 and 2.0, but per-neuron normalisation
    # makes the total perturbation ~sqrt(#neurons) larger than one ball (ResNet-20: 784 neurons,
    # 2.0 / 28 = 0.07); rho_max 2.0 collapsed training here (val 0.25 after 120 steps), 0.1 did
    # not (BENCHMARKS.md, rho sweep).
    rho_min: float = 0.01
    rho_max: float = 0.1
    form: str = "asam"  # adasap's ball: asam (scale-invariant) or sam
    eta: float = 0.01  # ASAM's T = |w| + eta
    normalize: str = "neuron"  # adasap: per-neuron norms (eq. 4) or one global norm
    score: str = "planner"  # neuron score for rho_i: one of NEURON_SCORES
    # the two-pass step on every K-th iteration (iterations 0, K, 2K, ... of a phase), one plain
    # step of the base optimizer between: a cost knob (1: every step, the papers' rule)
    sam_every: int = 1

    def __post_init__(self):
        if self.method not in METHODS:
            raise BadInput(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for f in ("rho", "rho_min", "rho_max", "eta"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise BadInput(f"{f} must be a non-negative number, got {v}")
        if self.rho_min > self.rho_max:
            raise BadInput(f"rho_min ({self.rho_min}) > rho_max ({self.rho_max}): swap them or lower rho_min")
        if self.form not in ("asam", "sam"):
            raise BadInput(f"sharpness form must be asam or sam, got {self.form!r}")
        if self.normalize not in RHO_NORMS:
            raise BadInput(f"normalize must be one of {', '.join(RHO_NORMS)}, got {self.normalize!r}")
        if self.score not in NEURON_SCORES:
            raise BadInput(f"neuron score must be one of {', '.join(NEURON_SCORES)}, got {self.score!r}")
        if not (isinstance(self.sam_every, int) and self.sam_every >= 1):
            raise BadInput(f"--sam-every must be a whole number of iterations >= 1, got {self.sam_every!r}")

    @property
    def uses_planner_key(self) -> bool:
        """AdaSAP with the planner's score: its radii need the knapsack's key from outside."""
        return self.method == "adasap" and self.score == "planner"


@dataclasses.dataclass
class NeuronGroup:
    """``size`` neurons; each (param, rows) slice holds one row per neuron, in neuron order."""

    name: str
    size: int
    slices: list[tuple[nn.Parameter, torch.Tensor]]
    # per slice: rows are 0..n-1 of the whole parameter (the usual case), so no gather/scatter is needed
    full: list[bool] = dataclasses.field(init=False)

    def __post_init__(self):
        self.full = [rows.numel() == p.shape[0] and bool(torch.equal(rows, torch.arange(p.shape[0])))
                     for p, rows in self.slices]


@dataclasses.dataclass
class Neurons:
    groups: list[NeuronGroup]
    other: list[nn.Parameter]  # parameters in no neuron: perturbed with the uniform radius

    @property
    def count(self) -> int:
        return sum(g.size for g in self.groups)


def neuron_partition(graph: ModelGraph) -> Neurons:
    """Neurons from torch-pruning's groups: each group channel's slice of every producer."""
    model, dg = graph.model, graph.dg
    covered: dict[int, torch.Tensor] = {}
    groups = []
    for cg, group in graph.tp_groups():
        slices = []
        for item in group:
            mod, handler = item.dep.target.module, item.dep.handler
            if not dg.is_out_channel_pruning_fn(handler):
                continue
            rows = torch.tensor([int(getattr(i, "idx", i)) for i in item.idxs], dtype=torch.long)
            for p in (getattr(mod, "weight", None), getattr(mod, "bias", None)):
                if isinstance(p, nn.Parameter) and p.requires_grad:
                    seen = covered.setdefault(id(p), torch.zeros(p.shape[0], dtype=torch.bool))
                    if seen[rows].any():
                        raise RuntimeError(f"rows of a {type(mod).__name__} parameter fall in two neurons")
                    seen[rows] = True
                    slices.append((p, rows))
        groups.append(NeuronGroup(cg.name, cg.size, slices))
    other = [p for p in model.parameters() if p.requires_grad and not (id(p) in covered and covered[id(p)].all())]
    partial = [p for p in other if id(p) in covered]
    if partial:
        raise RuntimeError("a parameter is only partly covered by neurons; unsupported layer coupling")
    return Neurons(groups, other)


def _scale_param_ids(model: nn.Module) -> set[int]:
    """Parameters ASAM scales by |w| + eta: weights (not biases), as in Kwon et al.'s code."""
    return {id(p) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "weight"}


@torch.no_grad()
def uniform_perturbation(params: Iterable[nn.Parameter], rho: float, asam: bool, eta: float,
                         scaled: set[int]) -> dict[nn.Parameter, torch.Tensor]:
    """SAM: rho g/||g||; ASAM: rho T^2 g/||T g||, one global norm over ``params``."""
    params = [p for p in params if p.grad is not None]
    ts = [(p.abs() + eta) if (asam and id(p) in scaled) else None for p in params]
    tg = [p.grad * t if t is not None else p.grad for p, t in zip(params, ts)]
    norm = torch.sqrt(sum((x.double() ** 2).sum() for x in tg)) if tg else torch.tensor(0.0)
    if not torch.isfinite(norm) or norm == 0:
        return {}
    return {p: (x * t if t is not None else x) * (rho / norm.item()) for p, x, t in zip(params, tg, ts)}


@torch.no_grad()
def neuron_radii(neurons: Neurons, cfg: OptimizerConfig,
                 keys: dict[str, np.ndarray] | None = None) -> list[torch.Tensor]:
    """rho_i for every neuron of every group (eq. 2): from ``keys`` (per group name, one score per
    neuron; +inf where removal buys nothing, counted as the largest finite score) with the
    ``planner`` score, else from scores taken at this step."""
    if cfg.score == "planner":
        if keys is None:
            raise ValueError("AdaSAP's planner score needs the planner's ranking key: call "
                             "SharpnessStep.set_neuron_keys (train_and_prune_ does), or use score='magnitude'")
        scores = []
        for g in neurons.groups:
            k = np.asarray(keys[g.name], dtype=np.float64)
            if k.shape != (g.size,):
                raise ValueError(f"planner key for {g.name} has {k.shape} scores for {g.size} neurons")
            scores.append(torch.from_numpy(k.copy()))
        allv = torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)
        finite = allv[torch.isfinite(allv)]
        top = float(finite.max()) if finite.numel() else 0.0
        scores = [torch.where(torch.isfinite(s), s, torch.full_like(s, top)) for s in scores]
        return _radii(scores, cfg)
    scores = []
    for g in neurons.groups:
        s = torch.zeros(g.size, dtype=torch.float64)
        for (p, rows), full in zip(g.slices, g.full):
            w = (p if full else p[rows]).double().reshape(g.size, -1)
            if cfg.score == "magnitude":
                s += (w ** 2).sum(1)
            elif p.grad is not None:
                s += (w * (p.grad if full else p.grad[rows]).double().reshape(g.size, -1)).sum(1)
        scores.append(s.sqrt() if cfg.score == "magnitude" else s.abs())
    return _radii(scores, cfg)


def _radii(scores: list[torch.Tensor], cfg: OptimizerConfig) -> list[torch.Tensor]:
    """Eq. 2: rho_max for the lowest score, rho_min for the highest, linear between."""
    if not scores:
        return []
    allv = torch.cat(scores)
    lo, hi = allv.min(), allv.max()
    if hi - lo <= 0:
        return [torch.full_like(s, cfg.rho_max) for s in scores]
    return [cfg.rho_max - (s - lo) / (hi - lo) * (cfg.rho_max - cfg.rho_min) for s in scores]


@torch.no_grad()
def adaptive_perturbation(model: nn.Module, neurons: Neurons, cfg: OptimizerConfig, scaled: set[int],
                          keys: dict[str, np.ndarray] | None = None) -> dict[nn.Parameter, torch.Tensor]:
    asam = cfg.form == "asam"
    radii = neuron_radii(neurons, cfg, keys)
    eps: dict[nn.Parameter, torch.Tensor] = {}
    per_group = []
    for g, rho in zip(neurons.groups, radii):
        parts, sq = [], torch.zeros(g.size, dtype=torch.float64)
        for (p, rows), full in zip(g.slices, g.full):
            if p.grad is None:
                continue
            gr = p.grad if full else p.grad[rows]
            t = ((p if full else p[rows]).abs() + cfg.eta) if (asam and id(p) in scaled) else None
            tg = gr * t if t is not None else gr
            sq += (tg.double() ** 2).reshape(g.size, -1).sum(1)
            parts.append((p, None if full else rows, tg, t))
        per_group.append((parts, sq, rho))
    if cfg.normalize == "global":
        total = sum(float(sq.sum()) for _, sq, _ in per_group)
        total += sum(float(((p.grad * (p.abs() + cfg.eta) if asam and id(p) in scaled else p.grad).double() ** 2).sum())
                     for p in neurons.other if p.grad is not None)
        gnorm = math.sqrt(total)
    for parts, sq, rho in per_group:
        denom = torch.full_like(sq, gnorm) if cfg.normalize == "global" else sq.sqrt()
        factor = torch.where(denom > 0, rho / denom.clamp_min(1e-30), torch.zeros_like(denom))
        for p, rows, tg, t in parts:
            f = factor.to(p.dtype).reshape(-1, *([1] * (p.dim() - 1)))
            if rows is None:  # the whole parameter is this group's
                eps[p] = (tg * t if t is not None else tg) * f
            else:
                eps.setdefault(p, torch.zeros_like(p))[rows] = (tg * t if t is not None else tg) * f
    if cfg.normalize == "global":
        if gnorm > 0:
            for p in neurons.other:
                if p.grad is not None:
                    t = (p.abs() + cfg.eta) if (asam and id(p) in scaled) else None
                    eps[p] = (p.grad * t * t if t is not None else p.grad) * (cfg.rho / gnorm)
    else:
        eps.update(uniform_perturbation(neurons.other, cfg.rho, asam, cfg.eta, scaled))
    return eps


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, x, y) -> scalar loss


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A classifier's loss (auxiliary logits included: ``models.outputs.classification_loss``)."""
    return classification_loss(model(x), y)


class SharpnessStep:
    """A :class:`~latprune.pipeline.train.StepRule` for SAM, ASAM and AdaSAP (two passes per step).
    ``loss_fn(model, x, y)`` is the loss both passes take (a classifier's cross-entropy by default;
    a user's own loss, e.g. a detector's, through the Python API)."""

    def __init__(self, model: nn.Module, cfg: OptimizerConfig, neurons: Neurons | None = None,
                 scaler=None, loss_fn: LossFn = cross_entropy_loss):
        if cfg.method == "sgd":
            raise ValueError("SharpnessStep is for sam, asam and adasap; use sgd_step for sgd")
        if cfg.method == "adasap" and neurons is None:
            raise ValueError("adasap needs the model's neuron partition (neuron_partition)")
        self.cfg, self.neurons, self.scaler, self.loss_fn = cfg, neurons, scaler, loss_fn
        self.scaled = _scale_param_ids(model)
        self.keys: dict[str, np.ndarray] | None = None  # the planner's ranking key (score "planner")

    def set_neuron_keys(self, keys: dict[str, np.ndarray]) -> None:
        """The planner's ranking key per group (one score per neuron, lowest = pruned next), for
        the ``planner`` score's radii until the next call."""
        self.keys = keys

    def rebind(self, graph: ModelGraph) -> None:
        """Follow the model after a removal replaced its parameters (``graph``: of the pruned model).
        The planner's key is for the old widths: it must be set again."""
        self.scaled = _scale_param_ids(graph.model)
        self.keys = None
        if self.neurons is not None:
            self.neurons = neuron_partition(graph)

    def perturbation(self, model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
        c = self.cfg
        if c.method == "adasap":
            return adaptive_perturbation(model, self.neurons, c, self.scaled, self.keys)
        return uniform_perturbation(model.parameters(), c.rho, c.method == "asam", c.eta, self.scaled)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer, observe=None,
                 iteration: int = 0) -> float:
        if iteration % self.cfg.sam_every:
            return self._plain(model, x, y, optimizer, observe)
        optimizer.zero_grad(set_to_none=True)
        sync_off = model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()
        with sync_off:
            loss = self._backward(model, x, y)
        if self.scaler is not None:
            # fp16 on CUDA: unscale the first-pass gradients by hand. GradScaler.unscale_ would
            # mark this step as unscaled and leave the second pass's gradients scaled.
            inv = 1.0 / self.scaler.get_scale()
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(inv)
        if observe is not None:  # the gradients at the unperturbed weights
            observe()
        eps = self.perturbation(model)
        if any(not torch.isfinite(e).all() for e in eps.values()):
            eps = {}  # overflowed first pass: no perturbation; the scaler skips a bad second pass
        bn_state = save_bn_stats(model)
        saved = []
        with torch.no_grad():
            for p, e in eps.items():
                saved.append((p, p.detach().clone()))
                p.add_(e)
        optimizer.zero_grad(set_to_none=True)
        self._backward(model, x, y)
        with torch.no_grad():  # restore w exactly: (w + e) - e is not w in floating point, and under
            for p, w in saved:  # DDP each rank's e differs (first pass in no_sync), so ranks would drift
                p.copy_(w)
        restore_bn_stats(bn_state)
        self._step(optimizer)
        return loss

    def _plain(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer, observe=None) -> float:
        """One step of the base optimizer on the gradients at w (``sam_every`` > 1, between two-pass steps)."""
        optimizer.zero_grad(set_to_none=True)
        loss = self._backward(model, x, y)
        if self.scaler is not None:  # fp16 on CUDA: written to the GradScaler API, never run (no GPU here)
            self.scaler.unscale_(optimizer)  # observe sees true gradients; scaler.step knows they are unscaled
        if observe is not None:
            observe()
        self._step(optimizer)
        return loss

    def _step(self, optimizer) -> None:
        """The base optimizer's update (through the GradScaler on fp16)."""
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def _backward(self, model, x, y) -> float:
        if self.scaler is not None:
            with torch.autocast("cuda", dtype=torch.float16):
                loss = self.loss_fn(model, x, y)
            self.scaler.scale(loss).backward()
        else:
            loss = self.loss_fn(model, x, y)
            loss.backward()
        return float(loss.detach())
