"""The Gaussian splatting renderer (geometry/splatting.py): analytic images, gradients,
occlusion and multi-view consistency, all on tiny CPU scenes."""

from __future__ import annotations

import math

import pytest
import torch

from geometry.cameras import orbit_cameras
from geometry.splatting import (
    Gaussians,
    quaternion_to_rotation,
    render_gaussians,
    rotation_to_quaternion,
    transform_gaussians,
)

IDENTITY = (1.0, 0.0, 0.0, 0.0)


def gaussians(means, scales, opacities, colors, rotations=None, dtype=torch.float32) -> Gaussians:
    means = torch.as_tensor(means, dtype=dtype)
    if rotations is None:
        rotations = [IDENTITY] * len(means)
    return Gaussians(means, torch.as_tensor(scales, dtype=dtype), torch.as_tensor(rotations, dtype=dtype),
                     torch.as_tensor(opacities, dtype=dtype), torch.as_tensor(colors, dtype=dtype))


def asymmetric_scene(dtype=torch.float32) -> Gaussians:
    """Five anisotropic, rotated Gaussians of different colours, no symmetry."""
    generator = torch.Generator().manual_seed(0)
    return Gaussians(
        means=torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.1, 0.2], [-0.2, 0.4, -0.1],
                            [0.1, -0.5, 0.4], [-0.4, -0.2, -0.3]], dtype=dtype),
        scales=0.05 + 0.15 * torch.rand(5, 3, generator=generator, dtype=dtype),
        rotations=torch.randn(5, 4, generator=generator, dtype=dtype),
        opacities=torch.tensor([0.9, 0.7, 0.8, 0.6, 0.85], dtype=dtype),
        colors=torch.rand(5, 3, generator=generator, dtype=dtype),
    )


