"""The run's figures reach Ray's metrics export (what the dashboard and Prometheus read)."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports.  The sockets stay bound until all are picked: one
    at a time, the OS may hand out the same port twice, and Ray refuses to start a head
    whose components share a port."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def scrape(port: int, needle: str, timeout: float = 60.0) -> list[str]:
    """The exported sample lines that contain ``needle``, polling until some appear."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            lines = [line for line in body.splitlines() if needle in line and not line.startswith("#")]
            if lines:
                return lines
        except OSError:
            pass
        time.sleep(1)
    return []


def sample_value(lines: list[str], name: str, **tags: str) -> float | None:
    for line in lines:
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in tags.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture
def ray_with_metrics_port(monkeypatch):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("RAY_metrics_report_interval_ms", "1000")
    port = free_port()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _metrics_export_port=port)
    yield port
    ray.shutdown()


@pytest.mark.integration
def test_epoch_rows_become_tagged_metrics(ray_with_metrics_port):
    from learner.telemetry import DashboardMetrics

    dashboard = DashboardMetrics("telemetry-test")
    row = {"reward_mean": -0.0123, "mrc_mean": float("nan"), "kl_mean": 2e-4, "version": 3,
           "sample_seconds": 4.0, "train_seconds": 2.5, "reward_queue_depth_max": 2,
           "rollout_restarts": 1, "reward_restarts": 0}
    dashboard.record_epoch(row)
    dashboard.record_epoch({**row, "version": 4, "rollout_restarts": 2})
    dashboard.record_eval({"mrc_mean": 0.0091, "alignment_mean": 0.5})
    lines = scrape(ray_with_metrics_port, 'run="telemetry-test"')
    lines += scrape(ray_with_metrics_port, "ray_carve3d_eval_mrc_mean", timeout=20)
    assert lines, "no carve3d metric reached the export endpoint"
    assert sample_value(lines, "ray_carve3d_reward_mean", role="reward") == pytest.approx(-0.0123)
    assert sample_value(lines, "ray_carve3d_policy_version", role="learner") == 4
    assert sample_value(lines, "ray_carve3d_phase_seconds_sample", role="rollout") == 4.0
    assert sample_value(lines, "ray_carve3d_actor_restarts_total", role="rollout") == 2  # cumulative, not 1 + 2
    assert sample_value(lines, "ray_carve3d_epochs_total", role="driver") == 2
    assert sample_value(lines, "ray_carve3d_eval_mrc_mean") == pytest.approx(0.0091)
    assert sample_value(lines, "ray_carve3d_mrc") is None  # NaN (no MRC reward) is not exported
