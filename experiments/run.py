"""Run one experiment of ``configs/experiments/``: ``python -m experiments.run NAME [--short]``.

An experiment is a set of training runs (``python -m learner.main`` with overrides)
and of evaluations (``python -m learner.evaluate`` of a model, the ground truth or a
run's final checkpoint), plus optional preparation commands.  Everything lands in a
fixed place, ``runs/experiments/<name>/`` (``<name>-short`` with ``--short``):

    <run>/                      a run directory (status.json says if it finished)
    eval/<row>/summary.json     an evaluation
    experiment.json             the machine, the commands and when they ran

Running the command again skips what finished, resumes an interrupted run from its
last checkpoint, and starts what never ran, so a suite can be spread over sessions.
A run directory made with other settings than the experiment's file now has stops the
command before anything runs, naming the settings (move the directory aside to rerun).
A failed run does not stop the others; the command exits 1 and names it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from learner.config import PROJECT_ROOT, ConfigError, load_config

EXPERIMENT_DIR = PROJECT_ROOT / "configs" / "experiments"
RUNS_ROOT = PROJECT_ROOT / "runs" / "experiments"
SECTIONS = {"title", "description", "common", "runs", "evaluation", "evaluations", "prepare", "short"}


@dataclass
class Evaluation:
    """One Table-1-style row: a model directory, ``ground-truth``, or a run's final checkpoint."""

    name: str
    model: str | None = None
    run: str | None = None
    overrides: dict = field(default_factory=dict)  # this row's own sampling.* settings (e.g. sampler: zmv)


@dataclass
class Experiment:
    name: str
    title: str
    description: str = ""
    runs: dict[str, dict] = field(default_factory=dict)  # run name -> its config overrides (common merged in)
    evaluations: list[Evaluation] = field(default_factory=list)
    evaluation: dict = field(default_factory=lambda: {"num_prompts": 64, "samples": 4})
    prepare: list[dict] = field(default_factory=list)  # {"command": [...], "creates": path}; "{dir}": the experiment's directory
    short: bool = False
    # the common sampling.* / reward.* overrides: model rows are sampled and scored as the runs are
    eval_overrides: dict = field(default_factory=dict)

    @property
    def dir_name(self) -> str:
        return self.name + ("-short" if self.short else "")


def experiment_names() -> list[str]:
    return sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml"))


def load_experiment(name: str, short: bool = False) -> Experiment:
    """Read and check ``configs/experiments/<name>.yaml``; every run's config is validated
    here, so a typo fails before the first run starts."""
    path = EXPERIMENT_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no experiment {name!r}: {path} does not exist; known: {', '.join(experiment_names())}")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - SECTIONS
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; valid: {sorted(SECTIONS)}")
    shortened = spec.get("short") or {} if short else {}
    common = {**(spec.get("common") or {}), **(shortened.get("common") or {})}
    runs = {}
    for run_name, overrides in (spec.get("runs") or {}).items():
        runs[run_name] = {**common, **(overrides or {}), **((shortened.get("runs") or {}).get(run_name) or {})}
        try:
            load_config(to_dotlist(runs[run_name]))
        except ConfigError as err:
            raise ConfigError(f"{path}, run {run_name!r}: {err}") from None
    evaluations = []
    for row, source in (spec.get("evaluations") or {}).items():
        row_eval = Evaluation(row, **source)
        if (row_eval.model is None) == (row_eval.run is None):
            raise ConfigError(f"{path}, evaluation {row!r}: give exactly one of model: or run:")
        if row_eval.run is not None and row_eval.run not in runs:
            raise ConfigError(f"{path}, evaluation {row!r}: no run named {row_eval.run!r}")
        evaluations.append(row_eval)
    evaluation = {"num_prompts": 64, "samples": 4, **(spec.get("evaluation") or {}),
                  **(shortened.get("evaluation") or {})}
    eval_overrides = {k: v for k, v in common.items() if k.startswith(("sampling.", "reward."))}
    return Experiment(name, spec.get("title", name), spec.get("description", ""), runs, evaluations,
                      evaluation, list(spec.get("prepare") or []), short, eval_overrides)


def to_dotlist(overrides: dict) -> list[str]:
    """``{"train.epochs": 3, "prompts.limit": None}`` -> ``["train.epochs=3", "prompts.limit=null"]``."""
    return [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in overrides.items()]


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "kind": f"GPU ({gpu})" if gpu else f"CPU only, {os.cpu_count()} cores"}


def run_finished(run_dir: Path) -> bool:
    from learner.rundir import RunDirectory

    return bool(RunDirectory(run_dir).status().get("finished", False))


