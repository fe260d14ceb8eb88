"""The examples in examples/ run as README shows, at miniature size: a coarse table (step 32: the 16-channel
groups cannot narrow on it, so the reachable floor is ~0.79 of dense and the budget 0.85), a few iterations."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_classification_example_prunes_verifies_and_exports(tmp_path):
    out = tmp_path / "deploy"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "classification.py"), "--budget", "0.85",
                        "--iterations", "24", "--steps", "2", "--profile-step", "32", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Verification(measured_ratio=" in r.stdout and "test accuracy" in r.stdout
    report = json.loads((out / "export.json").read_text())
    assert report["parity"]["ok"] and report["shrink"]["ok"]
    assert (out / "model.onnx").stat().st_size < (out / "dense.onnx").stat().st_size
