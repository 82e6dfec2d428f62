"""The multi-view diffusion policy: sample trajectories with log-probs, recompute them.

Plain torch, no Ray.  ``MultiViewPolicy`` wraps the loaded components and adds
what RL needs on top of a diffusers pipeline:

* :meth:`MultiViewPolicy.sample` draws a batch of multi-view samples with per-sample
  seeds and records the whole DDIM trajectory, the policy's log-prob of every step,
  the frozen reference model's log-prob of the same actions (for the KL term) and the
  decoded views with their cameras (``geometry/views.py``);
* :meth:`MultiViewPolicy.step_log_prob` recomputes one step's log-prob with
  gradients for training; it runs the very same function as sampling, so the
  numbers agree.

The reference model is the base model: with LoRA the same UNet with its adapter
disabled, with full finetuning a frozen copy taken at construction.

Families (``policy/families.py``) differ only in two places: :meth:`encode_prompts`
(one CLIP encoder, or SDXL's two plus pooled embeds and time ids, all carried by
one :class:`Conditioning`) and the family's layout (``policy/layouts.py``): the shape of
a sample, the UNet call, the views' cameras (:attr:`cameras`) and :meth:`decode` into views.
The grid families generate one 2x2 grid image per sample, mvdream a batch of four view
latents per sample ([4, 4, h, w]).  Sampling, the DDIM step, the log-prob, the reference and
the recomputation are the same code for all of them, on samples of any shape.

Precision (``model.dtype``): the frozen parts are stored in the low dtype; the
trainable parameters (the LoRA adapter, or the whole UNet under full
finetuning) stay float32 master weights; the UNet forward runs under autocast;
latents, the DDIM step and log-probs are float32.  A VAE whose config sets
``force_upcast`` (SDXL's, which overflows in fp16) is kept in float32 under
fp16.  fp16 needs CUDA (CPU fp16 kernels are missing or slow); bf16 runs on CPU.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from geometry.cameras import Cameras
from geometry.views import views_as_uint8
from policy.ddim import (ddim_inversion_step, ddim_step_with_logprob, predict_x0_and_eps, previous_timestep,
                         trained_steps)
from policy.layouts import layout_for
from policy.models import PolicyComponents, load_components
from policy.settings import LoraSettings, ModelSettings, SamplingSettings

__all__ = ["Conditioning", "LoraSettings", "ModelSettings", "MultiViewPolicy", "SamplingSettings", "Trajectory",
           "load_policy"]

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Trajectory:
    """One batch of sampled trajectories (CPU tensors)."""

    prompts: list[str]
    seeds: list[int]
    latents: torch.Tensor  # [B, T+1, *S]: x_T .. x_0; S is a sample's shape ([C, H, W]; mvdream [V, C, h, w])
    timesteps: torch.Tensor  # [T]
    log_probs: torch.Tensor  # [B, T]
    ref_log_probs: torch.Tensor  # [B, T]; a copy of log_probs at the steps the reference skipped
    views: torch.Tensor  # [B, V, 3, h, w] uint8, the decoded x_0 (geometry/views.py)
    cameras: Cameras  # the V views' cameras
    # With ``record_x0``: the one-step clean prediction x0_hat(x_{t_k}) of every state after the
    # first, k = 1..T (the last is x_0 itself), for reward gradients (Nabla-GFlowNet).
    x0_predictions: torch.Tensor | None = None  # [B, T, *S]

    @property
    def kl(self) -> torch.Tensor:
        return kl_estimate(self.log_probs, self.ref_log_probs)


def kl_estimate(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, steps=None) -> torch.Tensor:
    """Per-sample KL to the reference: mean over ``steps`` (indices; None: all) of
    log p_theta - log p_ref of the sampled actions ([B, T] -> [B])."""
    if steps is not None:
        log_probs, ref_log_probs = log_probs[:, steps], ref_log_probs[:, steps]
    return (log_probs - ref_log_probs).mean(dim=1)


@dataclass
class Conditioning:
    """What the UNet is conditioned on, one row per sample (float32).

    ``hidden_states`` [B, L, D] go to cross-attention (mvdream: repeated for each view).
    SDXL (sdxl-grid) adds ``text_embeds`` [B, P] (pooled, from text_encoder_2) and ``time_ids``
    [B, 6] (original size, crop top-left, target size), passed as ``added_cond_kwargs``."""

    hidden_states: torch.Tensor
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def _map(self, text_fn, time_fn=None) -> "Conditioning":
        time_fn = time_fn or text_fn
        return Conditioning(text_fn(self.hidden_states),
                            None if self.text_embeds is None else text_fn(self.text_embeds),
                            None if self.time_ids is None else time_fn(self.time_ids))

    def zeros_like(self) -> "Conditioning":
        """Zero text embeddings (Carve3D's negative; SDXL: zero hidden states *and* pooled
        embeds, as diffusers' force_zeros_for_empty_prompt); the time ids stay."""
        return self._map(torch.zeros_like, lambda t: t)

    def expand(self, batch_size: int) -> "Conditioning":
        """A one-row conditioning repeated to ``batch_size`` rows."""
        return self._map(lambda t: t.expand(batch_size, *t.shape[1:]))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        def join(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)
        return Conditioning(join("hidden_states"), join("text_embeds"), join("time_ids"))

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.hidden_states}
        if self.text_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        return kwargs


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise ValueError(f"model.dtype must be one of {', '.join(TORCH_DTYPES)}, got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise ValueError(f"model.dtype=fp16 needs a CUDA device (this policy is on {device.type}: fp16 kernels "
                         "are missing or slow there); use model.dtype=bf16 or fp32 on CPU, or give the roles GPUs")
    return TORCH_DTYPES[name]


def vae_dtype(vae, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype: ``dtype``, but float32 under fp16 when its config sets ``force_upcast``
    (SDXL's VAE overflows in fp16).  bf16 has float32's range and needs no upcast."""
    return torch.float32 if dtype == torch.float16 and getattr(vae.config, "force_upcast", False) else dtype


def _cast(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(device, dtype)``.  diffusers' ``to`` warns on every dtype cast about modules
    to keep in float32, even when a model has none; only those that have some take it."""
    if getattr(module, "_keep_in_fp32_modules", None):
        return module.to(device, dtype)
    return torch.nn.Module.to(module, device, dtype)


def load_policy(model: ModelSettings, device: str | torch.device = "cpu", path: str | None = None) -> "MultiViewPolicy":
    """The policy of a run's ``model`` section; ``path`` overrides ``model.path`` (e.g. the
    driver's resolved builtin directory, or evaluate's --model)."""
    components = load_components(path or model.path, model.cache_dir, model.family)
    return MultiViewPolicy(components, model.finetune, model.lora, device=device, dtype=model.dtype,
                           gradient_checkpointing=model.gradient_checkpointing)


class MultiViewPolicy:
    def __init__(
        self,
        components: PolicyComponents,
        finetune: str = "lora",
        lora: LoraSettings | None = None,
        device: str | torch.device = "cpu",
        dtype: str = "fp32",
        gradient_checkpointing: bool = False,
    ):
        if finetune not in ("lora", "full"):
            raise ValueError(f"finetune must be 'lora' or 'full', got {finetune!r}")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)  # of the frozen parts and the autocast
        self.finetune = finetune
        self.family = components.family

        def frozen(module, dtype=self.dtype):
            return _cast(module, self.device, dtype).requires_grad_(False).eval() if module is not None else None

        self.text_encoder = frozen(components.text_encoder)
        self.text_encoder_2 = frozen(components.text_encoder_2)
        self.tokenizer, self.tokenizer_2 = components.tokenizer, components.tokenizer_2
        self.scheduler = components.scheduler
        self.vae = frozen(components.vae, vae_dtype(components.vae, self.dtype)) if components.vae else None
        self.unet = components.unet.to(self.device)
        self.reference_unet = None
        if finetune == "lora":
            from peft import LoraConfig

            lora = lora or LoraSettings()
            _cast(self.unet.requires_grad_(False), self.device, self.dtype)  # the frozen base
            self.unet.add_adapter(LoraConfig(
                r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                init_lora_weights="gaussian",
            ))
        else:
            self.reference_unet = frozen(copy.deepcopy(self.unet))
        for p in self.trainable_parameters():  # master weights: float32 whatever model.dtype
            p.data = p.data.float()
        self.unet.train(False)  # no dropout: sampling and training must see the same function
        self.layout = layout_for(self.family, self.unet.config, self.vae)  # policy/layouts.py
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()  # active only while gradients are recorded
        self.add_time_ids = self._micro_conditioning() if self.text_encoder_2 is not None else None

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
    @property
    def image_size(self) -> int:
        """Side in pixels of a generated image: the grid (grid families) or each view (mvdream)."""
        return self.layout.image_size

    def _micro_conditioning(self) -> torch.Tensor:
        """SDXL's add_time_ids: original size, crop top-left, target size, all of the grid
        image (no crop), checked against what the UNet's added embedding expects."""
        size = self.image_size
        time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32, device=self.device)
        cfg = self.unet.config
        expected = self.unet.add_embedding.linear_1.in_features
        got = cfg.addition_time_embed_dim * len(time_ids) + self.text_encoder_2.config.projection_dim
        if got != expected:
            raise ValueError(
                f"this sdxl-grid model does not fit together: its UNet's added embedding takes {expected} "
                f"features, but text_encoder_2's projection_dim {self.text_encoder_2.config.projection_dim} + "
                f"{len(time_ids)} time ids x addition_time_embed_dim {cfg.addition_time_embed_dim} = {got}; "
                "check unet/config.json projection_class_embeddings_input_dim")
        return time_ids

    def _token_ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(
            list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The UNet's conditioning for ``prompts``: CLIP's last hidden state (pixel-grid,
        sd-grid); for sdxl-grid both encoders' penultimate hidden states concatenated,
        text_encoder_2's pooled projection and the micro-conditioning time ids."""
        if self.text_encoder_2 is None:
            return Conditioning(self.text_encoder(self._token_ids(self.tokenizer, prompts))[0].float())
        first = self.text_encoder(self._token_ids(self.tokenizer, prompts), output_hidden_states=True)
        second = self.text_encoder_2(self._token_ids(self.tokenizer_2, prompts), output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return Conditioning(hidden.float(), second.text_embeds.float(),
                            self.add_time_ids.expand(len(prompts), -1))

    def negative_embeds(self, prompt_embeds: Conditioning, kind: str) -> Conditioning:
        if kind == "zero":
            return prompt_embeds.zeros_like()
        if kind == "empty":
            return self.encode_prompts([""]).expand(len(prompt_embeds))
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

    def guided_model_output(self, unet, latents, timestep, prompt_embeds: Conditioning,
                            negative_embeds: Conditioning, guidance_scale):
        """Classifier-free guidance: uncond + scale * (cond - uncond), in one batched call
        (UNet under autocast to ``model.dtype``; the guided output is float32).  ``latents``
        [B, *S]; the family's layout makes the UNet call."""
        model_in = torch.cat([latents, latents])
        t = torch.as_tensor(timestep, device=self.device)
        t = t.expand(latents.shape[0]) if t.ndim == 0 else t  # one timestep per sample is fine
        t = torch.cat([t, t])
        conditioning = Conditioning.cat([negative_embeds, prompt_embeds])
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.layout.model_output(unet, model_in, t, conditioning)
        uncond, cond = out.float().chunk(2)
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
               progress=None, reference: bool = True, sampler: str | None = None,
               record_x0: bool = False, reference_min_relative_std: float = 0.0) -> Trajectory:
        """Sample one multi-view sample per (prompt, seed); deterministic per sample, whatever the batch.

        ``reference=False`` skips the reference model (half the cost, for evaluation);
        the trajectory's ``ref_log_probs`` are then a copy of ``log_probs``.
        ``reference_min_relative_std`` > 0 runs it only at the steps whose noise std is at least
        that times the noisiest step's (``policy.ddim.trained_steps``: the steps the learner
        trains and measures the KL on), copying ``log_probs`` at the others.  ``sampler``
        (default ``settings.sampler``): ``standard`` or ``zmv`` (ZMV-Sampling, see
        :meth:`zigzag`); both start from the seed's same x_T, so a pair of them differs only
        by the zigzag.  With ``zmv_steps`` > 1 a later zigzag replaces the state the previous
        action led to, so such a trajectory's steps do not chain (fine for evaluation; the
        zigal algorithms train with one zigzag, at the first step, whose state is x~_T).
        ``record_x0`` keeps each state's one-step x0 prediction."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        sampler = sampler or settings.sampler
        if sampler not in ("standard", "zmv"):
            raise ValueError(f"sampler must be 'standard' or 'zmv', got {sampler!r}")
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        shape = self.layout.sample_shape
        x = torch.stack([torch.randn(shape, generator=g, device=self.device) for g in generators])
        x = x * self.scheduler.init_noise_sigma

        embeds = self.encode_prompts(prompts)
        negative = self.negative_embeds(embeds, settings.negative_prompt)
        self.scheduler.set_timesteps(settings.num_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        reference_steps = set(range(len(timesteps))) if reference_min_relative_std <= 0 else set(
            trained_steps(self.scheduler, timesteps.cpu(), settings.eta, reference_min_relative_std).tolist())
        latents, log_probs, ref_log_probs, x0_predictions = [], [], [], []
        for i, t in enumerate(timesteps):
            if sampler == "zmv" and i < settings.zmv_steps:
                x = self.zigzag(x, t, embeds, negative, settings, generators)
            latents.append(x)  # the state the step's action is taken from (re-inverted under zmv)
            output = self.guided_model_output(self.unet, x, t, embeds, negative, settings.guidance_scale)
            if record_x0 and i > 0:
                x0_predictions.append(predict_x0_and_eps(self.scheduler, output, t, x)[0])
            x_next, log_prob = ddim_step_with_logprob(self.scheduler, output, t, x, eta=settings.eta,
                                                      generator=generators)
            ref_log_prob = log_prob
            if reference and i in reference_steps:
                with self.reference_model() as ref_unet:
                    ref_output = self.guided_model_output(ref_unet, x, t, embeds, negative,
                                                          settings.guidance_scale)
                _, ref_log_prob = ddim_step_with_logprob(self.scheduler, ref_output, t, x,
                                                         eta=settings.eta, prev_sample=x_next)
            x = x_next
            log_probs.append(log_prob)
            ref_log_probs.append(ref_log_prob)
            if progress is not None:
                progress(1)
        latents.append(x)
        x0_predictions.append(x)
        return Trajectory(
            prompts=list(prompts), seeds=[int(s) for s in seeds],
            latents=torch.stack(latents, dim=1).cpu(),
            timesteps=self.scheduler.timesteps.cpu().clone(),
            log_probs=torch.stack(log_probs, dim=1).cpu(),
            ref_log_probs=torch.stack(ref_log_probs, dim=1).cpu(),
            views=self.decode_to_uint8(x).cpu(), cameras=self.cameras,
            x0_predictions=torch.stack(x0_predictions, dim=1).cpu() if record_x0 else None,
        )

    def zigzag(self, x, t, embeds, negative, settings: SamplingSettings, generators) -> torch.Tensor:
        """ZMV-Sampling's zig-zag at step t, on the whole sample (all views jointly): a policy step
        x_t -> x_{t-1} (zig, ``guidance_scale``), then DDIM inversion x_{t-1} -> x~_t (zag, at
        ``zmv_inversion_guidance``).  Returns x~_t, from which the policy steps again: that
        second zig is the trajectory's action (MVC-ZigAL stores x~_t as the state)."""
        output = self.guided_model_output(self.unet, x, t, embeds, negative, settings.guidance_scale)
        x_prev, _ = ddim_step_with_logprob(self.scheduler, output, t, x, eta=settings.eta, generator=generators)
        inverse = self.guided_model_output(self.unet, x_prev, previous_timestep(self.scheduler, t), embeds, negative,
                                           settings.zmv_inversion_guidance)
        return ddim_inversion_step(self.scheduler, inverse, t, x_prev)

    # ---- views: the family's layout (policy/layouts.py) ------------------------------
    @property
    def cameras(self) -> Cameras:
        """The cameras of the views :meth:`decode` gives: the grid rig's four (grid families,
        ``geometry.cameras.grid_rig``, in grid order) or MVDream's four (mvdream,
        ``policy.layouts.MVDreamLayout``), in the project's convention."""
        return self.layout.cameras

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Final samples [B, *S] -> views [B, V, 3, h, w] float in [0, 1] at :attr:`cameras`,
        differentiable (VAE decode when latent-space, in the VAE's dtype: float32 when it was
        upcast, see the module docstring); :meth:`view_gradient_to_model` differentiates
        through it."""
        return self.layout.decode(x0, self.vae)

    @torch.no_grad()
    def decode_to_uint8(self, x0: torch.Tensor) -> torch.Tensor:
        """Final latents -> views [B, V, 3, h, w] uint8 (what crosses actors)."""
        return views_as_uint8(self.decode(x0))

    def view_gradient_to_model(self, x0: torch.Tensor, view_gradient: torch.Tensor) -> torch.Tensor:
        """Pull a gradient w.r.t. the decoded views ([B, V, 3, h, w], of :meth:`decode`) back to
        the UNet's sample space at ``x0`` [B, *S]: the vector-Jacobian product of the decoder
        (pixel-grid: 1/2 inside [-1, 1], 0 where clamped; the grid split only moves entries)."""
        with torch.enable_grad():
            x0 = x0.detach().to(self.device).requires_grad_(True)
            views = self.decode(x0)
            (grad,) = torch.autograd.grad(views, x0, view_gradient.to(views.device, views.dtype))
        return grad.float()
