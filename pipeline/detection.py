"""A detector pruned to a latency budget (issue 13): synthetic detection data made from Fashion-MNIST,
torchvision's SSDlite-MobileNetV3 sized for it, its raw head outputs as the model latprune prunes,
times and exports, and COCO mAP.

- :func:`synthetic_detection`: Fashion-MNIST items pasted at random positions and scales on black
  canvases; each item's box is the tight box of its non-zero pixels, its label its class + 1 (0 is
  torchvision's background). Deterministic in ``CanvasConfig.seed``; training canvases take items
  from the training split, test canvases from the test split.
- :func:`ssdlite`: ``ssdlite320_mobilenet_v3_large`` with random weights (nothing is downloaded)
  and its transform's fixed 320 x 320 size replaced by the canvas size.
- :class:`RawHeads`: the SSD without its transform and post-processing: input normalisation,
  backbone, head; returns ``{"bbox_regression", "cls_logits"}`` per anchor. What is pruned (its
  modules are the SSD's own, so pruning it prunes the SSD), timed and exported; box decoding and
  NMS stay in the deployer's runtime.
- :func:`detection_loss` trains the SSD on a batch (torchvision's own matching and losses);
  :func:`mean_ap` evaluates it with pycocotools (``pip install latprune[detection]``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
from typing import Iterator

import numpy as np
import torch
from torch import nn

from latprune.errors import BadInput
from latprune.pipeline.data import Split

__all__ = ["CanvasConfig", "DetectionSet", "synthetic_detection", "ssdlite", "RawHeads", "detection_loss",
           "mean_ap"]

ITEM = 28  # a Fashion-MNIST item's side in pixels


@dataclasses.dataclass(frozen=True)
class CanvasConfig:
    canvas: int = 96  # side of the square canvas, pixels
    items: tuple[int, int] = (1, 3)  # items per canvas, inclusive
    scale: tuple[float, float] = (0.75, 1.75)  # an item's side is ITEM x scale
    max_iou: float = 0.2  # placements overlapping an earlier box more are drawn again (10 tries)
    seed: int = 0

    def __post_init__(self):
        if self.canvas < ITEM * self.scale[1]:
            raise BadInput(f"canvas {self.canvas} is smaller than the largest item ({ITEM * self.scale[1]:.0f} px): "
                           "enlarge the canvas or lower the scale")
        if not 1 <= self.items[0] <= self.items[1]:
            raise BadInput(f"items must be (min, max) with 1 <= min <= max, got {self.items}")


@dataclasses.dataclass
class DetectionSet:
    images: torch.Tensor  # (N, 3, C, C) float in [0, 1]
    targets: list[dict[str, torch.Tensor]]  # boxes (K, 4) x1 y1 x2 y2 in pixels, labels (K,) int64 in 1..classes
    classes: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, shuffle: bool = False, rng: np.random.Generator | None = None,
                limit: int = 0) -> Iterator[tuple[torch.Tensor, list[dict[str, torch.Tensor]]]]:
        n = len(self) if not limit else min(limit, len(self))
        order = (rng or np.random.default_rng()).permutation(len(self))[:n] if shuffle else np.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            yield self.images[idx], [self.targets[j] for j in idx]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def synthetic_detection(split: Split, n: int, cfg: CanvasConfig, classes: list[str]) -> DetectionSet:
    """``n`` canvases of ``cfg.canvas`` pixels with items from ``split`` (Fashion-MNIST, padded to
    32 x 32 and repeated to 3 channels by ``pipeline.data``: the 28 x 28 item is cut back out)."""
    if split.x.shape[-1] != 32 or len(split) == 0:
        raise BadInput("synthetic detection data is made from Fashion-MNIST items (32 x 32 padded): load "
                       "--data fashion-mnist")
    rng = np.random.default_rng(cfg.seed)
    items = torch.from_numpy(split.x[:, :1, 2:30, 2:30].astype(np.float32) / 255.0)
    c = cfg.canvas
    images = torch.zeros(n, 3, c, c)
    targets = []
    for i in range(n):
        boxes, labels = [], []
        for _ in range(int(rng.integers(cfg.items[0], cfg.items[1] + 1))):
            j = int(rng.integers(len(split)))
            side = int(round(ITEM * rng.uniform(*cfg.scale)))
            patch = nn.functional.interpolate(items[j:j + 1], size=(side, side), mode="bilinear",
                                              align_corners=False)[0, 0].clamp_(0, 1)
            ys, xs = torch.nonzero(patch > 0.1, as_tuple=True)
            if len(ys) == 0:
                continue
            for _try in range(10):
                x0, y0 = int(rng.integers(0, c - side + 1)), int(rng.integers(0, c - side + 1))
                box = np.array([x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1],
                               dtype=np.float32)
                if all(_iou(box, b) <= cfg.max_iou for b in boxes):
                    break
            else:
                continue  # no free place on this canvas: one item fewer
            region = images[i, :, y0:y0 + side, x0:x0 + side]
            torch.maximum(region, patch.expand(3, -1, -1), out=region)
            boxes.append(box)
            labels.append(int(split.y[j]) + 1)
        targets.append({"boxes": torch.from_numpy(np.stack(boxes)) if boxes else torch.zeros(0, 4),
                        "labels": torch.tensor(labels, dtype=torch.int64)})
    return DetectionSet(images, targets, list(classes))


def ssdlite(num_classes: int, canvas: int) -> nn.Module:
    """torchvision's SSDlite-MobileNetV3-Large, random weights, for ``num_classes`` object classes
    (plus background) on ``canvas`` x ``canvas`` images."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes + 1)
    model.transform.fixed_size = (canvas, canvas)  # the builder fixes 320 x 320
    model.transform.min_size, model.transform.max_size = (canvas,), canvas
    return model


