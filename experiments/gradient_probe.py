"""Is the policy gradient informative at this batch size?  ``python -m experiments.gradient_probe``

One prompt, a fixed set of seeds.  Take ``--steps`` DDPO-SF updates (the project's
Trainer, group-normalised advantages, no KL term) that *lower* MRC, and the same
number from the same start that *raise* it, re-sampling the same seeds after every
update.  If the gradient carried no information both runs would move alike: the
gap between them is the signal, their common trend the drift that a noisy update
causes on its own.  Prints and writes one JSON line per step.

    python -m experiments.gradient_probe --samples 16 --steps 6 --lr 3e-3

``--noise-scale`` measures the same question without updating: the gradient noise
scale B = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training"), the batch size at which the batch gradient's signal and noise are equal.
It samples one epoch as a run does (``plan_epoch``, the rollout and reward workers with
the driver's arguments, the Trainer's advantages), takes each sample's DDPO-SF gradient
over all its steps, and estimates |G|^2 and tr(Sigma) without bias from their Gram matrix.
A batch of n samples has signal-to-noise n / B.

    python -m experiments.gradient_probe --noise-scale --samples 64 --group 8
    python -m experiments.gradient_probe --noise-scale reward.kind=brightness reward.alignment=null
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
from plugins import load_plugins
from reward_service.rewards import MRCReward


def probe(direction: int, args, config) -> list[float]:
    """MRC after each of ``args.steps`` updates towards ``direction * -MRC``."""
    torch.manual_seed(0)
    policy = load_policy(config.model)
    trainer = Trainer(policy, config.train, config.sampling, seed=0)
    load_plugins(config.run.plugins)
    reward = MRCReward(**config.reward.mrc_options())
    prompts, seeds = [args.prompt] * args.samples, list(range(100, 100 + args.samples))
    curve = []
    for step in range(args.steps + 1):
        trajectory = policy.sample(prompts, seeds, config.sampling)
        mrc = reward(trajectory.views, trajectory.cameras, prompts).mrc
        curve.append(float(mrc.mean()))
        if step == args.steps:
            break
        rewards = -direction * mrc
        samples = EpochSamples.of([str(i) for i in range(args.samples)], trajectory, rewards.astype(np.float64))
        trainer.update(samples, (rewards - rewards.mean()) / (rewards.std() + 1e-6))
    return curve


def per_step_gradients(trainer: Trainer, samples: EpochSamples, advantages: np.ndarray) -> torch.Tensor:
    """(N, T, P) float32: entry [i, j] is the gradient of sample i's step-j term of the epoch loss
    times N (every step, trained or not), so that the batch gradient the Trainer steps on is the
    mean over rows of the sum over its trained steps."""
    policy, steps = trainer.policy, len(samples.timesteps)
    params = list(policy.trainable_parameters())
    adv = torch.as_tensor(advantages, dtype=torch.float32, device=policy.device)
    trained = len(trainer.trained_steps(samples.timesteps))
    size = len(samples.sample_ids) * steps * sum(p.numel() for p in params) * 4
    if size > 4e9:
        raise ValueError(f"the per-step gradients would take {size / 1e9:.1f} GB; use LoRA or fewer --samples")
    policy.scheduler.set_timesteps(steps)
    rows = []
    for i in range(len(samples.sample_ids)):
        row = torch.tensor([i])
        embeds = policy.encode_prompts([samples.prompts[i]])
        negative = policy.negative_embeds(embeds, trainer.sampling.negative_prompt)
        per_step = []
        for j in range(steps):
            loss, _ = trainer.transition_loss(samples, row, torch.tensor([j]), embeds, negative, adv[row])
            per_step.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss / trained, params)]).cpu())
        rows.append(torch.stack(per_step))
    return torch.stack(rows)


def noise_scale_from_gram(gram: np.ndarray) -> dict:
    """Unbiased |G|^2 (mean off-diagonal inner product) and tr(Sigma) (sample variance)
    from the Gram matrix of N i.i.d. per-sample gradients; B = tr(Sigma) / |G|^2."""
    n = len(gram)
    total, diagonal = gram.sum(), np.trace(gram)
    signal = (total - diagonal) / (n * (n - 1))
    noise = (diagonal - total / n) / (n - 1)
    return {"signal": float(signal), "noise": float(noise),
            "noise_scale": float(noise / signal) if signal > 0 else float("inf")}


def noise_scale_with_se(gradients: torch.Tensor) -> dict:
    """B of per-sample gradients (N, P), with the jackknife's standard error of the signal."""
    gram = (gradients @ gradients.T).numpy()
    out = noise_scale_from_gram(gram)
    n = len(gram)
    loo = [noise_scale_from_gram(np.delete(np.delete(gram, i, 0), i, 1))["signal"] for i in range(n)]
    out["signal_se"] = float(np.sqrt((n - 1) / n * np.sum((np.array(loo) - np.mean(loo)) ** 2)))
    return out


