"""Score a model on held-out prompts: test-set MRC and prompt alignment (Table 1 of Carve3D).

    python -m learner.evaluate --model minicarve/weights/sft-short --out runs/eval/sft-short
    python -m learner.evaluate --checkpoint runs/<run>/checkpoints/epoch_0003 --out runs/eval/rl
    python -m learner.evaluate --model ground-truth --out runs/eval/gt     # MiniCarve's scene renders

Plain torch in one process (no Ray): sample ``--samples`` samples per prompt with
the run's sampling settings and fixed seeds (the same seeds a training run's
held-out evaluation uses, see :func:`eval_specs`), reconstruct each from its views
and cameras and re-render it with the MRC reward's reconstructor, and score alignment
with the run's evaluator (``reward.alignment``).  ``--model`` may also name a registered
view source (:data:`VIEW_SOURCES`; MiniCarve's plug-in registers ``ground-truth``).  Writes
``summary.json``, ``per_sample.parquet``, ``per_prompt.parquet`` and ``samples.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from actors.batches import SampleSpec
from geometry.cameras import Cameras
from learner.config import Config, PromptsConfig, RewardConfig, load_config, load_prompts
from plugins import Registry, load_plugins
from policy.grid import pictures
from policy.settings import ModelSettings, SamplingSettings

GROUND_TRUTH = "ground-truth"
# ``model`` names that are not sampled: a name -> ``function(prompts) -> (uint8 views [N, V, 3, h, w],
# their Cameras)`` (registered by a world's plug-in: MiniCarve's scene renders as ``ground-truth``).
VIEW_SOURCES = Registry("view source", "--model")


def eval_specs(prompts: list[str], samples_per_prompt: int, seed: int) -> list[SampleSpec]:
    """Every prompt ``samples_per_prompt`` times with seeds fixed by ``seed``: identical noise for
    every model and every run evaluated with the same prompts."""
    rng = np.random.default_rng([seed, 7])
    seeds = rng.integers(2**31 - 1, size=len(prompts) * samples_per_prompt)
    return [SampleSpec(f"eval-{i}", i // samples_per_prompt, prompts[i // samples_per_prompt], int(s))
            for i, s in enumerate(seeds)]


def mean_and_sem(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the finite entries (NaN when there are too few)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not len(x):
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def paired_change(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of ``after - before`` over the same samples (the same prompts
    and seeds, in the same order): the noise shared by the pair cancels, which an unpaired
    comparison of two means would count twice."""
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if before.shape != after.shape:
        raise ValueError(f"a paired comparison needs the same samples on both sides, got {before.shape} "
                         f"and {after.shape}")
    return mean_and_sem(after - before)


def mrc_change_in_words(before: np.ndarray, after: np.ndarray) -> str:
    """The held-out MRC change of a run in one sentence, with its paired standard error and
    whether it is more than noise (2 standard errors)."""
    change, sem = paired_change(before, after)
    start = mean_and_sem(before)[0]
    n = int(np.isfinite(np.subtract(after, before, dtype=np.float64)).sum())
    figure = (f"held-out MRC {start:.4f} -> {start + change:.4f}: {change:+.4f} ± {sem:.4f} "
              f"({100 * change / start:+.1f}%, paired over {n} samples)")
    if not np.isfinite(sem) or sem == 0:
        return f"{figure}; too few samples to tell learning from noise"
    ratio = change / sem
    if ratio < -2:
        return f"{figure}: lower by {-ratio:.1f} standard errors, so the policy learned to be more 3D-consistent"
    if ratio > 2:
        return f"{figure}: higher by {ratio:.1f} standard errors, so the policy became less consistent"
    return f"{figure}: within noise ({ratio:+.1f} standard errors), no learning shown"


@dataclass
class Evaluation:
    prompts: list[str]
    seeds: list[int]
    views: np.ndarray  # [N, V, 3, h, w] uint8
    cameras: Cameras  # the V views' cameras
    mrc: np.ndarray  # [N]
    alignment: np.ndarray  # [N] (NaN without an evaluator)
    rerenders: np.ndarray  # [N, V, 3, h, w] uint8
    seconds: float
    kl: np.ndarray | None = None  # [N] KL to the base per sample (0 for the base itself)
    diversity: np.ndarray | None = None  # [prompts] mean pairwise LPIPS across one prompt's seeds
    metric: dict | None = None  # how MRC was measured: LPIPS backbone, crop size, foreground box

    def summary(self) -> dict:
        (mrc, mrc_sem), (alignment, alignment_sem) = mean_and_sem(self.mrc), mean_and_sem(self.alignment)
        out = {"mrc": mrc, "mrc_sem": mrc_sem, "alignment": alignment, "alignment_sem": alignment_sem,
               "num_samples": len(self.prompts), "num_prompts": len(set(self.prompts)),
               "seconds": self.seconds}
        if self.kl is not None:
            out["kl"], out["kl_sem"] = mean_and_sem(self.kl)
        if self.diversity is not None:
            out["diversity"], out["diversity_sem"] = mean_and_sem(self.diversity)
        if self.metric is not None:
            out["metric"] = self.metric
        return out


