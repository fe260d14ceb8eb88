"""Stage 3b: training. Pre-training of the dense model (cached) and fine-tuning after pruning.

A :class:`StepRule` does one optimisation step (plain SGD, or the sharpness-aware rules of
``pipeline.adasap``), and callbacks run after each iteration: a pruning schedule returns the
:class:`~latprune.models.surgery.Removal` it made, and the trainer rebuilds its optimizer around
the new parameters, carrying every momentum buffer over (sliced, never reset). A ``save``
callback writes checkpoints (atomically, by the caller); ``resume`` continues one bit for bit.
Under torchrun the step sees the model wrapped in DistributedDataParallel and this rank's slice of
each global batch (``pipeline.distributed``).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from latprune.io import cache_key, save_torch_atomic, seal, verified
from latprune.models.outputs import classification_loss
from latprune.models.surgery import Removal, follow_removal_
from latprune.pipeline import distributed
from latprune.pipeline.data import Dataset, Split

__all__ = ["TrainConfig", "StepRule", "sgd_step", "TrainResult", "LRSpan", "make_optimizer", "Resume", "train",
           "evaluate", "held_out_metrics", "finetune_on_batches_", "bn_recalibrated", "pretrained"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: float = 1.0  # fractions allowed: 0.25 = a quarter of an epoch
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    warmup_iters: int = 50  # linear learning-rate warm-up, then cosine to zero
    threads: int = 0  # torch threads while training; 0 = leave torch's default

    def __post_init__(self):
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")


class StepRule(Protocol):
    """One optimisation step on one batch; returns the loss. SAM-style rules do two passes.
    ``observe``, when given, is called once with this minibatch's loss gradients in ``.grad`` at the
    weights before the update (for a two-pass rule, the first pass's): a value function can
    accumulate from them at no extra cost (``pipeline.importance.HalpValue``). ``iteration``: the
    step's index in its training run (a rule may alternate on it; resuming replays the same index)."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                 observe: Callable[[], None] | None = None, iteration: int = 0) -> float: ...


def sgd_step(model, x, y, optimizer, observe: Callable[[], None] | None = None, iteration: int = 0) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = classification_loss(model(x), y)
    loss.backward()
    if observe is not None:
        observe()
    optimizer.step()
    return float(loss.detach())


Callback = Callable[[int, nn.Module], "Removal | None"]  # (iteration, model) -> the removal it made


@dataclasses.dataclass
class TrainResult:
    iterations: int
    final_loss: float
    val_accuracy: float
    resumed_from: int = 0
    # the optimizer's state at the end (momentum): what the next phase of one schedule starts from
    optimizer_state: dict | None = dataclasses.field(default=None, repr=False)

    def summary(self) -> dict:
        """The result without the optimizer state (for reports)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "optimizer_state"}


@dataclasses.dataclass(frozen=True)
class LRSpan:
    """One :func:`train` call as a stretch of a longer learning-rate schedule: its iterations are
    ``offset``, ``offset + 1``, ... of ``total`` (one warm-up at the start of the whole, one cosine to
    zero at its end), so consecutive phases share one schedule instead of each restarting it."""

    offset: int
    total: int


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
    )


@dataclasses.dataclass
class Resume:
    """Where an interrupted :func:`train` call stopped: its iteration, optimizer state and torch RNG.
    The model itself is restored by the caller (it may have been pruned in between)."""

    iteration: int
    optimizer: dict
    rng: torch.Tensor

    def to_dict(self) -> dict:
        return {"iteration": self.iteration, "optimizer": self.optimizer, "rng": self.rng}

    @classmethod
    def from_dict(cls, d: dict) -> "Resume":
        return cls(int(d["iteration"]), d["optimizer"], d["rng"])


Saver = Callable[[nn.Module, Resume], None]  # writes a checkpoint of (model, where training stands)


def train(model: nn.Module, data: Dataset, cfg: TrainConfig, seed: int = 0, step: StepRule = sgd_step,
          callbacks: Sequence[Callback] = (), progress: bool = True, desc: str = "train",
          resume: Resume | None = None, save: Saver | None = None, save_every: int = 0,
          hooks: Sequence[Callable[[int], None]] = (), observe: Callable[[], None] | None = None,
          span: LRSpan | None = None, optimizer_state: dict | None = None) -> TrainResult:
    """Train ``model`` in place for ``cfg.epochs`` over ``data.train``; evaluate on ``data.val``.

    The learning rate warms up over ``cfg.warmup_iters`` and follows a cosine to zero over this
    call's iterations, or, with ``span``, over the longer schedule this call is a stretch of.
    ``optimizer_state`` (a previous call's ``TrainResult.optimizer_state``, same parameters) starts
    the optimizer where that call left it (momentum carried across phases).

    ``save`` is called every ``save_every`` iterations and after every removal a callback makes;
    ``resume`` continues from such a checkpoint, bit for bit: the data order is a function of
    (seed, epoch) and is replayed up to the stopping point, the learning rate a function of the
    iteration, and the optimizer state and torch RNG are restored. ``hooks`` run after each
    iteration (and after its checkpoint) with the iteration count; ``observe`` is handed to the step
    rule (:class:`StepRule`).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    total = max(int(round(cfg.epochs * per_epoch)), 0)
    optimizer = make_optimizer(model, cfg)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    start = 0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        torch.set_rng_state(resume.rng)
        start = resume.iteration
        log.info("resumed %s from iteration %d of %d", desc, start, total)
    wrapped = distributed.wrap(model)  # DDP under torchrun; the model itself otherwise
    offset, whole = (span.offset, span.total) if span is not None else (0, total)
    if offset + total > whole:
        raise ValueError(f"{desc}: iterations {offset}..{offset + total} run past the schedule's {whole}")
    sched = _lr_lambda(whole, cfg.warmup_iters)
    it, loss = start, float("nan")
    bar = tqdm(total=total, initial=start, desc=desc, unit="it", disable=not progress or total == 0)
    model.train()
    epoch = start // per_epoch if per_epoch else 0
    while it < total:
        rng = np.random.default_rng([seed, epoch])
        skip = it - epoch * per_epoch
        for bi, (x, y) in enumerate(data.batches(data.train, cfg.batch_size, shuffle=True, augment=True, rng=rng)):
            if bi < skip:
                continue
            if it >= total:
                break
            if len(y) < distributed.world_size():
                continue  # a last batch too small to give every rank an image
            x, y = distributed.shard(x, y)
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr * sched(offset + it)
            loss = step(wrapped, x, y, optimizer, observe, it)
            if not math.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {loss} at iteration {it}: lower the learning rate")
            it += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            removed = False
            for cb in callbacks:
                before = dict(model.named_parameters())
                removal = cb(it, model)
                if removal is not None:  # parameters were replaced: follow them
                    follow_removal_(optimizer, before, model, removal)
                    wrapped = distributed.wrap(model)
                    removed = True
            if (save is not None and distributed.is_main() and it < total
                    and (removed or (save_every and it % save_every == 0))):
                save(model, Resume(it, optimizer.state_dict(), torch.get_rng_state()))
            for h in hooks:
                h(it)
        epoch += 1
    bar.close()
    distributed.sync_buffers(model)
    acc = evaluate(model, data, data.val)
    return TrainResult(it, loss, acc, start, optimizer.state_dict())


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, split: Split, batch_size: int = 500) -> float:
    """Top-1 accuracy in [0, 1]."""
    was_training = model.training
    model.eval()
    correct = 0
    for x, y in data.batches(split, batch_size):
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct / max(len(split), 1)


@torch.no_grad()
def held_out_metrics(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy per image) of ``model`` in eval mode on ``batches``."""
    was_training = model.training
    model.eval()
    correct, total, n = 0, 0.0, 0
    for x, y in batches:
        out = model(x)
        correct += int((out.argmax(1) == y).sum())
        total += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        n += len(y)
    model.train(was_training)
    return correct / max(n, 1), total / max(n, 1)


def finetune_on_batches_(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], iterations: int,
                         cfg: TrainConfig) -> nn.Module:
    """``iterations`` SGD steps on ``batches`` in their order (cycling), ``cfg``'s learning rate,
    warm-up and cosine schedule: a short, deterministic fine-tune for comparing candidate models
    on equal terms (the same batches, the same steps). In place; returns ``model`` in eval mode."""
    optimizer = make_optimizer(model, cfg)
    sched = _lr_lambda(iterations, cfg.warmup_iters)
    model.train()
    for it in range(iterations):
        x, y = batches[it % len(batches)]
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * sched(it)
        loss = sgd_step(model, x, y, optimizer)
        if not math.isfinite(loss):
            raise FloatingPointError(f"short fine-tune: loss became {loss} at iteration {it}: lower the learning rate")
    return model.eval()


@torch.no_grad()
def bn_recalibrated(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated from ``batches``
    (cumulative average, train-mode forward passes), in eval mode: how a model just pruned would
    do with statistics that match its new channels. The model itself is untouched; the copy's
    BatchNorm momentum is restored afterwards, so it can be trained like the original."""
    m = copy.deepcopy(model)
    bns = [b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm) and b.track_running_stats]
    momentum = [b.momentum for b in bns]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None  # cumulative moving average over the calibration batches
    m.train()
    for x, _ in batches:
        m(x)
    for b, mo in zip(bns, momentum):
        b.momentum = mo
    return m.eval()


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    warmup = min(warmup, max(total // 5, 1))

    def f(it: int) -> float:
        if it < warmup:
            return (it + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(total - warmup, 1)))

    return f


def pretrained(model: nn.Module, data: Dataset, cfg: TrainConfig, cache_dir: Path, key: dict,
               seed: int = 0, progress: bool = True) -> tuple[nn.Module, dict]:
    """Pre-train the dense model, or load it from the cache when the same setting was trained before."""
    path = Path(cache_dir) / "checkpoints" / f"dense-{cache_key(**key, train=dataclasses.asdict(cfg), seed=seed)}.pt"
    if verified(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log.info("loaded cached pre-trained weights %s", path)
        return model, {"cached": True, "path": str(path)}
    partial = path.with_suffix(".partial.pt")
    resume = None
    if verified(partial):
        ck = torch.load(partial, map_location="cpu", weights_only=True)
        if isinstance(ck, dict) and "train" in ck:  # an older latprune's partial checkpoint: start over
            model.load_state_dict(ck["model"])
            resume = Resume.from_dict(ck["train"])

    def save(m: nn.Module, r: Resume) -> None:
        seal(save_torch_atomic({"model": m.state_dict(), "train": r.to_dict()}, partial))

    per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    res = train(model, data, cfg, seed=seed, progress=progress, desc="pre-train", resume=resume, save=save,
                save_every=per_epoch)
    if distributed.is_main():
        seal(save_torch_atomic(model.state_dict(), path))
        partial.unlink(missing_ok=True)
        verified(partial)  # and its digest
    log.info("pre-trained dense model: val accuracy %.4f, cached at %s", res.val_accuracy, path)
    return model, {"cached": False, "path": str(path), "val_accuracy": res.val_accuracy}
