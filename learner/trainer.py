"""One epoch's policy-gradient update, in plain torch (the learner actor wraps it).

Read top to bottom: :meth:`Trainer.assemble` checks versions and drops
non-finite rewards, :meth:`Trainer.share` collects the whole epoch batch's
per-sample scalars (rewards, KL, prompts), :meth:`Trainer.advantages` turns them
into advantages, :meth:`Trainer.update` recomputes the loss with gradients and
takes the optimizer step(s).  What is algorithm-specific (what a sample needs, the
advantages, the per-transition loss, metrics) is ``train.algorithm``'s registered
strategy (``learner/algorithms/``); this module names no algorithm.

Data parallel (``train.num_workers`` K > 1, ``learner/group.py``): each rank
assembles its shard of the batch; ``share`` all-gathers the small per-sample
scalars so every rank computes the same advantages of the *whole* batch (and keeps
identical stat trackers); ``update`` draws the same random timesteps and minibatch
order for the whole batch on every rank and back-propagates only its own rows,
each scaled by the whole minibatch's size, so the all-reduced (summed) gradient is
exactly the K = 1 gradient, whatever the shard sizes.  Clipping and the optimizer
step follow the all-reduce, so every rank applies the same step.  With K = 1
(``collective=None``) nothing is gathered or reduced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from actors.batches import RewardResult, RolloutBatch
from learner.advantages import PerPromptStatTracker
from learner.algorithms import Transition, build_algorithm
from learner.algorithms.base import values_by_id
from learner.config import TrainConfig
from learner.distributed import Collective
from policy.ddim import trained_steps
from policy.pipeline import MultiViewPolicy, kl_estimate
from policy.settings import SamplingSettings
from protocol.batch import KeyedBatch


class StaleTrajectoryError(RuntimeError):
    """A trajectory sampled by an older policy reached an on-policy update."""


class NoFiniteRewardError(RuntimeError):
    """Every reward of an epoch was NaN or infinite: nothing to learn from."""


class NonFiniteGradientError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class EpochSamples:
    """All of an epoch's usable samples, concatenated in sample-id order.

    ``data`` holds the per-sample tensors: ``latents`` [N, T+1, C, H, W], ``log_probs`` [N, T],
    ``ref_log_probs`` [N, T], ``views``, and whatever keys the algorithm added in the rollout
    (``zmv/latents``, ``x0_predictions``) or took from the reward results (``view_gradients``)."""

    sample_ids: list[str]
    prompts: list[str]
    data: KeyedBatch
    timesteps: torch.Tensor  # [T]
    rewards: np.ndarray  # [N]
    mrc: np.ndarray | None
    num_dropped: int
    # per-sample scalars the advantages need besides the reward (the algorithm's
    # reward_scalars, e.g. zigal's zmv_rewards); gathered over the ranks by Trainer.share
    scalars: dict = field(default_factory=dict)
    # Data parallel: this shard's first row in the whole batch, and the whole batch's rows
    # (set by Trainer.share; None: these samples are the whole batch).
    offset: int = 0
    total: int | None = None
    kl_steps: torch.Tensor | None = None

    @classmethod
    def of(cls, sample_ids: list[str], trajectory, rewards: np.ndarray, mrc: np.ndarray | None = None,
           num_dropped: int = 0) -> EpochSamples:
        """The samples of one trajectory (``policy.pipeline.Trajectory``), for tools that sample
        without the rollout actors (the gradient probe)."""
        from actors.batches import trajectory_batch

        return cls(sample_ids, list(trajectory.prompts), trajectory_batch(trajectory), trajectory.timesteps,
                   rewards, mrc, num_dropped)

    @property
    def latents(self) -> torch.Tensor:
        return self.data.get("latents", torch.zeros((0, 0)))

    @property
    def log_probs(self) -> torch.Tensor:
        return self.data.get("log_probs", torch.zeros((0, 0)))

    @property
    def ref_log_probs(self) -> torch.Tensor:
        return self.data.get("ref_log_probs", torch.zeros((0, 0)))

    @property
    def kl(self) -> np.ndarray:
        """Per-sample KL to the reference over ``kl_steps`` (the trained steps, set by the
        Trainer; None: all)."""
        if len(self.log_probs) == 0:
            return np.zeros(0)
        return kl_estimate(self.log_probs, self.ref_log_probs, self.kl_steps).numpy()


@dataclass
class BatchStats:
    """The whole epoch batch's per-sample scalars (every shard's, in shard order): what the
    advantages and the epoch's metrics need, identical on every rank."""

    sample_ids: list[str]
    prompts: list[str]
    rewards: np.ndarray  # [N]
    kl: np.ndarray  # [N]
    mrc: np.ndarray | None
    num_dropped: int
    scalars: dict  # EpochSamples.scalars of the whole batch
    extras: list  # each shard's ``extra`` (see Trainer.share), in shard order


