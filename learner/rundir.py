"""The run directory a user gets: config, metrics, pictures, checkpoints, report.

```
runs/<name>-<timestamp>/
  config.yaml                    the full resolved config
  metrics.parquet                one row per epoch
  samples/epoch_003.png          a sheet: generated grids over their re-renderings
  samples/epoch_003/<id>_grid.png, <id>_rerender.png
  plots/training_curves.png      reward, MRC, KL, loss per epoch
  checkpoints/epoch_0003/        weights.safetensors, optimizer.safetensors, trainer_state.json
  report.md
```
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from PIL import Image

from learner.config import Config, to_yaml


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[dict] = []

    @classmethod
    def create(cls, config: Config) -> "RunDirectory":
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(config.run.output_dir) / f"{config.run.name}-{stamp}"
        suffix = 1
        while path.exists():
            path = Path(config.run.output_dir) / f"{config.run.name}-{stamp}-{suffix}"
            suffix += 1
        for sub in ("samples", "plots", "checkpoints"):
            (path / sub).mkdir(parents=True)
        (path / "config.yaml").write_text(to_yaml(config))
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

    def save_samples(self, epoch: int, previews: list[dict]) -> Path | None:
        if not previews:
            return None
        folder = self.path / "samples" / f"epoch_{epoch:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for p in previews:
            Image.fromarray(p["grid"]).save(folder / f"{_safe(p['sample_id'])}_grid.png")
            if p["rerender"] is not None:
                Image.fromarray(p["rerender"]).save(folder / f"{_safe(p['sample_id'])}_rerender.png")
        return self._sample_sheet(epoch, previews)

    def _sample_sheet(self, epoch: int, previews: list[dict]) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = 2 if any(p["rerender"] is not None for p in previews) else 1
        fig, axes = plt.subplots(rows, len(previews), figsize=(2.2 * len(previews), 2.5 * rows),
                                 squeeze=False)
        for col, p in enumerate(previews):
            title = p["prompt"][:28] + f"\nreward {p['reward']:.3f}"
            axes[0, col].imshow(p["grid"])
            axes[0, col].set_title(title, fontsize=7)
            if rows == 2 and p["rerender"] is not None:
                axes[1, col].imshow(p["rerender"])
                axes[1, col].set_title("re-rendered", fontsize=7)
        for ax in axes.flat:
            ax.axis("off")
        fig.suptitle(f"epoch {epoch}: generated 2x2 grids" + (" (top) and re-renderings (bottom)" if rows == 2 else ""),
                     fontsize=9)
        fig.tight_layout()
        out = self.path / "samples" / f"epoch_{epoch:03d}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out

    def plot_curves(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [("reward_mean", "reward (mean)"), ("mrc_mean", "MRC (mean, lower is better)"),
                  ("kl_mean", "KL to the base model"), ("loss", "loss")]
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

    def write_report(self, config: Config, *, warnings: list[str], stop_reason: str,
                     wall_seconds: float, events: list[str] = ()) -> Path:
        lines = [f"# Run report: {self.path.name}", ""]
        if warnings:
            lines += ["## Warnings", ""] + [f"- **{w}**" for w in warnings] + [""]
        first, last = (self.rows[0], self.rows[-1]) if self.rows else ({}, {})
        lines += [
            "## Summary", "",
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
            "", "## Per epoch", "",
            "| epoch | reward | MRC | KL | loss | grad norm | dropped | sample s | reward tail s | train s | sync s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['epoch']} | {r['reward_mean']:.4f} | {r['mrc_mean']:.4f} | {r['kl_mean']:.2e} | "
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
        out.write_text("\n".join(lines))
        return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
