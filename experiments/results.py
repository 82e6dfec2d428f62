"""Turn finished experiment runs into docs/results/: ``python -m experiments.results``.

Reads ``runs/experiments/<name>/`` (``--short``: ``<name>-short``) and writes

    carve3d_minicarve.md     every table and plot, each with its command, machine and wall time
    table1.json              {"gt": {"mrc", "alignment"}, "gt-vae": ..., "sft-short": ..., "sft-long": ..., "carve3d": ...}
    stability.json           {"sf": [final reward per seed], "is": [...]}
    scale.json, curation.json, reward_hacking.json, kl.json, methods.json
    table1.png, stability.png, kl.png, scale.png, curation.png, reward_hacking.png, methods.png

An experiment that has not run (or not finished) gets a line saying so and the
command that runs it.  "Final reward" is always measured on the same held-out
prompts and noise seeds in every run (the run's end evaluation, reward = -MRC), so
runs with different training prompts or seeds are compared on identical inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import yaml

from experiments.run import RUNS_ROOT, load_experiment, to_dotlist
from learner.config import PROJECT_ROOT, load_config
from learner.evaluate import paired_change
from learner.rundir import RunDirectory

RESULTS = PROJECT_ROOT / "docs" / "results"
TABLE1_ROWS = ("gt", "gt-vae", "sft-short", "sft-long", "carve3d")  # gt-vae: ground truth through the VAE


# --------------------------------------------------------------------------- reading runs


class Run:
    """A finished (or partial) run directory: per-epoch metrics, evaluations, config, status."""

    def __init__(self, path: Path):
        self.path = path
        self.exists = (path / "config.yaml").is_file()
        run_dir = RunDirectory.open(path) if self.exists else RunDirectory(path)  # metrics and evals
        self.rows, self.evals, self.status = run_dir.rows, run_dir.evals, run_dir.status()
        self.finished = bool(self.status.get("finished", False))
        self.config = yaml.safe_load((path / "config.yaml").read_text()) if self.exists else {}

    def curve(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        points = [(r["epoch"], r[key]) for r in self.rows if r.get(key) is not None and math.isfinite(r[key])]
        return (np.array([p[0] for p in points]), np.array([p[1] for p in points])) if points else \
            (np.array([]), np.array([]))

    @property
    def wall_seconds(self) -> float:
        return float(self.status.get("wall_seconds_total", 0.0))

    def eval_samples(self, tag: str):
        """The per-sample scores of an evaluation (``start``, ``end``, ``epoch_N``)."""
        import pandas as pd

        return pd.read_parquet(self.path / f"eval_{tag}.parquet")

    def eval_curve(self, key: str) -> tuple[list[int], list[float]]:
        """A held-out metric at the start (epoch 0), every ``epoch_N`` and the end."""
        points = []
        for tag, summary in self.evals.items():
            epoch = 0 if tag == "start" else len(self.rows) if tag == "end" else int(tag.split("_")[1])
            points.append((epoch, summary[key]))
        points.sort()
        return [p[0] for p in points], [p[1] for p in points]


class ExperimentResults:
    def __init__(self, name: str, root: Path, short: bool):
        self.spec = load_experiment(name, short)
        self.dir = root / self.spec.dir_name
        self.runs = {run: Run(self.dir / run) for run in self.spec.runs}
        self.record = json.loads((self.dir / "experiment.json").read_text()) \
            if (self.dir / "experiment.json").is_file() else {}

    def paired_difference(self, row: str, reference: str) -> dict:
        """Mean and standard error of row - reference over the same (prompt, seed) samples."""
        import pandas as pd

        a, b = (pd.read_parquet(self.dir / "eval" / r / "per_sample.parquet") for r in (row, reference))
        merged = a.merge(b, on=["prompt", "seed"], suffixes=("", "_ref"))
        out = {}
        for key in ("mrc", "alignment"):
            out[key], out[key + "_sem"] = paired_change(merged[key + "_ref"].to_numpy(), merged[key].to_numpy())
        return out

    def evaluation(self, row: str) -> dict | None:
        path = self.dir / "eval" / row / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def complete(self) -> bool:
        return all(r.finished for r in self.runs.values()) and \
            all(self.evaluation(e.name) for e in self.spec.evaluations)

    def provenance(self) -> str:
        """Command, machine, wall time and sizes: the line every section of the report carries,
        followed by the experiment's description."""
        line = self.provenance_line()
        return line + ("\n\n" + self.spec.description.strip() if self.spec.description else "")

    @property
    def wall_seconds(self) -> float:
        """The runs' wall time over all sessions, plus the Table-1 evaluations'."""
        return sum(r.wall_seconds for r in self.runs.values()) + \
            sum((self.evaluation(e.name) or {}).get("seconds", 0.0) for e in self.spec.evaluations)

    @property
    def command(self) -> str:
        return self.record.get("command", f"python -m experiments.run {self.spec.name}"
                               + (" --short" if self.spec.short else ""))

    @property
    def machine(self) -> str:
        return self.record.get("machine", {}).get("kind", "unknown machine")

    def provenance_line(self) -> str:
        sizes = self.sizes()
        if not self.record:
            return f"*Command:* `{self.command}` · not run yet · *sizes:* {sizes}"
        return (f"*Command:* `{self.command}` · *machine:* {self.machine} · *wall time:* {self.wall_seconds / 60:.1f} min "
                f"({len(self.runs)} run(s), {len(self.spec.evaluations)} evaluation(s)) · *sizes:* {sizes}")

    def sizes(self) -> str:
        """Epochs x samples of each run, and the evaluation sizes."""
        shapes = {}
        for overrides in self.spec.runs.values():
            c = load_config(to_dotlist(overrides))
            shape = (f"{c.train.epochs} epochs x {c.train.samples_per_epoch} samples "
                     f"({c.sampling.num_steps} DDIM steps), held-out eval {c.eval.num_prompts} prompts x "
                     f"{c.eval.samples_per_prompt}" + (f" every {c.eval.every} epochs" if c.eval.every else ""))
            shapes[shape] = shapes.get(shape, 0) + 1
        text = "; ".join(f"{n} run(s) of {shape}" for shape, n in shapes.items())
        if self.spec.evaluations:
            text += (f"; Table-1 rows: {self.spec.evaluation['num_prompts']} test prompts x "
                     f"{self.spec.evaluation['samples']} samples")
        return text

    def missing(self) -> list[str]:
        return [f"- not finished yet: {', '.join(n for n, r in self.runs.items() if not r.finished) or 'evaluations'}; "
                f"run `python -m experiments.run {self.spec.name}{' --short' if self.spec.short else ''}` "
                "(it resumes where it stopped)", ""]


