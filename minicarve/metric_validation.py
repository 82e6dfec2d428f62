"""Validate MRC as an inconsistency metric (Carve3D, Sec. 3.3), against simpler image distances.

``python -m minicarve.metric_validation [--objects 24 --levels 10 --reconstructor lrm --out docs/results]``

Procedure:

1. Consistent ground truth: the 4 grid-rig views (32 px) of ``--objects`` TEST scenes
   of MiniCarve (``render_scene(scene, 32)``), the first ones of the test split.
2. Controlled inconsistency, inpainting-like: view 1 (the top-right view, azimuth 90)
   gets a square region replaced by other content.  The square is centred on the
   centre of that view's tight, squared foreground box (``foreground_square_box``
   with no padding); its side grows linearly with the level (``--growth side``,
   the default; ``--growth area`` makes its area grow linearly instead), from 0
   at level 0 (consistent) to the box's full side at the last level.  By default
   the square is anti-aliased (``--edges soft``: each pixel is blended by the
   fraction of it the square covers), so the pasted amount is continuous in the
   level rather than stepping by whole pixels (``--edges hard``).  The content is the
   same-sized square of view 1 of a *donor*: another test scene, none of whose
   colours the object has, centred on the donor's own foreground box
   centre (so the pasted content is object, not background).  Donors are drawn
   by a seeded permutation (``--seed``): everything is deterministic.
3. Each (object, level) sample is reconstructed from its 4 views by the
   reconstructor, re-rendered at the same 4 cameras and compared, view by view,
   inside the square foreground box of the *input* view (padded, as MRC does),
   both crops resized to max(32, --lpips-min-size) px (64 by default): LPIPS (= MRC, ``mrc_from_renders``), PSNR, SSIM
   (gaussian window 11, sigma 1.5, valid convolution, per channel), L1 (mean
   absolute error) and L2 (mean squared error), averaged over the 4 views.
4. Measures per metric, on the metric written as an *inconsistency* (higher =
   less consistent): MRC, -PSNR, 1-SSIM, L1, L2.  ``mean``/``std`` over objects
   per level are reported in the metric's own units (PSNR in dB, SSIM in [0, 1]);
   ``spearman_rho`` is Spearman's rank correlation of the mean inconsistency curve
   with the level (1 = strictly increasing); ``smoothness`` is the mean absolute
   second difference of that curve after min-max normalisation to [0, 1] (0 = a
   straight line; lower = smoother, i.e. the metric grows evenly with the
   inconsistency).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import minicarve.plugin  # noqa: F401  (registers --reconstructor lrm)
from geometry.cameras import grid_rig
from minicarve.dataset import split
from minicarve.scenes import render_scene
from reward_service.mrc import (LPIPS_MIN_SIZE, box_crops, foreground_square_box, load_lpips, lpips_backbone_source,
                                lpips_input_size, mrc_from_renders)
from reward_service.reconstructors import Reconstructor, build_reconstructor

VIEW_SIZE = 32
EDITED_VIEW = 1  # the view made inconsistent (top-right of the grid, azimuth 90)
METRICS = ("mrc", "psnr", "ssim", "l1", "l2")
# How each metric is turned into an inconsistency (higher = less consistent) for rho/smoothness.
ORIENTED = {"mrc": "mrc", "psnr": "-psnr", "ssim": "1-ssim", "l1": "l1", "l2": "l2"}
ORIENT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mrc": lambda x: x, "psnr": lambda x: -x, "ssim": lambda x: 1.0 - x, "l1": lambda x: x, "l2": lambda x: x,
}


# ------------------------------------------------------------------ inconsistency


def box_centre_and_side(view: Tensor) -> tuple[tuple[float, float], int]:
    """Centre (x, y) and side of the tight square foreground box of ``view [3, H, W]``."""
    x0, y0, x1, y1 = foreground_square_box(view, pad=0)
    return ((x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2), max(x1 - x0 + 1, y1 - y0 + 1)


def square_mask(centre: tuple[float, float], side: float, size: int, soft: bool = True) -> Tensor:
    """``[size, size]`` mask of the square of ``side`` px centred at ``centre`` (x, y) in
    pixel coordinates (pixel i spans [i, i + 1]).  Soft: each pixel's covered fraction
    (an anti-aliased square, so the pasted amount grows continuously with ``side``);
    hard: the side rounded to whole pixels, the square shifted to lie in the image."""
    if not soft:
        side = min(int(round(side)), size)
        x0 = min(max(int(round(centre[0] - side / 2)), 0), size - side)
        y0 = min(max(int(round(centre[1] - side / 2)), 0), size - side)
        mask = torch.zeros(size, size)
        mask[y0:y0 + side, x0:x0 + side] = 1.0
        return mask
    pixels = torch.arange(size, dtype=torch.float32)

    def cover(c: float) -> Tensor:
        return ((pixels + 1).clamp(max=c + side / 2) - pixels.clamp(min=c - side / 2)).clamp(0, 1)

    return cover(centre[1])[:, None] * cover(centre[0])[None, :]


def shift_image(image: Tensor, dx: int, dy: int) -> Tensor:
    """``out[:, y, x] = image[:, y + dy, x + dx]``, white where that falls outside."""
    _, height, width = image.shape
    out = torch.ones_like(image)
    ys, xs = slice(max(0, -dy), min(height, height - dy)), slice(max(0, -dx), min(width, width - dx))
    out[:, ys, xs] = image[:, ys.start + dy:ys.stop + dy, xs.start + dx:xs.stop + dx]
    return out


GROWTHS = ("side", "area")
EDGES = ("soft", "hard")


def inpaint_like(view: Tensor, donor: Tensor, level: int, num_levels: int, growth: str = "side",
                 edges: str = "soft") -> Tensor:
    """``view [3, H, W]`` with a square of ``donor``'s content pasted in.  The square is
    centred on the view's foreground box centre; its side is ``t = level / (num_levels - 1)``
    of the box's side (``growth="side"``) or ``sqrt(t)`` of it (``growth="area"``: the
    pasted area grows linearly).  The content is ``donor`` shifted so that its own
    foreground box centre lands on the square's centre.  ``edges="soft"`` blends by
    each pixel's covered fraction; ``"hard"`` pastes whole pixels."""
    if growth not in GROWTHS:
        raise ValueError(f"growth must be one of {GROWTHS}, got {growth!r}")
    if edges not in EDGES:
        raise ValueError(f"edges must be one of {EDGES}, got {edges!r}")
    if level == 0:
        return view.clone()
    centre, box_side = box_centre_and_side(view)
    fraction = level / (num_levels - 1)
    side = box_side * (fraction if growth == "side" else math.sqrt(fraction))
    mask = square_mask(centre, side, view.shape[-1], soft=edges == "soft").to(view)
    donor_centre, _ = box_centre_and_side(donor)
    content = shift_image(donor, int(round(donor_centre[0] - centre[0])), int(round(donor_centre[1] - centre[1])))
    return view * (1 - mask) + content * mask


