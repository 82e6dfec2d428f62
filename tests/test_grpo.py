"""GRPO (algorithm=grpo, learner/algorithms/grpo.py): its math, then one short run through the actors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from learner.algorithms.grpo import EPS, group_advantages, step_kl
from learner.config import ConfigError, load_config


def test_group_advantages_z_score_within_each_prompt():
    prompts = ["a", "b", "a", "b", "a", "c"]
    rewards = np.array([1.0, 10.0, 3.0, 30.0, 5.0, 7.0])
    adv = group_advantages(prompts, rewards)
    a = np.array([1.0, 3.0, 5.0])
    np.testing.assert_allclose(adv[[0, 2, 4]], (a - 3.0) / (a.std() + EPS))
    np.testing.assert_allclose(adv[[1, 3]], [-10.0 / (10.0 + EPS), 10.0 / (10.0 + EPS)])
    assert adv[5] == 0.0  # a group of one has nothing to compare with
    # the same rewards shifted or scaled per prompt give the same advantages (up to eps)
    shifted = rewards + np.array([100.0, -5.0, 100.0, -5.0, 100.0, 0.0])
    np.testing.assert_allclose(group_advantages(prompts, shifted), adv, atol=1e-12)


def test_step_kl_is_the_gaussian_kl_with_a_shared_sigma():
    gen = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    std = torch.tensor([0.5, 2.0]).reshape(2, 1, 1, 1)
    assert step_kl(ref, ref, std).item() == 0.0
    expected = ((mean - ref) ** 2 / (2 * std**2)).mean(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(step_kl(mean, ref, std), expected)
    # against torch's KL of the per-dimension Gaussians
    p, q = torch.distributions.Normal(mean, std.expand_as(mean)), torch.distributions.Normal(ref, std.expand_as(ref))
    torch.testing.assert_close(step_kl(mean, ref, std), torch.distributions.kl_divergence(p, q).mean(dim=(1, 2, 3)).mean())


def test_grpo_needs_groups():
    assert load_config(["algorithm=grpo", "train.group_size=4"]).train.algorithm == "grpo"
    with pytest.raises(ConfigError, match="train.group_size >= 2"):
        load_config(["algorithm=grpo", "train.group_size=1"])


@pytest.mark.usefixtures("local_ray")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_grpo_runs_through_the_actors(tmp_path, tiny_model_dir):
    from learner.driver import run

    run_dir = run(load_config([
        f"model.path={tiny_model_dir}", f"run.output_dir={tmp_path}", "algorithm=grpo", "train.group_size=2",
        "reward.kind=brightness", "reward.alignment=null", "sampling.num_steps=2", "prompts.limit=2",
        "rollout.batch_size=4", "train.samples_per_epoch=4", "train.epochs=2", "eval.prompts_file=null",
        "run.samples_to_save=2"]))
    frame = pd.read_parquet(run_dir.path / "metrics.parquet")
    assert list(frame["version"]) == [1, 2] and (frame["skipped_steps"] == 0).all()
    assert np.isfinite(frame["loss"]).all() and (frame["grad_norm"] > 0).all()
    assert frame["logprob_recompute_gap"].max() < 1e-4  # on-policy
    assert (frame["advantage_mean"].abs() < 1e-9).all()  # z-scores within groups average to 0
