"""DDPO-IS (DDPO's PPO variant): Carve3D's advantages, the clipped importance-sampling loss.

Loss per transition: max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = p_theta / p_old, eps =
``train.clip_range``; ``train.num_minibatches`` optimizer steps per epoch.
"""

from __future__ import annotations

from learner.algorithms.base import Algorithm, register_algorithm
from learner.algorithms.ddpo_sf import carve3d_advantages
from learner.losses import ddpo_is_loss


@register_algorithm("ddpo-is")
class DdpoIS(Algorithm):
    def advantages(self, trainer, stats):
        return carve3d_advantages(trainer, stats)

    def loss(self, step):
        log_prob, old = step.log_prob()
        return ddpo_is_loss(log_prob, old, step.advantages, self.train.clip_range)
