"""Whole-loop throughput of MiniCarve v2 (latent) against v1 (pixel), side by side in one run.

    python -m bench.world_throughput [--epochs 3] [--rounds 1] [--quick]

Each world runs the default main job's loop through the real actors (``learner.driver.run``:
rollout, reward and learner actors, the default sampling, MRC through the LRM, alignment,
LoRA updates and weight syncs), with only the base model changed: v1 is the pixel-grid
``minicarve/weights/v1-sft-short`` (kept for this comparison), v2 the default, the latent
sd-grid ``minicarve/weights/sft-short`` (``--v1``/``--v2`` to point elsewhere).  The worlds
alternate (v1, v2, v1, v2, ... for ``--rounds``), so load changes on the machine hit both
alike; the first epoch of every run is a warm-up and is left out.  Reports whole-loop
samples/s (samples / epoch_seconds), the per-phase seconds per sample, and the ratio v2 / v1.
Writes docs/results/performance/world_throughput.json (``--out`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.common import FULL_OUT, QUICK_OUT, local_ray, log, machine_info, median, ratio, stamp, started, write_json

V1 = "minicarve/weights/v1-sft-short"
V2 = "minicarve/weights/sft-short"
PHASES = ("sample_seconds", "reward_tail_seconds", "train_seconds", "sync_seconds", "epoch_seconds")


def main(argv=None, quick: bool | None = None, out_dir: Path | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="how many times each world runs, alternating")
    parser.add_argument("--quick", action="store_true", help="2 epochs of 8 samples (a smoke test)")
    parser.add_argument("--v1", default=V1, help="the pixel-space base model (default %(default)s)")
    parser.add_argument("--v2", default=V2, help="the latent base model (default %(default)s)")
    parser.add_argument("--out", type=Path, help="the JSON to write (default: docs/results/performance/"
                        "world_throughput.json, or under runs/ with --quick)")
    parser.add_argument("--v1-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for v1 only (e.g. rollout.torch_threads=2: v1 at its own best)")
    parser.add_argument("overrides", nargs="*", help="config overrides for both worlds")
    args = parser.parse_args(argv if argv is not None else ([] if quick is not None else None))
    quick = args.quick if quick is None else quick
    out = args.out or (out_dir or (QUICK_OUT if quick else FULL_OUT)) / "world_throughput.json"

    import pandas as pd

    from learner.config import load_config
    from learner.driver import run

    size = ["train.epochs=2", "train.samples_per_epoch=8", "eval.prompts_file=null"] if quick else \
        [f"train.epochs={args.epochs}", "eval.prompts_file=null"]
    worlds = {"v1": args.v1, "v2": args.v2}
    rows: dict[str, list[dict]] = {name: [] for name in worlds}
    start = started()
    with local_ray(num_cpus=2), tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for name, model in worlds.items():
                own = args.v1_override if name == "v1" else []
                config = load_config([f"model.path={model}", *size, *args.overrides, *own, "run.name=bench-world",
                                      f"run.dir={Path(scratch) / f'{name}-{round_index}'}"])
                log(f"round {round_index + 1}/{args.rounds}: {name} ({model}), {config.train.epochs} epochs of "
                    f"{config.train.samples_per_epoch} samples")
                run_dir = run(config)
                epochs = pd.read_parquet(run_dir.path / "metrics.parquet").to_dict("records")
                rows[name] += [{**row, "samples": config.train.samples_per_epoch} for row in epochs[1:]]
    result: dict = {"machine": machine_info(), "command": "python -m bench.world_throughput " + " ".join(
        argv if argv is not None else sys.argv[1:]), "worlds": worlds, "v1_overrides": args.v1_override,
        "epochs_measured": {}}
    for name, epochs in rows.items():
        result["epochs_measured"][name] = len(epochs)
        per_sample = {phase: median([row[phase] / row["samples"] for row in epochs]) for phase in PHASES}
        result[name] = {"samples_per_second": 1.0 / per_sample["epoch_seconds"],
                        "seconds_per_sample": per_sample}
        log(f"{name}: {result[name]['samples_per_second']:.2f} samples/s; per sample " +
            ", ".join(f"{phase.removesuffix('_seconds')} {value:.3f}s" for phase, value in per_sample.items()))
    result["throughput_ratio_v2_vs_v1"] = ratio(result["v2"]["samples_per_second"], result["v1"]["samples_per_second"])
    log(f"v2 / v1 whole-loop samples/s: {result['throughput_ratio_v2_vs_v1']:.2f}x; wrote {out}")
    write_json(out, stamp(result, start))
    return result


if __name__ == "__main__":
    main()
