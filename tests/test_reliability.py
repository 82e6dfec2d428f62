"""Failures through the real actors: crashed and hung actors, learner loss, resume.

Every run must complete with each planned sample id used exactly once per epoch;
a resumed run must repeat the uninterrupted run's metrics.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from learner.config import load_config
from learner.driver import RunStopped, run

pytestmark = pytest.mark.usefixtures("local_ray")
SAMPLES = 8
LEARNING_COLUMNS = ["reward_mean", "reward_std", "kl_mean", "loss", "grad_norm", "advantage_abs_mean", "version"]


def small_run(tmp_path, model_dir, *overrides):
    base = [
        f"model.path={model_dir}", f"run.output_dir={tmp_path}", "sampling.num_steps=2", "prompts.limit=4",
        "rollout.batch_size=2", f"train.samples_per_epoch={SAMPLES}", "rollout.num_cpus=0.5",
        "reward.num_cpus=0.5", "train.num_cpus=0.5", "reward.kind=brightness", "run.samples_to_save=2",
        "train.learning_rate=3e-3", "eval.prompts_file=null", "reward.alignment=null",
    ]
    return run(load_config(base + list(overrides)))


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
    weights = copy / "checkpoints" / "epoch_0001" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    run(load_config([f"resume={copy}", "faults.role=null"]))
    err = capsys.readouterr().err
    assert "checkpoint epoch_0001 is damaged" in err and "falling back to the previous one" in err
    assert "epoch_0001 is damaged" in (copy / "report.md").read_text()
    resumed = read_metrics(copy)  # epochs 1 and 2 ran again from checkpoint 0
    assert_every_sample_once(resumed, 3)
    assert_same_learning(resumed, uninterrupted)


def test_sigterm_writes_status_and_report_and_keeps_checkpoints(tmp_path, tiny_model_dir):
    """`ray job stop` sends SIGTERM, then kills 3 s later: the driver must still record how it ended."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from learner.config import PROJECT_ROOT

    command = [sys.executable, "-m", "learner.main", f"model.path={tiny_model_dir}", f"run.output_dir={tmp_path}",
               "reward.kind=brightness", "train.epochs=50", "train.samples_per_epoch=4", "sampling.num_steps=2",
               "prompts.limit=2", "rollout.batch_size=2", "eval.prompts_file=null", "reward.alignment=null",
               "run.local_num_cpus=2"]
    driver = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in driver.stdout:  # epoch 1's checkpoint is written before epoch 2's line
        lines.append(line)
        if line.startswith("epoch 2/50"):
            break
    time.sleep(1)  # into epoch 3's sampling: the signal lands inside a Ray call (ray.wait)
    driver.send_signal(signal.SIGTERM)
    start = time.time()
    rest, _ = driver.communicate(timeout=120)
    assert driver.returncode == 1, "".join(lines) + rest
    assert time.time() - start < 30, "the driver took too long to stop after SIGTERM"
    [run_dir] = list(tmp_path.iterdir())
    status = json.loads((run_dir / "status.json").read_text())
    assert not status["finished"] and "SIGTERM" in status["stop_reason"], status
    assert "SystemError" not in status["stop_reason"], status
    assert "SIGTERM" in (run_dir / "report.md").read_text()
    assert (run_dir / "checkpoints" / "epoch_0000").is_dir()
