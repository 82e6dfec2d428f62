"""Prompt curation (Carve3D Sec. 4): train on the prompts the base model is worst at.

    python -m experiments.curate [--candidates 100 --keep 30 --samples 4]

Carve3D generated ~100 prompts and kept the 30 with the lowest reward (the highest
MRC) under the base model.  Here the candidates are the first ``--candidates``
distinct prompts of MiniCarve's train split (never a test prompt); each is sampled
``--samples`` times with the base model and scored by MRC (the reward's LRM).
Writes the curated set, the random set of equal size it is compared with (the first
``--keep`` candidates, i.e. ``data/minicarve/train_prompts.txt`` for 30), and every
candidate's mean MRC:

    data/minicarve/curated_prompts.txt
    data/minicarve/random_prompts.txt
    data/minicarve/curation_scores.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from learner.config import load_config
from learner.evaluate import eval_specs, sample_views, score_views
from plugins import load_plugins
from minicarve.dataset import PROMPT_DIR, split


def candidate_prompts(count: int) -> list[str]:
    """The first ``count`` distinct prompts of the train split, in split order (random order)."""
    prompts = list(dict.fromkeys(scene.prompt for scene in split()[0]))
    if count > len(prompts):
        raise SystemExit(f"--candidates {count}: the train split has only {len(prompts)} distinct prompts")
    return prompts[:count]


def curate(prompts: list[str], mrc_per_prompt: np.ndarray, keep: int) -> list[str]:
    """The ``keep`` prompts with the highest mean MRC (lowest reward), highest first."""
    order = np.argsort(-mrc_per_prompt, kind="stable")
    return [prompts[i] for i in order[:keep]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--keep", type=int, default=30)
    parser.add_argument("--samples", type=int, default=4, help="samples per candidate prompt")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=PROMPT_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="config overrides (model.path=..., sampling.*)")
    args = parser.parse_args(argv)
    if not 1 <= args.keep <= args.candidates:
        raise SystemExit(f"--keep must be between 1 and --candidates ({args.candidates}), got {args.keep}")
    torch.set_num_threads(args.threads)
    config = load_config(args.overrides)
    load_plugins(config.run.plugins)
    start = time.perf_counter()
    prompts = candidate_prompts(args.candidates)
    specs = eval_specs(prompts, args.samples, args.seed)
    print(f"sampling {len(specs)} samples ({len(prompts)} candidates x {args.samples}) with {config.model.path}",
          flush=True)
    views, cameras = sample_views(config.model.path, specs, config.sampling, model=config.model)
    mrc, _, _, _ = score_views(views, cameras, [s.prompt for s in specs], config.reward, alignment=None)
    per_prompt = np.array([mrc[[s.prompt == p for s in specs]].mean() for p in prompts])
    curated, random = curate(prompts, per_prompt, args.keep), prompts[:args.keep]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curated_prompts.txt").write_text("\n".join(curated) + "\n")
    (args.out / "random_prompts.txt").write_text("\n".join(random) + "\n")
    scores = {
        "model": config.model.path, "samples_per_prompt": args.samples, "seed": args.seed,
        "mean_mrc": {"curated": float(np.mean([per_prompt[prompts.index(p)] for p in curated])),
                     "random": float(per_prompt[:args.keep].mean()), "all": float(per_prompt.mean())},
        "seconds": round(time.perf_counter() - start, 1),
        "candidates": {p: float(m) for p, m in zip(prompts, per_prompt)},
    }
    (args.out / "curation_scores.json").write_text(json.dumps(scores, indent=2))
    print(f"curated {args.keep} of {len(prompts)}: mean base MRC {scores['mean_mrc']['curated']:.4f} vs "
          f"{scores['mean_mrc']['random']:.4f} for the random {args.keep} ({scores['seconds']:.0f}s) -> "
          f"{args.out}/curated_prompts.txt", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
