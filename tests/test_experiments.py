"""The experiment suite (configs/experiments/, experiments/): configs, pieces, and the
shortened Table 1 experiment end to end (CI catches regressions in learning with it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from experiments.curate import curate
from experiments.run import Experiment, experiment_names, load_experiment, run_experiment, to_dotlist
from learner.config import PROJECT_ROOT, ConfigError, load_config
from learner.driver import plan_epoch
from learner.evaluate import paired_change
from learner.rundir import RunDirectory


@pytest.mark.parametrize("short", [False, True])
def test_every_experiment_config_is_valid(short):
    names = experiment_names()
    assert {"table1", "stability", "scale", "curation", "reward_hacking"} <= set(names)
    for name in names:
        experiment = load_experiment(name, short)  # validates every run's config (load_config)
        assert experiment.runs


def test_experiment_sizes_match_the_issue():
    stability = load_experiment("stability")
    algorithms = [r["train.algorithm"] for r in stability.runs.values()]
    assert algorithms.count("ddpo-sf") == 4 and algorithms.count("ddpo-is") == 4
    scale = load_experiment("scale")
    cells = {(r["train.samples_per_epoch"], r["prompts.limit"]) for r in scale.runs.values()}
    assert len({b for b, _ in cells}) >= 3 and len({p for _, p in cells}) >= 3 and len(cells) == 9
    assert {e.name for e in load_experiment("table1").evaluations} == {"gt", "gt-vae", "sft-short", "sft-long", "carve3d"}
    hacking = load_experiment("reward_hacking")
    assert {r["reward.box_normalize"] for r in hacking.runs.values()} == {True, False}


def test_unknown_experiment_and_bad_run_config_fail_with_names(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no experiment 'nope'.*known: .*table1"):
        load_experiment("nope")
    monkeypatch.setattr("experiments.run.EXPERIMENT_DIR", tmp_path)
    (tmp_path / "bad.yaml").write_text("runs:\n  a: {train.epochz: 3}\n")
    with pytest.raises(ConfigError, match="run 'a'.*unknown config key 'train.epochz'"):
        load_experiment("bad")
    (tmp_path / "typo.yaml").write_text("runz: {}\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_experiment("typo")


def test_to_dotlist_formats_yaml_values():
    assert to_dotlist({"a.b": 3, "c.d": None, "e.f": True, "g.h": "x/y", "i.j": [0.9, 0.99]}) == [
        "a.b=3", "c.d=null", "e.f=true", "g.h=x/y", "i.j=[0.9, 0.99]"]


def test_curation_keeps_the_highest_mrc_prompts():
    prompts = ["a", "b", "c", "d"]
    assert curate(prompts, np.array([0.1, 0.4, 0.2, 0.4]), 3) == ["b", "d", "c"]


def test_best_of_n_is_the_exact_expected_minimum_of_n_draws():
    """Against brute force: every n-subset of each prompt's samples, equally likely."""
    from itertools import combinations

    from experiments.best_of_n import best_of_n

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"prompt": np.repeat(["a", "b", "c"], 6), "mrc": rng.random(18),
                          "alignment": rng.integers(0, 2, 18).astype(float)})
    result = best_of_n(frame, ns=(1, 3, 6))
    for row in result["best_of"]:
        mins, alignments = [], []
        for _, group in frame.groupby("prompt"):
            subsets = [group.iloc[list(c)] for c in combinations(range(6), row["n"])]
            mins.append(np.mean([s.mrc.min() for s in subsets]))
            alignments.append(np.mean([s.alignment.iloc[s.mrc.argmin()] for s in subsets]))
        assert row["mrc"] == pytest.approx(np.mean(mins))
        assert row["alignment"] == pytest.approx(np.mean(alignments))
    assert result["best_of"][0]["change"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="same number of samples"):
        best_of_n(frame.iloc[:-1])


