"""Tests of the reward service: cameras, renderer, reconstructor, MRC and its CLI.

Runs offline on CPU: LPIPS uses the shipped ImageNet AlexNet (reward_service/weights/).
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from policy.grid import views_to_grid
from reward_service import mrc as mrc_module
from geometry.cameras import (
    GRID_AZIMUTHS_DEG,
    GRID_DISTANCE,
    GRID_ELEVATION_DEG,
    camera_rays,
    grid_rig,
    plucker_rays,
    project_points,
)
from reward_service.mrc import (
    MRCScorer,
    crop_to_box,
    foreground_mask,
    foreground_square_box,
    load_lpips,
    mrc_from_renders,
)
from reward_service.reconstructors import VoxelFitReconstructor, build_reconstructor
from geometry.render import near_far_for, render_field, volume_render

SIZE = 32  # view resolution used by the MRC tests


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fits are far slower when threads wait on a shared core


def two_object_scene(points: torch.Tensor, box_centre=(-0.3, 0.35, 0.15), sphere_rgb=(0.9, 0.1, 0.1)):
    """Analytic field: a red sphere and a blue box beside it, so the 4 views differ."""
    sphere = (points - torch.tensor([0.15, -0.15, -0.05])).norm(dim=-1) < 0.6
    box = ((points - torch.tensor(box_centre)).abs() < 0.35).all(dim=-1)
    density = 60.0 * (sphere | box).float()
    rgb = torch.where(sphere[..., None], torch.tensor(sphere_rgb), torch.tensor([0.1, 0.2, 0.9]))
    return density, rgb.expand(*points.shape[:-1], 3)


def other_scene(points: torch.Tensor):
    return two_object_scene(points, box_centre=(0.3, -0.4, -0.3), sphere_rgb=(0.1, 0.8, 0.1))


@pytest.fixture(scope="module")
def consistent_views() -> torch.Tensor:
    """[4, 3, 32, 32] renders of one object at the grid cameras."""
    return render_field(two_object_scene, grid_rig(), SIZE, SIZE, num_samples=64)


@pytest.fixture(scope="module")
def scorer() -> MRCScorer:
    return MRCScorer(VoxelFitReconstructor())


@pytest.fixture(scope="module")
def scored(scorer, consistent_views):
    """MRC of [consistent, one view from another object, one view with a painted square]."""
    other_object = consistent_views.clone()
    other_object[2] = render_field(other_scene, grid_rig(), SIZE, SIZE, num_samples=64)[2]
    painted = consistent_views.clone()
    painted[1, :, 8:24, 8:24] = torch.tensor([0.1, 0.8, 0.1])[:, None, None]
    with torch.inference_mode():  # the reward is normally computed without autograd
        return scorer.score_views(torch.stack([consistent_views, other_object, painted]), grid_rig())


# ----------------------------------------------------------------------- cameras


def test_grid_rig_positions_follow_azimuth_elevation_distance():
    cameras = grid_rig()
    elevation = math.radians(GRID_ELEVATION_DEG)
    for position, azimuth_deg in zip(cameras.positions, GRID_AZIMUTHS_DEG):
        azimuth = math.radians(azimuth_deg)
        expected = GRID_DISTANCE * torch.tensor(
            [math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation)]
        )
        torch.testing.assert_close(position, expected, atol=1e-5, rtol=0)
    assert cameras.num_views == 4 and cameras.c2w.dtype == torch.float32


def test_cameras_look_at_origin_with_z_up():
    cameras = grid_rig()
    rotation = cameras.c2w[:, :3, :3]
    torch.testing.assert_close(rotation @ rotation.transpose(1, 2), torch.eye(3).expand(4, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(4), atol=1e-5, rtol=0)
    optical_axis = cameras.c2w[:, :3, 2]
    torch.testing.assert_close(optical_axis, -cameras.positions / GRID_DISTANCE, atol=1e-5, rtol=0)
    assert (cameras.c2w[:, 2, 1] < 0).all()  # image-down (+y) points down in the world (-Z)


def test_projection_centre_up_and_right():
    cameras = grid_rig()
    pixels = project_points(cameras, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.5], [0.0, 0.5, 0.0]]), 32, 48)
    torch.testing.assert_close(pixels[:, 0], torch.tensor([24.0, 16.0]).expand(4, 2), atol=1e-4, rtol=0)
    assert (pixels[:, 1, 1] < 16).all()  # +Z appears above the centre
    assert pixels[0, 2, 0] > 24  # from azimuth 0 (on +X), +Y is to the right


def test_camera_rays_centre_ray_points_at_origin():
    cameras = grid_rig()
    origins, directions = camera_rays(cameras, 33, 33)  # odd size: pixel 16 is the centre
    assert origins.shape == directions.shape == (4, 33, 33, 3)
    torch.testing.assert_close(origins[:, 16, 16], cameras.positions)
    torch.testing.assert_close(directions[:, 16, 16], -cameras.positions / GRID_DISTANCE, atol=1e-5, rtol=0)
    torch.testing.assert_close(directions.norm(dim=-1), torch.ones(4, 33, 33))


def test_plucker_rays_layout():
    rays = plucker_rays(grid_rig(), 8, 8)
    assert rays.shape == (4, 6, 8, 8)
    torch.testing.assert_close((rays[:, :3] * rays[:, 3:]).sum(dim=1), torch.zeros(4, 8, 8), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ render


def test_empty_field_renders_background():
    def empty(points):
        return torch.zeros(points.shape[:-1]), torch.zeros(*points.shape[:-1], 3)

    images = render_field(empty, grid_rig(), 8, 8, num_samples=16)
    assert torch.equal(images, torch.ones(4, 3, 8, 8))
    origins, directions = camera_rays(grid_rig(), 4, 4)
    rgb, opacity = volume_render(empty, origins, directions, 1.0, 4.0, 8, background=0.0)
    assert torch.equal(rgb, torch.zeros_like(rgb)) and torch.equal(opacity, torch.zeros_like(opacity))


def test_opaque_sphere_renders_colour_at_centre_and_white_at_corners():
    green = torch.tensor([0.2, 0.7, 0.3])

    def sphere(points):
        return 1e3 * (points.norm(dim=-1) < 0.5).float(), green.expand(*points.shape[:-1], 3)

    images = render_field(sphere, grid_rig(), 33, 33, num_samples=128)
    torch.testing.assert_close(images[:, :, 16, 16], green.expand(4, 3), atol=1e-3, rtol=0)
    assert torch.equal(images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]], torch.ones(4, 3, 4))


def test_batched_field_renders_one_scene_per_row():
    def batched(points):  # scene 0 empty, scene 1 a dense black ball
        ball = (points.norm(dim=-1) < 0.8).float() * torch.tensor([0.0, 1e3]).view(2, 1, 1)
        return ball, torch.zeros(*points.shape[:-1], 3)

    images = render_field(batched, grid_rig(), 9, 9, num_samples=32, batch_size=2)
    assert images.shape == (2, 4, 3, 9, 9)
    assert torch.equal(images[0], torch.ones(4, 3, 9, 9)) and images[1, :, :, 4, 4].max() < 1e-3


def test_near_far_bounds_unit_sphere():
    near, far = near_far_for(grid_rig())
    assert 0.05 <= near < GRID_DISTANCE - 1.0 and far > GRID_DISTANCE + 1.0


# --------------------------------------------------------------------------- box


def view_with_foreground(rows: slice, cols: slice, size: int = 64) -> torch.Tensor:
    view = torch.ones(3, size, size)
    view[0, rows, cols] = 0.2
    return view


def test_box_of_empty_view_is_reference_corner():
    assert foreground_square_box(torch.ones(3, 64, 64)) == (0, 0, 5, 5)


def test_box_tall_is_widened_evenly():
    # rows 10..29 (extent 19), cols 20..23 (extent 3): widen by 16, 8 each side, then pad 5
    assert foreground_square_box(view_with_foreground(slice(10, 30), slice(20, 24))) == (7, 5, 36, 34)


def test_box_wide_is_heightened_evenly():
    assert foreground_square_box(view_with_foreground(slice(20, 24), slice(10, 30))) == (5, 7, 34, 36)


def test_box_odd_difference_goes_top_and_left():
    # width extent 4 vs height 19: grow 15 = 8 to the left + 7 to the right
    assert foreground_square_box(view_with_foreground(slice(10, 30), slice(20, 25))) == (20 - 8 - 5, 5, 24 + 7 + 5, 34)
    # height extent 4 vs width 19: grow 15 = 8 on top + 7 at the bottom
    assert foreground_square_box(view_with_foreground(slice(20, 25), slice(10, 30))) == (5, 20 - 8 - 5, 34, 24 + 7 + 5)


def test_box_clamps_at_the_border_after_squaring():
    # rows 0..3, cols 0..40: squaring moves y_min to -19, padding to -24, clamped to 0
    assert foreground_square_box(view_with_foreground(slice(0, 4), slice(0, 41))) == (0, 0, 45, 26)
    assert foreground_square_box(view_with_foreground(slice(50, 64), slice(50, 64))) == (45, 45, 63, 63)


def test_box_threshold_is_any_channel_below():
    view = torch.ones(3, 64, 64)
    view[:, 29:32, 29:32] = 0.96  # light grey: background
    view[2, 39:42, 39:42] = 0.94  # one channel below 0.95: foreground
    assert foreground_square_box(view) == (34, 34, 46, 46)


def speckled_view() -> torch.Tensor:
    view = view_with_foreground(slice(20, 40), slice(20, 40))
    generator = torch.Generator().manual_seed(0)
    speckle = torch.rand(64, 64, generator=generator) < 0.02
    view[1][speckle] = 0.5
    view[1, 2:4, 60] = 0.5  # a 2-px streak is speckle too
    return view


def test_box_of_speckled_view_is_the_reference_box_unless_opened():
    view = speckled_view()
    # The reference counts every speck: the box spans the speckle, clamped to the image.
    rows, cols = torch.nonzero((view < 0.95).any(dim=0), as_tuple=True)
    assert foreground_square_box(view) == (max(int(cols.min()) - 5, 0), max(int(rows.min()) - 5, 0), 63, 63)
    # The opening (reward.foreground_opening) keeps only the solid square.
    assert foreground_square_box(view, opening=True) == (15, 15, 44, 44)
    assert foreground_mask(view, opening=True).sum() == 400
    assert foreground_mask(view).sum() == (view < 0.95).any(dim=0).sum()


def reference_box(mask: np.ndarray, pad: int = 5) -> tuple[int, int, int, int]:
    """REFERENCES.md's box, written independently of reward_service.mrc (numpy, step by step)."""
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = (xs.min(), xs.max(), ys.min(), ys.max()) if len(xs) else (0, 0, 0, 0)
    h, w = y1 - y0, x1 - x0
    if h < w:  # grow the height; the odd pixel goes to the top
        y0, y1 = y0 - (w - h + 1) // 2, y1 + (w - h) // 2
    elif w < h:  # grow the width; the odd pixel goes to the left
        x0, x1 = x0 - (h - w + 1) // 2, x1 + (h - w) // 2
    return max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + pad, width - 1), min(y1 + pad, height - 1)


