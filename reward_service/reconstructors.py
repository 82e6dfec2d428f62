"""Sparse-view 3D reconstruction for MRC: posed views in, a radiance field out.

Carve3D uses a feed-forward LRM.  Reconstructors are named in :data:`RECONSTRUCTORS`
(built with :func:`build_reconstructor`):

* ``"voxel"`` (built in): a small per-sample optimisation that needs no weights, so
  the reward runs anywhere (CPU, offline);
* ``"lgm"`` (built in, ``reward_service/lgm.py``): LGM, the public feed-forward Gaussian
  reconstructor (options ``weights=FILE|DIR``: its released ``model_fp16_fixrot.safetensors``,
  ``preset`` (default ``big``), ``device``, ``dtype``, ``distance``, ``render_backend``);
* ``"lrm"``: the MiniCarve feed-forward LRM, registered by MiniCarve's plug-in
  (``minicarve.plugin``, loaded by the default ``run.plugins``; options ``weights=DIR``,
  ``device``, ``num_samples``); its weights come from ``python -m minicarve.train_lrm``.

A plug-in registers more (``RECONSTRUCTORS.register(name, "package.module:Attr",
on_device=True)``: ``on_device`` means the reward passes its device as the option
``device``; ``check_options="package.module:fn"`` names a function ``fn(options) -> [problems]``
that the config check runs before any actor starts, e.g. that a weights file exists), and any other model plugs in with an import path ``"package.module:Attr"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from geometry.cameras import Cameras
from plugins import Registry
from geometry.render import near_far_for, render_field


@runtime_checkable
class RadianceField(Protocol):
    """A reconstructed batch of ``B`` scenes that can be rendered at any camera."""

    def render(self, cameras: Cameras, height: int, width: int) -> Tensor:
        """Images ``[B, V, 3, H, W]`` in [0, 1], white background."""
        ...


@runtime_checkable
class Reconstructor(Protocol):
    """Views ``[B, V, 3, H, W]`` in [0, 1] (white background) taken by ``cameras``
    -> one radiance field per sample."""

    def reconstruct(self, views: Tensor, cameras: Cameras) -> RadianceField: ...


@dataclass
class VoxelField:
    """``B`` dense voxel grids over the cube [-1, 1]^3, read by trilinear interpolation.

    ``raw`` is ``[B, 4, R, R, R]``: channel 0 is pre-activation density, 1-3
    pre-activation RGB; the spatial axes are (z, y, x) as ``F.grid_sample``
    expects, so world point (x, y, z) samples ``raw[b, :, z, y, x]``.
    Activations come *after* interpolation (sharper surfaces than
    interpolating activated values): density = ``density_scale * softplus``,
    rgb = ``sigmoid``.  Space outside the cube is empty.
    """

    raw: Tensor
    density_scale: float
    num_samples: int

    def __call__(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Batched field: ``points [B, ..., S, 3]`` -> density ``[B, ..., S]``, rgb ``[B, ..., S, 3]``."""
        batch, *rest, _ = points.shape
        grid = points.reshape(batch, 1, 1, -1, 3)
        values = F.grid_sample(self.raw, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        values = values.reshape(batch, 4, -1).transpose(1, 2).reshape(batch, *rest, 4)
        inside = (points.abs() <= 1.0).all(dim=-1)
        density = self.density_scale * F.softplus(values[..., 0]) * inside
        return density, torch.sigmoid(values[..., 1:])

    def render(self, cameras: Cameras, height: int, width: int) -> Tensor:
        return render_field(self, cameras, height, width, self.num_samples, batch_size=self.raw.shape[0])


def total_variation(raw: Tensor) -> Tensor:
    """Per-sample mean squared difference between neighbouring voxels, ``[B]``."""
    diffs = [raw.diff(dim=d) for d in (-3, -2, -1)]
    return sum(d.pow(2).flatten(1).mean(dim=1) for d in diffs)


class VoxelFitReconstructor:
    """Fit a low-resolution voxel grid per sample to its posed views (Adam on MSE + TV).

    Batched over samples; each sample's loss is its own mean (the batch loss is
    their *sum*), so a sample's result does not depend on its batch mates.
    Deterministic: constant initialisation, midpoint ray samples, no ray
    subsampling.  Views larger than ``fit_size`` are area-downsampled for the
    fit (the returned field renders at any resolution).

    Cost with these defaults (2-core CPU, no GPU): scoring 4 grids of 4 views
    at 32x32 px (fit + re-render + LPIPS) takes 3.9-4.4 s with torch's 2
    intra-op threads, 7.3 s with one.  One fit step is ~50 ms for that batch, so
    the cost is linear in ``steps`` and in the number of rays (``fit_size``
    bounds it for large views).  When the cores are shared with other busy
    processes, use ``torch.set_num_threads(1)``: 2 threads then wait on each
    other and were measured up to 6x slower.
    """

    def __init__(
        self,
        resolution: int = 24,
        steps: int = 80,
        lr: float = 0.2,
        num_samples: int = 32,
        density_scale: float = 25.0,
        init_density: float = -5.0,
        tv_weight: float = 1e-3,
        fit_size: int = 32,
    ) -> None:
        # resolution: voxels per side of [-1, 1]^3 (24 -> 0.083 units, about one
        #   voxel per pixel of a 32 px view of the unit sphere).
        # num_samples: ray samples over [near, far] (~2.1 units): ~2 per voxel.
        # density_scale, init_density: density = 25 * softplus(raw) starts at
        #   0.17 per unit, so a ray through the empty cube is ~70% transparent
        #   and gradients reach every voxel; lr 0.2 on the logits makes 80 steps
        #   enough to fit 32 px views to MSE ~5e-4.
        # tv_weight: small smoothness prior that keeps unseen voxels tidy.
        self.resolution = resolution
        self.steps = steps
        self.lr = lr
        self.num_samples = num_samples
        self.density_scale = density_scale
        self.init_density = init_density
        self.tv_weight = tv_weight
        self.fit_size = fit_size

    def initial_grid(self, batch: int, device: torch.device) -> Tensor:
        """Nearly empty grey space: small density, rgb logits 0 (grey 0.5)."""
        raw = torch.zeros(batch, 4, *(self.resolution,) * 3, device=device)
        raw[:, 0] = self.init_density
        return raw

    def fit_targets(self, views: Tensor) -> Tensor:
        """Views at the fitting resolution (longest side at most ``fit_size``), as a
        plain tensor even if ``views`` was made under inference mode."""
        height, width = views.shape[-2:]
        scale = min(1.0, self.fit_size / max(height, width))
        views = views.detach().clone()
        if scale == 1.0:
            return views
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        batch, num_views = views.shape[:2]
        small = F.interpolate(views.flatten(0, 1), size=size, mode="area")
        return small.reshape(batch, num_views, 3, *size)

    def reconstruct(self, views: Tensor, cameras: Cameras) -> VoxelField:
        # The reward is usually computed under no_grad / inference_mode; the fit
        # itself needs autograd, so switch it back on locally.
        with torch.inference_mode(False), torch.enable_grad():
            targets = self.fit_targets(views)
            height, width = targets.shape[-2:]
            near_far = near_far_for(cameras)
            raw = self.initial_grid(views.shape[0], views.device).requires_grad_(True)
            field = VoxelField(raw, self.density_scale, self.num_samples)
            optimizer = torch.optim.Adam([raw], lr=self.lr)
            for _ in range(self.steps):
                optimizer.zero_grad(set_to_none=True)
                renders = render_field(
                    field, cameras, height, width, self.num_samples, raw.shape[0], near_far=near_far
                )
                mse = (renders - targets).pow(2).flatten(1).mean(dim=1)
                loss = (mse + self.tv_weight * total_variation(raw)).sum()
                loss.backward()
                optimizer.step()
        return VoxelField(raw.detach(), self.density_scale, self.num_samples)


# A name -> a class or factory called with the reconstructor's options.
RECONSTRUCTORS = Registry("reconstructor", "reward.reconstructor")
RECONSTRUCTORS.register("voxel", VoxelFitReconstructor)
# LGM (reward_service/lgm.py), imported only when built: options weights=FILE|DIR, preset, dtype, ...
RECONSTRUCTORS.register("lgm", "reward_service.lgm:LGMReconstructor", on_device=True,
                        check_options="reward_service.lgm:option_problems")


def build_reconstructor(name: str, **options: Any) -> Reconstructor:
    """A reconstructor by name (:data:`RECONSTRUCTORS`) or import path ``"package.module:Attr"``:
    ``Attr`` is a class or factory called with ``**options`` that returns an object with
    ``reconstruct(views, cameras) -> RadianceField``."""
    reconstructor = RECONSTRUCTORS.get(name)(**options)
    if not isinstance(reconstructor, Reconstructor):
        raise TypeError(f"{name!r} returned {type(reconstructor).__name__}, which has no reconstruct()")
    return reconstructor
