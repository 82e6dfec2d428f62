"""MV-ZigAL (MVC-ZigAL, arXiv 2505.20107, without the constraint): every sample is a pair.

The rollout samples, from the same x_T, a standard trajectory and a ZMV-Sampling one (keys
``zmv/latents``, ``zmv/log_probs``; its views are rewarded under ``zmv_id(sample_id)``).
Advantage: the pair's gap A(standard) - A(ZMV), both samplers' rewards z-scored together.
Loss per transition: ``zigal_pair_loss``, the REBEL-style regression of the pair's log-ratio
gap onto that advantage gap, with pessimistic clipping (``train.clip_range``).
"""

from __future__ import annotations

import numpy as np
import torch

from learner.advantages import zigal_advantage_gap
from learner.algorithms.base import Algorithm, register_algorithm, values_by_id
from learner.losses import zigal_pair_loss

ZMV = "zmv/"  # the prefix of the ZMV partner's keys in a rollout batch


def zmv_id(sample_id: str) -> str:
    """The reward id of a sample's ZMV-Sampling partner."""
    return sample_id + "/zmv"


@register_algorithm("mv-zigal")
class MvZigAL(Algorithm):
    finite_keys = ("log_probs", ZMV + "log_probs")

    @classmethod
    def config_problems(cls, config):
        problems, z = [], config.train.zigal
        if config.sampling.sampler != "standard":
            problems.append("the zigal algorithms sample each pair with both samplers themselves; leave "
                            "sampling.sampler=standard (use sampling.sampler=zmv for evaluation)")
        if config.sampling.zmv_steps != 1:
            problems.append(
                f"the zigal algorithms train on ZMV trajectories with one zigzag, at the first step (MVC-ZigAL's "
                f"setting): set sampling.zmv_steps=1 (got {config.sampling.zmv_steps}); a later zigzag would replace "
                "the state an action led to, so that trajectory's steps would not chain (more steps are fine for "
                "evaluation)")
        if not (0 <= z.multiplier_init <= z.multiplier_max and min(z.multiplier_lr_violated, z.multiplier_lr_satisfied)
                >= 0 and 0 <= z.threshold_ema < 1):
            problems.append("train.zigal: need 0 <= multiplier_init <= multiplier_max, multiplier learning rates >= 0 "
                            "and threshold_ema in [0, 1)")
        return problems

    def record(self, policy, prompts, seeds, trajectory, batch, reward_input):
        """The pair's other half: same x_T, zigzag; both samples' views go to the reward (one
        policy, so the same cameras)."""
        ids = list(reward_input.sample_ids)
        zmv = policy.sample(prompts, seeds, self.sampling, sampler="zmv", reference=False)  # its KL is never read
        batch[ZMV + "latents"], batch[ZMV + "log_probs"] = zmv.latents, zmv.log_probs
        reward_input.sample_ids = ids + [zmv_id(i) for i in ids]
        reward_input.prompts = prompts + prompts
        reward_input.views = torch.cat([trajectory.views, zmv.views])

    def reward_ids(self, sample_id):
        return [sample_id, zmv_id(sample_id)]

    def reward_scalars(self, sample_ids, results):
        rewards, alignment = values_by_id(results, "rewards"), values_by_id(results, "alignment")
        scalars = {"zmv_rewards": np.array([rewards[zmv_id(s)] for s in sample_ids], dtype=np.float64)}
        if alignment:
            scalars["alignment"] = np.array([alignment.get(s, np.nan) for s in sample_ids], dtype=np.float64)
            scalars["zmv_alignment"] = np.array([alignment.get(zmv_id(s), np.nan) for s in sample_ids],
                                                dtype=np.float64)
        return scalars

    def advantages(self, trainer, stats):
        return zigal_advantage_gap(stats.rewards, stats.scalars["zmv_rewards"])

    def loss(self, step):
        log_prob, old = step.log_prob()
        # the same step of the pair's ZMV trajectory (its state at the zigzag step is the
        # re-inverted x~_t), under the same policy
        zmv_log_prob, zmv_old = step.log_prob(ZMV)
        return zigal_pair_loss(log_prob, old, zmv_log_prob, zmv_old, step.advantages, self.train.clip_range)

    def metrics(self, stats):
        zmv = stats.scalars["zmv_rewards"]
        metrics = {"zmv_reward_mean": float(zmv.mean()), "zmv_reward_gain": float((zmv - stats.rewards).mean())}
        if "zmv_alignment" in stats.scalars:
            metrics["zmv_alignment_gain"] = float(np.nanmean(stats.scalars["zmv_alignment"]
                                                             - stats.scalars["alignment"]))
        return metrics
