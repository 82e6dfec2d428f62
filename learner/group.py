"""The learner group: K data-parallel learner actors, called by the driver as one learner.

``train.num_workers`` K = 1 (the default) is one ``RemoteLearner`` named ``learner``,
exactly as before: no torch.distributed.  K > 1:

* start: K actors ``learner`` (rank 0), ``learner-1`` .. ``learner-{K-1}``; rank 0
  picks a free port on its node IP, the driver passes that address to every rank,
  and all ranks join one process group (``tcp://`` init method, world size K; gloo
  on CPU, NCCL on GPU) and take rank 0's weights;
* train: the epoch's rollout-batch and reward-result *refs* are split into K
  contiguous shards, one per rank (the driver moves references, never tensors);
  each rank fetches only its shard, all-gathers the per-sample rewards and KL so
  every rank computes the whole batch's advantages, and all-reduces gradients
  before clipping and the optimizer step (``learner/trainer.py``).  After the
  update the ranks' weight digests must agree;
* publish and save_checkpoint: rank 0 only (every rank holds the same weights,
  optimizer state, stat trackers and RNG); load_checkpoint: every rank.

Every call has a timeout and fails fast: the first rank to die or raise fails the
call, and the whole group is killed (the others may be blocked in a collective),
which the driver handles as any learner failure (``LearnerFailed``: stop, or
restart every actor from the last good checkpoint with ``run.max_auto_resumes``).
"""

from __future__ import annotations

import time

import ray
from ray.exceptions import RayActorError, RayTaskError

from learner.actor import RemoteLearner
from learner.checkpoint import CheckpointMismatchError, CorruptCheckpointError
from learner.config import Config
from learner.placement import Placement
from learner.trainer import NoFiniteRewardError, NonFiniteGradientError


class LearnerFailed(RuntimeError):
    """The learner (a rank of the learner group) died, hung or raised: the epoch is abandoned."""


# Errors the driver handles itself, raised alike on every rank: passed through as they are, the
# group left running ("the run cannot go on"; a checkpoint that does not load: try the one before).
RUN_ERRORS = (NoFiniteRewardError, NonFiniteGradientError, CorruptCheckpointError, CheckpointMismatchError)


def shard(items: list, num_shards: int) -> list[list]:
    """Contiguous, nearly equal parts (sizes differ by at most one), in order."""
    size, extra = divmod(len(items), num_shards)
    out, start = [], 0
    for index in range(num_shards):
        end = start + size + (index < extra)
        out.append(items[start:end])
        start = end
    return out


class LearnerGroup:
    def __init__(self, actors: list, timeout_s: float):
        self.actors = list(actors)
        self.timeout_s = timeout_s

    @property
    def num_workers(self) -> int:
        return len(self.actors)

    @staticmethod
    def actor_name(rank: int) -> str:
        return "learner" if rank == 0 else f"learner-{rank}"

    @classmethod
    def start(cls, config: Config, model_path: str, marker_dir: str | None = None,
              placement: Placement | None = None) -> "LearnerGroup":
        """Start K learner actors (in their bundles of ``placement``, if any); with K > 1,
        rendezvous them into one process group."""
        k, train = config.train.num_workers, config.train
        placement = placement or Placement()
        actors = [RemoteLearner.options(name=cls.actor_name(rank),
                                        num_cpus=train.num_cpus, num_gpus=train.num_gpus, max_restarts=0,
                                        **placement.options("learner", rank)).remote(model_path, config, marker_dir,
                                                                                     rank, k)
                  for rank in range(k)]
        group = cls(actors, train.timeout_s)
        if k > 1:
            address, port = group._wait([actors[0].rendezvous_address.remote()], "rendezvous_address")[0]
            group._wait([actor.join.remote(address, port) for actor in actors], f"join (tcp://{address}:{port})")
        return group

    # ---- the calls the driver makes ----------------------------------------------------
    def call(self, method: str, *args, timeout: float | None = None):
        if method == "train":
            return self.train(*args, timeout=timeout)
        if method in ("publish", "save_checkpoint", "current_version"):  # rank 0 holds what every rank holds
            return self._wait([getattr(self.actors[0], method).remote(*args)], method, timeout)[0]
        if method == "load_checkpoint":  # every rank restores the same checkpoint
            return self._wait([a.load_checkpoint.remote(*args) for a in self.actors], method, timeout)[0]
        raise ValueError(f"unknown learner method {method!r}")

    def train(self, epoch: int, batch_refs: list, result_refs: list, update: bool = True,
              num_previews: int = 8, timeout: float | None = None) -> dict:
        """One epoch on all ranks, each with its shard of the refs; rank 0's metrics, with the
        first ``num_previews`` previews of the whole batch and every rank's warnings."""
        k = self.num_workers
        batch_shards, result_shards = shard(list(batch_refs), k), shard(list(result_refs), k)
        refs = [actor.train.remote(epoch, batches, results, update, num_previews)
                for actor, batches, results in zip(self.actors, batch_shards, result_shards)]
        answers = self._wait(refs, "train", timeout)
        metrics = answers[0]
        if k > 1:
            digests = {a.pop("weights_digest") for a in answers}
            if len(digests) != 1:
                self.kill()
                raise LearnerFailed(f"learner ranks hold different weights after epoch {epoch} "
                                    f"({len(digests)} distinct digests over {k} ranks)")
            metrics["previews"] = [p for a in answers for p in a["previews"]][:num_previews]
            metrics["warnings"] = sorted({w for a in answers for w in a["warnings"]})
        return metrics

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)

    # ---- waiting: a timeout, and the first failure fails the call -----------------------
    def _wait(self, refs: list, method: str, timeout: float | None = None) -> list:
        timeout = timeout or self.timeout_s
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending, deadline = list(refs), time.monotonic() + timeout
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self.kill()
                ranks = sorted(rank_of[r] for r in pending)
                who = "" if self.num_workers == 1 else f"learner rank(s) {ranks}: "
                raise LearnerFailed(f"{who}learner.{method} did not answer within {timeout:g}s") from None
            try:
                ray.get(ready[0])
            except RUN_ERRORS:
                raise
            except (RayActorError, RayTaskError) as err:
                raise self._failed(method, rank_of, ready[0], err, pending, deadline) from None
        return ray.get(list(refs))

    def _failed(self, method: str, rank_of: dict, ref, err, pending: list, deadline: float) -> LearnerFailed:
        """Kill the group and say which rank failed how.  The first error seen may be a
        survivor's (its collective lost the peer): wait briefly for the others' errors
        and list the ranks whose process died first."""
        if self.num_workers == 1:
            self.kill()
            return LearnerFailed(f"learner.{method} failed: {_last_line(err)}")
        errors = {rank_of[ref]: err}
        if pending:
            ready, _ = ray.wait(pending, num_returns=len(pending),
                                timeout=max(0.0, min(5.0, deadline - time.monotonic())))
            for other in ready:
                try:
                    ray.get(other)
                except Exception as other_err:  # noqa: BLE001 - reported, never raised
                    errors[rank_of[other]] = other_err
        self.kill()  # the other ranks may wait for it in a collective
        order = sorted(errors, key=lambda r: (not isinstance(errors[r], RayActorError), r))
        details = "; ".join(f"rank {r}: {'process died: ' if isinstance(errors[r], RayActorError) else ''}"
                            f"{_last_line(errors[r])}" for r in order)
        return LearnerFailed(f"learner.{method} failed on {len(errors)} of {self.num_workers} ranks ({details})")


def _last_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[-1] if lines else type(err).__name__
