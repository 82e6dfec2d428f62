"""The device check of the public-model recipe (docs/mvdream_lgm.md): full-size MVDream and LGM
with random weights (no download), one rollout batch, one MRC batch and one learner step.

    python -m bench.device_mvdream_lgm [--samples 4] [--steps 50] [--out DIR]   # a GPU, bf16
    python -m bench.device_mvdream_lgm --tiny                                   # tiny models, CPU (the suite)

Full size: MVDream's ``MultiViewUNetModel`` with its public config (867.6M parameters), SD 2.1's
VAE and text-encoder architectures (OpenCLIP-H text as the port's 23-layer CLIPTextModel), LGM
'big' (415.0M, saved and loaded through ``reward_service.lgm`` as the release is). The policy runs
in bf16 (LoRA rank 4, gradient checkpointing), LGM in fp16 as LGM runs, rendering on gsplat when it
is installed (else the plain-PyTorch splatting, which is dense and slow at LGM's 65,536 Gaussians).
Each phase is timed after one warm-up on the same inputs (``torch.cuda.synchronize`` around it) and
reports its peak GPU memory (``torch.cuda.max_memory_allocated``, reset before the phase).
Prints one JSON object and writes it to ``--out``/device_mvdream_lgm.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = ["a DSLR photo of a red chair", "a wooden rocking horse", "a ceramic teapot", "a corgi wearing a hat"]
# SD 2.1's text encoder as ashawkey/mvdream-sd2.1-diffusers stores it (OpenCLIP ViT-H/14's text tower
# without its last layer) and SD 2.x's VAE.
SD21_TEXT_ENCODER = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                         hidden_act="gelu", projection_dim=1024)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, sample_size=256, scaling_factor=0.18215)


def full_size_mvdream(workdir: Path):
    """Random full-size MVDream components (on CPU, float32), the tokenizer word-level (no download)."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from policy.models import PolicyComponents
    from policy.mvdream_unet import MultiViewUNetModel
    from policy.tokenizer import save_word_level_clip_tokenizer

    save_word_level_clip_tokenizer(workdir / "tokenizer", sorted({w for p in PROMPTS for w in p.lower().split()}))
    tokenizer = CLIPTokenizer.from_pretrained(workdir / "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **SD21_TEXT_ENCODER))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, timestep_spacing="leading")  # the port's scheduler config
    return PolicyComponents(MultiViewUNetModel(), text_encoder, tokenizer, scheduler, vae=AutoencoderKL(**SD_VAE),
                            family="mvdream")


def tiny_mvdream(workdir: Path):
    from policy.models import create_tiny_mvdream_model, load_components

    return load_components(create_tiny_mvdream_model(workdir / "tiny-mvdream", seed=0))


def timed(fn, device: torch.device, warmup: bool = True):
    """(result, seconds, peak GPU GiB) of one call of ``fn``, after one warm-up call."""
    if warmup:
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return result, seconds, peak


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU in fp32 (checks the script)")
    parser.add_argument("--samples", type=int, default=4, help="samples in the rollout batch (x 4 views)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the rollout")
    parser.add_argument("--out", default=None, help="directory for device_mvdream_lgm.json")
    args = parser.parse_args(argv)

    from actors.batches import RewardResult, RolloutBatch
    from geometry.splatting import gsplat_available
    from learner.config import TrainConfig
    from learner.trainer import Trainer
    from policy.pipeline import MultiViewPolicy
    from policy.settings import LoraSettings, SamplingSettings
    from reward_service.lgm import LGM, save_lgm
    from reward_service.rewards import MRCReward

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if not args.tiny and device.type != "cuda":
        parser.error("the full-size check needs a CUDA GPU; use --tiny to check the script on CPU")
    steps = 2 if args.tiny else args.steps
    torch.manual_seed(0)
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "size": "tiny" if args.tiny else "full",
                    "samples": args.samples, "views": 4, "ddim_steps": steps,
                    "gsplat": gsplat_available(device)}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        components = tiny_mvdream(workdir) if args.tiny else full_size_mvdream(workdir)
        report["parameters"] = {"mvdream_unet": parameters(components.unet),
                                "text_encoder": parameters(components.text_encoder),
                                "vae": parameters(components.vae)}
        policy = MultiViewPolicy(components, "lora", LoraSettings(rank=4), device=device,
                                 dtype="fp32" if args.tiny else "bf16", gradient_checkpointing=not args.tiny)
        settings = SamplingSettings(num_steps=steps, eta=1.0, guidance_scale=5.0, negative_prompt="empty")
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.samples)]
        seeds = list(range(args.samples))

        with recorded(report, "rollout"):
            trajectory, seconds, peak = timed(lambda: policy.sample(prompts, seeds, settings), device)
            report["rollout"] = {"seconds": seconds, "samples_per_s": args.samples / seconds, "peak_gib": peak,
                                 "view_size": int(trajectory.views.shape[-1])}
        if "error" in report["rollout"]:
            return finish(report, args.out)

        preset = "test" if args.tiny else "big"
        with recorded(report, "mrc"):
            lgm = LGM(preset)
            report["parameters"]["lgm"] = parameters(lgm)
            weights = save_lgm(lgm, workdir / "lgm.safetensors", dtype=None if args.tiny else torch.float16)
            del lgm
            reward = MRCReward("lgm", {"weights": str(weights), "preset": preset,
                                       "dtype": "float32" if args.tiny else "float16"}, device=str(device))
            views, cameras = trajectory.views, trajectory.cameras
            result, seconds, peak = timed(lambda: reward(views, cameras, prompts), device)
            report["mrc"] = {"seconds": seconds, "samples_per_s": args.samples / seconds, "peak_gib": peak,
                             "mrc_mean": float(np.mean(-result.rewards))}
        with recorded(report, "mrc_gradient"):  # Nabla-GFlowNet's reward gradient
            if args.tiny or report["gsplat"]:
                float_views = views.float() / 255
                _, seconds, peak = timed(lambda: reward.gradient(float_views, cameras), device)
                report["mrc_gradient"] = {"seconds": seconds, "peak_gib": peak}
            else:
                report["mrc_gradient"] = {"skipped": "without gsplat the dense splatting's autograd graph "
                                          "(65,536 Gaussians x 256^2 px x 4 views) does not fit; install gsplat"}
        with recorded(report, "gsplat_agreement"):
            report["gsplat_agreement"] = backend_agreement(device) if report["gsplat"] else {
                "skipped": "gsplat is not installed (or no CUDA): only the plain-PyTorch splatting ran"}
        reward = None
        if device.type == "cuda":
            torch.cuda.empty_cache()

        with recorded(report, "learner_step"):
            trainer = Trainer(policy, TrainConfig(learning_rate=3e-4, microbatch_size=2), settings, seed=0)
            ids = [f"s{i}" for i in range(args.samples)]
            rewards = RewardResult(ids, np.linspace(-1.0, 1.0, args.samples))
            samples = trainer.assemble([RolloutBatch.of(ids, 0, trajectory)], [rewards])
            advantages = trainer.advantages(samples)
            first = trainer.update(samples, advantages)  # the warm-up: the policy has not moved yet
            metrics, seconds, peak = timed(lambda: trainer.update(samples, advantages), device, warmup=False)
            report["learner_step"] = {"seconds": seconds, "samples": args.samples, "peak_gib": peak,
                                      "microbatch_size": 2, "loss": float(metrics["loss"]),
                                      "logprob_recompute_gap": float(first["logprob_recompute_gap"])}
    return finish(report, args.out)


