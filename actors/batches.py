"""The data that crosses actors.  Plain dataclasses of CPU tensors/arrays (a rollout batch's
per-sample data is a :class:`protocol.batch.KeyedBatch`); Ray moves them as object
references, the driver never fetches them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from geometry.cameras import Cameras
from protocol.batch import KeyedBatch


@dataclass(frozen=True)
class SampleSpec:
    """What to sample: one multi-view sample for one prompt with one seed, under a stable id."""

    sample_id: str
    prompt_index: int
    prompt: str
    seed: int


@dataclass
class RolloutBatch:
    """Trajectories of a rollout call, tagged with the policy version that sampled them.

    ``data`` holds every sample's ``prompts``, ``seeds``, ``latents`` [B, T+1, C, H, W],
    ``log_probs`` [B, T], ``ref_log_probs`` [B, T] and ``views`` [B, V, 3, h, w] uint8, and
    ``meta["timesteps"]`` [T]; an algorithm adds its own keys (``learner/algorithms/``)."""

    sample_ids: list[str]
    version: int
    data: KeyedBatch

    def __len__(self) -> int:
        return len(self.sample_ids)

    @classmethod
    def of(cls, sample_ids: list[str], version: int, trajectory) -> RolloutBatch:
        """A batch of a ``policy.pipeline.Trajectory``'s standard keys."""
        return cls(sample_ids, version, trajectory_batch(trajectory))


TRAJECTORY_KEYS = ("prompts", "seeds", "latents", "log_probs", "ref_log_probs", "views")


def trajectory_batch(trajectory, prefix: str = "") -> KeyedBatch:
    """A trajectory's per-sample values under ``prefix + name`` (its timesteps in meta)."""
    return KeyedBatch({prefix + k: getattr(trajectory, k) for k in TRAJECTORY_KEYS},
                      {"timesteps": trajectory.timesteps})


@dataclass
class RewardResult:
    """Scores of one rollout batch, in the batch's sample order."""

    sample_ids: list[str]
    rewards: np.ndarray  # [B]; non-finite entries are dropped by the learner
    mrc: np.ndarray | None = None  # [B]
    per_view_lpips: np.ndarray | None = None  # [B, V]
    rerenders: np.ndarray | None = None  # [B, V, 3, h, w] uint8 views of the re-renderings
    alignment: np.ndarray | None = None  # [B] prompt-alignment accuracy, when an evaluator is set
    object_size: np.ndarray | None = None  # [B] foreground share of the views (MRC rewards)
    warnings: list[str] = field(default_factory=list)
    score_seconds: float = 0.0
    # nabla-gfn: dR/d(views) at RewardInput.gradient_views, [B, T, V, 3, h, w] float32
    view_gradients: np.ndarray | None = None


@dataclass
class RewardInput:
    """The part of a rollout batch the reward needs: the views and their cameras
    (``geometry/views.py``), not the latents."""

    sample_ids: list[str]
    prompts: list[str]
    views: torch.Tensor  # [B, V, 3, h, w] uint8
    cameras: Cameras  # the V views' cameras (a few floats; shared by the batch)
    epoch: int = 0
    batch_index: int = 0
    # nabla-gfn: the decoded x0 predictions of every state, [B, T, V, 3, h, w] float in [0, 1]
    # at the same cameras, where the reward's gradient is wanted
    gradient_views: torch.Tensor | None = None


def zmv_id(sample_id: str) -> str:
    """The reward id of a sample's ZMV-Sampling partner (mv-zigal / mvc-zigal)."""
    return sample_id + "/zmv"
