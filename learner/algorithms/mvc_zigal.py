"""MVC-ZigAL (arXiv 2505.20107): MV-ZigAL's pairs and loss, under a constraint.

Maximise per-view fidelity (``reward.alignment``'s score) subject to joint-view consistency
(the run's reward, -MRC) J >= b.  Once per epoch the Lagrange multiplier takes a dual-ascent
step on the batch's mean consistency (``learner.advantages.LagrangeMultiplier``, checkpointed);
the pair's advantage gap is [(A_pv - A_pv~) + lambda (A_mv - A_mv~)] / (1 + lambda).
"""

from __future__ import annotations

import numpy as np

from learner.advantages import LagrangeMultiplier, zigal_advantage_gap
from learner.algorithms.base import register_algorithm
from learner.algorithms.mv_zigal import MvZigAL


@register_algorithm("mvc-zigal")
class MvcZigAL(MvZigAL):
    def __init__(self, train, sampling):
        super().__init__(train, sampling)
        z = train.zigal
        self.multiplier = LagrangeMultiplier(z.multiplier_init, z.multiplier_max, z.multiplier_lr_violated,
                                             z.multiplier_lr_satisfied, z.threshold, z.threshold_ema)

    @classmethod
    def config_problems(cls, config):
        problems = super().config_problems(config)
        if config.reward.alignment is None:
            problems.append("algorithm=mvc-zigal maximises per-view fidelity, reward.alignment's score: set "
                            "reward.alignment (e.g. minicarve), or use algorithm=mv-zigal for the run's reward alone")
        return problems

    def advantages(self, trainer, stats):
        s = stats.scalars
        self.multiplier.update(float(np.concatenate([stats.rewards, s["zmv_rewards"]]).mean()))
        return zigal_advantage_gap(s["alignment"], s["zmv_alignment"], stats.rewards, s["zmv_rewards"],
                                   self.multiplier.value)

    def metrics(self, stats):
        return {**super().metrics(stats), "multiplier": self.multiplier.value,
                "constraint_threshold": float(self.multiplier.threshold)}

    def state_dict(self):
        return {"multiplier": self.multiplier.state_dict()}

    def load_state_dict(self, state):
        if "multiplier" in state:
            self.multiplier.load_state_dict(state["multiplier"])
