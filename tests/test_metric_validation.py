"""Metric validation (Carve3D Sec. 3.3): measures on hand examples, the inconsistency
procedure, and the command's outputs on a tiny run."""

import json
import math

import pytest
import torch

from minicarve import metric_validation as mv


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fits are far slower when threads wait on a shared core


def test_spearman_on_hand_examples():
    assert mv.spearman([1, 2, 3, 4], [0, 1, 2, 3]) == pytest.approx(1.0)
    assert mv.spearman([4, 3, 2, 1], [0, 1, 2, 3]) == pytest.approx(-1.0)
    assert mv.spearman([0.1, 5.0, 7.0, 100.0], [0, 1, 2, 3]) == pytest.approx(1.0)  # ranks only
    assert mv.spearman([1, 3, 2, 4], [0, 1, 2, 3]) == pytest.approx(1 - 6 * 2 / (4 * 15))  # 0.8
    assert mv.spearman([1, 1, 2], [0, 1, 2]) == pytest.approx(1.5 / math.sqrt(3))  # ties averaged
    assert mv.spearman([2, 2, 2], [0, 1, 2]) is None


def test_smoothness_on_hand_examples():
    assert mv.smoothness([0, 1, 2, 3]) == pytest.approx(0.0)  # a straight line
    assert mv.smoothness([0, 1, 0]) == pytest.approx(2.0)  # second difference -2
    assert mv.smoothness([0, 0, 0, 3]) == pytest.approx(0.5)  # normalised [0,0,0,1]: |0|, |1|
    assert mv.smoothness([5, 5, 5, 35]) == pytest.approx(mv.smoothness([0, 0, 0, 1]))  # min-max invariant
    assert mv.smoothness([1, 1, 1]) == 0.0
    with pytest.raises(ValueError):
        mv.smoothness([0, 1])


def test_image_distances():
    a = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(mv.ssim(a, a), torch.ones(2))
    assert (mv.ssim(a, 1 - a) < 0.5).all()
    b = (a + 0.1).clamp(max=2)  # MSE 0.01 -> 20 dB
    torch.testing.assert_close(mv.psnr(a, b), torch.full((2,), 20.0))


def test_inpaint_like_grows_to_cover_the_foreground_box():
    view = torch.ones(3, 32, 32)
    view[:, 10:20, 12:22] = 0.2  # a 10x10 object
    donor = torch.ones(3, 32, 32)
    donor[:, 4:28, 4:28] = torch.tensor([0.0, 0.9, 0.0])[:, None, None]
    levels = [mv.inpaint_like(view, donor, level, 6) for level in range(6)]
    assert torch.equal(levels[0], view)
    changed = [int((lv != view).any(dim=0).sum()) for lv in levels]
    assert changed == sorted(changed) and changed[-1] == 100  # whole box at the last level
    assert torch.equal(levels[-1][:, 10:20, 12:22], donor[:, 11:21, 11:21])
    assert torch.equal(levels[-1][:, :10], view[:, :10])  # outside the box untouched


@pytest.mark.filterwarnings("ignore:LPIPS is using a RANDOM")
def test_tiny_run_writes_the_outputs(tmp_path):
    out = tmp_path / "results"
    assert mv.main(["--objects", "2", "--levels", "3", "--reconstructor", "voxel",
                    "--reconstructor-options", '{"steps": 2}', "--out", str(out)]) == 0
    data = json.loads((out / "metric_validation.json").read_text())
    assert data["levels"] == [0, 1, 2] and data["num_objects"] == 2 and data["reconstructor"] == "voxel"
    assert set(data["metrics"]) == {"mrc", "psnr", "ssim", "l1", "l2"}
    for entry in data["metrics"].values():
        assert len(entry["mean"]) == len(entry["std"]) == 3
        assert entry["spearman_rho"] is None or -1 <= entry["spearman_rho"] <= 1
        assert entry["smoothness"] >= 0
    assert data["metrics"]["psnr"]["oriented_as"] == "-psnr" and data["metrics"]["ssim"]["oriented_as"] == "1-ssim"
    assert data["wall_time_s"] > 0 and data["lpips_backbone"]
    for name in ("metric_validation.md", "metric_validation.png", "metric_validation_strip.png"):
        assert (out / name).stat().st_size > 0


def test_soft_square_mask_is_continuous_and_hard_mask_whole_pixels():
    soft = mv.square_mask((5.0, 5.0), 2.5, 10)
    assert float(soft.sum()) == pytest.approx(6.25) and float(soft.max()) == 1.0
    areas = [float(mv.square_mask((5.0, 5.0), s, 10).sum()) for s in (0.5, 1.0, 1.5, 2.0)]
    assert areas == pytest.approx([0.25, 1.0, 2.25, 4.0])
    hard = mv.square_mask((5.0, 5.0), 2.4, 10, soft=False)
    assert float(hard.sum()) == 4.0 and set(hard.unique().tolist()) == {0.0, 1.0}
