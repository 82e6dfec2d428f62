"""The learner actor: owns the optimizer, the stat trackers and the policy version.

A thin Ray wrapper around :class:`learner.trainer.Trainer`.  Per epoch it takes
the refs of the epoch's rollout batches and reward results (it fetches the
tensors itself; the driver never does), applies one synchronized update, bumps
the version and publishes the new trainable weights once, with one ``ray.put``.

With ``train.num_workers`` K > 1 there are K of these, ranks 0..K-1 of one
torch.distributed group (``learner/group.py`` starts them and calls :meth:`join`);
each gets its shard of the epoch's refs, and rank 0 publishes and checkpoints.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import ray
import torch

from actors.faults import maybe_inject_fault
from learner.checkpoint import (CheckpointMismatchError, CorruptCheckpointError, load_checkpoint, save_checkpoint,
                                tensor_differences)
from learner.config import Config, to_yaml
from learner.distributed import Collective, rendezvous_address
from learner.trainer import Trainer
from actors.weight_sync import BroadcastGroup, trainable_tensors
from policy.grid import picture
from policy.pipeline import load_policy


class Learner:
    def __init__(self, model_path: str, config: Config, marker_dir: str | None = None, rank: int = 0,
                 world_size: int = 1):
        torch.set_num_threads(config.train.torch_threads)
        torch.manual_seed(config.run.seed)  # the LoRA initialisation, published as version 0
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.policy = load_policy(config.model, "cuda" if config.train.num_gpus > 0 else "cpu", model_path)
        self.trainer = Trainer(self.policy, config.train, config.sampling, seed=config.run.seed)
        self.marker_dir = marker_dir

    # ---- data parallel (K > 1 only; a single learner never calls these) -------------------
    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0: its node IP and a free port, for every rank's ``tcp://`` init method."""
        return rendezvous_address()

    def join(self, master_addr: str, master_port: int) -> int:
        """Join the learner group's process group; then all ranks hold rank 0's weights."""
        self.trainer.collective = Collective.join(master_addr, master_port, self.rank, self.world_size,
                                                  self.policy.device, self.config.train.timeout_s)
        self.trainer.broadcast_weights(0)  # identical anyway (same seed); now guaranteed
        return self.rank

    def weights_digest(self) -> str:
        """SHA-256 of the trainable weights: equal on every rank after every update."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.policy.trainable_state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @property
    def version(self) -> int:
        return self.trainer.version

    # ---- train.weight_sync=broadcast (rank 0 only) ---------------------------------------
    def current_version(self) -> int:
        return self.version

    def join_broadcast(self, address: str, port: int, world_size: int) -> int:
        """Open the weight-broadcast group as its rank 0 (blocks until every member joined)."""
        self.broadcast_group = None  # the old group's store and sockets go first
        self.broadcast_group = BroadcastGroup(address, port, 0, world_size, self.policy.device,
                                              self.config.rollout.timeout_s)
        return 0

    def broadcast_weights(self) -> dict:
        """Send the trainable weights to every rollout actor of the group (they call
        ``receive_weights`` at the same time)."""
        start = time.perf_counter()
        sent = self.broadcast_group.broadcast_(trainable_tensors(self.policy),
                                               self.config.train.weight_sync_bucket_mb << 20)
        return {"version": self.version, "bytes": sent, "seconds": time.perf_counter() - start}

    def publish(self) -> dict:
        """Put the current trainable weights in the object store once; return the ref."""
        start = time.perf_counter()
        state = self.policy.trainable_state_dict()
        ref = ray.put(state)
        return {"version": self.version, "weights": [ref],  # in a list: passed on, not resolved
                "bytes": int(sum(t.numel() * t.element_size() for t in state.values())),
                "put_seconds": time.perf_counter() - start}

    def train(self, epoch: int, batch_refs: list, result_refs: list, update: bool = True,
              num_previews: int = 8) -> dict:
        """One epoch: ``batch_refs``/``result_refs`` are this rank's shard (K = 1: all).

        Every rank returns the same whole-batch metrics; each its own shard's previews and
        warnings, and ``weights_digest`` so the group can check the ranks agree."""
        maybe_inject_fault(self.config.faults, "learner", epoch, self.rank, self.marker_dir)
        start = time.perf_counter()
        batches, results = ray.get(batch_refs), ray.get(result_refs)
        fetch_seconds = time.perf_counter() - start
        samples = self.trainer.assemble(batches, results, allow_empty=self.world_size > 1)
        ids = [sid for b in batches for sid in b.sample_ids]  # (zigal: not their ZMV partners)
        extra = {"sample_ids": ids, "alignment": _values_of(results, "alignment", ids),
                 "object_size": _values_of(results, "object_size", ids)}
        whole = self.trainer.share(samples, extra)  # the whole batch's rewards and KL, on every rank
        advantages = self.trainer.advantages(whole)  # so every rank normalises alike
        kl = whole.kl
        metrics = {
            "epoch": epoch, "version_sampled": self.version, "num_samples": len(whole.sample_ids),
            "num_unique_sample_ids": len({sid for e in whole.extras for sid in e["sample_ids"]}),
            "num_dropped": whole.num_dropped,
            "reward_mean": float(whole.rewards.mean()), "reward_std": float(whole.rewards.std()),
            "mrc_mean": float(whole.mrc.mean()) if whole.mrc is not None else float("nan"),
            "alignment_mean": _mean([e["alignment"] for e in whole.extras]),
            "object_size_mean": _mean([e["object_size"] for e in whole.extras]),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "advantage_mean": float(advantages.mean()), "advantage_abs_mean": float(np.abs(advantages).mean()),
            "advantage_clipped_frac": float((np.abs(advantages) >= self.config.train.advantage_clip).mean()),
            "fetch_seconds": fetch_seconds,
            **self.trainer.algorithm_metrics(whole),
        }
        if update:
            metrics.update(self.trainer.update(samples, advantages))
        metrics["train_seconds"] = time.perf_counter() - start
        metrics["version"] = self.version
        metrics["previews"] = _previews(batches, results, num_previews)
        metrics["warnings"] = sorted({w for r in results for w in r.warnings})
        if self.world_size > 1:
            metrics["learner_workers"] = self.world_size
            metrics["weights_digest"] = self.weights_digest()
        return metrics

    def save_checkpoint(self, directory: str, epoch: int) -> str:
        """Everything the next epoch depends on, so a resumed run repeats it exactly."""
        trainer = self.trainer
        state = {"epoch": epoch, "next_epoch": epoch + 1,  # the prompt plan is a function of the epoch
                 "version": self.version, "finetune": self.config.model.finetune,
                 "reward_tracker": trainer.reward_tracker.state_dict(),
                 "kl_tracker": trainer.kl_tracker.state_dict(),
                 "nonfinite_streak": trainer.nonfinite_streak,
                 **trainer.algorithm.state_dict(),  # the algorithm's own (mvc-zigal: its multiplier)
                 "grad_scaler": trainer.scaler.state_dict(),  # {} unless model.dtype=fp16
                 "trainer_generator": trainer.generator.get_state().tolist(),
                 "torch_rng": torch.get_rng_state().tolist()}
        return str(save_checkpoint(directory, self.policy.trainable_state_dict(),
                                   trainer.optimizer.state_dict(), state, to_yaml(self.config)))

    def load_checkpoint(self, directory: str) -> dict:
        """Restore a checkpoint (verified by checksum); returns its trainer state.

        CheckpointMismatchError: it does not fit this run's model (no fallback helps);
        CorruptCheckpointError: damaged (fall back to the previous one)."""
        weights, optimizer, state = load_checkpoint(directory)
        differences = tensor_differences(weights, self.policy.trainable_state_dict())
        if state.get("finetune", self.config.model.finetune) != self.config.model.finetune:
            differences.insert(0, f"model.finetune={state['finetune']} saved, {self.config.model.finetune} now")
        if differences:
            raise CheckpointMismatchError(
                f"checkpoint {directory} does not fit this run's model ({len(differences)} differences: "
                f"{'; '.join(differences[:4])}); resume with the model settings it was written with")
        try:
            self._restore(weights, optimizer, state)
            return {k: state[k] for k in ("epoch", "next_epoch", "version")}
        except (KeyError, TypeError, ValueError, RuntimeError) as err:  # e.g. a key of the state missing
            raise CorruptCheckpointError(f"{directory} cannot be loaded ({type(err).__name__}: {err})") from None

    def _restore(self, weights: dict, optimizer: dict, state: dict) -> None:
        trainer = self.trainer
        self.policy.load_trainable_state_dict(weights)
        trainer.optimizer.load_state_dict(optimizer)
        trainer.reward_tracker.load_state_dict(state["reward_tracker"])
        trainer.kl_tracker.load_state_dict(state["kl_tracker"])
        trainer.nonfinite_streak = state["nonfinite_streak"]
        trainer.algorithm.load_state_dict(state)
        if state.get("grad_scaler"):
            trainer.scaler.load_state_dict(state["grad_scaler"])
        trainer.generator.set_state(torch.tensor(state["trainer_generator"], dtype=torch.uint8))
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        trainer.version = state["version"]


def _values_of(results, name: str, sample_ids: list[str]) -> np.ndarray | None:
    """An optional per-sample field of the reward results for ``sample_ids`` (None when none has it)."""
    by_id = {sid: v for r in results if getattr(r, name) is not None
             for sid, v in zip(r.sample_ids, getattr(r, name))}
    return np.array([by_id[s] for s in sample_ids if s in by_id]) if by_id else None


def _mean(parts: list) -> float:
    """Mean over the shards' values (NaN when none has any)."""
    values = [v for v in parts if v is not None and len(v)]
    return float(np.concatenate(values).mean()) if values else float("nan")


def _previews(batches, results, limit: int) -> list[dict]:
    """A few samples for the run directory's PNGs: small uint8 pictures only (a sample's views
    as one image, ``policy.grid.picture``)."""
    by_id = {sid: (res, i) for res in results for i, sid in enumerate(res.sample_ids)}
    out = []
    for batch in batches:
        for row, sid in enumerate(batch.sample_ids):
            if len(out) >= limit:
                return out
            res, i = by_id[sid]
            out.append({
                "sample_id": sid, "prompt": batch.data["prompts"][row],
                "reward": float(res.rewards[i]),
                "mrc": float(res.mrc[i]) if res.mrc is not None else None,
                "grid": picture(batch.data["views"][row]),
                "rerender": picture(res.rerenders[i]) if res.rerenders is not None else None,
            })
    return out


RemoteLearner = ray.remote(Learner)