def final_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a finished run ended with (the early-stopped one, if it stopped early)."""
    from learner.checkpoint import latest_good_checkpoint

    checkpoint, _ = latest_good_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no usable checkpoint")
    return checkpoint


def changed_settings(run_dir: Path, overrides: dict) -> list[str]:
    """The experiment's settings that differ from those the run in ``run_dir`` was started with
    (empty when it has not started): rerunning would otherwise skip or resume it as it is."""
    if not (run_dir / "config.yaml").is_file():
        return []
    try:
        saved = load_config(["--config", str(run_dir / "config.yaml")])
    except ConfigError as err:  # written by an older version whose settings this one no longer reads
        return [f"its config.yaml no longer loads: {err}"]
    wanted = load_config(to_dotlist(overrides))

    def value(config, key: str):
        return functools.reduce(getattr, key.split("."), config)

    return [f"{key} {value(saved, key)!r} there, {value(wanted, key)!r} here" for key in overrides
            if value(saved, key) != value(wanted, key)]


def check_runs_match(experiment: Experiment, root: Path = RUNS_ROOT, only: list[str] | None = None) -> None:
    """Stop before anything runs if a run directory of the experiment was made with other settings."""
    out = root / experiment.dir_name
    for name, overrides in experiment.runs.items():
        if only and name not in only:
            continue
        changed = changed_settings(out / name, overrides)
        if changed:
            rows = [row.name for row in experiment.evaluations if row.run == name]
            raise ConfigError(
                f"{out / name} was run with other settings than configs/experiments/{experiment.name}.yaml "
                f"now has ({'; '.join(changed)}), so its results are not this experiment's. Move or delete it"
                + (f" and its evaluation{'s' if len(rows) > 1 else ''} {', '.join(str(out / 'eval' / r) for r in rows)}"
                   if rows else "") + " to run it again, or restore those settings to keep it.")


def _call(command: list[str], log) -> int:
    log(f"$ {' '.join(command)}")
    return subprocess.call(command, cwd=PROJECT_ROOT)


def run_experiment(experiment: Experiment, root: Path = RUNS_ROOT, only: list[str] | None = None,
                   threads: int | None = None) -> list[str]:
    """Run what is not finished yet; returns the names of the runs and rows that failed.
    ``threads`` sets the torch threads of every run's rollout and learner and of every
    evaluation (their configs' own otherwise), e.g. 1 to run two experiments side by side on
    two cores: torch's threads spin while they wait, so four of them on two cores lose time."""
    out = root / experiment.dir_name
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "experiment.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"sessions": []}
    record.update(name=experiment.name, title=experiment.title, short=experiment.short, machine=machine(),
                  command=f"python -m experiments.run {experiment.name}" + (" --short" if experiment.short else ""))
    # the threads are the session's (they change the speed, not what is run)
    record["sessions"].append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": threads})
    record_path.write_text(json.dumps(record, indent=2))
    python, failed = sys.executable, []
    thread_overrides = [] if threads is None else [f"rollout.torch_threads={threads}", f"train.torch_threads={threads}"]

    def log(message: str) -> None:
        print(f"[{experiment.dir_name}] {message}", flush=True)

    for step in experiment.prepare:
        # "{dir}" in a step stands for this experiment's directory (for outputs that belong to it)
        command = [arg.replace("{dir}", str(out)) for arg in step["command"]]
        creates = PROJECT_ROOT / step["creates"].replace("{dir}", str(out))
        if creates.exists():
            log(f"prepare: {creates} exists, skipped")
        elif _call([python, *command], log) != 0:
            log(f"prepare step failed: {' '.join(command)}")
            return ["prepare"]
    for name, overrides in experiment.runs.items():
        if only and name not in only:
            continue
        run_dir = out / name
        if run_finished(run_dir):
            log(f"run {name}: finished, skipped")
            continue
        if (run_dir / "config.yaml").is_file():
            log(f"run {name}: resuming from its last checkpoint")
            command = [python, "-m", "learner.main", f"resume={run_dir}", *thread_overrides]
        else:
            log(f"run {name}: starting")
            command = [python, "-m", "learner.main", f"run.dir={run_dir}", f"run.name={name}",
                       *to_dotlist(overrides), *thread_overrides]
        if _call(command, log) != 0:
            failed.append(name)
            log(f"run {name} FAILED; the other runs go on (rerun the same command to resume it)")
    for row in experiment.evaluations:
        if only and row.name not in only and row.run not in (only or []):
            continue
        row_dir = out / "eval" / row.name
        if (row_dir / "summary.json").is_file():
            log(f"evaluation {row.name}: done, skipped")
            continue
        if row.run is not None:
            if not run_finished(out / row.run):
                log(f"evaluation {row.name}: run {row.run} has not finished, skipped")
                failed.append(row.name)
                continue
            source = ["--checkpoint", str(final_checkpoint(out / row.run))]
        else:
            source = ["--model", row.model]
        command = [python, "-m", "learner.evaluate", *source, "--num-prompts", str(experiment.evaluation["num_prompts"]),
                   "--samples", str(experiment.evaluation["samples"]), "--out", str(row_dir),
                   *([] if threads is None else ["--threads", str(threads)]),
                   *([] if row.run else to_dotlist(experiment.eval_overrides)), *to_dotlist(row.overrides)]
        if _call(command, log) != 0:
            failed.append(row.name)
    record["sessions"][-1]["ended"] = time.strftime("%Y-%m-%d %H:%M:%S")
    record_path.write_text(json.dumps(record, indent=2))
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help=f"experiment: one of {', '.join(experiment_names())}, or 'all'")
    parser.add_argument("--short", action="store_true", help="the shortened version (CI): a few epochs, few prompts")
    parser.add_argument("--root", type=Path, default=RUNS_ROOT, help="where experiment folders go")
    parser.add_argument("--only", nargs="*", help="only these runs / evaluation rows")
    parser.add_argument("--threads", type=int, help="torch threads of every run's rollout and learner and of every "
                        "evaluation (default: their configs'); 1 to share two cores with another job")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, not {args.threads}")
    names = experiment_names() if args.name == "all" else [args.name]
    try:
        experiments = [load_experiment(name, args.short) for name in names]  # all checked before any runs
        for experiment in experiments:
            check_runs_match(experiment, args.root, args.only)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = []
    for experiment in experiments:
        failed += [f"{experiment.name}/{f}" for f in run_experiment(experiment, args.root, args.only, args.threads)]
    if failed:
        print(f"failed: {', '.join(failed)}; rerun the same command to resume them", file=sys.stderr)
        return 1
    print("done; build the tables and plots with: python -m experiments.results", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