def test_grouped_plan_samples_each_prompt_group_size_times():
    prompts = [f"p{i}" for i in range(10)]
    specs = plan_epoch(0, 3, prompts, 32, group_size=4)
    counts = {}
    for s in specs:
        counts[s.prompt] = counts.get(s.prompt, 0) + 1
    assert len(counts) == 8 and set(counts.values()) == {4}
    assert len({s.seed for s in specs}) == 32
    assert specs == plan_epoch(0, 3, prompts, 32, group_size=4)  # a pure function
    # more groups than prompts: prompts repeat, still whole groups
    assert len(plan_epoch(0, 0, prompts[:2], 16, group_size=4)) == 16
    assert plan_epoch(0, 1, prompts, 8) == plan_epoch(0, 1, prompts, 8, group_size=1)


def test_group_size_must_divide_the_epoch():
    with pytest.raises(ConfigError, match="group_size"):
        load_config(["train.group_size=3"])


def test_unboxed_reward_rewards_smaller_objects_and_mrc_stays_boxed():
    """Without the box, the same inconsistency on a smaller object scores better: the
    reward-hacking loophole the box closes. The reported MRC is the boxed one either way."""
    from geometry.cameras import grid_rig
    from reward_service.mrc import MRCScorer, foreground_fraction

    class Shifted:  # re-renders = the views shifted by 2 px (an inconsistency on the object's edges)
        def reconstruct(self, views, cameras):
            return type("F", (), {"render": lambda _self, cams, h, w: torch.roll(views, 2, dims=-1)})()

    def views_with_square(size):
        views = torch.ones(1, 4, 3, 32, 32)
        lo = 16 - size // 2
        views[..., lo:lo + size, lo:lo + size] = torch.tensor([0.8, 0.1, 0.1]).view(3, 1, 1)
        return views

    big, small = views_with_square(20), views_with_square(8)
    assert foreground_fraction(big) > 5 * foreground_fraction(small)
    boxed, unboxed, rig = MRCScorer(Shifted()), MRCScorer(Shifted(), box_normalize=False), grid_rig()
    assert unboxed.score_views(small, rig).reward > unboxed.score_views(big, rig).reward + 0.01
    for views in (big, small):
        assert torch.equal(boxed.score_views(views, rig).mrc, unboxed.score_views(views, rig).mrc)
        assert torch.equal(boxed.score_views(views, rig).reward, -boxed.score_views(views, rig).mrc)


def test_status_adds_wall_time_over_sessions(tmp_path):
    assert RunDirectory(tmp_path).status() == {"finished": False}

    def session(*status):
        run_dir = RunDirectory(tmp_path)
        run_dir.begin_session()
        return run_dir.write_status(*status) if status else run_dir.status()

    session(False, "stopped", 10.0)
    session(False, "running", 3.0)  # after an epoch; then SIGKILL: no final word
    assert session() == {"finished": False, "stop_reason": "session 3 is running, or was killed before it "
                         "could say how it ended", "sessions": 3, "wall_seconds_total": 13.0}
    status = session(True, "completed all epochs", 5.0)
    assert status == {"finished": True, "stop_reason": "completed all epochs", "sessions": 4,
                      "wall_seconds_total": 18.0}


def test_damaged_status_is_written_afresh(tmp_path):
    (tmp_path / "status.json").write_text("")  # a full disk, before writes were atomic
    run_dir = RunDirectory(tmp_path)
    assert run_dir.begin_session()["sessions"] == 1
    assert "status.json" in run_dir.notes[0] and "damaged" in run_dir.notes[0]
    assert not list(tmp_path.glob(".*.tmp"))


def test_fixed_run_dir_refuses_to_overwrite_a_run(tmp_path):
    config = load_config([f"run.dir={tmp_path / 'r'}", "model.path=builtin:tiny"])
    RunDirectory.create(config)
    with pytest.raises(FileExistsError, match="resume="):
        RunDirectory.create(config)


# --------------------------------------------------------------------------- end to end

SHORT = {  # the interrupted-experiment test checks the experiment runner, not MiniCarve: a tiny model
    "model.path": "builtin:tiny", "reward.kind": "brightness", "reward.alignment": None, "prompts.limit": 2,
    "train.epochs": 3, "train.samples_per_epoch": 8, "train.group_size": 4, "sampling.num_steps": 2,
    "eval.num_prompts": 2, "eval.samples_per_prompt": 2, "run.local_num_cpus": 2,
}


