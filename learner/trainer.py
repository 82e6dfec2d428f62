"""One epoch's policy-gradient update, in plain torch (the learner actor wraps it).

Read top to bottom: :meth:`Trainer.assemble` checks versions and drops
non-finite rewards, :meth:`Trainer.advantages` turns rewards and KL into
per-prompt advantages, :meth:`Trainer.update` recomputes log-probs with
gradients and takes the optimizer step(s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from actors.batches import RewardResult, RolloutBatch
from learner.advantages import PerPromptStatTracker, combine_advantages
from learner.config import TrainConfig
from learner.losses import ddpo_is_loss, ddpo_sf_loss
from policy.pipeline import MultiViewPolicy, kl_estimate
from policy.settings import SamplingSettings


class StaleTrajectoryError(RuntimeError):
    """A trajectory sampled by an older policy reached an on-policy update."""


class NoFiniteRewardError(RuntimeError):
    """Every reward of an epoch was NaN or infinite: nothing to learn from."""


class NonFiniteGradientError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class EpochSamples:
    """All of an epoch's usable samples, concatenated in sample-id order."""

    sample_ids: list[str]
    prompts: list[str]
    latents: torch.Tensor  # [N, T+1, C, H, W]
    timesteps: torch.Tensor  # [T]
    log_probs: torch.Tensor  # [N, T]
    ref_log_probs: torch.Tensor  # [N, T]
    rewards: np.ndarray  # [N]
    mrc: np.ndarray | None
    num_dropped: int

    @property
    def kl(self) -> np.ndarray:
        return kl_estimate(self.log_probs, self.ref_log_probs).numpy()


