"""Logging sinks: metrics.parquet always, TensorBoard event files with run.tensorboard=true.

The event files are read back with TensorBoard's own reader and must hold the same figures as
metrics.parquet (TensorBoard stores scalars as float32).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from learner.config import Config
from learner.rundir import RunDirectory
from learner.sinks import SINKS, build_sinks, sink_names

pytest.importorskip("tensorboard")


def read_events(log_dir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in the event files, via TensorBoard's reader (which
    must show each step once)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags()["scalars"]:
        steps = [e.step for e in accumulator.Scalars(tag)]
        assert len(steps) == len(set(steps)), f"{tag}: steps {steps} shown more than once"
        out[tag] = {e.step: e.value for e in accumulator.Scalars(tag)}
    return out


def same_figures(events: dict[str, dict[int, float]], metrics: pd.DataFrame) -> list[str]:
    """Every numeric column of metrics.parquet, epoch by epoch, against the events: the differences."""
    problems = []
    numeric = [c for c in metrics.columns if pd.api.types.is_numeric_dtype(metrics[c])]
    for column in numeric:
        want = {int(e): float(np.float32(v)) for e, v in zip(metrics["epoch"], metrics[column])}
        got = events.get(column)
        if got is None or set(got) != set(want):
            problems.append(f"{column}: steps {sorted(got or [])} != epochs {sorted(want)}")
            continue
        problems += [f"{column}@{e}: {got[e]} != {v}" for e, v in want.items()
                     if not (got[e] == v or math.isnan(got[e]) and math.isnan(v))]
    extra = sorted(set(events) - set(numeric) - {t for t in events if t.startswith("eval/")})
    if extra:
        problems.append(f"tags not in metrics.parquet: {extra}")
    return problems


def config(tensorboard: bool) -> Config:
    c = Config()
    c.run.tensorboard = tensorboard
    return c


def row(epoch: int, scale: float = 1.0) -> dict:
    return {"epoch": epoch, "version": epoch + 1, "reward_mean": -0.1234567 * scale / (epoch + 1),
            "mrc_mean": float("nan"), "kl_mean": np.float64(1e-5 * epoch), "num_dropped": np.int64(epoch % 2),
            "grad_norm": 3.25 * scale, "early": False, "note": "not a figure"}


def test_which_sinks_a_run_uses():
    assert sink_names(config(False)) == ["parquet", "ray-metrics"]
    assert sink_names(config(True), ray_metrics=False) == ["parquet", "tensorboard"]
    assert {"parquet", "ray-metrics", "tensorboard"} <= set(SINKS.names())


def test_tensorboard_events_hold_the_figures_of_metrics_parquet(tmp_path):
    run_dir = RunDirectory(tmp_path)
    sinks = build_sinks(config(True), run_dir, ray_metrics=False)
    sinks.record_eval({"tag": "start", "version": 0, "mrc_mean": 0.25, "alignment_mean": 0.5, "num_samples": 4})
    for epoch in range(3):
        sinks.record_epoch(row(epoch))
    sinks.record_eval({"tag": "end", "version": 3, "mrc_mean": 0.125, "alignment_mean": 0.75, "num_samples": 4})
    sinks.close()
    metrics = pd.read_parquet(tmp_path / "metrics.parquet")
    events = read_events(tmp_path / "tensorboard")
    assert same_figures(events, metrics) == []
    assert events["reward_mean"][2] == pytest.approx(-0.1234567 / 3, rel=1e-6)
    assert events["eval/mrc_mean"] == {0: 0.25, 3: 0.125} and events["eval/alignment_mean"] == {0: 0.5, 3: 0.75}
    assert "note" not in events and "eval/tag" not in events


def test_without_the_flag_no_event_files(tmp_path):
    sinks = build_sinks(config(False), RunDirectory(tmp_path), ray_metrics=False)
    sinks.record_epoch(row(0))
    sinks.close()
    assert (tmp_path / "metrics.parquet").is_file() and not (tmp_path / "tensorboard").exists()


@pytest.mark.parametrize("new_process", [True, False])
def test_a_resume_replaces_the_epochs_run_again(tmp_path, new_process):
    """As metrics.parquet drops the rows of the epochs a resume runs again, TensorBoard's
    reader shows only their new values (purge_step)."""
    c = config(True)
    c.run.dir = str(tmp_path)
    run_dir = RunDirectory.create(c)
    sinks = build_sinks(c, run_dir, ray_metrics=False)
    for epoch in range(3):
        sinks.record_epoch(row(epoch))
    if new_process:  # python -m learner.main resume=RUN_DIR
        sinks.close()
        run_dir = RunDirectory.open(tmp_path)
        sinks = build_sinks(c, run_dir, ray_metrics=False)
    run_dir.keep_epochs_before(1)  # what the driver's restore does
    for epoch in (1, 2, 3):
        sinks.record_epoch(row(epoch, scale=2.0))
    sinks.close()
    metrics = pd.read_parquet(tmp_path / "metrics.parquet")
    assert list(metrics["epoch"]) == [0, 1, 2, 3]
    events = read_events(tmp_path / "tensorboard")
    assert same_figures(events, metrics) == []
    assert events["grad_norm"] == {0: 3.25, 1: 6.5, 2: 6.5, 3: 6.5}
