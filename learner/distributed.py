"""torch.distributed for the learner group: rendezvous and the few collectives the trainer uses.

With ``train.num_workers`` K > 1 the learner is K data-parallel ranks (``learner/group.py``).
Rank 0 picks a free TCP port on its node (:func:`rendezvous_address`); every rank joins
with ``init_method=tcp://ADDR:PORT`` (:meth:`Collective.join`), gloo on CPU, NCCL on GPU.
With K = 1 none of this runs: the trainer's ``collective`` is ``None`` and
torch.distributed is never initialised.

Plain torch; the Ray actor only calls it.  Tests also drive it from
``torch.multiprocessing`` processes.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port that is free on this host now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    """This node's address as Ray sees it (127.0.0.1 outside Ray)."""
    try:
        import ray.util

        return ray.util.get_node_ip_address()
    except Exception:  # no Ray (plain processes in tests)
        return "127.0.0.1"


def rendezvous_address() -> tuple[str, int]:
    """Rank 0's (node IP, free port): every rank's ``tcp://`` init method."""
    return node_ip(), free_port()


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


class Collective:
    """One rank's view of the learner group's process group."""

    def __init__(self, rank: int, world_size: int, device: torch.device, object_group=None):
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.object_group = object_group  # gloo group for Python objects when the backend is NCCL

    @classmethod
    def join(cls, master_addr: str, master_port: int, rank: int, world_size: int,
             device: torch.device | str = "cpu", timeout_s: float = 1800.0) -> "Collective":
        """Blocks until all ``world_size`` ranks have joined (or ``timeout_s`` passes).

        The same timeout bounds every later collective, so a rank whose peer died
        raises instead of waiting forever."""
        backend = backend_for(device)
        if dist.is_initialized():  # a restarted group in a reused process: start clean
            dist.destroy_process_group()
        if backend == "nccl":  # under Ray each rank sees its own GPU(s), the first as cuda:0
            torch.cuda.set_device(torch.device(device).index or 0)
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
        objects = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if backend == "nccl" else None
        return cls(rank, world_size, torch.device(device), objects)

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64 if self.device.type == "cpu" else torch.float32,
                         device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order (small Python data only: per-sample scalars)."""
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.object_group)
        return out

    def broadcast_(self, tensors: list[torch.Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``src``'s."""
        for t in tensors:
            dist.broadcast(t, src=src)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