def noise_scale(config) -> dict:
    """B from each sample's gradient of epoch 0 of ``config`` (its samples_per_epoch and group_size)."""
    from learner.in_process import InProcessRoles

    roles = InProcessRoles(config)
    samples = roles.sample_epoch(0, progress=lambda done, total: print(
        f"sampled and scored {done}/{total}", file=sys.stderr))
    trainer = roles.trainer
    advantages = trainer.advantages(samples)
    per_step = per_step_gradients(trainer, samples, advantages)
    steps = trainer.trained_steps(samples.timesteps)
    gradients = per_step[:, steps].double().sum(1)
    n = len(gradients)
    out = noise_scale_with_se(gradients)
    out["trained_steps"] = steps.tolist()
    # Where the noise and the signal sit: B of the gradient summed over the first k steps, every k.
    out["first_k_steps"] = [dict(k=k, **noise_scale_with_se(per_step[:, :k].double().sum(1)))
                            for k in range(1, per_step.shape[1] + 1)]
    # Two halves of the batch (every group split in two): how well do their gradients agree?
    half = np.arange(n) % 2 == 0
    a, b = gradients[torch.as_tensor(half)].mean(0), gradients[torch.as_tensor(~half)].mean(0)
    out["half_batch_cosine"] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    out.update(samples=n, group=config.train.group_size, reward=config.reward.kind,
               parameters=int(gradients.shape[1]), reward_std=float(np.std(samples.rewards)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="a large green cube")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--noise-scale", action="store_true", help="measure the gradient noise scale instead")
    parser.add_argument("--group", type=int, default=8, help="--noise-scale: samples per prompt")
    parser.add_argument("overrides", nargs="*", help="config overrides (model.finetune=full, sampling.eta=...)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.noise_scale:
        # Seed 0 for the LoRA initialisation and the epoch's plan, as the measurement in docs/minicarve.md.
        out = noise_scale(load_config([f"train.samples_per_epoch={args.samples}", f"train.group_size={args.group}",
                                       f"train.torch_threads={args.threads}", "run.seed=0", *args.overrides]))
        print(json.dumps(out))
        print(f"{out['reward']}: gradient noise scale B = {out['noise_scale']:.3g} samples "
              f"(|G|^2 {out['signal']:.3g} ± {out['signal_se']:.2g}, tr Sigma {out['noise']:.3g}; "
              f"{out['samples']} samples in groups of {out['group']}); a batch of {out['samples']} has "
              f"signal/noise {out['samples'] / out['noise_scale']:.2g}; the two half-batches' gradients "
              f"have cosine {out['half_batch_cosine']:.3f}; trained steps {out['trained_steps']} "
              f"({time.perf_counter() - start:.0f}s)")
        for row in out["first_k_steps"]:
            print(f"  first {row['k']:2d} steps: B = {row['noise_scale']:.3g} (|G|^2 {row['signal']:.3g} "
                  f"± {row['signal_se']:.2g}, tr Sigma {row['noise']:.3g})")
        return 0
    config = load_config([f"train.learning_rate={args.lr}", *args.overrides])
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
