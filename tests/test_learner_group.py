"""The data-parallel learner group (train.num_workers = K): K=2 through real Ray learner
actors (torch.distributed, gloo) must take exactly the K=1 step, and stay identical."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import ray
import torch

from actors.batches import RewardResult, RolloutBatch
from learner.config import ConfigError, load_config
from learner.group import LearnerGroup, shard
from learner.trainer import Trainer
from policy.models import load_components
from policy.pipeline import MultiViewPolicy

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("local_ray")]
PROMPTS = ["a red cube", "a blue sphere", "a green cone", "a small yellow torus"]


def learner_config(model_dir, workers: int, *overrides):
    return load_config([f"model.path={model_dir}", "sampling.num_steps=3", "rollout.batch_size=2",
                        "train.samples_per_epoch=8", "train.num_cpus=0.5", "train.torch_threads=1",
                        "train.timeout_s=120", f"train.num_workers={workers}",
                        "eval.prompts_file=null", "reward.alignment=null",
                        # every step trained, uniform prompts, a small lr: the clip, KL and
                        # single-vs-data-parallel tolerances below were sized for them
                        "train.min_relative_step_sigma=0", "train.group_size=1", "train.learning_rate=3e-4",
                        *overrides])


@pytest.fixture(scope="module")
def fixed_epoch(local_ray, tiny_model_dir):
    """One epoch's batches, sampled once at the learner's version-0 weights, as object refs,
    and a function giving the reward-result refs (some rewards NaN, to be dropped).

    4 prompts x 2 samples: fewer than train.tracker_min_count values per prompt, so the
    advantages use the whole batch's mean and std (a per-shard normalisation would differ)."""
    config = learner_config(tiny_model_dir, 1)
    torch.manual_seed(config.run.seed)  # as the learner does: its LoRA initialisation
    policy = MultiViewPolicy(load_components(tiny_model_dir), config.model.finetune, config.model.lora)
    batch_refs, rewards = [], {}
    for b in range(4):
        ids = [f"e0-{2 * b + i}" for i in range(2)]
        prompts = [PROMPTS[(2 * b + i) % 4] for i in range(2)]
        trajectory = policy.sample(prompts, [100 + 2 * b + i for i in range(2)], config.sampling)
        rewards.update(zip(ids, trajectory.views.float().flatten(1).mean(dim=1).double().numpy() / 255.0))
        batch_refs.append(ray.put(RolloutBatch.of(ids, 0, trajectory)))

    def result_refs(nan_rewards=()):
        return [ray.put(RewardResult(ids, np.array([np.nan if s in nan_rewards else rewards[s] for s in ids])))
                for ids in ([f"e0-{2 * b + i}" for i in range(2)] for b in range(4))]

    return batch_refs, result_refs


def weights_of(actor) -> dict[str, torch.Tensor]:
    return ray.get(ray.get(actor.publish.remote())["weights"][0])


def one_update(model_dir, workers, batch_refs, result_refs, *overrides):
    config = learner_config(model_dir, workers, *overrides)
    group = LearnerGroup.start(config, str(model_dir))
    try:
        initial = weights_of(group.actors[0])
        metrics = group.call("train", 0, batch_refs, result_refs, True, 2)
        return initial, metrics, [weights_of(actor) for actor in group.actors]
    finally:
        group.kill()


