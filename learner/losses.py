"""The policy-gradient losses, per (sample, timestep) log-prob.

DDPO-SF is REINFORCE, pure on-policy: the gradient of ``-A * log p`` accumulated
over the trained timesteps, one update per epoch.  The trainer averages (rather
than sums) over samples and trained timesteps, as DDPO's and Carve3D's code do
through gradient accumulation; with Adam only the grad-norm clip sees the scale.  DDPO-IS is the PPO-style clipped
importance-sampling loss, which only differs from SF when several optimizer steps
are taken on one epoch's samples (at the first step the ratio is exactly 1).
"""

from __future__ import annotations

import torch


def ddpo_sf_loss(log_prob: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE: grad = -E[A * grad log p_theta(x_{t-1} | x_t, c)]."""
    return -(advantages * log_prob).mean()


def ddpo_is_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                 clip_range: float) -> torch.Tensor:
    """PPO clip: max(-A * r, -A * clip(r, 1 - eps, 1 + eps)) with r = p_theta / p_old."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()