@pytest.mark.parametrize("dilation", [0.3, 0.0])
def test_one_isotropic_gaussian_matches_the_analytic_image(dilation):
    size, distance, std, opacity, color = 32, 4.0, 0.05, 0.8, torch.tensor([0.2, 0.4, 0.6])
    cameras = orbit_cameras([0.0], 0.0, distance, 50.0)  # on +X, looking at the origin
    scene = gaussians([[0.0, 0.0, 0.0]], [[std] * 3], [opacity], [color.tolist()])
    rgb, alpha = render_gaussians(scene, cameras, size, size, dilation=dilation)

    variance = (cameras.focal_px(size) * std / distance) ** 2 + dilation  # px^2
    centre = torch.arange(size) + 0.5 - size / 2
    r2 = centre[:, None] ** 2 + centre[None, :] ** 2
    a = opacity * torch.exp(-r2 / (2 * variance))
    expected = (1 - a) * 1.0 + a * color[:, None, None]
    assert rgb.shape == (1, 3, size, size) and alpha.shape == (1, 1, size, size)
    torch.testing.assert_close(rgb[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(alpha[0, 0], a, atol=1e-5, rtol=0)


def test_image_axes_follow_the_opencv_camera():
    """Camera on +X looking at the origin, +Z up: world +Y shows right of centre, +Z above."""
    cameras = orbit_cameras([0.0], 0.0, 4.0, 50.0)
    size = 17  # odd: the image centre 8.5 is a pixel centre
    offset = cameras.focal_px(size) * 0.5 / 4.0  # px: the projection of a 0.5 shift at depth 4
    for mean, expected in {(0.0, 0.5, 0.0): (8, int(8.5 + offset)), (0.0, 0.0, 0.5): (int(8.5 - offset), 8)}.items():
        rgb, _ = render_gaussians(gaussians([mean], [[0.05] * 3], [0.9], [[0.0, 0.0, 0.0]]), cameras, size, size)
        darkest = int(torch.argmin(rgb[0, 0]))
        assert (darkest // size, darkest % size) == expected  # (row, column)


def test_gradients_match_finite_differences():
    scene = gaussians(
        [[0.0, 0.05, -0.05], [0.1, -0.1, 0.1], [-0.1, 0.1, 0.05]],
        [[0.15, 0.1, 0.2], [0.1, 0.2, 0.12], [0.2, 0.15, 0.1]],
        [0.7, 0.5, 0.6], [[0.9, 0.2, 0.1], [0.1, 0.8, 0.3], [0.2, 0.3, 0.9]],
        rotations=[[0.9, 0.1, -0.2, 0.3], [0.7, -0.3, 0.5, 0.1], [1.0, 0.0, 0.0, 0.0]],
        dtype=torch.float64)
    cameras = orbit_cameras([10.0, 100.0], 20.0, 2.0, 50.0)
    inputs = tuple(t.clone().requires_grad_(True) for t in
                   (scene.means, scene.scales, scene.rotations, scene.opacities, scene.colors))

    # Random projections of the image keep gradcheck to a few backward passes (the full
    # Jacobian would be one per pixel and channel).
    weights = torch.rand(3, 2, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def render(*params):
        rgb, alpha = render_gaussians(Gaussians(*params), cameras, 8, 8)
        return (weights * torch.cat([rgb, alpha], dim=1)).flatten(1).sum(-1)

    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_the_nearer_gaussian_occludes_whatever_the_input_order(order):
    cameras = orbit_cameras([0.0], 0.0, 4.0, 50.0)
    near = ([1.0, 0.0, 0.0], 0.9, [1.0, 0.0, 0.0])  # red, between the camera and the blue one
    far = ([-1.0, 0.0, 0.0], 0.8, [0.0, 0.0, 1.0])
    pair = [near, far]
    pair = [pair[i] for i in order]
    scene = gaussians([p[0] for p in pair], [[0.1] * 3] * 2, [p[1] for p in pair], [p[2] for p in pair])
    rgb, alpha = render_gaussians(scene, cameras, 16, 16, dilation=0.0)
    # Pixel (7, 7) is 0.5 px off the centre in x and y: each alpha is opacity * exp(-r^2 / 2 var).
    focal = cameras.focal_px(16)
    a_near = 0.9 * math.exp(-0.5 / (2 * (focal * 0.1 / 3.0) ** 2))
    a_far = 0.8 * math.exp(-0.5 / (2 * (focal * 0.1 / 5.0) ** 2))
    expected = (a_near * torch.tensor([1.0, 0.0, 0.0]) + (1 - a_near) * a_far * torch.tensor([0.0, 0.0, 1.0])
                + (1 - a_near) * (1 - a_far) * 1.0)
    torch.testing.assert_close(rgb[0, :, 7, 7], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(alpha[0, 0, 7, 7], torch.tensor(1 - (1 - a_near) * (1 - a_far)), atol=1e-5, rtol=0)


def test_opacity_is_clamped_at_max_alpha_and_gaussians_behind_the_camera_vanish():
    cameras = orbit_cameras([0.0], 0.0, 4.0, 50.0)
    opaque = gaussians([[0.0, 0.0, 0.0]], [[0.3] * 3], [1.0], [[0.0, 0.0, 0.0]])
    _, alpha = render_gaussians(opaque, cameras, 8, 8)
    assert alpha.max() <= 0.99 + 1e-6
    behind = gaussians([[5.0, 0.0, 0.0]], [[0.3] * 3], [1.0], [[0.0, 0.0, 0.0]])  # x = 5 > 4: behind
    rgb, alpha = render_gaussians(behind, cameras, 8, 8)
    assert torch.equal(rgb, torch.ones_like(rgb)) and torch.equal(alpha, torch.zeros_like(alpha))


def test_chunking_and_background_colour():
    scene = asymmetric_scene()
    cameras = orbit_cameras([0.0, 90.0], 20.0, 2.5, 50.0)
    whole, alpha = render_gaussians(scene, cameras, 16, 16, background=(0.0, 0.5, 1.0))
    chunked, _ = render_gaussians(scene, cameras, 16, 16, background=(0.0, 0.5, 1.0), chunk_size=2)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
    white, _ = render_gaussians(scene, cameras, 16, 16)
    torch.testing.assert_close(whole - white, (1 - alpha) * (torch.tensor([0.0, 0.5, 1.0]) - 1).view(1, 3, 1, 1),
                               atol=1e-6, rtol=0)


def test_four_orbit_views_of_a_turned_scene_are_the_views_turned():
    """Turning the scene by -90 deg about z is the same as moving each camera 90 deg further
    along the orbit: view k of the turned scene is view k+1 of the scene."""
    scene = asymmetric_scene()
    cameras = orbit_cameras([0.0, 90.0, 180.0, 270.0], 20.0, 2.5, 50.0)
    turn = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # -90 deg about z
    rgb, _ = render_gaussians(scene, cameras, 16, 16)
    turned, _ = render_gaussians(transform_gaussians(scene, turn), cameras, 16, 16)
    torch.testing.assert_close(turned, rgb.roll(-1, dims=0), atol=1e-5, rtol=0)
    assert (rgb[0] - rgb[1]).abs().max() > 0.1  # the scene is not symmetric: the check has teeth


def test_a_scene_with_fourfold_symmetry_looks_the_same_from_the_four_orbit_views():
    ring = [[0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [-0.5, 0.0, 0.0], [0.0, -0.5, 0.0]]
    colors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    scene = gaussians(ring + [[0.0, 0.0, 0.3]], [[0.1, 0.1, 0.1]] * 5, [0.8] * 5, colors + [[0.0, 0.0, 1.0]])
    # Azimuths 0/90/180/270: the two Gaussians at equal depth in each view have the same
    # colour, so the (arbitrary) order of depth ties cannot change the images.
    cameras = orbit_cameras([0.0, 90.0, 180.0, 270.0], 20.0, 2.5, 50.0)
    rgb, _ = render_gaussians(scene, cameras, 16, 16)
    # A half turn maps the ring onto itself colour for colour, a quarter turn swaps red and green.
    torch.testing.assert_close(rgb[2], rgb[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(rgb[3], rgb[1], atol=1e-5, rtol=0)
    # and view 1 is view 0 with the red and green channels swapped (the colours alternate).
    torch.testing.assert_close(rgb[1], rgb[0][[1, 0, 2]], atol=1e-5, rtol=0)


def test_a_batch_renders_as_its_scenes_do():
    one, two = asymmetric_scene(), transform_gaussians(asymmetric_scene(), torch.eye(3), 0.7)
    batch = Gaussians(*(torch.stack([getattr(one, f), getattr(two, f)])
                        for f in ("means", "scales", "rotations", "opacities", "colors")))
    cameras = orbit_cameras([0.0, 120.0, 240.0], 10.0, 2.5, 50.0)
    rgb, alpha = render_gaussians(batch, cameras, 12, 12)
    assert rgb.shape == (2, 3, 3, 12, 12) and alpha.shape == (2, 3, 1, 12, 12)
    for b, scene in enumerate((one, two)):
        torch.testing.assert_close(rgb[b], render_gaussians(scene, cameras, 12, 12)[0])


def test_quaternions_round_trip_and_lgm_layout():
    q = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    rotations = quaternion_to_rotation(q)
    torch.testing.assert_close(rotations @ rotations.transpose(1, 2), torch.eye(3).expand(6, 3, 3), atol=1e-6, rtol=0)
    for quaternion, rotation in zip(q, rotations):
        back = rotation_to_quaternion(rotation)
        torch.testing.assert_close(back, quaternion * torch.sign(quaternion[0]), atol=1e-5, rtol=0)
    # A quarter turn about z as (w, x, y, z) = (cos 45, 0, 0, sin 45) maps x to y.
    quarter = quaternion_to_rotation(torch.tensor([math.sqrt(0.5), 0.0, 0.0, math.sqrt(0.5)]))
    torch.testing.assert_close(quarter @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]))
    features = torch.arange(14.0).expand(1, 2, 14)
    unpacked = Gaussians.from_lgm(features)
    assert unpacked.means[0, 0].tolist() == [0, 1, 2] and unpacked.opacities[0, 0].item() == 3
    assert unpacked.scales[0, 0].tolist() == [4, 5, 6] and unpacked.rotations[0, 0].tolist() == [7, 8, 9, 10]
    assert unpacked.colors[0, 0].tolist() == [11, 12, 13]


def test_backend_names_are_checked():
    scene, cameras = asymmetric_scene(), orbit_cameras([0.0], 0.0, 2.5, 50.0)
    with pytest.raises(ValueError, match="backend"):
        render_gaussians(scene, cameras, 4, 4, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="gsplat"):
        render_gaussians(scene, cameras, 4, 4, backend="gsplat")  # CPU tensors: never gsplat
    auto, _ = render_gaussians(scene, cameras, 4, 4, backend="auto")  # CPU: falls back to torch
    torch.testing.assert_close(auto, render_gaussians(scene, cameras, 4, 4)[0])
