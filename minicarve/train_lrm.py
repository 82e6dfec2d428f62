"""Train the MiniCarve LRM (``minicarve.lrm``) and export its weights.

    python -m minicarve.train_lrm [--steps N] [--out DIR] [--seed S] [--resume]
    python -m minicarve.train_lrm --eval [--out DIR]      # MRC on held-out test scenes

Data: the first ``--scenes`` TRAIN scenes of ``minicarve.dataset.split()`` (test
scenes are never rendered for training).  For each scene, the 4 grid-rig views
(the model's input, also targets) and ``--novel`` views at random cameras
(azimuth 0-360, elevation -10..50 deg, the rig's distance and fov), so the model
must reconstruct 3D instead of copying its inputs.  Renders are cached in shards
under ``minicarve.dataset.cache_dir()`` (an interrupted render resumes shard by
shard).

Loss: MSE on a random subset of rays per scene (half uniform over all target
pixels, half drawn from foreground pixels), rendered with stratified samples.

Seeded and resumable: a checkpoint (model, optimiser, step, RNG states) is
written atomically to ``RUN_DIR/checkpoint.pt`` every ``--checkpoint-every``
steps; ``--resume`` continues from it.  Progress lines (step, loss, PSNR,
steps/s, ETA) go to stdout, so the run can go to the background.  At the end
the weights are exported to ``--out`` (default ``minicarve/weights/lrm/``).

Runs on one CPU thread by default (``--threads``): the machine is shared.  With
the defaults (1400 scenes, 1500 steps of 8 scenes x 384 rays x 24 samples) the
shipped weights took 15 min of training (1.65 steps/s on a shared 2-core CPU)
after a one-off ~9 min render of the data; ``--eval`` on 30 test scenes gave
MRC 0.0060 for consistent views vs 0.0143 with view 1's centre swapped
(random LPIPS backbone).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from minicarve import scenes as scenes_module
from minicarve.dataset import PROJECT_ROOT, VIEW_SIZE, cache_dir, split
from minicarve.lrm import LRM_WEIGHTS_DIR, LRMConfig, MiniLRM
from minicarve.scenes import Scene, render_scene
from geometry.cameras import GRID_DISTANCE, GRID_FOV_DEG, Cameras, camera_rays, grid_rig, orbit_cameras
from geometry.render import near_far_for, volume_render

RUN_DIR = PROJECT_ROOT / "runs" / "minicarve" / "lrm"
NOVEL_ELEVATION_DEG = (-10.0, 50.0)
SHARD_SIZE = 200


# --------------------------------------------------------------------------- data


def novel_cameras(rng: np.random.Generator, count: int) -> Cameras:
    """``count`` random cameras on the rig's sphere (same distance and fov), looking at the origin."""
    azimuths = rng.uniform(0.0, 360.0, count)
    elevations = rng.uniform(*NOVEL_ELEVATION_DEG, count)
    return orbit_cameras(torch.tensor(azimuths), torch.tensor(elevations), GRID_DISTANCE, GRID_FOV_DEG)


