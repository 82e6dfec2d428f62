"""Train the MiniCarve alignment classifier (:mod:`minicarve.alignment`).

``python -m minicarve.train_alignment [--steps 1200 --seed 0 --out minicarve/weights/alignment]``

Trains on the TRAIN split's ground-truth renders only (the test split's held-out
colour-shape pairs are never seen), with light augmentation so that generated,
imperfect grids are read too: each view shifted by up to 2 px, a small colour
gain (+-5% per channel and overall) and offset (+-0.02) jitter, a slight gaussian blur and gaussian pixel noise.  A few
hundred train scenes are kept aside to print validation progress.  At the end it
writes the weights and prints the accuracy on the 250 TEST scenes' ground-truth
renders next to chance.  One CPU thread (the other core is someone else's).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from minicarve.alignment import (
    DEFAULT_WEIGHTS,
    IGNORE,
    AlignmentClassifier,
    AlignmentConfig,
    AlignmentEvaluator,
    chance_accuracy,
    targets_tensor,
)
from minicarve.dataset import rendered_grids, split
from policy.grid import grid_to_views, views_to_grid

NUM_VALIDATION = 400  # train scenes kept aside for progress (never the test split)


# ------------------------------------------------------------------ augmentation


def shift_views(grids: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each view of ``grids [B, 3, 2v, 2v]`` independently by up to ``max_shift``
    px in x and y, filling with white."""
    if max_shift <= 0:
        return grids
    views = grid_to_views(grids)  # [B, 4, 3, v, v]
    batch, num_views, _, size, _ = views.shape
    padded = F.pad(views.flatten(0, 1), (max_shift,) * 4, value=1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (batch * num_views, 2), generator=generator)
    out = torch.stack([padded[i, :, y:y + size, x:x + size] for i, (y, x) in enumerate(offsets.tolist())])
    return views_to_grid(out.reshape(views.shape))


def gaussian_blur(images: Tensor, sigmas: Tensor) -> Tensor:
    """Blur each image of ``[B, C, H, W]`` with its own sigma (``[B]``, 0 = none), 5x5 kernel."""
    batch, channels, height, width = images.shape
    coords = torch.arange(5, dtype=images.dtype) - 2
    kernel_1d = torch.exp(-coords[None] ** 2 / (2 * sigmas.clamp(min=1e-3)[:, None] ** 2))
    kernel_1d = kernel_1d / kernel_1d.sum(dim=1, keepdim=True)  # [B, 5]
    kernel = (kernel_1d[:, :, None] * kernel_1d[:, None, :]).repeat_interleave(channels, dim=0)  # [B*C, 5, 5]
    padded = F.pad(images.reshape(1, batch * channels, height, width), (2, 2, 2, 2), mode="replicate")
    return F.conv2d(padded, kernel[:, None], groups=batch * channels).reshape(images.shape)


