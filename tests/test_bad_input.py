"""Bad input (issue 21, items 5-7; issue 22's refusal without a cluster): each is refused
with one line naming the problem and the fix, or accepted with a warning saying what was
done to it, before any actor starts or, for a reward's output, at the first batch.
docs/reliability.md's bad-input table lists the messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from geometry.cameras import grid_rig
from learner.config import ConfigError, load_config, load_prompts
from learner.main import main
from reward_service import mrc
from reward_service.rewards import score

# ------------------------------------------------------------------ item 5: values, paths, shapes


@pytest.mark.parametrize("override", ["train.kl_weight=nan", "sampling.guidance_scale=inf", "rollout.num_cpus=nan",
                                      "train.learning_rate=inf", "train.adam_betas=[0.9,nan]"])
def test_non_finite_numbers_are_rejected_as_such(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert f"{key} must be a finite number" in str(err.value)
    assert "must be > 0" not in str(err.value)  # inf used to be told it is not positive


@pytest.mark.parametrize("override, message", [
    ("reward.kind=nonexistent.module:fn", "reward.kind=nonexistent.module:fn: cannot import 'nonexistent.module'"),
    ("reward.kind=bogus", "reward.kind must be one of mrc, brightness or an import path"),
    ("reward.alignment=json:nope", "reward.alignment=json:nope: module 'json' has no attribute 'nope'"),
    ("reward.reconstructor=os:sep", "reward.reconstructor=os:sep: 'sep' is a str, not a function or class"),
])
def test_import_paths_must_resolve_in_the_config_check(override, message):
    with pytest.raises(ConfigError) as err:  # before Ray: it used to fail as "all reward actors are dead"
        load_config([override])
    assert message in str(err.value)


def three_columns(views, cameras, prompts):
    return np.zeros((len(prompts), 3))


def grid_reward(images, prompts):  # the signature before rewards took views and cameras
    return np.zeros(len(prompts))


def test_a_custom_function_of_the_old_signature_is_named_before_anything_starts():
    for key, role in (("reward.kind", "reward"), ("reward.alignment", "alignment")):
        with pytest.raises(ConfigError, match=rf"the {role} function tests.test_bad_input:grid_reward\(images, "
                                              rf"prompts\) cannot be called as {role}\(views, cameras, prompts\)"):
            load_config([f"{key}=tests.test_bad_input:grid_reward"])


def test_reward_output_shape_is_checked_naming_the_reward():
    views, rig = torch.zeros(2, 4, 3, 32, 32, dtype=torch.uint8), grid_rig()
    with pytest.raises(ValueError, match=r"reward function test_bad_input:three_columns returned an array of "
                                         r"shape \(2, 3\) for 2 samples; return one float per sample, shape \(2,\)"):
        score(three_columns, ["s0", "s1"], views, rig, ["p0", "p1"])
    with pytest.raises(ValueError, match=r"alignment function test_bad_input:three_columns returned .* \(2, 3\)"):
        score(lambda views, cameras, prompts: np.zeros(2), ["s0", "s1"], views, rig, ["p0", "p1"],
              alignment_fn=three_columns)
    with pytest.raises(ValueError, match=r"expected views \[B, 4, 3, h, w\] for 4 cameras, got \(2, 3, 3, 32, 32\)"):
        score(three_columns, ["s0", "s1"], views[:, :3], rig, ["p0", "p1"])


@pytest.mark.integration
def test_run_with_a_bad_reward_stops_at_the_first_batch_in_one_line(tmp_path, tiny_model_dir, monkeypatch, capfd):
    """Through real actors: a [B, 3] reward stops the run at its first batch, naming the
    function, with no traceback and no resume hint; a prompt that the text encoder cuts is
    warned about before any actor starts, and in the report."""
    import ray

    if ray.is_initialized():  # the driver's own Ray inherits PYTHONPATH, so the actors find the module
        ray.shutdown()
    (tmp_path / "my_rewards.py").write_text("import numpy as np\n\n\ndef three_columns(views, cameras, prompts):\n"
                                            "    return np.zeros((len(prompts), 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{__import__('os').environ.get('PYTHONPATH', '')}")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n" + "a red cube " * 1820 + "\n")  # 20,020 characters
    code = main([f"model.path={tiny_model_dir}", "reward.kind=my_rewards:three_columns", "reward.alignment=null",
                 f"prompts.file={prompts}", "eval.prompts_file=null", "train.epochs=1", "train.samples_per_epoch=4", "train.group_size=1",
                 "rollout.batch_size=2", "sampling.num_steps=2", f"run.output_dir={tmp_path}/runs",
                 "run.local_num_cpus=2", "run.samples_to_save=0"])
    out, err = capfd.readouterr()
    assert code == 1, out + err
    [last] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "reward task 0 failed" in last and "the reward function my_rewards:three_columns returned an array of " \
        "shape (2, 3) for 2 samples" in last and last.count("three_columns") == 1, last
    assert "Traceback" not in out + err and "resume" not in last, err
    warning = "1 of 2 prompts in prompts.file="
    assert warning in err and "cut to that length" in err, err
    [run_dir] = list((tmp_path / "runs").iterdir())
    assert warning in (run_dir / "report.md").read_text()


# ---------------------------------------------------------------------- item 6: files


def test_config_file_that_is_a_list_or_repeats_a_key_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "list.yaml").write_text("- train\n- epochs: 3\n")
    (tmp_path / "repeated.yaml").write_text("train:\n  epochs: 3\ntrain:\n  epochs: 4\n")
    (tmp_path / "latin1.yaml").write_bytes("train:\n  epochs: 3  # caf\xe9\n".encode("latin-1"))
    for name, message in [("list.yaml", "holds a list, not a mapping of sections"),
                          ("repeated.yaml", "is not valid YAML at line 3: found duplicate key train"),
                          ("latin1.yaml", "is not UTF-8 text (byte 0xe9 on line 2)")]:
        assert main(["--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"config file '{tmp_path / name}' {message}" in err and len(err.strip().splitlines()) == 1, err


def test_prompt_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a red cube\na caf\xe9 chair\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"prompt file '{path}' is not UTF-8 text \(byte 0xe9 on line 2\)"):
        load_prompts(load_config([f"prompts.file={path}"]).prompts)


def test_prompt_longer_than_the_text_encoder_reads_is_warned_about(tiny_model_dir):
    from policy.models import prompt_truncation_warning

    warning = prompt_truncation_warning(tiny_model_dir, ["a red cube", "a red cube " * 1820], "prompts.file=p.txt")
    assert warning.startswith("1 of 2 prompts in prompts.file=p.txt are longer than the text encoder's 77 tokens "
                              "and are cut to that length (the longest: prompt 2, 20,020 characters"), warning
    assert prompt_truncation_warning(tiny_model_dir, ["a red cube"], "prompts.file=p.txt") is None


# ------------------------------------------------------------------ item 7: the MRC command line


def grid_with_objects(size: int) -> np.ndarray:
    """A white grid of ``size`` px with a red square in each view."""
    grid = np.full((size, size, 3), 255, np.uint8)
    half, quarter = size // 2, size // 8
    for y in (quarter, half + quarter):
        for x in (quarter, half + quarter):
            grid[y:y + 2 * quarter, x:x + 2 * quarter] = (200, 30, 30)
    return grid


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """One MRC command line over a directory, a 16-bit PNG, a large grid and a white grid."""
    tmp = tmp_path_factory.mktemp("mrc_inputs")
    (tmp / "grids").mkdir()
    Image.fromarray(np.where(grid_with_objects(64)[..., 1] < 255, 20000, 65535).astype(np.uint16)).save(tmp / "16bit.png")
    Image.fromarray(grid_with_objects(256)).save(tmp / "large.png")
    Image.new("RGB", (64, 64), "white").save(tmp / "white.png")
    paths = [str(tmp / name) for name in ("grids", "16bit.png", "large.png", "white.png")]
    code = mrc.main(paths + ["--reconstructor", "voxel", "--reconstructor-options", '{"steps": 2}',
                             "--max-view-size", "64", "--out", str(tmp / "report.json")])
    report = json.loads((tmp / "report.json").read_text())
    return code, dict(zip(("directory", "16bit", "large", "white"), report["images"])), report["warnings"]


def test_mrc_cli_says_a_directory_is_a_directory(scored):
    code, images, _ = scored
    assert code == 1 and images["directory"]["error"].startswith("is a directory: pass the grid images in it")


def test_mrc_cli_scales_16_bit_pngs_instead_of_clipping_them(scored, tmp_path):
    _, images, warnings = scored
    assert "mrc" in images["16bit"]
    assert any(w.endswith("16bit.png: image mode I;16 (16-bit greyscale) scaled to 8 bits and converted to RGB")
               for w in warnings), warnings
    assert not any("16bit.png: no foreground" in w for w in warnings), warnings  # clipped, it was all white
    grid, _ = mrc.load_grid(images["16bit"]["path"])
    assert grid[16, 16].tolist() == [78, 78, 78] and grid[0, 0].tolist() == [255, 255, 255]  # 20000 / 257


def test_mrc_cli_resizes_large_grids_and_says_so(scored):
    _, images, warnings = scored
    assert "mrc" in images["large"]
    assert any(w.endswith("large.png: grid is 256x256 px; resized to 128x128 (views of 64 px, --max-view-size) "
                          "before scoring") for w in warnings), warnings
    assert mrc.limit_view_size(grid_with_objects(256), 0)[1] is None  # 0: never
    assert mrc.parse_args(["g.png"]).max_view_size == 256


def test_mrc_cli_warns_about_views_without_foreground(scored):
    _, images, warnings = scored
    assert "mrc" in images["white"]  # scored, but warned about
    assert any(w.endswith("white.png: no foreground in the top-left, top-right, bottom-left, bottom-right views "
                          "(no pixel with a channel < 0.95): its MRC compares a corner of background and says "
                          "nothing about consistency; is this the generated grid?") for w in warnings), warnings
    assert not any("large.png: no foreground" in w for w in warnings), warnings


# ----------------------------------------------- issue 22: a relative run directory on a cluster


@pytest.mark.parametrize("overrides, key", [([], "run.output_dir=runs"), (["run.dir=runs/fixed"], "run.dir=runs/fixed")])
def test_relative_run_directory_is_refused_when_joining_a_cluster(overrides, key, tmp_path, monkeypatch, capsys):
    import ray

    if ray.is_initialized():  # an embedding program's one-node Ray is not a cluster; an address is
        ray.shutdown()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert main(["model.path=builtin:tiny", *overrides]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {key} is relative and this driver joins the Ray cluster at http://127.0.0.1:8265")
    assert f"set {key.split('=')[0]}=/a/shared/path" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []  # no run directory, and Ray was never joined
