"""The examples in examples/ run as README shows, at miniature size: a coarse table (step 32: the 16-channel
groups cannot narrow on it, so the reachable floor is ~0.79 of dense, give or take the
fit's noise, and the budget 0.9), a few iterations."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_classification_example_prunes_verifies_and_exports(tmp_path):
    out = tmp_path / "deploy"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "classification.py"), "--budget", "0.9",
                        "--iterations", "24", "--steps", "2", "--profile-step", "32", "--fit-configs", "2",
                        "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Verification(measured_ratio=" in r.stdout and "test accuracy" in r.stdout
    report = json.loads((out / "export.json").read_text())
    assert report["parity"]["ok"] and report["shrink"]["ok"]
    assert (out / "model.onnx").stat().st_size < (out / "dense.onnx").stat().st_size


@pytest.mark.slow
def test_detection_example_prunes_the_backbone_keeps_the_heads_and_exports_raw_outputs(tmp_path):
    out, summary = tmp_path / "deploy", tmp_path / "summary.json"
    # a 64 x 64 canvas at batch 2 is overhead-bound (the table's floor is high): budget 0.95 here
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "detection.py"), "--canvas", "64", "--train", "64",
                        "--test", "32", "--epochs", "1", "--steps", "2", "--every", "2", "--finetune-epochs", "0.5",
                        "--profile-step", "256", "--fit-configs", "2", "--budget", "0.95", "--deploy-batch", "2",
                        "--dense", str(tmp_path / "dense.pt"), "--out", str(out), "--json", str(summary)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(summary.read_text())
    assert s["parity_ok"] and s["compact_params"] < s["dense_params"] and len(s["removals"]) == 2
    assert set(s["dense_map"]) == {"map_50", "map_50_95", "detections"}
    report = json.loads((out / "export.json").read_text())
    assert set(report["outputs"]) == {"bbox_regression", "cls_logits"} and report["shrink"]["ok"]
    assert (tmp_path / "dense.pt").exists()  # the dense detector is cached for the next run