def paired_mrc_difference(a: Run, a_tag: str, b: Run, b_tag: str) -> tuple[float, float]:
    """Mean and standard error of MRC(a) - MRC(b) over the same held-out samples: every run's
    evaluation scores the same prompts with the same fixed seeds, in the same order."""
    x, y = a.eval_samples(a_tag), b.eval_samples(b_tag)
    if len(x) != len(y) or list(x["prompt"]) != list(y["prompt"]):
        raise ValueError(f"{a.path} ({a_tag}) and {b.path} ({b_tag}) did not evaluate the same samples")
    return paired_change(y["mrc"].to_numpy(), x["mrc"].to_numpy())


def final_reward(run: Run) -> float:
    """The end evaluation's mean reward: identical test prompts and seeds in every run."""
    return float(run.evals["end"]["reward_mean"]) if "end" in run.evals else float("nan")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


# --------------------------------------------------------------------------- sections


def table1(exp: ExperimentResults, out: Path) -> list[str]:
    lines = ["## Table 1: test-set MRC and prompt alignment", "", exp.provenance(), ""]
    names = [row for row in TABLE1_ROWS if any(e.name == row for e in exp.spec.evaluations)]
    rows = {row: exp.evaluation(row) for row in names}
    if not all(rows.values()):
        return lines + exp.missing()
    run = exp.runs["carve3d"]
    threshold = run.config["train"]["kl_early_stop"]
    stopped = "KL" in run.status.get("stop_reason", "")
    table = {row: {"mrc": s["mrc"], "alignment": s["alignment"], "mrc_sem": s["mrc_sem"],
                   "alignment_sem": s["alignment_sem"], "num_samples": s["num_samples"]}
             for row, s in rows.items()}
    paired = exp.paired_difference("carve3d", "sft-short")  # the same prompts and seeds
    table["carve3d"].update(epochs_trained=len(run.rows), kl_early_stop=threshold, early_stopped=stopped,
                            final_kl=run.rows[-1]["kl_mean"] if run.rows else None,
                            paired_vs_sft_short=paired)
    (out / "table1.json").write_text(json.dumps(table, indent=2))
    base = table["sft-short"]
    lines += ["| model | test MRC (lower is better) | alignment accuracy |", "|---|---|---|"]
    for row in names:
        t = table[row]
        lines.append(f"| {row} | {t['mrc']:.4f} ± {t['mrc_sem']:.4f} | {t['alignment']:.3f} ± {t['alignment_sem']:.3f} |")
    change = 100 * (table["carve3d"]["mrc"] - base["mrc"]) / base["mrc"]
    lines += [
        "", f"{rows['gt']['num_prompts']} held-out test prompts x {exp.spec.evaluation['samples']} samples "
        "(± standard error over samples). Alignment chance level: see docs/results/base_models.md.",
        f"Carve3D RLFT from sft-short: test MRC **{change:+.1f}%** versus sft-short (paired over the same "
        f"prompts and seeds: {paired['mrc']:+.4f} ± {paired['mrc_sem']:.4f}, "
        f"{abs(paired['mrc']) / paired['mrc_sem']:.1f} SE; "
        f"{'below' if table['carve3d']['mrc'] < table['sft-long']['mrc'] else 'not below'} sft-long); alignment "
        f"{100 * paired['alignment']:+.1f} ± {100 * paired['alignment_sem']:.1f} points. Trained "
        f"{len(run.rows)} epochs; stop reason: {run.status.get('stop_reason', 'n/a')}.", ""]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    colours = {"gt": "#888", "gt-vae": "#bbb", "sft-short": "#c55", "sft-long": "#58c", "carve3d": "#3a3"}
    ax.bar(names, [table[n]["mrc"] for n in names], yerr=[table[n]["mrc_sem"] for n in names],
           color=[colours[n] for n in names])
    ax.set_ylabel("test MRC (lower is better)")
    fig.tight_layout()
    fig.savefig(out / "table1.png", dpi=110)
    plt.close(fig)
    return lines + ["![Table 1](table1.png)", ""]