@pytest.mark.parametrize("overrides, nan_rewards", [
    ((), ()),
    # Several optimizer steps (one per minibatch), half the timesteps drawn at random, an active
    # grad-norm clip, small microbatches, and a dropped sample: rank 0 keeps 3 rows, rank 1 keeps 4.
    (("train.algorithm=ddpo-is", "train.num_minibatches=2", "train.clip_range=0.2",
      "train.timestep_fraction=0.5", "train.max_grad_norm=0.005", "train.microbatch_size=1"), ("e0-1",)),
], ids=["ddpo-sf", "ddpo-is-unequal-shards"])
def test_two_workers_take_the_single_worker_step(tiny_model_dir, fixed_epoch, overrides, nan_rewards):
    batch_refs, make_results = fixed_epoch
    result_refs = make_results(nan_rewards)
    initial, single, [expected] = one_update(tiny_model_dir, 1, batch_refs, result_refs, *overrides)
    initial2, double, (rank0, rank1) = one_update(tiny_model_dir, 2, batch_refs, result_refs, *overrides)

    assert all(torch.equal(initial[k], initial2[k]) for k in initial)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "ranks differ after the update"
    moved = max((expected[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-4, "the update must move the weights for the comparison to mean anything"
    for name in expected:
        torch.testing.assert_close(rank0[name], expected[name], rtol=0, atol=1e-5, msg=name)
    # The same whole-batch statistics and the same (all-reduced, pre-clip) gradient.
    assert double["num_samples"] == single["num_samples"] == 8 - len(nan_rewards)
    assert double["num_dropped"] == single["num_dropped"] == len(nan_rewards)
    assert double["num_unique_sample_ids"] == 8 and double["learner_workers"] == 2
    for key in ("reward_mean", "kl_mean", "advantage_mean", "advantage_abs_mean", "loss", "grad_norm"):
        assert double[key] == pytest.approx(single[key], rel=1e-5, abs=1e-7), key
    if nan_rewards:
        assert single["grad_norm"] > 0.005  # the clip was active: it must act on the summed gradient
    assert double["version"] == single["version"] == 1 and len(double["previews"]) == 2


class ThreadCollective:
    """learner.distributed.Collective's interface for ranks that are threads of one process:
    the trainer's data-parallel arithmetic without torch.distributed."""

    def __init__(self, shared: dict, rank: int, world_size: int):
        self.shared, self.rank, self.world_size = shared, rank, world_size

    def _exchange(self, value) -> list:
        self.shared["slots"][self.rank] = value
        self.shared["barrier"].wait()
        out = list(self.shared["slots"])
        self.shared["barrier"].wait()
        return out

    def all_gather_object(self, obj):
        return self._exchange(obj)

    def all_reduce_sum_(self, tensor):
        parts = self._exchange(tensor.clone())
        tensor.copy_(sum(parts[1:], parts[0]))
        return tensor

    def all_reduce_max(self, value):
        return max(self._exchange(value))

    def broadcast_(self, tensors, src=0):
        for t, v in zip(tensors, self._exchange([t.clone() for t in tensors])[src]):
            t.copy_(v)


@pytest.mark.parametrize("split", [(2, 1, 1), (4, 0)], ids=["3-ranks-2-1-1", "2-ranks-one-empty"])
def test_unequal_shards_take_the_single_step_without_ray(tiny_model_dir, fixed_epoch, split):
    """The trainer's arithmetic alone (threads for ranks): 4 batches split unequally (even a
    rank without a batch), two samples dropped, two IS minibatches: the same whole-batch
    advantages and the same step as one trainer."""
    config = learner_config(tiny_model_dir, 1, "train.algorithm=ddpo-is", "train.num_minibatches=2",
                            "train.clip_range=0.2", "train.timestep_fraction=0.5", "train.microbatch_size=3")
    batch_refs, make_results = fixed_epoch
    batches, results = ray.get(batch_refs), ray.get(make_results(("e0-0", "e0-6")))

    def trainer(collective=None):
        torch.manual_seed(config.run.seed)
        policy = MultiViewPolicy(load_components(tiny_model_dir), config.model.finetune, config.model.lora)
        return Trainer(policy, config.train, config.sampling, seed=0, collective=collective)

    def step(t, my_batches, my_results, out, key):
        samples = t.assemble(my_batches, my_results, allow_empty=t.collective is not None)
        advantages = t.advantages(t.share(samples))
        out[key] = (advantages, t.update(samples, advantages), t.policy.trainable_state_dict())

    out = {}
    step(trainer(), batches, results, out, "single")
    k, ends = len(split), np.cumsum((0,) + split)
    shared = {"slots": [None] * k, "barrier": threading.Barrier(k, timeout=120)}
    ranks = [trainer(ThreadCollective(shared, r, k)) for r in range(k)]
    threads = [threading.Thread(target=step, args=(t, batches[ends[i]:ends[i + 1]], results[ends[i]:ends[i + 1]],
                                                   out, i)) for i, t in enumerate(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    advantages, metrics, expected = out["single"]
    assert set(out) == {"single", *range(k)}, "a rank failed (see the captured output)"
    for rank in range(k):
        np.testing.assert_array_equal(out[rank][0], advantages)  # whole-batch advantages everywhere
        assert out[rank][1]["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=1e-5)
        for name, value in out[rank][2].items():
            torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-5, msg=name)
            assert torch.equal(value, out[0][2][name])


def test_shards_are_contiguous_and_balanced():
    assert shard(list(range(8)), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert shard(list(range(5)), 3) == [[0, 1], [2, 3], [4]]
    assert shard([1], 2) == [[1], []]


@pytest.mark.parametrize("overrides, message", [
    (["train.num_workers=0"], "train.num_workers must be >= 1"),
    (["train.num_workers=3", "train.samples_per_epoch=32", "rollout.batch_size=8"],
     r"train.samples_per_epoch \(32\) must be a multiple of rollout.batch_size x train.num_workers "
     r"\(8 x 3 = 24\).*set train.samples_per_epoch to a multiple of 24"),
])
def test_config_rejects_bad_worker_counts(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)
    load_config(["train.num_workers=2", "train.samples_per_epoch=32", "rollout.batch_size=8"])  # fine


def e2e_run(tmp_path, model_dir, *overrides):
    from learner.driver import run

    return run(load_config([
        f"model.path={model_dir}", f"run.output_dir={tmp_path}", "sampling.num_steps=2", "prompts.limit=4",
        "rollout.batch_size=2", "train.samples_per_epoch=8", "rollout.num_cpus=0.25", "reward.num_cpus=0.25",
        "train.num_cpus=0.5", "train.torch_threads=1", "reward.kind=brightness", "run.samples_to_save=2",
        "train.learning_rate=3e-3", "eval.prompts_file=null", "reward.alignment=null",
        "train.num_workers=2", *overrides]))


def test_two_learner_workers_through_the_driver(tmp_path, tiny_model_dir):
    run_dir = e2e_run(tmp_path, tiny_model_dir, "train.epochs=2", "train.min_relative_step_sigma=0")
    m = pd.read_parquet(run_dir.path / "metrics.parquet")
    assert m["version"].tolist() == [1, 2] and (m["learner_workers"] == 2).all()
    assert (m["num_unique_sample_ids"] == 8).all() and (m["sync_bytes"] > 0).all()  # v1, v2 published
    assert m["kl_mean"].iloc[0] == 0.0 and m["kl_mean"].iloc[1] > 0  # the rollout actors sampled v1
    assert (run_dir.path / "checkpoints" / "epoch_0001" / "weights.safetensors").is_file()
    assert "completed all epochs" in (run_dir.path / "report.md").read_text()


def test_a_dying_learner_rank_restarts_the_group_from_the_checkpoint(tmp_path, tiny_model_dir):
    """Rank 1 exits in epoch 1: rank 0 (waiting in a collective) is killed with it, and the
    run resumes every actor from checkpoint 0 (faults.batch names the learner's rank)."""
    run_dir = e2e_run(tmp_path, tiny_model_dir, "train.epochs=2", "faults.role=learner", "faults.mode=exit",
                      "faults.epoch=1", "faults.batch=1", "run.max_auto_resumes=1")
    m = pd.read_parquet(run_dir.path / "metrics.parquet")
    assert m["epoch"].tolist() == [0, 1] and m["version"].tolist() == [1, 2]
    report = (run_dir.path / "report.md").read_text()
    assert "learner failed" in report and "rank 1: process died" in report
