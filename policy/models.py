"""Loading multi-view diffusion models from local diffusers-format directories.

A model directory holds ``unet/``, ``text_encoder/``, ``tokenizer/`` and
``scheduler/`` (and ``vae/`` for latent-space models), each saved with the
component's own ``save_pretrained``: the same layout as a diffusers pipeline.
Without ``vae/`` the model works in pixel space: the UNet's sample *is* the
2x2 grid image in [-1, 1].  Nothing is ever fetched from a hub.

:func:`create_tiny_model` writes a small randomly initialised model in exactly
this layout, so tests and the toy default run go through the loader that real
models use.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from policy.tokenizer import save_word_level_clip_tokenizer

REQUIRED_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")
BUILTIN_PREFIX = "builtin:"
DEFAULT_CACHE = Path.home() / ".cache" / "carve3d"
TINY_MODEL_VERSION = 3  # bump when create_tiny_model changes, so stale caches are not reused


@dataclass
class PolicyComponents:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    vae: torch.nn.Module | None = None
    path: str = ""


def resolve_model_path(path: str, cache_dir: str | Path | None = None) -> Path:
    """Map ``builtin:tiny`` (or ``builtin:tiny-<seed>``) to a cached directory, creating it once."""
    if not path.startswith(BUILTIN_PREFIX):
        # A relative path is looked up in the working directory, then in the project
        # (so the shipped minicarve/weights/... work from anywhere).
        candidate = Path(path).expanduser()
        if candidate.is_absolute() or candidate.exists():
            return candidate
        return Path(__file__).resolve().parents[1] / candidate
    name = path[len(BUILTIN_PREFIX):]
    if name != "tiny" and not name.startswith("tiny-"):
        raise ValueError(f"unknown built-in model {path!r}; the built-in is 'builtin:tiny' "
                         "(or 'builtin:tiny-SEED'); other models load from a local directory")
    seed = int(name.split("-", 1)[1]) if "-" in name else 0
    target = Path(cache_dir or DEFAULT_CACHE) / f"tiny-random-v{TINY_MODEL_VERSION}-seed{seed}"
    if not (target / "model_index.json").exists():
        create_tiny_model(target, seed=seed)
    return target


def check_model_dir(path: Path) -> None:
    """Fail early, with the fix, when a model directory is missing or incomplete."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {str(path)!r} does not exist; set model.path to a local "
            "diffusers-format directory (unet/, text_encoder/, tokenizer/, scheduler/) "
            "or to 'builtin:tiny' for the tiny random model")
    missing = [sub for sub in REQUIRED_SUBFOLDERS if not (path / sub).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"model directory {str(path)!r} lacks {', '.join(m + '/' for m in missing)}; a multi-view model "
            f"needs {', '.join(s + '/' for s in REQUIRED_SUBFOLDERS)} saved by diffusers/transformers")


def load_components(path: str | Path, cache_dir: str | Path | None = None) -> PolicyComponents:
    """Load every component from a local directory with ``from_pretrained`` (offline)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    # Per-file progress bars from every actor would drown the per-epoch lines.
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    root = resolve_model_path(str(path), cache_dir)
    check_model_dir(root)
    components = PolicyComponents(
        unet=UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
        # The policy is a DDIM sampler whatever the model was trained with.
        scheduler=DDIMScheduler.from_pretrained(root / "scheduler", local_files_only=True),
        path=str(root),
    )
    if (root / "vae").is_dir():
        components.vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True)
    return components


def save_components(components: PolicyComponents, path: str | Path) -> None:
    path = Path(path)
    for name in ("unet", "text_encoder", "tokenizer", "scheduler", "vae"):
        part = getattr(components, name)
        if part is not None:
            part.save_pretrained(path / name)
    index = {
        "_class_name": "Carve3DMultiViewModel",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    if components.vae is not None:
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


def create_tiny_model(
    path: str | Path,
    seed: int = 0,
    grid_size: int = 64,
    words: list[str] | None = None,
) -> Path:
    """Write a tiny random pixel-space text-to-2x2-grid model (about 1.1M parameters).

    Its tokenizer knows ``words`` as whole tokens (default: the words of the
    bundled DreamFusion prompts) and spells anything else letter by letter.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    # Written under a temporary name and renamed, so a half-written model is never
    # loaded and two processes creating the same model do not collide.
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    if words is None:
        words = _bundled_prompt_words()
    save_word_level_clip_tokenizer(tmp / "tokenizer", words)
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=grid_size, in_channels=3, out_channels=3,
        # Attention only at the coarsest level (16x16 for a 64 px grid): attention at
        # 32x32 made the forward pass 4x slower on a 2-core CPU.
        block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    )
    # A random UNet predicting epsilon gives x0 estimates far outside [-1, 1]: every
    # pixel saturates, the clipped x0 has no gradient, and no reward can be learned.
    # Predicting the sample with a down-scaled output layer starts from grey images
    # instead, and RL signals reach every layer.
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.zero_()
    # Stable Diffusion's noise schedule.  "trailing" spacing ends the trajectory at
    # t = T/num_steps - 1 > 0, so every step, the last included, is a proper Gaussian
    # policy with a usable sigma (the leading spacing's final t = 1 -> 0 step has a
    # sigma ~ 0.003 whose log-prob gradient is pure noise).
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type="sample", clip_sample=True, set_alpha_to_one=False, timestep_spacing="trailing",
    )
    save_components(PolicyComponents(unet, text_encoder, tokenizer, scheduler), tmp)
    try:
        tmp.rename(path)
    except OSError:  # somebody else finished first
        if not (path / "model_index.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _bundled_prompt_words() -> list[str]:
    prompts = Path(__file__).resolve().parents[1] / "data" / "dreamfusion_prompts.txt"
    text = prompts.read_text().lower() if prompts.exists() else ""
    return sorted({w.strip(".,'\"!?()") for w in text.split()} - {""})
