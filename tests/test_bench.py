"""The performance benchmarks' machinery (bench/): pure helpers, the summaries and
writers on made-up figures, and the simulated controller benchmark on a few stand-in
actors.  No timing is asserted: the figures themselves come from
``python -m bench.performance`` (docs/results/performance.md)."""

from __future__ import annotations

import json
import math

import pytest

from bench import common
from bench.controller_scaling import fake_specs, flatness, reward_pool_size, run_scale
from bench.performance import combine, growth_words, markdown
from bench.ray_overhead import summarize


def test_ratio_mean_median_and_warmup():
    assert common.ratio(3.0, 2.0) == 1.5
    assert math.isnan(common.ratio(1.0, 0.0)) and math.isnan(common.ratio(None, 1.0))
    assert common.mean([1, 2, 3]) == 2.0 and math.isnan(common.mean([]))
    assert common.median([3, 1, 2]) == 2.0 and common.median([1, 2, 3, 4]) == 2.5
    assert common.after_warmup([10, 1, 2]) == [1.0, 2.0]
    assert common.after_warmup([10]) == [10.0]  # never empty


def test_hidden_share_is_clamped():
    assert common.hidden_share(4.0, 1.0) == 0.75
    assert common.hidden_share(4.0, 0.0) == 1.0
    assert common.hidden_share(1.0, 3.0) == 0.0  # a tail longer than the work: nothing hidden
    assert math.isnan(common.hidden_share(0.0, 0.0))


def test_ideal_epoch_seconds():
    # 8 batches of 0.2 s back to back, then the last round of 16 batches on 4 reward actors.
    assert common.ideal_epoch_seconds(8, 0.2, 0.025, 16, 4) == pytest.approx(1.6 + 4 * 0.025)
    assert common.ideal_epoch_seconds(2, 0.5, 0.1, 1, 1) == pytest.approx(1.1)
    assert reward_pool_size(1, 4) == 1 and reward_pool_size(64, 4) == 16


def test_write_json_turns_nan_into_null(tmp_path):
    path = common.write_json(tmp_path / "a" / "x.json", {"r": float("nan"), "v": [1.0, float("inf")], "n": 2})
    assert json.loads(path.read_text()) == {"r": None, "v": [1.0, None], "n": 2}


def test_machine_info_names_the_cpu():
    info = common.machine_info(shared=True, note="busy")
    assert info["logical_cpus"] >= 1 and info["cpu_model"] and info["shared"] is True and info["note"] == "busy"


def plain_rows():
    return [{"epoch": e, "sample_seconds": 4.0, "reward_seconds": 2.0, "train_seconds": 3.0, "sync_seconds": 0.0,
             "epoch_seconds": 9.0 + (5 if e == 0 else 0), "cpu_seconds": 10.0, "reward_mean": -0.1 * e}
            for e in range(3)]


def actor_rows(epoch_seconds: float):
    return [{"epoch": e, "epoch_seconds": epoch_seconds + (5 if e == 0 else 0), "sample_seconds": 4.2,
             "reward_tail_seconds": 0.5, "train_seconds": 3.1, "sync_seconds": 0.05, "fetch_seconds": 0.01,
             "reward_mean": -0.1 * e, **({"cpu_seconds": 11.0} if e else {})} for e in range(3)]


def test_ray_overhead_summary():
    s = summarize(plain_rows(), {1: actor_rows(7.9), 2: actor_rows(6.0)})
    assert s["plain"]["epoch_seconds"] == 9.0  # warm-up left out
    assert s["ray_overhead_ratio"] == pytest.approx(7.9 / 9.0)
    assert s["overlap_ratio"] == pytest.approx(7.9 / 9.0)
    assert s["reward_hidden_share"] == pytest.approx(0.75)
    assert s["actors"]["1"]["controller_seconds"] == pytest.approx(7.9 - (4.2 + 0.5 + 3.1 + 0.05))
    assert s["actors"]["1"]["reward_mean_max_abs_diff_to_plain"] == 0.0
    assert s["two_rollout_workers_speedup"] == pytest.approx(7.9 / 6.0)
    assert s["ray_overhead_cpu_ratio"] == pytest.approx(1.1)  # epoch 0 has no CPU window: left out


