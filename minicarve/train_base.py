"""Train the MiniCarve base models (the SFT stage): ``sft-short`` and ``sft-long``.

One seeded run of the latent UNet on MiniCarve's VAE latents (train it first:
``python -m minicarve.train_vae``); ``sft-short`` is its EMA weights after ``--short-steps``
(the base for RL, like Instant3D-10K: recognisable, not consistent) and ``sft-long`` after
``--long-steps`` (trained longer, more consistent), both under the run directory
(``--short-out``/``--long-out`` to write them elsewhere); ``--snapshot-every N`` also exports
the EMA model every N steps under the run directory, to choose those two points by
measurement.  The shipped ``minicarve/weights/sft-{short,long}`` are this command's defaults
(750 and 2000 steps, seed 0), exported with ``--snapshot-every 250`` and copied there::

    python -m minicarve.train_base                  # both, from scratch or from the last state
    python -m minicarve.train_base --long-steps 4000  # continue an earlier run further

The run directory (``runs/minicarve/base-seed0`` by default) holds a resumable
state (weights, EMA, optimizer, data order, RNG) written every ``--save-every``
steps; running the same command again continues from it, so training can run in
the background and go on in a later session.  Data: renders of the train split
only (``minicarve.dataset``), never a test prompt.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minicarve.base_model import DEFAULT_ARCHITECTURE, SFT_LONG, SFT_SHORT, UNET_ARCHITECTURES, VAE_DIR, create_base_model
from minicarve.dataset import PROJECT_ROOT, rendered_grids, split
from minicarve.train_vae import encode_grids
from minicarve.training_state import load_training_state, save_training_state
from policy.models import PolicyComponents, save_components

COND_DROP = 0.1  # fraction of samples trained with the zero (unconditional) embedding


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short-steps", type=int, default=750)
    parser.add_argument("--long-steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--run-dir", type=Path, default=None)
    # the run directory, not the shipped weights: replacing those is a deliberate copy
    parser.add_argument("--short-out", type=Path, default=None, help="default: <run-dir>/sft-short "
                        f"(the shipped one: {SFT_SHORT.relative_to(PROJECT_ROOT)})")
    parser.add_argument("--long-out", type=Path, default=None, help="default: <run-dir>/sft-long "
                        f"(the shipped one: {SFT_LONG.relative_to(PROJECT_ROOT)})")
    parser.add_argument("--num-scenes", type=int, default=None, help="train on the first N train scenes")
    parser.add_argument("--snapshot-every", type=int, default=0, help="also export the EMA model every N steps "
                        "to <run-dir>/snapshots/step_N (0: never)")
    parser.add_argument("--vae", type=Path, default=VAE_DIR)
    parser.add_argument("--unet", choices=sorted(UNET_ARCHITECTURES), default=DEFAULT_ARCHITECTURE,
                        help="the UNet architecture (minicarve/base_model.py; default %(default)s, the shipped models')")
    args = parser.parse_args(argv)
    if not 0 < args.short_steps <= args.long_steps:
        parser.error(f"need 0 < --short-steps <= --long-steps, got {args.short_steps} and {args.long_steps}")
    architecture = "" if args.unet == DEFAULT_ARCHITECTURE else f"{args.unet}-"
    args.run_dir = args.run_dir or PROJECT_ROOT / "runs" / "minicarve" / f"base-{architecture}seed{args.seed}"
    args.short_out = args.short_out or args.run_dir / "sft-short"
    args.long_out = args.long_out or args.run_dir / "sft-long"
    return args


class BaseTrainer:
    """Everything that changes during training, and how to save and restore it."""

    def __init__(self, args: argparse.Namespace, prompts: list[str]):
        self.args = args
        self.model = create_base_model(args.run_dir / "tokenizer", seed=args.seed, vae_dir=args.vae,
                                       architecture=args.unet)
        self.ema_unet = copy.deepcopy(self.model.unet).requires_grad_(False)
        self.ema_text = copy.deepcopy(self.model.text_encoder).requires_grad_(False)
        params = list(self.model.unet.parameters()) + list(self.model.text_encoder.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
        self.generator = torch.Generator().manual_seed(args.seed)
        self.step = 0
        tokens = self.model.tokenizer(prompts, padding="max_length", truncation=True,
                                      max_length=self.model.tokenizer.model_max_length, return_tensors="pt")
        self.input_ids = tokens.input_ids

    # ---- one step -------------------------------------------------------------------
    def encode(self, grids: torch.Tensor) -> torch.Tensor:
        """uint8 grids -> the UNet's latents: the VAE posterior mean times its scaling factor."""
        return encode_grids(self.model.vae, grids) * self.model.vae.config.scaling_factor

    def loss(self, x0: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """v-prediction MSE at uniformly drawn timesteps, on latents ``x0``."""
        scheduler, g = self.model.scheduler, self.generator
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=g)
        xt = scheduler.add_noise(x0, noise, t)
        text = self.model.text_encoder(input_ids)[0]
        keep = (torch.rand(len(x0), generator=g) >= COND_DROP).float()[:, None, None]
        prediction = self.model.unet(xt, t, text * keep).sample
        return F.mse_loss(prediction, scheduler.get_velocity(x0, noise, t))

    def train_step(self, latents: torch.Tensor, input_ids: torch.Tensor) -> float:
        warmup = min(1.0, (self.step + 1) / 100)
        for group in self.optimizer.param_groups:
            group["lr"] = self.args.lr * warmup
        loss = self.loss(latents, input_ids)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], 1.0)
        self.optimizer.step()
        self.step += 1
        # EMA with a warmup so that early exports are not dominated by the random init.
        decay = min(self.args.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for live, ema in ((self.model.unet, self.ema_unet), (self.model.text_encoder, self.ema_text)):
                for p, e in zip(live.parameters(), ema.parameters()):
                    e.lerp_(p, 1 - decay)
        return loss.item()

    # ---- state ----------------------------------------------------------------------
    def state_path(self) -> Path:
        return self.args.run_dir / "state.pt"

    def _modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.model.unet, "text": self.model.text_encoder, "ema_unet": self.ema_unet,
                "ema_text": self.ema_text}

    def save_state(self) -> None:
        save_training_state(self.state_path(), self.step, self._modules(), self.optimizer, self.generator)

    def load_state(self) -> bool:
        step = load_training_state(self.state_path(), self._modules(), self.optimizer, self.generator)
        self.step = step or 0
        return step is not None

    def export(self, out: Path) -> None:
        """Write the EMA model in diffusers format (UNet and VAE in float16 to halve the shipped
        size; the loader computes in float32)."""
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        unet = copy.deepcopy(self.ema_unet).half()
        save_components(PolicyComponents(unet, self.ema_text, self.model.tokenizer, self.model.scheduler,
                                         vae=copy.deepcopy(self.model.vae).half(), family="sd-grid"), tmp)
        (tmp / "training.json").write_text(json.dumps({
            "steps": self.step, "batch_size": self.args.batch_size, "lr": self.args.lr,
            "ema_decay": self.args.ema_decay, "seed": self.args.seed, "unet": self.args.unet,
            "command": "python -m minicarve.train_base " + " ".join(sys.argv[1:]),
        }, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    train_scenes = split()[0]
    grids = rendered_grids(train_scenes, "train")[: args.num_scenes]
    train_scenes = train_scenes[: len(grids)]
    trainer = BaseTrainer(args, [s.prompt for s in train_scenes])
    latents = trainer.encode(grids)
    print(f"encoded {len(grids)} grids to latents {tuple(latents.shape[1:])} (std {latents.std():.3f})", flush=True)
    if trainer.load_state():
        print(f"resumed {args.run_dir} at step {trainer.step}", flush=True)
    print(f"training on {len(grids)} train scenes, {sum(p.numel() for p in trainer.model.unet.parameters()) / 1e6:.2f}M "
          f"UNet parameters, steps {trainer.step} -> {args.long_steps}", flush=True)
    start, start_step, losses = time.time(), trainer.step, []
    while trainer.step < args.long_steps:
        index = torch.randint(0, len(grids), (args.batch_size,), generator=trainer.generator)
        losses.append(trainer.train_step(latents[index], trainer.input_ids[index]))
        if trainer.step % 20 == 0:
            rate = (trainer.step - start_step) / (time.time() - start)
            eta = (args.long_steps - trainer.step) / rate
            print(f"step {trainer.step}/{args.long_steps} loss {sum(losses) / len(losses):.4f} "
                  f"{rate:.2f} steps/s eta {eta / 60:.1f} min", flush=True)
            losses = []
        if trainer.step % args.save_every == 0 or trainer.step in (args.short_steps, args.long_steps):
            trainer.save_state()
        if args.snapshot_every and trainer.step % args.snapshot_every == 0:
            trainer.export(args.run_dir / "snapshots" / f"step_{trainer.step}")
        if trainer.step == args.short_steps:
            trainer.export(args.short_out)
            print(f"exported {args.short_out} at step {trainer.step}", flush=True)
    trainer.export(args.long_out)
    if not args.short_out.exists():
        raise SystemExit(f"{args.short_out} was never exported; rerun from scratch with a --short-steps "
                         f"above the resumed step")
    print(f"exported {args.long_out} at step {trainer.step} ({(time.time() - start) / 60:.1f} min this run)",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
