"""Is the policy gradient informative at this batch size?  ``python -m experiments.gradient_probe``

One prompt, a fixed set of seeds.  Take ``--steps`` DDPO-SF updates (the project's
Trainer, group-normalised advantages, no KL term) that *lower* MRC, and the same
number from the same start that *raise* it, re-sampling the same seeds after every
update.  If the gradient carried no information both runs would move alike: the
gap between them is the signal, their common trend the drift that a noisy update
causes on its own.  Prints and writes one JSON line per step.

    python -m experiments.gradient_probe --samples 16 --steps 6 --lr 3e-3
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from learner.config import load_config
from learner.trainer import EpochSamples, Trainer
from policy.pipeline import load_policy
from reward_service.rewards import MRCReward


def probe(direction: int, args, config) -> list[float]:
    """MRC after each of ``args.steps`` updates towards ``direction * -MRC``."""
    torch.manual_seed(0)
    policy = load_policy(config.model)
    trainer = Trainer(policy, config.train, config.sampling, seed=0)
    reward = MRCReward(config.reward.reconstructor)
    prompts, seeds = [args.prompt] * args.samples, list(range(100, 100 + args.samples))
    curve = []
    for step in range(args.steps + 1):
        trajectory = policy.sample(prompts, seeds, config.sampling)
        mrc = reward(trajectory.images, prompts).mrc
        curve.append(float(mrc.mean()))
        if step == args.steps:
            break
        rewards = -direction * mrc
        samples = EpochSamples([str(i) for i in range(args.samples)], trajectory.prompts, trajectory.latents,
                               trajectory.timesteps, trajectory.log_probs, trajectory.ref_log_probs,
                               rewards.astype(np.float64), None, 0)
        trainer.update(samples, (rewards - rewards.mean()) / (rewards.std() + 1e-6))
    return curve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="a large green cube")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="config overrides (model.finetune=full, sampling.eta=...)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config([f"train.learning_rate={args.lr}", *args.overrides])
    start = time.perf_counter()
    lower, higher = probe(+1, args, config), probe(-1, args, config)
    for step, (a, b) in enumerate(zip(lower, higher)):
        print(json.dumps({"update": step, "mrc_when_lowering": round(a, 6), "mrc_when_raising": round(b, 6)}))
    drift = (lower[-1] - lower[0] + higher[-1] - higher[0]) / 2
    print(f"after {args.steps} updates of {args.samples} samples (lr {args.lr}): lowering moved MRC "
          f"{lower[-1] - lower[0]:+.5f}, raising {higher[-1] - higher[0]:+.5f}; signal (half the gap) "
          f"{(higher[-1] - lower[-1]) / 2:.5f}, common drift {drift:+.5f} ({time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
