"""``latprune run`` killed (SIGKILL) in every stage, or failed by a full disk in the middle of a write,
then run again with the same ``--out``: it ends with the model an uninterrupted run makes, bit for
bit, and nothing under a final name was ever partial (issue 15).

On the deterministic FakeBackend (``_fake_run.py``) with a tiny ``module:factory`` model: on a real
runtime the closed loop's decisions follow measured latency, and two runs could differ.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli.test_bad_input import fashion_folder

JOB = Path(__file__).with_name("_fake_run.py")
ARGS = ["run", "--model", "latprune.testing:residual_net", "--no-progress", "--val-size", "16",
        "--pretrain-epochs", "1", "--finetune-epochs", "1", "--batch-size", "16", "--deploy-batch", "4",
        "--warmup-epochs", "0.5", "--prune-steps", "2", "--prune-every", "2", "--checkpoint-every", "2",
        "--robust-images", "4", "--search", "0", "--fit-configs", "1", "--calibrate-iters", "2",
        "--verify-rounds", "1", "--budget", "0.6",
        "--round-to", "4"]  # finer than the table's step 8: the plan stage measures grid lines (plan_table.json)


def _run(tmp: Path, data: Path, out: str, cache: str, stage="none", n=0, fault=None):
    argv = [*ARGS, "--data", str(data), "--out", str(tmp / out), "--cache-dir", str(tmp / cache)]
    cmd = [sys.executable, str(JOB), stage, str(n), *([fault] if fault else []), "--", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp)


def _no_partial_file(run_dir: Path) -> None:
    """Every artifact under its final name is whole: JSON parses, checkpoints and weights load."""
    for p in run_dir.iterdir():
        if p.name.startswith("."):
            continue  # a temporary file a kill left behind: never under a final name, removed on resume
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".pt":
            torch.load(p, weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    data = fashion_folder(tmp / "data", n_train=160, n_test=16)
    p = _run(tmp, data, "ref", "ref-cache")
    assert p.returncode in (0, 4), p.stderr[-3000:]
    assert json.loads((tmp / "ref" / "calibration.json").read_text())["table"] == "plan_table.json"
    return tmp, data, tmp / "ref"


def _same_model(a: Path, b: Path) -> None:
    x, y = torch.load(a / "model.pt", weights_only=True), torch.load(b / "model.pt", weights_only=True)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k
    assert json.loads((a / "plan.json").read_text()) == json.loads((b / "plan.json").read_text())
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert ra["compact"]["accuracy"] == rb["compact"]["accuracy"]
    assert ra["robustness"]["corruption_acc"] == rb["robustness"]["corruption_acc"]


@pytest.mark.slow
@pytest.mark.parametrize("stage,n", [("dense", 7), ("profile", 5), ("plan", 2), ("prune", 5), ("export", 2),
                                     ("robustness", 100)])
def test_killed_in_every_stage_resumes_to_the_same_model(reference, stage, n):
    tmp, data, ref = reference
    killed = _run(tmp, data, f"k-{stage}", f"k-{stage}-cache", stage, n)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = tmp / f"k-{stage}"
    assert not (run_dir / "report.json").exists()
    _no_partial_file(run_dir)
    resumed = _run(tmp, data, f"k-{stage}", f"k-{stage}-cache")
    assert resumed.returncode in (0, 4), resumed.stderr[-3000:]
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")], "stale temporary files removed"
    _same_model(ref, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("n,part", [(0, "checkpoints/dense-"), (1, "tables/"), (2, "training.ckpt.pt"),
                                    (3, "model.onnx"), (4, "corruptions/"), (5, "report.json")])
def test_a_full_disk_mid_write_is_one_line_and_the_next_run_resumes(reference, n, part):
    """Cache entries (pre-trained checkpoint, table, corrupted set), the training checkpoint, an ONNX
    file and the report, each failing half-way through its write."""
    tmp, data, ref = reference
    failed = _run(tmp, data, f"f-{n}", f"f-{n}-cache", "write", part, "enospc")
    assert failed.returncode == 2, failed.stderr[-3000:]
    lines = [ln for ln in failed.stderr.splitlines() if ln.startswith("latprune")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "Traceback" not in failed.stderr
    written = lines[0].split("cannot write ")[1].split(": ")[0]
    assert part in written and not Path(written).exists(), "nothing partial under the final name"
    assert not list(Path(written).parent.glob(".*.tmp")), "the temporary file is removed"
    run_dir = tmp / f"f-{n}"
    if run_dir.exists():
        _no_partial_file(run_dir)
    again = _run(tmp, data, f"f-{n}", f"f-{n}-cache")
    assert again.returncode in (0, 4), again.stderr[-3000:]
    _same_model(ref, run_dir)


@pytest.mark.slow
def test_damaged_cache_entries_are_named_deleted_and_rebuilt(reference):
    """The reference run's cache, damaged: a byte of the pre-trained checkpoint flipped, the table
    truncated, the corrupted set's digest lost. A new run names each, rebuilds it, and trains the
    same model."""
    tmp, data, ref = reference
    cache = tmp / "ref-cache"
    ckpt = next((cache / "checkpoints").glob("dense-*.pt"))
    blob = bytearray(ckpt.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(blob))
    table = next((cache / "tables").glob("*.json"))
    table.write_text(table.read_text()[:100])
    corrupted = next((cache / "corruptions").glob("*.npy"))
    corrupted.with_name(f".{corrupted.name}.sha256").unlink()
    p = _run(tmp, data, "rebuilt", "ref-cache")
    assert p.returncode in (0, 4), p.stderr[-3000:]
    damaged = [ln for ln in p.stderr.splitlines() if "is damaged" in ln]
    assert sorted(Path(ln.split("cached ")[1].split(" is damaged")[0]) for ln in damaged) == sorted(
        [ckpt, table, corrupted]), damaged
    assert "sha256 does not match" in " ".join(damaged) and "no digest recorded" in " ".join(damaged)
    _same_model(ref, tmp / "rebuilt")
    for f in (ckpt, table, corrupted):
        assert f.with_name(f".{f.name}.sha256").exists(), "rebuilt and sealed again"
