"""Fault drill: inject each fault into a small real run and write docs/reliability.md.

    python bench/reliability_drill.py            # about 5 minutes on 2 CPU cores
    python bench/reliability_drill.py --bad-input-only   # only the bad-input table (about 2 minutes)

Each scenario runs the whole loop through Ray actors (tiny model, brightness
reward, 3 epochs of 8 samples) with one fault from the ``faults`` config block,
and records whether the run completed, its wall time against the fault-free
run, the restarts, and the samples lost or duplicated (both must be 0).  Then
it feeds the bad inputs of the list below to the config loader and to the MRC
command line and records the message each produced.
"""

from __future__ import annotations

import contextlib
import io
import json
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

from learner.config import ConfigError, load_config, load_prompts  # noqa: E402
from learner.driver import RunStopped, check_run_location, run  # noqa: E402
from policy.models import create_tiny_model, load_components  # noqa: E402
from reward_service.mrc import main as mrc_main  # noqa: E402
from reward_service.rewards import build_reward, score  # noqa: E402

EPOCHS, SAMPLES = 3, 8
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


def drill(model_dir: Path, out: Path) -> list[dict]:
    base = [f"model.path={model_dir}", "sampling.num_steps=2", "prompts.limit=4", "rollout.batch_size=2",
            f"train.samples_per_epoch={SAMPLES}", f"train.epochs={EPOCHS}", "reward.kind=brightness",
            "rollout.num_cpus=0.5", "reward.num_cpus=0.5", "train.num_cpus=0.5", "run.samples_to_save=0"]
    rows = []
    for name, overrides in SCENARIOS:
        start = time.perf_counter()
        survived, error = True, ""
        try:
            run_dir = run(load_config(base + [f"run.output_dir={out / str(len(rows))}"] + overrides)).path
        except RunStopped as err:
            survived, error = False, str(err)
            run_dir = next((out / str(len(rows))).iterdir())
        m = pd.read_parquet(run_dir / "metrics.parquet") if (run_dir / "metrics.parquet").exists() else pd.DataFrame()
        used = int((m["num_samples"] + m["num_dropped"]).sum()) if len(m) else 0
        unique = int(m["num_unique_sample_ids"].sum()) if len(m) else 0
        rows.append({
            "fault": name, "survived": survived and list(m["epoch"]) == list(range(EPOCHS)),
            "seconds": time.perf_counter() - start,
            "restarts": int(m[["rollout_restarts", "reward_restarts"]].iloc[-1].sum()) if len(m) else 0,
            "samples_lost": EPOCHS * SAMPLES - used, "duplicates": used - unique, "error": error,
        })
        print(rows[-1], flush=True)
    return rows


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
    (tmp / "my_rewards.py").write_text("import numpy as np\n\n\ndef three_columns(images, prompts):\n"
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
    images, prompts = torch.zeros(2, 64, 64, 3, dtype=torch.uint8), ["a red cube", "a blue ball"]
    rows.append(("reward: returns a [B, 3] array (`reward.kind=my_rewards:three_columns`), at the first batch",
                 message(lambda: score(build_reward("my_rewards:three_columns"), ["s0", "s1"], images, prompts))))
    for name in ["missing.png", "grids", "corrupt.png", "odd.png", "wide.png", "small.png", "rgba.png",
                 "grey.png", "16bit.png", "1024px.png", "white.png"]:
        rows.append((f"MRC CLI: {name}", message(lambda n=name: mrc_main([str(tmp / n), str(tmp / "good.png")]))))
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp / "grey_background.png")
    rows.append(("MRC CLI: non-white background", message(lambda: mrc_main([str(tmp / "grey_background.png")]))))
    return rows


def write_doc(faults: list[dict], inputs: list[tuple[str, str]], wall: float) -> Path:
    lines = [
        "# Reliability", "",
        "What survives what, measured by `python bench/reliability_drill.py` on this project's",
        f"development machine (2 CPU cores, no GPU; drill wall time {wall:.0f} s). Each run: tiny model,",
        f"brightness reward, {EPOCHS} epochs x {SAMPLES} samples, rollout batches of 2, through real Ray actors.",
        "The tests in `tests/test_reliability.py` check the same properties on every CI run.", "",
        "## Injected faults", "",
        "| fault injected | survived | run seconds | actor restarts | samples lost | duplicate samples |",
        "|---|---|---|---|---|---|",
    ]
    for r in faults:
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
        "SHA-256 checksums, rename); a damaged newest checkpoint is skipped with a warning.", "",
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
             "`python bench/reliability_drill.py --bad-input-only` regenerates this table.", "",
             "| input | message |", "|---|---|"]
    lines += [f"| {name} | {text.replace('|', '/')} |" for name, text in inputs]
    return lines + [""]


def rewrite_bad_inputs(inputs: list[tuple[str, str]]) -> Path:
    """--bad-input-only: replace the doc's bad-input table, keep the fault drill's figures."""
    path = ROOT / "docs" / "reliability.md"
    text = path.read_text()
    start, end = text.index("## Bad input"), text.index("## Safe defaults")
    path.write_text(text[:start] + "\n".join(bad_input_section(inputs)) + "\n" + text[end:])
    return path


def main() -> None:
    if "--bad-input-only" in sys.argv[1:]:  # seconds, not the drill's minutes
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "inputs").mkdir()
            print(rewrite_bad_inputs(bad_inputs(Path(tmp), Path(tmp) / "inputs")))
        return
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = create_tiny_model(tmp / "tiny", seed=0)
        load_components(model_dir)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            faults = drill(model_dir, tmp / "runs")
        finally:
            ray.shutdown()
        (tmp / "inputs").mkdir()
        inputs = bad_inputs(model_dir, tmp / "inputs")
    print(write_doc(faults, inputs, time.perf_counter() - start))


if __name__ == "__main__":
    main()
