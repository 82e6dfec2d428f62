"""Checks shared by the model-family tests (tests/test_model_families.py, tests/test_mvdream.py)."""
from __future__ import annotations

import torch


def recompute(policy, traj, settings) -> torch.Tensor:
    """Every step's log-prob of a sampled trajectory, recomputed with gradients: [B, steps]."""
    embeds = policy.encode_prompts(traj.prompts)
    negative = policy.negative_embeds(embeds, settings.negative_prompt)
    policy.scheduler.set_timesteps(settings.num_steps)
    return torch.stack([
        policy.step_log_prob(traj.latents[:, j], t, traj.latents[:, j + 1], embeds, negative, settings)
        for j, t in enumerate(traj.timesteps)], dim=1)


def assert_checkpointing_keeps_gradients(make_policy, prompts, settings) -> None:
    """Gradient checkpointing trades memory for compute: the gradients must not change."""
    grads = []
    for checkpointing in (False, True):
        policy = make_policy(gradient_checkpointing=checkpointing)
        assert policy.unet.is_gradient_checkpointing == checkpointing
        traj = policy.sample(prompts[:2], [1, 2], settings)
        recompute(policy, traj, settings).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.trainable_parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert grads[0].abs().sum() > 0
