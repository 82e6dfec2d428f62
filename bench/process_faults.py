"""Faults from outside the process: a signal sent to a role's actor process at a phase.

The ``faults`` config block makes an actor fail from inside (it raises, exits or
sleeps in its own code).  Here the failure comes from outside, as it does in
production: ``kill -STOP`` (a hang the actor cannot notice: its RPC threads stop
too) or ``kill -KILL`` sent to the process of ``rollout-0``, ``reward-1`` or
``learner`` when the driver enters a phase of an epoch:

* ``sample``: the epoch's batches were just handed out (the rollout and reward
  actors are busy: sampling, scoring);
* ``train``: the learner's update starts (rollout and reward actors idle);
* ``sync``: the new weights are about to be published and loaded (weight sync);
* ``eval``: the held-out evaluation starts (epoch is ignored).

Used by ``tests/test_reliability.py`` and ``bench/reliability_drill.py``; it patches
the driver's functions for the duration of a ``with`` block, nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from unittest import mock

PHASES = ("sample", "train", "sync", "eval")


def actor_pid(name: str) -> int:
    """The PID of the live actor ``name``, from Ray's actor table (answers while the actor
    is busy or stopped, unlike a call to the actor)."""
    from ray._private import state

    for info in state.actors().values():
        if info.get("Name") == name and info.get("State") == "ALIVE":
            return int(info["Pid"])
    raise LookupError(f"no live actor named {name!r}")


@dataclass
class ProcessFault:
    actor: str  # rollout-0, reward-1, learner
    sig: int  # signal.SIGSTOP or signal.SIGKILL
    phase: str  # one of PHASES
    epoch: int = 0
    delay_s: float = 0.0  # after entering the phase (sample: lands mid-batch with ~0.5 s)

    def __post_init__(self):
        assert self.phase in PHASES, self.phase
        self.sent: list[int] = []  # the PIDs signalled

    @property
    def label(self) -> str:
        name = signal.Signals(self.sig).name
        return f"{self.actor}: {name} in {self.phase}" + ("" if self.phase == "eval" else f", epoch {self.epoch}")

    def _fire(self) -> None:
        if self.sent:  # once per run
            return
        pid = actor_pid(self.actor)
        self.sent.append(pid)
        if self.delay_s:
            threading.Timer(self.delay_s, os.kill, (pid, self.sig)).start()
        else:
            os.kill(pid, self.sig)

    @contextlib.contextmanager
    def armed(self):
        """Patch the driver so that the signal goes out when the phase begins."""
        import learner.driver as driver

        collect, call, sync = driver.collect_epoch, driver.call_learner, driver.sync_weights
        trained = []  # epochs whose update started: sync comes after the update of epoch e

        def collect_epoch(roles, specs, batch_size, epoch, *args, **kwargs):
            if (self.phase == "sample" and epoch == self.epoch) or (self.phase == "eval" and epoch < 0):
                self._fire()
            return collect(roles, specs, batch_size, epoch, *args, **kwargs)

        def call_learner(config, roles, method, *args, **kwargs):
            if method == "train":
                trained.append(args[0])
                if self.phase == "train" and args[0] == self.epoch:
                    self._fire()
            return call(config, roles, method, *args, **kwargs)

        def sync_weights(config, roles):
            if self.phase == "sync" and trained and trained[-1] == self.epoch:
                self._fire()
            return sync(config, roles)

        with mock.patch.object(driver, "collect_epoch", collect_epoch), \
                mock.patch.object(driver, "call_learner", call_learner), \
                mock.patch.object(driver, "sync_weights", sync_weights):
            yield self
