"""The whole loop through the real Ray actors (rollout, reward pool, learner).

One local Ray for the module; each test runs ``learner.driver.run`` with a tiny
configuration.  These are the short versions that CI runs; ``-m slow`` adds a
longer learning run.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import ray

from learner.config import PROJECT_ROOT, load_config
from learner.driver import RunStopped, run

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.usefixtures("local_ray")]
CONFIGS = PROJECT_ROOT / "configs"


def tiny_run(tmp_path, model_dir, *overrides):
    base = [
        f"model.path={model_dir}", f"run.output_dir={tmp_path}", "sampling.num_steps=4",
        "prompts.limit=4", "rollout.batch_size=4", "train.samples_per_epoch=8",
        "rollout.num_cpus=0.5", "reward.num_cpus=0.5", "train.num_cpus=0.5", "run.samples_to_save=4",
        "eval.prompts_file=null", "reward.alignment=null",
    ]
    return run(load_config(base + list(overrides)))


def metrics(run_dir) -> pd.DataFrame:
    return pd.read_parquet(run_dir.path / "metrics.parquet")


@pytest.fixture(scope="module")
def small_grid_model(tmp_path_factory):
    """A 32 px grid: brightness needs no 32 px views, and it is 4x cheaper."""
    from policy.models import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("models") / "tiny32", seed=0, grid_size=32)


def test_brightness_reward_rises_through_the_actors(tmp_path, small_grid_model):
    epochs, n = 6, 16
    run_dir = tiny_run(tmp_path, small_grid_model, "--config", str(CONFIGS / "tiny_brightness.yaml"),
                       f"train.epochs={epochs}", f"train.samples_per_epoch={n}")
    m = metrics(run_dir)
    rewards = m["reward_mean"].to_numpy()
    print("brightness reward per epoch:", rewards.round(4).tolist())
    assert list(m["version"]) == list(range(1, epochs + 1))
    standard_error = m["reward_std"].iloc[0] / math.sqrt(n)
    # Clearly rising: the last two epochs beat the first two by several standard errors.
    assert rewards[-2:].mean() - rewards[:2].mean() > 3 * standard_error, rewards
    assert rewards[-1] > rewards[0], rewards


def test_mrc_run_writes_everything_and_kl_grows(tmp_path, tiny_model_dir):
    """The learning run's settings with the MRC reward: finite rewards, KL 0 at version 0
    then growing; NaN rewards dropped and counted; the run directory complete."""
    run_dir = tiny_run(tmp_path, tiny_model_dir, "--config", str(CONFIGS / "tiny_brightness.yaml"),
                       "reward.kind=mrc", "train.epochs=3", "train.samples_per_epoch=8",
                       "faults.nonfinite_reward_fraction=0.25",
                       # The held-out evaluation and the alignment evaluator, on a small scale.
                       "eval.prompts_file=data/minicarve/test_prompts.txt", "eval.num_prompts=2",
                       "eval.samples_per_prompt=2", "reward.alignment=minicarve", "run.tensorboard=true")
    m = metrics(run_dir)
    kl = m["kl_mean"].tolist()
    assert kl[0] == 0.0 and 0.0 < kl[1] < kl[2], kl
    # The learner recomputes the rollout actors' log-probs exactly: the path is on-policy.
    assert (m["logprob_recompute_gap"] < 1e-4).all(), m["logprob_recompute_gap"].tolist()
    assert m["reward_mean"].map(math.isfinite).all() and (m["reward_mean"] < 0).all()
    assert m["mrc_mean"].map(math.isfinite).all() and (m["mrc_mean"] > 0).all()
    assert m["num_dropped"].sum() > 0 and (m["num_samples"] + m["num_dropped"] == 8).all()
    for column in ["loss", "grad_norm", "sample_seconds", "reward_tail_seconds", "train_seconds",
                   "sync_seconds", "samples_per_second", "advantage_abs_mean", "version"]:
        assert column in m.columns
    p = run_dir.path
    assert (p / "config.yaml").is_file() and (p / "report.md").is_file()
    assert (p / "plots" / "training_curves.png").is_file()
    assert (p / "samples" / "epoch_000.png").is_file()
    assert list((p / "samples" / "epoch_001").glob("*_grid.png"))
    assert list((p / "samples" / "epoch_001").glob("*_rerender.png"))
    ckpt = p / "checkpoints" / "epoch_0001"
    for name in ("weights.safetensors", "optimizer.safetensors", "trainer_state.json"):
        assert (ckpt / name).is_file()
    assert m["alignment_mean"].between(0, 1).all()
    evals = json.loads((p / "eval.json").read_text())
    assert set(evals) == {"start", "end"} and evals["start"]["version"] == 0 and evals["end"]["version"] == 3
    for tag in ("start", "end"):
        assert evals[tag]["num_samples"] == 4 and math.isfinite(evals[tag]["mrc_mean"])
        assert 0 <= evals[tag]["alignment_mean"] <= 1
        assert (p / "samples" / f"eval_{tag}.png").is_file()
        assert len(pd.read_parquet(p / f"eval_{tag}.parquet")) == 4
    report = (p / "report.md").read_text()
    assert "MRC" in report and "completed all epochs" in report
    assert "Held-out evaluation" in report
    assert "RANDOM AlexNet backbone" not in report  # the shipped ImageNet backbone: the paper's metric
    # run.tensorboard=true: TensorBoard's reader finds metrics.parquet's figures, and the evaluations'
    from test_sinks import read_events, same_figures

    events = read_events(p / "tensorboard")
    assert same_figures(events, m) == []
    assert events["eval/mrc_mean"].keys() == {0, 3}


def test_all_rewards_nonfinite_stops_with_the_epoch(tmp_path, tiny_model_dir):
    with pytest.raises(RunStopped, match="epoch 0: all 8 samples had a non-finite reward"):
        tiny_run(tmp_path, tiny_model_dir, "reward.kind=brightness", "train.epochs=2",
                 "faults.nonfinite_reward_fraction=1.0")
    [run_dir] = list(tmp_path.iterdir())
    assert "stopped with an error" in (run_dir / "report.md").read_text()


def test_warmup_epoch_and_early_stop_on_kl(tmp_path, tiny_model_dir):
    run_dir = tiny_run(tmp_path, tiny_model_dir, "reward.kind=brightness", "train.epochs=5",
                       "train.learning_rate=3e-2", "train.kl_early_stop=1e-9", "train.warmup_epoch=true")
    m = metrics(run_dir)
    # epoch 0 only fills the stat trackers (no update, still version 0); epoch 1 samples at
    # version 0 too (KL 0) and updates; epoch 2 is the first with KL > 0 and stops the run.
    assert m["version"].tolist() == [0, 1, 2]
    assert math.isnan(m["loss"].iloc[0]) and m["kl_mean"].iloc[1] == 0 and m["kl_mean"].iloc[2] > 0
    assert "train.kl_early_stop" in (run_dir.path / "report.md").read_text()


@pytest.mark.slow
def test_default_main_job(tmp_path, run_command):
    """The README's first command as a user runs it: the embedded default config."""
    import sys

    ray.shutdown()  # the driver starts its own embedded Ray, as from a shell
    done = run_command([sys.executable, "-m", "learner.main", f"run.output_dir={tmp_path}"], timeout=900,
                       cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [run_dir] = list(tmp_path.iterdir())
    assert len(pd.read_parquet(run_dir / "metrics.parquet")) == 5
    report = (run_dir / "report.md").read_text()
    assert "completed all epochs" in report and "Held-out evaluation" in report
    evals = json.loads((run_dir / "eval.json").read_text())
    assert evals["start"]["num_samples"] == evals["end"]["num_samples"] == 64
    # It learns: held-out MRC lower by more than 2 paired standard errors (docs/minicarve.md).
    assert "standard errors, so the policy learned" in report and "learning: held-out MRC" in done.stdout


def test_default_job_short(tmp_path):
    """The default job's path (MiniCarve sft-short, the LRM, the alignment evaluator, the
    held-out evaluation) at a CI-sized scale."""
    run_dir = run(load_config([f"run.output_dir={tmp_path}", "train.epochs=1", "train.samples_per_epoch=8",
                               "sampling.num_steps=3", "eval.num_prompts=2", "eval.samples_per_prompt=2",
                               "rollout.num_cpus=0.5", "reward.num_cpus=0.5", "train.num_cpus=0.5"]))
    m = metrics(run_dir)
    assert m["mrc_mean"].between(0, 1).all() and m["alignment_mean"].between(0, 1).all()
    evals = json.loads((run_dir.path / "eval.json").read_text())
    assert evals["start"]["version"] == 0 and evals["end"]["version"] == 1
    assert 0 <= evals["end"]["alignment_mean"] <= 1 and math.isfinite(evals["end"]["mrc_mean"])
    assert "**Learning:** held-out MRC" in (run_dir.path / "report.md").read_text()