class Trainer:
    def __init__(self, policy: MultiViewPolicy, train: TrainConfig, sampling: SamplingSettings, seed: int):
        self.policy = policy
        self.cfg = train
        self.sampling = sampling
        self.optimizer = torch.optim.AdamW(
            policy.trainable_parameters(), lr=train.learning_rate, betas=tuple(train.adam_betas),
            weight_decay=train.weight_decay)
        self.reward_tracker = PerPromptStatTracker(train.tracker_buffer_size, train.tracker_min_count)
        self.kl_tracker = PerPromptStatTracker(train.tracker_buffer_size, train.tracker_min_count)
        self.generator = torch.Generator().manual_seed(seed)  # which timesteps are trained
        # fp16 (model.dtype, CUDA only) scales the loss so small gradients survive the fp16
        # backward; disabled (a no-op) for fp32 and bf16.
        self.scaler = torch.amp.GradScaler(policy.device.type, enabled=policy.dtype == torch.float16)
        self.version = 0
        self.nonfinite_streak = 0  # optimizer steps in a row skipped for a non-finite gradient

    def assemble(self, batches: list[RolloutBatch], results: list[RewardResult]) -> EpochSamples:
        """Concatenate an epoch's batches; reject stale ones, drop non-finite rewards."""
        stale = sorted({b.version for b in batches if b.version != self.version})
        if stale:
            raise StaleTrajectoryError(f"trajectories of policy version(s) {stale} reached the "
                                       f"update of version {self.version}; on-policy needs all at {self.version}")
        ids_sampled = [sid for b in batches for sid in b.sample_ids]
        if len(set(ids_sampled)) != len(ids_sampled):
            duplicates = sorted({s for s in ids_sampled if ids_sampled.count(s) > 1})
            raise RuntimeError(f"sample ids {duplicates[:5]} appear more than once in one update")
        rewards = {sid: r for res in results for sid, r in zip(res.sample_ids, res.rewards)}
        mrcs = {sid: m for res in results if res.mrc is not None for sid, m in zip(res.sample_ids, res.mrc)}
        keep_rows, ids, prompts = [], [], []
        for b_index, batch in enumerate(batches):
            for row, sid in enumerate(batch.sample_ids):
                if sid not in rewards:
                    raise RuntimeError(f"sample {sid} has no reward")
                if np.isfinite(rewards[sid]) and bool(torch.isfinite(batch.trajectory.log_probs[row]).all()):
                    keep_rows.append((b_index, row))
                    ids.append(sid)
                    prompts.append(batch.trajectory.prompts[row])
        total = sum(len(b) for b in batches)
        if not keep_rows:
            raise NoFiniteRewardError(f"all {total} samples had a non-finite reward or log-prob")

        def gather(attr):
            return torch.stack([getattr(batches[b].trajectory, attr)[r] for b, r in keep_rows])

        return EpochSamples(
            sample_ids=ids, prompts=prompts, latents=gather("latents"),
            timesteps=batches[0].trajectory.timesteps, log_probs=gather("log_probs"),
            ref_log_probs=gather("ref_log_probs"),
            rewards=np.array([rewards[s] for s in ids], dtype=np.float64),
            mrc=np.array([mrcs[s] for s in ids]) if len(mrcs) == total else None,
            num_dropped=total - len(ids),
        )

    def advantages(self, samples: EpochSamples) -> np.ndarray:
        reward_z = self.reward_tracker.update(samples.prompts, samples.rewards)
        kl_z = self.kl_tracker.update(samples.prompts, samples.kl)
        return combine_advantages(reward_z, kl_z, self.cfg.reward_weight, self.cfg.kl_weight,
                                  self.cfg.advantage_clip)

    def update(self, samples: EpochSamples, advantages: np.ndarray) -> dict:
        """Recompute log-probs with gradients and step: one step per minibatch (SF: one)."""
        policy, cfg = self.policy, self.cfg
        policy.scheduler.set_timesteps(len(samples.timesteps))
        n, num_steps = samples.log_probs.shape
        trained = max(1, round(num_steps * cfg.timestep_fraction))
        # Each sample trains on its own random subset of steps (as DDPO does).
        step_index = torch.stack([torch.randperm(num_steps, generator=self.generator)[:trained]
                                  for _ in range(n)])
        device = policy.device
        adv = torch.as_tensor(advantages, dtype=torch.float32, device=device)
        order = torch.randperm(n, generator=self.generator)
        losses, grad_norms, skipped, recompute_gap = [], [], 0, 0.0
        for update_index, minibatch in enumerate(order.chunk(cfg.num_minibatches)):
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for micro in minibatch.split(cfg.microbatch_size):
                embeds = policy.encode_prompts([samples.prompts[i] for i in micro])
                negative = policy.negative_embeds(embeds, self.sampling.negative_prompt)
                for k in range(trained):
                    j = step_index[micro, k]
                    log_prob = policy.step_log_prob(
                        samples.latents[micro, j].to(device), samples.timesteps[j].to(device),
                        samples.latents[micro, j + 1].to(device), embeds, negative, self.sampling)
                    sampled_log_prob = samples.log_probs[micro, j].to(device)
                    if update_index == 0:
                        # Before the first step the weights are the sampler's: any gap here is
                        # an off-policy bug (different weights, CFG, scheduler or numerics).
                        gap = (log_prob.detach() - sampled_log_prob).abs().max().item()
                        recompute_gap = max(recompute_gap, gap)
                    if self.cfg.algorithm == "ddpo-sf":
                        loss = ddpo_sf_loss(log_prob, adv[micro])
                    else:
                        loss = ddpo_is_loss(log_prob, sampled_log_prob, adv[micro], cfg.clip_range)
                    # Mean over the minibatch's samples and the trained steps.
                    self.scaler.scale(loss * len(micro) / (len(minibatch) * trained)).backward()
                    loss_sum += loss.item() * len(micro) / (len(minibatch) * trained)
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), cfg.max_grad_norm)
            if math.isfinite(loss_sum) and torch.isfinite(grad_norm):
                self.scaler.step(self.optimizer)
                self.nonfinite_streak = 0
            else:  # never apply a non-finite step
                skipped += 1
                # With fp16 loss scaling, a finite loss whose scaled gradient overflowed is the
                # scaler calibrating (it lowers its scale): not a failure, unless the scale has
                # already fallen below 1.
                overflow = (self.scaler.is_enabled() and math.isfinite(loss_sum)
                            and self.scaler.get_scale() >= 1.0)
                self.nonfinite_streak += 0 if overflow else 1
                if self.nonfinite_streak >= cfg.max_nonfinite_steps:
                    raise NonFiniteGradientError(
                        f"{self.nonfinite_streak} optimizer steps in a row had a non-finite loss or "
                        f"gradient (last: loss {loss_sum}, grad norm {float(grad_norm)}); lower "
                        "train.learning_rate or check the reward scale")
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss_sum)
            grad_norms.append(float(grad_norm))
        self.version += 1
        metrics = {"loss": float(np.mean(losses)), "grad_norm": float(np.mean(grad_norms)),
                   "logprob_recompute_gap": recompute_gap,
                   "skipped_steps": skipped, "trained_steps_per_sample": trained}
        if self.scaler.is_enabled():
            metrics["grad_scale"] = float(self.scaler.get_scale())
        return metrics
