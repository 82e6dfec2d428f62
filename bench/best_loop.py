"""The actors against the loop a user would otherwise write, each at its best thread settings.

    python -m bench.best_loop [--quick] [--out DIR]

``bench/ray_overhead.py`` pins both sides to one torch thread.  A user who does not use
this system writes ddpo-pytorch's shape instead: one process using every core, each
rollout batch's reward handed to a thread pool as soon as it is sampled, so scoring
overlaps the next batch's sampling.  This benchmark measures that loop against the actors
on the same work (model, prompts, seeds, reward, LoRA initialisation):

* plain: ``InProcessRoles`` (the classes the actors wrap) in this process, at each torch
  thread count in ``threads``, the reward on a one-thread pool next to sampling;
* actors: ``learner.driver.run`` at each setting in ``actor_settings`` (rollout actors and
  the torch threads of each role);

and reports each side's best epoch time and their ratio (``ray_overhead_ratio``: best
actors / best plain; the goal is <= 1.0).  It also reports how far the UNet is from the
cores' arithmetic peak: the FLOPs of one sampling phase and one update are counted in the
plain loop's warm-up epoch (``bench.flops``), divided by the timed phases of the later
epochs and by the dense-matmul peak at the same thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import FULL_OUT, QUICK_OUT, after_warmup, log, mean, ratio, started, stamp, write_json
from bench.ray_overhead import FULL as RAY_OVERHEAD_FULL
from bench.ray_overhead import QUICK as RAY_OVERHEAD_QUICK

FULL = {"epochs": 3, "overrides": RAY_OVERHEAD_FULL["overrides"], "threads": [1, 2],
        # (rollout actors, rollout threads, reward threads, train threads)
        "actor_settings": [(1, 1, 1, 1), (2, 1, 1, 1), (1, 2, 1, 2)]}
QUICK = {"epochs": 2, "overrides": RAY_OVERHEAD_QUICK["overrides"], "threads": [1, 2],
         "actor_settings": [(1, 1, 1, 1)]}


def make_config(overrides: list[str], epochs: int, workers: int, rollout_threads: int, reward_threads: int,
                train_threads: int, output_dir: str):
    from learner.config import load_config

    name = f"actors-{workers}x{rollout_threads}-{reward_threads}-{train_threads}"
    return load_config([*overrides, f"train.epochs={epochs}", f"rollout.num_workers={workers}",
                        f"rollout.torch_threads={rollout_threads}", f"reward.torch_threads={reward_threads}",
                        f"train.torch_threads={train_threads}", f"run.dir={Path(output_dir) / name}",
                        "run.name=bench-best-loop"])


def run_plain(config, threads: int) -> dict:
    """ddpo-pytorch's loop at ``threads`` torch threads; per-epoch rows and the FLOPs counted in
    the warm-up epoch (FlopCounterMode is per thread: the main thread's sampling and update)."""
    import torch

    from bench.flops import FlopCount
    from learner.driver import plan_epoch
    from learner.in_process import InProcessRoles

    roles = InProcessRoles(config)
    torch.set_num_threads(threads)  # after the roles: each role sets its own count when built
    unet_name = type(roles.rollout.policy.unet).__name__
    train, size = config.train, config.rollout.batch_size
    rows, flops = [], {}
    with ThreadPoolExecutor(max_workers=1) as pool:
        for epoch in range(train.epochs):
            counting = epoch == 0
            start = time.perf_counter()
            specs = plan_epoch(config.run.seed, epoch, roles.prompts, train.samples_per_epoch, train.group_size)
            batches, futures = [], []
            with FlopCount() if counting else contextlib.nullcontext() as count:
                for index in range(0, len(specs), size):
                    batch, reward_input, _ = roles.rollout.sample(specs[index:index + size], epoch, index // size)
                    batches.append(batch)
                    futures.append(pool.submit(roles.reward.score, reward_input))
            if counting:
                flops["sample"], flops["sample_unet"] = count.total, count.of(unet_name)
            sampled = time.perf_counter()
            results = [future.result()[0] for future in futures]
            scored = time.perf_counter()
            samples = roles.trainer.assemble(batches, results)
            with FlopCount() if counting else contextlib.nullcontext() as count:
                roles.trainer.update(samples, roles.trainer.advantages(samples))
            if counting:
                flops["train"], flops["train_unet"] = count.total, count.of(unet_name)
                if not (flops["sample_unet"] and flops["train_unet"]):  # of() matches the module's own name
                    raise RuntimeError(f"no FLOPs counted under {unet_name}: the UNet's share would read 0%")
            trained = time.perf_counter()
            roles.publish()
            end = time.perf_counter()
            row = {"epoch": epoch, "epoch_seconds": end - start, "sample_seconds": sampled - start,
                   "reward_tail_seconds": scored - sampled, "train_seconds": trained - scored,
                   "sync_seconds": end - trained, "reward_mean": float(samples.rewards.mean())}
            rows.append(row)
            log(f"plain, {threads} thread(s), epoch {epoch + 1}/{train.epochs}: {row['epoch_seconds']:.1f}s (sample "
                f"{row['sample_seconds']:.1f}s, reward tail {row['reward_tail_seconds']:.1f}s, train "
                f"{row['train_seconds']:.1f}s){' [counting FLOPs: warm-up]' if counting else ''}")
    return {"threads": threads, "rows": rows, "flops": flops}


def summarize(plain: list[dict], actors: list[dict], peaks: dict[int, float], warmup: int = 1) -> dict:
    """Best of each side, their ratio, and the UNet's share of the matmul peak (pure)."""
    def means(rows):
        return {**{k: mean(after_warmup([r[k] for r in rows], warmup))
                   for k in ("epoch_seconds", "sample_seconds", "reward_tail_seconds", "train_seconds")},
                "epoch_seconds_each": after_warmup([r["epoch_seconds"] for r in rows], warmup)}

    samples = plain[0]["samples_per_epoch"]
    out = {"plain": [], "actors": []}
    for side in plain:
        m = means(side["rows"])
        peak = peaks[side["threads"]]
        f = side["flops"]
        out["plain"].append({
            "threads": side["threads"], **m, "samples_per_second": samples / m["epoch_seconds"],
            "reward_mean_each": [r["reward_mean"] for r in side["rows"]], "flops": f,
            "matmul_peak_flops": peak,
            # the UNet's arithmetic over the whole phase's wall time: what the loop gets of the peak
            "sampling_unet_peak_share": f["sample_unet"] / m["sample_seconds"] / peak,
            "training_unet_peak_share": f["train_unet"] / m["train_seconds"] / peak})
    for side in actors:
        m = means(side["rows"])
        out["actors"].append({"setting": side["setting"], **m, "samples_per_second": samples / m["epoch_seconds"],
                              "reward_mean_each": [r["reward_mean"] for r in side["rows"]]})
    best_plain = min(out["plain"], key=lambda s: s["epoch_seconds"])
    best_actors = min(out["actors"], key=lambda s: s["epoch_seconds"])
    out["best_plain"], out["best_actors"] = best_plain, best_actors
    out["ray_overhead_ratio"] = ratio(best_actors["epoch_seconds"], best_plain["epoch_seconds"])
    reference = out["plain"][0]["reward_mean_each"]
    out["reward_mean_max_abs_diff"] = max(abs(a - b) for s in out["plain"] + out["actors"]
                                          for a, b in zip(s["reward_mean_each"], reference))
    return out


def setting_words(setting: dict) -> str:
    return (f"{setting['rollout_actors']} rollout actor(s), threads rollout {setting['rollout_threads']} / "
            f"reward {setting['reward_threads']} / train {setting['train_threads']}")


def report(r: dict) -> str:
    lines = []
    for s in r["plain"]:
        lines.append(f"plain loop, {s['threads']} thread(s): {s['epoch_seconds']:.2f} s/epoch "
                     f"({s['samples_per_second']:.3f} samples/s; sample {s['sample_seconds']:.2f}, reward tail "
                     f"{s['reward_tail_seconds']:.2f}, train {s['train_seconds']:.2f}); UNet at "
                     f"{s['sampling_unet_peak_share']:.1%} of the {s['matmul_peak_flops'] / 1e9:.0f} GFLOP/s matmul "
                     f"peak in sampling, {s['training_unet_peak_share']:.1%} in training")
    for s in r["actors"]:
        lines.append(f"actors, {setting_words(s['setting'])}: {s['epoch_seconds']:.2f} s/epoch "
                     f"({s['samples_per_second']:.3f} samples/s; sample {s['sample_seconds']:.2f}, reward tail "
                     f"{s['reward_tail_seconds']:.2f}, train {s['train_seconds']:.2f})")
    lines.append(f"ray_overhead_ratio = best actors / best plain = {r['ray_overhead_ratio']:.3f} (goal <= 1.0); "
                 f"same work: max |mean reward difference| {r['reward_mean_max_abs_diff']:.1e}")
    return "\n".join(lines)


def main(quick: bool = False, out_dir: str | Path | None = None) -> dict:
    from bench.common import local_ray
    from bench.flops import matmul_peak
    from bench.ray_overhead import run_actors

    setup = QUICK if quick else FULL
    out_dir = Path(out_dir or (QUICK_OUT if quick else FULL_OUT))
    start = started()
    peaks = {threads: matmul_peak(threads) for threads in setup["threads"]}
    log("matmul peak: " + ", ".join(f"{t} thread(s) {p / 1e9:.0f} GFLOP/s" for t, p in peaks.items()))
    plain, actors = [], []
    with tempfile.TemporaryDirectory(prefix="bench-best-loop-") as tmp:
        for threads in setup["threads"]:
            config = make_config(setup["overrides"], setup["epochs"], 1, threads, threads, threads, tmp)
            side = run_plain(config, threads)
            side["samples_per_epoch"] = config.train.samples_per_epoch
            plain.append(side)
        for workers, rollout_threads, reward_threads, train_threads in setup["actor_settings"]:
            config = make_config(setup["overrides"], setup["epochs"], workers, rollout_threads, reward_threads,
                                 train_threads, tmp)
            setting = {"rollout_actors": workers, "rollout_threads": rollout_threads,
                       "reward_threads": reward_threads, "train_threads": train_threads}
            log(f"actors, {setting_words(setting)}")
            with local_ray(num_cpus=2):
                actors.append({"setting": setting, "rows": run_actors(config)})
    result = summarize(plain, actors, peaks)
    result["setup"] = {"quick": quick, "overrides": setup["overrides"], "epochs": setup["epochs"],
                       "warmup_epochs_excluded": 1, "cores": os.cpu_count(), "ray_num_cpus": 2}
    stamp(result, start)
    path = write_json(out_dir / "best_loop.json", result)
    print(report(result), flush=True)
    log(f"wrote {path} ({result['wall_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, brightness reward, 2 epochs")
    parser.add_argument("--out", default=None, help="folder for best_loop.json")
    args = parser.parse_args()
    main(args.quick, args.out)
