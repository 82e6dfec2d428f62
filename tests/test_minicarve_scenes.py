import torch

from minicarve.scenes import (COLORS, SHAPES, Part, Scene, held_out_pairs, is_test_scene, render_grid,
                              render_scene, scene_split)
from geometry.cameras import GRID_DISTANCE


def test_split_is_deterministic_disjoint_and_holds_out_combinations():
    train, test = scene_split(100, 200, seed=0)
    again_train, again_test = scene_split(100, 200, seed=0)
    assert [s.prompt for s in train] == [s.prompt for s in again_train]
    assert [s.prompt for s in test] == [s.prompt for s in again_test]
    train_prompts, test_prompts = {s.prompt for s in train}, {s.prompt for s in test}
    assert len(train_prompts) == 100 and len(test_prompts) == 200 and not train_prompts & test_prompts
    held_out = held_out_pairs(0)
    assert len(held_out) == len(COLORS)
    assert not any(is_test_scene(s, held_out) for s in train) and all(is_test_scene(s, held_out) for s in test)
    assert {len(s.parts) for s in train} == {1, 2, 3}


def test_prompts_follow_the_grammar():
    cube, ball = Part("cube", "red", "large"), Part("sphere", "orange", "small")
    assert Scene((cube,)).prompt == "a large red cube"
    assert Scene((ball, cube), "on top of").prompt == "a small orange sphere on top of a large red cube"
    assert Scene((ball, cube, cube)).prompt == "an orange sphere, a red cube and a red cube"


def test_layouts_fit_the_unit_sphere_and_relations_point_the_right_way():
    big = [Part(shape, "blue", "large") for shape in SHAPES]
    for relation in ("on top of", "next to", "in front of"):
        (_, first, ra), (_, second, rb) = Scene((big[0], big[1]), relation).layout()
        axis = {"on top of": 2, "next to": 1, "in front of": 0}[relation]
        sign = -1 if relation == "next to" else 1  # left in the first view is -Y
        assert sign * (first[axis] - second[axis]) > ra + rb - 1e-6
    for scene in [Scene(tuple(big[:3])), Scene((big[0], big[1]), "on top of")]:
        for _, centre, radius in scene.layout():
            assert torch.tensor(centre).norm() + radius <= 1.0 + 1e-6
    assert GRID_DISTANCE > 1.0  # the cameras stay outside the scene


def test_renders_white_background_object_colour_and_view_consistency():
    red_sphere = Scene((Part("sphere", "red", "large"),))
    views = render_scene(red_sphere, size=32)
    assert views.shape == (4, 3, 32, 32)
    assert (views[:, :, 0, 0] > 0.99).all()  # corners are background
    centre = views[:, :, 16, 16]
    # Shading scales the albedo: the centre pixel is the red albedo times one factor in (0, 1].
    albedo = torch.tensor(COLORS["red"])
    factor = (centre @ albedo) / (albedo @ albedo)
    assert ((factor > 0.5) & (factor <= 1.0)).all()
    torch.testing.assert_close(centre, factor[:, None] * albedo, atol=0.03, rtol=0)
    # A sphere at the origin looks the same from every camera of the rig.
    torch.testing.assert_close(views[1:], views[:1].expand(3, -1, -1, -1), atol=0.02, rtol=0)
    grid = render_grid(red_sphere, view_size=32)
    assert grid.shape == (3, 64, 64)
