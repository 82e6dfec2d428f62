"""The camera convention of the whole project (reward, renderers, later LRM).

Conventions, fixed here once:

* World: right-handed, +Z up, the object centred at the origin and expected
  inside the unit sphere.  Azimuth is measured in the XY plane from +X towards
  +Y; elevation from the XY plane towards +Z.
* Camera frame: OpenCV -- x right, y down, z forward (the viewing direction).
  ``c2w`` is a 4x4 camera-to-world matrix whose columns are the camera axes
  x, y, z and the camera position, in world coordinates.
* Intrinsics: pinhole, square pixels, *vertical* field of view ``fov_deg``,
  principal point at the image centre; pixel ``(i, j)`` (column i, row j) has
  its centre at ``(i + 0.5, j + 0.5)`` in pixel coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# The 2x2 grid of Instant3D: views in grid order (top-left, top-right,
# bottom-left, bottom-right) at these azimuths, one elevation for all.
GRID_AZIMUTHS_DEG: tuple[float, ...] = (0.0, 90.0, 180.0, 270.0)
GRID_ELEVATION_DEG = 20.0
# The paper does not publish distance and field of view, so we pick them: at
# distance 2.7 with a 50 degree vertical fov the frame's half-extent in the
# plane through the origin is 2.7 * tan(25 deg) = 1.26 world units, and the
# unit sphere's silhouette (half-angle asin(1/2.7) = 21.7 deg) covers
# tan(21.7)/tan(25) = 85% of the half-frame: the whole object is in view with
# a ~7% margin on each side, and it still fills most of the image.
GRID_DISTANCE = 2.7
GRID_FOV_DEG = 50.0


@dataclass(frozen=True, eq=False)  # eq on tensors is ambiguous; compare c2w explicitly
class Cameras:
    """``V`` pinhole cameras sharing one vertical field of view."""

    c2w: Tensor  # [V, 4, 4] float32, OpenCV camera-to-world
    fov_deg: float

    @property
    def num_views(self) -> int:
        return self.c2w.shape[0]

    @property
    def positions(self) -> Tensor:
        """Camera centres in world coordinates, ``[V, 3]``."""
        return self.c2w[:, :3, 3]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    def to(self, device: torch.device | str) -> Cameras:
        return Cameras(self.c2w.to(device), self.fov_deg)

    def focal_px(self, height: int) -> float:
        """Focal length in pixels for an image ``height`` pixels tall (fov is vertical)."""
        return 0.5 * height / math.tan(math.radians(self.fov_deg) / 2)


def look_at(
    positions: Tensor,
    target: tuple[float, float, float] = (0.0, 0.0, 0.0),
    up: tuple[float, float, float] = (0.0, 0.0, 1.0),
) -> Tensor:
    """OpenCV camera-to-world matrices ``[V, 4, 4]`` for cameras at ``positions [V, 3]``
    looking at ``target`` with image-up along ``up`` (so image-down, +y, is along -up).

    A camera looking exactly along ``up`` has no defined roll; it falls back to
    +Y as the up vector so the matrix stays a rotation.
    """
    positions = positions.to(torch.float32)
    target_t = torch.tensor(target, dtype=torch.float32, device=positions.device)
    up_t = torch.tensor(up, dtype=torch.float32, device=positions.device).expand_as(positions)
    forward = torch.nn.functional.normalize(target_t - positions, dim=-1)  # camera +z
    right = torch.linalg.cross(forward, up_t, dim=-1)  # camera +x
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    y_axis = torch.tensor([0.0, 1.0, 0.0], device=positions.device).expand_as(forward)
    fallback = torch.linalg.cross(forward, y_axis, dim=-1)
    right = torch.nn.functional.normalize(torch.where(degenerate, fallback, right), dim=-1)
    down = torch.linalg.cross(forward, right, dim=-1)  # camera +y
    c2w = torch.eye(4, dtype=torch.float32, device=positions.device).repeat(len(positions), 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, down, forward, positions
    return c2w


def orbit_positions(azimuths_deg: Tensor, elevations_deg: Tensor, distance: float) -> Tensor:
    """Points on a sphere of radius ``distance`` around the origin, ``[V, 3]``."""
    azimuth, elevation = torch.deg2rad(azimuths_deg), torch.deg2rad(elevations_deg)
    return distance * torch.stack(
        [
            torch.cos(elevation) * torch.cos(azimuth),
            torch.cos(elevation) * torch.sin(azimuth),
            torch.sin(elevation),
        ],
        dim=-1,
    )


def orbit_cameras(
    azimuths_deg: Tensor | list[float] | tuple[float, ...],
    elevations_deg: Tensor | list[float] | tuple[float, ...] | float,
    distance: float,
    fov_deg: float,
) -> Cameras:
    """Cameras on an orbit around the origin, all looking at it with +Z up."""
    azimuths = torch.as_tensor(azimuths_deg, dtype=torch.float32)
    elevations = torch.as_tensor(elevations_deg, dtype=torch.float32).expand_as(azimuths)
    return Cameras(look_at(orbit_positions(azimuths, elevations, distance)), float(fov_deg))


def grid_rig(
    distance: float = GRID_DISTANCE,
    fov_deg: float = GRID_FOV_DEG,
    elevation_deg: float = GRID_ELEVATION_DEG,
) -> Cameras:
    """The four cameras of the 2x2 grid, in grid order (azimuth 0, 90, 180, 270)."""
    return orbit_cameras(GRID_AZIMUTHS_DEG, elevation_deg, distance, fov_deg)


def pixel_directions_camera(cameras: Cameras, height: int, width: int) -> Tensor:
    """Unnormalised ray directions in the camera frame, ``[H, W, 3]`` with z = 1."""
    focal = cameras.focal_px(height)
    cols = (torch.arange(width, dtype=torch.float32, device=cameras.device) + 0.5 - width / 2) / focal
    rows = (torch.arange(height, dtype=torch.float32, device=cameras.device) + 0.5 - height / 2) / focal
    y, x = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([x, y, torch.ones_like(x)], dim=-1)


def camera_rays(cameras: Cameras, height: int, width: int) -> tuple[Tensor, Tensor]:
    """World-space rays through every pixel centre.

    Returns ``origins [V, H, W, 3]`` and unit ``directions [V, H, W, 3]``, so a
    distance ``t`` along a ray is a world distance.
    """
    local = pixel_directions_camera(cameras, height, width)  # [H, W, 3]
    rotation = cameras.c2w[:, :3, :3]  # [V, 3, 3]
    directions = torch.einsum("vij,hwj->vhwi", rotation, local)
    directions = torch.nn.functional.normalize(directions, dim=-1)
    origins = cameras.positions[:, None, None, :].expand_as(directions)
    return origins, directions


def project_points(cameras: Cameras, points: Tensor, height: int, width: int) -> Tensor:
    """Continuous pixel coordinates ``[V, N, 2]`` (x = column, y = row) of world
    ``points [N, 3]`` in each camera; the image centre is ``(width/2, height/2)``
    and pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)``."""
    w2c = torch.linalg.inv(cameras.c2w)  # [V, 4, 4]
    homogeneous = torch.cat([points, torch.ones_like(points[:, :1])], dim=-1)
    local = torch.einsum("vij,nj->vni", w2c, homogeneous)[..., :3]
    centre = torch.tensor([width / 2, height / 2], dtype=local.dtype, device=local.device)
    return cameras.focal_px(height) * local[..., :2] / local[..., 2:3] + centre


def plucker_rays(cameras: Cameras, height: int, width: int) -> Tensor:
    """Plucker ray embedding ``[V, 6, H, W]`` = (direction, origin x direction):
    the per-pixel camera conditioning a feed-forward LRM consumes."""
    origins, directions = camera_rays(cameras, height, width)
    moment = torch.linalg.cross(origins, directions, dim=-1)
    return torch.cat([directions, moment], dim=-1).permute(0, 3, 1, 2).contiguous()
