"""Fault drill: inject each fault into a small real run and write docs/reliability.md.

    python -m bench.reliability_drill                  # everything: about 30 minutes on 2 CPU cores
    python -m bench.reliability_drill --only outside   # one group: inside, outside or inputs
    python -m bench.reliability_drill --only inputs    # the bad-input table alone (about 2 minutes)
    python -m bench.reliability_drill --write-doc      # the page again from the saved results

Each scenario runs the whole loop through Ray actors (tiny model, brightness
reward, 3 epochs of 8 samples) and records whether the run completed, its wall
time against the fault-free run, the restarts, and the samples lost or
duplicated (both must be 0).  Three groups:

* inside: one fault from the ``faults`` config block (the actor raises, exits or
  sleeps in its own code);
* outside: faults from outside the process (``bench/process_faults.py``): SIGKILL
  and SIGSTOP sent to each role's actor process in each phase, the driver
  SIGKILLed and resumed, the run directory's disk filled or made read-only,
  checkpoints damaged on disk; each run's learning is compared with the
  uninterrupted run's;
* inputs: the bad inputs of the list below, fed to the config loader and to the
  MRC command line, with the message each produced.

Each group's rows go to ``docs/results/reliability_drill.json``; the page is
written from all three, so a group not run keeps its last measured rows.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.process_faults import (PHASES, ProcessFault, break_safetensors_header, drop_state_keys,  # noqa: E402
                                  fill_disk, lingering, read_until, start_driver, stop_group, tmpfs,
                                  truncate_weights)
from learner.config import ConfigError, load_config, load_prompts  # noqa: E402
from learner.driver import RunStopped, check_run_location, run  # noqa: E402
from learner.main import main as train_main  # noqa: E402
from geometry.cameras import grid_rig  # noqa: E402
from policy.models import create_tiny_model, load_components  # noqa: E402
from reward_service.mrc import main as mrc_main  # noqa: E402
from reward_service.rewards import build_reward, score  # noqa: E402

EPOCHS, SAMPLES = 3, 8
RESULTS = ROOT / "docs" / "results" / "reliability_drill.json"
LEARNING_COLUMNS = ["reward_mean", "reward_std", "kl_mean", "loss", "grad_norm", "advantage_abs_mean", "version"]
SCENARIOS = [
    ("none (baseline)", []),
    ("rollout actor: process exit, epoch 1 batch 1", ["faults.role=rollout", "faults.mode=exit", "faults.epoch=1", "faults.batch=1"]),
    ("rollout actor: exception, epoch 0 batch 2", ["faults.role=rollout", "faults.mode=raise", "faults.epoch=0", "faults.batch=2"]),
    ("rollout actor: hang (timeout 20 s), epoch 0 batch 0", ["faults.role=rollout", "faults.mode=hang", "faults.epoch=0", "faults.batch=0", "rollout.timeout_s=20"]),
    ("reward actor: process exit, epoch 1 batch 2", ["faults.role=reward", "faults.mode=exit", "faults.epoch=1", "faults.batch=2"]),
    ("reward actor: hang (timeout 20 s), epoch 2 batch 3", ["faults.role=reward", "faults.mode=hang", "faults.epoch=2", "faults.batch=3", "reward.timeout_s=20"]),
    ("learner: process exit, epoch 1 (auto-resume)", ["faults.role=learner", "faults.mode=exit", "faults.epoch=1", "run.max_auto_resumes=1"]),
    ("learner: hang (timeout 30 s), epoch 2 (auto-resume)", ["faults.role=learner", "faults.mode=hang", "faults.epoch=2", "train.timeout_s=30", "run.max_auto_resumes=1"]),
]


def base_config(model_dir: Path) -> list[str]:
    return [f"model.path={model_dir}", "sampling.num_steps=2", "prompts.limit=4", "rollout.batch_size=2",
            f"train.samples_per_epoch={SAMPLES}", f"train.epochs={EPOCHS}", "reward.kind=brightness",
            "rollout.num_cpus=0.5", "reward.num_cpus=0.5", "train.num_cpus=0.5", "run.samples_to_save=0"]


def only_run(out: Path) -> Path:
    return next(p for p in out.iterdir() if p.is_dir())


def measure(run_dir: Path, baseline: pd.DataFrame | None = None) -> dict:
    """A run's outcome: every epoch there, restarts, samples lost and duplicated, and (given
    the uninterrupted run's metrics) whether it learned exactly the same."""
    m = pd.read_parquet(run_dir / "metrics.parquet") if (run_dir / "metrics.parquet").exists() else pd.DataFrame()
    used = int((m["num_samples"] + m["num_dropped"]).sum()) if len(m) else 0
    unique = int(m["num_unique_sample_ids"].sum()) if len(m) else 0
    report = (run_dir / "report.md").read_text() if (run_dir / "report.md").exists() else ""
    row = {"complete": len(m) > 0 and list(m["epoch"]) == list(range(EPOCHS)),
           "restarts": int(m[["rollout_restarts", "reward_restarts"]].iloc[-1].sum()) if len(m) else 0,
           "learner_resumes": report.count("- learner failed"),
           "samples_lost": EPOCHS * SAMPLES - used, "duplicates": used - unique, "metrics": m}
    if baseline is not None and row["complete"]:
        row["same_learning"] = all(np.allclose(m[c].to_numpy(float), baseline[c].to_numpy(float), rtol=1e-5,
                                               atol=1e-7) for c in LEARNING_COLUMNS)
    return row