def test_box_matches_the_reference_on_random_masks():
    rng = np.random.default_rng(0)
    for trial in range(300):
        size = int(rng.choice([32, 33, 64]))
        view = torch.ones(3, size, size)
        mask = rng.random((size, size)) < rng.choice([0.0, 0.001, 0.01, 0.05])
        if trial % 3 == 0:  # a solid block, sometimes at the border
            y, x = rng.integers(0, size, 2)
            mask[y:y + rng.integers(1, 20), x:x + rng.integers(1, 20)] = True
        view[int(rng.integers(3))][torch.from_numpy(mask)] = float(rng.uniform(0, 0.94))
        assert foreground_square_box(view) == reference_box(mask), f"trial {trial}"


def test_crop_to_box_resizes_and_clamps():
    image = torch.rand(3, 64, 64)
    crop = crop_to_box(image, (10, 10, 29, 29), 32)
    assert crop.shape == (3, 32, 32) and crop.min() >= 0 and crop.max() <= 1
    constant = crop_to_box(torch.full((3, 64, 64), 0.3), (0, 0, 63, 63), 32)
    torch.testing.assert_close(constant, torch.full((3, 32, 32), 0.3))


# ------------------------------------------------------------------------- LPIPS


def test_lpips_random_backbone_warns_only_without_the_shipped_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(mrc_module, "SHIPPED_LPIPS_FILE", tmp_path / "missing.safetensors")
    with pytest.warns(UserWarning, match="RANDOM AlexNet backbone"):
        model, warning = load_lpips()
    assert "NOT comparable" in warning and not any(p.requires_grad for p in model.parameters())


