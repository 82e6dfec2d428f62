"""Behaviour fingerprint: per-epoch figures of fixed-seed runs, to show a refactoring changes nothing.

Runs (the configs of ``python -m learner.main``; in this process by default, ``--ray`` through the
driver and its actors):

- ``default``: the default config (MRC) on v1's MiniCarve sft-short, the baseline's model, for 2
  epochs, no held-out evaluation;
- one short run of every algorithm on ``builtin:tiny`` (2 epochs of 4 samples, 2 DDIM steps),
  with the rewards the per-algorithm tests use.

and collects every epoch's reward mean, KL, loss and grad norm (and a few algorithm figures)
of the learner's epoch metrics (``--ray``: each run's ``metrics.parquet``) into one JSON.  ``--compare A.json B.json`` prints the
largest difference per figure and exits 1 if any differs by more than ``--tolerance``.

    python -m bench.behaviour_fingerprint --out docs/results/behaviour_baseline.json
    python -m bench.behaviour_fingerprint --compare docs/results/behaviour_baseline.json \
        docs/results/behaviour_after.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FIGURES = ("reward_mean", "kl_mean", "loss", "grad_norm", "mrc_mean", "advantage_mean", "advantage_abs_mean",
           "logprob_recompute_gap", "zmv_reward_mean", "multiplier", "constraint_threshold")

TINY = ["model.path=builtin:tiny", "sampling.num_steps=2", "prompts.limit=2", "rollout.batch_size=4",
        "train.samples_per_epoch=4", "train.epochs=2", "eval.prompts_file=null", "run.samples_to_save=0",
        "run.seed=0"]

# Defaults changed on purpose since the baseline (commit 8519801), each measured in docs/minicarve.md:
# the default now trains only the noisy DDIM steps (train.min_relative_step_sigma) and the default run
# is sized to learn (5 x 64 samples, groups of 8, lr 1e-2).  The check of the refactoring pins the
# baseline's values (first, so that a run's own overrides win).
BASELINE_DEFAULTS = ["train.min_relative_step_sigma=0", "train.samples_per_epoch=32", "train.group_size=1",
                     "train.learning_rate=3e-4"]

RUNS = {
    # the baseline's default model: v1's pixel-space sft-short (the default is v2's latent one since)
    "default": ["model.path=minicarve/weights/v1-sft-short", "train.epochs=2", "eval.at_start=false",
                "eval.at_end=false", "run.seed=0"],
    "tiny/ddpo-sf": TINY + ["algorithm=ddpo-sf", "reward.kind=brightness", "reward.alignment=null"],
    "tiny/ddpo-is": TINY + ["algorithm=ddpo-is", "reward.kind=brightness", "reward.alignment=null",
                            "train.num_minibatches=2", "train.clip_range=0.2"],
    "tiny/mv-zigal": TINY + ["algorithm=mv-zigal", "reward.kind=brightness", "reward.alignment=null"],
    "tiny/mvc-zigal": TINY + ["algorithm=mvc-zigal", "reward.kind=mrc", "reward.reconstructor=lrm",
                              "reward.alignment=tests.test_other_algorithms:first_pixel_alignment"],
    "tiny/nabla-gfn": TINY + ["algorithm=nabla-gfn", "reward.kind=mrc", "reward.reconstructor=lrm",
                              "reward.alignment=null"],
}


def _clean(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else repr(value)  # JSON has no NaN


def fingerprint(run_dir: Path) -> list[dict]:
    import pandas as pd

    frame = pd.read_parquet(run_dir / "metrics.parquet")
    return [{"epoch": int(row["epoch"]), **{k: _clean(row[k]) for k in FIGURES if k in frame and row[k] is not None}}
            for _, row in frame.iterrows()]


def run_in_process(overrides: list[str]) -> list[dict]:
    """The run's epochs with its rollout, reward and learner classes in this process, built as the
    driver builds its actors (``learner.in_process``), each epoch sampled in the driver's batch
    order and trained by ``Learner.train`` (with ``ray.get`` of plain objects the objects)."""
    import types

    import learner.actor as learner_actor
    from learner.config import load_config
    from learner.driver import plan_epoch
    from learner.in_process import InProcessRoles

    config = load_config(overrides)
    learner_actor.ray = types.SimpleNamespace(get=lambda objects: objects)  # Learner.train fetches refs
    roles = InProcessRoles(config)
    train, size, rows = config.train, config.rollout.batch_size, []
    for epoch in range(train.epochs):
        specs = plan_epoch(config.run.seed, epoch, roles.prompts, train.samples_per_epoch, train.group_size)
        batches, results = [], []
        for index in range(0, len(specs), size):
            batch, images, _ = roles.rollout.sample(specs[index:index + size], epoch, index // size)
            batches.append(batch)
            results.append(roles.reward.score(images)[0])
        rows.append(roles.learner.train(epoch, batches, results, num_previews=0))
        roles.publish()
    return [{"epoch": int(m["epoch"]), **{k: _clean(m[k]) for k in FIGURES if k in m}} for m in rows]


def run_all(names: list[str], base: Path, use_ray: bool) -> dict:
    """``use_ray``: each run through the driver and its actors on one embedded Ray (as the tests
    run them), read back from metrics.parquet; otherwise in this process (``run_in_process``),
    which needs no Ray (Ray's start times out on a machine whose CPUs another job holds)."""
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                             if p and p != str(ROOT)]])
    out = {}
    if use_ray:
        import ray

        from learner.config import load_config
        from learner.driver import run

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for name in names:
            start = time.perf_counter()
            if use_ray:
                run_dir = base / name.replace("/", "-")
                run(load_config([*BASELINE_DEFAULTS, *RUNS[name], f"run.dir={run_dir}"]))
                epochs = fingerprint(run_dir)
            else:
                epochs = run_in_process(BASELINE_DEFAULTS + RUNS[name])
            out[name] = {"overrides": RUNS[name], "epochs": epochs}
            print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    finally:
        if use_ray:
            ray.shutdown()
    return out


def compare(a: dict, b: dict, tolerance: float) -> int:
    worst = 0.0
    for name in a["runs"]:
        for ea, eb in zip(a["runs"][name]["epochs"], b["runs"][name]["epochs"], strict=True):
            for key in sorted(set(ea) | set(eb)):
                va, vb = ea.get(key), eb.get(key)
                if isinstance(va, float) and isinstance(vb, float):
                    diff = abs(va - vb)
                    worst = max(worst, diff)
                    status = "identical" if va == vb else f"differs by {diff:.3g}"
                else:
                    status = "identical" if va == vb else f"differs: {va!r} vs {vb!r}"
                    worst = worst if va == vb else math.inf
                if va != vb or key in ("reward_mean", "kl_mean", "loss", "grad_norm"):
                    print(f"{name} epoch {ea['epoch']} {key}: {status}")
    print(f"largest difference: {worst:.3g}")
    return 0 if worst <= tolerance else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--compare", nargs=2, type=Path)
    parser.add_argument("--tolerance", type=float, default=0.0)
    parser.add_argument("--ray", action="store_true", help="through the driver and Ray actors (default: in process)")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*(json.loads(p.read_text()) for p in args.compare), args.tolerance)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="fingerprint-") as tmp:
        runs = run_all(args.runs, Path(tmp), args.ray)
    result = {"commit": commit, "mode": "ray" if args.ray else "in-process", "figures": list(FIGURES), "runs": runs}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
