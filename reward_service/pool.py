"""The reward actor pool: M Ray actors that score grids as rollout batches finish.

``RewardWorker`` is a thin wrapper around a reward function.  ``RewardPool`` is
the driver-side dispatcher: each batch goes to the actor with the fewest batches
in flight, so scoring overlaps sampling whenever the pool has capacity.
"""

from __future__ import annotations

import ray
import torch

from actors.batches import RewardInput, RewardResult
from reward_service.rewards import build_reward, score


class RewardWorker:
    def __init__(self, kind: str, options: dict, torch_threads: int = 1, nonfinite_fraction: float = 0.0):
        torch.set_num_threads(torch_threads)
        self.reward_fn = build_reward(kind, **options)
        self.nonfinite_fraction = nonfinite_fraction

    def score(self, batch: RewardInput) -> RewardResult:
        return score(self.reward_fn, batch.sample_ids, batch.images, batch.prompts, self.nonfinite_fraction)

    def warnings(self) -> list[str]:
        scorer = getattr(self.reward_fn, "scorer", None)
        return list(getattr(scorer, "warnings", []))


RemoteRewardWorker = ray.remote(RewardWorker)


class RewardPool:
    """Least-loaded dispatch over reward actors; tracks the queue depth."""

    def __init__(self, actors: list):
        self.actors = actors
        self.in_flight: dict[ray.ObjectRef, int] = {}
        self.load = [0] * len(actors)

    def submit(self, reward_input_ref: ray.ObjectRef) -> ray.ObjectRef:
        index = min(range(len(self.actors)), key=self.load.__getitem__)
        ref = self.actors[index].score.remote(reward_input_ref)
        self.in_flight[ref] = index
        self.load[index] += 1
        return ref

    def done(self, refs: list[ray.ObjectRef]) -> None:
        for ref in refs:
            index = self.in_flight.pop(ref, None)
            if index is not None:
                self.load[index] -= 1

    @property
    def queue_depth(self) -> int:
        return sum(self.load)