def kl_figure(exp: ExperimentResults, out: Path) -> list[str]:
    """Figure 4: KL and alignment over the RLFT run's epochs, and what early stopping selected."""
    run = exp.runs["carve3d"]
    lines = ["## Figure 4: KL divergence and alignment over epochs (the Table 1 run)", "", exp.provenance_line(), ""]
    if not run.rows:
        return lines + exp.missing()
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    epochs, kl = run.curve("kl_mean")
    threshold = run.config["train"]["kl_early_stop"]
    axes[0].plot(epochs, kl, marker="o")
    if threshold:
        axes[0].axhline(threshold, color="r", ls="--", label=f"early-stop threshold {threshold:g}")
        axes[0].legend()
    axes[0].set_title("KL to sft-short (train samples)")
    e, a = run.curve("alignment_mean")
    axes[1].plot(e, a, marker=".", label="train prompts (per epoch)")
    ee, ea = run.eval_curve("alignment_mean")
    axes[1].plot(ee, ea, marker="s", label="held-out prompts")
    axes[1].set_title("prompt alignment")
    axes[1].legend()
    em, mrc = run.eval_curve("mrc_mean")
    e2, train_mrc = run.curve("mrc_mean")
    axes[2].plot(e2, train_mrc, marker=".", label="train prompts (per epoch)")
    axes[2].plot(em, mrc, marker="s", label="held-out prompts")
    axes[2].set_title("MRC (lower is better)")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("epoch")
        if run.rows and "KL" in run.status.get("stop_reason", ""):
            ax.axvline(run.rows[-1]["epoch"], color="g", ls=":")
    fig.tight_layout()
    fig.savefig(out / "kl.png", dpi=110)
    plt.close(fig)
    record = {"kl_early_stop": threshold, "stop_reason": run.status.get("stop_reason"),
              "epochs": [int(x) for x in epochs], "kl": [float(x) for x in kl],
              "train_alignment": [float(x) for x in a], "eval_epochs": ee, "eval_alignment": ea, "eval_mrc": mrc}
    (out / "kl.json").write_text(json.dumps(record, indent=2))
    lines += ["| epoch | KL | train MRC | train alignment |", "|---|---|---|---|"]
    for r in run.rows:
        lines.append(f"| {r['epoch']} | {r['kl_mean']:.2e} | {r['mrc_mean']:.4f} | {r.get('alignment_mean', math.nan):.3f} |")
    stopped = "KL" in run.status.get("stop_reason", "")
    selected = (f"it stopped the run at epoch {run.rows[-1]['epoch']} (green line); that policy is Table 1's carve3d row"
                if stopped else f"KL never reached it (peak {max(kl):.2e}), so the run completed all "
                f"{len(run.rows)} epochs and Table 1 evaluates the final policy")
    held_out = run.eval_curve("mrc_mean")
    lines += ["", f"Early stopping: threshold `train.kl_early_stop={threshold}`; {selected}. Held-out MRC "
              f"(8 test prompts x 4, fixed seeds) at epochs {held_out[0]}: "
              f"{', '.join(f'{m:.4f}' for m in held_out[1])}.", "", "![Figure 4](kl.png)", ""]
    return lines


