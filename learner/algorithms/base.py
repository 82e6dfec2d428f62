"""What an algorithm is, and the registry of them (``train.algorithm``).

An algorithm is one class, registered under its name with :func:`register_algorithm`, in
one file of this package.  The generic roles call it at these points, and nowhere else
does the code name an algorithm:

- ``config_problems(config)``: its part of ``learner.config.validate`` (a list of messages);
- in the rollout actor: ``sample_options()`` (keyword arguments of ``MultiViewPolicy.sample``)
  and ``record(...)``, which adds keys to the rollout batch and samples to the reward input;
- in ``Trainer.assemble``: ``reward_ids`` (the rewarded ids each sample needs),
  ``finite_keys`` (per-sample tensors that must be finite), ``reward_scalars`` /
  ``reward_tensors`` (what it takes from the reward results, by key);
- ``advantages(trainer, stats)``: one number per sample of the whole batch;
- ``loss(step)``: the loss of one trained transition of each row (a :class:`Transition`);
- ``metrics(stats)``: its numbers for the epoch's row of metrics.parquet;
- ``state_dict`` / ``load_state_dict``: its own state, kept in the learner's checkpoints.

The per-prompt stat trackers, the optimizer, the timestep draws and the data-parallel
arithmetic belong to the ``Trainer`` and are the same for every algorithm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

if TYPE_CHECKING:  # (types only: learner.config imports this package)
    from actors.batches import RewardInput, RewardResult
    from learner.config import Config, TrainConfig
    from policy.pipeline import MultiViewPolicy, Trajectory
    from policy.settings import SamplingSettings
    from protocol.batch import KeyedBatch

_REGISTRY: dict[str, type[Algorithm]] = {}


def register_algorithm(name: str):
    """Class decorator: make ``train.algorithm=name`` build this class."""
    def register(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"algorithm {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return register


def get_algorithm(name: str) -> type[Algorithm]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown algorithm {name!r}; registered: {', '.join(algorithm_names())}")
    return _REGISTRY[name]


def algorithm_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def values_by_id(results: list[RewardResult], name: str) -> dict:
    """sample id -> a per-sample field of the reward results (those that have it)."""
    return {sid: v for r in results if getattr(r, name) is not None for sid, v in zip(r.sample_ids, getattr(r, name))}


class Transition:
    """The trained step ``j[i]`` of each row ``rows[i]``: x_t -> x_{t-1}, with what a loss needs.

    ``log_prob(prefix)`` recomputes the step's log-prob (with gradients) of the trajectory stored
    under ``prefix + "latents"``, and records the largest |recomputed - sampled| (the on-policy
    check) in ``gap``."""

    def __init__(self, policy: MultiViewPolicy, sampling: SamplingSettings, train: TrainConfig, samples,
                 rows: torch.Tensor, j: torch.Tensor, embeds, negative, advantages: torch.Tensor):
        self.policy, self.sampling, self.train, self.samples = policy, sampling, train, samples
        self.rows, self.j, self.embeds, self.negative, self.advantages = rows, j, embeds, negative, advantages
        self.device = policy.device
        self.t = samples.timesteps[j].to(self.device)
        self.gap: float | None = None

    def sampled(self, key: str) -> torch.Tensor:
        """The sampler's per-step value ``key`` at this step (log-probs, latents, x0 predictions)."""
        return self.samples.data[key][self.rows, self.j].to(self.device)

    def state(self, prefix: str = "") -> torch.Tensor:
        """x_t."""
        return self.sampled(prefix + "latents")

    def action(self, prefix: str = "") -> torch.Tensor:
        """x_{t-1}, the sampled action."""
        return self.samples.data[prefix + "latents"][self.rows, self.j + 1].to(self.device)

    @property
    def is_last(self) -> torch.Tensor:
        return self.j == len(self.samples.timesteps) - 1

    def log_prob(self, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """(log p_theta(x_{t-1} | x_t) with gradients, the sampled log-prob)."""
        new = self.policy.step_log_prob(self.state(prefix), self.t, self.action(prefix), self.embeds, self.negative,
                                        self.sampling)
        old = self.sampled(prefix + "log_probs")
        self.record_gap(new, old)
        return new, old

    def model_output(self, unet, prefix: str = "") -> torch.Tensor:
        """The guided (CFG) model output of ``unet`` at x_t (the policy's, or the reference's)."""
        return self.policy.guided_model_output(unet, self.state(prefix), self.t, self.embeds, self.negative,
                                               self.sampling.guidance_scale)

    def record_gap(self, new: torch.Tensor, old: torch.Tensor) -> None:
        gap = (new.detach() - old).abs().max().item()
        self.gap = gap if self.gap is None else max(self.gap, gap)


class Algorithm:
    """The defaults: plain trajectories, a reward per sample, nothing else."""

    name: ClassVar[str] = ""
    # per-sample tensors of the rollout batch that must be finite for a sample to be trained on
    finite_keys: ClassVar[tuple[str, ...]] = ("log_probs",)

    def __init__(self, train: TrainConfig, sampling: SamplingSettings):
        self.train, self.sampling = train, sampling

    # ---- configuration ----------------------------------------------------------------------
    @classmethod
    def config_problems(cls, config: Config) -> list[str]:
        return []

    # ---- the rollout actor ------------------------------------------------------------------
    def sample_options(self) -> dict:
        """Keyword arguments of ``MultiViewPolicy.sample`` for training batches: the reference
        model runs only at the steps that are trained (the only ones the KL reads)."""
        return {"reference_min_relative_std": self.train.min_relative_step_sigma}

    def record(self, policy: MultiViewPolicy, prompts: list[str], seeds: list[int], trajectory: Trajectory,
               batch: KeyedBatch, reward_input: RewardInput) -> None:
        """Add what this algorithm needs to a training batch (keys) and to the reward input."""

    # ---- the learner: assembling the epoch ----------------------------------------------------
    def reward_ids(self, sample_id: str) -> list[str]:
        """The rewarded ids a sample needs (all must be finite for it to be kept)."""
        return [sample_id]

    def reward_scalars(self, sample_ids: list[str], results: list[RewardResult]) -> dict[str, np.ndarray]:
        """Per-sample numbers from the reward results besides the reward (gathered over the
        data-parallel ranks, so the advantages see the whole batch's)."""
        return {}

    def reward_tensors(self, sample_ids: list[str], results: list[RewardResult]) -> dict[str, torch.Tensor]:
        """Per-sample tensors from the reward results that the loss reads (this shard's only)."""
        return {}

    # ---- the learner: the update -------------------------------------------------------------
    def advantages(self, trainer, stats) -> np.ndarray:
        """What each sample's loss is weighted by (``stats``: the whole batch's scalars)."""
        raise NotImplementedError

    def loss(self, step: Transition) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, stats) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
