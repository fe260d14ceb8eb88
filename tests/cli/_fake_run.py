"""``latprune run`` on the deterministic FakeBackend, as its own process, killed or failed on cue.

python _fake_run.py STAGE N -- ARGV...
python _fake_run.py write PATH_PART enospc -- ARGV...

Runs ``latprune.cli.main(ARGV)`` with ``latprune.testing.FakeBackend`` in place of the runtime (every
latency known exactly, so two runs make the same decisions), and on the N-th event of STAGE either
SIGKILLs itself; ``write PATH_PART enospc`` makes the first write of a file whose path holds
PATH_PART fail half-way with ENOSPC. STAGE ``none`` runs to the end. The events:
  dense      an optimizer step of pre-training     profile  a layer timed for the table
  plan       a whole model timed by the closed loop prune  an optimizer step of warm-up/pruning/fine-tuning
  export     a file written by the export stage    robustness  an image corrupted for the robustness set
"""
import os
import signal
import sys

import torch

import latprune.io as lio
import latprune.pipeline.run as run_module
import latprune.pipeline.stages as stages
from latprune.cli import main
from latprune.testing import DiskFull, FakeBackend

STAGE_FUNCS = {"dense": "dense_stage", "profile": "profile_stage", "plan": "plan_stage", "prune": "prune_stage",
               "export": "export_stage", "robustness": "evaluate_stage"}
current = {"stage": None}
count = {"n": 0}


def fire(stage: str, target: str, n: int, fault: str | None) -> bool:
    """Count an event of ``stage``; True when it is the one to act on."""
    if stage != target:
        return False
    count["n"] += 1
    if count["n"] != n:
        return False
    if fault is None:
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def install(target: str, n: int | str, fault: str | None) -> None:
    torch.set_num_threads(1)
    stages.get_backend = lambda runtime, threads, batch, precision="fp32": FakeBackend(batch=batch)
    for name, func in STAGE_FUNCS.items():
        def wrapped(*a, _f=getattr(stages, func), _name=name, **k):
            current["stage"] = _name
            return _f(*a, **k)

        setattr(run_module, func, wrapped)

    step = torch.optim.SGD.step

    def counted_step(self, *a, **k):
        fire(current["stage"], target, n, fault)
        return step(self, *a, **k)

    torch.optim.SGD.step = counted_step
    layer, model = FakeBackend._layer_runner, FakeBackend._model_runner

    def counted_layer(self, *a, **k):
        fire("profile" if current["stage"] == "profile" else None, target, n, fault)
        return layer(self, *a, **k)

    def counted_model(self, *a, **k):
        fire("plan" if current["stage"] == "plan" else None, target, n, fault)
        return model(self, *a, **k)

    FakeBackend._layer_runner, FakeBackend._model_runner = counted_layer, counted_model
    write = lio.write_atomic

    def counted_write(path, w):
        if fault is None:
            fire("export" if current["stage"] == "export" else None, target, n, fault)
        elif n in str(path) and not count["n"]:
            count["n"] = 1
            return write(path, lambda f: w(DiskFull(f)))
        return write(path, w)

    lio.write_atomic = counted_write
    import imagecorruptions

    corrupt = imagecorruptions.corrupt

    def counted_corrupt(*a, **k):
        fire("robustness" if current["stage"] == "robustness" else None, target, n, fault)
        return corrupt(*a, **k)

    imagecorruptions.corrupt = counted_corrupt


if __name__ == "__main__":
    sep = sys.argv.index("--")
    head, argv = sys.argv[1:sep], sys.argv[sep + 1:]
    fault = head[2] if len(head) > 2 else None
    install(head[0], head[1] if fault else int(head[1]), fault)
    sys.exit(main(argv))
