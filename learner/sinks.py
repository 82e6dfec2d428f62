"""Where the driver's per-epoch figures go: logging sinks, one registry (``plugins.Registry``).

A sink is built as ``factory(config, run_dir)`` and has ``record_epoch(row)`` (the metrics
dict of one epoch, the row of ``metrics.parquet``), ``record_eval(summary)`` (a held-out
evaluation's summary) and ``close()``.  Built in:

* ``parquet``: ``metrics.parquet`` in the run directory (always);
* ``ray-metrics``: gauges and counters for the Ray dashboard (``learner/telemetry.py``; always);
* ``tensorboard``: TensorBoard event files in ``<run dir>/tensorboard/`` (``run.tensorboard=true``):
  every numeric column of the epoch's row as a scalar at step ``epoch``, and each evaluation's
  figures under ``eval/`` at step ``version`` (the policy version it scored).

:func:`build_sinks` builds the ones a run uses: parquet, ray-metrics (where a Ray is connected)
and every sink registered with an ``enabled`` hook, ``enabled(config) -> bool``, that says yes
(``tensorboard``: ``run.tensorboard``).  A plug-in registers another one the same way
(e.g. Weights & Biases, enabled by its own config or environment).
"""

from __future__ import annotations

import numbers
from typing import Protocol

import numpy as np

from plugins import Registry


class Sink(Protocol):
    def record_epoch(self, row: dict) -> None: ...

    def record_eval(self, summary: dict) -> None: ...

    def close(self) -> None: ...


SINKS = Registry("logging sink", "run.tensorboard")


def scalars(row: dict) -> dict[str, float]:
    """The row's numeric entries (numbers, numpy numbers, booleans) as floats; NaN stays NaN."""
    return {key: float(value) for key, value in row.items() if isinstance(value, (numbers.Real, np.bool_))}


@SINKS.register("parquet")
class ParquetSink:
    """``metrics.parquet``: one row per epoch (``RunDirectory.log_metrics``)."""

    def __init__(self, config, run_dir) -> None:
        self.run_dir = run_dir

    def record_epoch(self, row: dict) -> None:
        self.run_dir.log_metrics(row)

    def record_eval(self, summary: dict) -> None:  # eval.json and eval_<tag>.parquet: RunDirectory.save_eval
        pass

    def close(self) -> None:
        pass


@SINKS.register("ray-metrics")
class RayMetricsSink:
    """The Ray dashboard's metrics (``learner.telemetry.DashboardMetrics``), tagged with the run."""

    def __init__(self, config, run_dir) -> None:
        from learner.telemetry import DashboardMetrics

        self.dashboard = DashboardMetrics(run_dir.path.name)

    def record_epoch(self, row: dict) -> None:
        self.dashboard.record_epoch(row)

    def record_eval(self, summary: dict) -> None:
        self.dashboard.record_eval(summary)

    def close(self) -> None:
        pass


@SINKS.register("tensorboard", enabled=lambda config: config.run.tensorboard)
class TensorBoardSink:
    """TensorBoard event files under ``<run dir>/tensorboard``: each epoch's numeric figures at
    step ``epoch``, each evaluation's under ``eval/`` at step ``version`` (the policy version it
    scored: the updates before it).  An epoch at or before the last one written means the epochs
    are being run again (a resume): the writer is (re)opened with ``purge_step`` so that
    TensorBoard hides the superseded events, as metrics.parquet drops its rows."""

    def __init__(self, config, run_dir) -> None:
        self.log_dir = run_dir.path / "tensorboard"
        self.writer, self.last_epoch = None, None

    def _open(self, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def _write(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        for key, value in values.items():
            self.writer.add_scalar(prefix + key, value, global_step=step)
        self.writer.flush()

    def record_epoch(self, row: dict) -> None:
        epoch = int(row["epoch"])
        if self.writer is None:  # a new run (epoch 0), or a resumed one in a new process
            self._open(purge_step=epoch if epoch > 0 else None)
        elif self.last_epoch is not None and epoch <= self.last_epoch:  # resumed in this process
            self._open(purge_step=epoch)
        self.last_epoch = epoch
        self._write(scalars(row), epoch)

    def record_eval(self, summary: dict) -> None:
        if self.writer is None:
            self._open(purge_step=None)
        self._write({k: v for k, v in scalars(summary).items() if k != "version"}, int(summary.get("version") or 0),
                    "eval/")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Sinks:
    """The run's sinks, called together (``record_epoch``, ``record_eval``, ``close``)."""

    def __init__(self, sinks: list) -> None:
        self.sinks = sinks

    def record_epoch(self, row: dict) -> None:
        for sink in self.sinks:
            sink.record_epoch(row)

    def record_eval(self, summary: dict) -> None:
        for sink in self.sinks:
            sink.record_eval(summary)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def sink_names(config, ray_metrics: bool = True) -> list[str]:
    """parquet always; the Ray metrics when a Ray is connected; then each sink whose ``enabled``
    hook says yes for this config (tensorboard with run.tensorboard)."""
    names = ["parquet"] + (["ray-metrics"] if ray_metrics else [])
    for name in SINKS.names():
        enabled = SINKS.hook(name, "enabled")
        if enabled is not None and enabled(config):
            names.append(name)
    return names


def build_sinks(config, run_dir, ray_metrics: bool = True) -> Sinks:
    return Sinks([SINKS.get(name)(config, run_dir) for name in sink_names(config, ray_metrics)])
