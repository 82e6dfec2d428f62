"""The public-model recipe's path through the actors (issue 19), with tiny random models in the
public layouts: MVDream-family sampling with log-probs on a rollout actor, MRC through the LGM
reconstructor and the Gaussian splatting renderer on a reward actor, and a learner update.
configs/mvdream_lgm.yaml is the same run at full size."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from learner.config import PROJECT_ROOT, ConfigError, load_config
from reward_service.lgm import LGM, save_lgm

PROMPTS = ["a red chair", "a blue teapot"]
RECIPE = PROJECT_ROOT / "configs" / "mvdream_lgm.yaml"


@pytest.fixture(scope="module")
def tiny_lgm(tmp_path_factory):
    """LGM's 'test' preset (32 px input, 16x16 Gaussians a view), random, saved as the release is."""
    import torch

    torch.manual_seed(0)
    return save_lgm(LGM("test"), tmp_path_factory.mktemp("lgm") / "model.safetensors")


def recipe_overrides(tmp_path, tiny_lgm) -> list[str]:
    """configs/mvdream_lgm.yaml with the tiny models, CPU roles and a one-epoch size."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    return ["--config", str(RECIPE), "model.path=builtin:tiny-mvdream", "model.dtype=fp32",
            f"reward.reconstructor_options={{weights: {tiny_lgm}, preset: test}}", f"prompts.file={prompts}",
            f"run.output_dir={tmp_path / 'runs'}", "train.epochs=1", "train.samples_per_epoch=4", "train.group_size=2",
            "rollout.batch_size=2", "rollout.num_workers=1", "reward.num_workers=1", "sampling.num_steps=2",
            "run.samples_to_save=2", *(f"{role}.{key}={value}" for role in ("rollout", "reward", "train")
                                       for key, value in (("num_gpus", 0), ("num_cpus", 0.5), ("torch_threads", 1)))]


@pytest.mark.integration
@pytest.mark.parametrize("algorithm", ["ddpo-sf", "nabla-gfn"])
def test_tiny_mvdream_and_lgm_through_the_actors(algorithm, tmp_path, tiny_lgm, local_ray):
    from learner.driver import run

    config = load_config([*recipe_overrides(tmp_path, tiny_lgm), f"algorithm={algorithm}"])
    assert config.model.family == "mvdream" and config.reward.reconstructor == "lgm"
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
        load_config(overrides)  # the recipe's own /models/LGM/... path, absent here


@pytest.mark.integration  # ~15 s of model building: outside the fast unit tier
def test_device_check_runs_on_the_tiny_models(tmp_path):
    """bench/device_mvdream_lgm.py, the recipe's GPU check, end to end on tiny models on CPU."""
    import json

    from bench.device_mvdream_lgm import main

    assert main(["--tiny", "--samples", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "device_mvdream_lgm.json").read_text())
    for phase in ("rollout", "mrc", "mrc_gradient", "learner_step"):
        assert report[phase]["seconds"] > 0, report[phase]
    assert 0 < report["mrc"]["mrc_mean"] < 1 and report["learner_step"]["logprob_recompute_gap"] < 1e-4
    assert report["rollout"]["view_size"] == 32 and report["parameters"]["lgm"] > 0
    assert "skipped" in report["gsplat_agreement"] or report["gsplat_agreement"]["max_abs_difference"] < 1e-2
    from bench.device_mvdream_lgm import backend_agreement
    import torch

    assert backend_agreement(torch.device("cpu"), count=50, size=16, backends=("torch", "torch"))[
        "max_abs_difference"] == 0
