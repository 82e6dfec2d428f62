"""Ray overhead and overlap: the real actors against a plain single-process loop.

    nice -n 19 env PYTHONPATH=. python -m bench.ray_overhead [--quick] [--out DIR]

Both sides do the same work with the same model, reward, prompts, seeds and torch
thread count (``rollout/reward/train.torch_threads`` = ``torch.set_num_threads`` of
the plain loop):

* actors: ``learner.driver.run`` (1 rollout actor, 1 reward actor, the learner
  actor; then again with 2 rollout actors); the epoch times are the
  ``epoch_seconds`` column of the run's ``metrics.parquet`` (collect + train +
  sync, without checkpointing);
* plain: the plain classes those actors wrap (``RolloutWorker``,
  ``RewardWorker``, a ``Trainer`` on its own ``MultiViewPolicy`` as in
  ``learner/actor.py``) called in one process: plan_epoch -> sample every batch
  -> score it -> assemble / advantages / update -> load the new trainable
  weights into the rollout policy.  Each phase is timed on its own.

The first epoch of each side is a warm-up and is left out of the means.  Since
both sides see the same prompts, seeds and LoRA initialisation, their per-epoch
mean rewards are printed side by side as a check that they did the same work.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import threading
import time
from pathlib import Path

from bench.common import (FULL_OUT, QUICK_OUT, after_warmup, hidden_share, log, mean, model_family, ratio, stamp,
                          started, stdev, write_json)

FULL = {
    "epochs": 3, "threads": 1, "workers": [1, 2],
    "overrides": ["model.path=minicarve/weights/sft-short", "train.samples_per_epoch=16", "train.group_size=1",
                  "rollout.batch_size=8", "eval.prompts_file=null"],
}
QUICK = {
    "epochs": 2, "threads": 1, "workers": [1],
    "overrides": ["model.path=builtin:tiny", "train.samples_per_epoch=4", "train.group_size=1", "rollout.batch_size=2",
                  "sampling.num_steps=2", "prompts.limit=4", "reward.kind=brightness",
                  "reward.alignment=null", "eval.prompts_file=null", "run.samples_to_save=0"],
}
PHASES = ("sample_seconds", "reward_seconds", "train_seconds", "sync_seconds")


def make_config(overrides: list[str], epochs: int, threads: int, workers: int = 1, output_dir: str = "runs"):
    from learner.config import load_config

    return load_config([*overrides, f"train.epochs={epochs}", f"rollout.num_workers={workers}",
                        f"rollout.torch_threads={threads}", f"reward.torch_threads={threads}",
                        f"train.torch_threads={threads}", f"run.dir={Path(output_dir) / f'actors-{workers}'}",
                        "run.name=bench-ray-overhead"])


def tree_cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by a process and all its live descendants: with a
    local Ray started by this process, that is the driver, Ray's daemons and every actor."""
    import psutil

    root = psutil.Process(pid or os.getpid())
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


class EpochCpuProbe(threading.Thread):
    """Notes this process tree's CPU seconds each time the run's metrics.parquet gains a row (the
    end of an epoch), so the actors' CPU per epoch can be set against the plain loop's.  The window
    of epoch k runs from the end of epoch k-1 to the end of epoch k: it also holds epoch k-1's
    checkpoint and plots, which the plain loop does not do (a bias against the actors)."""

    def __init__(self, metrics_path: Path, interval: float = 0.2):
        super().__init__(daemon=True)
        self.path, self.interval = Path(metrics_path), interval
        self.marks: list[tuple[float, float]] = []  # (cpu seconds, wall clock) at each new row
        self.halt = threading.Event()

    def run(self) -> None:
        import pyarrow.parquet as pq

        while not self.halt.wait(self.interval):
            with contextlib.suppress(Exception):  # a file being replaced, a process that just ended
                if self.path.exists() and pq.read_metadata(self.path).num_rows > len(self.marks):
                    self.marks.append((tree_cpu_seconds(), time.perf_counter()))

    def stop(self) -> list[dict]:
        self.halt.set()
        self.join()
        return [{"cpu_seconds": c1 - c0, "between_rows_seconds": w1 - w0}
                for (c0, w0), (c1, w1) in zip(self.marks, self.marks[1:])]


