"""ActorGroup's hang clock while an actor gets ready, against a scripted GCS actor table.

The ready call is a real Ray task; the actor table (``_process``: state and pid) and the kill
are stand-ins, so each test says exactly what the driver sees and when."""

from __future__ import annotations

import itertools
import time

import pytest
import ray

import actors.group as group_module
from actors.group import ActorGroup

pytestmark = pytest.mark.usefixtures("local_ray")
TIMEOUT_S = 3.0


@ray.remote(num_cpus=0.1)
def answer_after(seconds: float) -> bool:
    time.sleep(seconds)
    return True


def group_with(prepare_seconds, kills: list) -> ActorGroup:
    """One stand-in actor whose ready call answers after each of ``prepare_seconds`` in turn."""
    ray.get(answer_after.remote(0.0))  # a warm worker: its start is not part of the clock
    delays = iter(prepare_seconds)
    group = ActorGroup("rollout", [object()], timeout_s=TIMEOUT_S,
                       prepare=lambda actor: answer_after.remote(next(delays)))
    group._kill_hung = lambda index, reason: kills.append((time.monotonic(), reason))
    return group


def test_restarted_actor_is_timed_from_when_its_new_process_appears(monkeypatch):
    """The replacement process shows up late (a loaded machine): its timeout counts from then,
    so a ready call that answers within timeout_s of it is not a hang."""
    start = time.monotonic()
    monkeypatch.setattr(group_module, "_process",
                        lambda actor: ("ALIVE", 1 if time.monotonic() - start < 2.5 else 2))
    kills = []
    group = group_with([4.5], kills)
    assert group._prepare(0) and kills == []


@pytest.mark.parametrize("table", ["readable", "sometimes unreadable"])
def test_live_process_that_does_not_answer_is_killed_after_its_timeout(monkeypatch, table):
    """Same process throughout: killed once, timeout_s after the wait began; an unreadable table
    (None, None) between reads is no news, not a new process."""
    reads = itertools.cycle([("ALIVE", 7)] if table == "readable" else [("ALIVE", 7), (None, None)])
    monkeypatch.setattr(group_module, "_process", lambda actor: next(reads))
    kills = []
    group = group_with([60.0, 0.0], kills)
    start = time.monotonic()
    assert group._prepare(0)
    assert len(kills) == 1 and "did not get ready within 3s (hung)" in kills[0][1]
    assert TIMEOUT_S <= kills[0][0] - start < TIMEOUT_S + 2.0


@ray.remote(num_cpus=0.1)
class Named:
    def ping(self) -> bool:
        return True


def test_a_killed_actors_name_is_free_for_its_successor_at_once():
    """An auto-resume starts ``rollout-0`` again right after killing the old one: the driver
    waits for Ray to release the name, so the new actor never finds it taken; a name that a live
    actor keeps (another run's) is a clear error."""
    from learner.driver import RunStopped, wait_until_names_released

    for _ in range(5):
        actor = Named.options(name="rollout-0").remote()
        assert ray.get(actor.ping.remote())
        ray.kill(actor)
        wait_until_names_released(["rollout-0"], timeout_s=30.0)
        with pytest.raises(ValueError):
            ray.get_actor("rollout-0")
    other_run = Named.options(name="rollout-0").remote()
    ray.get(other_run.ping.remote())
    with pytest.raises(RunStopped, match="'rollout-0' already exists.*another run"):
        wait_until_names_released(["reward-0", "rollout-0"], timeout_s=0.2)
    ray.kill(other_run)
