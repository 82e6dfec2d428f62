"""Train MiniCarve's VAE: the latent space of the v2 base models (``sd-grid`` family).

    python -m minicarve.train_vae                 # from scratch or from the last state
    python -m minicarve.train_vae --steps 6000    # continue further
    python -m minicarve.train_vae --evaluate      # test grids' MRC and alignment before/after the VAE

A small diffusers ``AutoencoderKL`` (x4: a 64 px grid <-> a 16x16x4 latent) trained on renders of
the train split only.  The loss is the reconstruction error plus a small KL to N(0, I); on the
white background it is one-sided (``relu(1 - x_hat)^2``): the decoder may overshoot white, which
the clamp to [0, 1] turns back into exact white, so the background stays free of near-white
speckle that would stretch MRC's reference foreground box.  The exported VAE's
``scaling_factor`` is 1 / std of the train latents (Stable Diffusion's convention), so the UNet
sees unit-variance latents.  The run directory holds a resumable state.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minicarve.dataset import PROJECT_ROOT, rendered_grids, split
from minicarve.training_state import load_training_state, save_training_state

VAE_DIR = PROJECT_ROOT / "minicarve" / "weights" / "vae"
WHITE = 1.0


def vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                block_out_channels=(16, 32, 64), sample_size=64, mid_block_add_attention=False)


def create_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**vae_config())


def reconstruction_loss(decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error in [0, 1]; where the target is pure white only falling below white counts."""
    white = (target >= WHITE).all(dim=1, keepdim=True)
    error = torch.where(white, F.relu(WHITE - decoded), decoded - target)
    return error.pow(2).mean()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--run-dir", type=Path, default=PROJECT_ROOT / "runs" / "minicarve" / "vae-seed0")
    parser.add_argument("--out", type=Path, default=VAE_DIR)
    parser.add_argument("--evaluate", action="store_true",
                        help="only score the ground-truth test grids before and after encode/decode with --out")
    parser.add_argument("--num-prompts", type=int, default=64, help="--evaluate: the first N test prompts")
    return parser.parse_args(argv)


