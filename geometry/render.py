"""The project's one volume renderer: emission-absorption along camera rays.

A *field* is any callable ``field(points [..., S, 3]) -> (density [..., S] >= 0,
rgb [..., S, 3] in [0, 1])``.  A *batched* field holds ``B`` independent
scenes and reads the leading dimension of ``points`` as the scene index, i.e.
it receives ``[B, R, S, 3]`` with scene ``b``'s rays in row ``b``.

Deterministic by default (samples at bin midpoints) because the reward must
give the same value for the same images; stratified jitter is opt-in.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from geometry.cameras import Cameras, camera_rays

Field = Callable[[Tensor], tuple[Tensor, Tensor]]

# Rays are rendered in chunks of at most this many sample points so that
# high-resolution renders keep memory bounded (~50 MB per float32 [.., 3] tensor).
MAX_POINTS_PER_CHUNK = 2**22
# Optical depths are capped here: exp(-30) ~ 1e-13 is "fully opaque" for any
# image, and without the cap exp() of deep optical depths yields denormal
# floats, which made CPU fitting ~5x slower.
MAX_OPTICAL_DEPTH = 30.0


def sample_distances(
    near: float,
    far: float,
    num_samples: int,
    shape: tuple[int, ...],
    device: torch.device,
    stratified_generator: torch.Generator | None = None,
) -> Tensor:
    """Distances ``[*shape, S]`` along each ray: midpoints of ``S`` equal bins
    in ``[near, far]``, or one uniform draw per bin when a generator is given."""
    bin_width = (far - near) / num_samples
    starts = near + bin_width * torch.arange(num_samples, dtype=torch.float32, device=device)
    if stratified_generator is None:
        return (starts + 0.5 * bin_width).expand(*shape, num_samples)
    jitter = torch.rand(*shape, num_samples, generator=stratified_generator, device=device)
    return starts + bin_width * jitter


def composite(density: Tensor, rgb: Tensor, deltas: Tensor, background: float) -> tuple[Tensor, Tensor]:
    """Emission-absorption quadrature: ``alpha_i = 1 - exp(-density_i * delta_i)``,
    ``weight_i = alpha_i * prod_{j<i}(1 - alpha_j)``; the remaining transmittance
    shows the constant ``background`` colour.  Returns ``(rgb [..., 3], opacity [...])``."""
    optical_depth = (density * deltas).clamp(max=MAX_OPTICAL_DEPTH)
    alpha = -torch.expm1(-optical_depth)
    # Transmittance before sample i, in log space (exclusive cumulative sum).
    accumulated = torch.cumsum(optical_depth, dim=-1) - optical_depth
    weights = alpha * torch.exp(-accumulated.clamp(max=MAX_OPTICAL_DEPTH))
    opacity = weights.sum(dim=-1)
    color = (weights[..., None] * rgb).sum(dim=-2) + (1.0 - opacity[..., None]) * background
    return color, opacity


def volume_render(
    field: Field,
    origins: Tensor,
    directions: Tensor,
    near: float,
    far: float,
    num_samples: int,
    background: float = 1.0,
    stratified_generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Render rays ``origins/directions [..., 3]`` through ``field`` between the
    distances ``near`` and ``far``; returns ``(rgb [..., 3], opacity [...])``.

    Every sample gets the bin width as its segment length (also when jittered),
    scaled by ``|direction|`` so non-unit directions still integrate world distance.
    """
    distances = sample_distances(
        near, far, num_samples, tuple(origins.shape[:-1]), origins.device, stratified_generator
    )
    points = origins[..., None, :] + distances[..., None] * directions[..., None, :]
    density, rgb = field(points)
    deltas = ((far - near) / num_samples) * directions.norm(dim=-1, keepdim=True)
    return composite(density, rgb, deltas.expand_as(density), background)


def near_far_for(cameras: Cameras, radius: float = 1.0, margin: float = 0.05) -> tuple[float, float]:
    """Ray bounds that enclose the sphere of ``radius`` around the origin from
    every camera of the rig: (closest distance - radius - margin, clamped to
    >= 0.05; farthest distance + radius + margin)."""
    distances = cameras.positions.norm(dim=-1)
    near = max(float(distances.min()) - radius - margin, 0.05)
    far = float(distances.max()) + radius + margin
    return near, far


def render_field(
    field: Field,
    cameras: Cameras,
    height: int,
    width: int,
    num_samples: int,
    batch_size: int | None = None,
    background: float = 1.0,
    near_far: tuple[float, float] | None = None,
) -> Tensor:
    """Images of ``field`` seen by every camera: ``[V, 3, H, W]``, or
    ``[B, V, 3, H, W]`` for a batched field of ``batch_size`` scenes.

    Differentiable; rays go through the field in chunks of at most
    ``MAX_POINTS_PER_CHUNK`` samples (chunking bounds memory only without grad).
    """
    near, far = near_far or near_far_for(cameras)
    origins, directions = camera_rays(cameras, height, width)  # [V, H, W, 3]
    origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
    if batch_size is not None:
        origins = origins.expand(batch_size, -1, -1)
        directions = directions.expand(batch_size, -1, -1)
    rays_per_chunk = max(1, MAX_POINTS_PER_CHUNK // (num_samples * (batch_size or 1)))
    chunks = [
        volume_render(field, o, d, near, far, num_samples, background)[0]
        for o, d in zip(origins.split(rays_per_chunk, dim=-2), directions.split(rays_per_chunk, dim=-2))
    ]
    rgb = torch.cat(chunks, dim=-2)  # [(B,) V*H*W, 3]
    rgb = rgb.reshape(*rgb.shape[:-2], cameras.num_views, height, width, 3)
    return rgb.movedim(-1, -3)
