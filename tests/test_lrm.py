"""Tests of the MiniCarve LRM (minicarve/lrm.py), its trainer and its reconstructor entry."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import minicarve.plugin  # noqa: F401  (registers reconstructor "lrm")
from minicarve import lrm as lrm_module
from minicarve.lrm import LRM_WEIGHTS_DIR, LRMConfig, LRMReconstructor, MiniLRM, TriplaneField
from geometry.cameras import grid_rig, orbit_cameras
from reward_service.reconstructors import RadianceField, Reconstructor, build_reconstructor

TINY = dict(dim=32, depth=1, heads=2, plane_tokens=4, plane_size=16, plane_channels=8,
            decoder_hidden=16, num_samples=16)


def tiny_model(seed: int = 0) -> MiniLRM:
    torch.manual_seed(seed)
    return MiniLRM(LRMConfig(**TINY)).eval()


def random_views(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """White views with a coloured square in the middle, ``[B, 4, 3, s, s]``."""
    generator = torch.Generator().manual_seed(seed)
    views = torch.ones(batch, 4, 3, size, size)
    colours = torch.rand(batch, 4, 3, 1, 1, generator=generator)
    views[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = colours
    return views


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    return tiny_model().save_pretrained(tmp_path_factory.mktemp("lrm") / "weights")


def test_shapes_and_field_renders_at_any_camera():
    model = tiny_model()
    views, rig = random_views(), grid_rig()
    with torch.no_grad():
        planes = model(views, rig)
        assert planes.shape == (2, 3, TINY["plane_channels"], TINY["plane_size"], TINY["plane_size"])
        field = model.field(planes)
        assert isinstance(field, RadianceField)
        images = field.render(rig, 32, 32)
        assert images.shape == (2, 4, 3, 32, 32)
        # Any cameras, any resolution (also off the rig's distance and elevation).
        novel = orbit_cameras([15.0, 123.0, 250.0], [-10.0, 45.0, 80.0], 3.2, 40.0)
        images = field.render(novel, 20, 24)
        assert images.shape == (2, 3, 3, 20, 24)
        assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
        # The batched field protocol: points [B, ..., S, 3]; empty outside [-1, 1]^3.
        points = torch.rand(2, 5, 7, 3) * 4 - 2
        density, rgb = field(points)
        assert density.shape == (2, 5, 7) and rgb.shape == (2, 5, 7, 3)
        assert (density >= 0).all() and (density[(points.abs() > 1).any(dim=-1)] == 0).all()
        # Views of another size are resized to the model's input size.
        assert model(random_views(size=48), rig).shape == planes.shape


def test_gradients_reach_every_parameter():
    model = tiny_model().train()
    field = model.field(model(random_views(), grid_rig()))
    field.render(grid_rig(), 8, 8, num_samples=8).mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_save_load_round_trip_gives_identical_outputs(saved_dir):
    assert {p.name for p in saved_dir.iterdir()} == {"config.json", "model.safetensors"}
    config = json.loads((saved_dir / "config.json").read_text())
    assert config["model_type"] == "minicarve-lrm" and config["dim"] == TINY["dim"]
    original, loaded = tiny_model(), MiniLRM.from_pretrained(saved_dir)
    assert loaded.config == original.config
    views, rig = random_views(), grid_rig()
    with torch.no_grad():
        a = original.reconstruct(views, rig).render(rig, 32, 32)
        b = loaded.reconstruct(views, rig).render(rig, 32, 32)
    assert torch.equal(a, b)


def test_build_reconstructor_lrm_through_mrc_scorer(saved_dir):
    from reward_service.mrc import MRCScorer

    reconstructor = build_reconstructor("lrm", weights=str(saved_dir))
    assert isinstance(reconstructor, LRMReconstructor) and isinstance(reconstructor, Reconstructor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-LPIPS-backbone warning on offline machines
        scorer = MRCScorer(reconstructor)
    views, rig = random_views(batch=3), grid_rig()
    result = scorer.score_views(views, rig)
    assert result.mrc.shape == (3,) and torch.isfinite(result.mrc).all()
    assert result.rerenders.shape == views.shape
    # Feed-forward and deterministic: same views, same score, whatever the batch.
    alone = scorer.score_views(views[1:2], rig)
    torch.testing.assert_close(alone.mrc, result.mrc[1:2], atol=1e-5, rtol=0)
    # The voxel reconstructor and import paths still build.
    assert build_reconstructor("voxel", steps=2).steps == 2
    assert isinstance(build_reconstructor("minicarve.lrm:LRMReconstructor", weights=saved_dir), LRMReconstructor)


def test_missing_weights_error_names_the_training_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m minicarve\.train_lrm"):
        build_reconstructor("lrm", weights=tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LRMReconstructor(tmp_path / "half")
    assert lrm_module.LRM_WEIGHTS_DIR.parts[-3:] == ("minicarve", "weights", "lrm")


def test_inconsistent_views_replace_the_centre_of_view_1():
    from minicarve.train_lrm import inconsistent_views

    views, donors = random_views(seed=0), random_views(seed=1)
    out = inconsistent_views(views, donors)
    assert torch.equal(out[:, [0, 2, 3]], views[:, [0, 2, 3]])
    assert torch.equal(out[:, 1, :, 8:24, 8:24], donors[:, 1, :, 8:24, 8:24])
    assert torch.equal(out[:, 1, :, :8], views[:, 1, :, :8])


def test_training_is_seeded_and_resumable(tmp_path, monkeypatch):
    from minicarve import train_lrm

    from minicarve.scenes import Part, Scene

    monkeypatch.setenv("CARVE3D_CACHE", str(tmp_path / "cache"))
    # Two scenes instead of the split's 8000 train scenes (building the split takes seconds).
    scenes = (Scene((Part("cube", "red", "large"),)), Scene((Part("sphere", "blue", "small"),)))
    monkeypatch.setattr(train_lrm, "train_scenes", lambda: scenes)
    common = ["--scenes", "2", "--novel", "1", "--batch", "2", "--rays", "16", "--samples", "8",
              "--config", json.dumps(TINY), "--checkpoint-every", "1", "--log-every", "1"]

    threads = torch.get_num_threads()  # main() sets its --threads (1) for the process

    def run(name: str, steps: int, *extra: str) -> MiniLRM:
        out = tmp_path / name
        train_lrm.main(common + ["--steps", str(steps), "--run-dir", str(out / "run"),
                                 "--out", str(out / "weights"), *extra])
        torch.set_num_threads(threads)
        return MiniLRM.from_pretrained(out / "weights")

    straight = run("straight", 3)
    run("resumed", 1)
    resumed = run("resumed", 3, "--resume")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # The renders are cached (one shard) in the cache directory.
    assert [p.name.startswith("lrm-train-") for p in (tmp_path / "cache" / "minicarve").iterdir()] == [True]


@pytest.mark.skipif(not (LRM_WEIGHTS_DIR / "model.safetensors").exists(), reason="no trained LRM weights shipped yet")
def test_shipped_weights_load_and_fit_the_budget():
    size = (LRM_WEIGHTS_DIR / "model.safetensors").stat().st_size
    assert size <= 3 * 2**20, f"shipped LRM weights are {size / 2**20:.2f} MiB (budget 3 MiB)"
    field = LRMReconstructor().reconstruct(random_views(batch=1), grid_rig())
    assert isinstance(field, TriplaneField)
