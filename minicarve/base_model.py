"""The MiniCarve base model (v2): a small latent-space text-to-2x2-grid diffusion model.

Same parts as Stable Diffusion, in the same diffusers layout (the ``sd-grid`` family), loaded
by the same loader (``policy.models.load_components``): MiniCarve's VAE (``vae/``, x4: the
64x64 grid of 4 views of 32 px <-> a 16x16x4 latent, ``minicarve/train_vae.py``), a
``UNet2DConditionModel`` on that latent, a small ``CLIPTextModel``, a CLIP tokenizer whose
vocabulary is the grammar's words, and a DDIM scheduler.

Choices, and why:
* latent space: the policy's action at each step is the 16x16x4 latent (1,024 numbers)
  instead of the 64x64x3 grid (12,288), and REINFORCE's gradient noise grows with the
  action's dimension (docs/minicarve.md); every UNet call also sees 16x fewer positions;
* v-prediction with the cosine schedule and trailing spacing (zero terminal SNR, well posed
  for v); no x0 clipping, since latents are not bounded to [-1, 1];
* self-attention at 8x8 (see UNET_ARCHITECTURES): there the four views (4x4 latents each)
  exchange information; the 16x16 and 4x4 levels are convolutions only;
* conditioning dropped to a zero embedding 10% of the time, so classifier-free
  guidance with the "zero" negative prompt (Carve3D's choice) works.
"""

from __future__ import annotations

from pathlib import Path

from minicarve.scenes import COLORS, RELATIONS, SHAPES, SIZES
from minicarve.dataset import PROJECT_ROOT

WEIGHTS_DIR = PROJECT_ROOT / "minicarve" / "weights"
SFT_SHORT = WEIGHTS_DIR / "sft-short"
SFT_LONG = WEIGHTS_DIR / "sft-long"
VAE_DIR = WEIGHTS_DIR / "vae"
GRID_SIZE = 64
LATENT_SIZE = 16  # GRID_SIZE / the VAE's factor 4
TOKENIZER_MAX_LENGTH = 20  # the longest prompt is 12 words and a comma or two


def grammar_words() -> list[str]:
    words = {"a", "an", "and"} | set(SHAPES) | set(COLORS) | set(SIZES)
    for relation in RELATIONS:
        words |= set(relation.split())
    return sorted(words)


# The UNet architectures ``train_base --unet`` builds.  "fast" (the shipped base models'):
# self-attention at 8x8 only, where the four views (4x4 latents each) still exchange information,
# with 2 heads, and blocks of 32-64 channels.  "v2.0" (the shipped models' until 2026-12-07, kept
# to reproduce their figures): attention also at 16x16, diffusers' legacy 16 heads (3 channels
# each at 48), 48-96 channels; that 16x16 attention was most of its cost on a CPU, and "fast" is
# about 4x cheaper a call (bench/unet_cost.py, docs/minicarve.md).
UNET_ARCHITECTURES = {
    "fast": dict(block_out_channels=(32, 64, 64), attention_head_dim=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    "v2.0": dict(block_out_channels=(48, 96, 96), attention_head_dim=16,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
}
DEFAULT_ARCHITECTURE = "fast"


def unet_config(architecture: str = DEFAULT_ARCHITECTURE) -> dict:
    if architecture not in UNET_ARCHITECTURES:
        raise ValueError(f"unknown MiniCarve UNet architecture {architecture!r}; one of {sorted(UNET_ARCHITECTURES)}")
    return dict(sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
                cross_attention_dim=64, **UNET_ARCHITECTURES[architecture])


def scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")


def create_base_model(tokenizer_dir: str | Path, seed: int = 0, vae_dir: str | Path = VAE_DIR,
                      architecture: str = DEFAULT_ARCHITECTURE):
    """Randomly initialised unet and text encoder, the grammar's tokenizer, the scheduler, and
    MiniCarve's trained VAE (frozen: the SFT trains the UNet on its latents)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from policy.models import PolicyComponents
    from policy.tokenizer import save_word_level_clip_tokenizer

    torch.manual_seed(seed)
    save_word_level_clip_tokenizer(tokenizer_dir, grammar_words(), max_length=TOKENIZER_MAX_LENGTH)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TOKENIZER_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(**unet_config(architecture))
    if not Path(vae_dir, "config.json").is_file():
        raise FileNotFoundError(f"MiniCarve's VAE is not at {vae_dir}: train it first with python -m minicarve.train_vae")
    vae = AutoencoderKL.from_pretrained(vae_dir).requires_grad_(False).eval()
    return PolicyComponents(unet, text_encoder, tokenizer, DDIMScheduler(**scheduler_config()), vae=vae,
                            family="sd-grid")
