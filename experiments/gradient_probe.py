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
A batch of n samples has signal-to-noise n / B.  ``--parts K`` pools epochs 0..K-1 (the
policy is never updated), and ``--parts-dir`` keeps each epoch's gradients so that the same
command, run again, only probes the epochs still missing.  Several processes started with the
same ``--parts-dir`` share its parts out (each claims a part before probing it) and each ends
with the pooled estimate: two one-thread probes use two cores better than one two-thread probe.

    python -m experiments.gradient_probe --noise-scale --samples 64 --group 8
    python -m experiments.gradient_probe --noise-scale --samples 512 --parts 4 --parts-dir runs/probe/v2
    python -m experiments.gradient_probe --noise-scale reward.kind=brightness reward.alignment=null
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

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


def _gram_statistics(n, total, diagonal) -> dict:
    """Unbiased |G|^2 (mean off-diagonal inner product) and tr(Sigma) (sample variance) of n
    i.i.d. per-sample gradients, from their Gram matrix's sum and trace (arrays broadcast)."""
    signal = (total - diagonal) / (n * (n - 1))
    noise = (diagonal - total / n) / (n - 1)
    return {"signal": signal, "noise": noise}


def noise_scale_from_gram(gram: np.ndarray) -> dict:
    """|G|^2 and tr(Sigma) from the Gram matrix of N i.i.d. per-sample gradients; B = tr(Sigma) / |G|^2."""
    out = {k: float(v) for k, v in _gram_statistics(len(gram), gram.sum(), np.trace(gram)).items()}
    out["noise_scale"] = out["noise"] / out["signal"] if out["signal"] > 0 else float("inf")
    return out


