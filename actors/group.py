"""Actors of one role with task queues, timeouts, restarts and re-issue.

The driver gives an ``ActorGroup`` tasks; each task is a function that launches
one actor call and returns its object refs, the last of which is a small status
dict.  The group keeps at most ``max_in_flight`` calls queued per actor (the
next one is ready while one runs), sends new tasks to the least-loaded live
actor, and on every :meth:`poll` reports the tasks that finished.

Failures never lose work:

* the call raised (actor alive): the task is re-issued;
* the actor's process died: Ray restarts it (``max_restarts``); every task it
  held is re-issued, and the restarted actor gets no work until it answers
  again: ``prepare`` (e.g. "load the current weights") or Ray's readiness probe;
* the call ran longer than ``timeout_s``, or an idle actor did not answer ``prepare``
  within it (hung: a deadlock, SIGSTOP): treated as a crash: killed so that Ray
  restarts it, counted, and handled as above.  Only an actor Ray will not restart
  (its ``max_restarts`` spent) is dropped.

A task that failed ``max_attempts`` times, or a group with no live actor left,
raises :class:`GroupFailed`.  Re-issued tasks carry the same inputs (prompts,
seeds, sample ids), so each sample is produced once in the results.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayError, RayTaskError


PROBE_S = 1.0  # how often a wait for a restarting actor looks at its process
RESTART_WAIT_S = 900.0  # the longest a restarting actor (its process and model loading again) is waited for


class GroupFailed(RuntimeError):
    """A role can no longer make progress; the message says which task or actor and why."""


class ActorRestarted(RuntimeError):
    """Raised by an actor that finds its state gone (e.g. a rollout actor without weights): its
    process died while idle and Ray restarted it unseen.  Handled as that crash."""


@dataclass
class Task:
    key: Any  # what the caller calls it (e.g. the batch index)
    launch: Callable[[Any], tuple]  # actor handle -> (data refs..., status ref)
    attempts: int = 0
    refs: tuple = ()
    actor: int | None = None
    started: float | None = None  # when it reached the head of its actor's queue
    errors: list[str] = field(default_factory=list)


class ActorGroup:
    def __init__(self, role: str, actors: list, *, timeout_s: float, max_attempts: int = 3,
                 max_in_flight: int = 2, prepare: Callable[[Any], Any] | None = None):
        self.role = role
        self.actors = list(actors)
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.max_in_flight = max_in_flight
        self.prepare = prepare
        self.queues: list[deque[Task]] = [deque() for _ in self.actors]
        self.alive = [True] * len(self.actors)
        self.needs_prepare = [False] * len(self.actors)
        self.down = [False] * len(self.actors)  # failed (counted) and not yet back
        self.backlog: deque[Task] = deque()
        self.events: list[str] = []  # human-readable failure log, for metrics and reports
        self.restarts = 0  # actor failures handled (crash or timeout), whether or not it came back

    # ---- submitting ----------------------------------------------------------------
    def submit(self, key: Any, launch: Callable[[Any], tuple]) -> None:
        self.backlog.append(Task(key, launch))
        self._dispatch()

    @property
    def queue_depth(self) -> int:
        return len(self.backlog) + sum(len(q) for q in self.queues)

    def _dispatch(self) -> None:
        while self.backlog:
            candidates = [i for i in range(len(self.actors))
                          if self.alive[i] and len(self.queues[i]) < self.max_in_flight]
            if not candidates:
                if not any(self.alive):
                    raise GroupFailed(f"all {self.role} actors are dead: " + "; ".join(self.events[-3:]))
                return
            index = min(candidates, key=lambda i: len(self.queues[i]))
            if self.needs_prepare[index] and not self._prepare(index):
                continue
            task = self.backlog.popleft()
            task.attempts += 1
            task.actor = index
            task.refs = tuple(task.launch(self.actors[index]))
            task.started = time.monotonic() if not self.queues[index] else None
            self.queues[index].append(task)

    def _ready_call(self, actor):
        """``prepare`` when the role has one, else Ray's own readiness probe."""
        return self.prepare(actor) if self.prepare is not None else actor.__ray_ready__.remote()

    def _prepare(self, index: int) -> bool:
        """Wait out a restart and bring the actor up to date; one Ray will not restart is dead.

        An actor whose process is up but does not answer within ``timeout_s`` (counted from
        when that process appeared) is hung: it is killed so that Ray restarts it (counted as a
        failure) and waited for again.  A restart is waited for up to ``RESTART_WAIT_S``.  Each
        kill spends one of its ``max_restarts``, so this ends.  Synchronous: while one actor restarts (seconds: its
        model loads again), the driver does not collect other results.  Simple, and cheap
        next to an epoch.
        """
        actor = self.actors[index]
        deadline = time.monotonic() + self.timeout_s
        restart_deadline = time.monotonic() + RESTART_WAIT_S
        pid, ref, abandoned = _process(actor)[1], None, []
        try:
            while True:
                try:
                    if ref is None:
                        # Ray fails calls to a restarting actor fast: wait for the process first,
                        # so that the call (maybe a weight publish) is sent once, not every probe.
                        waited = False
                        while _restarting(actor) and time.monotonic() < restart_deadline:
                            time.sleep(PROBE_S)
                            waited = True
                        if waited:
                            deadline = max(deadline, time.monotonic() + self.timeout_s)
                        ref = self._ready_call(actor)
                    # One call, waited for in short slices: the hang clock restarts when a new
                    # process shows up.
                    ray.get(ref, timeout=min(PROBE_S, max(0.1, deadline - time.monotonic())))
                    self.needs_prepare[index] = False
                    self.down[index] = False
                    return True
                except ActorUnavailableError as err:  # still restarting: calls fail fast until it is back
                    ref = None
                    now = time.monotonic()
                    if now < deadline or (_restarting(actor) and now < restart_deadline):
                        time.sleep(PROBE_S)
                        continue
                    error = err
                except GetTimeoutError:
                    # A call waits while Ray restarts the actor (seconds to minutes: the model
                    # loads again): slow, not hung.  Only a live process that does not answer
                    # within timeout_s of being seen up is hung.  An unreadable table is no news.
                    now, (state, seen) = time.monotonic(), _process(actor)
                    if seen is not None and seen != pid:
                        pid, deadline = seen, now + self.timeout_s
                    elif state in RESTARTING_STATES and now < restart_deadline:
                        deadline = now + self.timeout_s
                    elif now >= deadline:
                        self._kill_hung(index, f"did not get ready within {self.timeout_s:g}s (hung)")
                        abandoned.append(ref)
                        ref, deadline = None, time.monotonic() + self.timeout_s
                    continue
                except RayActorError as err:
                    ref = None
                    if not self.down[index]:  # died while getting ready: a crash like any other
                        self._actor_failed(index, f"process died while getting ready ({_short(err)})")
                        deadline = time.monotonic() + self.timeout_s
                        continue
                    error = err  # died again, or for good (its max_restarts spent)
                except RayTaskError as err:  # prepare itself raised
                    error = err
                ray.kill(actor)  # release its resources; it gets no more work
                self.alive[index] = False
                self.events.append(f"{self.role}-{index} could not be restarted ({_short(error)}); dropped")
                return False
        finally:
            _mark_handled(abandoned)  # the killed process's calls have failed by now

    def prepare_all(self) -> None:
        """Prepare every live actor now, in parallel (e.g. load new weights everywhere).

        One that does not answer within ``timeout_s`` is hung and killed so that Ray restarts
        it; one that died is counted too.  Either stays marked: ``_dispatch`` waits for it
        and prepares it before its next task."""
        pending = {i: self._ready_call(a) for i, a in enumerate(self.actors)
                   if self.alive[i] and self.needs_prepare[i]}
        deadline = time.monotonic() + self.timeout_s
        for index, ref in pending.items():
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                self.needs_prepare[index] = False
                self.down[index] = False
            except GetTimeoutError:
                if not _restarting(self.actors[index]):  # a restarting one is waited for by _dispatch
                    self._kill_hung(index, f"did not take the update within {self.timeout_s:g}s (hung)")
            except (RayActorError, RayTaskError) as err:
                if self.down[index]:  # already counted (e.g. still restarting after a crash)
                    self.events.append(f"{self.role}-{index} did not take the update ({_short(err)})")
                else:
                    self._actor_failed(index, f"did not take the update: process died ({_short(err)})")

    def mark_prepared(self, indices: list[int]) -> None:
        """These actors are up to date (brought there by the caller, e.g. a weight broadcast)."""
        for index in indices:
            self.needs_prepare[index] = False

    def mark_all_stale(self) -> None:
        """Every actor must run ``prepare`` again before its next task (new weights)."""
        self.needs_prepare = [True] * len(self.actors)

    # ---- polling ---------------------------------------------------------------------
    def poll(self, timeout: float = 0.5) -> list[tuple[Task, dict]]:
        """Tasks finished since the last poll, as (task, status); handles failures."""
        status_refs = {task.refs[-1]: task for queue in self.queues for task in queue}
        finished = []
        if status_refs:
            ready, _ = ray.wait(list(status_refs), num_returns=len(status_refs), timeout=timeout)
            for ref in ready:
                task = status_refs[ref]
                if task.actor is None or task not in self.queues[task.actor]:
                    continue  # already re-issued with its actor's other tasks
                try:
                    status = ray.get(ref)
                except RayActorError as err:
                    self._actor_failed(task.actor, f"process died ({_short(err)})")
                    continue
                except ActorRestarted as err:  # (Ray's error is an instance of the actor's)
                    self._actor_failed(task.actor, f"was restarted while idle ({_short(err)})")
                    continue
                except RayError as err:  # the call raised, or its result was lost
                    _mark_handled(task.refs[:-1])
                    self._remove(task)
                    self._retry(task, f"raised {_short(err)}")
                    continue
                self._remove(task)
                finished.append((task, status))
        self._check_timeouts()
        self._dispatch()
        return finished

    def _remove(self, task: Task) -> None:
        queue = self.queues[task.actor]
        queue.remove(task)
        if queue and queue[0].started is None:
            queue[0].started = time.monotonic()

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for index, queue in enumerate(self.queues):
            if queue and queue[0].started is not None and now - queue[0].started > self.timeout_s:
                self._kill_hung(index, f"timed out after {self.timeout_s:g}s (hung)")

    def _kill_hung(self, index: int, reason: str) -> None:
        # no_restart=False: a hang is handled as a crash, and Ray restarts it if restarts remain
        # (ray.kill's default, no_restart=True, would end it for good).  Ray kills the process
        # even when it is stopped (SIGSTOP) and cannot answer.
        ray.kill(self.actors[index], no_restart=False)
        self._actor_failed(index, f"{reason}; killed")

    def _actor_failed(self, index: int, reason: str) -> None:
        self.restarts += 1
        self.down[index] = True
        self.events.append(f"{self.role}-{index} {reason}")
        self.needs_prepare[index] = True  # no new work until it is back (and up to date)
        held, self.queues[index] = list(self.queues[index]), deque()
        for task in held:
            if task.started is None:  # queued behind the failed call, never ran: not its failure
                task.attempts -= 1
            self._retry(task, reason)

    def _retry(self, task: Task, reason: str) -> None:
        task.errors.append(reason)
        if task.attempts >= self.max_attempts:
            raise GroupFailed(f"{self.role} task {task.key} failed {task.attempts} times: "
                              + "; ".join(dict.fromkeys(task.errors)))  # a deterministic error once
        self.events.append(f"{self.role} task {task.key} re-issued: {reason}")
        task.refs, task.actor, task.started = (), None, None
        self.backlog.appendleft(task)


def _mark_handled(refs) -> None:
    """Fetch a failed call's other returns (they hold the same error), so that Ray does not
    print the error's traceback again as 'Unhandled error' when they are freed."""
    for ref in refs:
        try:
            ray.get(ref, timeout=0)
        except RayError:
            pass


RESTARTING_STATES = ("RESTARTING", "PENDING_CREATION", "DEPENDENCIES_UNREADY")


def _process(actor) -> tuple[str | None, int | None]:
    """(state, pid) of the actor's process, from the GCS actor table (no call to the actor,
    which would wait for it); (None, None) when the table cannot be read."""
    try:
        from ray._private import state

        info = state.actors(actor._actor_id.hex())
        return info.get("State"), info.get("Pid")
    except Exception:  # noqa: BLE001 - a private API: without it, every wait past timeout_s is a hang
        return None, None


def _restarting(actor) -> bool:
    """Whether Ray is (re)starting the actor's process."""
    return _process(actor)[0] in RESTARTING_STATES


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"[:300]
