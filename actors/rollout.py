"""The rollout actor: a policy replica that turns sample specs into trajectories.

A thin Ray wrapper around :class:`policy.pipeline.MultiViewPolicy`.  It samples
only at the version it was last given by the learner, and tags every batch with
that version so the learner can reject stale ones.  After a crash Ray restarts it
(``rollout.max_restarts``) with no weights; the driver reloads the current
version into it before giving it work again.
"""

from __future__ import annotations

import os
import time

import ray
import torch

from actors.batches import RewardInput, RolloutBatch, SampleSpec
from actors.faults import maybe_inject_fault
from actors.group import ActorRestarted
from actors.weight_sync import BroadcastGroup, trainable_tensors
from policy.pipeline import ModelSettings, SamplingSettings, load_policy


class RolloutWorker:
    def __init__(self, model_path: str, model: ModelSettings, sampling: SamplingSettings,
                 torch_threads: int = 1, device: str = "cpu", faults=None, marker_dir: str | None = None,
                 algorithm=None):
        torch.set_num_threads(torch_threads)
        # the run's learner.algorithms.Algorithm (built by the driver): what else a training batch
        # records (a ZMV partner, x0 predictions); None: plain trajectories
        self.algorithm = algorithm
        self.policy = load_policy(model, device, model_path)
        self.sampling = sampling
        self.faults, self.marker_dir = faults, marker_dir
        self.version = -1  # nothing loaded yet: refuse to sample until the learner publishes

    def load_weights(self, version: int, weights: dict) -> int:
        """Load a published version (Ray resolves the object ref; one copy per node)."""
        self.policy.load_trainable_state_dict(weights)
        self.version = version
        return version

    def load_published(self, published: dict) -> int:
        """Load what ``Learner.publish`` returned (the weights' ref inside is fetched here): how
        a restarted actor catches up under train.weight_sync=broadcast."""
        return self.load_weights(published["version"], ray.get(published["weights"][0]))

    def join_broadcast(self, address: str, port: int, rank: int, world_size: int, timeout_s: float) -> int:
        """Join the learner's weight-broadcast group as member ``rank`` (>= 1)."""
        self.broadcast_group = None
        self.broadcast_group = BroadcastGroup(address, port, rank, world_size, self.policy.device, timeout_s)
        return rank

    def receive_weights(self, version: int, bucket_bytes: int) -> int:
        """Receive the learner's broadcast into this replica's parameters (train.weight_sync=broadcast)."""
        self.broadcast_group.broadcast_(trainable_tensors(self.policy), bucket_bytes)
        self.version = version
        return version

    def sample(self, specs: list[SampleSpec], epoch: int = 0, batch_index: int = 0):
        """Three results: the batch (for the learner), the views and their cameras (for the
        reward pool, so it never fetches latents) and a small status the driver reads.  A
        training batch also records what the algorithm asks for (``Algorithm.record``: more keys,
        more views to score); held-out evaluation (epoch -1) samples plainly."""
        if self.version < 0:  # weights come before any batch: this process was restarted unseen
            raise ActorRestarted("rollout worker has no weights (its process was restarted); load them first")
        maybe_inject_fault(self.faults, "rollout", epoch, batch_index, self.marker_dir)
        start = time.perf_counter()
        prompts, seeds = [s.prompt for s in specs], [s.seed for s in specs]
        algorithm = self.algorithm if epoch >= 0 else None
        trajectory = self.policy.sample(prompts, seeds, self.sampling,
                                        **(algorithm.sample_options() if algorithm else {}))
        ids = [s.sample_id for s in specs]
        reward_input = RewardInput(sample_ids=ids, prompts=trajectory.prompts, views=trajectory.views,
                                   cameras=trajectory.cameras, epoch=epoch, batch_index=batch_index)
        batch = RolloutBatch.of(ids, self.version, trajectory)
        if algorithm is not None:
            algorithm.record(self.policy, prompts, seeds, trajectory, batch.data, reward_input)
        seconds = time.perf_counter() - start
        return batch, reward_input, {"version": self.version, "seconds": seconds, "pid": os.getpid()}


RemoteRolloutWorker = ray.remote(RolloutWorker)
