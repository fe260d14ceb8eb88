"""Robustness to corrupted inputs: a CIFAR-10-C-style copy of the test set, generated and cached.

The 15 benchmark corruptions of Hendrycks & Dietterich (2019) x 5 severities, generated with
``imagecorruptions-imaug`` (the maintained fork of ``imagecorruptions``). Its constants are
ImageNet-C's, so the result is "CIFAR-10-C-style", not CIFAR-10-C. Generation costs 0.1-14 ms per
32x32 image per corruption on the build machine (glass blur the slowest), so runs evaluate the
first ``images`` test images (default 1,000: 75,000 corrupted images); the set is cached on disk.

Metrics: clean accuracy on the same images, corruption accuracy (mean over corruptions and
severities), R_C = corruption accuracy / clean accuracy, and accuracy per corruption (mean over
severities). A collapsed model scores R_C near 1 (chance on both): read R_C beside both accuracies.

Some corruptions leave every model at chance on some data (on Fashion-MNIST: fog, frost,
brightness, snow and contrast), so they dilute any difference between models. The *informative*
corruptions are those on which the **dense** model's accuracy, averaged over the five severities,
is above :data:`ABOVE_CHANCE` x chance (1 / classes); ``informative_acc`` is the mean over those
only. The list is decided once, by the dense model, and applied to every model compared with it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from latprune.errors import BadInput
from latprune.io import save_npy_atomic, seal, verified
from latprune.pipeline.data import Dataset, Split
from latprune.pipeline.train import evaluate

__all__ = ["CORRUPTIONS", "SEVERITIES", "ABOVE_CHANCE", "RobustnessConfig", "Robustness", "corrupted_test_set",
           "informative_corruptions", "evaluate_robustness"]

log = logging.getLogger(__name__)

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)
ABOVE_CHANCE = 1.5  # a corruption is informative when the dense model's accuracy on it exceeds 1.5 x chance
_SEEDED = ("impulse_noise", "glass_blur")  # not driven by numpy's global generator


@dataclasses.dataclass(frozen=True)
class RobustnessConfig:
    images: int = 1000  # first N test images, each corrupted 75 ways; 0 = skip the evaluation

    def __post_init__(self):
        if self.images < 0:
            raise BadInput(f"--robust-images must be >= 0, got {self.images}")


@dataclasses.dataclass
class Robustness:
    clean_acc: float
    corruption_acc: float
    R_C: float
    per_corruption: dict[str, float]
    per_severity: dict[int, float]
    eval_images: int
    # the corruptions on which the dense model is above ABOVE_CHANCE x chance, and the mean over them
    informative: list[str] = dataclasses.field(default_factory=list)
    informative_acc: float = float("nan")


def corrupted_test_set(data: Dataset, images: int, cache_dir: Path, seed: int = 0,
                       progress: bool = True) -> tuple[Split, np.ndarray]:
    """``(clean subset, corrupted [15, 5, N, C, H, W] uint8)``, from the cache when it exists."""
    try:
        import imagecorruptions
    except ImportError:
        raise BadInput("imagecorruptions-imaug is not installed: pip install imagecorruptions-imaug") from None
    n = min(images, len(data.test))
    clean = Split(data.test.x[:n], data.test.y[:n])
    digest = hashlib.sha256(clean.x.tobytes()).hexdigest()[:16]
    path = Path(cache_dir) / "corruptions" / f"{data.name}-{n}-{digest}-s{seed}.npy"
    if verified(path):
        arr = np.load(path)
        if arr.shape == (len(CORRUPTIONS), len(SEVERITIES), *clean.x.shape):
            return clean, arr
    out = np.empty((len(CORRUPTIONS), len(SEVERITIES), *clean.x.shape), np.uint8)
    hwc = clean.x.transpose(0, 2, 3, 1)
    state = np.random.get_state()  # the library draws from numpy's global generator
    try:
        bar = tqdm(total=len(CORRUPTIONS) * len(SEVERITIES), desc="corrupt", unit="set", disable=not progress)
        for ci, name in enumerate(CORRUPTIONS):
            for si, sev in enumerate(SEVERITIES):
                np.random.seed(seed * 1000 + ci * 10 + si)
                for k in range(n):
                    # two corruptions draw from their own generators and take a seed instead
                    kw = {"seed": (seed * 1000 + ci * 10 + si) * 100003 + k} if name in _SEEDED else {}
                    img = np.asarray(imagecorruptions.corrupt(hwc[k], severity=sev, corruption_name=name, **kw))
                    out[ci, si, k] = np.clip(img, 0, 255).astype(np.uint8).transpose(2, 0, 1)
                bar.update(1)
        bar.close()
    finally:
        np.random.set_state(state)
    seal(save_npy_atomic(out, path))
    log.info("corrupted test set: %d images x %d corruptions x %d severities, cached at %s", n, len(CORRUPTIONS),
             len(SEVERITIES), path)
    return clean, out


def informative_corruptions(per_corruption: dict[str, float], num_classes: int) -> list[str]:
    """The corruptions whose accuracy (the dense model's, mean over severities) is above
    :data:`ABOVE_CHANCE` x chance, in :data:`CORRUPTIONS` order."""
    return [c for c in CORRUPTIONS if c in per_corruption and per_corruption[c] > ABOVE_CHANCE / num_classes]


@torch.no_grad()
def evaluate_robustness(model: nn.Module, data: Dataset, clean: Split, corrupted: np.ndarray,
                        batch_size: int = 500, informative: list[str] | None = None) -> Robustness:
    """``model`` on the clean subset and every corrupted copy. ``informative``: the dense model's
    informative corruptions (:func:`informative_corruptions`); None when ``model`` is the dense
    model itself (decided from its own accuracies)."""
    clean_acc = evaluate(model, data, clean, batch_size)
    acc = np.zeros(corrupted.shape[:2])
    for ci in range(corrupted.shape[0]):
        for si in range(corrupted.shape[1]):
            acc[ci, si] = evaluate(model, data, Split(corrupted[ci, si], clean.y), batch_size)
    c_acc = float(acc.mean())
    per_corruption = {name: float(acc[i].mean()) for i, name in enumerate(CORRUPTIONS)}
    if informative is None:
        informative = informative_corruptions(per_corruption, data.num_classes)
    return Robustness(
        clean_acc=clean_acc, corruption_acc=c_acc, R_C=c_acc / clean_acc if clean_acc > 0 else 0.0,
        per_corruption=per_corruption,
        per_severity={int(s): float(acc[:, i].mean()) for i, s in enumerate(SEVERITIES)},
        eval_images=len(clean), informative=list(informative),
        informative_acc=float(np.mean([per_corruption[c] for c in informative])) if informative else float("nan"),
    )