def stability(exp: ExperimentResults, out: Path) -> list[str]:
    lines = ["## Figure 3: stability of DDPO-SF vs DDPO-IS over seeds", "", exp.provenance(), ""]
    if not exp.complete:
        return lines + exp.missing()
    groups = {"sf": [r for n, r in exp.runs.items() if n.startswith("sf")],
              "is": [r for n, r in exp.runs.items() if n.startswith("is")]}
    finals = {g: [final_reward(r) for r in runs] for g, runs in groups.items()}
    spread = {g: float(np.std(v, ddof=1)) for g, v in finals.items()}
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
    for ax, (group, runs) in zip(axes, groups.items()):
        for name, run in zip([n for n in exp.runs if n.startswith(group)], runs):
            ax.plot(*run.curve("reward_mean"), marker=".", label=name)
        ax.set_title(f"DDPO-{group.upper()}: train reward per epoch")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "stability.png", dpi=110)
    plt.close(fig)
    lines += ["| algorithm | final reward per seed | mean | across-seed std |", "|---|---|---|---|"]
    for g, v in finals.items():
        lines.append(f"| DDPO-{g.upper()} | {', '.join(f'{x:.5f}' for x in v)} | {np.mean(v):.5f} | {spread[g]:.5f} |")
    verdict = "lower" if spread["sf"] < spread["is"] else "NOT lower"
    test = spread_ratio_test(finals["sf"], finals["is"])
    sureness = "" if test is None else (
              f"How sure the ordering is with {len(finals['sf'])} and {len(finals['is'])} seeds: the variance ratio "
              f"IS/SF is {test['ratio']:.2f}, one-sided F-test of 'SF spreads less' p = {test['p_sf_lower']:.2f} "
              f"(df {test['df'][1]}, {test['df'][0]}), 90% interval of the true ratio {test['ratio_90'][0]:.2f} to "
              f"{test['ratio_90'][1]:.2f}. Mean final reward, SF - IS: {test['mean_difference']:+.5f} ± "
              f"{test['mean_difference_sem']:.5f}.")
    lines += ["", f"Final reward = -MRC of the run's end evaluation (same held-out prompts and seeds for every run). "
              f"DDPO-SF's across-seed spread is **{verdict}** than DDPO-IS's ({spread['sf']:.5f} vs {spread['is']:.5f}). "
              + sureness, "", "![Figure 3](stability.png)", ""]
    (out / "stability.json").write_text(json.dumps({**finals, "spread_test": test}, indent=2))
    return lines


def spread_ratio_test(sf: list[float], is_: list[float]) -> dict | None:
    """The F-test of the across-seed variances (normal seeds assumed): the ratio var(IS)/var(SF), the
    one-sided p-value of 'SF's variance is the smaller' (small p: the ordering is resolved), a 90%
    interval of the true ratio, and the difference of the means with its (unpaired) standard error.
    None when either side has fewer than 2 seeds or no spread, where no ratio is defined."""
    from scipy.stats import f as f_distribution

    if min(len(sf), len(is_)) < 2:
        return None
    var_sf, var_is = float(np.var(sf, ddof=1)), float(np.var(is_, ddof=1))
    if var_sf == 0 or var_is == 0:
        return None
    df_is, df_sf = len(is_) - 1, len(sf) - 1
    ratio = var_is / var_sf
    return {"ratio": ratio, "df": [df_sf, df_is], "p_sf_lower": float(f_distribution.sf(ratio, df_is, df_sf)),
            "ratio_90": [ratio / float(f_distribution.ppf(0.95, df_is, df_sf)),
                         ratio / float(f_distribution.ppf(0.05, df_is, df_sf))],
            "mean_difference": float(np.mean(sf) - np.mean(is_)),
            "mean_difference_sem": float(np.sqrt(var_sf / len(sf) + var_is / len(is_)))}


