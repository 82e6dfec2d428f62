"""Weight sync by a collective broadcast (``train.weight_sync=broadcast``).

The default sync puts the trainable weights in Ray's object store once per version and
every rollout actor fetches them (``learner.actor.Learner.publish``).  For full finetuning
of a production UNet (2.6 GB for SDXL in bf16, more in fp32) that is a copy into the store
plus one transfer per node.  ``broadcast`` instead sends them from learner rank 0 straight
into the rollout actors' parameters over one collective group: NCCL between GPUs, gloo on
CPU, in flat buckets of ``train.weight_sync_bucket_mb`` (one collective call per bucket,
not per parameter: per-parameter calls are what makes naive syncs slow).

The group is a stand-alone process group on its own TCPStore, not torch.distributed's
default world, which the learner ranks may already use among themselves.  Its members are
fixed when it is built: rank 0 the learner, ranks 1..N the live rollout actors.  The driver
rebuilds it when an actor restarted (``learner.driver.broadcast_weights``); a restarted
actor meanwhile loads the current version from the object store, published on demand.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


def bucket_plan(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Consecutive tensors of one dtype and device grouped into buckets of about
    ``bucket_bytes`` (a tensor larger than a bucket is a bucket of its own)."""
    buckets, current, size = [], [], 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        same_kind = not current or (tensors[current[0]].dtype == t.dtype and tensors[current[0]].device == t.device)
        if current and (not same_kind or size + nbytes > bucket_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


class BroadcastGroup:
    """One member's view of the weight-broadcast group (rank 0 sends)."""

    def __init__(self, address: str, port: int, rank: int, world_size: int, device: torch.device | str = "cpu",
                 timeout_s: float = 600.0):
        """Blocks until all ``world_size`` members have joined (or ``timeout_s`` passes); the
        same timeout bounds every broadcast, so a dead member makes the others raise."""
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        timeout = timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout)
        if self.device.type == "cuda":  # under Ray each member sees its own GPU as cuda:0
            torch.cuda.set_device(self.device.index or 0)
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(self.store, rank, world_size, options)
        else:
            self.group = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)

    def broadcast_(self, tensors: list[torch.Tensor], bucket_bytes: int = 256 << 20) -> int:
        """Overwrite every member's ``tensors`` (same shapes, dtypes and order everywhere) with
        rank 0's, bucket by bucket; returns the bytes sent."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        sent = 0
        for bucket in bucket_plan(tensors, bucket_bytes):
            parts = [tensors[i] for i in bucket]
            flat = (torch.cat([p.detach().reshape(-1) for p in parts]) if self.rank == 0 else
                    torch.empty(sum(p.numel() for p in parts), dtype=parts[0].dtype, device=parts[0].device))
            self.group.broadcast([flat], options).wait()
            sent += flat.numel() * flat.element_size()
            if self.rank != 0:
                with torch.no_grad():
                    offset = 0
                    for p in parts:
                        p.copy_(flat[offset:offset + p.numel()].view_as(p))
                        offset += p.numel()
        return sent


def trainable_tensors(policy) -> list[torch.Tensor]:
    """The policy's trainable parameters in one fixed order (by name): what the learner sends
    and each rollout actor receives into, in place."""
    return [p.data for _, p in sorted(policy.unet.named_parameters()) if p.requires_grad]
