"""Loading multi-view diffusion models from local diffusers-format directories.

A model directory holds ``unet/``, ``text_encoder/``, ``tokenizer/`` and
``scheduler/`` (plus ``vae/`` for latent-space models and ``text_encoder_2/``,
``tokenizer_2/`` for SDXL), each saved with the component's own
``save_pretrained``: the same layout as a diffusers pipeline.  Which of the
families of ``policy/families.py`` a directory holds (``pixel-grid``, ``sd-grid``,
``sdxl-grid``, ``mvdream``) is read from that layout.  Nothing is ever fetched from a hub.
An mvdream directory is the layout of the diffusers port ``ashawkey/mvdream-sd2.1-diffusers``
(its UNet loads into ``policy.mvdream_unet.MultiViewUNetModel``; its ``image_encoder/`` and
``feature_extractor/``, ImageDream's, are not loaded).

:func:`create_tiny_model` (pixel-grid), :func:`create_tiny_sd_model`,
:func:`create_tiny_sdxl_model` and :func:`create_tiny_mvdream_model` write small randomly
initialised models in exactly this layout, so tests and toy runs go through the loader that
real models use.
Components load in float32; the policy casts the frozen ones to ``model.dtype``.
"""



from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from policy.families import AUTO, check_family
from policy.tokenizer import save_word_level_clip_tokenizer

REQUIRED_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")
BUILTIN_PREFIX = "builtin:"
DEFAULT_CACHE = Path.home() / ".cache" / "carve3d"
TINY_MODEL_VERSION = 3  # bump when create_tiny_model changes, so stale caches are not reused
TINY_LATENT_MODEL_VERSION = 1  # the same for create_tiny_sd_model / create_tiny_sdxl_model
TINY_MVDREAM_MODEL_VERSION = 1  # the same for create_tiny_mvdream_model
# builtin:tiny[-sd|-sdxl|-mvdream][-SEED]
_BUILTIN = re.compile(r"tiny(?:-(sd|sdxl|mvdream))?(?:-(\d+))?")


@dataclass
class PolicyComponents:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    vae: torch.nn.Module | None = None
    path: str = ""
    # sdxl-grid only: CLIPTextModelWithProjection and its tokenizer
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None
    family: str = "pixel-grid"


def resolve_model_path(path: str, cache_dir: str | Path | None = None) -> Path:
    """Map ``builtin:tiny[-sd|-sdxl|-mvdream][-SEED]`` to a cached directory, creating it once."""
    if not path.startswith(BUILTIN_PREFIX):
        # A relative path is looked up in the working directory, then in the project
        # (so the shipped minicarve/weights/... work from anywhere).
        candidate = Path(path).expanduser()
        if candidate.is_absolute() or candidate.exists():
            return candidate
        return Path(__file__).resolve().parents[1] / candidate
    name = path[len(BUILTIN_PREFIX):]
    match = _BUILTIN.fullmatch(name)
    if match is None:
        raise ValueError(f"unknown built-in model {path!r}; the built-ins are 'builtin:tiny' (pixel-grid), "
                         "'builtin:tiny-sd' (sd-grid), 'builtin:tiny-sdxl' (sdxl-grid) and 'builtin:tiny-mvdream' "
                         "(mvdream), each optionally with '-SEED'; other models load from a local directory")
    kind, seed = match.group(1), int(match.group(2) or 0)
    cache = Path(cache_dir or DEFAULT_CACHE)
    if kind is None:
        target, create = cache / f"tiny-random-v{TINY_MODEL_VERSION}-seed{seed}", create_tiny_model
    elif kind == "mvdream":
        target = cache / f"tiny-mvdream-random-v{TINY_MVDREAM_MODEL_VERSION}-seed{seed}"
        create = create_tiny_mvdream_model
    else:
        target = cache / f"tiny-{kind}-random-v{TINY_LATENT_MODEL_VERSION}-seed{seed}"
        create = create_tiny_sd_model if kind == "sd" else create_tiny_sdxl_model
    if not (target / "model_index.json").exists():
        create(target, seed=seed)
    return target


def check_model_dir(path: Path, family: str = AUTO) -> str:
    """Fail early, with the fix, when a model directory is missing, incomplete or of
    another family than ``family``; returns the directory's family."""
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
    return check_family(path, family)


