"""The single controller: plans each epoch and moves object refs between the roles.

One epoch, pure on-policy (every actor at version v):

1. plan: prompts and seeds for the epoch, a pure function of (run seed, epoch);
2. rollout: batches go to the rollout actors; each finished batch goes straight
   to the reward actors, so scoring overlaps sampling;
3. learn: the learner gets the refs of all batches and rewards, rejects anything
   not sampled at v, and applies one update -> v + 1 (with ``train.num_workers``
   K > 1, K data-parallel learner ranks each get a shard of the refs:
   ``learner/group.py``);
4. sync: the learner publishes v + 1 once; every rollout actor loads it and
   acknowledges before the next epoch samples; then a checkpoint.

The driver holds refs and small status dicts only; tensors move actor to actor.
Rollout and reward actors that crash or hang are restarted and their batches
re-issued (``actors/group.py``); a learner failure stops the epoch, and the run
resumes from the last good checkpoint when ``run.max_auto_resumes`` allows.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from omegaconf import OmegaConf
from ray.exceptions import GetTimeoutError, RayError

from actors.batches import SampleSpec
from actors.group import ActorGroup, GroupFailed
from actors.rollout import RemoteRolloutWorker
from learner.algorithms import build_algorithm
from learner.checkpoint import (CheckpointMismatchError, CorruptCheckpointError, list_checkpoints, prune_checkpoints,
                                set_aside, verify_checkpoint)
from learner.config import Config, PromptsConfig, load_prompts
from learner.evaluate import eval_specs, mean_and_sem
from learner.placement import Placement, PlacementError, reserve
from learner.group import LearnerFailed, LearnerGroup
from learner.rundir import RunDirectory
from learner.sinks import Sinks, build_sinks
from learner.trainer import NoFiniteRewardError, NonFiniteGradientError
from policy.grid import pictures
from policy.models import check_model_dir, prompt_truncation_warning, resolve_model_path
from plugins import load_plugins
from reward_service.pool import RemoteRewardWorker
from reward_service.rewards import check_alignment_prompts as check_alignment_prompts_of


class RunStopped(RuntimeError):
    """The run cannot go on; the message says why and at which epoch."""


def plan_epoch(run_seed: int, epoch: int, prompts: list[str], samples_per_epoch: int,
               group_size: int = 1) -> list[SampleSpec]:
    """Prompts and seeds of an epoch; a pure function of its inputs.

    group_size 1: prompts drawn uniformly with replacement.  group_size k: samples_per_epoch / k
    prompts (distinct while the prompt set allows), each sampled k times, so every prompt's
    advantage is normalised against its own group from the first epoch on."""
    rng = np.random.default_rng([run_seed, epoch])
    if group_size == 1:
        indices = rng.integers(len(prompts), size=samples_per_epoch)
    else:
        groups = samples_per_epoch // group_size
        indices = np.repeat(rng.choice(len(prompts), size=groups, replace=groups > len(prompts)), group_size)
    seeds = rng.integers(2**31 - 1, size=samples_per_epoch)
    return [SampleSpec(f"e{epoch}-{i}", int(p), prompts[p], int(s))
            for i, (p, s) in enumerate(zip(indices, seeds))]


def plan_warmup(run_seed: int, prompts: list[str], per_prompt: int) -> list[SampleSpec]:
    """Carve3D's epoch 0: every prompt ``per_prompt`` times, to fill the stat trackers."""
    rng = np.random.default_rng([run_seed, 0, 0])  # three words: apart from every plan_epoch stream
    seeds = rng.integers(2**31 - 1, size=len(prompts) * per_prompt)
    return [SampleSpec(f"e0-{i}", i // per_prompt, prompts[i // per_prompt], int(s)) for i, s in enumerate(seeds)]


def cluster_address(config: Config) -> str | None:
    """The cluster the driver joins: run.ray_address, else $RAY_ADDRESS (``ray job submit`` sets
    it); None (or "local") means an embedded local Ray."""
    address = config.run.ray_address or os.environ.get("RAY_ADDRESS")
    return None if address in (None, "", "local") else address


def check_run_location(config: Config) -> None:
    """On a cluster, refuse a relative run directory before Ray is even joined.

    Under ``ray job submit --working-dir`` the driver's working directory is the package Ray
    unpacked for the job (``.../runtime_resources/working_dir_files/_ray_pkg_<hash>``), which
    Ray deletes later: a relative run directory would vanish with it, and the learner, on
    another node, would write its checkpoints somewhere else.  Ray does not tell the driver
    where the submitter ran, so there is nothing durable to resolve against: ask for a path."""
    if ray.is_initialized():  # an embedding program owns Ray: a cluster only if it spans nodes
        nodes = sum(node["Alive"] for node in ray.nodes())
        cluster = f"a Ray cluster of {nodes} nodes" if nodes > 1 else None
    else:
        address = cluster_address(config)
        cluster = f"the Ray cluster at {address}" if address else None
    key, value = (("resume", config.resume) if config.resume else ("run.dir", config.run.dir) if config.run.dir
                  else ("run.output_dir", config.run.output_dir))
    if cluster and not Path(value).expanduser().is_absolute():
        raise RunStopped(
            f"{key}={value} is relative and this driver joins {cluster}: it would resolve to {Path.cwd() / value}, "
            "which under ray job submit is Ray's temporary copy of the job (deleted later) and is not on the other "
            f"nodes; set {key}=/a/shared/path, a directory every node mounts at the same path (on a single machine, "
            "any absolute path)")


def connect_ray(config: Config) -> bool:
    """Join a cluster when an address is set (``ray job submit`` sets RAY_ADDRESS), else start one."""
    if ray.is_initialized():  # an embedding program (or a test) owns Ray
        return False
    address = cluster_address(config)
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    ray.init(num_cpus=config.run.local_num_cpus, include_dashboard=True,
             dashboard_host=config.run.dashboard_host, log_to_driver=True,
             _metrics_export_port=config.run.metrics_export_port)
    return True


class Terminated(RunStopped):
    """SIGTERM arrived (``ray job stop``, a scheduler)."""

    def __init__(self, run_dir):
        super().__init__("received SIGTERM (ray job stop, or the scheduler); the finished epochs' checkpoints "
                         f"are kept: resume with python -m learner.main resume={run_dir}")


def stop_on_sigterm(signum, frame):
    # `ray job stop` and schedulers send SIGTERM first (Ray kills 3 s later): unwind through
    # run()'s cleanup, which writes status.json and report.md; the checkpoints stay.
    stop_on_sigterm.received = True
    raise Terminated(stop_on_sigterm.run_dir)


stop_on_sigterm.received, stop_on_sigterm.run_dir = False, None


def io_stopped(err: OSError, where: str, resume: str | os.PathLike | None) -> RunStopped:
    """A write that failed (full disk, read-only directory) as the one-line error that says what
    to do, instead of a traceback.  ``resume``: the run directory to resume, None for a new run."""
    again = f"resume with: python -m learner.main resume={resume}" if resume else "run again"
    return RunStopped(f"{where}: {err.strerror or err} ({err.filename or 'a write'}); free space or make it "
                      f"writable, then {again}")


# Config keys that change what a checkpoint holds (its tensors, or what they mean): a resume
# that changes one is refused before any actor starts.  (model.path: the learner compares the
# tensors themselves, so a model that merely moved still resumes.)
CHECKPOINT_KEYS = ("model.finetune", "model.lora.rank", "model.lora.alpha", "model.lora.target_modules")


def check_resume_config(config: Config, run_dir: RunDirectory) -> None:
    """Refuse a resume whose overrides change a CHECKPOINT_KEYS key from the run's config.yaml."""
    saved = OmegaConf.to_container(OmegaConf.load(run_dir.path / "config.yaml"))
    now = OmegaConf.to_container(OmegaConf.structured(config))

    def value(tree: dict, key: str):
        for part in key.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        return tree

    changed = [f"{key}={value(now, key)} (the run's checkpoints hold {value(saved, key)})"
               for key in CHECKPOINT_KEYS if value(now, key) != value(saved, key)]
    if changed:
        raise RunStopped(f"resume={run_dir.path} changes what its checkpoints hold: {', '.join(changed)}; "
                         "resume without those overrides, or start a new run with them")


def check_alignment_prompts(config: Config, prompts: list[str]) -> None:
    """An alignment evaluator that reads only its own world's prompts (MiniCarve's) says so
    through its ``check_prompts`` hook: before starting."""
    load_plugins(config.run.plugins)
    try:
        check_alignment_prompts_of(config.reward.alignment, prompts)
    except ValueError as err:
        raise RunStopped(str(err)) from None


def check_resources(config: Config) -> None:
    """On the embedded Ray, fail now rather than wait forever for CPUs that do not exist."""
    need = (config.rollout.num_workers * config.rollout.num_cpus
            + config.reward.num_workers * config.reward.num_cpus + config.train.num_workers * config.train.num_cpus)
    have = ray.cluster_resources().get("CPU", 0)
    if need > have + 1e-9:
        raise RunStopped(
            f"the actors need {need:g} CPUs but this Ray has {have:g}; lower rollout.num_cpus, "
            "reward.num_cpus or train.num_cpus (fractions are fine), use fewer workers, or set "
            "run.local_num_cpus")


@dataclass
class Roles:
    """The actors of one training session, and the weights the rollout actors must hold."""

    learner: LearnerGroup
    rollout: ActorGroup
    reward: ActorGroup
    weights: dict = field(default_factory=dict)  # {"version": v, "ref": ObjectRef}
    # train.weight_sync=broadcast: the group's members (rollout indices) and the rollout
    # restart count when it was built; None: (re)build it at the next sync
    broadcast: tuple | None = None

    def shutdown(self) -> None:
        for actor in [*self.learner.actors, *self.rollout.actors, *self.reward.actors]:
            ray.kill(actor)


def actor_names(config: Config) -> list[str]:
    """The names the actors of a run take (the dashboard's, and ``ray list actors``')."""
    return ([LearnerGroup.actor_name(rank) for rank in range(config.train.num_workers)]
            + [f"rollout-{i}" for i in range(config.rollout.num_workers)]
            + [f"reward-{i}" for i in range(config.reward.num_workers)])


def wait_until_names_released(names: list[str], timeout_s: float) -> None:
    """Return once no live actor holds any of ``names``.  ``ray.kill`` only asks: an
    auto-resume that starts ``rollout-0`` again right after killing the old one must wait for
    Ray to release the name, or it fails with ActorAlreadyExistsError."""
    deadline = time.monotonic() + timeout_s
    for name in names:
        while True:
            try:
                ray.get_actor(name)
            except ValueError:  # no live actor holds the name
                break
            if time.monotonic() >= deadline:
                raise RunStopped(f"an actor named {name!r} already exists in this Ray namespace (another run on "
                                 f"this cluster?); stop that run, or remove the actor with `ray list actors` and "
                                 f"ray.kill, then start again")
            time.sleep(0.05)


def rollout_worker_args(config: Config, model_path: str, marker_dir: str | None = None) -> tuple:
    """``RolloutWorker``'s arguments: the one place they are built (the driver, the benchmarks)."""
    ro = config.rollout
    return (model_path, config.model, config.sampling, ro.torch_threads, "cuda" if ro.num_gpus > 0 else "cpu",
            config.faults, marker_dir, build_algorithm(config.train, config.sampling))


def reward_worker_args(config: Config, marker_dir: str | None = None) -> tuple:
    """``RewardWorker``'s arguments: the one place they are built (the driver, the benchmarks)."""
    re = config.reward
    # reward.num_gpus > 0: the reconstructor and LPIPS run on the actor's GPU
    options = re.mrc_options("cuda" if re.num_gpus > 0 else "cpu") if re.kind == "mrc" else {}
    return (re.kind, options, re.torch_threads, config.faults.nonfinite_reward_fraction, config.faults,
            marker_dir, re.alignment, list(config.run.plugins))


def start_roles(config: Config, model_path: str, run_dir: RunDirectory, placement: Placement | None = None,
                name_wait_s: float = 60.0) -> Roles:
    """Start every actor of a run, once the names they take are free: ``name_wait_s`` is how long
    the actors of a session that just ended (an auto-resume's restart, or the previous run on a
    shared Ray) may take to release them."""
    wait_until_names_released(actor_names(config), name_wait_s)
    markers = run_dir.marker_dir
    ro, re = config.rollout, config.reward
    placement = placement or Placement()
    rollout_actors = [
        RemoteRolloutWorker.options(name=f"rollout-{i}", num_cpus=ro.num_cpus, num_gpus=ro.num_gpus,
                                    max_restarts=ro.max_restarts, **placement.options("rollout", i)).remote(
            *rollout_worker_args(config, model_path, markers))
        for i in range(ro.num_workers)]
    reward_actors = [
        RemoteRewardWorker.options(name=f"reward-{i}", num_cpus=re.num_cpus, num_gpus=re.num_gpus,
                                   max_restarts=re.max_restarts, **placement.options("reward", i)).remote(
            *reward_worker_args(config, markers))
        for i in range(re.num_workers)]
    try:
        learner = LearnerGroup.start(config, model_path, markers, placement)
    except LearnerFailed as err:  # e.g. the ranks never met: a setup problem, not worth a resume
        for actor in rollout_actors + reward_actors:
            ray.kill(actor)
        raise RunStopped(f"the learner group did not start: {err}") from None
    roles = Roles(learner, None, None)
    if config.train.weight_sync == "broadcast":  # a restarted actor catches up from the object store
        def prepare(actor):
            return actor.load_published.remote(roles.learner.actors[0].publish.remote())
    else:
        def prepare(actor):
            return actor.load_weights.remote(roles.weights["version"], roles.weights["ref"])
    roles.rollout = ActorGroup("rollout", rollout_actors, timeout_s=ro.timeout_s,
                               max_attempts=config.run.max_batch_attempts, prepare=prepare)
    roles.reward = ActorGroup("reward", reward_actors, timeout_s=re.timeout_s,
                              max_attempts=config.run.max_batch_attempts)
    return roles


def call_learner(config: Config, roles: Roles, method: str, *args, timeout: float | None = None):
    """Every learner call has a timeout; a dead, hung or failing learner (any rank of the
    group) is a LearnerFailed, and the whole group is killed."""
    return roles.learner.call(method, *args, timeout=timeout or config.train.timeout_s)


def sync_weights(config: Config, roles: Roles) -> dict:
    """Publish once; every live rollout actor loads it and acknowledges before sampling."""
    if config.train.weight_sync == "broadcast":
        return broadcast_weights(config, roles)
    start = time.perf_counter()
    published = call_learner(config, roles, "publish")
    roles.weights = {"version": published["version"], "ref": published["weights"][0]}
    roles.rollout.mark_all_stale()
    roles.rollout.prepare_all()  # an actor that misses it is prepared again before its next task
    return {"version": published["version"], "sync_bytes": published["bytes"],
            "sync_seconds": time.perf_counter() - start}


def broadcast_weights(config: Config, roles: Roles) -> dict:
    """train.weight_sync=broadcast: learner rank 0 sends the weights to every live rollout
    actor over one collective group (actors/weight_sync.py), no object store.

    The group is (re)built when the live actors changed since it was built (a restart: the
    restarted process is not in it).  If the broadcast fails, every actor that did not get
    it is left stale and catches up from the object store before its next batch."""
    start = time.perf_counter()
    rollout, learner = roles.rollout, roles.learner.actors[0]
    version = call_learner(config, roles, "current_version")
    members = [i for i, alive in enumerate(rollout.alive) if alive]
    rollout.mark_all_stale()
    sent = 0
    try:
        if roles.broadcast != (members, rollout.restarts):
            roles.broadcast = None
            address, port = ray.get(learner.rendezvous_address.remote(), timeout=config.rollout.timeout_s)
            world = len(members) + 1
            ray.get([learner.join_broadcast.remote(address, port, world)]
                    + [rollout.actors[i].join_broadcast.remote(address, port, rank, world, config.rollout.timeout_s)
                       for rank, i in enumerate(members, start=1)], timeout=2 * config.rollout.timeout_s)
            roles.broadcast = (members, rollout.restarts)
        bucket = config.train.weight_sync_bucket_mb << 20
        done = ray.get([learner.broadcast_weights.remote()]
                       + [rollout.actors[i].receive_weights.remote(version, bucket) for i in members],
                       timeout=config.rollout.timeout_s)
        sent = done[0]["bytes"]
        rollout.mark_prepared(members)
    except (RayError, GetTimeoutError) as err:
        roles.broadcast = None  # rebuilt at the next sync
        rollout.events.append(f"weight broadcast of v{version} failed ({str(err).splitlines()[0][:200]}); "
                              "the rollout actors load it from the object store")
        rollout.prepare_all()
    roles.weights = {"version": version}
    return {"version": version, "sync_bytes": sent, "sync_seconds": time.perf_counter() - start}


def collect_epoch(roles: Roles, specs: list[SampleSpec], batch_size: int, epoch: int, progress=None,
                  input_refs: list | None = None):
    """Sample all specs; send each finished batch to the reward actors at once.

    ``input_refs``, if given, receives each batch's ``RewardInput`` ref (its views)."""
    chunks = [specs[i:i + batch_size] for i in range(0, len(specs), batch_size)]
    batch_refs, result_refs = [None] * len(chunks), [None] * len(chunks)
    if input_refs is not None:
        input_refs[:] = [None] * len(chunks)
    for index, chunk in enumerate(chunks):
        roles.rollout.submit(index, lambda actor, c=chunk, i=index:
                             actor.sample.options(num_returns=3).remote(c, epoch, i))
    start, sample_seconds, sampled, scored, max_queue = time.perf_counter(), 0.0, 0, 0, 0
    while scored < len(chunks):
        for task, _status in roles.rollout.poll(timeout=0.1 if sampled < len(chunks) else 0):
            batch_ref, views_ref, _ = task.refs
            batch_refs[task.key] = batch_ref
            if input_refs is not None:
                input_refs[task.key] = views_ref
            roles.reward.submit(task.key, lambda actor, ref=views_ref: actor.score.options(num_returns=2).remote(ref))
            sampled += 1
            if progress is not None:
                progress(len(chunks[task.key]))
            if sampled == len(chunks):
                sample_seconds = time.perf_counter() - start
        max_queue = max(max_queue, roles.reward.queue_depth)
        for task, _status in roles.reward.poll(timeout=0.1):
            result_refs[task.key] = task.refs[0]
            scored += 1
    return batch_refs, result_refs, {
        "sample_seconds": sample_seconds,
        "reward_tail_seconds": time.perf_counter() - start - sample_seconds,
        "reward_queue_depth_max": max_queue,
    }


def plan_eval(config: Config) -> list[SampleSpec]:
    """The held-out evaluation: the same prompts and seeds in every run (eval.seed), so the
    start and end of a run, and different runs, are compared on identical noise."""
    prompts = load_prompts(PromptsConfig(file=config.eval.prompts_file, limit=config.eval.num_prompts))
    return eval_specs(prompts, config.eval.samples_per_prompt, config.eval.seed)


def evaluate(config: Config, roles: Roles, run_dir: RunDirectory, specs: list[SampleSpec], tag: str) -> dict:
    """Sample the evaluation specs with the current policy and score them (MRC, alignment).

    Batches carry epoch -1, so injected faults (which name an epoch >= 0) never fire here.
    The driver fetches only the small results and the views for one sample sheet.
    """
    start, input_refs = time.perf_counter(), []
    try:
        batch_refs, result_refs, _ = collect_epoch(roles, specs, config.rollout.batch_size, -1,
                                                   input_refs=input_refs)
    except GroupFailed as err:
        raise RunStopped(f"held-out evaluation ({tag}): {err}") from None
    del batch_refs  # the trajectories are not needed: let the object store free them
    results = ray.get(result_refs)

    def field(name: str) -> np.ndarray:  # NaN where the reward actors did not compute it
        return np.concatenate([getattr(r, name) if getattr(r, name) is not None else np.full(len(r.rewards), np.nan)
                               for r in results])

    mrc, alignment, rewards = field("mrc"), field("alignment"), field("rewards")
    (mrc_mean, mrc_sem), (alignment_mean, alignment_sem) = mean_and_sem(mrc), mean_and_sem(alignment)
    summary = {
        "tag": tag, "version": roles.weights.get("version"), "num_samples": len(specs),
        "num_prompts": len({s.prompt for s in specs}), "samples_per_prompt": config.eval.samples_per_prompt,
        "mrc_mean": mrc_mean, "mrc_sem": mrc_sem, "alignment_mean": alignment_mean,
        "alignment_sem": alignment_sem, "reward_mean": mean_and_sem(rewards)[0],
        "object_size_mean": mean_and_sem(field("object_size"))[0],
        "seconds": time.perf_counter() - start,
    }
    grids = np.concatenate([pictures(ray.get(ref).views) for ref in input_refs])
    run_dir.save_eval(summary, grids, [s.prompt for s in specs], mrc, alignment)
    return summary


def format_eval(s: dict) -> str:
    return (f"eval ({s['tag']}, v{s['version']}): held-out MRC {s['mrc_mean']:.4f} ± {s['mrc_sem']:.4f} | "
            f"alignment {s['alignment_mean']:.3f} ± {s['alignment_sem']:.3f} | {s['num_prompts']} prompts x "
            f"{s['samples_per_prompt']} | {s['seconds']:.1f}s")


def announce_eval(summary: dict, sinks: Sinks | None) -> None:
    """An evaluation's line in the log, and its figures in the logging sinks."""
    print(format_eval(summary), flush=True)
    if sinks is not None:
        sinks.record_eval(summary)


def restore(config: Config, roles: Roles, run_dir: RunDirectory, warnings: list[str]) -> int:
    """Load the newest checkpoint that verifies and loads; returns the epoch to run next.

    Damaged checkpoints newer than it are moved to ``checkpoints/damaged/``, never deleted:
    their epochs run again, and they must not count towards ``train.keep_checkpoints``.
    If every checkpoint is damaged the run stops, touching none of them: starting again
    from epoch 0 is the user's call.
    """
    damaged = []  # (checkpoint, why), newest first
    for checkpoint in reversed(list_checkpoints(run_dir.checkpoints)):
        try:
            verify_checkpoint(checkpoint)
            state = call_learner(config, roles, "load_checkpoint", str(checkpoint))
        except CorruptCheckpointError as err:
            damaged.append((checkpoint, getattr(err, "cause", None) or err))  # Ray wraps the learner's error
            continue
        except CheckpointMismatchError as err:
            raise RunStopped(f"resume={run_dir.path}: {getattr(err, 'cause', None) or err}") from None
        for bad, why in damaged:
            note = (f"checkpoint {bad.name} is damaged ({why}); falling back to the previous one; "
                    f"moved to {set_aside(bad)}")
            print(f"WARNING: {note}", file=sys.stderr, flush=True)
            warnings.append(note)
        run_dir.keep_epochs_before(state["next_epoch"])
        print(f"resumed from {checkpoint.name}: epoch {state['next_epoch'] + 1} next, policy "
              f"v{state['version']}", flush=True)
        return state["next_epoch"]
    if damaged:
        found = "; ".join(f"{bad.name}: {why}" for bad, why in damaged)
        raise RunStopped(
            f"resume={run_dir.path}: all {len(damaged)} checkpoints are damaged ({found}); none was changed or "
            "deleted. Restore them from a backup, or start over explicitly in a new run directory: "
            f"python -m learner.main --config {run_dir.path / 'config.yaml'} run.dir=null")
    if run_dir.rows:
        warnings.append("no checkpoint yet: the run starts again from epoch 0")
    run_dir.keep_epochs_before(0)
    return 0


def _progress_bar(total: int, epoch: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch} sampling", unit="sample", leave=False,
                file=sys.stderr, disable=None)


def format_epoch(m: dict, epochs: int) -> str:
    mrc = f" | MRC {m['mrc_mean']:.4f}" if np.isfinite(m["mrc_mean"]) else ""
    if np.isfinite(m.get("alignment_mean", np.nan)):
        mrc += f" | align {m['alignment_mean']:.3f}"
    if "zmv_reward_gain" in m:  # mv-zigal / mvc-zigal: what the zigzag added, and the multiplier
        mrc += f" | ZMV gain {m['zmv_reward_gain']:+.4f}"
    if "multiplier" in m:
        mrc += f" | lambda {m['multiplier']:.3f}"
    loss = f" | loss {m['loss']:+.4f} | grad {m['grad_norm']:.3g}" if "loss" in m else " | (no update)"
    return (f"epoch {m['epoch'] + 1}/{epochs} | v{m['version']} | reward {m['reward_mean']:+.4f}"
            f" ± {m['reward_std']:.4f}{mrc} | KL {m['kl_mean']:.2e}{loss} | dropped {m['num_dropped']}"
            f" | sample {m['sample_seconds']:.1f}s reward+{m['reward_tail_seconds']:.1f}s"
            f" train {m['train_seconds']:.1f}s sync {m['sync_seconds']:.2f}s"
            f" | {m['samples_per_second']:.2f} samples/s")


def train_epochs(config: Config, roles: Roles, run_dir: RunDirectory, prompts: list[str],
                 first_epoch: int, warnings: list[str], eval_specs: list[SampleSpec] = (),
                 sinks: Sinks | None = None) -> str:
    """The epoch loop; returns why it stopped.  With ``eval.every`` N, the held-out
    evaluation also runs after every N-th epoch (tag ``epoch_N``).  Each epoch's row goes to
    the logging sinks (``learner/sinks.py``; default: metrics.parquet only)."""
    sinks = sinks or build_sinks(config, run_dir, ray_metrics=False)
    for epoch in range(first_epoch, config.train.epochs):
        epoch_start = time.perf_counter()
        update = not (config.train.warmup_epoch and epoch == 0)
        specs = (plan_epoch(config.run.seed, epoch, prompts, config.train.samples_per_epoch,
                            config.train.group_size) if update
                 else plan_warmup(config.run.seed, prompts, config.train.tracker_min_count))
        bar = _progress_bar(len(specs), epoch + 1)
        try:
            batch_refs, result_refs, timings = collect_epoch(roles, specs, config.rollout.batch_size,
                                                             epoch, bar.update)
        except GroupFailed as err:
            raise RunStopped(f"epoch {epoch}: {err}") from None
        finally:
            bar.close()
        try:
            metrics = call_learner(config, roles, "train", epoch, batch_refs, result_refs, update,
                                   config.run.samples_to_save)
        except (NoFiniteRewardError, NonFiniteGradientError) as err:
            cause = getattr(err, "cause", None) or err  # Ray wraps the learner's exception
            raise RunStopped(f"epoch {epoch}: {cause}") from None
        del batch_refs, result_refs  # let the object store free the epoch's tensors
        sync = sync_weights(config, roles) if update else {"sync_seconds": 0.0, "sync_bytes": 0}
        previews, new_warnings = metrics.pop("previews"), metrics.pop("warnings")
        warnings += [w for w in new_warnings if w not in warnings]
        metrics.update(timings, sync_seconds=sync["sync_seconds"], sync_bytes=sync["sync_bytes"],
                       rollout_restarts=roles.rollout.restarts, reward_restarts=roles.reward.restarts)
        metrics["epoch_seconds"] = time.perf_counter() - epoch_start
        metrics["samples_per_second"] = len(specs) / metrics["epoch_seconds"]
        sinks.record_epoch(metrics)  # metrics.parquet, the Ray metrics, TensorBoard
        run_dir.write_status(False, f"session {run_dir.session} is running, or was killed after epoch "
                                    f"{epoch + 1}/{config.train.epochs}", time.perf_counter() - run_dir.started)
        run_dir.save_samples(epoch, previews)
        run_dir.plot_curves()
        print(format_epoch(metrics, config.train.epochs), flush=True)
        last = epoch == config.train.epochs - 1
        kl_stop = config.train.kl_early_stop is not None and metrics["kl_mean"] >= config.train.kl_early_stop
        if (epoch + 1) % config.train.checkpoint_every == 0 or last or kl_stop:
            call_learner(config, roles, "save_checkpoint", str(run_dir.checkpoint_dir(epoch)), epoch)
            prune_checkpoints(run_dir.checkpoints, config.train.keep_checkpoints)
        tag = RunDirectory.epoch_tag(epoch + 1)
        if eval_specs and config.eval.every and (epoch + 1) % config.eval.every == 0 and not last \
                and not kl_stop and tag not in run_dir.evals:
            announce_eval(evaluate(config, roles, run_dir, eval_specs, tag), sinks)
        if kl_stop:
            reason = (f"KL {metrics['kl_mean']:.3e} reached train.kl_early_stop="
                      f"{config.train.kl_early_stop} at epoch {epoch}")
            print(f"early stop: {reason}", flush=True)
            return reason
    return "completed all epochs"


def run(config: Config) -> RunDirectory:
    """Run (or resume) a whole training job; returns its run directory."""
    wall_start = time.perf_counter()
    check_run_location(config)  # bad input fails before any actor starts
    prompts = load_prompts(config.prompts)
    eval_specs = plan_eval(config) if config.eval.prompts_file else []
    check_alignment_prompts(config, prompts + [s.prompt for s in eval_specs])
    model_path = resolve_model_path(config.model.path, config.model.cache_dir)
    check_model_dir(model_path, config.model.family)
    prompt_sets = [(f"prompts.file={config.prompts.file}", prompts)]
    if eval_specs:
        prompt_sets.append((f"eval.prompts_file={config.eval.prompts_file}", [s.prompt for s in eval_specs]))
    prompt_warnings = [warning for source, texts in prompt_sets
                       if (warning := prompt_truncation_warning(model_path, texts, source))]
    try:
        run_dir = RunDirectory.open(config.resume) if config.resume else RunDirectory.create(config)
        if config.resume:
            check_resume_config(config, run_dir)  # before any actor starts
        run_dir.begin_session(wall_start)  # the session's first write: a read-only directory fails here
    except OSError as err:
        if isinstance(err, FileNotFoundError | FileExistsError):  # their messages say what to do
            raise
        where = config.resume or config.run.dir or config.run.output_dir
        raise io_stopped(err, f"cannot write the run directory {where}", config.resume) from None
    print(f"run directory: {run_dir.path}", flush=True)
    for warning in prompt_warnings:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    started_ray = connect_ray(config)
    # After ray.init, whose own handler would abort the process without our cleanup.
    in_main_thread = threading.current_thread() is threading.main_thread()
    stop_on_sigterm.received, stop_on_sigterm.run_dir = False, run_dir.path
    previous_sigterm = signal.signal(signal.SIGTERM, stop_on_sigterm) if in_main_thread else None
    sinks = build_sinks(config, run_dir)  # metrics.parquet, the Ray metrics, TensorBoard (run.tensorboard)
    stop_reason, warnings, events, finished = "completed all epochs", prompt_warnings + list(run_dir.notes), [], False
    resumes_left, resuming = config.run.max_auto_resumes, bool(config.resume)
    placement = Placement()
    try:
        if started_ray:
            check_resources(config)
        try:
            placement = reserve(config)  # every actor's resources at once, before any model loads
        except PlacementError as err:
            raise RunStopped(str(err)) from None
        while True:
            roles = start_roles(config, str(model_path), run_dir, placement)
            try:
                roles.reward.mark_all_stale()  # wait for them to load, so no timer counts it
                roles.reward.prepare_all()
                first_epoch = restore(config, roles, run_dir, warnings) if resuming else 0
                sync = sync_weights(config, roles)
                print(f"{len(roles.rollout.actors)} rollout actor(s), {len(roles.reward.actors)} reward "
                      f"actor(s), {roles.learner.num_workers} learner worker(s): policy v{sync['version']} published "
                      f"({sync['sync_bytes'] / 1e6:.2f} MB)", flush=True)
                if eval_specs and config.eval.at_start and "start" not in run_dir.evals:
                    announce_eval(evaluate(config, roles, run_dir, eval_specs, "start"), sinks)
                stop_reason = train_epochs(config, roles, run_dir, prompts, first_epoch, warnings, eval_specs,
                                           sinks)
                if eval_specs and config.eval.at_end:
                    announce_eval(evaluate(config, roles, run_dir, eval_specs, "end"), sinks)
                    if (change := run_dir.mrc_change_in_words()) is not None:
                        print(f"learning: {change}", flush=True)
                finished = True
                break
            except LearnerFailed as err:
                events.append(f"learner failed: {err}")
                if resumes_left <= 0:
                    raise RunStopped(f"{err}; resume with: python -m learner.main resume={run_dir.path}") from None
                resumes_left -= 1
                resuming = True
                print(f"WARNING: {err}; resuming from the last checkpoint", file=sys.stderr, flush=True)
            finally:
                events += roles.rollout.events + roles.reward.events
                roles.shutdown()
    except BaseException as err:  # the report always says how the run ended
        stopped = err
        if stop_on_sigterm.received and not isinstance(err, Terminated):
            # Raised inside a Ray call (e.g. ray.wait), SIGTERM's exception comes out wrapped
            # (SystemError "returned a result with an exception set"): report it as itself.
            stopped = Terminated(run_dir.path)
        elif isinstance(err, OSError):  # a full disk, a read-only directory
            stopped = io_stopped(err, "stopped by a failed write", run_dir.path)
        stop_reason = f"stopped with an error: {stopped}" if isinstance(stopped, RunStopped) else \
            f"stopped by {type(stopped).__name__}: {stopped}"
        if stopped is not err:
            raise stopped from None
        raise
    finally:
        for w in warnings:
            print(f"WARNING: {w}", file=sys.stderr, flush=True)
        wall_seconds = time.perf_counter() - wall_start
        try:  # on a full disk these fail too; the shutdown below must still happen
            run_dir.write_status(finished, stop_reason, wall_seconds)
            report = run_dir.write_report(config, warnings=warnings, stop_reason=stop_reason, events=events,
                                          wall_seconds=wall_seconds)
            print(f"report: {report}", flush=True)
        except OSError as err:
            print(f"WARNING: could not write status.json or report.md ({err.strerror or err}); the run "
                  f"{stop_reason}", file=sys.stderr, flush=True)
        sinks.close()
        placement.remove()
        if started_ray:
            ray.shutdown()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
    return run_dir
