"""A train-and-prune job for the resume tests, run as its own process so it can be SIGKILLed.

python _schedule_job.py CKPT OUT METHOD TARGET [KILL_PHASE KILL_ITER]
Writes OUT (the final state_dict and history) unless killed. $JOB_IMPORTANCE picks the criterion
(default magnitude).
"""
import os
import signal
import sys

import torch

from latprune.io import save_torch_atomic
from latprune.models.graph import ModelGraph
from latprune.pipeline.adasap import OptimizerConfig
from latprune.pipeline.plan import PlanConfig, build_plan
from latprune.pipeline.schedule import ScheduleConfig, TrainPruneConfig, train_and_prune_
from latprune.pipeline.train import TrainConfig
from latprune.testing import fake_table, residual_net, tiny_dataset

SHAPE = (3, 16, 16)


def main(ckpt, out, method, target, kill_phase=None, kill_iter=None):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, data = residual_net(), tiny_dataset(64, SHAPE)
    table = fake_table(model, SHAPE)
    final = build_plan(ModelGraph(model, SHAPE), table, 0.5 * table.dense_ms, PlanConfig())
    sched = ScheduleConfig(warmup_epochs=0.5, prune_steps=3, prune_every=2, checkpoint_every=2,
                           target=target, param_ratio=0.5 if target == "params" else None)

    def hook(phase, it):
        if phase == kill_phase and it == int(kill_iter):
            os.kill(os.getpid(), signal.SIGKILL)

    res = train_and_prune_(model, data, table, final,
                           TrainPruneConfig(
                               plan=PlanConfig(importance=os.environ.get("JOB_IMPORTANCE", "magnitude"),
                                               halp_batches=2),
                               schedule=sched,
                               optimizer=OptimizerConfig(method=method, rho=0.1, rho_max=0.1),
                               finetune=TrainConfig(epochs=0.5, batch_size=8, warmup_iters=1)),
                           SHAPE, progress=False, checkpoint=__import__("pathlib").Path(ckpt), key="job", hook=hook)
    save_torch_atomic({"model": model.state_dict(), "history": res.history, "resumed": res.resumed}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