def backend_agreement(device: torch.device, count: int = 2000, size: int = 64,
                      backends: tuple[str, str] = ("torch", "gsplat")) -> dict:
    """Max |gsplat - torch| over one random scene's 4 grid-rig views (images in [0, 1])."""
    from geometry.cameras import grid_rig
    from geometry.splatting import Gaussians, render_gaussians

    g = torch.Generator(device="cpu").manual_seed(0)
    gaussians = Gaussians(means=torch.rand(count, 3, generator=g) - 0.5, scales=0.01 + 0.03 * torch.rand(count, 3, generator=g),
                          rotations=torch.randn(count, 4, generator=g), opacities=torch.rand(count, generator=g),
                          colors=torch.rand(count, 3, generator=g))
    gaussians = Gaussians(*(getattr(gaussians, f).to(device) for f in ("means", "scales", "rotations", "opacities",
                                                                        "colors")))
    cameras = grid_rig().to(device)
    first, second = (render_gaussians(gaussians, cameras, size, size, backend=b)[0] for b in backends)
    difference = (second - first).abs()
    return {"gaussians": count, "size": size, "max_abs_difference": float(difference.max()),
            "mean_abs_difference": float(difference.mean())}


@contextlib.contextmanager
def recorded(report: dict, phase: str):
    """Run one phase; a failure (e.g. out of memory) is recorded under its name, and the check goes on."""
    report[phase] = {}
    try:
        yield
    except Exception as err:  # noqa: BLE001: the check reports every phase it can
        report[phase] = {"error": f"{type(err).__name__}: {err}"[:500]}


def finish(report: dict, out: str | None) -> int:
    print(json.dumps(report, indent=1))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "device_mvdream_lgm.json").write_text(json.dumps(report, indent=1) + "\n")
    return 1 if any("error" in v for v in report.values() if isinstance(v, dict)) else 0


if __name__ == "__main__":
    raise SystemExit(main())