def noise_scale_with_se(gradients: torch.Tensor, group: int = 1) -> dict:
    """B of per-sample gradients (N, P) that come in consecutive groups of ``group`` samples.

    The members of an advantage group are not independent (their advantages are normalised
    against each other), so each group's mean gradient is one independent draw: the Gram-matrix
    estimates run on the group means, and B in samples is ``group`` times theirs (a batch of m
    groups has noise tr(Sigma_group) / m, which is ``group`` * tr(Sigma_group) / n for n samples).
    The standard errors of |G|^2 and of B are the leave-one-group-out jackknife's."""
    n = len(gradients)
    if n % group:
        raise ValueError(f"{n} gradients do not split into groups of {group}")
    return noise_scale_of_group_means(gradients.reshape(n // group, group, -1).mean(1), group)


def noise_scale_of_group_means(means: torch.Tensor, group: int) -> dict:
    """:func:`noise_scale_with_se` from the groups' mean gradients (m, P) directly."""
    gram = (means.double() @ means.double().T).numpy()
    m = len(gram)
    out = noise_scale_from_gram(gram)
    out["noise"] *= group
    out["noise_scale"] *= group
    # Leaving draw i out removes its row and column: the sum loses 2 * rowsum_i - g_ii and the
    # trace g_ii, so all m leave-one-out estimates cost one pass over the Gram matrix.
    own = np.diag(gram)
    loo = _gram_statistics(m - 1, gram.sum() - 2 * gram.sum(1) + own, np.trace(gram) - own)
    scales = group * loo["noise"] / np.where(loo["signal"] > 0, loo["signal"], np.nan)

    def jackknife_se(values: np.ndarray) -> float:
        return float(np.sqrt((m - 1) / m * np.sum((values - values.mean()) ** 2)))

    out["signal_se"] = jackknife_se(loo["signal"])
    out["noise_scale_se"] = jackknife_se(scales) if np.all(np.isfinite(scales)) else float("inf")
    out["independent_draws"] = m
    return out


def probe_part(roles, epoch: int) -> dict:
    """One epoch's gradients, reduced to what the estimates need: each sample's gradient summed
    over the trained steps (N, P) and each advantage group's mean gradient at every step (m, T, P).
    The stat trackers start empty, so every part is normalised as a run's first epoch is."""
    trainer = roles.trainer
    trainer.reward_tracker.buffers.clear()
    trainer.kl_tracker.buffers.clear()
    samples = roles.sample_epoch(epoch, progress=lambda done, total: print(
        f"part {epoch}: sampled and scored {done}/{total}", file=sys.stderr))
    advantages = trainer.advantages(samples)
    per_step = per_step_gradients(trainer, samples, advantages)
    steps = trainer.trained_steps(samples.timesteps)
    n, group = len(per_step), trainer.cfg.group_size
    return {"gradients": per_step[:, steps].sum(1), "trained_steps": steps.tolist(),
            "group_means_per_step": per_step.reshape(n // group, group, *per_step.shape[1:]).mean(1),
            "prompts": list(samples.prompts), "rewards": np.asarray(samples.rewards), "group": group}


def probe_key(config) -> dict:
    """What a part's gradients depend on (the threads and CPUs they ran on aside): parts probed
    under different keys are not pooled."""
    sections = {name: dataclasses.asdict(getattr(config, name)) for name in ("model", "sampling", "reward", "prompts")}
    sections["train"] = {k: v for k, v in dataclasses.asdict(config.train).items()
                         if k not in ("torch_threads", "num_cpus", "num_gpus", "timeout_s")}
    sections["seed"] = config.run.seed
    return json.loads(json.dumps(sections, default=str))


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for name, value in tree.items():
        out.update(_flat(value, f"{prefix}{name}.") if isinstance(value, dict) else {prefix + name: value})
    return out



def _claim(path: Path) -> bool:
    """Claim ``path``'s part for this process (``part<k>.claim`` holding its pid), so that several
    probes started with the same ``--parts-dir`` share the parts out.  A claim whose process is
    gone (killed) is taken over."""
    claim = path.with_suffix(".claim")
    mine = path.with_suffix(f".claim-{os.getpid()}")
    mine.write_text(str(os.getpid()))
    try:
        while True:
            try:
                os.link(mine, claim)  # atomic: fails if the claim exists, and it is never seen empty
                return True
            except FileExistsError:
                pid = _claimant(path)
                if pid is not None and pid != os.getpid() and _alive(pid):
                    return False
                if pid == os.getpid():
                    return True
                claim.unlink(missing_ok=True)  # stale: its process died before writing the part
    finally:
        mine.unlink(missing_ok=True)


def _claimant(path: Path) -> int | None:
    try:
        return int(path.with_suffix(".claim").read_text() or 0) or None
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release(path: Path) -> None:
    path.with_suffix(".claim").unlink(missing_ok=True)


def noise_scale(config, parts: int = 1, parts_dir: Path | None = None) -> dict:
    """B from each sample's gradient over ``parts`` epochs of ``config`` (its samples_per_epoch and
    group_size), the policy never updated.  With ``parts_dir`` each epoch's gradients are kept
    there as ``part<k>.pt`` and a later call with the same settings reuses them, so a probe too
    long for one sitting (or for memory) can be taken an epoch at a time."""
    from learner.in_process import InProcessRoles

    key = probe_key(config)
    roles, loaded, waiting = None, {}, []

    def load(k: int, path: Path) -> dict:
        part = torch.load(path, weights_only=False)
        if part["key"] != key:
            old, new = _flat(part["key"]), _flat(key)
            changed = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
            raise ValueError(f"{path} was probed with other settings ({', '.join(changed)}); "
                             "use another --parts-dir, or the settings it was probed with")
        print(f"part {k}: reusing {path}", file=sys.stderr)
        return part

    def probe(k: int, path: Path | None) -> dict:
        nonlocal roles
        roles = roles or InProcessRoles(config)
        part = dict(probe_part(roles, k), key=key)
        if path is not None:
            torch.save(part, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)  # a killed probe leaves no half-written part
            _release(path)
        return part

    if parts_dir is not None:
        parts_dir.mkdir(parents=True, exist_ok=True)
    for k in range(parts):
        path = parts_dir / f"part{k}.pt" if parts_dir is not None else None
        if path is not None and path.is_file():
            loaded[k] = load(k, path)
        elif path is not None and not _claim(path):
            waiting.append(k)  # another process on this machine is probing it
            print(f"part {k}: being probed by process {_claimant(path)}; taking the next", file=sys.stderr)
        else:
            loaded[k] = probe(k, path)
    for k in waiting:  # pool the other processes' parts once they are written
        path = parts_dir / f"part{k}.pt"
        while not path.is_file() and not _claim(path):
            time.sleep(5)
        if path.is_file():
            loaded[k] = load(k, path)
            _release(path)  # claimed just as the other process wrote it and let go
        else:
            loaded[k] = probe(k, path)
    loaded = [loaded[k] for k in range(parts)]
    gradients = torch.cat([p["gradients"] for p in loaded]).double()
    group_means = torch.cat([p["group_means_per_step"] for p in loaded]).double()
    rewards = np.concatenate([p["rewards"] for p in loaded])
    n, group = len(gradients), config.train.group_size
    out = noise_scale_with_se(gradients, group)
    out["trained_steps"] = loaded[0]["trained_steps"]
    # The same estimate treating every sample as an independent draw (the previous estimator,
    # which counts the within-group pairs as signal), and how heavy-tailed the gradients are.
    out["per_sample"] = noise_scale_with_se(gradients)
    # B in the coordinates Adam steps in: every parameter divided by its gradient's RMS over the
    # batch (Adam's second moment, without momentum), so that a few noisy parameters do not
    # dominate tr(Sigma) the way they do in the raw gradient.
    out["adam_preconditioned"] = noise_scale_with_se(gradients / gradients.pow(2).mean(0).sqrt().clamp_min(1e-30),
                                                     group)
    norms = gradients.norm(dim=1).numpy()
    out["gradient_norm_quantiles"] = dict(zip(("min", "median", "p90", "p99", "max"),
                                              np.quantile(norms, [0, 0.5, 0.9, 0.99, 1]).tolist()))
    # Where the noise and the signal sit: B of the gradient summed over the first k steps, every k.
    out["first_k_steps"] = [dict(k=k, **noise_scale_of_group_means(group_means[:, :k].sum(1), group))
                            for k in range(1, group_means.shape[1] + 1)]
    # Two halves of the batch (every group split in two): how well do their gradients agree?
    half = torch.as_tensor(np.arange(n) % 2 == 0)
    a, b = gradients[half].mean(0), gradients[~half].mean(0)
    out["half_batch_cosine"] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    out.update(samples=n, parts=parts, group=group, reward=config.reward.kind, model=str(config.model.path),
               parameters=int(gradients.shape[1]), reward_std=float(np.std(rewards)))
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
    parser.add_argument("--out", type=Path, help="--noise-scale: also write the result to this JSON file")
    parser.add_argument("--parts", type=int, default=1, help="--noise-scale: probe this many epochs of "
                        "--samples each (epochs 0, 1, ...) and pool them")
    parser.add_argument("--parts-dir", type=Path, help="--noise-scale: keep each epoch's gradients here and "
                        "reuse those already there (a long probe over several sittings)")
    parser.add_argument("overrides", nargs="*", help="config overrides (model.finetune=full, sampling.eta=...)")
    args = parser.parse_args(argv)
    if args.parts < 1:
        parser.error(f"--parts must be at least 1, not {args.parts}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.noise_scale:
        # Seed 0 for the LoRA initialisation and the epoch's plan, as the measurement in docs/minicarve.md.
        out = noise_scale(load_config([f"train.samples_per_epoch={args.samples}", f"train.group_size={args.group}",
                                       f"train.torch_threads={args.threads}", "run.seed=0", *args.overrides]),
                          args.parts, args.parts_dir)
        out.update(overrides=args.overrides, seconds=round(time.perf_counter() - start),
                   command="python -m experiments.gradient_probe " + " ".join(argv if argv is not None else sys.argv[1:]))
        print(json.dumps(out))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1))
        print(f"{out['reward']}: gradient noise scale B = {out['noise_scale']:.3g} ± {out['noise_scale_se']:.2g} "
              f"samples (|G|^2 {out['signal']:.3g} ± {out['signal_se']:.2g}, tr Sigma {out['noise']:.3g}; "
              f"{out['samples']} samples in groups of {out['group']}); a batch of {out['samples']} has "
              f"signal/noise {out['samples'] / out['noise_scale']:.2g}; the two half-batches' gradients "
              f"have cosine {out['half_batch_cosine']:.3f}; trained steps {out['trained_steps']} "
              f"({time.perf_counter() - start:.0f}s)")
        per = out["per_sample"]
        print(f"  as {out['samples']} independent samples: B = {per['noise_scale']:.3g} ± {per['noise_scale_se']:.2g} "
              f"(|G|^2 {per['signal']:.3g} ± {per['signal_se']:.2g}, tr Sigma {per['noise']:.3g}); gradient norms "
              + ", ".join(f"{k} {v:.2g}" for k, v in out["gradient_norm_quantiles"].items()))
        pre = out["adam_preconditioned"]
        print(f"  in Adam's coordinates: B = {pre['noise_scale']:.3g} ± {pre['noise_scale_se']:.2g} "
              f"(|G|^2 {pre['signal']:.3g} ± {pre['signal_se']:.2g})")
        for row in out["first_k_steps"]:
            print(f"  first {row['k']:2d} steps: B = {row['noise_scale']:.3g} ± {row['noise_scale_se']:.2g} (|G|^2 {row['signal']:.3g} "
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