class Trainer:
    def __init__(self, policy: MultiViewPolicy, train: TrainConfig, sampling: SamplingSettings, seed: int,
                 collective: Collective | None = None):
        self.policy = policy
        self.collective = collective  # None: a single learner, no torch.distributed
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
        # train.algorithm's strategy (learner/algorithms/): advantages, the loss, its metrics and state
        self.algorithm = build_algorithm(train, sampling)

    def assemble(self, batches: list[RolloutBatch], results: list[RewardResult],
                 allow_empty: bool = False) -> EpochSamples:
        """Concatenate an epoch's batches; reject stale ones, drop non-finite rewards.

        ``allow_empty``: this is one shard of a data-parallel batch, which may have no
        usable sample (or no batch) while the others do; :meth:`share` checks the whole."""
        stale = sorted({b.version for b in batches if b.version != self.version})
        if stale:
            raise StaleTrajectoryError(f"trajectories of policy version(s) {stale} reached the "
                                       f"update of version {self.version}; on-policy needs all at {self.version}")
        ids_sampled = [sid for b in batches for sid in b.sample_ids]
        if len(set(ids_sampled)) != len(ids_sampled):
            duplicates = sorted({s for s in ids_sampled if ids_sampled.count(s) > 1})
            raise RuntimeError(f"sample ids {duplicates[:5]} appear more than once in one update")
        rewards = values_by_id(results, "rewards")
        mrcs = values_by_id(results, "mrc")
        algorithm = self.algorithm

        def usable(batch, row, sid) -> bool:
            return (all(np.isfinite(rewards[r]) for r in algorithm.reward_ids(sid))
                    and all(bool(torch.isfinite(batch.data[k][row]).all()) for k in algorithm.finite_keys))

        keep, ids, prompts, start = [], [], [], 0  # keep: rows of the batches' concatenation
        for batch in batches:
            for row, sid in enumerate(batch.sample_ids):
                if any(r not in rewards for r in algorithm.reward_ids(sid)):
                    raise RuntimeError(f"sample {sid} has no reward")
                if usable(batch, row, sid):
                    keep.append(start + row)
                    ids.append(sid)
                    prompts.append(batch.data["prompts"][row])
            start += len(batch)
        total = sum(len(b) for b in batches)
        if not keep and not allow_empty:
            raise NoFiniteRewardError(f"all {total} samples had a non-finite reward or log-prob")
        data = KeyedBatch.concat([b.data for b in batches]).select(keep)
        for key, value in algorithm.reward_tensors(ids, results).items():
            data[key] = value
        return EpochSamples(
            sample_ids=ids, prompts=prompts, data=data,
            timesteps=batches[0].data.meta["timesteps"] if batches else torch.zeros(0, dtype=torch.long),
            rewards=np.array([rewards[s] for s in ids], dtype=np.float64),
            mrc=np.array([mrcs[s] for s in ids]) if mrcs and all(s in mrcs for s in ids) else None,
            num_dropped=total - len(ids),
            scalars=algorithm.reward_scalars(ids, results),
        )

    def share(self, samples: EpochSamples, extra=None) -> BatchStats:
        """The whole batch's per-sample scalars on every rank (K = 1: this batch's).

        Sets ``samples.offset``/``samples.total`` (where this shard sits in the whole
        batch).  ``extra``: any small picklable value per shard, returned in shard order
        (the learner's per-sample metrics)."""
        local = {"sample_ids": samples.sample_ids, "prompts": samples.prompts, "rewards": samples.rewards,
                 "kl": self._with_kl_steps(samples).kl, "mrc": samples.mrc, "num_dropped": samples.num_dropped,
                 "timesteps": samples.timesteps.tolist(), "scalars": samples.scalars, "extra": extra}
        parts = [local] if self.collective is None else self.collective.all_gather_object(local)
        rank = 0 if self.collective is None else self.collective.rank
        ids = [sid for p in parts for sid in p["sample_ids"]]
        kept = len(ids)
        if not kept:
            total = sum(p["num_dropped"] for p in parts)
            raise NoFiniteRewardError(f"all {total} samples had a non-finite reward or log-prob")
        if len(set(ids)) != kept:
            duplicates = sorted({s for s in ids if ids.count(s) > 1})
            raise RuntimeError(f"sample ids {duplicates[:5]} appear more than once in one update")
        samples.offset = sum(len(p["sample_ids"]) for p in parts[:rank])
        samples.total = kept
        if len(samples.timesteps) == 0:  # an empty shard: the schedule is the same for every sample
            samples.timesteps = torch.tensor(next(p["timesteps"] for p in parts if p["timesteps"]))
        mrcs = [p["mrc"] for p in parts if p["sample_ids"]]
        return BatchStats(
            sample_ids=ids, prompts=[q for p in parts for q in p["prompts"]],
            rewards=np.concatenate([p["rewards"] for p in parts]),
            kl=np.concatenate([p["kl"] for p in parts]),
            mrc=np.concatenate(mrcs) if all(m is not None for m in mrcs) else None,
            num_dropped=sum(p["num_dropped"] for p in parts),
            scalars={k: np.concatenate([p["scalars"][k] for p in parts if k in p["scalars"]])
                     for k in {k for p in parts for k in p["scalars"]}},
            extras=[p["extra"] for p in parts])

    def advantages(self, samples: EpochSamples | BatchStats) -> np.ndarray:
        """What each sample's loss is weighted by, for the whole batch (data parallel: pass
        ``share``'s BatchStats, so every rank computes the same numbers): the algorithm's."""
        if isinstance(samples, EpochSamples):
            self._with_kl_steps(samples)
        return self.algorithm.advantages(self, samples)

    def _with_kl_steps(self, samples: EpochSamples) -> EpochSamples:
        samples.kl_steps = self.trained_steps(samples.timesteps)
        return samples

    def algorithm_metrics(self, whole: BatchStats) -> dict:
        """The epoch's algorithm-specific numbers (after :meth:`advantages`)."""
        return self.algorithm.metrics(whole)

    def trained_steps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The steps the update learns from and the KL is measured on: those whose noise std is
        at least ``train.min_relative_step_sigma`` (all of them at 0)."""
        if self.cfg.min_relative_step_sigma <= 0 or len(timesteps) == 0:  # (an empty shard has none)
            return torch.arange(len(timesteps))
        self.policy.scheduler.set_timesteps(len(timesteps))
        return trained_steps(self.policy.scheduler, timesteps, self.sampling.eta, self.cfg.min_relative_step_sigma)

    def update(self, samples: EpochSamples, advantages: np.ndarray) -> dict:
        """Recompute log-probs with gradients and step: one step per minibatch (SF: one).

        ``advantages`` are the whole batch's.  Data parallel, the random timesteps and the
        minibatch order are drawn for the whole batch (the same draws on every rank, and
        as with K = 1); this rank back-propagates the rows it holds, scaled by the whole
        minibatch's size, and the gradients are summed over the ranks before clipping."""
        policy, cfg = self.policy, self.cfg
        policy.scheduler.set_timesteps(len(samples.timesteps))
        n_local = len(samples.sample_ids)
        n = n_local if samples.total is None else samples.total  # the whole batch
        first, last = samples.offset, samples.offset + n_local  # this shard's rows in it
        eligible = self.trained_steps(samples.timesteps)
        trained = max(1, round(len(eligible) * cfg.timestep_fraction))
        # Each sample trains on its own random subset of the eligible steps (as DDPO does).
        step_index = torch.stack([eligible[torch.randperm(len(eligible), generator=self.generator)[:trained]]
                                  for _ in range(n)])
        device = policy.device
        adv = torch.as_tensor(advantages, dtype=torch.float32, device=device)
        order = torch.randperm(n, generator=self.generator)
        losses, grad_norms, skipped, recompute_gap = [], [], 0, 0.0
        for update_index, minibatch in enumerate(order.chunk(cfg.num_minibatches)):
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            mine = minibatch[(minibatch >= first) & (minibatch < last)]  # K = 1: all of it, in order
            for micro in mine.split(cfg.microbatch_size) if len(mine) else ():  # (an empty split is one empty chunk)
                rows = micro - first  # global sample index -> row of this shard
                embeds = policy.encode_prompts([samples.prompts[i] for i in rows])
                negative = policy.negative_embeds(embeds, self.sampling.negative_prompt)
                for k in range(trained):
                    j = step_index[micro, k]
                    loss, gap = self.transition_loss(samples, rows, j, embeds, negative, adv[micro])
                    if update_index == 0:
                        # Before the first step the weights are the sampler's: any gap here is
                        # an off-policy bug (different weights, CFG, scheduler or numerics).
                        recompute_gap = max(recompute_gap, gap)
                    # Mean over the (whole) minibatch's samples and the trained steps.
                    self.scaler.scale(loss * len(micro) / (len(minibatch) * trained)).backward()
                    loss_sum += loss.item() * len(micro) / (len(minibatch) * trained)
            if self.collective is not None:
                loss_sum = self._all_reduce_gradients(loss_sum)  # identical (scaled) gradients on every rank
            self.scaler.unscale_(self.optimizer)
            # Clip the whole batch's (all-reduced) gradient: identical on every rank.
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
        if self.collective is not None:
            recompute_gap = self.collective.all_reduce_max(recompute_gap)
        self.version += 1
        metrics = {"loss": float(np.mean(losses)), "grad_norm": float(np.mean(grad_norms)),
                   "logprob_recompute_gap": recompute_gap,
                   "skipped_steps": skipped, "trained_steps_per_sample": trained}
        if self.scaler.is_enabled():
            metrics["grad_scale"] = float(self.scaler.get_scale())
        return metrics

    def transition_loss(self, samples: EpochSamples, rows: torch.Tensor, j: torch.Tensor, embeds, negative,
                        adv: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The algorithm's loss of the transitions x_t -> x_{t-1} at step ``j[i]`` of each row, with
        gradients; and the largest |recomputed - sampled log-prob| (the on-policy check; 0 for a
        loss without log-probs)."""
        step = Transition(self.policy, self.sampling, self.cfg, samples, rows, j, embeds, negative, adv)
        loss = self.algorithm.loss(step)
        return loss, 0.0 if step.gap is None else step.gap

    def _all_reduce_gradients(self, loss_sum: float) -> float:
        """Sum every rank's gradients (and loss) in one collective; returns the summed loss.

        Each rank's loss is already divided by the whole minibatch's sample count, so the
        sum is the K = 1 gradient: the shard-size-weighted average of per-rank means.  A
        rank without rows in this minibatch contributes zeros."""
        params = self.policy.trainable_parameters()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in params]
                         + [torch.tensor([loss_sum], dtype=torch.float32, device=self.policy.device)])
        self.collective.all_reduce_sum_(flat)
        start = 0
        for p in params:
            size = p.numel()
            p.grad = flat[start:start + size].view_as(p).to(p.dtype).clone()
            start += size
        return float(flat[-1].item())

    def broadcast_weights(self, src: int = 0) -> None:
        """Data parallel: make every rank's trainable weights rank ``src``'s."""
        if self.collective is not None:
            with torch.no_grad():
                self.collective.broadcast_([p.detach() for p in self.policy.trainable_parameters()], src)
