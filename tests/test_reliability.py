"""Failures through the real actors: crashed and hung actors, learner loss, resume.

Every run must complete with each planned sample id used exactly once per epoch;
a resumed run must repeat the uninterrupted run's metrics.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest

from bench import process_faults
from bench.process_faults import (ProcessFault, break_safetensors_header, drop_state_keys, fill_disk, read_until,
                                  start_driver, stop_group, truncate_weights)
from learner.config import load_config
from learner.driver import RunStopped, run
from learner.main import main

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]
SAMPLES = 8
LEARNING_COLUMNS = ["reward_mean", "reward_std", "kl_mean", "loss", "grad_norm", "advantage_abs_mean", "version"]


def small_config(tmp_path, model_dir) -> list[str]:
    return [
        f"model.path={model_dir}", f"run.output_dir={tmp_path}", "sampling.num_steps=2", "prompts.limit=4",
        "rollout.batch_size=2", f"train.samples_per_epoch={SAMPLES}", "rollout.num_cpus=0.5",
        "reward.num_cpus=0.5", "train.num_cpus=0.5", "reward.kind=brightness", "run.samples_to_save=2",
        "train.learning_rate=3e-3", "eval.prompts_file=null", "reward.alignment=null",
    ]


def small_run(tmp_path, model_dir, *overrides):
    return run(load_config(small_config(tmp_path, model_dir) + list(overrides)))


@contextlib.contextmanager
def tmpfs(path, size: str):
    try:
        with process_faults.tmpfs(path, size) as mounted:
            yield mounted
    except RuntimeError as err:
        pytest.skip(str(err))  # not root: no mount


def read_metrics(path) -> pd.DataFrame:
    return pd.read_parquet(path / "metrics.parquet")


def assert_every_sample_once(m: pd.DataFrame, epochs: int):
    assert m["epoch"].tolist() == list(range(epochs))
    assert (m["num_unique_sample_ids"] == SAMPLES).all()
    assert (m["num_samples"] + m["num_dropped"] == SAMPLES).all()


@pytest.mark.parametrize("role, batch", [("rollout", 1), ("reward", 2)])
def test_actor_process_exit_mid_epoch(tmp_path, tiny_model_dir, role, batch):
    run_dir = small_run(tmp_path, tiny_model_dir, "train.epochs=2", f"faults.role={role}",
                        "faults.mode=exit", "faults.epoch=1", f"faults.batch={batch}")
    m = read_metrics(run_dir.path)
    assert_every_sample_once(m, 2)
    assert m[f"{role}_restarts"].iloc[-1] >= 1
    report = (run_dir.path / "report.md").read_text()
    assert "Failures handled" in report and "re-issued" in report


@pytest.mark.parametrize("role, batch", [("rollout", 0), ("reward", 3)])
def test_hung_actor_is_killed_after_its_timeout(tmp_path, tiny_model_dir, role, batch):
    run_dir = small_run(tmp_path, tiny_model_dir, "train.epochs=1", f"faults.role={role}",
                        "faults.mode=hang", "faults.epoch=0", f"faults.batch={batch}", f"{role}.timeout_s=20")
    m = read_metrics(run_dir.path)
    assert_every_sample_once(m, 1)
    assert m[f"{role}_restarts"].iloc[-1] == 1  # killed once; the restarted actor is waited for
    assert "timed out after 20s" in (run_dir.path / "report.md").read_text()


@pytest.mark.parametrize("role, workers", [("rollout", 1), pytest.param("rollout", 2, marks=pytest.mark.slow),
                                           pytest.param("reward", 1, marks=pytest.mark.slow),
                                           pytest.param("reward", 2, marks=pytest.mark.slow)])
def test_actor_hung_while_idle_is_restarted(tmp_path, tiny_model_dir, role, workers):
    """kill -STOP to the actor's process while the learner trains (the actor is idle): the
    hang must be handled as a crash (killed so that Ray restarts it, counted, re-synced), not
    end the actor for good."""
    fault = ProcessFault(f"{role}-0", signal.SIGSTOP, "train", epoch=0)
    with fault.armed():
        run_dir = small_run(tmp_path, tiny_model_dir, "train.epochs=2", f"{role}.num_workers={workers}",
                            f"{role}.timeout_s=10")
    assert fault.sent
    m = read_metrics(run_dir.path)
    assert_every_sample_once(m, 2)
    assert m[f"{role}_restarts"].iloc[-1] == 1
    assert "could not be restarted" not in (run_dir.path / "report.md").read_text()


def test_actor_killed_while_idle_is_resynced(tmp_path, tiny_model_dir):
    """kill -KILL to the rollout actor's process after the weight sync (while the checkpoint is
    written): Ray restarts it unseen, without weights; its next batch must find that out and
    have it re-synced, not fail the batch until the run stops."""
    fault = ProcessFault("rollout-0", signal.SIGKILL, "checkpoint", epoch=0, wait_restart=True)
    with fault.armed():
        run_dir = small_run(tmp_path, tiny_model_dir, "train.epochs=2")
    assert fault.sent
    m = read_metrics(run_dir.path)
    assert_every_sample_once(m, 2)
    assert m["rollout_restarts"].iloc[-1] == 1


def test_learner_failure_resumes_automatically(tmp_path, tiny_model_dir):
    run_dir = small_run(tmp_path, tiny_model_dir, "train.epochs=3", "faults.role=learner",
                        "faults.mode=exit", "faults.epoch=1", "run.max_auto_resumes=1")
    m = read_metrics(run_dir.path)
    assert_every_sample_once(m, 3)
    assert "learner failed" in (run_dir.path / "report.md").read_text()


@pytest.fixture(scope="module")
def uninterrupted(local_ray, tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("uninterrupted")
    return read_metrics(small_run(out, tiny_model_dir, "train.epochs=3").path)


@pytest.fixture(scope="module")
def stopped_after_epoch_1(local_ray, tmp_path_factory, tiny_model_dir):
    """A run whose learner fails in epoch 2 (no automatic resume): checkpoints 0 and 1 exist."""
    out = tmp_path_factory.mktemp("stopped")
    with pytest.raises(RunStopped, match="resume with: python -m learner.main resume="):
        small_run(out, tiny_model_dir, "train.epochs=3", "faults.role=learner", "faults.mode=raise",
                  "faults.epoch=2")
    [run_dir] = list(out.iterdir())
    return run_dir


def assert_same_learning(a: pd.DataFrame, b: pd.DataFrame):
    for column in LEARNING_COLUMNS:
        np.testing.assert_allclose(a[column].to_numpy(float), b[column].to_numpy(float), rtol=1e-5,
                                   atol=1e-7, err_msg=column)


def test_resume_repeats_the_uninterrupted_run(tmp_path, stopped_after_epoch_1, uninterrupted):
    copy = shutil.copytree(stopped_after_epoch_1, tmp_path / "run")
    assert len(read_metrics(copy)) == 2
    run(load_config([f"resume={copy}", "faults.role=null"]))
    resumed = read_metrics(copy)
    assert_every_sample_once(resumed, 3)
    assert_same_learning(resumed, uninterrupted)


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, stopped_after_epoch_1,
                                                                 uninterrupted, capsys):
    copy = shutil.copytree(stopped_after_epoch_1, tmp_path / "run")
    truncate_weights(copy / "checkpoints" / "epoch_0001")
    run(load_config([f"resume={copy}", "faults.role=null"]))
    err = capsys.readouterr().err
    assert "checkpoint epoch_0001 is damaged" in err and "falling back to the previous one" in err
    assert "epoch_0001 is damaged" in (copy / "report.md").read_text()
    resumed = read_metrics(copy)  # epochs 1 and 2 ran again from checkpoint 0
    assert_every_sample_once(resumed, 3)
    assert_same_learning(resumed, uninterrupted)


def test_sigterm_writes_status_and_report_and_keeps_checkpoints(tmp_path, tiny_model_dir):
    """`ray job stop` sends SIGTERM, then kills 3 s later: the driver must still record how it ended."""
    driver = start_driver(f"model.path={tiny_model_dir}", f"run.output_dir={tmp_path}", "reward.kind=brightness",
                          "train.epochs=50", "train.samples_per_epoch=4", "train.group_size=1", "sampling.num_steps=2", "prompts.limit=2",
                          "rollout.batch_size=2", "eval.prompts_file=null", "reward.alignment=null")
    try:
        lines = read_until(driver, "epoch 2/50")  # epoch 1's checkpoint is written before epoch 2's line
        time.sleep(1)  # into epoch 3's sampling: the signal lands inside a Ray call (ray.wait)
        driver.send_signal(signal.SIGTERM)
        start = time.time()
        rest, _ = driver.communicate(timeout=120)
    finally:
        stop_group(driver)
    assert driver.returncode == 1, "".join(lines) + rest
    assert time.time() - start < 30, "the driver took too long to stop after SIGTERM"
    [run_dir] = list(tmp_path.iterdir())
    assert f"resume with python -m learner.main resume={run_dir}" in rest
    status = json.loads((run_dir / "status.json").read_text())
    assert not status["finished"] and "SIGTERM" in status["stop_reason"], status
    assert "SystemError" not in status["stop_reason"], status
    assert "SIGTERM" in (run_dir / "report.md").read_text()
    assert (run_dir / "checkpoints" / "epoch_0000").is_dir()


def test_driver_sigkill_then_resume_repeats_the_uninterrupted_run(tmp_path, tiny_model_dir, uninterrupted):
    """kill -KILL to the driver: no cleanup runs at all.  The session must still be counted in
    status.json, and a resume must repeat the uninterrupted run."""
    driver = start_driver(*small_config(tmp_path, tiny_model_dir), "train.epochs=3")
    try:
        read_until(driver, "epoch 2/3")
        driver.kill()
        driver.wait(timeout=30)
    finally:
        stop_group(driver)
    [run_dir] = list(tmp_path.iterdir())
    status = json.loads((run_dir / "status.json").read_text())
    assert status["sessions"] == 1 and not status["finished"] and status["wall_seconds_total"] > 0, status
    assert "killed after epoch 2/3" in status["stop_reason"], status
    run(load_config([f"resume={run_dir}"]))
    status = json.loads((run_dir / "status.json").read_text())
    assert status["sessions"] == 2 and status["finished"], status
    resumed = read_metrics(run_dir)
    assert_every_sample_once(resumed, 3)
    assert_same_learning(resumed, uninterrupted)


def test_full_disk_stops_with_one_line_and_resumes(tmp_path, tiny_model_dir):
    """The run directory's disk fills after epoch 2: a one-line error, status.json still valid
    JSON, Ray shut down; after freeing space, the resume finishes the run."""
    with tmpfs(tmp_path / "disk", "3m") as disk:
        driver = start_driver(*small_config(disk, tiny_model_dir), "train.epochs=4", "run.samples_to_save=0")
        try:
            lines = read_until(driver, "epoch 2/4")
            fill = fill_disk(disk)
            rest, _ = driver.communicate(timeout=300)
        finally:
            stop_group(driver)
        output = "".join(lines) + rest
        assert driver.returncode == 1, output
        assert "Traceback" not in output, output
        errors = [line for line in rest.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "No space left on device" in errors[0] and "resume=" in errors[0], output
        [run_dir] = [p for p in disk.iterdir() if p.is_dir()]
        status = json.loads((run_dir / "status.json").read_text())  # never empty: written atomically
        assert status["sessions"] == 1 and not status["finished"], status
        fill.unlink()
        run(load_config([f"resume={run_dir}"]))
        status = json.loads((run_dir / "status.json").read_text())
        assert status["sessions"] == 2 and status["finished"], status
        assert_every_sample_once(read_metrics(run_dir), 4)


def test_read_only_run_directory_gives_one_line(tmp_path, tiny_model_dir, stopped_after_epoch_1, capsys):
    with tmpfs(tmp_path / "ro", "16m") as disk:
        copy = shutil.copytree(stopped_after_epoch_1, disk / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert main([f"resume={copy}"]) == 1
        assert main(small_config(disk, tiny_model_dir)) == 1  # a new run under a read-only directory
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("Read-only file system" in e for e in errors), errors
    assert f"resume={copy}" in errors[0] and "make it writable, then run again" in errors[1], errors


def test_every_checkpoint_damaged_stops_and_keeps_them(tmp_path, stopped_after_epoch_1):
    copy = shutil.copytree(stopped_after_epoch_1, tmp_path / "run")
    sizes = {}
    for checkpoint in (copy / "checkpoints").iterdir():
        truncate_weights(checkpoint)
        sizes[checkpoint.name] = (checkpoint / "weights.safetensors").stat().st_size
    with pytest.raises(RunStopped, match="all 2 checkpoints are damaged .*start over explicitly"):
        run(load_config([f"resume={copy}", "faults.role=null"]))
    assert {c.name: (c / "weights.safetensors").stat().st_size for c in (copy / "checkpoints").iterdir()} == sizes
    assert len(read_metrics(copy)) == 2


@pytest.mark.parametrize("damage", [drop_state_keys, break_safetensors_header])
def test_unloadable_checkpoint_falls_back_to_the_previous(tmp_path, stopped_after_epoch_1, uninterrupted, damage):
    copy = shutil.copytree(stopped_after_epoch_1, tmp_path / "run")
    damage(copy / "checkpoints" / "epoch_0001")
    run(load_config([f"resume={copy}", "faults.role=null"]))
    assert (copy / "checkpoints" / "damaged" / "epoch_0001").is_dir()  # set aside, not deleted
    assert "epoch_0001 is damaged" in (copy / "report.md").read_text()
    resumed = read_metrics(copy)
    assert_every_sample_once(resumed, 3)
    assert_same_learning(resumed, uninterrupted)


def test_resume_that_changes_the_checkpoints_shape_is_refused_first(tmp_path, stopped_after_epoch_1, monkeypatch):
    import learner.driver

    copy = shutil.copytree(stopped_after_epoch_1, tmp_path / "run")
    monkeypatch.setattr(learner.driver, "start_roles", lambda *a: pytest.fail("an actor started"))
    with pytest.raises(RunStopped, match=r"model.lora.rank=8 \(the run's checkpoints hold 4\)"):
        run(load_config([f"resume={copy}", "model.lora.rank=8"]))
