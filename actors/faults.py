"""Deliberate faults for testing the failure paths (config block ``faults``).

A fault names a role (rollout, reward or learner), an epoch, a batch index within
the epoch (rollout/reward; for the learner the rank, 0 with a single learner), and what happens: ``raise`` an exception, ``exit``
the actor's process, or ``hang``.  It fires once per run: a marker file in the
run directory records that it fired, so a restarted actor does not fire it again.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ROLES = ("rollout", "reward", "learner")
MODES = ("raise", "exit", "hang")


class InjectedFault(RuntimeError):
    """Raised by a ``faults.mode=raise`` fault."""


def maybe_inject_fault(faults, role: str, epoch: int, batch: int, marker_dir: str | None) -> None:
    if faults is None or faults.role != role or faults.epoch != epoch or faults.batch != batch:
        return
    marker = Path(marker_dir or ".") / f"fault-{role}-e{epoch}-b{batch}.fired"
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return  # already fired once in this run
    if faults.mode == "raise":
        raise InjectedFault(f"injected fault: {role} raises at epoch {epoch}, batch {batch}")
    if faults.mode == "exit":
        os._exit(1)
    if faults.mode == "hang":
        time.sleep(faults.hang_seconds)