def scale(exp: ExperimentResults, out: Path) -> list[str]:
    lines = ["## Figure 5: reward at a fixed epoch vs batch size and prompt-set size", "", exp.provenance(), ""]
    if not any(run.finished for run in exp.runs.values()):
        return lines + exp.missing()
    # Every cell of the grid; the finished ones filled in (a partial grid is shown as it stands).
    grid = {name: (o["train.samples_per_epoch"], o["prompts.limit"]) for name, o in exp.spec.runs.items()}
    cells = {}
    for name, run in exp.runs.items():
        if run.finished:
            change, change_se = paired_mrc_difference(run, "end", run, "start")  # reward = -MRC
            cells[grid[name]] = {"final_reward": final_reward(run), "gain": -change, "gain_sem": change_se,
                                 "epochs": len(run.rows)}
    batches, counts = sorted({k[0] for k in grid.values()}), sorted({k[1] for k in grid.values()})

    def table(field):
        return [[cells[(b, p)][field] if (b, p) in cells else None for b in batches] for p in counts]

    record = {"batch_sizes": batches, "prompt_counts": counts, "reward_gain": table("gain"),
              "reward_gain_sem": table("gain_sem"), "final_reward": table("final_reward"),
              "epochs": sorted({c["epochs"] for c in cells.values()}), "complete": exp.complete}
    (out / "scale.json").write_text(json.dumps(record, indent=2))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for p, gains, sems in zip(counts, record["reward_gain"], record["reward_gain_sem"]):
        done = [(b, g, e) for b, g, e in zip(batches, gains, sems) if g is not None]
        if done:
            ax.errorbar(*zip(*[(b, g) for b, g, _ in done]), yerr=[e for _, _, e in done], marker="o", capsize=3,
                        label=f"{p} prompts")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("samples per epoch")
    ax.set_ylabel("held-out reward gain over sft-short")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=110)
    plt.close(fig)
    lines += ["| prompts \\ samples per epoch | " + " | ".join(map(str, batches)) + " |",
              "|---|" + "---|" * len(batches)]
    for p, gains, sems in zip(counts, record["reward_gain"], record["reward_gain_sem"]):
        lines.append(f"| {p} | " + " | ".join("not run yet" if g is None else f"{g * 1e3:+.2f} ± {e * 1e3:.2f}"
                                                for g, e in zip(gains, sems)) + " |")
    if not exp.complete:
        lines += [""] + exp.missing()[:1]
    lines += ["", f"Held-out reward gain (x 1e-3; reward = -MRC) after {record['epochs']} epoch(s), over the "
              "sft-short start, ± its paired standard error: the same test prompts and seeds for every cell "
              "and at the start.", "", "![Figure 5](scale.png)", ""]
    return lines


