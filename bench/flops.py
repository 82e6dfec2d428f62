"""Arithmetic counts and the machine's arithmetic peak, for the utilisation figures of
``bench/best_loop.py``.

* ``FlopCount``: torch's ``FlopCounterMode`` (matmuls, convolutions, attention; forward
  and backward), with the CPU attention kernels added: torch counts the CUDA attention
  kernels only, and on a CPU ``scaled_dot_product_attention`` runs
  ``_scaled_dot_product_flash_attention_for_cpu``, which it would count as 0.
* ``matmul_peak``: the dense fp32 matmul rate of these cores at a given torch thread
  count, the best a UNet's arithmetic can hope for here.

Counts are multiply-adds x 2, as torch counts them; elementwise work (norms, activations,
the DDIM update) is not counted, so a utilisation computed from them is a lower bound of
the cores' busy share and an upper bound of what the matmul-shaped work would reach.
"""

from __future__ import annotations

import time

import torch
from torch.utils import flop_counter

_aten = torch.ops.aten
_registered = False


def register_cpu_attention() -> None:
    """Teach ``FlopCounterMode`` the CPU flash-attention kernels (forward and backward),
    with torch's own formulas for the CUDA ones.  Idempotent."""
    global _registered
    if _registered:
        return
    @flop_counter.register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu)
    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    _registered = True


class FlopCount:
    """``with FlopCount() as count: ...`` -> ``count.total`` and ``count.of(module_name)``
    (the FLOPs inside modules whose hierarchy name ends with ``module_name``)."""

    def __enter__(self) -> "FlopCount":
        register_cpu_attention()
        self.mode = flop_counter.FlopCounterMode(display=False)
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return int(self.mode.get_total_flops())

    def of(self, module_name: str) -> int:
        """FLOPs counted under the outermost module named ``module_name`` (e.g. ``unet``)."""
        counts = self.mode.get_flop_counts()
        names = [n for n in counts if n.split(".")[-1] == module_name]
        if not names:
            return 0
        outermost = min(names, key=lambda n: n.count("."))
        return int(sum(counts[outermost].values()))


def matmul_peak(threads: int, size: int = 1536, seconds: float = 3.0) -> float:
    """Dense fp32 ``size x size`` matmuls per second x their FLOPs, on ``threads`` torch threads
    (the best of three timed rounds of about ``seconds / 3`` each)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        out = torch.empty(size, size)
        torch.mm(a, b, out=out)  # warm-up
        flops_per_call = 2 * size ** 3
        best = 0.0
        for _ in range(3):
            calls, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds / 3:
                torch.mm(a, b, out=out)
                calls += 1
            best = max(best, calls * flops_per_call / elapsed)
        return best
    finally:
        torch.set_num_threads(previous)