def drill(model_dir: Path, out: Path, rows: list[dict]) -> None:
    """The inside group: one fault from the ``faults`` config block per run, appended to ``rows``."""
    for name, overrides in SCENARIOS:
        start = time.perf_counter()
        survived, error = True, ""
        try:
            run_dir = run(load_config(base_config(model_dir) + [f"run.output_dir={out / str(len(rows))}"]
                                      + overrides)).path
        except RunStopped as err:
            survived, error = False, str(err)
            run_dir = only_run(out / str(len(rows)))
        row = measure(run_dir)
        rows.append({"fault": name, "survived": survived and row["complete"], "seconds": time.perf_counter() - start,
                     "restarts": row["restarts"], "samples_lost": row["samples_lost"],
                     "duplicates": row["duplicates"], "error": error})
        print(rows[-1], flush=True)


# ---- the outside group ----------------------------------------------------------------------
# train.timeout_s also covers the learner's start (its first call waits for the model to load):
# 150 s, lest a loaded machine make that look like a hang
QUICK = ["rollout.timeout_s=10", "reward.timeout_s=10", "train.timeout_s=150", "run.max_auto_resumes=1",
         "eval.prompts_file=null", "reward.alignment=null"]
EVAL_AT_END = ["eval.prompts_file=data/minicarve/test_prompts.txt", "eval.num_prompts=2",
               "eval.samples_per_prompt=2", "eval.at_start=false"]
KILL, STOP = signal.SIGKILL, signal.SIGSTOP
PROCESS_FAULTS = [
    *[ProcessFault("rollout-0", sig, phase, 1, delay_s=0.5 if phase == "sample" else 0.0)
      for phase in ("sample", "train", "sync", "checkpoint", "eval") for sig in (KILL, STOP)],
    *[ProcessFault("reward-0", sig, phase, 1, delay_s=0.5 if phase == "sample" else 0.0)
      for phase in ("sample", "train", "eval") for sig in (KILL, STOP)],
    *[ProcessFault("learner", sig, phase, 1, delay_s=0.5 if phase == "sample" else 0.0)
      for phase in ("sample", "train", "sync") for sig in (KILL, STOP)],
]


def first_event(run_dir: Path) -> str:
    """The first failure the run's report lists (re-issues follow from it), or the stop reason."""
    report = (run_dir / "report.md").read_text() if (run_dir / "report.md").exists() else ""
    events = [line[2:] for line in report.split("## Failures handled")[-1].splitlines()
              if line.startswith("- ") and "re-issued" not in line] if "## Failures handled" in report else []
    return events[0] if events else "nothing to handle (the fault went unnoticed)"


def outside_row(name: str, start: float, run_dir: Path, baseline: pd.DataFrame, what: str = "",
                refused: bool = False) -> dict:
    """``refused``: the run was rightly not resumed (nothing trained: no samples to count)."""
    row = measure(run_dir, baseline)
    out = {"fault": name, "what": what or first_event(run_dir), "survived": refused or row["complete"],
           "seconds": time.perf_counter() - start, "restarts": row["restarts"],
           "learner_resumes": row["learner_resumes"],
           **{k: None if refused else row[k] for k in ("samples_lost", "duplicates")},
           "same_learning": row.get("same_learning")}
    print(out, flush=True)
    return out


