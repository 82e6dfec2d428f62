"""Tests of the LGM reconstructor (reward_service/lgm.py), on CPU with the 'test' preset.

The public code's facts come from tests/data/lgm_public_reference.py, which ran the public
3DTopia/LGM itself: its 'big' model's key -> shape list (lgm_big_keys.json), its forward pass on
fixed weights and its default input rays (lgm_public_reference.json).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from geometry.cameras import Cameras, grid_rig, orbit_cameras
from geometry.conventions import LGM_FOVY_DEG, lgm_scale, mvdream_cameras, mvdream_views_to_lgm
from geometry.views import views_as_uint8
from reward_service.lgm import (
    LGM,
    LGM_PRESETS,
    PUBLIC_PRESETS,
    GaussianField,
    LGMOptions,
    LGMReconstructor,
    LGMWeightsError,
    lgm_rays,
    load_lgm,
    model_shapes,
    save_lgm,
)
from reward_service.reconstructors import RadianceField, build_reconstructor
from reward_service.rewards import MRCReward

DATA = Path(__file__).resolve().parent / "data"
SIZE = 32  # view and render size (the 'test' preset's input size; LPIPS needs >= 32 px)


def reference_module():
    spec = importlib.util.spec_from_file_location("lgm_public_reference", DATA / "lgm_public_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFERENCE = json.loads((DATA / "lgm_public_reference.json").read_text())


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fits are far slower when threads wait on a shared core


def reference_model(seed: int = 0) -> LGM:
    """The 'test' network with the reference's deterministic weights (varied, non-degenerate)."""
    model = LGM("test").eval()
    model.load_state_dict(reference_module().reference_state(model_shapes(model.options), seed=seed))
    return model


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_lgm(reference_model(), tmp_path_factory.mktemp("lgm") / "model.safetensors")


@pytest.fixture(scope="module")
def reconstructor(weights) -> LGMReconstructor:
    return LGMReconstructor(weights=weights, preset="test")


