"""DDPO-SF, Carve3D's algorithm (the default): REINFORCE, pure on-policy, one update per epoch.

Advantages: A = alpha * z_prompt(reward) - beta * z_prompt(KL), clipped (Carve3D Eq. 8), with
the learner's per-prompt stat trackers.  Loss per transition: -A * log p_theta(x_{t-1} | x_t).
"""

from __future__ import annotations

from learner.advantages import combine_advantages
from learner.algorithms.base import Algorithm, register_algorithm
from learner.losses import ddpo_sf_loss


def carve3d_advantages(trainer, stats):
    """Per-prompt z-scored reward and KL (the trainer's trackers), combined and clipped."""
    cfg = trainer.cfg
    reward_z = trainer.reward_tracker.update(stats.prompts, stats.rewards)
    kl_z = trainer.kl_tracker.update(stats.prompts, stats.kl)
    return combine_advantages(reward_z, kl_z, cfg.reward_weight, cfg.kl_weight, cfg.advantage_clip)


@register_algorithm("ddpo-sf")
class DdpoSF(Algorithm):
    @classmethod
    def config_problems(cls, config):
        if config.train.num_minibatches != 1:
            return ["train.num_minibatches must be 1 for ddpo-sf (pure on-policy: one update per epoch)"]
        return []

    def advantages(self, trainer, stats):
        return carve3d_advantages(trainer, stats)

    def loss(self, step):
        log_prob, _ = step.log_prob()
        return ddpo_sf_loss(log_prob, step.advantages)
