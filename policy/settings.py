"""Settings of the policy, plain dataclasses: the run config (``learner/config.py``)
holds them as its ``model`` (with ``model.lora``) and ``sampling`` sections, and
the policy takes them as they are, so each setting is defined once."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoraSettings:
    rank: int = 4
    alpha: float = 4.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class SamplingSettings:
    num_steps: int = 10
    eta: float = 1.0
    # Carve3D samples with CFG 5.0. MiniCarve's small base models oversaturate at 5: on 16 (v1)
    # test prompts, 94% of sft-long's view-border pixels were speckle at CFG 5, 12% at 3.
    guidance_scale: float = 3.0
    negative_prompt: str = "zero"  # "zero": zero embedding (Carve3D); "empty": encode ""
    # standard | zmv: ZMV-Sampling (MVC-ZigAL): at each of the first ``zmv_steps`` steps, denoise
    # (guidance_scale), invert back with DDIM at ``zmv_inversion_guidance``, denoise again; all
    # four views at once (they are one grid).  MVC-ZigAL's code: 1 step, inversion guidance 1.0.
    sampler: str = "standard"
    zmv_steps: int = 1
    zmv_inversion_guidance: float = 1.0


DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class ModelSettings:
    # A local diffusers-format directory (relative paths: the working directory, then the
    # project), or builtin:tiny[-sd|-sdxl|-mvdream] for a tiny random model.  Default: MiniCarve's RL base.
    path: str = "minicarve/weights/sft-short"
    cache_dir: str | None = None  # where builtin models are created (default ~/.cache/carve3d)
    # auto (read from the directory) | pixel-grid | sd-grid | sdxl-grid | mvdream (policy/families.py);
    # anything but auto must match the directory.
    family: str = "auto"
    finetune: str = "lora"  # lora | full
    lora: LoraSettings = field(default_factory=LoraSettings)  # with finetune=lora
    # fp32 | bf16 | fp16 (CUDA only): the frozen parts (text encoders, VAE, the base UNet under
    # LoRA, the reference copy under full) are stored in it and the UNet runs under autocast;
    # trainable weights stay float32.
    dtype: str = "fp32"
    gradient_checkpointing: bool = False  # recompute UNet activations in the backward pass