def augment(grids: Tensor, generator: torch.Generator) -> Tensor:
    """Light, label-preserving augmentation of float grids in [0, 1]."""
    batch = grids.shape[0]

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    x = shift_views(grids, 2, generator)
    gain = uniform(0.95, 1.05, batch, 3, 1, 1) * uniform(0.95, 1.05, batch, 1, 1, 1)
    x = (x * gain + uniform(-0.02, 0.02, batch, 3, 1, 1)).clamp(0, 1)
    blur = torch.rand(batch, generator=generator) < 0.5
    x = torch.where(blur[:, None, None, None], gaussian_blur(x, uniform(0.3, 0.9, batch)), x)
    x = x + uniform(0.0, 0.04, batch, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


# ---------------------------------------------------------------------- training


def loss_fn(logits: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
    return sum(F.cross_entropy(logits[h], targets[h], ignore_index=IGNORE) for h in logits)


@torch.no_grad()
def head_accuracy(model: AlignmentClassifier, grids: Tensor, targets: dict[str, Tensor]) -> dict[str, float]:
    """Accuracy of every head over the samples where it has a target."""
    model.eval()
    logits = {h: [] for h in targets}
    for start in range(0, len(grids), 256):
        for h, l in model(grids[start:start + 256]).items():
            logits[h].append(l)
    model.train()
    out = {}
    for h, t in targets.items():
        mask = t != IGNORE
        out[h] = float((torch.cat(logits[h]).argmax(-1)[mask] == t[mask]).float().mean())
    return out


def train(steps: int, seed: int, batch_size: int = 64, lr: float = 3e-3, num_train: int | None = None,
          config: AlignmentConfig | None = None, log_every: int = 100) -> AlignmentClassifier:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_scenes, _ = split()
    grids = rendered_grids(train_scenes, "train")
    if num_train is not None:  # quick runs (development): a prefix of the split
        train_scenes, grids = train_scenes[:num_train], grids[:num_train]
    held = min(NUM_VALIDATION, len(train_scenes) // 5)
    val_grids, val_targets = grids[-held:], targets_tensor(train_scenes[-held:])
    fit_grids, fit_targets = grids[:-held], targets_tensor(train_scenes[:-held])
    print(f"training on {len(fit_grids)} train renders ({held} kept for validation), {steps} steps of "
          f"{batch_size}, seed {seed}", flush=True)

    model = AlignmentClassifier(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    start, running = time.time(), []
    order = torch.randperm(len(fit_grids), generator=generator)
    cursor = 0
    for step in range(1, steps + 1):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(fit_grids), generator=generator), 0
        index = order[cursor:cursor + batch_size]
        cursor += batch_size
        x = augment(fit_grids[index].float() / 255.0, generator)
        loss = loss_fn(model(x), {h: t[index] for h, t in fit_targets.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if step % log_every == 0 or step == steps:
            acc = head_accuracy(model, val_grids, val_targets)
            mean_acc = np.mean(list(acc.values()))
            print(f"step {step}/{steps} loss {np.mean(running):.3f} val mean head acc {mean_acc:.3f} "
                  f"(worst {min(acc, key=acc.get)} {min(acc.values()):.3f}) {time.time() - start:.0f}s", flush=True)
            running = []
    return model.eval()


def evaluate_test(model: AlignmentClassifier) -> dict:
    """Alignment accuracy on the TEST split's ground-truth renders, and chance."""
    _, test_scenes = split()
    grids = rendered_grids(test_scenes, "test")
    prompts = [s.prompt for s in test_scenes]
    evaluator = AlignmentEvaluator(model)
    scores = evaluator.score(grids, prompts)
    heads = head_accuracy(model, grids.float() / 255.0, targets_tensor(test_scenes))
    by_count = {}
    for count in (1, 2, 3):
        rows = [i for i, s in enumerate(test_scenes) if len(s.parts) == count]
        by_count[count] = float(scores[rows].mean())
    return {"test_accuracy": float(scores.mean()), "chance": chance_accuracy(prompts),
            "test_accuracy_by_count": by_count, "test_head_accuracy": heads, "num_test": len(prompts)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minicarve.train_alignment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--num-train", type=int, default=None, help="use only this many train scenes (quick runs)")
    parser.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    model = train(args.steps, args.seed, args.batch_size, args.lr, args.num_train)
    model.save_pretrained(args.out)
    train_time = time.time() - start
    # Evaluate the model as shipped (reloaded from disk).
    results = evaluate_test(AlignmentClassifier.from_pretrained(args.out))
    results.update(steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                   num_train=args.num_train, train_time_s=round(train_time, 1))
    (Path(args.out) / "training.json").write_text(json.dumps(results, indent=2) + "\n")
    size_kb = (Path(args.out) / "model.safetensors").stat().st_size / 1024
    print(f"wrote {args.out} (model.safetensors {size_kb:.0f} KB) in {train_time:.0f}s")
    print("test head accuracy: " + ", ".join(f"{h} {a:.3f}" for h, a in results["test_head_accuracy"].items()))
    by_count = results["test_accuracy_by_count"]
    print("test accuracy by part count: " + ", ".join(f"{c}: {a:.3f}" for c, a in by_count.items()))
    print(f"TEST ground-truth alignment accuracy {results['test_accuracy']:.4f} "
          f"(chance {results['chance']:.4f}) over {results['num_test']} test scenes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