def sample_views(model_path: str, specs: list[SampleSpec], sampling: SamplingSettings,
                 checkpoint: str | None = None, model: ModelSettings | None = None,
                 batch_size: int = 32, progress: bool = True, kl: list | None = None,
                 kl_min_relative_step_sigma: float = 0.0) -> tuple[np.ndarray, Cameras]:
    """Views ``[N, V, 3, h, w]`` uint8 for the specs and their cameras, from a base model or a training checkpoint
    (``model``: the run's model section: family, finetune, LoRA, dtype; default: the defaults).
    ``kl``, a list, receives each sample's KL to the base model (a checkpoint's reference: the
    base UNet; the estimate of the training metric, mean log p - log p_ref of the sampled steps
    whose noise std is at least ``kl_min_relative_step_sigma``, the run's ``train.min_relative_step_sigma``)."""
    from learner.checkpoint import load_checkpoint
    from policy.ddim import trained_steps
    from policy.pipeline import kl_estimate, load_policy

    policy = load_policy(model or ModelSettings(), "cpu", model_path)
    if checkpoint is not None:
        weights, _, _ = load_checkpoint(checkpoint)
        policy.load_trainable_state_dict(weights)
    views, start = [], time.time()
    for i in range(0, len(specs), batch_size):
        chunk = specs[i:i + batch_size]
        trajectory = policy.sample([s.prompt for s in chunk], [s.seed for s in chunk], sampling,
                                   reference=kl is not None and checkpoint is not None,
                                   reference_min_relative_std=kl_min_relative_step_sigma)
        views.append(trajectory.views.numpy())
        if kl is not None:
            if checkpoint is None:
                kl.extend([0.0] * len(chunk))
            else:
                steps = trained_steps(policy.scheduler, trajectory.timesteps, sampling.eta, kl_min_relative_step_sigma)
                kl.extend(kl_estimate(trajectory.log_probs, trajectory.ref_log_probs, steps).tolist())
        if progress:
            done = i + len(chunk)
            print(f"sampled {done}/{len(specs)} ({done / (time.time() - start):.1f} samples/s)",
                  file=sys.stderr, flush=True)
    return np.concatenate(views), policy.cameras


def score_views(views: np.ndarray, cameras: Cameras, prompts: list[str], reward_config: RewardConfig,
                alignment: str | None = "minicarve", batch_size: int = 32):
    """Score uint8 views ``[N, V, 3, h, w]`` taken by ``cameras`` -> (mrc [N], alignment [N],
    rerenders [N, V, 3, h, w] uint8, warnings), MRC as the run's reward section measures it
    (``RewardConfig.mrc_options``).  Names registered by plug-ins need those loaded first
    (``evaluate`` loads the run's ``run.plugins``)."""
    from reward_service.rewards import MRCReward, build_alignment

    reward = MRCReward(**reward_config.mrc_options())
    align = build_alignment(alignment)
    mrc, aligned, rerenders = [], [], []
    for i in range(0, len(views), batch_size):
        chunk = torch.from_numpy(views[i:i + batch_size])
        result = reward(chunk, cameras, prompts[i:i + batch_size])
        mrc.append(result.mrc)
        rerenders.append(result.rerenders)
        aligned.append(np.asarray(align(chunk, cameras, prompts[i:i + batch_size]), dtype=np.float64) if align
                       else np.full(len(chunk), np.nan))
    return np.concatenate(mrc), np.concatenate(aligned), np.concatenate(rerenders), list(reward.scorer.warnings)


def diversity(views: np.ndarray, prompts: list[str], lpips_backbone: str | None = None) -> np.ndarray:
    """Per prompt, the mean LPIPS between every two of its samples (different seeds): how much
    a model's outputs for one prompt differ.  Uses the MRC reward's LPIPS backbone, on each
    sample's picture (``policy.grid.picture``: the 2x2 grid of four views, as it was measured)."""
    from reward_service.mrc import load_lpips

    lpips_fn, _ = load_lpips(lpips_backbone)
    images = torch.from_numpy(pictures(views)).permute(0, 3, 1, 2).float() / 255.0
    out = []
    for prompt in dict.fromkeys(prompts):
        rows = [i for i, p in enumerate(prompts) if p == prompt]
        pairs = [(a, b) for k, a in enumerate(rows) for b in rows[k + 1:]]
        if pairs:
            with torch.no_grad():
                d = lpips_fn(images[[a for a, _ in pairs]], images[[b for _, b in pairs]], normalize=True)
            out.append(float(d.mean()))
    return np.array(out)


