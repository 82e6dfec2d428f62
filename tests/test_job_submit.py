"""``ray start --head`` on 127.0.0.1, then ``ray job submit -- python -m learner.main``,
``ray job logs --follow``, and the run's metrics read from the head's metrics export port.

The head uses Ray's default token authentication, so the submitting client gets
``RAY_AUTH_MODE=token`` (REFERENCES.md).  It keeps its files in its own temp dir, so a
plain ``ray.init()`` elsewhere on the machine (an experiment next to the tests) never
finds and joins it.  The head is stopped at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from test_telemetry import free_ports, sample_value, scrape

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


@pytest.fixture
def ray_head(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    gcs_port, dashboard_port, metrics_port, agent_http, agent_grpc, runtime_env = free_ports(6)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_metrics_report_interval_ms": "1000"}
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    start = subprocess.run(
        RAY + ["start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--num-cpus=2",
               # free ports for the agents too: the defaults clash with any other Ray on the machine
               f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics_port}",
               f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield f"http://127.0.0.1:{dashboard_port}", env, metrics_port, temp_dir
    finally:
        stop_head(gcs_port, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_head(gcs_port: int, temp_dir: str) -> None:
    """Stop this test's head only.  ``ray stop`` would kill every Ray on the machine,
    including an experiment the developer runs next to the tests.  The head's processes
    name its temp dir or its GCS port.  The port is matched under any address: the
    autoscaler's monitor and the log monitor name the GCS by the machine's address, not
    127.0.0.1, and were left running when only 127.0.0.1 was matched.  Its workers exit
    when their raylet does."""
    import psutil

    gcs = re.compile(rf"(127\.0\.0\.1:|--gcs_server_port=|--gcs-address=\S+:){gcs_port}\b")
    mine = [p for p in psutil.process_iter(["cmdline"])
            if temp_dir in (line := " ".join(p.info["cmdline"] or [])) or gcs.search(line)]
    for process in mine:
        process.terminate()
    _, alive = psutil.wait_procs(mine, timeout=30)
    for process in alive:
        process.kill()
    # what `ray stop` also does: forget this head, or the next ray.init() tries to join it
    current = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    if current.is_file() and current.read_text().strip().endswith(f":{gcs_port}"):
        current.unlink()


def submit(address: str, env: dict, job_id: str, overrides: list[str]) -> None:
    """``ray job submit --no-wait`` as docs/cluster.md shows it, retried while the head's job
    agent is not up yet ("No available agent to submit job")."""
    command = RAY + [
        "job", "submit", "--address", address, "--no-wait", "--submission-id", job_id,
        "--working-dir", str(PROJECT_ROOT), "--runtime-env", str(PROJECT_ROOT / "cluster" / "runtime_env.yaml"),
        "--", "python", "-m", "learner.main", *overrides]
    for _attempt in range(12):  # a loaded machine may not have the job agent up yet
        job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        log = job.stdout + job.stderr
        if "No available agent to submit job" not in log:
            break
        time.sleep(10)
    assert job.returncode == 0, log


def job_logs_and_status(address: str, env: dict, job_id: str) -> tuple[str, str]:
    """The job's whole log (``ray job logs --follow`` returns when it ends) and its status."""
    follow = subprocess.run(RAY + ["job", "logs", "--address", address, "--follow", job_id],
                            env=env, capture_output=True, text=True, timeout=600)
    status = subprocess.run(RAY + ["job", "status", "--address", address, job_id],
                            env=env, capture_output=True, text=True, timeout=60)
    return follow.stdout, (status.stdout + status.stderr).lower()


@pytest.mark.integration
def test_ray_job_submit_runs_the_driver(ray_head, tmp_path, tiny_model_dir):
    address, env, metrics_port, temp_dir = ray_head
    out_dir, job_id = tmp_path / "runs", f"carve3d-test-{os.getpid()}"
    small = [f"model.path={tiny_model_dir}", "reward.kind=brightness", "train.epochs=3", "train.samples_per_epoch=4", "train.group_size=1",
             "sampling.num_steps=2", "prompts.limit=2", "rollout.batch_size=2", "run.name=submitted",
             "eval.prompts_file=null", "reward.alignment=null"]

    # The default run.output_dir=runs would resolve inside Ray's unpacked copy of the job
    # (runtime_resources/working_dir_files/_ray_pkg_<hash>): refused before Ray is joined.
    submit(address, env, job_id + "-relative", small)
    logs, status = job_logs_and_status(address, env, job_id + "-relative")
    assert "failed" in status, status + logs
    assert "run.output_dir=runs is relative" in logs and "set run.output_dir=/a/shared/path" in logs, logs
    assert "run directory:" not in logs and "Traceback" not in logs, logs
    assert not list(Path(temp_dir).glob("**/runtime_resources/**/runs")), "a run directory in Ray's temp dir"
    actors = subprocess.run(RAY + ["list", "actors", "--address", address, "--format", "json"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert actors.returncode == 0, actors.stderr
    started = [a["name"] for a in json.loads(actors.stdout) if a["class_name"] != "JobSupervisor"]  # Ray's own
    assert started == [], started

    submit(address, env, job_id, small + [f"run.output_dir={out_dir}"])
    # The driver's per-epoch metrics, scraped from the head while the job runs.
    seen: list[str] = []
    watcher = threading.Thread(target=lambda: seen.extend(scrape(metrics_port, "ray_carve3d_epochs_total", 300)))
    watcher.start()
    logs, status = job_logs_and_status(address, env, job_id)
    watcher.join()
    assert "succeeded" in status, status + logs
    assert "epoch 1/3" in logs and "epoch 3/3" in logs, logs  # per-epoch lines
    [run_dir] = list(out_dir.iterdir())
    driver_lines = logs.split("Running entrypoint for job", 1)[1].splitlines()[1:]  # after Ray's own lines
    assert driver_lines[0] == f"run directory: {run_dir}", logs
    assert (run_dir / "metrics.parquet").is_file() and f"run directory: `{run_dir}`" in (run_dir / "report.md").read_text()
    assert f"report: {run_dir / 'report.md'}" in logs
    assert sample_value(seen, "ray_carve3d_epochs_total", run=run_dir.name, role="driver") >= 1, seen