def curation(exp: ExperimentResults, out: Path) -> list[str]:
    lines = ["## Prompt curation: curated vs random training prompts", "", exp.provenance(), ""]
    scores_path = PROJECT_ROOT / "data" / "minicarve" / "curation_scores.json"
    if scores_path.is_file():
        scores = json.loads(scores_path.read_text())
        lines += [f"`python -m experiments.curate` scored {len(scores['candidates'])} candidate train prompts x "
                  f"{scores['samples_per_prompt']} with sft-short ({scores['seconds']:.0f} s): mean base MRC "
                  f"{scores['mean_mrc']['curated']:.4f} for the curated set vs {scores['mean_mrc']['random']:.4f} "
                  "for the random set of equal size.", ""]
    if not exp.complete:
        return lines + exp.missing()
    record = {}
    for name, run in exp.runs.items():
        start, end = run.evals["start"], run.evals["end"]
        change, change_se = paired_mrc_difference(run, "end", run, "start")
        record[name] = {"start_mrc": start["mrc_mean"], "end_mrc": end["mrc_mean"], "end_mrc_sem": end["mrc_sem"],
                        "end_alignment": end["alignment_mean"], "final_reward": final_reward(run),
                        "mrc_change": change, "mrc_change_sem": change_se}
    if {"curated", "random"} <= set(exp.runs):
        d, se = paired_mrc_difference(exp.runs["curated"], "end", exp.runs["random"], "end")
        record["curated_minus_random_end_mrc"] = {"mean": d, "sem": se}
    (out / "curation.json").write_text(json.dumps(record, indent=2))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, run in exp.runs.items():
        ax.plot(*run.eval_curve("mrc_mean"), marker="s", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out MRC (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curation.png", dpi=110)
    plt.close(fig)
    lines += ["| training prompts | held-out MRC start | end | end - start (paired) | end alignment |",
              "|---|---|---|---|---|"]
    for name in exp.runs:
        r = record[name]
        lines.append(f"| {name} | {r['start_mrc']:.4f} | {r['end_mrc']:.4f} ± {r['end_mrc_sem']:.4f} | "
                     f"{r['mrc_change']:+.5f} ± {r['mrc_change_sem']:.5f} | {r['end_alignment']:.3f} |")
    if "curated_minus_random_end_mrc" in record:
        d, se = record["curated_minus_random_end_mrc"].values()
        lines += ["", f"Held-out MRC at the end, curated - random over the same samples: {d:+.5f} ± {se:.5f} "
                  "(standard error; negative favours curation)."]
    return lines + ["", "![curation](curation.png)", ""]


def reward_hacking(exp: ExperimentResults, out: Path) -> list[str]:
    lines = ["## Reward hacking: object size with and without MRC's box normalisation", "", exp.provenance(), ""]
    if not exp.complete:
        return lines + exp.missing()
    record = {}
    shrink_path = exp.dir / "shrink_attack.json"  # the prepare step: MRC of shrunk ground-truth scenes
    shrink = json.loads(shrink_path.read_text()) if shrink_path.is_file() else None
    plt = _plt()
    fig, axes = plt.subplots(1, 3 if shrink else 2, figsize=(15 if shrink else 10, 3.2))
    for name, run in exp.runs.items():
        e, size = run.curve("object_size_mean")
        e2, reward = run.curve("reward_mean")
        axes[0].plot(e, size, marker="o", label=name)
        axes[1].plot(e2, reward, marker="o", label=name)
        record[name] = {"box_normalize": run.config["reward"]["box_normalize"],
                        "object_size": [float(x) for x in size], "reward": [float(x) for x in reward],
                        "eval_object_size": {t: s.get("object_size_mean") for t, s in run.evals.items()},
                        "eval_mrc": {t: s["mrc_mean"] for t, s in run.evals.items()}}
    axes[0].set_title("object size (foreground share of the views)")
    axes[1].set_title("train reward (what the policy optimises)")
    for ax in axes[:2]:
        ax.set_xlabel("epoch")
        ax.legend()
    if shrink:
        for name in ("box", "no_box"):
            axes[2].errorbar(shrink["object_size"], shrink[name]["penalty"], yerr=shrink[name]["penalty_se"],
                             marker="o", label=name)
        axes[2].set_title(f"-reward of shrunk ground-truth scenes ({shrink['prompts']} test prompts)")
        axes[2].set_xlabel("object size (scene scaled by 1 ... 0.12)")
        axes[2].set_ylabel("-reward (lower = more reward)")
        axes[2].legend()
        record["shrink_attack"] = shrink
    fig.tight_layout()
    fig.savefig(out / "reward_hacking.png", dpi=110)
    plt.close(fig)
    (out / "reward_hacking.json").write_text(json.dumps(record, indent=2))
    lines += ["| reward | train object size, first epoch | last epoch | held-out object size start -> end | "
              "held-out MRC start -> end |", "|---|---|---|---|---|"]
    for name, r in ((n, r) for n, r in record.items() if n in exp.runs):
        size = r["eval_object_size"]
        lines.append(f"| {name} | {r['object_size'][0]:.4f} | {r['object_size'][-1]:.4f} | "
                     f"{_fmt(size.get('start'))} -> {_fmt(size.get('end'))} | "
                     f"{_fmt(r['eval_mrc'].get('start'))} -> {_fmt(r['eval_mrc'].get('end'))} |")
    if {"box", "no_box"} <= set(record):
        # Both runs sample the same prompts and seeds every epoch: their difference is paired.
        diff = np.array(record["no_box"]["object_size"]) - np.array(record["box"]["object_size"])
        record["object_size_difference_no_box_minus_box"] = diff.tolist()
        lines += ["", "Both runs sample the same prompts and seeds in every epoch, so their train object sizes "
                  "pair up. no_box - box per epoch: " + ", ".join(f"{d:+.4f}" for d in diff) +
                  f" ({int((diff[1:] < 0).sum())} of {len(diff) - 1} updated epochs smaller without the box)."]
    if shrink:
        lines += ["", f"The incentive itself (`python -m experiments.shrink_attack`, {shrink['prompts']} held-out "
                  "ground-truth scenes rendered with the whole scene scaled about the origin: smaller, still "
                  "perfectly consistent objects; mean -reward ± standard error):", "",
                  "| scene scale | object size | -reward with box (MRC) | -reward without box (whole-view LPIPS) |",
                  "|---|---|---|---|"]
        for i, scale in enumerate(shrink["scales"]):
            lines.append(f"| {scale:.2f} | {shrink['object_size'][i]:.3f} | "
                         f"{_fmt(shrink['box']['penalty'][i])} ± {_fmt(shrink['box']['penalty_se'][i])} | "
                         f"{_fmt(shrink['no_box']['penalty'][i])} ± {_fmt(shrink['no_box']['penalty_se'][i])} |")
    return lines + ["", "![reward hacking](reward_hacking.png)", ""]


METHODS = {  # run -> (label, its own objective: (evaluation key, +1 higher is better / -1 lower))
    "carve3d": ("Carve3D (DDPO-SF + KL)", ("mrc", -1)),
    "mvc-zigal": ("MVC-ZigAL", ("alignment", +1)),
    "nabla-gfn": ("Nabla-GFlowNet", ("mrc", -1)),
}


def methods(exp: ExperimentResults, out: Path) -> list[str]:
    lines = ["## Alignment methods: Carve3D vs MVC-ZigAL vs Nabla-GFlowNet (few-step MiniCarve)", "",
             exp.provenance(), ""]
    base = exp.evaluation("base")
    if base is None or not all(exp.evaluation(n) for n in [*METHODS, "base-zmv"]):
        return lines + exp.missing()
    keys = ("mrc", "mrc_sem", "alignment", "alignment_sem", "kl", "diversity")
    record = {row: {**{k: exp.evaluation(row).get(k) for k in keys}, "samples": 0, "wall_seconds": 0.0}
              for row in ("base", "base-zmv")}
    for name in METHODS:
        s, run = exp.evaluation(name), exp.runs[name]
        paired = run.config.get("train", {}).get("algorithm", "").endswith("zigal")
        samples = int(sum(r.get("num_samples", 0) for r in run.rows))
        record[name] = {**{k: s.get(k) for k in ("mrc", "mrc_sem", "alignment", "alignment_sem", "kl", "diversity")},
                        "samples": samples, "images_rewarded": samples * (2 if paired else 1),
                        "wall_seconds": run.wall_seconds, "epochs": len(run.rows)}
    for name, r in record.items():  # paired with the base: the same prompts and noise seeds
        if name != "base":
            r["paired_vs_base"] = exp.paired_difference(name, "base")
    (out / "methods.json").write_text(json.dumps(record, indent=2))
    lines += ["| method | own objective vs base (paired) | test MRC (lower better) | alignment | KL to base | "
              "diversity | samples (images rewarded) | wall time |", "|---|---|---|---|---|---|---|---|"]
    for name, r in record.items():
        label, objective = METHODS.get(name, (f"{name} (sft-short, 4 steps{', ZMV-Sampling' if 'zmv' in name else ''})",
                                              None))
        verdict = "-"
        if objective:
            key, sign = objective
            diff, sem = r["paired_vs_base"][key], r["paired_vs_base"][key + "_sem"]
            better = sign * diff > 0
            verdict = (f"{key} {diff:+.5f} ± {sem:.5f}: {'better' if better else 'worse'}"
                       f"{'' if abs(diff) > 2 * sem else ', within noise'}")
        used = f"{r['samples']} ({r['images_rewarded']})" if "images_rewarded" in r else "-"
        wall = f"{r['wall_seconds'] / 60:.1f} min" if r["wall_seconds"] else "-"
        lines.append(f"| {label} | {verdict} | {r['mrc']:.5f} ± {r['mrc_sem']:.5f} | {r['alignment']:.3f} ± "
                     f"{r['alignment_sem']:.3f} | {r['kl']:.2e} | {_fmt(r.get('diversity'), 4)} | {used} | {wall} |")
    lines += ["", f"{base['num_prompts']} held-out test prompts x {exp.spec.evaluation['samples']} seeds, the same "
              "noise for every row (± standard error over samples; the objective column pairs each sample with the "
              "base's sample of the same prompt and seed, 'within noise' when under two standard errors). KL: the training metric's estimator "
              "(mean log p - log p_base over the sampled steps) on the test samples. Diversity: mean LPIPS "
              "between two seeds of one prompt.", ""]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, (label, _) in METHODS.items():
        for ax, key in zip(axes, ("mrc_mean", "alignment_mean")):
            epochs, values = exp.runs[name].eval_curve(key)
            ax.plot(epochs, values, marker="o", label=label)
    for ax, title in zip(axes, ("held-out MRC (lower is better)", "held-out alignment")):
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "methods.png", dpi=110)
    plt.close(fig)
    return lines + ["![methods](methods.png)", ""]


def suite_summary(experiments: list[ExperimentResults]) -> list[str]:
    """One row per experiment: its command, how many runs finished, its wall time; and the total,
    against the suite's budget of about 8 hours on this machine."""
    lines = ["## The suite", "", "| experiment | command | runs finished | machine | wall time |",
             "|---|---|---|---|---|"]
    for exp in experiments:
        finished = sum(r.finished for r in exp.runs.values())
        lines.append(f"| {exp.spec.title} | `{exp.command}` | {finished} of "
                     f"{len(exp.runs)} | {exp.machine if exp.record else 'not run yet'} | "
                     f"{exp.wall_seconds / 60:.1f} min |")
    total = sum(exp.wall_seconds for exp in experiments)
    lines += ["", f"In all {total / 3600:.1f} h of wall time (the budget: about 8 h on this 2-core CPU). "
              "Each experiment resumes from its checkpoints, so the suite can be spread over several "
              "sessions; the wall times add up every session's.", ""]
    return lines


def metric_sentence(experiments: list[ExperimentResults]) -> str:
    """How the page's MRC was measured, from the evaluations' own records; evaluations made with a
    random LPIPS backbone (or before the record existed) are named in bold."""
    random = [f"{exp.spec.name}/{e.name}" for exp in experiments for e in exp.spec.evaluations
              if (summary := exp.evaluation(e.name)) is not None
              and summary.get("metric", {}).get("lpips_backbone", "random") == "random"]
    sentence = ("MRC uses the shipped MiniCarve LRM and LPIPS on the ImageNet AlexNet shipped in "
                "`reward_service/weights/` (the paper's metric).")
    if random:
        sentence += (f" **{len(random)} evaluation(s) below were scored with a random AlexNet backbone** "
                     f"({', '.join(random[:6])}{' ...' if len(random) > 6 else ''}): their MRC values compare "
                     "with each other, not with the paper's, until the experiment is rerun.")
    return sentence


SECTIONS = {"table1": [table1, kl_figure], "stability": [stability], "scale": [scale], "curation": [curation],
            "reward_hacking": [reward_hacking], "methods": [methods]}


def build(root: Path, out: Path, short: bool = False, only: list[str] | None = None) -> Path:
    """Write ``out/carve3d_minicarve.md`` (and each section's files) from the runs under ``root``;
    ``only``: rebuild just these experiments' sections and suite rows inside the existing page,
    keeping the others as an earlier session wrote them (their runs may not be on this machine)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "carve3d_minicarve.md"
    unknown = sorted(set(only or []) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"error: --only {' '.join(unknown)}: not an experiment; known: {', '.join(SECTIONS)}")
    if only and not path.is_file():
        raise SystemExit(f"error: --only updates an existing {path}; build the whole page first (without --only)")
    experiments = [ExperimentResults(name, root, short) for name in (only or SECTIONS)]
    if only:
        path.write_text(replace_sections(path.read_text(), experiments, out))
        return path
    lines = ["# Carve3D's results on MiniCarve", "",
             "Generated by `python -m experiments.results` from `runs/experiments/`. Each experiment is one "
             "command, `python -m experiments.run NAME` (configs in `configs/experiments/`). " +
             metric_sentence(experiments), ""]
    lines += suite_summary(experiments)
    for exp in experiments:
        for section in SECTIONS[exp.spec.name]:
            lines += section(exp, out)
    path.write_text("\n".join(lines) + "\n")
    return path


def replace_sections(page: str, experiments: list[ExperimentResults], out: Path) -> str:
    """``page`` with the sections (``## `` headings) and suite rows of ``experiments`` rebuilt and the
    suite's total recomputed from its rows; a section the page lacks is appended."""
    chunks: list[list[str]] = [[]]
    for line in page.rstrip("\n").split("\n"):
        if line.startswith("## "):
            chunks.append([])
        chunks[-1].append(line)
    by_heading = {chunk[0]: i for i, chunk in enumerate(chunks) if chunk and chunk[0].startswith("## ")}
    for exp in experiments:
        for section in SECTIONS[exp.spec.name]:
            lines = section(exp, out)
            if lines[0] in by_heading:
                chunks[by_heading[lines[0]]] = lines
            else:
                chunks.append(lines)
                by_heading[lines[0]] = len(chunks) - 1
    if "## The suite" in by_heading:
        suite = chunks[by_heading["## The suite"]]
        new_rows = {f"`{exp.command}`": row for exp in experiments
                    for row in suite_summary([exp]) if row.startswith("| ") and f"`{exp.command}`" in row}
        suite = [next((row for command, row in new_rows.items() if line.startswith("| ") and command in line), line)
                 for line in suite]
        minutes = [float(line.rsplit("|", 2)[-2].split()[0]) for line in suite
                   if line.startswith("| ") and line.rstrip().endswith("min |")]
        suite = [f"In all {sum(minutes) / 60:.1f} h" + line.split(" h", 1)[1] if line.startswith("In all ") else line
                 for line in suite]
        chunks[by_heading["## The suite"]] = suite
    return "\n".join(line for chunk in chunks for line in chunk).rstrip("\n") + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=RUNS_ROOT)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--short", action="store_true", help="read the --short runs")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="rebuild only these experiments' sections in the existing page (the others' runs "
                             "need not be on this machine)")
    args = parser.parse_args(argv)
    print(f"wrote {build(args.root, args.out, args.short, args.only)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