@torch.no_grad()
def encode_grids(vae, grids: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """uint8 grids ``[N, 3, H, W]`` -> the VAE's posterior means (unscaled latents)."""
    return torch.cat([vae.encode(chunk.float() / 127.5 - 1).latent_dist.mean for chunk in grids.split(batch)])


@torch.no_grad()
def round_trip(vae, grids: torch.Tensor) -> torch.Tensor:
    """uint8 grids ``[N, 3, H, W]`` through encode (posterior mean) and decode, as uint8."""
    decoded = torch.cat([vae.decode(z).sample for z in encode_grids(vae, grids).split(64)])
    return ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def ground_truth_through_vae(prompts: list[str]):
    """``learner.evaluate --model ground-truth-vae``: the scenes' renders after the shipped VAE's
    round trip (the ground truth as v2's latent space represents it), views ``[N, 4, 3, h, w]``
    uint8 and the rig."""
    from diffusers import AutoencoderKL

    from minicarve.base_model import VAE_DIR
    from minicarve.dataset import ground_truth_views
    from policy.grid import grid_to_views, views_to_grid

    views, cameras = ground_truth_views(prompts)
    decoded = round_trip(AutoencoderKL.from_pretrained(VAE_DIR).eval(), views_to_grid(torch.from_numpy(views)))
    return grid_to_views(decoded).numpy(), cameras


def evaluate_vae(vae_dir: Path, num_prompts: int) -> dict:
    """MRC (the default reward settings) and alignment of the ground-truth test grids, as rendered
    and after the VAE's round trip, with the paired difference and the pixel error."""
    import numpy as np
    from diffusers import AutoencoderKL

    import minicarve.plugin  # noqa: F401  (RewardConfig()'s lrm and minicarve)
    from learner.config import PromptsConfig, RewardConfig, load_prompts
    from learner.evaluate import mean_and_sem, score_views
    from minicarve.base_table import opening_changed_share
    from minicarve.dataset import TEST_PROMPTS, ground_truth_views
    from policy.grid import grid_to_views, views_to_grid

    prompts = load_prompts(PromptsConfig(file=str(TEST_PROMPTS), limit=num_prompts))
    views, cameras = ground_truth_views(prompts)
    rendered = views_to_grid(torch.from_numpy(views))  # the VAE works on the grid image
    decoded = round_trip(AutoencoderKL.from_pretrained(vae_dir).eval(), rendered)
    out = {"num_prompts": len(prompts),
           "pixel_mae": float((decoded.float() - rendered.float()).abs().mean() / 255)}
    scores = {}
    for name, grids in (("rendered", rendered), ("vae", decoded)):
        views = grid_to_views(grids).numpy()
        mrc, alignment, _, _ = score_views(views, cameras, prompts, RewardConfig())
        scores[name] = (mrc, alignment)
        out[name] = {"mrc": mean_and_sem(mrc), "alignment": mean_and_sem(alignment),
                     "opening_changes_box": opening_changed_share(views)}
    for index, key in enumerate(("mrc", "alignment")):
        difference = scores["vae"][index] - scores["rendered"][index]
        out[f"{key}_change"] = [float(difference.mean()), float(difference.std(ddof=1) / np.sqrt(len(difference)))]
    return out


class VAETrainer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.vae = create_vae(args.seed)
        self.optimizer = torch.optim.AdamW(self.vae.parameters(), lr=args.lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(args.seed)
        self.step = 0

    def train_step(self, grids: torch.Tensor) -> tuple[float, float]:
        lr = self.args.lr * min(1.0, (self.step + 1) / 100) * (0.1 + 0.9 * max(0.0, 1 - self.step / self.args.steps))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x = grids.float() / 255.0
        posterior = self.vae.encode(x * 2 - 1).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=self.generator)
        decoded = (self.vae.decode(z).sample + 1) / 2
        recon = reconstruction_loss(decoded, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = recon + self.args.kl_weight * kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        return recon.item(), kl.item()

    def state_path(self) -> Path:
        return self.args.run_dir / "state.pt"

    def save_state(self) -> None:
        save_training_state(self.state_path(), self.step, {"vae": self.vae}, self.optimizer, self.generator)

    def load_state(self) -> bool:
        step = load_training_state(self.state_path(), {"vae": self.vae}, self.optimizer, self.generator)
        self.step = step or 0
        return step is not None

    def latent_std(self, grids: torch.Tensor) -> float:
        return float(encode_grids(self.vae, grids).std())

    def export(self, grids: torch.Tensor, seconds: float) -> None:
        self.vae.register_to_config(scaling_factor=1.0 / self.latent_std(grids[:2000]))
        tmp = self.args.out.with_name(self.args.out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        self.vae.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps({
            "steps": self.step, "batch_size": self.args.batch_size, "lr": self.args.lr,
            "kl_weight": self.args.kl_weight, "seed": self.args.seed, "train_grids": len(grids),
            "seconds_this_run": round(seconds), "scaling_factor": self.vae.config.scaling_factor,
            "command": "python -m minicarve.train_vae " + " ".join(sys.argv[1:]),
        }, indent=2))
        shutil.rmtree(self.args.out, ignore_errors=True)
        tmp.rename(self.args.out)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.evaluate:
        result = evaluate_vae(args.out, args.num_prompts)
        print(json.dumps(result, indent=2))
        (args.out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0
    args.run_dir.mkdir(parents=True, exist_ok=True)
    grids = rendered_grids(split()[0], "train")
    trainer = VAETrainer(args)
    if trainer.load_state():
        print(f"resumed {args.run_dir} at step {trainer.step}", flush=True)
    params = sum(p.numel() for p in trainer.vae.parameters())
    print(f"training the VAE ({params / 1e6:.2f}M parameters) on {len(grids)} train grids, steps "
          f"{trainer.step} -> {args.steps}", flush=True)
    start, start_step, recon, kl = time.time(), trainer.step, [], []
    while trainer.step < args.steps:
        index = torch.randint(0, len(grids), (args.batch_size,), generator=trainer.generator)
        r, k = trainer.train_step(grids[index])
        recon.append(r)
        kl.append(k)
        if trainer.step % 50 == 0:
            rate = (trainer.step - start_step) / (time.time() - start)
            print(f"step {trainer.step}/{args.steps} recon {sum(recon) / len(recon):.5f} kl "
                  f"{sum(kl) / len(kl):.3f} {rate:.2f} steps/s eta {(args.steps - trainer.step) / rate / 60:.1f} min",
                  flush=True)
            recon, kl = [], []
        if trainer.step % args.save_every == 0:
            trainer.save_state()
    trainer.save_state()
    trainer.export(grids, time.time() - start)
    print(f"exported {args.out} (scaling factor {trainer.vae.config.scaling_factor:.3f}; "
          f"{(time.time() - start) / 60:.1f} min this run)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
