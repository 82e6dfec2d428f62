"""train.weight_sync=broadcast: the learner's weights reach the rollout actors by a bucketed
collective (gloo here; NCCL on GPUs), and a restarted actor still gets them."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from learner.config import ConfigError, load_config
from learner.distributed import free_port
from actors.weight_sync import BroadcastGroup, bucket_plan


def test_bucket_plan_groups_by_size_and_dtype():
    tensors = [torch.zeros(100), torch.zeros(15), torch.zeros(200), torch.zeros(2, dtype=torch.int64), torch.zeros(3)]
    assert bucket_plan(tensors, 500) == [[0, 1], [2], [3], [4]]  # 460 B; 800 B alone; int64; float again
    assert bucket_plan(tensors, 1 << 20) == [[0, 1, 2], [3], [4]]


def _member(rank, port, world, out):
    group = BroadcastGroup("127.0.0.1", port, rank, world, timeout_s=60)
    tensors = [torch.full((300,), float(rank)), torch.full((4, 5), rank + 0.5), torch.arange(3) * (rank + 1)]
    sent = group.broadcast_(tensors, bucket_bytes=1024)
    out.put((rank, sent, [t.tolist() for t in tensors]))


@pytest.mark.integration  # three processes in one collective group (about a minute)
def test_broadcast_overwrites_every_member_with_rank_zeros_tensors():
    ctx = mp.get_context("spawn")
    out, port, world = ctx.Queue(), free_port(), 3
    procs = [ctx.Process(target=_member, args=(rank, port, world, out)) for rank in range(world)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    expected = [[0.0] * 300, [[0.5] * 5] * 4, [0, 1, 2]]
    assert all(tensors == expected for _, _, tensors in results)
    assert {sent for _, sent, _ in results} == {300 * 4 + 20 * 4 + 3 * 8}


def test_broadcast_needs_the_same_device_kind_on_both_sides():
    with pytest.raises(ConfigError, match="same kind of device"):
        load_config(["train.weight_sync=broadcast", "train.num_gpus=1"])
    with pytest.raises(ConfigError, match="object_store or broadcast"):
        load_config(["train.weight_sync=nccl"])


@pytest.mark.integration
@pytest.mark.usefixtures("local_ray")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_full_finetuning_run_syncs_by_broadcast(tmp_path, tiny_model_dir, fault=True):
    """Every epoch samples with exactly the learner's weights (recompute gap 0), also after a
    rollout actor died: it catches up from the object store, and the group is rebuilt."""
    from learner.driver import run

    faults = ["faults.role=rollout", "faults.mode=exit", "faults.epoch=1", "faults.batch=0"] if fault else []
    run_dir = run(load_config([
        f"model.path={tiny_model_dir}", f"run.output_dir={tmp_path}", "model.finetune=full",
        "train.weight_sync=broadcast", "rollout.num_workers=2", "reward.kind=brightness", "reward.alignment=null",
        "sampling.num_steps=2", "prompts.limit=2", "rollout.batch_size=2", "train.samples_per_epoch=4", "train.group_size=1",
        "train.epochs=3", "eval.prompts_file=null", "run.samples_to_save=1", *faults]))
    m = pd.read_parquet(run_dir.path / "metrics.parquet")
    assert m["epoch"].tolist() == [0, 1, 2]
    assert (m["logprob_recompute_gap"] < 1e-5).all()  # sampled with the learner's weights
    assert (m["sync_bytes"] > 1e6).all()  # the whole UNet, by broadcast
    if fault:
        assert m["rollout_restarts"].iloc[-1] >= 1
