"""The run directory a user gets: config, metrics, pictures, checkpoints, report.

```
runs/<name>-<timestamp>/
  config.yaml                    the full resolved config
  metrics.parquet                one row per epoch
  samples/epoch_003.png          a sheet: generated grids over their re-renderings
  samples/epoch_003/<id>_grid.png, <id>_rerender.png
  plots/training_curves.png      reward, MRC, alignment, KL, loss per epoch
  eval.json                      held-out evaluation at the start and the end (MRC, alignment)
  eval_start.parquet, eval_end.parquet   its per-sample scores
  samples/eval_start.png, samples/eval_end.png   its sample sheets
  checkpoints/epoch_0003/        weights.safetensors, optimizer.safetensors, trainer_state.json
  report.md
  status.json                    finished or not, why it stopped, sessions and wall time over all sessions
```

Small files (JSON, YAML, the report) are written whole or not at all (``write_atomic``), so a
full disk or a crash leaves the previous version, never an empty file; files an earlier
session wrote are read tolerating damage (``read_json``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from learner.config import Config, to_yaml


def write_atomic(path: Path, text: str) -> None:
    """Write a small file whole or not at all: a temp file beside it, fsync, rename over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path, notes: list[str]) -> dict | None:
    """A JSON file an earlier session wrote, or None when it is missing or damaged (an empty or
    cut file, from a full disk before writes were atomic): a note says which, and the caller
    starts that bookkeeping afresh rather than fail the run."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        notes.append(f"{path.name} in {path.parent} is damaged ({err}); it is written afresh")
        return None


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[dict] = []
        self.evals: dict[str, dict] = {}  # "start" / "end" -> summary
        self.notes: list[str] = []  # damage found in files of earlier sessions, for the report
        self.session = 0  # this session's number (1 for a new run), from begin_session
        self.wall_before = 0.0  # wall seconds of the earlier sessions
        self.started = 0.0

    @classmethod
    def create(cls, config: Config) -> "RunDirectory":
        if config.run.dir:
            path = Path(config.run.dir)
            if (path / "config.yaml").exists():
                raise FileExistsError(f"run.dir={config.run.dir} already holds a run; resume it with "
                                      f"resume={config.run.dir}, or choose another run.dir")
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = Path(config.run.output_dir) / f"{config.run.name}-{stamp}"
            suffix = 1
            while path.exists():
                path = Path(config.run.output_dir) / f"{config.run.name}-{stamp}-{suffix}"
                suffix += 1
        for sub in ("samples", "plots", "checkpoints"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        write_atomic(path / "config.yaml", to_yaml(config))
        return cls(path.resolve())

    @classmethod
    def open(cls, path: str | Path) -> "RunDirectory":
        """An existing run directory (to resume it), with the metrics it has so far."""
        run_dir = cls(Path(path).resolve())
        if not (run_dir.path / "config.yaml").is_file():
            raise FileNotFoundError(f"{path} is not a run directory (no config.yaml)")
        metrics = run_dir.path / "metrics.parquet"
        if metrics.is_file():
            import pyarrow.parquet as pq

            run_dir.rows = pq.read_table(metrics).to_pylist()
        run_dir.evals = read_json(run_dir.path / "eval.json", run_dir.notes) or {}
        return run_dir

    def keep_epochs_before(self, epoch: int) -> None:
        """Drop metrics of epochs that will be run again (after a resume)."""
        self.rows = [r for r in self.rows if r["epoch"] < epoch]

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def marker_dir(self) -> str:
        return str(self.path / "faults")

    def checkpoint_dir(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:04d}"

    def log_metrics(self, row: dict) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.rows.append(row)
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        table = pa.table({k: [r.get(k) for r in self.rows] for k in keys})
        tmp = self.path / "metrics.parquet.tmp"
        pq.write_table(table, tmp)
        tmp.replace(self.path / "metrics.parquet")

    def save_eval(self, summary: dict, grids: np.ndarray, prompts: list[str], mrc: np.ndarray,
                  alignment: np.ndarray) -> None:
        """One held-out evaluation: its summary, per-sample scores and a sample sheet."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tag = summary["tag"]
        earlier = self.evals.get("end")
        if tag == "end" and earlier is not None and isinstance(earlier.get("version"), int) \
                and earlier["version"] != summary["version"]:
            self._keep_earlier_end(earlier)  # a resume that trains on past the run's first end
        self.evals[tag] = summary
        write_atomic(self.path / "eval.json", json.dumps(self.evals, indent=2))
        pq.write_table(pa.table({"prompt": prompts, "mrc": mrc, "alignment": alignment}),
                       self.path / f"eval_{tag}.parquet")
        previews = [{"grid": g, "prompt": p, "rerender": None,
                     "caption": f"MRC {m:.3f} align {a:.2f}"} for g, p, m, a in zip(grids, prompts, mrc, alignment)]
        self._sheet(previews, self.path / "samples" / f"eval_{tag}.png",
                    f"held-out evaluation ({tag}, policy v{summary['version']})", columns=8)

    @staticmethod
    def epoch_tag(version: int) -> str:
        """The tag of an evaluation of policy ``version`` made between epochs (``eval.every``)."""
        return f"epoch_{version:03d}"

    def _keep_earlier_end(self, earlier: dict) -> None:
        """File an earlier end evaluation under its policy version, as an ``eval.every`` one is."""
        kept = self.epoch_tag(earlier["version"])
        if kept in self.evals:
            return
        self.evals[kept] = dict(earlier, tag=kept)
        for old, new in ((self.path / "eval_end.parquet", self.path / f"eval_{kept}.parquet"),
                         (self.path / "samples" / "eval_end.png", self.path / "samples" / f"eval_{kept}.png")):
            if old.is_file():
                old.replace(new)

    def save_samples(self, epoch: int, previews: list[dict]) -> Path | None:
        if not previews:
            return None
        folder = self.path / "samples" / f"epoch_{epoch:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for p in previews:
            Image.fromarray(p["grid"]).save(folder / f"{_safe(p['sample_id'])}_grid.png")
            if p["rerender"] is not None:
                Image.fromarray(p["rerender"]).save(folder / f"{_safe(p['sample_id'])}_rerender.png")
        for p in previews:
            p["caption"] = f"reward {p['reward']:.3f}"
        with_rerenders = any(p["rerender"] is not None for p in previews)
        return self._sheet(previews, self.path / "samples" / f"epoch_{epoch:03d}.png",
                           f"epoch {epoch}: generated views" +
                           (" (top) and re-renderings (bottom)" if with_rerenders else ""))

    @staticmethod
    def _sheet(previews: list[dict], out: Path, title: str, columns: int | None = None) -> Path:
        """Pictures (a sample's views as one image) with their prompt and caption; each
        re-rendering, if any, below its sample."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        columns = columns or len(previews)
        pair = 2 if any(p["rerender"] is not None for p in previews) else 1
        rows = pair * math.ceil(len(previews) / columns)
        fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
        for i, p in enumerate(previews):
            row, col = pair * (i // columns), i % columns
            axes[row, col].imshow(p["grid"])
            axes[row, col].set_title(p["prompt"][:28] + "\n" + p["caption"], fontsize=7)
            if pair == 2 and p["rerender"] is not None:
                axes[row + 1, col].imshow(p["rerender"])
                axes[row + 1, col].set_title("re-rendered", fontsize=7)
        for ax in axes.flat:
            ax.axis("off")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out

    def plot_curves(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [("reward_mean", "reward (mean)"), ("mrc_mean", "MRC (mean, lower is better)"),
                  ("alignment_mean", "prompt alignment (mean)"),
                  ("kl_mean", "KL to the base model"), ("loss", "loss")]
        if any(math.isfinite(r.get("object_size_mean") or math.nan) for r in self.rows):
            panels.insert(3, ("object_size_mean", "object size (foreground share)"))
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3))
        for ax, (key, title) in zip(axes, panels):
            points = [(r["epoch"], r[key]) for r in self.rows
                      if r.get(key) is not None and math.isfinite(r[key])]
            if points:
                x, y = zip(*points)
                ax.plot(x, y, marker="o")
                if key == "reward_mean":
                    std = [r["reward_std"] for r in self.rows if math.isfinite(r.get(key, math.nan))]
                    ax.fill_between(x, np.subtract(y, std), np.add(y, std), alpha=0.2)
            else:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(title)
            ax.set_xlabel("epoch")
        fig.tight_layout()
        out = self.path / "plots" / "training_curves.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out

    def _eval_section(self) -> list[str]:
        if not self.evals:
            return []
        lines = ["", "## Held-out evaluation", "",
                 "| when | policy | samples | held-out MRC (lower is better) | alignment | seconds |",
                 "|---|---|---|---|---|---|"]
        order = ["start"] + sorted(t for t in self.evals if t.startswith("epoch_")) + ["end"]
        for tag in order:
            if tag in self.evals:
                s = self.evals[tag]
                lines.append(f"| {tag} | v{s['version']} | {s['num_prompts']} prompts x {s['samples_per_prompt']} | "
                             f"{s['mrc_mean']:.4f} ± {s['mrc_sem']:.4f} | {s['alignment_mean']:.3f} ± "
                             f"{s['alignment_sem']:.3f} | {s['seconds']:.1f} |")
        if (change := self.mrc_change_in_words()) is not None:
            lines += ["", f"**Learning:** {change}. (± is the standard error: over samples in the table, "
                          "of the paired start-to-end difference here.)"]
        lines += [""] + [f"![eval {tag}](samples/eval_{tag}.png)" for tag in ("start", "end") if tag in self.evals]
        return lines

    def mrc_change_in_words(self) -> str | None:
        """The held-out MRC change from the start to the end evaluation, paired over their
        samples (the same prompts and seeds), in words; None without both evaluations."""
        import pyarrow.parquet as pq

        from learner.evaluate import mrc_change_in_words, paired_change

        files = [self.path / f"eval_{tag}.parquet" for tag in ("start", "end")]
        if not all(f.is_file() for f in files):
            return None
        before, after = (pq.read_table(f).to_pandas() for f in files)
        if len(before) != len(after):
            return None
        words = mrc_change_in_words(before["mrc"].to_numpy(), after["mrc"].to_numpy())
        change, sem = paired_change(before["alignment"].to_numpy(), after["alignment"].to_numpy())
        if np.isfinite(change):  # the cost Carve3D's KL early stop guards against
            words += f"; alignment {100 * change:+.1f} ± {100 * sem:.1f} points"
        return words

    def begin_session(self, started: float | None = None) -> dict:
        """Count this session in ``status.json`` now, before any work: a session killed
        without a word (SIGKILL, power loss) is counted too, with its wall time up to its
        last finished epoch (``write_status`` after each).  The first write of the session:
        a read-only or full run directory fails here, before any actor starts."""
        self.started = time.perf_counter() if started is None else started  # perf_counter seconds
        before = read_json(self.path / "status.json", self.notes) or {}
        self.session = before.get("sessions", 0) + 1
        self.wall_before = before.get("wall_seconds_total", 0.0)
        return self.write_status(False, f"session {self.session} is running, or was killed before it "
                                        "could say how it ended", 0.0)

    def write_status(self, finished: bool, stop_reason: str, wall_seconds: float) -> dict:
        """``status.json``: whether the run finished, why it stopped, and the sessions and wall
        time summed over every session that worked on it (``wall_seconds``: this one's so far)."""
        status = {"finished": finished, "stop_reason": stop_reason, "sessions": self.session,
                  "wall_seconds_total": self.wall_before + wall_seconds}
        write_atomic(self.path / "status.json", json.dumps(status, indent=2))
        return status

    def status(self) -> dict:
        return read_json(self.path / "status.json", []) or {"finished": False}

    def write_report(self, config: Config, *, warnings: list[str], stop_reason: str,
                     wall_seconds: float, events: list[str] = ()) -> Path:
        lines = [f"# Run report: {self.path.name}", ""]
        if warnings:
            lines += ["## Warnings", ""] + [f"- **{w}**" for w in warnings] + [""]
        first, last = (self.rows[0], self.rows[-1]) if self.rows else ({}, {})
        lines += [
            "## Summary", "",
            f"- run directory: `{self.path}`",
            f"- model: `{config.model.path}` ({config.model.finetune}), reward: `{config.reward.kind}`",
            f"- algorithm: {config.train.algorithm}, {config.train.samples_per_epoch} samples/epoch, "
            f"{config.sampling.num_steps} DDIM steps, eta {config.sampling.eta}, CFG {config.sampling.guidance_scale}",
            f"- rollout workers: {config.rollout.num_workers}, reward workers: {config.reward.num_workers}",
            f"- epochs run: {len(self.rows)}; stopped because: {stop_reason}",
            f"- wall time: {wall_seconds:.1f} s",
            f"- reward: {first.get('reward_mean', float('nan')):.4f} (epoch 0) -> "
            f"{last.get('reward_mean', float('nan')):.4f} (last)",
            f"- MRC: {first.get('mrc_mean', float('nan')):.4f} -> {last.get('mrc_mean', float('nan')):.4f}",
            f"- KL: {first.get('kl_mean', float('nan')):.2e} -> {last.get('kl_mean', float('nan')):.2e}",
            f"- samples dropped for non-finite reward: {sum(r.get('num_dropped', 0) for r in self.rows)}",
        ]
        lines += self._eval_section()
        lines += [
            "", "## Per epoch", "",
            "| epoch | reward | MRC | alignment | KL | loss | grad norm | dropped | sample s | reward tail s | train s | sync s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['epoch']} | {r['reward_mean']:.4f} | {r['mrc_mean']:.4f} | "
                f"{r.get('alignment_mean', float('nan')):.3f} | {r['kl_mean']:.2e} | "
                f"{r.get('loss', float('nan')):.4f} | {r.get('grad_norm', float('nan')):.3f} | {r['num_dropped']} | "
                f"{r['sample_seconds']:.1f} | {r['reward_tail_seconds']:.1f} | {r['train_seconds']:.1f} | "
                f"{r['sync_seconds']:.2f} |")
        if events:
            lines += ["", "## Failures handled", ""] + [f"- {e}" for e in events]
        lines += ["", "![training curves](plots/training_curves.png)", ""]
        sheets = sorted((self.path / "samples").glob("epoch_*.png"))
        for sheet in sheets[:1] + sheets[-1:] if len(sheets) > 1 else sheets:
            lines += [f"![{sheet.stem}](samples/{sheet.name})", ""]
        lines += ["Files: `config.yaml`, `metrics.parquet`, `samples/`, `plots/`, `checkpoints/`.", ""]
        out = self.path / "report.md"
        write_atomic(out, "\n".join(lines))
        return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