def signal_faults(model_dir: Path, out: Path, baseline: pd.DataFrame, rows: list[dict], phases=PHASES) -> None:
    for index, fault in enumerate(f for f in PROCESS_FAULTS if f.phase in phases):
        start, folder = time.perf_counter(), out / f"signal-{index}"
        overrides = QUICK + (EVAL_AT_END if fault.phase == "eval" else [])
        what = ""
        try:
            with fault.armed():
                run(load_config(base_config(model_dir) + [f"run.output_dir={folder}"] + overrides))
        except RunStopped as err:
            what = f"stopped: {err}"
        rows.append(outside_row(fault.label, start, only_run(folder), baseline, what))


def driver_faults(model_dir: Path, out: Path, baseline: pd.DataFrame, rows: list[dict]) -> None:
    """The driver SIGKILLed after epoch 2, then resumed; the disk filled after epoch 2, then
    freed and resumed."""
    start, folder = time.perf_counter(), out / "driver-kill"
    driver = start_driver(*base_config(model_dir), *QUICK, f"run.output_dir={folder}")
    try:
        read_until(driver, f"epoch 2/{EPOCHS}")
        driver.kill()
        driver.wait()
        linger = lingering(driver, 120)
    finally:
        stop_group(driver)
    run_dir = only_run(folder)
    killed = json.loads((run_dir / "status.json").read_text())
    run(load_config([f"resume={run_dir}"]))
    status = json.loads((run_dir / "status.json").read_text())
    rows.append(outside_row(
        "driver: SIGKILL after epoch 2, then resume=", start, run_dir, baseline,
        f"status.json after the kill: sessions {killed['sessions']}, {killed['wall_seconds_total']:.0f} s; "
        f"after the resume: sessions {status['sessions']}, finished {status['finished']}; the killed driver's "
        f"Ray processes lingered {linger:.0f} s"))

    start = time.perf_counter()
    with tmpfs(out / "disk", "3m") as disk:
        driver = start_driver(*base_config(model_dir), *QUICK, f"run.output_dir={disk}")
        try:
            read_until(driver, f"epoch 2/{EPOCHS}")
            fill = fill_disk(disk)
            rest, _ = driver.communicate(timeout=300)
        finally:
            stop_group(driver)
        error = next((line for line in rest.splitlines() if line.startswith("error:")), "no error line")
        run_dir = only_run(disk)
        json.loads((run_dir / "status.json").read_text())  # valid JSON, never empty
        fill.unlink()
        run(load_config([f"resume={run_dir}"]))
        rows.append(outside_row(
            "run directory's disk full (3 MiB tmpfs, filled after epoch 2), freed, resume=", start, run_dir,
            baseline, f"exit {driver.returncode}, {'a traceback' if 'Traceback' in rest else 'no traceback'}, "
                      f"status.json valid; `{error[:150]}`; the resume completed"))


def checkpoint_faults(model_dir: Path, out: Path, baseline: pd.DataFrame, rows: list[dict]) -> None:
    """Resumes of a run stopped after epoch 1 (checkpoints 0 and 1), its checkpoints damaged."""
    with contextlib.suppress(RunStopped):
        run(load_config(base_config(model_dir) + QUICK + [f"run.output_dir={out / 'stopped'}", "faults.role=learner",
                                                          "faults.mode=raise", "faults.epoch=2",
                                                          "run.max_auto_resumes=0"]))
    stopped = only_run(out / "stopped")

    def newest(damage):
        return lambda run_dir: damage(run_dir / "checkpoints" / "epoch_0001")

    def every(damage):
        return lambda run_dir: [damage(c) for c in (run_dir / "checkpoints").iterdir()]

    cases = [("newest checkpoint truncated", newest(truncate_weights), []),
             ("every checkpoint truncated", every(truncate_weights), []),
             ("newest: trainer_state.json without its keys, checksums matching", newest(drop_state_keys), []),
             ("newest: bad safetensors header, checksums matching", newest(break_safetensors_header), []),
             ("resume with model.lora.rank=8 on a rank-4 run", lambda run_dir: None, ["model.lora.rank=8"])]
    for index, (name, damage, overrides) in enumerate(cases):
        start = time.perf_counter()
        copy = shutil.copytree(stopped, out / f"checkpoint-{index}")
        damage(copy)
        try:
            run(load_config([f"resume={copy}", "faults.role=null"] + overrides))
            aside = sorted(p.name for p in (copy / "checkpoints" / "damaged").iterdir()) \
                if (copy / "checkpoints" / "damaged").is_dir() else []
            rows.append(outside_row(f"resume: {name}", start, copy, baseline,
                                    f"fell back to the previous checkpoint; set aside: {', '.join(aside) or 'none'}"))
        except RunStopped as err:
            kept = sorted(p.name for p in (copy / "checkpoints").iterdir())
            rows.append(outside_row(f"resume: {name}", start, copy, baseline,
                                    f"refused: `{str(err)[:220]}`; checkpoints left: {', '.join(kept)}",
                                    refused=True))