def alexnet_features_state(seed: int) -> dict[str, torch.Tensor]:
    """The ``features.*`` part of a torchvision AlexNet state dict (random weights)."""
    import torchvision

    torch.manual_seed(seed)
    return {k: v for k, v in torchvision.models.alexnet().state_dict().items() if k.startswith("features.")}


def test_lpips_loads_backbone_file_and_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    state = alexnet_features_state(seed=1)
    path = tmp_path / "alexnet.pth"
    torch.save(state, path)
    model, warning = load_lpips(str(path))
    assert warning is None
    torch.testing.assert_close(dict(model.net.named_parameters())["slice2.3.weight"], state["features.3.weight"])
    hub_file = tmp_path / "hub" / "checkpoints" / mrc_module.ALEXNET_HUB_FILE
    hub_file.parent.mkdir(parents=True)
    torch.save(state, hub_file)
    model, warning = load_lpips()
    assert warning is None
    torch.testing.assert_close(dict(model.net.named_parameters())["slice5.10.weight"], state["features.10.weight"])


def test_lpips_backbone_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_lpips(str(tmp_path / "missing.pth"))
    torch.save({"weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision AlexNet"):
        load_lpips(str(tmp_path / "bad.pth"))


# --------------------------------------------------------------------------- MRC


def test_mrc_of_identical_renders_is_zero(scorer, consistent_views):
    views = consistent_views[None]
    assert mrc_from_renders(views, views.clone(), scorer.lpips).abs().max() < 1e-6


def test_mrc_consistent_views_score_lower_than_corrupted(scored):
    consistent, other_object, painted = scored.mrc.tolist()
    assert consistent < other_object and consistent < painted
    assert scored.per_view_lpips.shape == (3, 4) and scored.rerenders.shape == (3, 4, 3, SIZE, SIZE)
    assert 0 <= scored.rerenders.min() and scored.rerenders.max() <= 1
    torch.testing.assert_close(scored.reward, -scored.mrc)


def test_voxel_fit_is_deterministic_and_batch_independent(consistent_views):
    reconstructor = VoxelFitReconstructor(steps=5)
    cameras = grid_rig()
    alone = reconstructor.reconstruct(consistent_views[None], cameras).render(cameras, SIZE, SIZE)
    batch = torch.stack([consistent_views, consistent_views.flip(-1)])
    together = reconstructor.reconstruct(batch, cameras).render(cameras, SIZE, SIZE)
    torch.testing.assert_close(together[0], alone[0], atol=1e-6, rtol=0)


# ----------------------------------------------------------- build_reconstructor


def test_build_reconstructor_by_name_and_import_path():
    assert isinstance(build_reconstructor("voxel", steps=3), VoxelFitReconstructor)
    built = build_reconstructor("reward_service.reconstructors:VoxelFitReconstructor", resolution=8)
    assert isinstance(built, VoxelFitReconstructor) and built.resolution == 8
    with pytest.raises(ValueError, match="voxel.*package.module:Attr"):
        build_reconstructor("nope")
    with pytest.raises(TypeError, match="reconstruct"):
        build_reconstructor("collections:OrderedDict")


# --------------------------------------------------------------------------- CLI


def save_grid(views: torch.Tensor, path) -> None:
    grid = views_to_grid(views).permute(1, 2, 0)
    Image.fromarray((grid * 255).round().to(torch.uint8).numpy()).save(path)


def test_cli_scores_good_files_and_reports_bad_ones(tmp_path, consistent_views, capsys):
    good = tmp_path / "good.png"
    save_grid(consistent_views, good)
    rgba = tmp_path / "rgba.png"
    Image.open(good).convert("RGBA").save(rgba)
    dark = tmp_path / "dark.png"
    save_grid(consistent_views * 0.5, dark)  # grey background
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    odd = tmp_path / "odd.png"
    Image.new("RGB", (65, 64), "white").save(odd)
    out = tmp_path / "report.json"
    paths = [good, rgba, dark, corrupt, odd, tmp_path / "missing.png"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = ["--save-rerenders", "--out", str(out), "--reconstructor", "voxel",
                   "--reconstructor-options", '{"steps": 20}']
        code = mrc_module.main([str(p) for p in paths] + options)

    report = json.loads(capsys.readouterr().out)
    assert code == 1 and json.loads(out.read_text()) == report
    entries = {entry["path"]: entry for entry in report["images"]}
    assert entries[str(good)]["mrc"] == pytest.approx(entries[str(rgba)]["mrc"])
    assert len(entries[str(good)]["per_view_lpips"]) == 4
    assert Image.open(entries[str(good)]["rerender_path"]).size == (2 * SIZE, 2 * SIZE)
    assert "cannot read" in entries[str(corrupt)]["error"]
    assert "even" in entries[str(odd)]["error"]
    assert "not found" in entries[str(tmp_path / "missing.png")]["error"]
    joined = "\n".join(report["warnings"])
    assert f"{dark}: " in joined and "white background" in joined
    assert f"{rgba}: image mode RGBA converted" in joined
    assert "RANDOM AlexNet backbone" not in joined  # the shipped ImageNet backbone


def test_cli_exit_code_2_when_nothing_readable(tmp_path, capsys):
    Image.new("RGB", (128, 64), "white").save(tmp_path / "wide.png")
    assert mrc_module.main([str(tmp_path / "wide.png"), str(tmp_path / "missing.png")]) == 2
    report = json.loads(capsys.readouterr().out)
    assert "not square" in report["images"][0]["error"]
