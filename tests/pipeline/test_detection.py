"""Synthetic detection data, the SSD's raw heads as a prunable multi-output model, and COCO mAP."""
import numpy as np
import pytest
import torch
from torch import nn

from latprune.errors import BadInput
from latprune.models.graph import ModelGraph
from latprune.pipeline.data import Split
from latprune.pipeline.detection import CanvasConfig, DetectionSet, RawHeads, mean_ap, ssdlite, synthetic_detection

CLASSES = [str(i) for i in range(10)]


def _items(n=50, seed=0):
    """Fashion-MNIST-shaped items: a bright rectangle inside each padded 32 x 32 image."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 3, 32, 32), np.uint8)
    for i in range(n):
        h, w = rng.integers(8, 24, 2)
        x[i, :, 4:4 + h, 6:6 + w] = 200
    return Split(x, rng.integers(0, 10, n))


def test_canvases_are_deterministic_with_boxes_inside_and_labels_shifted_past_background():
    cfg = CanvasConfig(canvas=64, items=(1, 3), scale=(0.75, 1.5), seed=3)
    a, b = synthetic_detection(_items(), 20, cfg, CLASSES), synthetic_detection(_items(), 20, cfg, CLASSES)
    assert torch.equal(a.images, b.images)
    assert all(torch.equal(s["boxes"], t["boxes"]) for s, t in zip(a.targets, b.targets))
    assert a.images.shape == (20, 3, 64, 64) and 0 <= float(a.images.min()) and float(a.images.max()) <= 1
    for img, t in zip(a.images, a.targets):
        assert 1 <= len(t["boxes"]) <= 3 and t["labels"].min() >= 1 and t["labels"].max() <= 10
        bx = t["boxes"]
        assert (bx[:, :2] >= 0).all() and (bx[:, 2:] <= 64).all() and (bx[:, 2:] > bx[:, :2]).all()
        for x1, y1, x2, y2 in bx.int().tolist():  # every box holds its item's pixels, the border touches them
            assert img[0, y1:y2, x1:x2].max() > 0.1
    assert synthetic_detection(_items(), 20, CanvasConfig(canvas=64, seed=4), CLASSES).images.ne(a.images).any()


def test_bad_canvas_settings_are_refused():
    with pytest.raises(BadInput, match="smaller than the largest item"):
        CanvasConfig(canvas=32)
    with pytest.raises(BadInput, match="Fashion-MNIST"):
        synthetic_detection(Split(np.zeros((4, 3, 28, 28), np.uint8), np.zeros(4, int)), 2, CanvasConfig(64), CLASSES)


def test_raw_heads_are_a_multi_output_model_whose_heads_are_never_pruned():
    ssd = ssdlite(10, 64)
    raw = RawHeads(ssd)
    out = raw(torch.zeros(2, 3, 64, 64))
    assert set(out) == {"bbox_regression", "cls_logits"} and out["cls_logits"].shape[-1] == 11
    graph = ModelGraph(raw, (3, 64, 64), ["ssd.head"])
    assert graph.groups and not any(p.startswith("ssd.head") for g in graph.groups for p in g.producers)
    assert any(n.startswith("ssd.head.classification_head") for n in graph.classifier)


class _Oracle(nn.Module):
    """An 'SSD' whose eval-mode output is the ground truth (score 1) for the images it is shown."""

    def __init__(self, data: DetectionSet, shift: float = 0.0):
        super().__init__()
        self.data, self.shift, self.seen = data, shift, 0

    def forward(self, images):
        out = []
        for _ in images:
            t = self.data.targets[self.seen]
            out.append({"boxes": t["boxes"] + self.shift, "scores": torch.ones(len(t["boxes"])),
                        "labels": t["labels"]})
            self.seen += 1
        return out


def test_mean_ap_is_one_for_the_ground_truth_and_falls_when_boxes_move():
    data = synthetic_detection(_items(), 12, CanvasConfig(canvas=64, seed=0), CLASSES)
    boxes = sum(len(t["boxes"]) for t in data.targets)
    assert mean_ap(_Oracle(data), data, batch_size=5) == pytest.approx({"map_50": 1.0, "map_50_95": 1.0,
                                                                         "detections": boxes})
    moved = mean_ap(_Oracle(data, shift=4.0), data, batch_size=5)
    assert moved["map_50_95"] < moved["map_50"] <= 1.0 and moved["map_50_95"] < 0.9
