"""A run's roles as plain objects in this one process, built exactly as the driver builds its actors.

The rollout worker, the reward worker and the learner are plain classes that Ray wraps
(``ray.remote(cls)``); this module builds them unwrapped, with the driver's constructor
arguments (``rollout_worker_args``, ``reward_worker_args``) and the learner's own
``__init__`` (same seed: the same LoRA initialisation), and samples an epoch the way
``learner.driver.collect_epoch`` does, one batch after another.  It is for the tools
that time or take apart one epoch without Ray in between:

- ``bench/ray_overhead.py``: the plain loop that the actors are measured against;
- ``experiments/gradient_probe.py --noise-scale``: each sample's gradient of one epoch.
"""

from __future__ import annotations

import time

from actors.rollout import RolloutWorker
from learner.actor import Learner
from learner.config import Config, load_prompts
from learner.driver import plan_epoch, reward_worker_args, rollout_worker_args
from learner.trainer import EpochSamples
from policy.models import resolve_model_path
from reward_service.pool import RewardWorker


class InProcessRoles:
    def __init__(self, config: Config):
        model_path = str(resolve_model_path(config.model.path, config.model.cache_dir))
        self.config = config
        self.prompts = load_prompts(config.prompts)
        self.rollout = RolloutWorker(*rollout_worker_args(config, model_path))
        self.reward = RewardWorker(*reward_worker_args(config))
        self.learner = Learner(model_path, config)  # last: its torch thread count is the one that holds
        self.trainer = self.learner.trainer
        self.publish()  # version 0, as the driver publishes it before the first epoch

    def publish(self) -> None:
        """Load the learner's current trainable weights into the rollout worker."""
        self.rollout.load_weights(self.trainer.version, self.learner.policy.trainable_state_dict())

    def sample_epoch(self, epoch: int, times: dict[str, float] | None = None, progress=None) -> EpochSamples:
        """Sample and score the epoch's plan (``plan_epoch``) in rollout batches; the assembled
        samples.  ``times``, when given, adds up ``sample_seconds`` and ``reward_seconds``;
        ``progress(done, total)`` is called after each batch."""
        train, size = self.config.train, self.config.rollout.batch_size
        specs = plan_epoch(self.config.run.seed, epoch, self.prompts, train.samples_per_epoch, train.group_size)
        times = {} if times is None else times
        batches, results = [], []
        for index in range(0, len(specs), size):
            start = time.perf_counter()
            batch, reward_input, _ = self.rollout.sample(specs[index:index + size], epoch, index // size)
            middle = time.perf_counter()
            result, _ = self.reward.score(reward_input)
            times["sample_seconds"] = times.get("sample_seconds", 0.0) + middle - start
            times["reward_seconds"] = times.get("reward_seconds", 0.0) + time.perf_counter() - middle
            batches.append(batch)
            results.append(result)
            if progress is not None:
                progress(min(index + size, len(specs)), len(specs))
        return self.trainer.assemble(batches, results)
