"""Controller scaling (simulated): the driver's overhead per epoch as rollout actors grow.

    nice -n 19 env PYTHONPATH=. python -m bench.controller_scaling [--quick] [--out DIR]

Stand-in actors (``bench/fake_actors.py``: ``sample`` sleeps a fixed time, ``score``
sleeps a shorter one, both return small dicts) on fractional CPUs (0.01 each) sit
in real ``ActorGroup``s, and the real ``learner.driver.collect_epoch`` drives
them: each of N rollout actors gets the same number of batches per epoch, and a
reward pool of max(1, N/4) actors scores them as they come.  Before every epoch a
small weights object goes to every rollout actor the way ``sync_weights`` does it
(``mark_all_stale`` + ``prepare_all``).

Per epoch it records the wall time of ``collect_epoch`` and the driver process's
CPU time, against the ideal critical path (every actor busy all the time, the
last round of batches scored by the pool; ``bench.common.ideal_epoch_seconds``).
Overhead = wall - ideal, per epoch and per actor.  The first epoch is a warm-up.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from bench.common import (FULL_OUT, QUICK_OUT, available_gib, ideal_epoch_seconds, log, mean, ratio, stamp, started,
                          write_json)

FULL = {"actors": [1, 4, 16, 64], "batches_per_actor": 8, "sample_seconds": 0.2, "score_seconds": 0.025,
        "batch_size": 2, "epochs": 4, "rollout_per_reward": 4}
QUICK = {"actors": [1, 4], "batches_per_actor": 2, "sample_seconds": 0.05, "score_seconds": 0.01,
         "batch_size": 2, "epochs": 2, "rollout_per_reward": 4}
MEMORY_BUDGET_GIB = 10.0  # for the stand-in actors' processes; more actors than this allows are skipped
MEMORY_MARGIN_GIB = 2.0  # always left available to the rest of the machine


def reward_pool_size(num_rollout: int, rollout_per_reward: int) -> int:
    return max(1, num_rollout // rollout_per_reward)


def fake_specs(num_samples: int, epoch: int) -> list[tuple]:
    """Light stand-ins for SampleSpec (collect_epoch only slices and counts them)."""
    return [(f"e{epoch}-{i}", i % 30, f"prompt {i % 30}", i) for i in range(num_samples)]


def run_scale(num_rollout: int, setup: dict) -> dict:
    """Start N stand-in rollout actors and their reward pool, run the epochs, kill them."""
    import ray

    from actors.group import ActorGroup
    from bench.fake_actors import FakeReward, FakeRollout
    from learner.driver import Roles, collect_epoch

    num_reward = reward_pool_size(num_rollout, setup["rollout_per_reward"])
    before_gib = available_gib()
    t = time.perf_counter()
    rollout_actors = [ray.remote(FakeRollout).options(num_cpus=0.01, max_restarts=0).remote(setup["sample_seconds"])
                      for _ in range(num_rollout)]
    reward_actors = [ray.remote(FakeReward).options(num_cpus=0.01, max_restarts=0).remote(setup["score_seconds"])
                     for _ in range(num_reward)]
    everyone = rollout_actors + reward_actors
    memories = ray.get([a.memory.remote() for a in everyone])  # also: every actor is up
    startup_seconds = time.perf_counter() - t
    used_gib = before_gib - available_gib()
    roles = Roles(learner=None, rollout=None, reward=None)
    roles.rollout = ActorGroup("rollout", rollout_actors, timeout_s=120, max_attempts=3,
                               prepare=lambda a: a.load_weights.remote(roles.weights["version"], roles.weights["ref"]))
    # max_in_flight as learner.driver.start_roles leaves it (ActorGroup's default, 2) unless the setup says
    roles.reward = ActorGroup("reward", reward_actors, timeout_s=120, max_attempts=3,
                              max_in_flight=setup.get("reward_max_in_flight", 2))
    ideal = ideal_epoch_seconds(setup["batches_per_actor"], setup["sample_seconds"], setup["score_seconds"],
                                num_rollout, num_reward)
    epochs = []
    try:
        for epoch in range(setup["epochs"]):
            t = time.perf_counter()
            roles.weights = {"version": epoch, "ref": ray.put({"lora": bytes(64 * 1024)})}
            roles.rollout.mark_all_stale()
            roles.rollout.prepare_all()
            sync_seconds = time.perf_counter() - t
            specs = fake_specs(num_rollout * setup["batches_per_actor"] * setup["batch_size"], epoch)
            cpu, t = time.process_time(), time.perf_counter()
            batch_refs, result_refs, timings = collect_epoch(roles, specs, setup["batch_size"], epoch)
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu
            if any(r is None for r in batch_refs + result_refs):
                raise RuntimeError("collect_epoch returned without every batch")
            versions = {b["version"] for b in ray.get(batch_refs)}  # check only, not timed
            if versions != {epoch}:
                raise RuntimeError(f"batches sampled at versions {versions}, expected {epoch}")
            epochs.append({"epoch": epoch, "wall_seconds": wall, "driver_cpu_seconds": cpu,
                           "sync_seconds": sync_seconds, "sample_seconds": timings["sample_seconds"],
                           "reward_tail_seconds": timings["reward_tail_seconds"],
                           "reward_queue_depth_max": timings["reward_queue_depth_max"],
                           "overhead_seconds": wall - ideal})
            log(f"  N={num_rollout} epoch {epoch + 1}/{setup['epochs']}: wall {wall:.3f}s (ideal {ideal:.3f}s, "
                f"overhead {wall - ideal:+.3f}s), driver CPU {cpu:.3f}s, sync {sync_seconds:.3f}s, "
                f"peak reward queue {timings['reward_queue_depth_max']}")
    finally:
        for actor in everyone:
            ray.kill(actor)
    kept = epochs[1:] if len(epochs) > 1 else epochs
    batches = num_rollout * setup["batches_per_actor"]
    wall = mean(e["wall_seconds"] for e in kept)
    overhead = wall - ideal
    return {
        "rollout_actors": num_rollout, "reward_actors": num_reward, "batches_per_epoch": batches,
        "ideal_seconds": ideal, "wall_seconds": wall, "overhead_seconds": overhead,
        "overhead_per_actor_seconds": overhead / num_rollout,
        "overhead_per_batch_seconds": overhead / batches,
        "wall_over_ideal": ratio(wall, ideal),
        "driver_cpu_seconds": mean(e["driver_cpu_seconds"] for e in kept),
        "driver_cpu_per_batch_ms": 1e3 * mean(e["driver_cpu_seconds"] for e in kept) / batches,
        "sync_seconds": mean(e["sync_seconds"] for e in kept),
        "startup_seconds": startup_seconds,
        "actor_pss_mib_mean": mean(m["pss"] for m in memories) / 2**20,
        "actor_pss_gib_total": sum(m["pss"] for m in memories) / 2**30,
        "available_gib_drop": used_gib,
        "epochs": epochs,
    }


def flatness(rows: list[dict]) -> dict:
    """How the overhead grows from the fewest to the most actors (pure)."""
    if len(rows) < 2:
        return {}
    first, last = rows[0], rows[-1]
    grow = last["rollout_actors"] / first["rollout_actors"]
    out = {
        "actors_from_to": [first["rollout_actors"], last["rollout_actors"]],
        "overhead_per_epoch_growth": ratio(last["overhead_seconds"], first["overhead_seconds"]),
        "wall_over_ideal_from_to": [first["wall_over_ideal"], last["wall_over_ideal"]],
        "driver_cpu_per_batch_ms_from_to": [first["driver_cpu_per_batch_ms"], last["driver_cpu_per_batch_ms"]],
        "actor_growth": grow,
        # overhead per epoch growing like log(actors) or slower: "flat"; like the actor count: linear
        "overhead_growth_exponent": (math.log(max(last["overhead_seconds"], 1e-9) / max(first["overhead_seconds"], 1e-9))
                                     / math.log(grow)) if grow > 1 else float("nan"),
        "overhead_per_actor_ms_from_to": [1e3 * first["overhead_per_actor_seconds"],
                                          1e3 * last["overhead_per_actor_seconds"]],
    }
    out["overhead_per_actor_growth_exponent"] = out["overhead_growth_exponent"] - 1  # N^e per epoch = N^(e-1) per actor
    return out


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["rollout_actors"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(n, [r["wall_seconds"] for r in rows], "o-", label="wall (collect_epoch)")
    ax1.plot(n, [r["ideal_seconds"] for r in rows], "k--", label="ideal critical path")
    ax1.plot(n, [r["overhead_seconds"] for r in rows], "s-", label="overhead = wall - ideal")
    ax1.set(xscale="log", xlabel="rollout actors", ylabel="seconds per epoch", title="epoch time (simulated actors)")
    ax1.set_xticks(n, [str(x) for x in n])
    ax2.plot(n, [1e3 * r["overhead_per_batch_seconds"] for r in rows], "s-", label="overhead per batch (ms)")
    ax2.plot(n, [r["driver_cpu_per_batch_ms"] for r in rows], "o-", label="driver CPU per batch (ms)")
    ax2.set(xscale="log", xlabel="rollout actors", ylabel="milliseconds", title="cost per batch")
    ax2.set_xticks(n, [str(x) for x in n])
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(quick: bool = False, out_dir: str | Path | None = None, actors: list[int] | None = None,
         reward_in_flight: int = 2) -> dict:
    """``reward_in_flight`` other than 2 (what the driver uses) is a probe: it writes
    ``controller_scaling_reward_in_flight_K.json`` instead, and no plot."""
    from bench.common import local_ray

    setup = dict(QUICK if quick else FULL, reward_max_in_flight=reward_in_flight)
    if actors:
        setup["actors"] = list(actors)
    name = "controller_scaling" if reward_in_flight == 2 else f"controller_scaling_reward_in_flight_{reward_in_flight}"
    out_dir = Path(out_dir or (QUICK_OUT if quick else FULL_OUT))
    start = started()
    rows, skipped, measured_gib = [], [], []
    with local_ray(num_cpus=2):
        for n in setup["actors"]:
            total = n + reward_pool_size(n, setup["rollout_per_reward"])
            per_actor_gib = max(measured_gib) * 1.2 if measured_gib else 0.25  # a first guess until measured
            need = total * per_actor_gib
            if need > MEMORY_BUDGET_GIB or available_gib() - need < MEMORY_MARGIN_GIB:
                note = (f"{n} rollout actors skipped: about {need:.1f} GiB needed for {total} actor processes, "
                        f"{available_gib():.1f} GiB available, budget {MEMORY_BUDGET_GIB} GiB")
                log(note)
                skipped.append(note)
                continue
            log(f"controller scaling: {n} rollout + {total - n} reward stand-in actors, "
                f"{setup['batches_per_actor']} batches each, sample {setup['sample_seconds']}s, "
                f"score {setup['score_seconds']}s")
            row = run_scale(n, setup)
            rows.append(row)
            measured_gib.append(row["actor_pss_mib_mean"] / 1024)
            log(f"N={n}: wall {row['wall_seconds']:.3f}s vs ideal {row['ideal_seconds']:.3f}s -> overhead "
                f"{row['overhead_seconds']:.3f}s/epoch ({1e3 * row['overhead_per_actor_seconds']:.1f} ms per actor), "
                f"driver CPU {row['driver_cpu_seconds']:.3f}s/epoch, startup {row['startup_seconds']:.1f}s, "
                f"actors' memory {row['actor_pss_gib_total']:.2f} GiB (PSS)")
    result = {"rows": rows, "skipped": skipped, "flatness": flatness(rows),
              "setup": {"quick": quick, **setup, "actor_num_cpus": 0.01, "ray_num_cpus": 2}}
    stamp(result, start)
    path = write_json(out_dir / f"{name}.json", result)
    png = plot(rows, out_dir / "controller_scaling.png") if rows and name == "controller_scaling" else None
    log(f"wrote {path} and {png} ({result['wall_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 4 actors, short sleeps, 2 epochs")
    parser.add_argument("--out", default=None, help="folder for controller_scaling.json and .png")
    parser.add_argument("--actors", type=int, nargs="+", default=None, help="rollout actor counts (default 1 4 16 64)")
    parser.add_argument("--reward-in-flight", type=int, default=2,
                        help="calls queued per reward actor (the driver uses 2); other values are a probe")
    args = parser.parse_args()
    main(args.quick, args.out, args.actors, args.reward_in_flight)