def prompt_truncation_warning(root: Path, prompts: list[str], source: str) -> str | None:
    """The text encoders read at most ``model_max_length`` tokens (CLIP: 77) and the policy
    drops the rest without a word (``truncation=True``): say which prompts lose words."""
    from transformers import CLIPTokenizer

    prompts = list(dict.fromkeys(prompts))
    for sub in ("tokenizer", "tokenizer_2"):  # SDXL's second encoder has its own limit
        if not (root / sub).is_dir():
            continue
        tokenizer = CLIPTokenizer.from_pretrained(root / sub, local_files_only=True)
        limit = tokenizer.model_max_length
        lengths = [len(ids) for ids in tokenizer(prompts, verbose=False).input_ids]
        long = [(i, n) for i, n in enumerate(lengths) if n > limit]
        if long:
            index, tokens = max(long, key=lambda item: item[1])
            return (f"{len(long)} of {len(prompts)} prompts in {source} are longer than the text encoder's {limit} "
                    f"tokens and are cut to that length (the longest: prompt {index + 1}, {len(prompts[index]):,} "
                    f"characters, {tokens:,} tokens); shorten them to keep every word")
    return None


def load_components(path: str | Path, cache_dir: str | Path | None = None, family: str = AUTO) -> PolicyComponents:
    """Load every component from a local directory with ``from_pretrained`` (offline, float32).

    ``family`` (``auto`` or one of ``policy.families.FAMILIES``) must match the directory."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    # Per-file progress bars from every actor would drown the per-epoch lines.
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    root = resolve_model_path(str(path), cache_dir)
    family = check_model_dir(root, family)
    if family == "mvdream":
        from policy.mvdream_unet import MultiViewUNetModel as unet_class
    else:
        unet_class = UNet2DConditionModel
    components = PolicyComponents(
        unet=unet_class.from_pretrained(root / "unet", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
        # The policy is a DDIM sampler whatever the model was trained with.
        scheduler=DDIMScheduler.from_pretrained(root / "scheduler", local_files_only=True),
        path=str(root),
        family=family,
    )
    if family != "pixel-grid":
        components.vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True)
    if family == "sdxl-grid":
        components.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            root / "text_encoder_2", local_files_only=True)
        components.tokenizer_2 = CLIPTokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True)
    return components


_INDEX = {
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
}


# The port's model_index.json (its pipeline_mvdream.py's MVDreamPipeline; the UNet class is the
# remote code unet/mv_unet.py there, which is not written here); ImageDream's parts left empty.
_MVDREAM_INDEX = {"_class_name": "MVDreamPipeline", "feature_extractor": [None, None],
                  "image_encoder": [None, None], "requires_safety_checker": False,
                  "unet": ["mv_unet", "MultiViewUNetModel"]}


def save_components(components: PolicyComponents, path: str | Path) -> None:
    path = Path(path)
    mvdream = components.family == "mvdream"
    index = {"_class_name": "MVDreamPipeline"} if mvdream else {
        "_class_name": "Carve3DMultiViewModel", "family": components.family}
    for name, entry in _INDEX.items():
        part = getattr(components, name)
        if part is not None:
            part.save_pretrained(path / name)
            index[name] = entry
    if mvdream:
        index = dict(sorted({**index, **_MVDREAM_INDEX}.items()))
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


def _write_model(path: str | Path, build: Callable[[Path], PolicyComponents]) -> Path:
    """Save ``build(tmp)`` under a temporary name and rename it, so a half-written model is
    never loaded and two processes creating the same model do not collide."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_components(build(tmp), tmp)
    try:
        tmp.rename(path)
    except OSError:  # somebody else finished first
        if not (path / "model_index.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _tiny_tokenizer_and_text_encoder(directory: Path, words: list[str] | None, hidden_size: int,
                                     projection_dim: int | None = None):
    """A word-level CLIP tokenizer saved in ``directory`` and a random 2-layer CLIP text
    encoder (with a text projection when ``projection_dim`` is given)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    save_word_level_clip_tokenizer(directory, _bundled_prompt_words() if words is None else words)
    tokenizer = CLIPTokenizer.from_pretrained(directory)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **({"projection_dim": projection_dim} if projection_dim else {}),
    )
    return tokenizer, (CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config))


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

    def build(tmp: Path) -> PolicyComponents:
        torch.manual_seed(seed)
        tokenizer, text_encoder = _tiny_tokenizer_and_text_encoder(tmp / "tokenizer", words, hidden_size=32)
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
        return PolicyComponents(unet, text_encoder, tokenizer, scheduler, family="pixel-grid")

    return _write_model(path, build)


def create_tiny_sd_model(path: str | Path, seed: int = 0, grid_size: int = 64,
                         words: list[str] | None = None) -> Path:
    """Write a tiny random Stable-Diffusion-layout (sd-grid) model: a 4-channel latent UNet
    (``grid_size / 8`` latents), a tiny VAE (x8), one CLIP text encoder."""
    return _create_tiny_latent_model(path, "sd-grid", seed, grid_size, words)


def create_tiny_sdxl_model(path: str | Path, seed: int = 0, grid_size: int = 64,
                           words: list[str] | None = None) -> Path:
    """Write a tiny random SDXL-layout (sdxl-grid) model: a latent UNet with SDXL's
    ``text_time`` conditioning, a tiny VAE (x8, ``force_upcast``), two CLIP text encoders."""
    return _create_tiny_latent_model(path, "sdxl-grid", seed, grid_size, words)


def _create_tiny_latent_model(path, family: str, seed: int, grid_size: int, words) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    if grid_size % 16:
        raise ValueError(f"grid_size must be a multiple of 16 (8 px per latent, an even latent), got {grid_size}")
    sdxl = family == "sdxl-grid"

    def build(tmp: Path) -> PolicyComponents:
        torch.manual_seed(seed)
        hidden = 16
        tokenizer, text_encoder = _tiny_tokenizer_and_text_encoder(tmp / "tokenizer", words, hidden)
        tokenizer_2 = text_encoder_2 = None
        extra = {}
        if sdxl:
            projection_dim, time_embed_dim = 8, 4
            tokenizer_2, text_encoder_2 = _tiny_tokenizer_and_text_encoder(
                tmp / "tokenizer_2", words, hidden, projection_dim=projection_dim)
            # SDXL: pooled text embeds of text_encoder_2 + 6 micro-conditioning time ids.
            extra = dict(addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
                         projection_class_embeddings_input_dim=projection_dim + 6 * time_embed_dim,
                         use_linear_projection=True)
        unet = UNet2DConditionModel(
            sample_size=grid_size // 8, in_channels=4, out_channels=4,
            block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            # SDXL's cross-attention sees both encoders' hidden states, concatenated.
            cross_attention_dim=2 * hidden if sdxl else hidden, attention_head_dim=2, **extra,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=8, sample_size=grid_size,
            # SD's and SDXL's latent scales; SDXL's VAE overflows in fp16, hence force_upcast.
            scaling_factor=0.13025 if sdxl else 0.18215, force_upcast=sdxl,
        )
        # SD/SDXL's noise schedule and epsilon prediction (see create_tiny_model for "trailing").
        scheduler = DDIMScheduler(
            num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing",
        )
        return PolicyComponents(unet, text_encoder, tokenizer, scheduler, vae=vae, text_encoder_2=text_encoder_2,
                                tokenizer_2=tokenizer_2, family=family)

    return _write_model(path, build)


def create_tiny_mvdream_model(path: str | Path, seed: int = 0, view_size: int = 32,
                              words: list[str] | None = None) -> Path:
    """Write a tiny random MVDream-layout (mvdream) model: a ``MultiViewUNetModel`` with 32
    channels (GroupNorm needs multiples of 32) on ``view_size / 4`` latents, a tiny VAE (x4),
    one CLIP text encoder, in the layout of ``ashawkey/mvdream-sd2.1-diffusers``."""
    from diffusers import AutoencoderKL, DDIMScheduler

    from policy.mvdream_unet import MultiViewUNetModel

    if view_size % 8:
        raise ValueError(f"view_size must be a multiple of 8 (4 px per latent, an even latent), got {view_size}")

    def build(tmp: Path) -> PolicyComponents:
        torch.manual_seed(seed)
        hidden = 16
        tokenizer, text_encoder = _tiny_tokenizer_and_text_encoder(tmp / "tokenizer", words, hidden)
        unet = MultiViewUNetModel(
            image_size=view_size // 4, in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2),
            num_res_blocks=1, attention_resolutions=(1, 2), num_head_channels=16, transformer_depth=1,
            context_dim=hidden, camera_dim=16,
        )
        # MVDream starts some layers at zero (as a from-scratch UNet would); a random model whose
        # output layer is zero predicts eps = 0 and passes no gradient to its other layers.
        with torch.no_grad():
            for module in unet.modules():
                if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and not module.weight.any():
                    module.reset_parameters()
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8),
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1, norm_num_groups=8, sample_size=view_size, scaling_factor=0.18215,
        )
        # SD 2.1's noise schedule and epsilon prediction, as the port's; "trailing" as create_tiny_model.
        scheduler = DDIMScheduler(
            num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing",
        )
        return PolicyComponents(unet, text_encoder, tokenizer, scheduler, vae=vae, family="mvdream")

    return _write_model(path, build)


def _bundled_prompt_words() -> list[str]:
    prompts = Path(__file__).resolve().parents[1] / "data" / "dreamfusion_prompts.txt"
    text = prompts.read_text().lower() if prompts.exists() else ""
    return sorted({w.strip(".,'\"!?()") for w in text.split()} - {""})
