"""How each family (``policy/families.py``) lays out its views: the one family-specific piece of
the policy.  ``MultiViewPolicy`` asks its layout for four things and nothing else: the shape of
one sample in the UNet's space, the UNet call (one row of conditioning per sample), the cameras
of the views, and the decode of final samples into views ``[B, V, 3, h, w]`` in [0, 1]
(``geometry/views.py``).  Sampling, the DDIM step and log-probs, the reference and the
recomputation work on whole samples of any shape and do not know the layout.

* :class:`GridLayout` (pixel-grid, sd-grid, sdxl-grid): a sample is one image ``[C, H, W]``
  holding the 2x2 grid of the grid rig's four views (``policy/grid.py``,
  ``geometry.cameras.grid_rig``); decoding splits it.
* :class:`MVDreamLayout` (mvdream): a sample is its ``V = 4`` views' latents ``[V, 4, h, w]``.
  The UNet sees the ``B * V`` latents as a batch (the views of a sample contiguous), the text
  repeated per view, each view's camera (the flattened 4x4 camera-to-world,
  ``geometry.conventions.mvdream_from_cameras``) and ``num_frames = V``, as the port's
  ``pipeline_mvdream.py`` calls its ``MultiViewUNetModel``; each view decodes on its own.
"""

from __future__ import annotations

import torch

from geometry.cameras import GRID_DISTANCE, GRID_FOV_DEG, Cameras, grid_rig
from geometry.conventions import MVDREAM_AZIMUTHS_DEG, mvdream_cameras, mvdream_from_cameras
from policy.grid import grid_to_views

# MVDream's default views: elevation 15 deg is the default of MVDream's get_camera
# (bytedance/MVDream mvdream/camera_utils.py) and of its scripts/t2i.py (the port's pipeline
# defaults to 0); azimuths 0, 90, 180, 270 from azimuth 0 (the port's get_camera; t2i.py starts
# at 90).  MVDream's conditioning has no distance or field of view (unit-sphere cameras): the
# views are placed as the grid rig's, 2.7 units away with a 50 deg vertical fov.
MVDREAM_ELEVATION_DEG = 15.0
MVDREAM_DISTANCE = GRID_DISTANCE
MVDREAM_FOV_DEG = GRID_FOV_DEG


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents ``[N, 4, h, w]`` -> images ``[N, 3, H, W]`` in about [-1, 1], in the VAE's dtype."""
    cfg = vae.config
    latents = latents / cfg.scaling_factor
    if getattr(cfg, "shift_factor", None):
        latents = latents + cfg.shift_factor
    return vae.decode(latents.to(vae.dtype)).sample


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    return (images.float().clamp(-1, 1) + 1) / 2


class GridLayout:
    """One image per sample, the 2x2 grid of four views (pixel-grid, sd-grid, sdxl-grid)."""

    def __init__(self, unet_config, vae=None):
        self.sample_shape = (unet_config.in_channels, unet_config.sample_size, unet_config.sample_size)
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_size = unet_config.sample_size * scale  # the grid's side in pixels

    @property
    def cameras(self) -> Cameras:
        return grid_rig()

    def model_output(self, unet, x: torch.Tensor, t: torch.Tensor, conditioning) -> torch.Tensor:
        """``x`` [N, C, H, W], ``t`` [N], one conditioning row per sample -> model output like ``x``."""
        return unet(x, t, **conditioning.unet_kwargs()).sample

    def decode(self, x0: torch.Tensor, vae) -> torch.Tensor:
        if vae is not None:
            x0 = vae_decode(vae, x0)
        return grid_to_views(to_unit_range(x0))  # [B, 3, H, W]: the family's one image


class MVDreamLayout:
    """``V`` views per sample, each its own latent; the UNet attends across them (mvdream)."""

    def __init__(self, unet_config, vae, elevation_deg: float = MVDREAM_ELEVATION_DEG,
                 distance: float = MVDREAM_DISTANCE, fov_deg: float = MVDREAM_FOV_DEG):
        self._cameras = mvdream_cameras(elevation_deg, distance, fov_deg, MVDREAM_AZIMUTHS_DEG)
        self.num_views = self._cameras.num_views
        # What MVDream is conditioned on: each view's camera-to-world, flattened row-major.
        self.camera_conditioning = mvdream_from_cameras(self._cameras).flatten(1)  # [V, 16]
        side = unet_config.image_size  # the latent side MVDream was trained at (32: 256 px views)
        self.sample_shape = (self.num_views, unet_config.in_channels, side, side)
        self.image_size = side * 2 ** (len(vae.config.block_out_channels) - 1)  # one view's side

    @property
    def cameras(self) -> Cameras:
        return Cameras(self._cameras.c2w.clone(), self._cameras.fov_deg)

    def model_output(self, unet, x: torch.Tensor, t: torch.Tensor, conditioning) -> torch.Tensor:
        """``x`` [N, V, C, h, w], ``t`` [N], one conditioning row per sample -> output like ``x``."""
        n, v = x.shape[:2]
        camera = self.camera_conditioning.to(x.device).repeat(n, 1)  # [N * V, 16], views of a sample contiguous
        out = unet(x.flatten(0, 1), t.repeat_interleave(v), conditioning.hidden_states.repeat_interleave(v, dim=0),
                   camera=camera, num_frames=v).sample
        return out.unflatten(0, (n, v))

    def decode(self, x0: torch.Tensor, vae) -> torch.Tensor:
        """``[B, V, 4, h, w]`` -> views ``[B, V, 3, H, W]``."""
        return to_unit_range(vae_decode(vae, x0.flatten(0, 1))).unflatten(0, x0.shape[:2])


def layout_for(family: str, unet_config, vae=None) -> GridLayout | MVDreamLayout:
    return MVDreamLayout(unet_config, vae) if family == "mvdream" else GridLayout(unet_config, vae)