def read_only(model_dir: Path, out: Path, rows: list[dict]) -> None:
    start = time.perf_counter()
    with tmpfs(out / "ro", "16m") as disk:
        with contextlib.suppress(RunStopped):
            run(load_config(base_config(model_dir) + QUICK + [f"run.output_dir={disk}", "train.epochs=1"]))
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with contextlib.redirect_stderr(io.StringIO()) as err:
            code = train_main([f"resume={only_run(disk)}"])
    line = next((x for x in err.getvalue().splitlines() if x.startswith("error:")), "")
    row = {"fault": "whole run directory read-only, resume=", "what": f"exit {code}: `{line[:200]}`",
           "survived": True, "seconds": time.perf_counter() - start, "restarts": 0, "learner_resumes": 0,
           "samples_lost": None, "duplicates": None, "same_learning": None}
    print(row, flush=True)
    rows.append(row)


def outside(model_dir: Path, out: Path, rows: list[dict], phases=PHASES) -> None:
    """The outside group, appended to ``rows`` as each run ends (kept if a later one fails)."""
    start = time.perf_counter()
    baseline_dir = run(load_config(base_config(model_dir) + QUICK + [f"run.output_dir={out / 'baseline'}"])).path
    baseline = measure(baseline_dir)["metrics"]
    rows.append(outside_row("none (baseline)", start, baseline_dir, baseline, "completed"))
    parts = [lambda: driver_faults(model_dir, out, baseline, rows),
             lambda: checkpoint_faults(model_dir, out, baseline, rows),
             lambda: read_only(model_dir, out, rows), lambda: signal_faults(model_dir, out, baseline, rows, phases)]
    for part in parts:  # each appends its rows as they are measured
        try:
            part()
        except Exception as err:  # noqa: BLE001 - a drill that broke is a row too; the next part runs
            rows.append({"fault": "drill error", "what": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}",
                         "survived": False, "seconds": 0.0, "restarts": 0, "learner_resumes": 0,
                         "samples_lost": None, "duplicates": None, "same_learning": None})
            print(rows[-1], flush=True)