def square_views(batch: int = 2, num_views: int = 4, size: int = SIZE) -> torch.Tensor:
    """White views with a coloured square, placed and coloured differently in each view."""
    views = torch.ones(batch, num_views, 3, size, size)
    rng = np.random.RandomState(0)
    for b in range(batch):
        for v in range(num_views):
            x, y = rng.randint(4, size // 2, size=2)
            colour = torch.tensor(rng.uniform(0, 0.8, size=3), dtype=torch.float32)
            views[b, v, :, y:y + size // 3, x:x + size // 3] = colour[:, None, None]
    return views


# --------------------------------------------------------------------- the public definition


def test_big_model_has_the_public_keys_and_shapes():
    """Built on the meta device: the same key -> shape list, in the same order, as the public
    LGM with config_defaults['big'] (what the released checkpoint holds)."""
    data = json.loads((DATA / "lgm_big_keys.json").read_text())
    assert data["source"]["repository"] == "3DTopia/LGM"
    ours = [[key, list(shape)] for key, shape in model_shapes(LGM_PRESETS["big"]).items()]
    assert ours == data["keys"]
    assert sum(int(np.prod(shape)) for _, shape in ours) == data["source"]["num_parameters"] == 415_042_848
    assert {key.split(".")[0] for key, _ in ours} == {"unet", "conv"}  # no LPIPS, no renderer


def test_public_presets_validate_and_bad_options_are_named():
    for name in PUBLIC_PRESETS:
        options = LGM_PRESETS[name]
        assert options.input_size == 256 and options.fovy == 49.1 and options.cam_radius == 1.5
    assert LGM_PRESETS["big"].splat_size == 128 and LGM_PRESETS["lrm"].splat_size == 64
    with pytest.raises(ValueError, match="splat images, not splat_size 32"):
        LGMOptions(splat_size=32)
    with pytest.raises(ValueError, match="up block 1 layer 0 expects a 32-channel skip, the down path gives 64"):
        LGMOptions(input_size=32, down_channels=(32, 64, 64), down_attention=(False,) * 3, up_channels=(64, 32),
                   up_attention=(False, False), splat_size=16)


def test_forward_matches_the_public_code():
    """The public LGM.forward_gaussians on the same weights and inputs (lgm_public_reference.py)."""
    reference = reference_module()
    assert REFERENCE["options"] == {k: list(v) if isinstance(v, tuple) else v
                                    for k, v in reference.SMALL_OPTIONS.items()}
    with torch.no_grad():
        gaussians = reference_model(seed=reference.SEED).forward_gaussians(reference.reference_images())
    expected = REFERENCE["gaussians"]
    assert gaussians.shape == (2, 4 * 16 * 16, 14)
    torch.testing.assert_close(gaussians[:, ::expected["stride"]], torch.tensor(expected["subset"]),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gaussians.mean(dim=1), torch.tensor(expected["mean"]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gaussians.std(dim=1), torch.tensor(expected["std"]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("elevation", [0.0, 20.0])
@pytest.mark.parametrize("distance", [1.5, 2.7])
def test_default_mvdream_cameras_give_lgms_default_rays(elevation, distance):
    """MVDream's cameras at LGM's fov, at any distance, reordered into LGM's slots as app.py
    does: exactly LGM's prepare_default_rays(elevation=-elevation) (kiui's sign), as the public
    code computed it."""
    cameras = mvdream_cameras(elevation, distance, LGM_FOVY_DEG)
    slots = Cameras(mvdream_views_to_lgm(cameras.c2w), cameras.fov_deg)
    rays = REFERENCE["rays"]
    expected = torch.tensor(rays["elevations_kiui"][str(0.0 - elevation)])
    torch.testing.assert_close(lgm_rays(slots, lgm_scale(distance), rays["size"]), expected, atol=1e-6, rtol=0)
    # The project's grid rig is MVDream's default cameras (fov 50 rather than LGM's 49.1).
    torch.testing.assert_close(mvdream_cameras(20.0, 2.7, 50.0).c2w, grid_rig().c2w, atol=1e-6, rtol=0)


# --------------------------------------------------------------------- weights


def test_save_and_load_round_trip_in_the_public_layout(tmp_path, weights):
    model = reference_model()
    state = load_file(str(weights))
    assert list(state) and all(key.startswith(("unet.", "conv.")) for key in state)
    assert {k: tuple(v.shape) for k, v in state.items()} == model_shapes(LGM_PRESETS["test"])
    loaded = load_lgm(weights, preset="test")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    # A directory, float16 (as the release), and a checkpoint that still holds LPIPS weights.
    half = save_lgm(model, tmp_path / "dir", dtype=torch.float16)
    assert half == tmp_path / "dir" / "model.safetensors"
    assert load_lgm(tmp_path / "dir", preset="test", dtype=torch.float16).conv.weight.dtype == torch.float16
    with_lpips = {**state, "lpips_loss.net.slice1.0.weight": torch.zeros(64, 3, 3, 3)}
    save_file(with_lpips, str(tmp_path / "model_fp16_fixrot.safetensors"))
    assert torch.equal(load_lgm(tmp_path, preset="test").conv.bias, model.conv.bias)


def test_bad_weights_give_a_clear_error(tmp_path, weights):
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist.*model_fp16_fixrot"):
        LGMReconstructor(weights=tmp_path / "missing.safetensors", preset="test")
    with pytest.raises(FileNotFoundError, match="needs weights=FILE or DIR"):
        LGMReconstructor(preset="test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model_fp16_fixrot.safetensors"):
        load_lgm(tmp_path / "empty", preset="test")
    # Another preset's file: the keys are named, and so is the preset that fits.
    with pytest.raises(LGMWeightsError, match=r"do not match preset 'tiny'.*missing \(e\.g\. unet\.down_blocks"
                                              r".*fits preset 'test': pass preset='test'"):
        load_lgm(weights, preset="tiny")
    # A changed shape and a stray key, named; no preset fits.
    state = load_file(str(weights))
    state["conv.weight"] = torch.zeros(14, 14, 3, 3)
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "changed.safetensors"))
    with pytest.raises(LGMWeightsError, match=r"1 unexpected \(e\.g\. extra\.weight\).*conv\.weight: file "
                                              r"\[14, 14, 3, 3\] != model \[14, 14, 1, 1\].*Fix: pass the preset"):
        load_lgm(tmp_path / "changed.safetensors", preset="test")
    # The pre-fix release file loads, with a warning that names the fixed one.
    save_file(load_file(str(weights)), str(tmp_path / "model_fp16.safetensors"))
    with pytest.warns(UserWarning, match="rotation-normalisation fix.*model_fp16_fixrot"):
        load_lgm(tmp_path / "model_fp16.safetensors", preset="test")
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(LGMWeightsError, match="cannot read .*broken.safetensors as safetensors"):
        load_lgm(tmp_path / "broken.safetensors", preset="test")


# --------------------------------------------------------------------- reconstruction


def test_reconstruct_renders_views_deterministically(reconstructor):
    views, cameras = square_views(), grid_rig()
    field = reconstructor.reconstruct(views, cameras)
    assert isinstance(field, GaussianField) and isinstance(field, RadianceField)
    assert field.gaussians.means.shape == (2, 4 * 16 * 16, 3) and field.scale == pytest.approx(1.5 / 2.7)
    renders = field.render(cameras, SIZE, SIZE)
    assert renders.shape == (2, 4, 3, SIZE, SIZE)
    assert renders.min() >= 0 and renders.max() <= 1 and renders.std() > 0.01
    assert torch.equal(renders, reconstructor.reconstruct(views, cameras).render(cameras, SIZE, SIZE))
    # Any cameras and sizes render; a sample does not depend on its batch mates.
    other = orbit_cameras([30.0, 150.0], 10.0, 3.0, 40.0)
    assert field.render(other, 24, 24).shape == (2, 2, 3, 24, 24)
    alone = reconstructor.reconstruct(views[1:], cameras).render(cameras, SIZE, SIZE)
    torch.testing.assert_close(alone[0], renders[1], atol=1e-5, rtol=0)
    # Back in the project's world, the Gaussians render the same images.
    from geometry.splatting import render_gaussians

    project, _ = render_gaussians(field.in_project_world(), cameras, SIZE, SIZE, near=0.2 / field.scale)
    torch.testing.assert_close(project, renders, atol=1e-4, rtol=0)


def test_view_order_does_not_matter(reconstructor):
    """No view-index embedding: the cameras enter only through the rays, so permuting the views
    with their cameras permutes the Gaussians and leaves the renders as they were."""
    views, cameras = square_views(batch=1), grid_rig()
    order = [2, 0, 3, 1]
    first = reconstructor.reconstruct(views, cameras)
    permuted = reconstructor.reconstruct(views[:, order], Cameras(cameras.c2w[order], cameras.fov_deg))

    def per_view(field: GaussianField) -> torch.Tensor:  # [B, V, splat^2, 14]
        g = field.gaussians
        packed = torch.cat([g.means, g.opacities[..., None], g.scales, g.rotations, g.colors], dim=-1)
        return packed.reshape(1, 4, -1, 14)

    torch.testing.assert_close(per_view(permuted), per_view(first)[:, order], atol=1e-4, rtol=0)
    # Renders agree up to the compositing order of Gaussians at equal depth (positions clamped
    # onto the cube's faces tie), which float noise in the network's output can swap.
    difference = (permuted.render(cameras, SIZE, SIZE) - first.render(cameras, SIZE, SIZE)).abs()
    assert difference.mean() < 1e-4 and difference.max() < 0.02


def test_gradient_with_respect_to_views_is_finite_and_nonzero(reconstructor):
    views = square_views().requires_grad_(True)
    cameras = grid_rig()
    renders = reconstructor.reconstruct(views, cameras).render(cameras, SIZE, SIZE)
    (grad,) = torch.autograd.grad((renders - 0.5).pow(2).mean(), views)
    assert grad.shape == views.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0


def test_mrc_reward_and_its_gradient_through_lgm(weights):
    """reward.kind=mrc with reconstructor lgm: scores uint8 views and gives d reward / d views."""
    assert isinstance(build_reconstructor("lgm", weights=str(weights), preset="test"), LGMReconstructor)
    reward = MRCReward(reconstructor="lgm", reconstructor_options={"weights": str(weights), "preset": "test"})
    assert reward.scorer.reconstructor.device == torch.device("cpu")  # on_device: the reward's device
    views, cameras = square_views(), grid_rig()
    result = reward(views_as_uint8(views), cameras, ["a", "b"])
    assert result.rewards.shape == (2,) and np.isfinite(result.rewards).all() and (result.rewards < 0).all()
    assert result.rerenders.shape == (2, 4, 3, SIZE, SIZE)
    grad = reward.gradient(views[:1], cameras)  # one sample: the backward pass is the slow part
    assert grad.shape == views[:1].shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