def _data_key(scenes: list[Scene], num_novel: int, size: int, seed: int) -> str:
    text = json.dumps([size, num_novel, seed, NOVEL_ELEVATION_DEG, GRID_DISTANCE, GRID_FOV_DEG,
                       [s.prompt for s in scenes], Path(scenes_module.__file__).read_text()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def render_shard(scenes: list[Scene], num_novel: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng([seed, 7])
    rig = grid_rig()
    inputs = torch.empty(len(scenes), rig.num_views, 3, size, size, dtype=torch.uint8)
    novel = torch.empty(len(scenes), num_novel, 3, size, size, dtype=torch.uint8)
    novel_c2w = torch.empty(len(scenes), num_novel, 4, 4)
    for i, scene in enumerate(scenes):
        cameras = novel_cameras(rng, num_novel)
        views = render_scene(scene, size, Cameras(torch.cat([rig.c2w, cameras.c2w]), rig.fov_deg))
        views = (views * 255).round().to(torch.uint8)
        inputs[i], novel[i], novel_c2w[i] = views[: rig.num_views], views[rig.num_views:], cameras.c2w
    return {"inputs": inputs, "novel": novel, "novel_c2w": novel_c2w}


@functools.lru_cache(maxsize=1)
def train_scenes() -> tuple[Scene, ...]:
    """The split's TRAIN scenes (the only ones the LRM is ever trained on)."""
    return tuple(split()[0])


def training_data(num_scenes: int, num_novel: int, size: int = VIEW_SIZE, seed: int = 0) -> dict[str, torch.Tensor]:
    """Cached renders of the first ``num_scenes`` train scenes: ``inputs`` uint8
    ``[N, 4, 3, s, s]`` (grid rig), ``novel`` uint8 ``[N, K, 3, s, s]`` and their
    ``novel_c2w [N, K, 4, 4]``."""
    train = train_scenes()
    if num_scenes > len(train):
        raise ValueError(f"--scenes {num_scenes} is more than the {len(train)} train scenes of the split")
    shards, start = [], time.time()
    for first in range(0, num_scenes, SHARD_SIZE):
        chunk = list(train[first: min(first + SHARD_SIZE, num_scenes)])
        key = _data_key(chunk, num_novel, size, seed + first)
        path = cache_dir() / f"lrm-train-{first}-{len(chunk)}-{key}.pt"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            shard = render_shard(chunk, num_novel, size, seed + first)
            tmp = path.with_suffix(f".partial-{os.getpid()}")
            torch.save(shard, tmp)
            tmp.rename(path)
            done = first + len(chunk)
            rate = done / (time.time() - start)
            print(f"data: rendered {done}/{num_scenes} scenes ({rate:.1f} scenes/s) -> {path.name}", flush=True)
        shards.append(torch.load(path))
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


# ------------------------------------------------------------------------ training


def sample_rays(batch: dict[str, torch.Tensor], rig: Cameras, rig_rays: tuple[torch.Tensor, torch.Tensor],
                num_rays: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per scene, ``num_rays`` rays of its target views (rig + novel): half uniform, half
    on the foreground.  Returns origins, directions ``[B, R, 3]`` and target rgb ``[B, R, 3]``."""
    size = batch["inputs"].shape[-1]
    num_scenes, num_novel = batch["novel"].shape[:2]
    novel = Cameras(batch["novel_c2w"].reshape(-1, 4, 4), rig.fov_deg)
    novel_o, novel_d = camera_rays(novel, size, size)  # [B*K, s, s, 3]
    origins = torch.cat([rig_rays[0].expand(num_scenes, -1, -1, -1, -1),
                         novel_o.reshape(num_scenes, num_novel, size, size, 3)], dim=1).reshape(num_scenes, -1, 3)
    directions = torch.cat([rig_rays[1].expand(num_scenes, -1, -1, -1, -1),
                            novel_d.reshape(num_scenes, num_novel, size, size, 3)], dim=1).reshape(num_scenes, -1, 3)
    targets = torch.cat([batch["inputs"], batch["novel"]], dim=1).float() / 255.0  # [B, V, 3, s, s]
    targets = targets.permute(0, 1, 3, 4, 2).reshape(num_scenes, -1, 3)
    foreground = (targets < 0.95).any(dim=-1).float()
    uniform = torch.randint(targets.shape[1], (num_scenes, num_rays - num_rays // 2), generator=generator)
    fg = torch.multinomial(foreground + 1e-3, num_rays // 2, replacement=True, generator=generator)
    index = torch.cat([uniform, fg], dim=1)
    pick = lambda x: torch.gather(x, 1, index[..., None].expand(-1, -1, 3))  # noqa: E731
    return pick(origins), pick(directions), pick(targets)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def save_checkpoint(path: Path, model: MiniLRM, optimizer: torch.optim.Optimizer, step: int,
                    generator: torch.Generator, args: argparse.Namespace) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
        "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
        "config": asdict(model.config), "args": vars(args),
    }
    tmp = path.with_suffix(f".partial-{os.getpid()}")
    torch.save(state, tmp)
    tmp.replace(path)


def train(args: argparse.Namespace) -> MiniLRM:
    torch.manual_seed(args.seed)
    data = training_data(args.scenes, args.novel, VIEW_SIZE, args.seed)
    num_scenes = data["inputs"].shape[0]
    config = LRMConfig(**json.loads(args.config))
    model = MiniLRM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(args.seed)
    checkpoint_path = Path(args.run_dir) / "checkpoint.pt"
    step = 0
    if args.resume:
        if not checkpoint_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}")
        state = torch.load(checkpoint_path, weights_only=False)
        if state["config"] != asdict(config):
            raise ValueError(f"--resume: the checkpoint's model config {state['config']} differs from {asdict(config)}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        print(f"resumed from {checkpoint_path} at step {step}", flush=True)
    print(f"model: {model.num_parameters():,} parameters ({model.num_parameters() * 4 / 2**20:.2f} MiB float32); "
          f"{num_scenes} train scenes x ({data['inputs'].shape[1]} rig + {data['novel'].shape[1]} novel) views; "
          f"{args.steps} steps of {args.batch} scenes x {args.rays} rays x {args.samples} samples", flush=True)

    rig = grid_rig()
    rig_rays = camera_rays(rig, VIEW_SIZE, VIEW_SIZE)
    near_far = near_far_for(rig)
    model.train()
    start, start_step, ema = time.time(), step, None
    while step < args.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        index = torch.randint(num_scenes, (args.batch,), generator=generator)
        batch = {k: v[index] for k, v in data.items()}
        views = batch["inputs"].float() / 255.0
        origins, directions, targets = sample_rays(batch, rig, rig_rays, args.rays, generator)
        field = model.field(model(views, rig))
        rgb, _ = volume_render(field, origins, directions, *near_far, args.samples, stratified_generator=generator)
        loss = (rgb - targets).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % args.log_every == 0 or step == args.steps:
            rate = (step - start_step) / (time.time() - start)
            eta = (args.steps - step) / rate
            print(f"step {step}/{args.steps} loss {loss.item():.5f} ema {ema:.5f} psnr {-10 * math.log10(ema):.2f} "
                  f"lr {optimizer.param_groups[0]['lr']:.2e} {rate:.2f} steps/s eta {eta / 60:.1f} min", flush=True)
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_checkpoint(checkpoint_path, model, optimizer, step, generator, args)
    print(f"trained {step - start_step} steps in {(time.time() - start) / 60:.1f} min", flush=True)
    model.eval()
    out = model.save_pretrained(args.out)
    size = (out / "model.safetensors").stat().st_size
    print(f"exported {out} (model.safetensors {size / 2**20:.2f} MiB)", flush=True)
    return model


# ---------------------------------------------------------------------- evaluation


def inconsistent_views(views: torch.Tensor, donors: torch.Tensor, view: int = 1) -> torch.Tensor:
    """``views [B, V, 3, s, s]`` with the central half-size square of ``view`` replaced by
    the same region of ``donors [B, V, 3, s, s]`` (another scene's views)."""
    size = views.shape[-1]
    lo, hi = size // 4, size // 4 + size // 2
    out = views.clone()
    out[:, view, :, lo:hi, lo:hi] = donors[:, view, :, lo:hi, lo:hi]
    return out


def evaluate(weights: str | Path, num_scenes: int = 30, batch: int = 10) -> dict[str, float]:
    """MRC (LRM re-render + LPIPS in the foreground box) on the first ``num_scenes``
    held-out TEST scenes, for their consistent grid-rig views and for views whose
    view 1 has its centre replaced by another test scene's."""
    from minicarve.lrm import LRMReconstructor
    from reward_service.mrc import MRCScorer

    _, test = split()
    rig = grid_rig()
    views = torch.stack([render_scene(s, VIEW_SIZE, rig) for s in test[:num_scenes]])
    donors = views.roll(1, dims=0)
    broken = inconsistent_views(views, donors)
    scorer = MRCScorer(LRMReconstructor(weights))
    results: dict[str, list[torch.Tensor]] = {"consistent": [], "inconsistent": [], "psnr": []}
    for first in range(0, num_scenes, batch):
        chunk = slice(first, first + batch)
        good = scorer.score_views(views[chunk], rig)
        results["consistent"].append(good.mrc)
        results["inconsistent"].append(scorer.score_views(broken[chunk], rig).mrc)
        mse = (good.rerenders - views[chunk]).pow(2).flatten(1).mean(dim=1)
        results["psnr"].append(-10 * torch.log10(mse))
    summary = {k: float(torch.cat(v).mean()) for k, v in results.items()}
    wins = (torch.cat(results["consistent"]) < torch.cat(results["inconsistent"])).float().mean()
    summary["fraction_consistent_lower"] = float(wins)
    summary["num_scenes"] = num_scenes
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m minicarve.train_lrm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", default=str(LRM_WEIGHTS_DIR), help="where the final weights are exported")
    parser.add_argument("--run-dir", default=str(RUN_DIR), help="checkpoints go here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    parser.add_argument("--scenes", type=int, default=1400, help="train scenes to render and train on")
    parser.add_argument("--novel", type=int, default=4, help="random-camera target views per scene")
    parser.add_argument("--batch", type=int, default=8, help="scenes per step")
    parser.add_argument("--rays", type=int, default=384, help="target rays per scene per step")
    parser.add_argument("--samples", type=int, default=24, help="ray samples during training")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--config", default="{}", help="JSON overrides of LRMConfig")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--data-only", action="store_true", help="render and cache the training data, then stop")
    parser.add_argument("--eval", action="store_true", help="evaluate the weights in --out on test scenes and stop")
    parser.add_argument("--eval-scenes", type=int, default=30)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.eval:
        print(json.dumps(evaluate(args.out, args.eval_scenes), indent=2))
        return 0
    if args.data_only:
        data = training_data(args.scenes, args.novel, VIEW_SIZE, args.seed)
        print(f"data ready: {', '.join(f'{k} {tuple(v.shape)}' for k, v in data.items())}")
        return 0
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