def message(fn) -> str:
    """What a user sees: the error raised, a warning the input was accepted with, or the MRC
    CLI's exit code, error and warnings."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()) as out:
            code = fn()
    except (ConfigError, FileNotFoundError, ValueError, RunStopped) as exc:
        return "rejected: " + " ".join(str(exc).split())[:420]
    if isinstance(code, str):
        return "accepted. Warning: " + code[:300]
    report = json.loads(out.getvalue())
    first = report["images"][0]
    said = first.get("error") or f"scored (MRC {first['mrc']:.4f})"
    notes = [w for w in report["warnings"] if w.startswith(first["path"])]
    others = "; other images scored" if len(report["images"]) > 1 and "mrc" in report["images"][-1] else ""
    warning = " Warning: " + "; ".join(n.split(": ", 1)[1] for n in notes) if notes else ""
    return f"exit {code}: {said}.{warning}{others}"


def bad_inputs(model_dir: Path, tmp: Path) -> list[tuple[str, str]]:
    empty = tmp / "empty.txt"
    empty.write_text("\n\n")
    grid = np.asarray(Image.new("RGB", (64, 64), "white")).copy()
    for y in (8, 40):  # an object in every view
        for x in (8, 40):
            grid[y:y + 16, x:x + 16] = (200, 30, 30)
    Image.fromarray(grid).save(tmp / "good.png")
    (tmp / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (65, 64), "white").save(tmp / "odd.png")
    Image.new("RGB", (128, 64), "white").save(tmp / "wide.png")
    Image.new("RGB", (32, 32), "white").save(tmp / "small.png")
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(tmp / "rgba.png")
    Image.new("L", (64, 64), 128).save(tmp / "grey.png")
    sixteen = np.where(grid[..., 0] < 255, 20000, 65535).astype(np.uint16)  # objects at 0.31 of full scale
    Image.fromarray(sixteen).save(tmp / "16bit.png")
    Image.new("RGB", (64, 64), "white").save(tmp / "white.png")
    Image.fromarray(np.asarray(Image.fromarray(grid).resize((1024, 1024)))).save(tmp / "1024px.png")
    (tmp / "grids").mkdir()
    (tmp / "list.yaml").write_text("- train\n- epochs: 3\n")
    (tmp / "repeated.yaml").write_text("train:\n  epochs: 3\ntrain:\n  epochs: 4\n")
    (tmp / "latin1.txt").write_bytes("a red cube\na caf\xe9 chair\n".encode("latin-1"))
    (tmp / "long.txt").write_text("a red cube\n" + "a red cube " * 1820 + "\n")  # 20,020 characters
    (tmp / "my_rewards.py").write_text("import numpy as np\n\n\ndef three_columns(views, cameras, prompts):\n"
                                       "    return np.zeros((len(prompts), 3))\n")
    sys.path.insert(0, str(tmp))
    config_cases = [
        ("unknown config key", ["train.epoch=3"]),
        ("wrong type", ["train.epochs=many"]),
        ("eta = 0", ["sampling.eta=0"]),
        ("guidance < 1", ["sampling.guidance_scale=0.5"]),
        ("batch not divisible by the rollout batch", ["train.samples_per_epoch=10"]),
        ("several minibatches with ddpo-sf", ["train.num_minibatches=2"]),
        ("unknown finetune mode", ["model.finetune=half"]),
        ("unknown built-in model", ["model.path=builtin:sdxl"]),
        ("missing model directory", ["model.path=/no/such/model"]),
        ("model directory without components", [f"model.path={tmp}"]),
        ("missing prompt file", ["prompts.file=/no/such/prompts.txt"]),
        ("empty prompt file", [f"prompts.file={empty}"]),
        ("unknown fault role", ["faults.role=driver"]),
        ("resume of a directory that is not a run", [f"resume={tmp}"]),
        ("reward import path that does not resolve", ["reward.kind=nonexistent.module:fn"]),
        ("NaN KL weight", ["train.kl_weight=nan"]),
        ("infinite guidance", ["sampling.guidance_scale=inf"]),
        ("NaN CPUs", ["rollout.num_cpus=nan"]),
        ("infinite learning rate", ["train.learning_rate=inf"]),
        ("--config file that is a list", ["--config", str(tmp / "list.yaml")]),
        ("--config file that repeats a key", ["--config", str(tmp / "repeated.yaml")]),
        ("prompt file not in UTF-8", [f"prompts.file={tmp / 'latin1.txt'}"]),
        ("20,000-character prompt", [f"prompts.file={tmp / 'long.txt'}"]),
    ]
    rows = []
    for name, args in config_cases:
        def check(args=args):
            from policy.models import check_model_dir, prompt_truncation_warning, resolve_model_path

            config = load_config(args)
            prompts = load_prompts(config.prompts)
            model_path = resolve_model_path(config.model.path)
            check_model_dir(model_path)
            return prompt_truncation_warning(model_path, prompts, f"prompts.file={config.prompts.file}") or 0
        rows.append((f"config: {name} (`{' '.join(args)}`)", message(check)))
    rows.append(("cluster: relative run directory (`run.ray_address=http://127.0.0.1:8265`, default `run.output_dir`)",
                 message(lambda: check_run_location(load_config(["run.ray_address=http://127.0.0.1:8265"])))))
    views, prompts = torch.zeros(2, 4, 3, 32, 32, dtype=torch.uint8), ["a red cube", "a blue ball"]
    rows.append(("reward: returns a [B, 3] array (`reward.kind=my_rewards:three_columns`), at the first batch",
                 message(lambda: score(build_reward("my_rewards:three_columns"), ["s0", "s1"], views, grid_rig(),
                                       prompts))))
    for name in ["missing.png", "grids", "corrupt.png", "odd.png", "wide.png", "small.png", "rgba.png",
                 "grey.png", "16bit.png", "1024px.png", "white.png"]:
        rows.append((f"MRC CLI: {name}", message(lambda n=name: mrc_main([str(tmp / n), str(tmp / "good.png")]))))
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp / "grey_background.png")
    rows.append(("MRC CLI: non-white background", message(lambda: mrc_main([str(tmp / "grey_background.png")]))))
    return rows


def cell(value, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def write_doc(results: dict) -> Path:
    inside, outside, inputs, wall = (results.get("inside", []), results.get("outside", []), results.get("inputs", []),
                                     results.get("seconds", {}))
    measured = results.get("measured", {})
    lines = [
        "# Reliability", "",
        "What survives what, measured by `python -m bench.reliability_drill` on this project's",
        "development machine (2 CPU cores shared with other work, no GPU; drill wall time and code measured, per "
        "group: " + "; ".join(f"{group} {wall[group]:.0f} s at {measured.get(group, 'an unrecorded commit')}"
                              for group in GROUPS if group in wall) + "). Each run: tiny model,",
        f"brightness reward, {EPOCHS} epochs x {SAMPLES} samples, rollout batches of 2, through real Ray actors.",
        "The tests in `tests/test_reliability.py` check the same properties on every CI run.", "",
        "## Injected faults (from inside the actor)", "",
        "| fault injected | survived | run seconds | actor restarts | samples lost | duplicate samples |",
        "|---|---|---|---|---|---|",
    ]
    for r in inside:
        lines.append(f"| {r['fault']} | {'yes' if r['survived'] else 'NO: ' + r['error'][:80]} | "
                     f"{r['seconds']:.1f} | {r['restarts']} | {r['samples_lost']} | {r['duplicates']} |")
    lines += [
        "", "How: rollout and reward actors run with Ray `max_restarts`; the driver's `ActorGroup`",
        "(`actors/group.py`) re-issues every batch a failed actor held, with the same prompts, seeds",
        "and sample ids, reloads the current policy version into a restarted rollout actor first,",
        "and kills an actor whose batch runs past its `timeout_s`. A learner failure (crash, hang",
        "past `train.timeout_s`, exception) abandons the epoch; with `run.max_auto_resumes` the run",
        "restarts its actors from the last good checkpoint, otherwise it stops and prints the",
        "`resume=RUN_DIR` command. Checkpoints are written atomically (temp dir, fsync, manifest of",
        "SHA-256 checksums, rename); a damaged newest checkpoint is set aside with a warning.", "",
        "## Faults from outside the process", "",
        "Signals sent to the actor's process (`bench/process_faults.py`: SIGKILL, or SIGSTOP: a hang the",
        "actor cannot notice) when the driver enters a phase of epoch 1 (sample: 0.5 s into sampling and",
        "scoring; train: the learner's update, rollout and reward actors idle; sync: the weight sync;",
        "checkpoint: the checkpoint after the sync, every actor idle and up to date; eval: the held-out",
        "evaluation at the end), and faults of the driver, its disk and its checkpoints.",
        "Timeouts: rollout and reward 10 s, learner 150 s; `run.max_auto_resumes=1`. *Same learning*: every",
        "epoch's reward, KL, loss, grad norm, advantages and policy version equal the uninterrupted run's",
        "(rtol 1e-5), for a resumed run too.", "",
        "| fault | what happened | run seconds | actor restarts | learner resumes | samples lost | duplicate samples "
        "| same learning as uninterrupted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in outside:
        same = {True: "yes", False: "NO", None: "-"}[r["same_learning"]]
        what = " ".join(r["what"].replace("|", "/").split())[:300]
        lines.append(f"| {r['fault']} | {'' if r['survived'] else 'NOT SURVIVED: '}{what} | {r['seconds']:.1f} | "
                     f"{r['restarts']} | {r['learner_resumes']} | {cell(r['samples_lost'])} | "
                     f"{cell(r['duplicates'])} | {same} |")
    lines += [""] + results.get("notes", [])
    lines += [
        "", "How: an actor that does not answer within its `timeout_s` (running a batch, or idle and asked",
        "to load new weights or to get ready) is hung, and is handled as a crash: `ray.kill(actor,",
        "no_restart=False)`, so Ray restarts it (Ray kills the process even when it is stopped), counted",
        "in the restarts, re-synced before its next batch. Only an actor whose `max_restarts` are spent",
        "is dropped. A restarting actor is waited for (the GCS actor table says it is restarting), not",
        "killed again. A killed learner is a learner failure (auto-resume from the last checkpoint).",
        "", "Run directory: `status.json`, `eval.json`, `config.yaml` and `report.md` are written whole or",
        "not at all (temp file, fsync, rename), so a full disk leaves the previous version, never an empty",
        "file; a damaged one from an earlier session is reported and written afresh. `status.json` counts",
        "a session when it starts and adds its wall time after every epoch, so a SIGKILLed session is in",
        "`sessions` and `wall_seconds_total` up to its last epoch. A failed write (full disk, read-only",
        "directory) ends the run with one line naming the file, the cause and the `resume=` command;",
        "the shutdown (actors, placement group, Ray) still runs. A checkpoint that fails its checksums or",
        "does not parse (missing keys, bad safetensors header) or does not load is moved to",
        "`checkpoints/damaged/`, never deleted, and the resume falls back to the previous one; if every",
        "checkpoint is damaged the resume stops, touching none, and says how to start over in a new run",
        "directory. A resume that changes what the checkpoints hold (`model.finetune`, `model.lora.*`)",
        "is refused before any actor starts, naming the keys; a model whose tensors differ (another",
        "`model.path`) is refused by the learner, listing the tensors.",
        "", "After a SIGKILL of the driver (or of the raylet) of an embedded local Ray, Ray's own agents",
        "(dashboard agent, runtime-env agent, log monitor) notice only after their health checks fail",
        "and linger about a minute (measured above); a new run can start meanwhile (Ray picks free",
        "ports). To end them at once: `ray stop` (every Ray on the machine) or kill the driver's",
        "process group.", "",
    ]
    lines += bad_input_section(inputs)
    lines += ["## Safe defaults", "",
              "- The embedded local Ray's dashboard listens on 127.0.0.1 (`run.dashboard_host`).",
              "- A Ray cluster must sit on a trusted network: anyone who can reach its ports can run",
              "  code on it. Keep the dashboard and GCS ports off the internet.",
              "- Checkpoints hold no pickle: safetensors and JSON only.", ""]
    path = ROOT / "docs" / "reliability.md"
    path.write_text("\n".join(lines))
    return path


def bad_input_section(inputs: list[tuple[str, str]]) -> list[str]:
    lines = ["## Bad input", "",
             "Bad config values and input files stop the run before any actor starts (exit code 2 for the",
             "config, 1 for the rest); a reward's wrong output stops it at its first batch, whose last line",
             "is then `error: epoch 0: reward task 0 failed 3 times: raised RayTaskError(ValueError):",
             "ValueError: <the message below>`. The MRC command line answers per image in its JSON. Each",
             "is one line, never a traceback; `tests/test_bad_input.py` checks the newer ones, and",
             "`python -m bench.reliability_drill --only inputs` regenerates this table.", "",
             "| input | message |", "|---|---|"]
    lines += [f"| {name} | {text.replace('|', '/')} |" for name, text in inputs]
    return lines + [""]


GROUPS = ("inside", "outside", "inputs")


def revision() -> str:
    """The commit measured (``+changes`` when the tree differs from it)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--untracked-files=no")
                                                  else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=GROUPS, action="append", help="run only this group (repeatable)")
    parser.add_argument("--write-doc", action="store_true", help="run nothing: the page from the saved results")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help="outside group: the phases signals are sent in (comma-separated; default all)")
    args = parser.parse_args(argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.write_doc:
        print(write_doc(results))
        return
    groups = args.only or list(GROUPS)
    results.setdefault("seconds", {})
    results.setdefault("measured", {}).update({group: revision() for group in groups})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = create_tiny_model(tmp / "tiny", seed=0)
        load_components(model_dir)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            phases = tuple(args.phases.split(","))
            for group, measure_group in (("inside", drill), ("outside", lambda *a: outside(*a, phases=phases))):
                if group in groups:
                    start, results[group] = time.perf_counter(), []
                    try:
                        measure_group(model_dir, tmp / group, results[group])
                    except BaseException:  # e.g. Ctrl-C: the rows so far are kept, marked
                        results["measured"][group] += f", interrupted after {len(results[group])} rows"
                        raise
                    finally:
                        results["seconds"][group] = time.perf_counter() - start
        finally:  # what was measured is kept, even if a run failed the drill
            ray.shutdown()
            RESULTS.write_text(json.dumps(results, indent=1))
        if "inputs" in groups:
            start = time.perf_counter()
            (tmp / "inputs").mkdir()
            results["inputs"] = bad_inputs(model_dir, tmp / "inputs")
            results["seconds"]["inputs"] = time.perf_counter() - start
    RESULTS.write_text(json.dumps(results, indent=1))
    print(write_doc(results))


if __name__ == "__main__":
    main()