def evaluate(config: Config, model: str, prompts: list[str], samples_per_prompt: int, seed: int,
             checkpoint: str | None = None) -> tuple[Evaluation, list[str]]:
    load_plugins(config.run.plugins)
    start = time.perf_counter()
    specs = eval_specs(prompts, samples_per_prompt, seed)
    kl = None
    if model in VIEW_SOURCES:
        views, cameras = VIEW_SOURCES.get(model)([s.prompt for s in specs])
    else:
        kl = []
        views, cameras = sample_views(model, specs, config.sampling, checkpoint, config.model, kl=kl,
                                      kl_min_relative_step_sigma=config.train.min_relative_step_sigma)
    r = config.reward
    mrc, alignment, rerenders, warnings = score_views(views, cameras, [s.prompt for s in specs], r, r.alignment)
    prompt_list = [s.prompt for s in specs]
    return Evaluation(prompt_list, [s.seed for s in specs], views, cameras, mrc, alignment, rerenders,
                      time.perf_counter() - start, np.array(kl) if kl is not None else None,
                      diversity(views, prompt_list, r.lpips_backbone), mrc_metric(r)), warnings


def mrc_metric(reward: RewardConfig) -> dict:
    """How MRC is measured under ``reward``: which LPIPS backbone, at what size, which box."""
    from reward_service.mrc import lpips_backbone_source

    return {"lpips_backbone": "random" if lpips_backbone_source(reward.lpips_backbone) is None else "imagenet",
            "lpips_min_size": reward.lpips_min_size, "foreground_opening": reward.foreground_opening}


def write_evaluation(evaluation: Evaluation, out: Path, meta: dict) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from learner.rundir import RunDirectory

    out.mkdir(parents=True, exist_ok=True)
    summary = {**meta, **evaluation.summary()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = pa.table({"prompt": evaluation.prompts, "seed": evaluation.seeds, "mrc": evaluation.mrc,
                      "alignment": evaluation.alignment})
    pq.write_table(table, out / "per_sample.parquet")
    per_prompt = table.group_by("prompt").aggregate([("mrc", "mean"), ("alignment", "mean")])
    pq.write_table(per_prompt, out / "per_prompt.parquet")
    shown = slice(0, 32)
    previews = [{"grid": g, "prompt": p, "rerender": r, "caption": f"MRC {m:.3f} align {a:.2f}"}
                for g, p, r, m, a in zip(pictures(evaluation.views[shown]), evaluation.prompts[shown],
                                         pictures(evaluation.rerenders[shown]), evaluation.mrc[shown],
                                         evaluation.alignment[shown])]
    RunDirectory._sheet(previews, out / "samples.png", f"{meta.get('model')}: generated views over their "
                        "re-renderings", columns=8)
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help=f"a model directory, or a registered view source such as {GROUND_TRUTH!r} "
                        "(MiniCarve's scene renders, from its plug-in) "
                        "(default: model.path of the config)")
    source.add_argument("--checkpoint", help="a training checkpoint directory (runs/<run>/checkpoints/epoch_N); "
                        "its run's config gives the model and sampling settings")
    parser.add_argument("--prompts", default=None, help="prompt file (default: eval.prompts_file of the config)")
    parser.add_argument("--num-prompts", type=int, default=None, help="the first N prompts (default: all)")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--seed", type=int, default=None, help="(default: eval.seed of the config)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. sampling.num_steps=20)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config_args = list(args.overrides)
    if args.checkpoint:
        run_config = Path(args.checkpoint).resolve().parents[1] / "config.yaml"
        config_args = ["--config", str(run_config)] + config_args
    config = load_config(config_args)
    model = args.model or config.model.path
    prompts_file = args.prompts or config.eval.prompts_file
    if not prompts_file:
        raise SystemExit("no prompt file: pass --prompts FILE (the config's eval.prompts_file is null)")
    prompts = load_prompts(PromptsConfig(file=prompts_file, limit=args.num_prompts))
    seed = config.eval.seed if args.seed is None else args.seed
    evaluation, warnings = evaluate(config, model, prompts, args.samples, seed, args.checkpoint)
    for w in warnings:
        print(f"WARNING: {w}", file=sys.stderr)
    meta = {"model": model, "checkpoint": args.checkpoint, "prompts_file": prompts_file, "seed": seed,
            "samples_per_prompt": args.samples, "sampling": vars(config.sampling),
            "reconstructor": config.reward.reconstructor, "warnings": warnings}
    summary = write_evaluation(evaluation, args.out, meta)
    print(f"{args.checkpoint or model}: test MRC {summary['mrc']:.4f} ± {summary['mrc_sem']:.4f} | alignment "
          f"{summary['alignment']:.3f} ± {summary['alignment_sem']:.3f} | KL {summary.get('kl', float('nan')):.2e} | "
          f"diversity {summary['diversity']:.3f} | {summary['num_prompts']} prompts x "
          f"{args.samples} | {summary['seconds']:.0f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    # Run the module's importable instance, whose VIEW_SOURCES the plug-ins register into.
    from learner.evaluate import main as _main

    sys.exit(_main())
