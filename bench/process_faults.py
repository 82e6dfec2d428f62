"""Faults from outside the process: signals to an actor's or the driver's process, a full
or read-only disk, checkpoints damaged on disk.

The ``faults`` config block makes an actor fail from inside (it raises, exits or
sleeps in its own code).  Here the failure comes from outside, as it does in
production: ``kill -STOP`` (a hang the actor cannot notice: its RPC threads stop
too) or ``kill -KILL`` sent to the process of ``rollout-0``, ``reward-1`` or
``learner`` when the driver enters a phase of an epoch:

* ``sample``: the epoch's batches were just handed out (the rollout and reward
  actors are busy: sampling, scoring);
* ``train``: the learner's update starts (rollout and reward actors idle);
* ``sync``: the new weights are about to be published and loaded (weight sync);
* ``checkpoint``: the epoch's checkpoint is written (every actor synced, rollout and
  reward idle: a crash there is seen only when the next batch arrives);
* ``eval``: the held-out evaluation starts (epoch is ignored).

``ProcessFault.armed`` patches the driver's functions for the duration of a ``with``
block, nothing else.  Used by ``tests/test_reliability.py`` and ``bench/reliability_drill.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

PHASES = ("sample", "train", "sync", "checkpoint", "eval")


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
    # SIGKILL only: hold the driver until Ray has restarted the actor, so that its next call
    # meets the fresh process (no error tells the driver it died: it was restarted unseen)
    wait_restart: bool = False

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
            return
        os.kill(pid, self.sig)
        deadline = time.monotonic() + 300
        while self.wait_restart and time.monotonic() < deadline:
            with contextlib.suppress(LookupError):
                if actor_pid(self.actor) != pid:
                    return
            time.sleep(0.5)

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
            if method in ("train", "save_checkpoint") and self.phase == method.split("_")[-1] \
                    and trained[-1] == self.epoch:
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


# ---- the driver's own process, and its disk -------------------------------------------------
def start_driver(*overrides: str) -> subprocess.Popen:
    """``python -m learner.main`` in its own process group (with its embedded Ray), output piped."""
    from learner.config import PROJECT_ROOT

    return subprocess.Popen([sys.executable, "-m", "learner.main", *overrides, "run.local_num_cpus=2"],
                            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def read_until(driver: subprocess.Popen, prefix: str) -> list[str]:
    """The driver's output lines up to the first that starts with ``prefix``."""
    lines = []
    for line in driver.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise RuntimeError(f"the driver ended before {prefix!r}:\n" + "".join(lines))


def stop_group(driver: subprocess.Popen) -> None:
    """End the driver's Ray processes (raylet, GCS, agents): they outlive a SIGKILLed driver."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(driver.pid, signal.SIGKILL)


def lingering(driver: subprocess.Popen, limit_s: float) -> float:
    """Seconds until the processes of a killed driver's group are gone (``limit_s`` if never)."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        try:
            os.killpg(driver.pid, 0)
        except ProcessLookupError:
            return time.monotonic() - start
        time.sleep(1)
    return limit_s


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A small file system of its own at ``path`` (a disk that fills, or is made read-only);
    needs root.  RuntimeError when it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode:
        raise RuntimeError(f"cannot mount a tmpfs at {path}: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_disk(path: Path) -> Path:
    """Fill the file system of ``path`` (dd until ENOSPC); returns the file to delete."""
    fill = path / "fill"
    subprocess.run(["dd", "if=/dev/zero", f"of={fill}", "bs=64k"], capture_output=True)
    return fill


# ---- checkpoints damaged on disk ------------------------------------------------------------
def rewrite_manifest(checkpoint: Path) -> None:
    """Make the checksums match whatever the files now hold (damage the checksums cannot see)."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for name in manifest:
        manifest[name] = hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def truncate_weights(checkpoint: Path) -> None:
    weights = checkpoint / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def drop_state_keys(checkpoint: Path) -> None:
    """trainer_state.json without the learner's keys, checksums updated to match."""
    (checkpoint / "trainer_state.json").write_text(json.dumps({"epoch": 1}))
    rewrite_manifest(checkpoint)


def break_safetensors_header(checkpoint: Path) -> None:
    """An impossible safetensors header length, checksums updated to match."""
    weights = checkpoint / "weights.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])
    rewrite_manifest(checkpoint)
