"""Nabla-GFlowNet (arXiv 2412.07775) in Nabla-R2D3's form (arXiv 2506.15684): gradient matching.

The rollout records every state's one-step x0 prediction (key ``x0_predictions``) and sends
its decoded views to the reward actors, which return dR/d views there (key ``view_gradients``).
No advantages (zeros): the reward enters through its gradient.  Loss per transition:
``nabla_db_loss``, the finetuned-minus-reference step-mean gap matched to the flow gradient
beta * a_{t-1} * grad_x R(x0_hat(x_{t-1})) (beta = ``train.nabla.reward_scale``).
"""

from __future__ import annotations

import numpy as np
import torch

from learner.algorithms.base import Algorithm, register_algorithm, values_by_id
from learner.losses import nabla_db_loss
from policy.ddim import ddim_step_mean_std, per_sample, previous_timestep

GRADIENT_REWARDS = ("mrc", "brightness")  # reward kinds that give a reward gradient


@register_algorithm("nabla-gfn")
class NablaGFN(Algorithm):
    @classmethod
    def config_problems(cls, config):
        problems = []
        if config.reward.kind not in GRADIENT_REWARDS:
            problems.append(f"algorithm=nabla-gfn needs a differentiable reward: reward.kind must be one of "
                            f"{', '.join(GRADIENT_REWARDS)} (got {config.reward.kind!r})")
        if not config.train.nabla.reward_scale > 0:
            problems.append("train.nabla.reward_scale must be > 0")
        return problems

    def sample_options(self):
        return {**super().sample_options(), "record_x0": True}

    def record(self, policy, prompts, seeds, trajectory, batch, reward_input):
        """The reward's gradient is wanted at every state's x0 prediction."""
        x0 = trajectory.x0_predictions
        batch["x0_predictions"] = x0
        with torch.no_grad():
            reward_input.gradient_views = policy.decode(x0.flatten(0, 1)).unflatten(0, x0.shape[:2])

    def reward_tensors(self, sample_ids, results):
        gradients = values_by_id(results, "view_gradients")
        if not gradients or not sample_ids:
            return {}
        return {"view_gradients": torch.stack([torch.as_tensor(gradients[s]) for s in sample_ids])}

    def advantages(self, trainer, stats):
        return np.zeros(len(stats.rewards))

    def loss(self, step):
        """The flow gradient at x_{t-1}: the reward's gradient w.r.t. the views (at the sampler's x0
        prediction) pulled back through the decoder, then through x0_hat = (x - sqrt(1 - a) eps)
        / sqrt(a) without the UNet's Jacobian (no_jacobian): a factor 1 / sqrt(a_{t-1}), 1 at
        the last step.  (Matches step means: no log-prob, so no recompute gap.)"""
        policy, x_t, t = step.policy, step.state(), step.t
        scheduler, eta, scale = policy.scheduler, self.sampling.eta, self.sampling.guidance_scale
        output = policy.guided_model_output(policy.unet, x_t, t, step.embeds, step.negative, scale)
        mean, std = ddim_step_mean_std(scheduler, output, t, x_t, eta)
        with torch.no_grad(), policy.reference_model() as ref_unet:
            ref_output = policy.guided_model_output(ref_unet, x_t, t, step.embeds, step.negative, scale)
            ref_mean, _ = ddim_step_mean_std(scheduler, ref_output, t, x_t, eta)
            view_grad = step.samples.data["view_gradients"][step.rows, step.j]
            grad_x0 = policy.view_gradient_to_model(step.samples.data["x0_predictions"][step.rows, step.j],
                                                    view_grad)
            alpha_prev = per_sample(scheduler.alphas_cumprod, previous_timestep(scheduler, t), x_t)
            is_last = step.is_last.reshape(alpha_prev.shape).to(alpha_prev.device)
            through_x0 = torch.where(is_last, torch.ones_like(alpha_prev), alpha_prev.rsqrt())
            flow_gradient = self.train.nabla.reward_scale * alpha_prev * through_x0 * grad_x0
        return nabla_db_loss(mean, ref_mean, std, flow_gradient)
