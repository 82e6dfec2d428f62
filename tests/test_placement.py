"""run.placement: one placement group with a bundle per actor, reserved before any model loads."""

from __future__ import annotations

import time

import pytest
import ray
from ray.util.placement_group import placement_group_table

from learner.config import ConfigError, load_config
from learner.placement import PlacementError, reserve, role_bundles

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.usefixtures("local_ray")]


def test_bundles_follow_the_roles_in_order():
    config = load_config(["run.placement=pack", "rollout.num_workers=2", "train.num_workers=2",
                          "train.num_cpus=0.25", "reward.num_cpus=0", "reward.num_gpus=0",
                          "run.placement_timeout_s=30"])
    bundles = role_bundles(config)
    assert bundles == {"rollout": [{"CPU": 0.5}] * 2, "reward": [{"CPU": 0.01}], "learner": [{"CPU": 0.25}] * 2}
    placement = reserve(config)
    try:
        assert placement.first_bundle == {"rollout": 0, "reward": 2, "learner": 3}
        strategy = placement.options("learner", 1)["scheduling_strategy"]
        assert strategy.placement_group_bundle_index == 4
        table = placement_group_table(placement.group)
        assert table["strategy"] == "PACK" and table["state"] == "CREATED" and len(table["bundles"]) == 5
    finally:
        placement.remove()
    assert reserve(load_config([])).options("rollout", 0) == {}  # none: Ray places each actor


def test_a_group_the_cluster_cannot_hold_fails_fast_with_what_was_asked():
    config = load_config(["run.placement=strict_pack", "rollout.num_gpus=1", "run.placement_timeout_s=2"])
    start = time.perf_counter()
    with pytest.raises(PlacementError, match=r"asked for 1 x \{'CPU': 0.5, 'GPU': 1.0\} for rollout.*Add nodes"):
        reserve(config)
    assert time.perf_counter() - start < 30
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())
    with pytest.raises(ConfigError, match="run.placement must be one of none, pack"):
        load_config(["run.placement=everywhere"])


def test_a_run_places_its_actors_in_the_group(tmp_path, tiny_model_dir):
    import learner.driver as driver

    seen = {}
    original = driver.sync_weights

    def sync_and_record(config, roles):  # while the actors are alive: what the group has left
        groups = [pg for pg in placement_group_table().values() if pg["state"] == "CREATED"]
        seen["groups"] = [(pg["name"], pg["strategy"], len(pg["bundles"])) for pg in groups]
        seen["left"] = {k: v for k, v in ray.available_resources().items()
                        if k.startswith("CPU_group_") and groups[0]["placement_group_id"] in k}
        return original(config, roles)

    driver.sync_weights = sync_and_record
    try:
        run_dir = driver.run(load_config([
            f"model.path={tiny_model_dir}", f"run.output_dir={tmp_path}", "run.placement=spread",
            "reward.kind=brightness", "reward.alignment=null", "sampling.num_steps=2", "prompts.limit=2",
            "rollout.batch_size=4", "train.samples_per_epoch=4", "train.group_size=1", "train.epochs=1", "eval.prompts_file=null"]))
    finally:
        driver.sync_weights = original
    assert run_dir.status()["finished"]
    assert seen["groups"] == [("carve3d-carve3d", "SPREAD", 3)]
    assert seen["left"] == {}  # the rollout, reward and learner actors hold all three bundles
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())  # released at the end