def run_actors(config) -> list[dict]:
    """One real run through the actors (on the caller's Ray, which this process started); its
    per-epoch metrics rows, with the CPU seconds of the whole process tree per epoch from epoch 1."""
    import pandas as pd

    from learner.driver import run

    probe = EpochCpuProbe(Path(config.run.dir) / "metrics.parquet")
    probe.start()
    try:
        run_dir = run(config)
    finally:
        cpu = probe.stop()
    rows = pd.read_parquet(run_dir.path / "metrics.parquet").to_dict("records")
    for row, window in zip(rows[1:], cpu):
        row.update(window)
    return rows


def run_plain(config) -> list[dict]:
    """The same epochs as ``run_actors``, in this process: the classes the actors wrap, built
    with the driver's arguments (``learner.in_process``)."""
    from learner.in_process import InProcessRoles

    roles = InProcessRoles(config)
    rows = []
    for epoch in range(config.train.epochs):
        start, cpu = time.perf_counter(), tree_cpu_seconds()
        times = dict.fromkeys(PHASES, 0.0)
        samples = roles.sample_epoch(epoch, times)
        t = time.perf_counter()
        roles.trainer.update(samples, roles.trainer.advantages(samples))
        times["train_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        roles.publish()
        times["sync_seconds"] = time.perf_counter() - t
        row = {"epoch": epoch, **times, "epoch_seconds": time.perf_counter() - start,
               "cpu_seconds": tree_cpu_seconds() - cpu, "reward_mean": float(samples.rewards.mean())}
        rows.append(row)
        log(f"plain epoch {epoch + 1}/{config.train.epochs}: {row['epoch_seconds']:.1f}s (sample "
            f"{times['sample_seconds']:.1f}s, reward {times['reward_seconds']:.1f}s, train "
            f"{times['train_seconds']:.1f}s, load {times['sync_seconds']:.3f}s), CPU {row['cpu_seconds']:.1f}s, "
            f"reward {row['reward_mean']:+.4f}")
    return rows


def summarize(plain: list[dict], actors: dict[int, list[dict]], warmup: int = 1) -> dict:
    """The figures of the benchmark from the per-epoch rows of both sides (pure)."""
    def col(rows, key):
        return after_warmup([r.get(key, float("nan")) for r in rows], warmup)

    p = {k: mean(col(plain, k)) for k in (*PHASES, "epoch_seconds", "cpu_seconds")}
    plain_sum = p["sample_seconds"] + p["reward_seconds"] + p["train_seconds"] + p["sync_seconds"]
    out = {
        "plain": {**p, "epoch_seconds_std": stdev(col(plain, "epoch_seconds")),
                  "sum_of_phases_seconds": plain_sum,
                  "epoch_seconds_each": [r["epoch_seconds"] for r in plain],
                  "cpu_seconds_each": [r.get("cpu_seconds") for r in plain],
                  "reward_mean_each": [r["reward_mean"] for r in plain]},
        "actors": {},
    }
    for workers, rows in sorted(actors.items()):
        a = {k: mean(col(rows, k)) for k in ("epoch_seconds", "sample_seconds", "reward_tail_seconds",
                                            "train_seconds", "sync_seconds", "fetch_seconds")}
        a["epoch_seconds_std"] = stdev(col(rows, "epoch_seconds"))
        # CPU seconds of the whole process tree (driver, Ray's daemons, actors) per epoch, from epoch 1
        a["cpu_seconds"] = mean(v for v in col(rows, "cpu_seconds") if v == v)
        a["cpu_ratio_to_plain"] = ratio(a["cpu_seconds"], p["cpu_seconds"])
        a["cpu_seconds_each"] = [r.get("cpu_seconds") for r in rows]
        a["cpu_window_seconds_each"] = [r.get("between_rows_seconds") for r in rows]
        a["controller_seconds"] = a["epoch_seconds"] - (a["sample_seconds"] + a["reward_tail_seconds"]
                                                        + a["train_seconds"] + a["sync_seconds"])
        a["ratio_to_plain"] = ratio(a["epoch_seconds"], p["epoch_seconds"])
        a["ratio_to_plain_sum_of_phases"] = ratio(a["epoch_seconds"], plain_sum)
        a["reward_hidden_share"] = hidden_share(p["reward_seconds"], a["reward_tail_seconds"])
        a["epoch_seconds_each"] = [r["epoch_seconds"] for r in rows]
        a["reward_mean_each"] = [r["reward_mean"] for r in rows]
        n = min(len(rows), len(plain))
        a["reward_mean_max_abs_diff_to_plain"] = max(
            (abs(rows[i]["reward_mean"] - plain[i]["reward_mean"]) for i in range(n)), default=float("nan"))
        out["actors"][str(workers)] = a
    one = out["actors"].get("1", {})
    out["ray_overhead_ratio"] = one.get("ratio_to_plain", float("nan"))
    out["ray_overhead_cpu_ratio"] = one.get("cpu_ratio_to_plain", float("nan"))
    out["overlap_ratio"] = one.get("ratio_to_plain_sum_of_phases", float("nan"))
    out["reward_hidden_share"] = one.get("reward_hidden_share", float("nan"))
    if "2" in out["actors"] and one:
        out["two_rollout_workers_speedup"] = ratio(one["epoch_seconds"], out["actors"]["2"]["epoch_seconds"])
    return out


def main(quick: bool = False, out_dir: str | Path | None = None) -> dict:
    from bench.common import local_ray

    setup = QUICK if quick else FULL
    out_dir = Path(out_dir or (QUICK_OUT if quick else FULL_OUT))
    start = started()
    actors, walls, loads = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-ray-overhead-") as tmp:
        for workers in setup["workers"]:
            config = make_config(setup["overrides"], setup["epochs"], setup["threads"], workers, tmp)
            log(f"actors, {workers} rollout worker(s): {setup['epochs']} epochs of "
                f"{config.train.samples_per_epoch} samples, model {config.model.path}, reward {config.reward.kind}")
            t, load0 = time.perf_counter(), os.getloadavg()[0]
            with local_ray(num_cpus=2):
                actors[workers] = run_actors(config)
            walls[f"actors_{workers}"], loads[f"actors_{workers}"] = time.perf_counter() - t, [load0, os.getloadavg()[0]]
            if workers == setup["workers"][0]:  # the plain loop right after the 1-worker run
                log("plain single-process loop, same work")
                t, load0 = time.perf_counter(), os.getloadavg()[0]
                plain = run_plain(make_config(setup["overrides"], setup["epochs"], setup["threads"], 1, tmp))
                walls["plain"], loads["plain"] = time.perf_counter() - t, [load0, os.getloadavg()[0]]
    result = summarize(plain, actors)
    config = make_config(setup["overrides"], setup["epochs"], setup["threads"])
    result["setup"] = {
        "quick": quick, "model": config.model.path, "family": model_family(config.model.path),
        "finetune": config.model.finetune, "reward": config.reward.kind, "reconstructor": config.reward.reconstructor,
        "alignment": config.reward.alignment, "samples_per_epoch": config.train.samples_per_epoch,
        "batch_size": config.rollout.batch_size, "sampling_steps": config.sampling.num_steps,
        "epochs": setup["epochs"], "warmup_epochs_excluded": 1, "torch_threads": setup["threads"],
        "ray_num_cpus": 2, "rollout_workers": setup["workers"],
    }
    result["phase_wall_seconds"] = walls
    result["load_average_before_after"] = loads
    stamp(result, start)
    path = write_json(out_dir / "ray_overhead.json", result)
    print(report(result), flush=True)
    log(f"wrote {path} ({result['wall_seconds']:.0f} s)")
    return result


def report(r: dict) -> str:
    p = r["plain"]
    lines = [f"plain loop: {p['epoch_seconds']:.2f} s/epoch (sample {p['sample_seconds']:.2f}, reward "
             f"{p['reward_seconds']:.2f}, train {p['train_seconds']:.2f}, load weights {p['sync_seconds']:.3f}; "
             f"CPU {p['cpu_seconds']:.1f}s)"]
    for workers, a in r["actors"].items():
        lines.append(f"actors, {workers} rollout: {a['epoch_seconds']:.2f} s/epoch (sample {a['sample_seconds']:.2f}, "
                     f"reward tail {a['reward_tail_seconds']:.2f}, train {a['train_seconds']:.2f}, sync "
                     f"{a['sync_seconds']:.3f}, controller {a['controller_seconds']:.3f}; CPU {a['cpu_seconds']:.1f}s "
                     f"= {a['cpu_ratio_to_plain']:.3f} x plain) -> ratio to plain "
                     f"{a['ratio_to_plain']:.3f}, to plain sum of phases {a['ratio_to_plain_sum_of_phases']:.3f}, "
                     f"reward hidden {a['reward_hidden_share']:.0%}, max |reward diff| "
                     f"{a['reward_mean_max_abs_diff_to_plain']:.2e}")
    lines.append(f"ray_overhead_ratio (1 rollout worker) = {r['ray_overhead_ratio']:.3f} (target <= 1.10)")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, brightness reward, 2 epochs")
    parser.add_argument("--out", default=None, help="folder for ray_overhead.json")
    args = parser.parse_args()
    main(args.quick, args.out)
