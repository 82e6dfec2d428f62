"""The public-model recipe's path through the actors (issue 19), with tiny random models in the
public layouts: MVDream-family sampling with log-probs on a rollout actor, MRC through the LGM
reconstructor and the Gaussian splatting renderer on a reward actor, and a learner update.
configs/mvdream_lgm.yaml is the same run at full size."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from learner.config import ConfigError, load_config
from reward_service.lgm import LGM, save_lgm

PROMPTS = ["a red chair", "a blue teapot"]


@pytest.fixture(scope="module")
def tiny_lgm(tmp_path_factory):
    """LGM's 'test' preset (32 px input, 16x16 Gaussians a view), random, saved as the release is."""
    import torch

    torch.manual_seed(0)
    return save_lgm(LGM("test"), tmp_path_factory.mktemp("lgm") / "model.safetensors")


def recipe_overrides(tmp_path, tiny_lgm) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    return ["model.path=builtin:tiny-mvdream", "run.plugins=[]", "reward.kind=mrc", "reward.reconstructor=lgm",
            f"reward.reconstructor_options={{weights: {tiny_lgm}, preset: test}}", "reward.alignment=null",
            f"prompts.file={prompts}", "eval.prompts_file=null", f"run.output_dir={tmp_path / 'runs'}",
            "train.epochs=1", "train.samples_per_epoch=4", "train.group_size=2", "rollout.batch_size=2",
            "sampling.num_steps=2", "run.samples_to_save=2"]


@pytest.mark.integration
@pytest.mark.parametrize("algorithm", ["ddpo-sf", "nabla-gfn"])
def test_tiny_mvdream_and_lgm_through_the_actors(algorithm, tmp_path, tiny_lgm, local_ray):
    from learner.driver import run

    config = load_config([*recipe_overrides(tmp_path, tiny_lgm), f"algorithm={algorithm}"])
    assert config.model.family == "auto"
    run_dir = run(config)
    m = pd.read_parquet(run_dir.path / "metrics.parquet")
    assert m["version"].tolist() == [1] and m["num_samples"].tolist() == [4]
    assert m["mrc_mean"].between(0, 1).all() and np.isfinite(m["grad_norm"]).all() and m["grad_norm"].gt(0).all()
    assert m["logprob_recompute_gap"].max() < 1e-4
    assert any((run_dir.path / "samples").rglob("*.png"))  # the 4 views, pictured at the PNG edge


def test_missing_lgm_weights_are_refused_before_anything_starts(tmp_path, tiny_lgm):
    overrides = recipe_overrides(tmp_path, tiny_lgm)
    overrides = [o for o in overrides if not o.startswith("reward.reconstructor_options")]
    with pytest.raises(ConfigError, match="reward.reconstructor_options.weights"):
        load_config([*overrides, f"reward.reconstructor_options={{weights: {tmp_path / 'nothing.safetensors'}}}"])
    with pytest.raises(ConfigError, match="reward.reconstructor_options.weights"):
        load_config(overrides)  # no weights at all
