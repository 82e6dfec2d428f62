"""The MiniCarve base model: a small pixel-space text-to-2x2-grid diffusion model.

Same parts as a real multi-view model, in the same diffusers layout, loaded by
the same loader (``policy.models.load_components``): a ``UNet2DConditionModel``
on the 64x64 grid (4 views of 32 px), a small ``CLIPTextModel``, a CLIP
tokenizer whose vocabulary is the grammar's words, and a DDIM scheduler.

Choices, and why:
* pixel space, no VAE: 64 px grids are small enough, and a VAE would be one more
  model to train and ship;
* v-prediction with the cosine schedule and trailing spacing: the schedule of
  pixel-space models (the latent-space SD schedule leaves too much signal at
  t = T for pixels), and v-prediction stays well posed at zero terminal SNR;
* attention at 16x16 and 8x8 only: that is where the four views (each 8x8 or
  4x4 there) can exchange information, and it keeps the cost of attention small;
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
GRID_SIZE = 64
TOKENIZER_MAX_LENGTH = 20  # the longest prompt is 12 words and a comma or two


def grammar_words() -> list[str]:
    words = {"a", "an", "and"} | set(SHAPES) | set(COLORS) | set(SIZES)
    for relation in RELATIONS:
        words |= set(relation.split())
    return sorted(words)


def unet_config() -> dict:
    return dict(
        sample_size=GRID_SIZE, in_channels=3, out_channels=3, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32, 64, 96),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=16,
    )


def scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                clip_sample=True, set_alpha_to_one=False, timestep_spacing="trailing")


def create_base_model(tokenizer_dir: str | Path, seed: int = 0):
    """Randomly initialised components (unet, text_encoder, tokenizer, scheduler)."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
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
    unet = UNet2DConditionModel(**unet_config())
    return PolicyComponents(unet, text_encoder, tokenizer, DDIMScheduler(**scheduler_config()))