def test_threads_reach_every_run_and_evaluation(tmp_path, monkeypatch):
    """--threads N: each run's rollout and learner and each evaluation get N torch threads,
    and the experiment's record keeps them with the session."""
    import experiments.run as run_module

    commands = []
    monkeypatch.setattr(run_module, "_call", lambda command, log: commands.append(command) or 0)
    monkeypatch.setattr(run_module, "run_finished", lambda run_dir: False)
    experiment = Experiment("threads", "threads test", runs={"a": {"train.epochs": 1}},
                            evaluations=[run_module.Evaluation("base", model="minicarve/weights/sft-short")])
    assert run_experiment(experiment, tmp_path, threads=1) == []
    train, evaluate = commands
    assert train[-2:] == ["rollout.torch_threads=1", "train.torch_threads=1"]
    assert evaluate[evaluate.index("--threads") + 1] == "1"
    record = json.loads((tmp_path / "threads" / "experiment.json").read_text())
    assert record["command"] == "python -m experiments.run threads" and record["sessions"][-1]["threads"] == 1


@pytest.mark.integration
def test_an_interrupted_experiment_resumes_from_its_checkpoints(tmp_path, capfd):
    """A learner failure in epoch 1 fails the run (the command names it); the same command
    again resumes it from its epoch-0 checkpoint, finishes it, and then skips it."""
    failing = {**SHORT, "faults.role": "learner", "faults.mode": "raise", "faults.epoch": 1}
    experiment = Experiment("resume", "resume test", runs={"a": failing})
    assert run_experiment(experiment, tmp_path) == ["a"]
    run = tmp_path / "resume" / "a"
    assert (run / "checkpoints" / "epoch_0000").is_dir() and not json.loads((run / "status.json").read_text())["finished"]
    assert run_experiment(experiment, tmp_path) == []
    out = capfd.readouterr().out
    assert "run a: resuming from its last checkpoint" in out and "resumed from epoch_0000" in out
    status = json.loads((run / "status.json").read_text())
    assert status["finished"] and status["sessions"] == 2
    assert len(RunDirectory.open(run).rows) == 3
    assert run_experiment(experiment, tmp_path) == []
    assert "run a: finished, skipped" in capfd.readouterr().out


