"""GRPO for diffusion (Flow-GRPO / DanceGRPO style): group-relative advantages, KL in the loss.

Each prompt is sampled ``train.group_size`` (>= 2) times per epoch; those samples are its
group.  A sample's advantage is its reward's z-score within its group in this batch,
A = (r - mean_group) / (std_group + 1e-4), clipped to ``train.advantage_clip``: no value
network, no history across epochs.  Loss per transition: the PPO clip of DDPO-IS
(``train.clip_range``) plus beta * KL(pi_theta || pi_ref) of the step, beta =
``train.kl_weight``.  Both steps are Gaussians with the same sigma, so their KL is
|mu_theta - mu_ref|^2 / (2 sigma^2), averaged over dimensions as Flow-GRPO's code does.
"""

from __future__ import annotations

import numpy as np
import torch

from learner.algorithms.base import Algorithm, register_algorithm
from learner.losses import ddpo_is_loss
from policy.ddim import ddim_step_mean_std, ddim_step_with_logprob

EPS = 1e-4  # Flow-GRPO's


def group_advantages(prompts: list[str], rewards: np.ndarray, eps: float = EPS) -> np.ndarray:
    """(r - mean of the prompt's group) / (std of the group + eps), the groups being this batch's
    samples of each prompt (population std; a group of one gets 0)."""
    rewards, prompts = np.asarray(rewards, dtype=np.float64), np.asarray(prompts, dtype=object)
    advantages = np.zeros_like(rewards)
    for prompt in np.unique(prompts):
        group = prompts == prompt
        advantages[group] = (rewards[group] - rewards[group].mean()) / (rewards[group].std() + eps)
    return advantages


def step_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(ref_mean, std^2)) per dimension, averaged, then over the batch."""
    per_sample = (mean - ref_mean).pow(2).mean(dim=tuple(range(1, mean.ndim)))
    return (per_sample / (2 * std.reshape(-1) ** 2)).mean()


@register_algorithm("grpo")
class GRPO(Algorithm):
    @classmethod
    def config_problems(cls, config):
        if config.train.group_size < 2:
            return [f"algorithm=grpo compares the samples of one prompt: set train.group_size >= 2 (got "
                    f"{config.train.group_size}), e.g. train.group_size=4"]
        return []

    def advantages(self, trainer, stats):
        clip = self.train.advantage_clip
        return np.clip(group_advantages(stats.prompts, stats.rewards), -clip, clip)

    def loss(self, step):
        policy, eta, x_t = step.policy, self.sampling.eta, step.state()
        output = step.model_output(policy.unet)
        _, log_prob = ddim_step_with_logprob(policy.scheduler, output, step.t, x_t, eta, prev_sample=step.action())
        old = step.sampled("log_probs")
        step.record_gap(log_prob, old)
        mean, std = ddim_step_mean_std(policy.scheduler, output, step.t, x_t, eta)
        with torch.no_grad(), policy.reference_model() as ref_unet:
            ref_mean, _ = ddim_step_mean_std(policy.scheduler, step.model_output(ref_unet), step.t, x_t, eta)
        policy_loss = ddpo_is_loss(log_prob, old, step.advantages, self.train.clip_range)
        return policy_loss + self.train.kl_weight * step_kl(mean, ref_mean, std)
