"""Advantages as Carve3D computes them: per-prompt z-scores of reward and KL.

``A = alpha * z_prompt(reward) - beta * z_prompt(KL)``, clipped to [-c, c]
(paper Eq. 8).  Each prompt keeps its own history, so a prompt that is easy for
the model is not rewarded for being easy, only for doing better than before.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class PerPromptStatTracker:
    """Normalise values with statistics of the same prompt's recent values.

    Each prompt keeps a deque of its last ``buffer_size`` values.  Until a prompt
    has ``min_count`` values, the whole batch's mean and std are used instead.
    """

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: list[str], values) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        prompts = np.asarray(prompts, dtype=object)
        normalised = np.empty_like(values)
        for prompt in np.unique(prompts):
            mine = values[prompts == prompt]
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(mine)
            if len(buffer) < self.min_count:
                mean, std = values.mean(), values.std() + 1e-6
            else:
                mean, std = np.mean(buffer), np.std(buffer) + 1e-6
            normalised[prompts == prompt] = (mine - mean) / std
        return normalised

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {p: list(map(float, b)) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state["buffers"].items()}


def combine_advantages(reward_z: np.ndarray, kl_z: np.ndarray, reward_weight: float,
                       kl_weight: float, clip: float) -> np.ndarray:
    """alpha * z(reward) - beta * z(KL), clipped to [-clip, clip]."""
    return np.clip(reward_weight * reward_z - kl_weight * kl_z, -clip, clip)
