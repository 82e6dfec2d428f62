"""The reward actor: a thin Ray wrapper around a reward function.

The pool of M such actors is an :class:`actors.group.ActorGroup`: each finished
rollout batch goes to the least-loaded actor at once, so scoring overlaps
sampling; a crashed or hung actor is restarted and its batches are re-scored.
"""

from __future__ import annotations

import os

import ray
import torch

from actors.batches import RewardInput, RewardResult
from actors.faults import maybe_inject_fault
from plugins import load_plugins
from reward_service.rewards import build_alignment, build_reward, reward_gradient, score


class RewardWorker:
    def __init__(self, kind: str, options: dict, torch_threads: int = 1, nonfinite_fraction: float = 0.0,
                 faults=None, marker_dir: str | None = None, alignment: str | None = None,
                 plugins: list[str] = ()):
        torch.set_num_threads(torch_threads)
        load_plugins(plugins)  # run.plugins: the modules that register reward names (e.g. lrm)
        self.reward_fn = build_reward(kind, **options)
        self.alignment_fn = build_alignment(alignment)
        self.nonfinite_fraction = nonfinite_fraction
        self.faults, self.marker_dir = faults, marker_dir

    def score(self, batch: RewardInput) -> tuple[RewardResult, dict]:
        """The result (for the learner) and a small status the driver reads."""
        maybe_inject_fault(self.faults, "reward", batch.epoch, batch.batch_index, self.marker_dir)
        result = score(self.reward_fn, batch.sample_ids, batch.views, batch.cameras, batch.prompts,
                       self.nonfinite_fraction, self.alignment_fn)
        if batch.gradient_views is not None:  # nabla-gfn: also the reward's gradient at each x0 prediction
            result.view_gradients = reward_gradient(self.reward_fn, batch.gradient_views, batch.cameras)
        return result, {"seconds": result.score_seconds, "pid": os.getpid()}


RemoteRewardWorker = ray.remote(RewardWorker)