def controller_rows():
    return [{"rollout_actors": n, "reward_actors": max(1, n // 4), "batches_per_epoch": 8 * n, "ideal_seconds": 1.7,
             "wall_seconds": 1.7 + 0.01 * n, "overhead_seconds": 0.01 * n, "overhead_per_actor_seconds": 0.01,
             "overhead_per_batch_seconds": 0.01 / 8, "wall_over_ideal": (1.7 + 0.01 * n) / 1.7,
             "driver_cpu_seconds": 0.01 * n, "driver_cpu_per_batch_ms": 1.25, "sync_seconds": 0.01,
             "startup_seconds": 1.0, "actor_pss_mib_mean": 60.0, "actor_pss_gib_total": 0.06 * n,
             "epochs": [{"sample_seconds": 1.6, "reward_tail_seconds": 0.1, "reward_queue_depth_max": n}] * 2}
            for n in (1, 4, 16)]


def test_flatness_and_words():
    f = flatness(controller_rows())
    assert f["actors_from_to"] == [1, 16] and f["overhead_growth_exponent"] == pytest.approx(1.0)
    assert "linearly" in growth_words(f["overhead_growth_exponent"])
    assert growth_words(0.1) == "roughly flat"
    assert flatness(controller_rows()[:1]) == {}


def test_combined_json_and_markdown_state_the_machine():
    details = {
        "ray_overhead": {**summarize(plain_rows(), {1: actor_rows(7.9)}), "wall_seconds": 60.0, "setup": {
            "model": "m", "finetune": "lora", "reward": "mrc", "reconstructor": "lrm", "alignment": None,
            "samples_per_epoch": 16, "batch_size": 8, "sampling_steps": 10, "epochs": 3, "torch_threads": 1,
            "ray_num_cpus": 2}},
        "weight_sync": {"rows": [{"model": "tiny", "finetune": "full", "unet_parameters": 10, "trainable_parameters": 10,
                                  "bytes": 40, "seconds_median": 0.1, "seconds_min": 0.1, "seconds_max": 0.2,
                                  "mb_per_second": 4e-4}],
                        "largest_full_sync": {"model": "tiny", "bytes": 40, "seconds_median": 0.1, "mb_per_second": 4e-4},
                        "setup": {"rollout_workers": 2, "repeats": 5}},
        "controller_scaling": {"rows": controller_rows(), "flatness": flatness(controller_rows()), "skipped": [],
                               "setup": {"actor_num_cpus": 0.01, "sample_seconds": 0.2, "score_seconds": 0.025,
                                         "batches_per_actor": 8, "batch_size": 2, "rollout_per_reward": 4, "epochs": 4}},
        "gpu_throughput": {"skipped": "no CUDA"},
    }
    machine = common.machine_info(shared=True, note="an experiment ran alongside")
    summary = combine(details, machine)
    assert summary["ray_overhead_ratio"] == pytest.approx(7.9 / 9.0)
    assert summary["controller_overhead_seconds_per_epoch"]["16"] == pytest.approx(0.16)
    assert summary["weight_sync"]["tiny/full"]["bytes"] == 40
    text = markdown(summary, "python -m bench.performance", 100.0)
    assert "Shared machine" in text and machine["cpu_model"] in text and "an experiment ran alongside" in text
    assert "0.878" in text and "python -m bench.gpu_throughput" in text
    probe = {"rows": controller_rows(), "setup": {"reward_max_in_flight": 8}, "measured_at": "2026-01-01 00:00"}
    text = markdown(combine({**details, "controller_scaling_probes": [probe]}, machine), "cmd", 1.0)
    assert "--reward-in-flight 8 --actors 1 4 16" in text


@pytest.mark.integration
def test_controller_benchmark_drives_collect_epoch_with_stand_in_actors(local_ray):
    setup = {"actors": [2], "batches_per_actor": 2, "sample_seconds": 0.01, "score_seconds": 0.005,
             "batch_size": 2, "epochs": 2, "rollout_per_reward": 4}
    row = run_scale(2, setup)
    assert row["rollout_actors"] == 2 and row["reward_actors"] == 1 and row["batches_per_epoch"] == 4
    assert len(row["epochs"]) == 2 and all(e["wall_seconds"] > 0 for e in row["epochs"])
    assert row["actor_pss_gib_total"] >= 0
    assert len(fake_specs(8, 3)) == 8 and fake_specs(8, 3)[0][0] == "e3-0"


def test_tree_cpu_seconds_counts_this_process():
    from bench.ray_overhead import tree_cpu_seconds

    import psutil

    sum(i * i for i in range(200_000))
    own = psutil.Process().cpu_times()
    # Live descendants only add to it (one that ended meanwhile drops out, so it is not monotonic).
    assert tree_cpu_seconds() >= own.user + own.system > 0


def test_gpu_benchmark_skips_without_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    from bench.gpu_throughput import main

    result = main(out_dir=tmp_path)
    assert "skipped" in result and json.loads((tmp_path / "gpu_throughput.json").read_text())["skipped"]


def test_plain_loop_builds_the_roles_as_the_driver_does(tmp_path):
    """The plain side of the Ray overhead benchmark calls the classes the actors wrap with
    the driver's own constructor arguments; one quick epoch of it runs (it once drifted
    from the actors' signatures and only the full benchmark found out)."""
    from bench.ray_overhead import QUICK, make_config, run_plain

    config = make_config(QUICK["overrides"], 1, 1, 1, str(tmp_path))
    rows = run_plain(config)
    assert len(rows) == 1 and math.isfinite(rows[0]["reward_mean"])


def test_flop_count_includes_cpu_attention():
    """torch counts only the CUDA attention kernels; bench.flops adds the CPU ones, forward
    (2 batched matmuls) and backward (2.5x the forward)."""
    import torch

    from bench.flops import FlopCount

    q = torch.randn(2, 4, 64, 32, requires_grad=True)
    forward = 2 * (2 * 2 * 4 * 64 * 64 * 32)
    with FlopCount() as count:
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert count.total == forward
    with FlopCount() as count:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    assert count.total == forward + 5 * forward // 2
    assert out.shape == q.shape


def test_best_loop_summary_takes_each_sides_best():
    from bench.best_loop import summarize

    def rows(epoch_seconds):
        return [{"epoch_seconds": s, "sample_seconds": s / 2, "reward_tail_seconds": 0.1,
                 "train_seconds": s / 4, "reward_mean": -0.2} for s in epoch_seconds]

    flops = {"sample": 2e11, "sample_unet": 1e11, "train": 4e11, "train_unet": 2e11}
    plain = [{"threads": 1, "rows": rows([50, 40, 40]), "flops": flops, "samples_per_epoch": 16},
             {"threads": 2, "rows": rows([50, 30, 30]), "flops": flops, "samples_per_epoch": 16}]
    actors = [{"setting": {"rollout_actors": 1}, "rows": rows([60, 36, 36])},
              {"setting": {"rollout_actors": 2}, "rows": rows([60, 33, 33])}]
    s = summarize(plain, actors, {1: 1e11, 2: 2e11})
    assert s["best_plain"]["threads"] == 2 and s["best_actors"]["setting"] == {"rollout_actors": 2}
    assert s["ray_overhead_ratio"] == pytest.approx(33 / 30)
    assert s["plain"][1]["sampling_unet_peak_share"] == pytest.approx(1e11 / 15 / 2e11)
    assert s["plain"][0]["samples_per_second"] == pytest.approx(16 / 40)
    assert s["reward_mean_max_abs_diff"] == 0


def test_model_family_names_the_world():
    """The performance page says which MiniCarve world its figures are from."""
    from bench.common import model_family
    from bench.performance import family_words

    assert model_family("minicarve/weights/sft-short") == "sd-grid"
    assert model_family("minicarve/weights/v1-sft-short") == "pixel-grid"
    assert model_family("builtin:tiny") is None
    assert family_words("sd-grid") == "MiniCarve v2's sd-grid family, "
    assert family_words(None) == ""


def test_unet_cost_compares_the_worlds_unets(tmp_path):
    """The quick run times all three UNets and writes the ratios the architecture choice rests on."""
    from bench.unet_cost import main

    result = main(quick=True, out_dir=tmp_path)
    assert set(result["models"]) == {"v1", "v2.0", "v2"}
    assert result["models"]["v2"]["parameters"] < result["models"]["v2.0"]["parameters"]
    assert result["forward_cfg16_v2_vs_v1"] > 0 and (tmp_path / "unet_cost.json").is_file()
