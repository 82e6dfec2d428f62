"""The single controller: plans each epoch and moves object refs between the roles.

One epoch, pure on-policy (every actor at version v):

1. plan: prompts and seeds for the epoch, deterministic from the run seed;
2. rollout: batches go to the rollout workers; each finished batch goes straight
   to the reward pool, so scoring overlaps sampling;
3. learn: the learner gets the refs of all batches and rewards, rejects anything
   not sampled at v, and applies one update -> v + 1;
4. sync: the learner publishes v + 1 once; every rollout worker loads it and
   acknowledges before the next epoch samples.

The driver holds refs and small metadata only; tensors move actor to actor.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict

import numpy as np
import ray

from actors.batches import SampleSpec
from actors.rollout import RemoteRolloutWorker
from learner.actor import RemoteLearner, lora_settings
from learner.config import Config, load_prompts
from learner.rundir import RunDirectory
from learner.trainer import NoFiniteRewardError
from policy.models import check_model_dir, resolve_model_path
from policy.pipeline import SamplingSettings
from reward_service.pool import RemoteRewardWorker, RewardPool


class RunStopped(RuntimeError):
    """The run cannot go on; the message says why and at which epoch."""


def plan_epoch(run_seed: int, epoch: int, prompts: list[str], samples_per_epoch: int) -> list[SampleSpec]:
    """Prompts (uniform, with replacement) and seeds of an epoch; a pure function of its inputs."""
    rng = np.random.default_rng([run_seed, epoch])
    indices = rng.integers(len(prompts), size=samples_per_epoch)
    seeds = rng.integers(2**31 - 1, size=samples_per_epoch)
    return [SampleSpec(f"e{epoch}-{i}", int(p), prompts[p], int(s))
            for i, (p, s) in enumerate(zip(indices, seeds))]


def connect_ray(config: Config) -> bool:
    """Join a cluster when an address is set (``ray job submit`` sets RAY_ADDRESS), else start one."""
    if ray.is_initialized():  # an embedding program (or a test) owns Ray
        return False
    address = config.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    ray.init(num_cpus=config.run.local_num_cpus, include_dashboard=True,
             dashboard_host=config.run.dashboard_host, log_to_driver=True)
    return True


def check_resources(config: Config) -> None:
    """On the embedded Ray, fail now rather than wait forever for CPUs that do not exist."""
    need = (config.rollout.num_workers * config.rollout.num_cpus
            + config.reward.num_workers * config.reward.num_cpus + config.train.num_cpus)
    have = ray.cluster_resources().get("CPU", 0)
    if need > have + 1e-9:
        raise RunStopped(
            f"the actors need {need:g} CPUs but this Ray has {have:g}; lower rollout.num_cpus, "
            "reward.num_cpus or train.num_cpus (fractions are fine), use fewer workers, or set "
            "run.local_num_cpus")


def start_actors(config: Config, model_path: str):
    learner = RemoteLearner.options(name="learner", num_cpus=config.train.num_cpus,
                                    num_gpus=config.train.num_gpus).remote(model_path, config)
    sampling = SamplingSettings(**asdict(config.sampling))
    rollout = [
        RemoteRolloutWorker.options(name=f"rollout-{i}", num_cpus=config.rollout.num_cpus,
                                    num_gpus=config.rollout.num_gpus).remote(
            model_path, config.model.finetune, lora_settings(config), sampling,
            config.rollout.torch_threads, "cuda" if config.rollout.num_gpus > 0 else "cpu")
        for i in range(config.rollout.num_workers)]
    r = config.reward
    options = ({"reconstructor": r.reconstructor, "reconstructor_options": dict(r.reconstructor_options),
                "lpips_backbone": r.lpips_backbone} if r.kind == "mrc" else {})
    rewards = [
        RemoteRewardWorker.options(name=f"reward-{i}", num_cpus=r.num_cpus, num_gpus=r.num_gpus).remote(
            r.kind, options, r.torch_threads, config.faults.nonfinite_reward_fraction)
        for i in range(r.num_workers)]
    return learner, rollout, RewardPool(rewards)


def sync_weights(learner, workers) -> dict:
    """Publish once, load everywhere, and wait until every worker acknowledges."""
    start = time.perf_counter()
    published = ray.get(learner.publish.remote())
    acks = ray.get([w.load_weights.remote(published["version"], published["weights"][0]) for w in workers])
    if any(a != published["version"] for a in acks):
        raise RunStopped(f"rollout workers acknowledged versions {acks}, expected {published['version']}")
    return {"version": published["version"], "sync_bytes": published["bytes"],
            "sync_seconds": time.perf_counter() - start}


def collect_epoch(workers, pool: RewardPool, specs: list[SampleSpec], batch_size: int, progress=None):
    """Sample all specs; send each finished batch to the reward pool at once."""
    chunks = [specs[i:i + batch_size] for i in range(0, len(specs), batch_size)]
    pending = list(enumerate(chunks))
    batch_refs = [None] * len(chunks)
    result_refs = [None] * len(chunks)
    running = {}  # image ref -> (chunk index, worker)
    start = time.perf_counter()

    def launch(worker):
        index, chunk = pending.pop(0)
        batch_ref, images_ref = worker.sample.options(num_returns=2).remote(chunk)
        batch_refs[index] = batch_ref
        running[images_ref] = (index, worker)

    for worker in workers:  # two in flight per worker: the next batch is queued while one runs
        for _ in range(2):
            if pending:
                launch(worker)
    max_queue = 0
    while running:
        [done], _ = ray.wait(list(running), num_returns=1, fetch_local=False)
        index, worker = running.pop(done)
        result_refs[index] = pool.submit(done)
        max_queue = max(max_queue, pool.queue_depth)
        if progress is not None:
            progress(len(chunks[index]))
        if pending:
            launch(worker)
    sample_seconds = time.perf_counter() - start
    ray.wait(result_refs, num_returns=len(result_refs), fetch_local=False)
    pool.done(result_refs)
    return batch_refs, result_refs, {
        "sample_seconds": sample_seconds,
        "reward_tail_seconds": time.perf_counter() - start - sample_seconds,
        "reward_queue_depth_max": max_queue,
    }


def _progress_bar(total: int, epoch: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch} sampling", unit="sample", leave=False,
                file=sys.stderr, disable=None)


def format_epoch(m: dict, epochs: int) -> str:
    mrc = f" | MRC {m['mrc_mean']:.4f}" if np.isfinite(m["mrc_mean"]) else ""
    loss = f" | loss {m['loss']:+.4f} | grad {m['grad_norm']:.3f}" if "loss" in m else " | (no update)"
    return (f"epoch {m['epoch'] + 1}/{epochs} | v{m['version']} | reward {m['reward_mean']:+.4f}"
            f" ± {m['reward_std']:.4f}{mrc} | KL {m['kl_mean']:.2e}{loss} | dropped {m['num_dropped']}"
            f" | sample {m['sample_seconds']:.1f}s reward+{m['reward_tail_seconds']:.1f}s"
            f" train {m['train_seconds']:.1f}s sync {m['sync_seconds']:.2f}s"
            f" | {m['samples_per_second']:.2f} samples/s")


def run(config: Config) -> RunDirectory:
    """Run a whole training job; returns its run directory."""
    wall_start = time.perf_counter()
    prompts = load_prompts(config.prompts)  # bad input fails before any actor starts
    model_path = resolve_model_path(config.model.path, config.model.cache_dir)
    check_model_dir(model_path)
    run_dir = RunDirectory.create(config)
    print(f"run directory: {run_dir.path}", flush=True)
    started_ray = connect_ray(config)
    stop_reason, warnings, actors = "completed all epochs", [], []
    try:
        if started_ray:
            check_resources(config)
        learner, workers, pool = start_actors(config, str(model_path))
        actors = [learner, *workers, *pool.actors]
        sync = sync_weights(learner, workers)
        print(f"{len(workers)} rollout worker(s), {len(pool.actors)} reward worker(s), learner: "
              f"policy v{sync['version']} published ({sync['sync_bytes'] / 1e6:.2f} MB)", flush=True)
        for epoch in range(config.train.epochs):
            epoch_start = time.perf_counter()
            specs = plan_epoch(config.run.seed, epoch, prompts, config.train.samples_per_epoch)
            bar = _progress_bar(len(specs), epoch + 1)
            batch_refs, result_refs, timings = collect_epoch(workers, pool, specs,
                                                             config.rollout.batch_size, bar.update)
            bar.close()
            update = not (config.train.warmup_epoch and epoch == 0)
            try:
                metrics = ray.get(learner.train.remote(epoch, batch_refs, result_refs, update,
                                                       config.run.samples_to_save))
            except NoFiniteRewardError as err:
                cause = getattr(err, "cause", None) or err  # Ray wraps the learner's exception
                raise RunStopped(f"epoch {epoch}: {cause}; check the reward function "
                                 "(see the reward workers' logs)") from None
            del batch_refs, result_refs  # let the object store free the epoch's tensors
            sync = sync_weights(learner, workers) if update else {"sync_seconds": 0.0, "sync_bytes": 0}
            previews, new_warnings = metrics.pop("previews"), metrics.pop("warnings")
            warnings += [w for w in new_warnings if w not in warnings]
            metrics.update(timings, sync_seconds=sync["sync_seconds"], sync_bytes=sync["sync_bytes"])
            metrics["epoch_seconds"] = time.perf_counter() - epoch_start
            metrics["samples_per_second"] = len(specs) / metrics["epoch_seconds"]
            run_dir.log_metrics(metrics)
            run_dir.save_samples(epoch, previews)
            run_dir.plot_curves()
            print(format_epoch(metrics, config.train.epochs), flush=True)
            last = epoch == config.train.epochs - 1
            kl_stop = config.train.kl_early_stop is not None and metrics["kl_mean"] >= config.train.kl_early_stop
            if (epoch + 1) % config.train.checkpoint_every == 0 or last or kl_stop:
                ray.get(learner.save_checkpoint.remote(str(run_dir.checkpoint_dir(epoch)), epoch))
            if kl_stop:
                stop_reason = (f"KL {metrics['kl_mean']:.3e} reached train.kl_early_stop="
                               f"{config.train.kl_early_stop} at epoch {epoch}")
                print(f"early stop: {stop_reason}", flush=True)
                break
    except RunStopped as err:
        stop_reason = f"stopped with an error: {err}"
        raise
    finally:
        for w in warnings:
            print(f"WARNING: {w}", file=sys.stderr, flush=True)
        report = run_dir.write_report(config, warnings=warnings, stop_reason=stop_reason,
                                      wall_seconds=time.perf_counter() - wall_start)
        print(f"report: {report}", flush=True)
        for actor in actors:
            ray.kill(actor)
        if started_ray:
            ray.shutdown()
    return run_dir
