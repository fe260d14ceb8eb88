"""A train-and-prune run killed with SIGKILL and resumed ends bit for bit where an uninterrupted run does."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

JOB = Path(__file__).with_name("_schedule_job.py")


def _run(tmp, name, method, target, kill=(), importance="magnitude"):
    ckpt, out = tmp / f"{name}.ckpt.pt", tmp / f"{name}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JOB_IMPORTANCE": importance,
           "JOB_GOAL": "1" if importance == "halp" else ""}
    p = subprocess.run([sys.executable, str(JOB), str(ckpt), str(out), method, target, *map(str, kill)],
                       capture_output=True, text=True, env=env, timeout=300)
    return p, ckpt, out


@pytest.mark.parametrize("method,target,kill,importance", [
    ("adasap", "latency", ("pruning", 5), "magnitude"),  # between removals, one iteration after a checkpoint
    ("sgd", "params", ("finetune", 3), "magnitude"),
    ("adasap", "latency", ("warmup", 1), "magnitude"),  # before any checkpoint: starts over
    ("sam", "latency", ("warmup", 3), "halp"),  # after a checkpoint that holds the value accumulated so far
    ("sgd", "latency", ("correct1", 3), "halp"),  # inside the fine-tuning after a corrective removal
    # one iteration into fine-tuning: from the phase-boundary checkpoint, whose carried optimizer
    # state (momentum) and place in the one learning-rate schedule must continue exactly
    ("asam", "latency", ("finetune", 1), "magnitude"),
])
def test_sigkilled_run_resumes_to_the_same_model(tmp_path, method, target, kill, importance):
    ref, _, ref_out = _run(tmp_path, "ref", method, target, importance=importance)
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed, ckpt, out = _run(tmp_path, "job", method, target, kill, importance)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists()
    assert ckpt.exists() == (kill != ("warmup", 1))
    resumed, _, _ = _run(tmp_path, "job", method, target, importance=importance)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(ref_out, weights_only=True)
    b = torch.load(out, weights_only=True)
    assert a["history"] == b["history"] and a["corrections"] == b["corrections"]
    if kill[0] == "correct1":
        assert [c["action"] for c in a["corrections"]][0] == "removed"
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bit for bit, BN buffers included
    if kill != ("warmup", 1):
        assert b["resumed"] and b["resumed"][0]["phase"] == kill[0].rstrip("0123456789")  # correct1: phase correct
        assert b["resumed"][0]["iteration"] < kill[1]  # it really picked up from a checkpoint
    assert not ckpt.exists()  # removed once the run finished
