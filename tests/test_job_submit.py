"""``ray start --head`` on 127.0.0.1, then ``ray job submit -- python -m learner.main``.

The head uses Ray's default token authentication, so the submitting client gets
``RAY_AUTH_MODE=token`` (REFERENCES.md).  The head is stopped at the end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    gcs_port, dashboard_port = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    start = subprocess.run(
        RAY + ["start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--num-cpus=2",
               # free ports for the agents too: the defaults clash with any other Ray on the machine
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
               "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield f"http://127.0.0.1:{dashboard_port}", env
    finally:
        stop_head(gcs_port)


def stop_head(gcs_port: int) -> None:
    """Stop this test's head only.  ``ray stop`` would kill every Ray on the machine,
    including an experiment the developer runs next to the tests.  The head's processes
    name its GCS port; its workers exit when their raylet does."""
    import psutil

    marks = (f"127.0.0.1:{gcs_port}", f"--gcs_server_port={gcs_port}")
    mine = [p for p in psutil.process_iter(["cmdline"])
            if any(m in " ".join(p.info["cmdline"] or []) for m in marks)]
    for process in mine:
        process.terminate()
    _, alive = psutil.wait_procs(mine, timeout=30)
    for process in alive:
        process.kill()
    # what `ray stop` also does: forget this head, or the next ray.init() tries to join it
    current = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    if current.is_file() and current.read_text().strip().endswith(f":{gcs_port}"):
        current.unlink()


def test_ray_job_submit_runs_the_driver(ray_head, tmp_path, tiny_model_dir):
    address, env = ray_head
    out_dir = tmp_path / "runs"
    cmd = RAY + [
        "job", "submit", "--address", address, "--working-dir", str(PROJECT_ROOT), "--",
        "python", "-m", "learner.main", f"model.path={tiny_model_dir}", f"run.output_dir={out_dir}",
        "reward.kind=brightness", "train.epochs=2", "train.samples_per_epoch=4", "sampling.num_steps=2",
        "prompts.limit=2", "rollout.batch_size=2", "run.name=submitted", "eval.prompts_file=null", "reward.alignment=null",
    ]
    for _attempt in range(12):  # a loaded machine may not have the job agent up yet
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        log = job.stdout + job.stderr
        if "No available agent to submit job" not in log:
            break
        time.sleep(10)
    assert job.returncode == 0, log
    assert "succeeded" in log.lower(), log
    assert "epoch 2/2" in log, log  # the per-epoch lines reach the job log
    [run_dir] = list(out_dir.iterdir())
    assert (run_dir / "metrics.parquet").is_file() and (run_dir / "report.md").is_file()