class RawHeads(nn.Module):
    """An SSD's input normalisation, backbone and head, without transform or post-processing:
    ``x`` (N, 3, H, W) in [0, 1] -> ``{"bbox_regression": (N, A, 4), "cls_logits": (N, A, classes + 1)}``."""

    def __init__(self, ssd: nn.Module):
        super().__init__()
        self.ssd = ssd
        self.register_buffer("mean", torch.tensor(ssd.transform.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(ssd.transform.image_std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.ssd.backbone((x - self.mean) / self.std)
        return self.ssd.head(list(features.values()))


def detection_loss(ssd: nn.Module, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """torchvision's SSD training loss on one batch (anchor matching, box regression, hard-negative
    mined classification); ``ssd`` must be in train mode."""
    losses = ssd(list(images), targets)
    return losses["bbox_regression"] + losses["classification"]


@torch.no_grad()
def mean_ap(ssd: nn.Module, data: DetectionSet, batch_size: int = 32) -> dict[str, float]:
    """COCO box mAP of ``ssd`` on ``data`` (pycocotools): ``map_50`` (IoU 0.5) and ``map_50_95``
    (IoU 0.5:0.95), on every detection the model's post-processing keeps."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise BadInput("mAP needs pycocotools: pip install 'latprune[detection]'") from None
    was_training = ssd.training
    ssd.eval()
    images, annotations, dets = [], [], []
    try:
        for b, (x, tg) in enumerate(data.batches(batch_size)):
            for k, (out, t) in enumerate(zip(ssd(list(x)), tg)):
                img = b * batch_size + k
                images.append({"id": img, "width": x.shape[-1], "height": x.shape[-2]})
                for box, lab in zip(t["boxes"].tolist(), t["labels"].tolist()):
                    annotations.append({"id": len(annotations) + 1, "image_id": img, "category_id": lab, "iscrowd": 0,
                                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                        "area": (box[2] - box[0]) * (box[3] - box[1])})
                for box, score, lab in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
                    dets.append({"image_id": img, "category_id": lab, "score": score,
                                 "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    finally:
        ssd.train(was_training)
    if not dets:
        return {"map_50": 0.0, "map_50_95": 0.0, "detections": 0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": i + 1, "name": c} for i, c in enumerate(data.classes)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map_50": float(ev.stats[1]), "map_50_95": float(ev.stats[0]), "detections": len(dets)}