@pytest.mark.integration
def test_short_table1_experiment_and_results(tmp_path, run_command):
    """``python -m experiments.run table1 --short`` then ``python -m experiments.results --short``:
    every Table 1 row, the KL figure, and learning: Carve3D RLFT lowers held-out MRC (validation
    prompts, paired over the same prompts and seeds) by more than 2 standard errors."""
    root, out = tmp_path / "runs", tmp_path / "results"
    run = run_command([sys.executable, "-m", "experiments.run", "table1", "--short", "--root", str(root)],
                      timeout=1200, cwd=PROJECT_ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = subprocess.run([sys.executable, "-m", "experiments.results", "--short", "--root", str(root),
                              "--out", str(out)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert results.returncode == 0, results.stderr[-3000:]
    table = json.loads((out / "table1.json").read_text())
    assert set(table) == {"gt", "gt-vae", "sft-short", "sft-long", "carve3d"}
    for row in table.values():
        assert 0 < row["mrc"] < 1 and 0 <= row["alignment"] <= 1
    assert table["gt"]["alignment"] > 0.9  # the evaluator reads the true renders
    assert table["gt-vae"]["mrc"] < table["gt"]["mrc"]  # the VAE's smoothing is closer to the LRM's re-renders
    assert table["sft-long"]["alignment"] > table["sft-short"]["alignment"]  # trained longer, follows its prompt
    report = (out / "carve3d_minicarve.md").read_text()
    assert "Table 1" in report and "*machine:*" in report and "*wall time:*" in report
    assert "## The suite" in report and "table1 --short` | 1 of 1 |" in report  # the others: not run yet
    assert (out / "table1.png").is_file() and (out / "kl.png").is_file()
    kl = json.loads((out / "kl.json").read_text())["kl"]
    assert kl[0] == 0 and kl[-1] > 0  # the policy moved away from sft-short
    carve = RunDirectory.open(root / "table1-short" / "carve3d")
    before, after = (pd.read_parquet(carve.path / f"eval_{tag}.parquet")["mrc"].to_numpy() for tag in ("start", "end"))
    change, sem = paired_change(before, after)
    assert change < -2 * sem, f"held-out MRC changed by {change:+.4f} ± {sem:.4f}: no learning shown"


def test_gradient_probe_runs_both_directions(capsys):
    from experiments.gradient_probe import main

    assert main(["--samples", "2", "--steps", "1", "--threads", "1", "sampling.num_steps=2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(line)["update"] for line in lines[:2]] == [0, 1]
    assert "signal (half the gap)" in lines[-1]


def test_noise_scale_probe_pools_parts_and_resumes_them(tmp_path, capsys):
    """--parts probes several epochs and pools them; --parts-dir keeps each epoch, so the same
    command again probes nothing and gives the same figures, and other settings are refused."""
    from experiments.gradient_probe import main

    parts, out = tmp_path / "parts", tmp_path / "probe.json"
    command = ["--noise-scale", "--samples", "4", "--group", "2", "--threads", "1", "--parts", "2",
               "--parts-dir", str(parts), "--out", str(out), "rollout.batch_size=4", "sampling.num_steps=2"]
    assert main(command) == 0
    first = json.loads(out.read_text())
    assert first["samples"] == 8 and first["independent_draws"] == 4 and first["parts"] == 2
    assert sorted(p.name for p in parts.iterdir()) == ["part0.pt", "part1.pt"]
    capsys.readouterr()
    assert main(command) == 0
    assert capsys.readouterr().err.count("reusing") == 2
    again = json.loads(out.read_text())
    assert {k: again[k] for k in ("signal", "noise", "half_batch_cosine")} == \
        {k: first[k] for k in ("signal", "noise", "half_batch_cosine")}
    with pytest.raises(ValueError, match=r"other settings \(sampling.num_steps\)"):
        main(command[:-1] + ["sampling.num_steps=3"])


def test_noise_scale_probes_share_a_parts_dir(tmp_path, capsys, monkeypatch):
    """Probes on one --parts-dir share it out: a part claimed by a live process is left to it and
    waited for; a claim whose process died is taken over."""
    import experiments.gradient_probe as probe

    parts = tmp_path / "parts"
    parts.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (parts / "part0.claim").write_text(str(dead.pid))
    assert probe._claim(parts / "part0.pt")  # stale: taken over
    assert (parts / "part0.claim").read_text() == str(os.getpid())
    (parts / "part0.claim").unlink()

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (parts / "part1.claim").write_text(str(other.pid))
        assert not probe._claim(parts / "part1.pt")  # alive: not ours

        def claimant_dies(seconds):  # while the probe waits for part 1, its claimant is killed
            other.kill()
            other.wait()
        monkeypatch.setattr(probe.time, "sleep", claimant_dies)
        command = ["--noise-scale", "--samples", "4", "--group", "2", "--threads", "1", "--parts", "2",
                   "--parts-dir", str(parts), "rollout.batch_size=4", "sampling.num_steps=2"]
        assert probe.main(command) == 0
    finally:
        other.kill()
        other.wait()
    assert f"part 1: being probed by process {other.pid}" in capsys.readouterr().err
    assert sorted(p.name for p in parts.iterdir()) == ["part0.pt", "part1.pt"]


def test_noise_scale_estimates_are_unbiased_on_known_gradients():
    """N per-sample gradients mu + noise with |mu|^2 = 1 and tr(Sigma) = 50: the Gram-matrix
    estimates recover both, and with no signal the noise scale is large."""
    from experiments.gradient_probe import noise_scale_from_gram

    rng = np.random.default_rng(0)
    mu = np.zeros(200)
    mu[0] = 1.0
    estimates = [noise_scale_from_gram(g @ g.T) for g in
                 (mu + rng.normal(0, 0.5, (64, 200)) for _ in range(50))]
    assert np.mean([e["signal"] for e in estimates]) == pytest.approx(1.0, abs=0.1)
    assert np.mean([e["noise"] for e in estimates]) == pytest.approx(50.0, rel=0.05)
    noisy = rng.normal(0, 0.5, (64, 200))
    assert noise_scale_from_gram(noisy @ noisy.T)["noise_scale"] > 100 or \
        noise_scale_from_gram(noisy @ noisy.T)["signal"] <= 0


def test_grouped_noise_scale_counts_a_group_as_one_draw():
    """Gradients whose groups share a component (as advantage groups do): the per-sample estimate
    mistakes the shared part for signal, the grouped one recovers |G|^2 = 1, and its jackknife
    SE of B covers the truth."""
    import torch

    from experiments.gradient_probe import noise_scale_with_se

    rng = np.random.default_rng(1)
    mu = np.zeros(200)
    mu[0] = 1.0
    groups, size = 64, 8
    shared = np.repeat(rng.normal(0, 0.3, (groups, 200)), size, axis=0)
    gradients = torch.tensor(mu + shared + rng.normal(0, 0.5, (groups * size, 200)))
    grouped, per_sample = noise_scale_with_se(gradients, size), noise_scale_with_se(gradients)
    assert grouped["signal"] == pytest.approx(1.0, abs=3 * grouped["signal_se"])
    assert per_sample["signal"] > 1.0 + 5 * per_sample["signal_se"]
    # Noise of a batch of n samples in groups of 8: (0.25 * 200 + 8 * 0.09 * 200) / n = 194 / n.
    assert grouped["noise_scale"] == pytest.approx(194.0, abs=3 * grouped["noise_scale_se"])
    assert grouped["independent_draws"] == groups
    with pytest.raises(ValueError, match="groups of 3"):
        noise_scale_with_se(gradients, 3)


def test_a_run_made_with_other_settings_stops_the_experiment_before_it_runs(tmp_path, capsys):
    """A run directory left by an older version of the experiment's file is neither skipped nor
    resumed as if it were this experiment's: the command names the changed settings and the fix."""
    import shutil

    from experiments.run import main
    from learner.config import PROJECT_ROOT

    run_dir = tmp_path / "table1" / "carve3d"
    run_dir.mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / "configs" / "default.yaml", run_dir / "config.yaml")  # train.epochs 5
    assert main(["table1", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train.epochs 5 there, 12 here" in err and "Move or delete" in err and "eval/carve3d" in err
    assert not (tmp_path / "table1" / "experiment.json").exists()  # nothing ran


def test_noise_scale_jackknife_matches_refitting_without_each_draw():
    """The jackknife's leave-one-out estimates come from the Gram matrix's row sums; they equal
    refitting on the matrix with each draw's row and column deleted."""
    import torch

    from experiments.gradient_probe import noise_scale_from_gram, noise_scale_with_se

    gradients = torch.tensor(np.random.default_rng(2).normal(0.2, 1.0, (24, 40)))
    gram = (gradients @ gradients.T).numpy()
    refit = np.array([noise_scale_from_gram(np.delete(np.delete(gram, i, 0), i, 1))["noise_scale"]
                      for i in range(24)])
    expected = np.sqrt(23 / 24 * np.sum((refit - refit.mean()) ** 2))
    assert noise_scale_with_se(gradients)["noise_scale_se"] == pytest.approx(expected, rel=1e-9)


def test_shrink_attack_scores_smaller_consistent_scenes(tmp_path):
    """Scaling the scene shrinks the object in every view; both MRC variants are scored."""
    from experiments.shrink_attack import main

    out = tmp_path / "shrink.json"
    assert main(["--prompts", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    sizes = result["object_size"]
    assert result["scales"][0] == 1.0 and all(b < a for a, b in zip(sizes, sizes[1:])), sizes
    for name in ("box", "no_box"):
        assert len(result[name]["penalty"]) == len(sizes) and all(np.isfinite(result[name]["penalty"]))


def test_mrc_change_in_words_is_paired_and_says_whether_it_is_noise():
    from learner.evaluate import mrc_change_in_words, paired_change

    rng = np.random.default_rng(0)
    before = 0.2 + 0.05 * rng.standard_normal(64)  # prompt-to-prompt spread, shared by the pair
    learned = before - 0.01 + 0.002 * rng.standard_normal(64)
    change, sem = paired_change(before, learned)
    assert abs(change + 0.01) < 0.001 and sem < 0.001  # unpaired, the SE would be ~0.009
    assert "lower by" in mrc_change_in_words(before, learned) and "learned" in mrc_change_in_words(before, learned)
    noise = before + 0.002 * rng.standard_normal(64)
    assert "within noise" in mrc_change_in_words(before, noise)
    assert "less consistent" in mrc_change_in_words(before, before + 0.01)
    with pytest.raises(ValueError, match="same samples"):
        paired_change(before, before[:3])


def test_results_only_rebuilds_the_named_sections_and_keeps_the_rest(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from experiments import results

    page = "\n".join(["# Carve3D's results on MiniCarve", "", "intro", "", "## The suite", "",
                      "| experiment | command | runs finished | machine | wall time |", "|---|---|---|---|---|",
                      "| T1 | `python -m experiments.run table1` | 1 of 1 | old | 30.0 min |",
                      "| F5 | `python -m experiments.run scale` | 9 of 9 | old | 60.0 min |", "",
                      "In all 1.5 h of wall time (the budget).", "",
                      "## Table 1: old", "", "old table", "", "## Figure 5: kept", "", "old scale", ""])
    exp = SimpleNamespace(spec=SimpleNamespace(name="table1", title="T1"), command="python -m experiments.run table1",
                          runs={"a": SimpleNamespace(finished=True)}, machine="new", record={"x": 1}, wall_seconds=600.0)
    monkeypatch.setitem(results.SECTIONS, "table1", [lambda e, out: ["## Table 1: old", "", "new table", ""]])
    rebuilt = results.replace_sections(page, [exp], tmp_path)
    assert "new table" in rebuilt and "old table" not in rebuilt and "old scale" in rebuilt
    assert "| T1 | `python -m experiments.run table1` | 1 of 1 | new | 10.0 min |" in rebuilt
    assert "| F5 | `python -m experiments.run scale` | 9 of 9 | old | 60.0 min |" in rebuilt
    assert "In all 1.2 h of wall time (the budget)." in rebuilt


def test_spread_ratio_test_states_how_sure_the_stability_ordering_is():
    """Figure 3's F-test: v1's stored finals give the figures its section quoted (ratio 1.24,
    p 0.43, 90% interval 0.13 to 11.5)."""
    from experiments.results import spread_ratio_test

    test = spread_ratio_test([-0.18184, -0.18930, -0.19568, -0.18830], [-0.18305, -0.19604, -0.19494, -0.19586])
    assert test["ratio"] == pytest.approx(1.237, abs=1e-3)
    assert test["p_sf_lower"] == pytest.approx(0.433, abs=1e-3)
    assert test["ratio_90"] == pytest.approx([0.133, 11.47], abs=1e-2)
    assert test["df"] == [3, 3]
    assert spread_ratio_test([-0.1, -0.1], [-0.2, -0.3]) is None  # no spread: nothing to test
    assert spread_ratio_test([-0.1], [-0.2, -0.3]) is None


def test_run_command_kills_the_whole_process_group_on_timeout(run_command, tmp_path):
    """A command whose child outlives it (as an experiment's learner.main and its Ray do) leaves
    nothing running after its timeout, so the tests after it keep the cores."""
    import time

    marker = tmp_path / "child.pid"
    with pytest.raises(pytest.fail.Exception, match="ran past 1 s"):
        run_command(["bash", "-c", f"sleep 60 & echo $! > {marker}; wait"], timeout=1)
    time.sleep(0.2)
    state = subprocess.run(["ps", "-o", "stat=", "-p", marker.read_text().strip()], capture_output=True, text=True)
    assert state.stdout.strip() in ("", "Z"), "the command's child still runs"
