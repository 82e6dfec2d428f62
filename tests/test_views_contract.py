"""Issue 18, acceptance 4: rewards receive views and their cameras (``geometry/views.py``), so a
model family with another number of views is scored without any reward code knowing it.

The stand-in for such a family: a MiniCarve scene rendered from three cameras (no grid anywhere),
scored through the reward actor's own entry (``RewardWorker.score`` on a ``RewardInput``, built
from a run config as the driver builds it, in this process).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.batches import RewardInput
from geometry.cameras import GRID_DISTANCE, GRID_FOV_DEG, grid_rig, orbit_cameras
from geometry.views import views_as_float, views_as_uint8
from learner.config import load_config
from learner.driver import reward_worker_args
from minicarve.scenes import Part, Scene, render_scene
from policy.grid import picture, views_to_grid
from reward_service.pool import RewardWorker

# Three cameras that are not the grid rig's (other azimuths, and three of them).
THREE_CAMERAS = orbit_cameras([30.0, 150.0, 270.0], 20.0, GRID_DISTANCE, GRID_FOV_DEG)
SIZE = 32
IDS, PROMPTS = ["consistent", "other-object", "shuffled"], ["a scene"] * 3


@pytest.fixture(scope="module")
def three_views() -> torch.Tensor:
    """uint8 views [3 samples, 3 views, 3, 32, 32] at ``THREE_CAMERAS``: one scene's consistent
    views; the same with view 1 taken from another scene; the consistent views in the wrong
    order (view v no longer taken by camera v)."""
    scene = Scene((Part("cube", "red", "large"), Part("sphere", "blue", "small")), "next to")
    consistent = render_scene(scene, SIZE, THREE_CAMERAS)
    other_object = consistent.clone()
    other_object[1] = render_scene(Scene((Part("cone", "green", "large"),)), SIZE, THREE_CAMERAS)[1]
    return views_as_uint8(torch.stack([consistent, other_object, consistent[[0, 2, 1]]]))


@pytest.fixture(autouse=True)
def torch_threads():
    """A reward actor sets its process's torch threads (reward.torch_threads, 1: the voxel fit
    is several times slower on two busy cores); this process gets its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def reward_worker(*overrides: str) -> RewardWorker:
    """A reward actor's object, built from a run config by the driver's own arguments."""
    return RewardWorker(*reward_worker_args(load_config([*overrides, "reward.alignment=null"])))


@pytest.mark.parametrize("reconstructor", ["voxel", "lrm"])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mrc_scores_three_views_at_their_cameras(three_views, reconstructor):
    # voxel: 40 fit steps are enough to tell the three apart (80, the default, take twice as long)
    options = ["reward.reconstructor_options={steps: 40}"] if reconstructor == "voxel" else []
    worker = reward_worker("reward.kind=mrc", f"reward.reconstructor={reconstructor}", *options)
    result, status = worker.score(RewardInput(IDS, PROMPTS, three_views, THREE_CAMERAS))
    assert result.sample_ids == IDS and status["seconds"] > 0
    assert result.per_view_lpips.shape == (3, 3)
    assert result.rerenders.shape == (3, 3, 3, SIZE, SIZE) and result.rerenders.dtype == np.uint8
    assert np.isfinite(result.rewards).all() and np.array_equal(result.rewards, -result.mrc)
    consistent, other_object, shuffled = result.mrc
    assert consistent < other_object and consistent < shuffled


def test_brightness_and_its_gradient_on_three_views(three_views):
    worker = reward_worker("reward.kind=brightness")
    gradient_views = views_as_float(three_views)[:, None].expand(-1, 2, -1, -1, -1, -1)  # T = 2 states
    result, _ = worker.score(RewardInput(IDS, PROMPTS, three_views, THREE_CAMERAS, gradient_views=gradient_views))
    np.testing.assert_allclose(result.rewards, three_views.double().mean(dim=(1, 2, 3, 4)).numpy() / 255, rtol=1e-6)
    assert result.view_gradients.shape == gradient_views.shape
    np.testing.assert_allclose(result.view_gradients, 1 / three_views[0].numel())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mrc_gradient_on_three_views(three_views):
    """nabla-gfn's reward gradient: d reward / d views at their own cameras (the LRM is differentiable)."""
    worker = reward_worker("reward.kind=mrc", "reward.reconstructor=lrm")
    gradient_views = views_as_float(three_views[:2])[:, None]  # [B, T = 1, V, 3, h, w]
    result, _ = worker.score(RewardInput(IDS[:2], PROMPTS[:2], three_views[:2], THREE_CAMERAS,
                                         gradient_views=gradient_views))
    assert result.view_gradients.shape == (2, 1, 3, 3, SIZE, SIZE)
    assert np.isfinite(result.view_gradients).all() and np.abs(result.view_gradients).sum() > 0


def test_views_must_match_their_cameras(three_views):
    worker = reward_worker("reward.kind=brightness")
    with pytest.raises(ValueError, match=r"expected views \[B, 4, 3, h, w\] for 4 cameras, got \(3, 3, 3, 32, 32\)"):
        worker.score(RewardInput(IDS, PROMPTS, three_views, grid_rig()))


def test_minicarve_alignment_reads_only_the_grid_rig(three_views):
    """MiniCarve's classifier was trained on the grid rig's 2x2 grid: other cameras are refused
    with the fix, not misread."""
    from minicarve.alignment import views_evaluator

    evaluator = views_evaluator()
    with pytest.raises(ValueError, match="reads the four views of the grid rig.*reward.alignment=null"):
        evaluator(three_views, THREE_CAMERAS, PROMPTS)


def test_pictures_are_the_grid_for_four_views_and_a_row_otherwise(three_views):
    four = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert np.array_equal(picture(four), views_to_grid(four).permute(1, 2, 0).numpy())
    row = picture(three_views[0])
    assert row.shape == (SIZE, 3 * SIZE, 3) and np.array_equal(row[:, SIZE:2 * SIZE],
                                                               three_views[0, 1].permute(1, 2, 0).numpy())