def choose_donors(scenes: Sequence, pool: Sequence, seed: int) -> list[int]:
    """For each scene, the index in ``pool`` of a donor scene sharing none of its
    colours (so the pasted content visibly differs), taken in a seeded random order."""
    rng = np.random.default_rng(seed)
    donors = []
    for scene in scenes:
        own = {p.color for p in scene.parts}
        for index in rng.permutation(len(pool)):
            candidate = pool[int(index)]
            if candidate is not scene and not own & {p.color for p in candidate.parts}:
                donors.append(int(index))
                break
        else:
            raise ValueError(f"no donor for {scene.prompt!r}")
    return donors


def inconsistency_levels(views: Tensor, donor_views: Tensor, num_levels: int, growth: str = "side",
                         edges: str = "soft") -> Tensor:
    """``[L, 4, 3, H, W]``: ``views`` with view ``EDITED_VIEW`` made inconsistent at each level."""
    out = views[None].repeat(num_levels, 1, 1, 1, 1)
    for level in range(num_levels):
        out[level, EDITED_VIEW] = inpaint_like(views[EDITED_VIEW], donor_views[EDITED_VIEW], level, num_levels,
                                               growth, edges)
    return out


# ------------------------------------------------------------------------ metrics


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: Tensor, b: Tensor, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> Tensor:
    """SSIM (Wang et al. 2004) of images ``[N, C, H, W]`` in [0, data_range] -> ``[N]``:
    gaussian-weighted local statistics (valid convolution, per channel), mean of the map."""
    channels = a.shape[1]
    window = gaussian_window(window_size, sigma).to(a)[None, None].repeat(channels, 1, 1, 1)

    def filt(x: Tensor) -> Tensor:
        return F.conv2d(x, window, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return index.flatten(1).mean(dim=1)


def psnr(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """PSNR in dB of ``[N, C, H, W]`` pairs -> ``[N]`` (MSE floored at 1e-10)."""
    mse = (a - b).pow(2).flatten(1).mean(dim=1).clamp(min=1e-10)
    return 10.0 * torch.log10(data_range**2 / mse)


@torch.no_grad()
def view_metrics(views: Tensor, rerenders: Tensor, lpips_fn, min_size: int = LPIPS_MIN_SIZE) -> dict[str, Tensor]:
    """Each metric ``[B]`` averaged over views, inside each input view's MRC box
    (``foreground_square_box``, padded), both crops resized to the size LPIPS sees."""
    batch, num_views = views.shape[:2]
    a, b = box_crops(views, rerenders, lpips_input_size(views.shape[-1], min_size))
    per_view = {
        "mrc": mrc_from_renders(views, rerenders, lpips_fn, min_size=min_size).flatten(),
        "psnr": psnr(a, b),
        "ssim": ssim(a, b),
        "l1": (a - b).abs().flatten(1).mean(dim=1),
        "l2": (a - b).pow(2).flatten(1).mean(dim=1),
    }
    return {name: value.reshape(batch, num_views).mean(dim=1) for name, value in per_view.items()}


# ----------------------------------------------------------------------- measures


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties averaged."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson correlation of the ranks, ties averaged);
    None when either sequence is constant."""
    rx, ry = _ranks(np.asarray(x, dtype=float)), _ranks(np.asarray(y, dtype=float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return None if denom == 0 else float((rx * ry).sum() / denom)


def normalise(curve: Sequence[float]) -> np.ndarray:
    """Min-max normalisation to [0, 1] (all zeros for a constant curve)."""
    curve = np.asarray(curve, dtype=float)
    span = curve.max() - curve.min()
    return np.zeros_like(curve) if span == 0 else (curve - curve.min()) / span


def smoothness(curve: Sequence[float]) -> float:
    """Mean absolute second difference of the min-max normalised curve (lower = smoother;
    0 for a straight line).  Needs at least 3 points."""
    curve = normalise(curve)
    if len(curve) < 3:
        raise ValueError("smoothness needs at least 3 points")
    return float(np.abs(np.diff(curve, n=2)).mean())


# ------------------------------------------------------------------------- driver


def bootstrap_smoothness(table: np.ndarray, orient: Callable[[np.ndarray], np.ndarray], resamples: int = 1000,
                         seed: int = 0) -> np.ndarray:
    """Smoothness of the oriented mean curve over ``resamples`` bootstrap resamples of the
    objects (rows of ``table [N, L]``): its spread says how much of a smoothness
    difference between metrics is object sampling noise."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, table.shape[0], size=(resamples, table.shape[0]))
    return np.array([smoothness(orient(table[r].mean(axis=0))) for r in rows])


def test_scene_views(num_objects: int, seed: int) -> tuple[list, Tensor, Tensor, list]:
    """The first ``num_objects`` test scenes, their views ``[N, 4, 3, 32, 32]``, their
    donors' views (same shape) and the donor scenes."""
    _, test = split()
    if num_objects > len(test) - 1:
        raise ValueError(f"at most {len(test) - 1} objects (the test split has {len(test)} scenes)")
    scenes = test[:num_objects]
    donors = [test[i] for i in choose_donors(scenes, test, seed)]
    cache: dict[str, Tensor] = {}

    def views_of(scene) -> Tensor:
        if scene.prompt not in cache:
            cache[scene.prompt] = render_scene(scene, VIEW_SIZE)
        return cache[scene.prompt]

    return scenes, torch.stack([views_of(s) for s in scenes]), torch.stack([views_of(d) for d in donors]), donors


def validate(
    views: Tensor,
    donor_views: Tensor,
    num_levels: int,
    reconstructor: Reconstructor,
    lpips_fn,
    batch_size: int = 16,
    progress: Callable[[str], None] | None = None,
    growth: str = "side",
    edges: str = "soft",
    lpips_min_size: int = LPIPS_MIN_SIZE,
) -> dict[str, Any]:
    """Per-(object, level) metrics ``[N, L]`` and the summary measures."""
    if num_levels < 3:
        raise ValueError("need at least 3 levels (level 0 is consistent)")
    cameras = grid_rig()
    samples = torch.stack([inconsistency_levels(v, d, num_levels, growth, edges)
                           for v, d in zip(views, donor_views)])  # [N, L, 4, 3, h, w]
    num_objects = samples.shape[0]
    flat = samples.flatten(0, 1)
    values: dict[str, list[Tensor]] = {m: [] for m in METRICS}
    rerenders = []
    start = time.time()
    for first in range(0, len(flat), batch_size):
        batch = flat[first:first + batch_size]
        with torch.no_grad():
            field = reconstructor.reconstruct(batch, cameras)
            rerender = field.render(cameras, VIEW_SIZE, VIEW_SIZE).clamp(0.0, 1.0)
        for name, value in view_metrics(batch, rerender, lpips_fn, lpips_min_size).items():
            values[name].append(value)
        rerenders.append(rerender)
        if progress:
            done = min(first + batch_size, len(flat))
            progress(f"{done}/{len(flat)} samples reconstructed and scored ({time.time() - start:.0f}s)")
    per_sample = {m: torch.cat(v).reshape(num_objects, num_levels).numpy().astype(float) for m, v in values.items()}
    levels = list(range(num_levels))
    boots = np.stack([bootstrap_smoothness(per_sample[name], ORIENT[name]) for name in METRICS])  # [M, R]
    metrics = {}
    for name in METRICS:
        table = per_sample[name]
        mean = table.mean(axis=0)
        oriented = ORIENT[name](mean)
        per_object_rho = [spearman(ORIENT[name](row), levels) for row in table]
        boot = boots[METRICS.index(name)]
        metrics[name] = {
            "mean": [float(x) for x in mean],
            "std": [float(x) for x in table.std(axis=0)],
            "oriented_as": ORIENTED[name],
            "spearman_rho": spearman(oriented, levels),
            "smoothness": smoothness(oriented),
            "per_object_spearman_rho_mean": float(np.mean([r for r in per_object_rho if r is not None])),
            "smoothness_bootstrap_std": float(boot.std()),
        }
    # How often each metric is the smoothest when the objects are resampled (same resamples).
    wins = np.bincount(boots.argmin(axis=0), minlength=len(METRICS)) / boots.shape[1]
    for name, share in zip(METRICS, wins):
        metrics[name]["smoothest_in_bootstrap"] = float(share)
    return {
        "metrics": metrics,
        "levels": levels,
        "num_objects": num_objects,
        "per_sample": {m: t.tolist() for m, t in per_sample.items()},
        "samples": samples,
        "rerenders": torch.cat(rerenders).reshape(num_objects, num_levels, *rerenders[0].shape[1:]),
    }


# ------------------------------------------------------------------------ outputs


def plot_curves(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = np.asarray(result["levels"])
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.2), sharey=True)
    for ax, name in zip(axes, METRICS):
        entry = result["metrics"][name]
        mean = ORIENT[name](np.asarray(entry["mean"]))
        std = np.asarray(entry["std"])
        low, span = mean.min(), (mean.max() - mean.min()) or 1.0
        norm_mean, norm_std = (mean - low) / span, std / span
        ax.fill_between(levels, norm_mean - norm_std, norm_mean + norm_std, alpha=0.25, label="±1 std over objects")
        ax.plot(levels, norm_mean, marker="o", ms=3, label="mean")
        ax.plot(levels, levels / levels[-1], ls=":", color="grey", lw=1, label="linear")
        rho = entry["spearman_rho"]
        ax.set_title(f"{entry['oriented_as']}\nrho {rho:.3f}  smooth {entry['smoothness']:.3f}", fontsize=9)
        ax.set_xlabel("inconsistency level")
    axes[0].set_ylabel("inconsistency, min-max normalised")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Metric validation: {result['num_objects']} test objects, reconstructor {result['reconstructor']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_strip(result: dict[str, Any], path: Path, obj: int = 0, scale: int = 3) -> None:
    """Row 1: view 1 of object ``obj`` at every level (the input); row 2: its re-rendering."""
    from PIL import Image

    inputs = result["samples"][obj, :, EDITED_VIEW]  # [L, 3, h, w]
    outputs = result["rerenders"][obj, :, EDITED_VIEW]
    rows = [torch.cat(list(x), dim=-1) for x in (inputs, outputs)]  # [3, h, L*w]
    image = (torch.cat(rows, dim=-2).permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST).save(path)


def write_markdown(summary: dict[str, Any], path: Path, command: str) -> None:
    lines = [
        "# MRC metric validation (Carve3D Sec. 3.3)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {summary['machine']}. Wall time: {summary['wall_time_s']:.0f} s. "
        f"Reconstructor: `{summary['reconstructor']}`. LPIPS backbone: {summary['lpips_backbone']}.",
        "",
        "## What was measured",
        "",
        f"{summary['num_objects']} MiniCarve TEST scenes (the first ones of the split), rendered at the 4 grid-rig "
        f"cameras at 32 px. View 1 (azimuth 90) is made progressively inconsistent over {len(summary['levels'])} "
        "levels: a square, centred on the centre of that view's tight square foreground box, is replaced by the "
        "same-sized square of view 1 of a donor test scene (one sharing no colour with the object, "
        "square centred on the donor's foreground), growing from 0 (level 0, consistent) to the "
        f"whole foreground box at level {summary['levels'][-1]}. Donors are chosen by a seeded permutation "
        f"(seed {summary['seed']}). Growth: `{summary['growth']}` (side: the square's side is linear in the "
        f"level; area: its area is); edges: `{summary['edges']}` (soft: the square is anti-aliased, each pixel blended "
        "by its covered fraction, so the pasted amount is continuous in the level; hard: whole pixels, the side "
        "rounded). Every (object, level) sample is reconstructed from its 4 views, re-rendered at "
        "the same 4 cameras, and each view is compared with its re-rendering inside the input view's padded "
        f"square foreground box (MRC's crop, both crops resized to {summary['crop_size']} px, the size LPIPS sees), "
        "then averaged over the 4 views:",
        "",
        "* **MRC**: LPIPS (AlexNet), exactly `reward_service.mrc.mrc_from_renders`;",
        "* **PSNR** (dB) and **SSIM** (gaussian window 11, sigma 1.5, valid convolution, per channel, "
        "C1 = 0.01², C2 = 0.03²): similarities, so rho and smoothness use the inconsistency forms **-PSNR** and "
        "**1-SSIM**;",
        "* **L1** (mean absolute error) and **L2** (mean squared error), pixel values in [0, 1].",
        "",
        "Measures, on the mean-over-objects curve of each metric written as an inconsistency (higher = less "
        "consistent): **Spearman rho** = rank correlation of the curve with the level (1 = strictly increasing); "
        "**smoothness** = mean absolute second difference of the curve min-max normalised to [0, 1] "
        "(0 = perfectly linear; lower = smoother); its *bootstrap std* is over 1000 resamples of the objects "
        "(seeded), and *smoothest in bootstrap* is the share of those resamples in which the metric has the lowest "
        "smoothness of the five, i.e. how robust a ranking by smoothness is. *per-object rho* is the mean over "
        "objects of each object's own "
        "Spearman rho (not part of the paper's protocol; a stricter, noisier check).",
        "",
        "## Results",
        "",
        "| metric | as inconsistency | Spearman rho | smoothness (± bootstrap std) | smoothest in bootstrap | "
        f"per-object rho | level 0 mean ± std | level {summary['levels'][-1]} mean ± std |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in METRICS:
        entry = summary["metrics"][name]
        rho = "n/a" if entry["spearman_rho"] is None else f"{entry['spearman_rho']:.4f}"
        lines.append(
            f"| {name.upper()} | {entry['oriented_as']} | {rho} | {entry['smoothness']:.4f} ± "
            f"{entry['smoothness_bootstrap_std']:.4f} | {entry['smoothest_in_bootstrap']:.0%} | "
            f"{entry['per_object_spearman_rho_mean']:.3f} | {entry['mean'][0]:.4f} ± {entry['std'][0]:.4f} | "
            f"{entry['mean'][-1]:.4f} ± {entry['std'][-1]:.4f} |"
        )
    lines += [
        "",
        "Mean curves per level (metric's own units):",
        "",
        "| level | " + " | ".join(n.upper() for n in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for i, level in enumerate(summary["levels"]):
        lines.append(f"| {level} | " + " | ".join(f"{summary['metrics'][n]['mean'][i]:.4f}" for n in METRICS) + " |")
    lines += [
        "",
        "Figures: `metric_validation.png` (each metric's normalised mean inconsistency vs level, ±1 std band), "
        "`metric_validation_strip.png` (object 0: view 1 at every level, top; its re-rendering, bottom).",
        "Raw numbers, including every (object, level) value: `metric_validation.json`.",
        "",
    ]
    if summary.get("notes"):
        lines += ["## Notes", ""] + [f"* {note}" for note in summary["notes"]] + [""]
    path.write_text("\n".join(lines))


def machine_description() -> str:
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, no GPU used, "
            f"torch {torch.__version__} with {torch.get_num_threads()} thread(s), Python {platform.python_version()}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minicarve.metric_validation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=24)
    parser.add_argument("--levels", type=int, default=10)
    parser.add_argument("--reconstructor", default="lrm", help="'lrm', 'voxel' or 'package.module:Attr'")
    parser.add_argument("--reconstructor-options", default="{}", help="JSON object of keyword options")
    parser.add_argument("--lpips-backbone", default=None)
    parser.add_argument("--lpips-min-size", type=int, default=LPIPS_MIN_SIZE,
                        help="box crops are resized to max(view size, this) for every metric")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--growth", choices=GROWTHS, default="side",
                        help="the pasted square's side grows linearly with the level (side) or its area does (area)")
    parser.add_argument("--edges", choices=EDGES, default="soft",
                        help="soft: anti-aliased square (continuous in the level); hard: whole pixels")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the cores are shared)")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    reconstructor = build_reconstructor(args.reconstructor, **json.loads(args.reconstructor_options))
    lpips_fn, warning = load_lpips(args.lpips_backbone)
    backbone = lpips_backbone_source(args.lpips_backbone)
    backbone_text = (f"ImageNet AlexNet ({os.path.relpath(backbone)})" if backbone else
                     "RANDOM seeded AlexNet (no ImageNet checkpoint available offline): values are only "
                     "comparable with each other, not with the paper's")
    scenes, views, donor_views, donors = test_scene_views(args.objects, args.seed)
    print(f"{len(scenes)} test objects, {args.levels} levels, reconstructor {args.reconstructor}", flush=True)
    result = validate(views, donor_views, args.levels, reconstructor, lpips_fn, args.batch_size,
                      progress=lambda msg: print(msg, flush=True), growth=args.growth,
                      edges=args.edges, lpips_min_size=args.lpips_min_size)
    result["reconstructor"] = args.reconstructor
    wall = time.time() - start
    command = "python -m minicarve.metric_validation " + " ".join(
        argv if argv is not None else sys.argv[1:])
    summary = {
        "metrics": result["metrics"],
        "levels": result["levels"],
        "num_objects": result["num_objects"],
        "reconstructor": args.reconstructor,
        "reconstructor_options": json.loads(args.reconstructor_options),
        "lpips_backbone": backbone_text,
        "crop_size": lpips_input_size(VIEW_SIZE, args.lpips_min_size),
        "wall_time_s": round(wall, 1),
        "machine": machine_description(),
        "command": command.strip(),
        "seed": args.seed,
        "growth": args.growth,
        "edges": args.edges,
        "objects": [s.prompt for s in scenes],
        "donors": [d.prompt for d in donors],
        "edited_view": EDITED_VIEW,
        "per_sample": result["per_sample"],
    }
    (out / "metric_validation.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_markdown(summary, out / "metric_validation.md", summary["command"])
    plot_curves(result, out / "metric_validation.png")
    save_strip(result, out / "metric_validation_strip.png")
    print(f"wall time {wall:.0f}s; wrote {out}/metric_validation.{{json,md,png}} and metric_validation_strip.png")
    for name in METRICS:
        entry = result["metrics"][name]
        print(f"{entry['oriented_as']:>7}: spearman rho {entry['spearman_rho']:.4f}  "
              f"smoothness {entry['smoothness']:.4f} ± {entry['smoothness_bootstrap_std']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
