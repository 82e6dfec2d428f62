import json

import numpy as np
import pandas as pd
import pytest
import torch

from bench.process_faults import break_safetensors_header, drop_state_keys
from learner.checkpoint import (CorruptCheckpointError, latest_good_checkpoint, list_checkpoints, load_checkpoint,
                                prune_checkpoints, save_checkpoint, set_aside, tensor_differences, verify_checkpoint)
from learner.config import Config
from learner.rundir import RunDirectory


def _save(root, epoch):
    weights = {"w": torch.full((4,), float(epoch))}
    param = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(4)
    opt.step()
    return save_checkpoint(root / f"epoch_{epoch:04d}", weights, opt.state_dict(), {"epoch": epoch}, "a: 1\n")


def test_round_trip_without_pickle(tmp_path):
    path = _save(tmp_path, 3)
    weights, optimizer, state = load_checkpoint(path)
    assert torch.equal(weights["w"], torch.full((4,), 3.0)) and state["epoch"] == 3
    assert optimizer["state"][0]["exp_avg"].shape == (4,)
    assert set(json.loads((path / "manifest.json").read_text())) >= {"weights.safetensors", "trainer_state.json"}
    assert not list(tmp_path.glob("*.tmp"))  # the temporary directory was renamed away


def test_truncated_checkpoint_is_detected_and_skipped(tmp_path):
    for epoch in range(3):
        _save(tmp_path, epoch)
    newest = tmp_path / "epoch_0002" / "weights.safetensors"
    newest.write_bytes(newest.read_bytes()[:10])
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        verify_checkpoint(tmp_path / "epoch_0002")
    good, warnings = latest_good_checkpoint(tmp_path)
    assert good.name == "epoch_0001"
    assert "epoch_0002 is damaged" in warnings[0] and "falling back" in warnings[0]


def test_half_written_checkpoint_is_ignored_and_old_ones_pruned(tmp_path):
    for epoch in range(4):
        _save(tmp_path, epoch)
    (tmp_path / "epoch_0009.tmp").mkdir()  # a crash mid-write leaves only a temp dir
    assert latest_good_checkpoint(tmp_path)[0].name == "epoch_0003"
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("epoch_????")) == ["epoch_0002", "epoch_0003"]


@pytest.mark.parametrize("damage, cause", [(drop_state_keys, "lacks optimizer.param_groups"),
                                           (break_safetensors_header, "weights.safetensors cannot be read")])
def test_checkpoint_that_passes_its_checksums_but_does_not_parse_is_damaged(tmp_path, damage, cause):
    for epoch in range(2):
        _save(tmp_path, epoch)
    damage(tmp_path / "epoch_0001")  # the manifest rewritten to match
    with pytest.raises(CorruptCheckpointError, match=cause):
        verify_checkpoint(tmp_path / "epoch_0001")
    assert latest_good_checkpoint(tmp_path)[0].name == "epoch_0000"


def test_damaged_checkpoints_are_set_aside_not_deleted(tmp_path):
    for _ in range(2):  # the same epoch damaged twice (two resumes): both kept
        aside = set_aside(_save(tmp_path, 1))
    assert sorted(p.name for p in (tmp_path / "damaged").iterdir()) == ["epoch_0001", "epoch_0001.1"]
    assert aside == tmp_path / "damaged" / "epoch_0001.1" and list_checkpoints(tmp_path) == []


def test_tensor_differences_name_each_tensor():
    saved = {"a": torch.zeros(4, 8), "b": torch.zeros(2)}
    model = {"a": torch.zeros(4, 4), "c": torch.zeros(2)}
    assert tensor_differences(saved, model) == ["c missing", "b not in the model",
                                                "a (4, 8) saved, (4, 4) in the model"]


def test_a_resume_that_trains_past_the_end_keeps_the_first_end_evaluation(tmp_path):
    """``resume=RUN_DIR train.epochs=<more>``: the first end evaluation (policy v2) is filed as
    epoch_002, as an ``eval.every`` one is, and the new end (v4) takes its place."""
    config = Config()
    config.run.dir = str(tmp_path)
    run_dir = RunDirectory.create(config)
    grids = np.zeros((2, 8, 32, 3), dtype=np.uint8)

    def evaluate(tag: str, version: int, mrc: float) -> None:
        run_dir.save_eval({"tag": tag, "version": version, "mrc": mrc}, grids, ["a", "b"],
                          np.array([mrc, mrc]), np.array([0.5, 0.5]))

    evaluate("start", 0, 0.3)
    evaluate("end", 2, 0.2)
    run_dir = RunDirectory.open(tmp_path)  # the resume's new process
    evaluate("end", 4, 0.1)
    assert list(pd.read_parquet(tmp_path / "eval_epoch_002.parquet").mrc) == [0.2, 0.2]
    assert list(pd.read_parquet(tmp_path / "eval_end.parquet").mrc) == [0.1, 0.1]
    assert (tmp_path / "samples" / "eval_epoch_002.png").is_file()
    evals = json.loads((tmp_path / "eval.json").read_text())
    assert evals["epoch_002"]["version"] == 2 and evals["end"]["version"] == 4
    evaluate("end", 4, 0.1)  # the same end again (a rerun of it) replaces it, nothing is filed
    assert sorted(evals) == sorted(json.loads((tmp_path / "eval.json").read_text()))
