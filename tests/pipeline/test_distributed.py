"""Two gloo processes train and prune one model: identical on both ranks, each trained on its shard."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import latprune
from latprune.latency_tables.endtoend import PairConfig
from latprune.models.graph import ModelGraph
from latprune.pipeline.adasap import OptimizerConfig
from latprune.pipeline.plan import PlanConfig, build_plan
from latprune.pipeline.schedule import ScheduleConfig, TrainPruneConfig, train_and_prune_
from latprune.pipeline.train import TrainConfig
from latprune.testing import FakeBackend, fake_table, residual_net, tiny_dataset

SHAPE = (3, 16, 16)


def _job(out_dir, method):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, data = residual_net(), tiny_dataset(64, SHAPE)
    table = fake_table(model, SHAPE)
    final = build_plan(ModelGraph(model, SHAPE), table, 0.5 * table.dense_ms, PlanConfig(importance="magnitude"))
    res = train_and_prune_(model, data, table, final,
                           TrainPruneConfig(
                               plan=PlanConfig(importance="magnitude"),
                               schedule=ScheduleConfig(warmup_epochs=0.5, prune_steps=2, prune_every=2,
                                                       checkpoint_every=2),
                               optimizer=OptimizerConfig(method=method, rho=0.1, rho_max=0.1),
                               finetune=TrainConfig(epochs=0.5, batch_size=8, warmup_iters=1)),
                           SHAPE, progress=False, checkpoint=out_dir / "ckpt.pt", key="ddp")
    return model.state_dict(), res.history


def _rank(r, world, init, out_dir, method):
    dist.init_process_group("gloo", init_method=init, rank=r, world_size=world)
    try:
        state, history = _job(out_dir, method)
        torch.save({"model": state, "history": history}, out_dir / f"rank{r}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["adasap", "sgd"])
def test_two_gloo_ranks_end_with_identical_models(tmp_path, method):
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", tmp_path, method), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["history"] == b["history"] and len(a["history"]) == 2  # the same removals on both ranks
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    single, _ = _job(tmp_path, method)  # one process, whole batches
    assert any(not torch.equal(single[k], a["model"][k]) for k in single if single[k].shape == a["model"][k].shape), \
        "each rank must train on its own shard of the batch"
    assert not (tmp_path / "ckpt.pt").exists()


def _user_rank(r, world, init, out_dir):
    """The README's loop under DDP: a pruner on every rank over ``ddp.module``, re-wrapped after each step."""
    dist.init_process_group("gloo", init_method=init, rank=r, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = residual_net()
        table = fake_table(model, SHAPE)
        pruner = latprune.LatencyPruner(model, torch.zeros(1, *SHAPE), 0.5, table=table,
                                        runtime=FakeBackend(intercept_ms=0.3 * table.dense_ms), steps=2, every=2,
                                        timing=PairConfig(rounds=1, min_round_s=0.01, repeats=1, max_repeats=1))
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(0)  # every rank draws the same global batch and trains on its half
        for it in range(6):
            x, y = torch.randn(8, *SHAPE, generator=g), torch.randint(0, 10, (8,), generator=g)
            nn.functional.cross_entropy(ddp(x[r::world]), y[r::world]).backward()
            pruner.observe()
            opt.step()
            opt.zero_grad()
            if pruner.due(it):
                pruner.step(opt)
                ddp = latprune.rewrap_ddp(ddp)
        v = pruner.verify(opt)
        torch.save({"params": dict(model.named_parameters()), "history": pruner.history, "action": v.action,
                    "wrapped": ddp.module is model, "floor": pruner.min_widths}, out_dir / f"user{r}.pt")
    finally:
        dist.destroy_process_group()


def test_a_user_loop_under_ddp_prunes_the_same_channels_on_every_rank(tmp_path):
    mp.spawn(_user_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", tmp_path), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"user{r}.pt", weights_only=False) for r in (0, 1))
    assert len(a["history"]) == 2 and a["history"] == b["history"]
    assert a["action"] == b["action"] == "removed"  # rank 0's measurement, one corrective removal on both
    assert a["wrapped"] and b["wrapped"]
    assert a["floor"] and a["floor"] == b["floor"]  # rank 0's one-shot floor, on every rank
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
