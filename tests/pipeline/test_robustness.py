import numpy as np
import pytest
import torch

from latprune.errors import BadInput
from latprune.pipeline.robustness import (
    CORRUPTIONS,
    RobustnessConfig,
    corrupted_test_set,
    evaluate_robustness,
    informative_corruptions,
)
from latprune.testing import tiny_dataset


def _data():
    d = tiny_dataset(64, (3, 16, 16))
    rng = np.random.default_rng(1)
    d.test.x = rng.integers(0, 255, (6, 3, 32, 32), dtype=np.uint8)
    d.test.y = np.arange(6) % 10
    return d


def test_corrupted_set_is_generated_deterministically_and_cached(tmp_path):
    d = _data()
    clean, arr = corrupted_test_set(d, 4, tmp_path, seed=0, progress=False)
    assert arr.shape == (15, 5, 4, 3, 32, 32) and arr.dtype == np.uint8 and len(clean) == 4
    assert not np.array_equal(arr[0, 0], clean.x)  # gaussian noise changed the pixels
    assert np.abs(arr[0, 4].astype(int) - clean.x).mean() > np.abs(arr[0, 0].astype(int) - clean.x).mean()
    entry = next((tmp_path / "corruptions").glob("*.npy"))  # the set and its digest, no temporary file
    assert sorted(f.name for f in entry.parent.iterdir()) == [f".{entry.name}.sha256", entry.name]
    again_dir = tmp_path / "again"
    _, arr2 = corrupted_test_set(d, 4, again_dir, seed=0, progress=False)
    np.testing.assert_array_equal(arr, arr2)  # same seed, same set
    _, cached = corrupted_test_set(d, 4, tmp_path, seed=0, progress=False)
    np.testing.assert_array_equal(arr, cached)


class _Oracle(torch.nn.Module):
    """Predicts the label stored in pixel (0,0,0) of the raw image: right on clean images only."""

    def __init__(self, data):
        super().__init__()
        self.mean, self.std = data.mean[0], data.std[0]

    def forward(self, x):
        raw = torch.round((x[:, 0, 0, 0] * self.std + self.mean) * 255).long()
        return torch.nn.functional.one_hot(raw.clamp(0, 9), 10).float()


def test_metrics_by_hand(tmp_path):
    d = _data()
    d.test.x[:, 0, 0, 0] = d.test.y  # the oracle reads the label from a pixel
    clean, arr = corrupted_test_set(d, 6, tmp_path, progress=False)
    arr[:] = clean.x  # corrupted copies identical to clean, except one corruption that breaks the oracle
    arr[CORRUPTIONS.index("fog"), :, :, 0, 0, 0] = 200
    r = evaluate_robustness(_Oracle(d), d, clean, arr)
    assert r.clean_acc == 1.0
    assert r.per_corruption["fog"] == 0.0 and r.per_corruption["snow"] == 1.0
    assert r.corruption_acc == pytest.approx(14 / 15) and r.R_C == pytest.approx(14 / 15)
    assert r.eval_images == 6
    # fog is at 0 for the dense model: not informative; the other 14 are (accuracy 1 > 1.5 x 0.1)
    assert r.informative == [c for c in CORRUPTIONS if c != "fog"] and r.informative_acc == 1.0
    # another model is judged on the dense model's list, not its own
    arr[CORRUPTIONS.index("snow"), :, :, 0, 0, 0] = 200
    other = evaluate_robustness(_Oracle(d), d, clean, arr, informative=r.informative)
    assert other.informative == r.informative and other.informative_acc == pytest.approx(13 / 14)


def test_informative_corruptions_are_those_above_one_and_a_half_times_chance():
    per = {c: 0.1 for c in CORRUPTIONS} | {"fog": 0.151, "snow": 0.15, "frost": 0.9}
    assert informative_corruptions(per, num_classes=10) == ["frost", "fog"]  # CORRUPTIONS order; 0.15 is not above
    assert informative_corruptions(per, num_classes=2) == ["frost"]  # chance 0.5: above 0.75


def test_negative_image_count_is_refused():
    with pytest.raises(BadInput, match="--robust-images"):
        RobustnessConfig(images=-1)
