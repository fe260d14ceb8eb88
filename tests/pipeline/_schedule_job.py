"""A train-and-prune job for the resume tests, run as its own process so it can be SIGKILLed.

python _schedule_job.py CKPT OUT METHOD TARGET [KILL_PHASE KILL_ITER]
Writes OUT (the final state_dict and history) unless killed. $JOB_IMPORTANCE picks the criterion
(default magnitude); $JOB_GOAL=1 holds a latency target to its budget on a FakeBackend that the
table under-predicts, so the corrective phase removes and fine-tunes.
"""
import copy
import os
import signal
import sys

import torch

from latprune.io import save_torch_atomic
from latprune.latency_tables.endtoend import PairConfig, measure_speedup
from latprune.models.graph import ModelGraph
from latprune.pipeline.adasap import OptimizerConfig
from latprune.pipeline.plan import PlanConfig, build_plan
from latprune.pipeline.schedule import LatencyGoal, ScheduleConfig, TrainPruneConfig, train_and_prune_
from latprune.pipeline.train import TrainConfig
from latprune.testing import FakeBackend, fake_table, residual_net, tiny_dataset

SHAPE = (3, 16, 16)


def main(ckpt, out, method, target, kill_phase=None, kill_iter=None):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, data = residual_net(), tiny_dataset(64, SHAPE)
    table = fake_table(model, SHAPE)
    final = build_plan(ModelGraph(model, SHAPE), table, 0.5 * table.dense_ms, PlanConfig(importance="magnitude"))
    sched = ScheduleConfig(warmup_epochs=0.5, prune_steps=3, prune_every=2, checkpoint_every=2, correct_iters=4,
                           target=target, param_ratio=0.5 if target == "params" else None)
    goal = None
    if os.environ.get("JOB_GOAL"):
        backend, dense = FakeBackend(intercept_ms=0.3 * table.dense_ms), copy.deepcopy(model).eval()
        one = PairConfig(rounds=1, min_round_s=0.01, repeats=1, max_repeats=1)
        goal = LatencyGoal(lambda m: measure_speedup(backend, dense, copy.deepcopy(m).eval(), SHAPE, one).ratio,
                           0.5 / 0.935)

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
                           SHAPE, progress=False, checkpoint=__import__("pathlib").Path(ckpt), key="job", hook=hook,
                           goal=goal)
    save_torch_atomic({"model": model.state_dict(), "history": res.history, "resumed": res.resumed,
                       "corrections": res.corrections}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
