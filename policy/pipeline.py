"""The multi-view diffusion policy: sample trajectories with log-probs, recompute them.

Plain torch, no Ray.  ``MultiViewPolicy`` wraps the loaded components and adds
what RL needs on top of a diffusers pipeline:

* :meth:`MultiViewPolicy.sample` draws a batch of 2x2 grids with per-sample seeds
  and records the whole DDIM trajectory, the policy's log-prob of every step and
  the frozen reference model's log-prob of the same actions (for the KL term);
* :meth:`MultiViewPolicy.step_log_prob` recomputes one step's log-prob with
  gradients for training; it runs the very same function as sampling, so the
  numbers agree.

The reference model is the base model: with LoRA the same UNet with its adapter
disabled, with full finetuning a frozen copy taken at construction.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from policy.ddim import ddim_step_with_logprob
from policy.models import PolicyComponents
from policy.settings import LoraSettings, SamplingSettings

__all__ = ["LoraSettings", "MultiViewPolicy", "SamplingSettings", "Trajectory"]


@dataclass
class Trajectory:
    """One batch of sampled trajectories (CPU tensors)."""

    prompts: list[str]
    seeds: list[int]
    latents: torch.Tensor  # [B, T+1, C, H, W]: x_T .. x_0
    timesteps: torch.Tensor  # [T]
    log_probs: torch.Tensor  # [B, T]
    ref_log_probs: torch.Tensor  # [B, T]
    images: torch.Tensor  # [B, H, W, 3] uint8, the 2x2 grid

    @property
    def kl(self) -> torch.Tensor:
        return kl_estimate(self.log_probs, self.ref_log_probs)


def kl_estimate(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-sample KL to the reference: mean over steps of log p_theta - log p_ref of the
    sampled actions ([B, T] -> [B])."""
    return (log_probs - ref_log_probs).mean(dim=1)


class MultiViewPolicy:
    def __init__(
        self,
        components: PolicyComponents,
        finetune: str = "lora",
        lora: LoraSettings | None = None,
        device: str | torch.device = "cpu",
    ):
        if finetune not in ("lora", "full"):
            raise ValueError(f"finetune must be 'lora' or 'full', got {finetune!r}")
        self.device = torch.device(device)
        self.finetune = finetune
        self.unet = components.unet.to(self.device)
        self.text_encoder = components.text_encoder.to(self.device).requires_grad_(False).eval()
        self.tokenizer = components.tokenizer
        self.scheduler = components.scheduler
        self.vae = components.vae.to(self.device).requires_grad_(False).eval() if components.vae else None
        self.reference_unet = None
        if finetune == "lora":
            from peft import LoraConfig

            lora = lora or LoraSettings()
            self.unet.requires_grad_(False)
            self.unet.add_adapter(LoraConfig(
                r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                init_lora_weights="gaussian",
            ))
        else:
            self.reference_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
        self.unet.train(False)  # no dropout: sampling and training must see the same function

    # ---- weights -----------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What the learner publishes: the adapter only with LoRA, the whole UNet otherwise."""
        return {n: p.detach().cpu().clone() for n, p in self.unet.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {n for n, p in self.unet.named_parameters() if p.requires_grad}
        if set(state) != expected:
            extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
            raise ValueError(f"weights do not match this policy ({self.finetune}): "
                             f"unexpected {extra[:5]}, missing {missing[:5]}")
        params = dict(self.unet.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))

    # ---- conditioning ------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def negative_embeds(self, prompt_embeds: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "zero":
            return torch.zeros_like(prompt_embeds)
        if kind == "empty":
            return self.encode_prompts([""]).expand_as(prompt_embeds)
        raise ValueError(f"negative_prompt must be 'zero' or 'empty', got {kind!r}")

    # ---- the policy --------------------------------------------------------------
    @contextlib.contextmanager
    def reference_model(self):
        """The frozen base UNet: LoRA adapter disabled, or the frozen copy."""
        if self.reference_unet is not None:
            yield self.reference_unet
            return
        self.unet.disable_adapters()
        try:
            yield self.unet
        finally:
            self.unet.enable_adapters()

    def guided_model_output(self, unet, latents, timestep, prompt_embeds, negative_embeds, guidance_scale):
        """Classifier-free guidance: uncond + scale * (cond - uncond), in one batched call."""
        model_in = torch.cat([latents, latents])
        t = torch.as_tensor(timestep, device=self.device)
        t = t.expand(latents.shape[0]) if t.ndim == 0 else t  # one timestep per sample is fine
        t = torch.cat([t, t])
        out = unet(model_in, t, encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds])).sample
        uncond, cond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def step_log_prob(self, latents, timestep, next_latents, prompt_embeds, negative_embeds,
                      settings: SamplingSettings) -> torch.Tensor:
        """log p_theta(next_latents | latents, t), with gradients: the training-time recompute."""
        output = self.guided_model_output(self.unet, latents, timestep, prompt_embeds,
                                          negative_embeds, settings.guidance_scale)
        _, log_prob = ddim_step_with_logprob(self.scheduler, output, timestep, latents,
                                             eta=settings.eta, prev_sample=next_latents)
        return log_prob

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], settings: SamplingSettings,
               progress=None, reference: bool = True) -> Trajectory:
        """Sample one grid per (prompt, seed); deterministic per sample, whatever the batch.

        ``reference=False`` skips the reference model (half the cost, for evaluation);
        the trajectory's ``ref_log_probs`` are then a copy of ``log_probs``."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        unet_cfg = self.unet.config
        shape = (unet_cfg.in_channels, unet_cfg.sample_size, unet_cfg.sample_size)
        x = torch.stack([torch.randn(shape, generator=g, device=self.device) for g in generators])
        x = x * self.scheduler.init_noise_sigma

        embeds = self.encode_prompts(prompts)
        negative = self.negative_embeds(embeds, settings.negative_prompt)
        self.scheduler.set_timesteps(settings.num_steps, device=self.device)
        latents, log_probs, ref_log_probs = [x], [], []
        for t in self.scheduler.timesteps:
            output = self.guided_model_output(self.unet, x, t, embeds, negative, settings.guidance_scale)
            x_next, log_prob = ddim_step_with_logprob(self.scheduler, output, t, x, eta=settings.eta,
                                                      generator=generators)
            ref_log_prob = log_prob
            if reference:
                with self.reference_model() as ref_unet:
                    ref_output = self.guided_model_output(ref_unet, x, t, embeds, negative,
                                                          settings.guidance_scale)
                _, ref_log_prob = ddim_step_with_logprob(self.scheduler, ref_output, t, x,
                                                         eta=settings.eta, prev_sample=x_next)
            x = x_next
            latents.append(x)
            log_probs.append(log_prob)
            ref_log_probs.append(ref_log_prob)
            if progress is not None:
                progress(1)
        return Trajectory(
            prompts=list(prompts), seeds=[int(s) for s in seeds],
            latents=torch.stack(latents, dim=1).cpu(),
            timesteps=self.scheduler.timesteps.cpu().clone(),
            log_probs=torch.stack(log_probs, dim=1).cpu(),
            ref_log_probs=torch.stack(ref_log_probs, dim=1).cpu(),
            images=self.decode_to_uint8(x).cpu(),
        )

    @torch.no_grad()
    def decode_to_uint8(self, x0: torch.Tensor) -> torch.Tensor:
        """Final latents -> grid images [B, H, W, 3] uint8 (VAE decode when latent-space)."""
        if self.vae is not None:
            x0 = self.vae.decode(x0.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        images = ((x0.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1)
