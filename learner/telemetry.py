"""What a user watches on the Ray dashboard: the run's per-epoch figures as Ray metrics.

The driver records them once per epoch (and per evaluation) through ``ray.util.metrics``;
Ray's metrics agent exports them in Prometheus format on every node's metrics export port,
which the dashboard's Grafana panels and any Prometheus scrape read.  Every series carries
the run's name and the role it describes (``rollout``, ``reward``, ``learner``, ``driver``),
so several runs on one cluster stay apart.  Names get Ray's ``ray_`` prefix on export:
``carve3d_reward_mean`` is scraped as ``ray_carve3d_reward_mean``.
"""

from __future__ import annotations

import math

from ray.util.metrics import Counter, Gauge

PREFIX = "carve3d_"
TAGS = ("run", "role")

# (metrics-row key, metric name, role, description): gauges set from each epoch's row
EPOCH_GAUGES = [
    ("reward_mean", "reward_mean", "reward", "Mean reward of the epoch's samples"),
    ("mrc_mean", "mrc", "reward", "Mean multi-view reconstruction consistency (LPIPS, lower is better)"),
    ("alignment_mean", "alignment", "reward", "Mean prompt alignment of the epoch's samples"),
    ("kl_mean", "kl", "learner", "Mean KL estimate to the reference (base) policy"),
    ("samples_per_second", "samples_per_second", "driver", "Samples per second over the whole epoch"),
    ("sample_seconds", "phase_seconds_sample", "rollout", "Seconds the epoch spent sampling"),
    ("reward_tail_seconds", "phase_seconds_reward", "reward", "Seconds of scoring not hidden behind sampling"),
    ("train_seconds", "phase_seconds_train", "learner", "Seconds of the learner update"),
    ("sync_seconds", "phase_seconds_sync", "learner", "Seconds to publish and load the new weights"),
    ("sync_bytes", "sync_bytes", "learner", "Bytes of one weight publication"),
    ("version", "policy_version", "learner", "Policy version after the epoch's update"),
    ("reward_queue_depth_max", "reward_queue_depth", "reward", "Most reward batches waiting at once in the epoch"),
]
# (metrics-row key, role): cumulative restart counts in the row -> counters
RESTART_COUNTERS = [("rollout_restarts", "rollout"), ("reward_restarts", "reward")]


class DashboardMetrics:
    """Gauges and counters of one run.  ``record_epoch`` takes the row the driver logs."""

    def __init__(self, run_name: str):
        self.run = run_name
        self.gauges = {key: (Gauge(PREFIX + name, description, TAGS), role)
                       for key, name, role, description in EPOCH_GAUGES}
        self.eval_gauges = {key: Gauge(PREFIX + "eval_" + key, f"Held-out evaluation: {key}", TAGS)
                            for key in ("mrc_mean", "alignment_mean")}
        self.restarts = Counter(PREFIX + "actor_restarts", "Actor failures handled (crash or timeout)", TAGS)
        self.epochs = Counter(PREFIX + "epochs", "Epochs finished", TAGS)
        self.restarts_seen = {key: 0 for key, _ in RESTART_COUNTERS}

    def _tags(self, role: str) -> dict:
        return {"run": self.run, "role": role}

    def _set(self, gauge: Gauge, value, role: str) -> None:
        """Missing or NaN values (e.g. no MRC with the brightness reward) are not exported."""
        if value is not None and math.isfinite(float(value)):
            gauge.set(float(value), tags=self._tags(role))

    def record_epoch(self, row: dict) -> None:
        for key, (gauge, role) in self.gauges.items():
            self._set(gauge, row.get(key), role)
        for key, role in RESTART_COUNTERS:
            current = int(row.get(key, 0))
            if current < self.restarts_seen[key]:  # a new set of actors after a learner failure
                self.restarts_seen[key] = 0
            if current > self.restarts_seen[key]:
                self.restarts.inc(current - self.restarts_seen[key], tags=self._tags(role))
                self.restarts_seen[key] = current
        self.epochs.inc(1, tags=self._tags("driver"))

    def record_eval(self, summary: dict) -> None:
        for key, gauge in self.eval_gauges.items():
            self._set(gauge, summary.get(key), "reward")
