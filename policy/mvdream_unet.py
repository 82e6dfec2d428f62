"""MVDream's multi-view UNet, ``MultiViewUNetModel``, written for this project (plain torch).

The network is the one of the public diffusers port ``ashawkey/mvdream-sd2.1-diffusers``, whose
code is ``mv_unet.py`` of github.com/ashawkey/mvdream_diffusers (commit 8b318ef), itself the
``MultiViewUNetModel`` of bytedance/MVDream (``mvdream/ldm/modules/diffusionmodules/openaimodel.py``,
``mvdream/ldm/modules/attention.py``).  State-dict names and shapes are the port's, so its
``unet/`` loads with ``from_pretrained``; ``tests/data/mvdream_unet_keys.json`` holds the port's
full-size list, dumped from the public class.  Facts from that code:

* An SD-1/2 LDM ("openaimodel") UNet: ``time_embed``, ``input_blocks``, ``middle_block``,
  ``output_blocks``, ``out``; every block a sequence of ResBlocks, SpatialTransformer3Ds and
  Down/Upsamplers.  GroupNorm has 32 groups everywhere (eps 1e-6 in the transformers' input norm).
  Downsample/Upsample are 3x3 convolutions (stride 2; nearest x2 then conv).
* Timestep: sinusoidal, ``cat(cos, sin)`` of ``t * exp(-ln(10000) * i / half)`` (diffusers'
  ``flip_sin_to_cos=True, freq_shift=0``), then ``time_embed`` (Linear, SiLU, Linear to
  4 x model_channels).  Camera: the flattened 4x4 camera-to-world (``camera_dim`` = 16) through
  ``camera_embed`` (the same MLP shape), **added** to the timestep embedding.
* SpatialTransformer3D: GroupNorm, linear ``proj_in``, ``transformer_depth`` blocks, linear
  ``proj_out``, residual.  A block: self-attention ``attn1`` over the tokens of **all
  num_frames views of a sample at once** (batch ``(b f) l c`` -> ``b (f l) c``), cross-attention
  ``attn2`` to the text per view, GEGLU feed-forward; pre-LayerNorms ``norm1..3``.  Attention:
  ``to_q/to_k/to_v`` without bias, ``to_out.0`` with bias, scale ``1/sqrt(dim_head)``;
  ``num_head_channels`` fixes dim_head (heads = channels / 64 in the port).
* Batch layout: ``x`` is ``[B * num_frames, C, h, w]``, the frames of one sample contiguous;
  ``context`` and ``camera`` have one row per frame.  Output: epsilon, like ``x``.
* The port's ``unet/config.json`` is the ``unet_config.params`` of MVDream's
  ``mvdream/configs/sd-v2-base.yaml`` minus ``legacy``, ``use_linear_in_transformer``,
  ``use_spatial_transformer`` (popped by the port's ``convert_mvdream_to_diffusers.py``):
  image_size 32, in/out_channels 4, model_channels 320, attention_resolutions [4, 2, 1],
  num_res_blocks 2, channel_mult [1, 2, 4, 4], num_head_channels 64, transformer_depth 1,
  context_dim 1024, use_checkpoint false, camera_dim 16.

Not carried over: ImageDream's image prompt (``ip_dim`` > 0), class conditioning and the other
openaimodel options the port never uses; asking for them is an error.  Gradient checkpointing is
diffusers' (:meth:`enable_gradient_checkpointing`), per UNet block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

GROUPS = 32  # GroupNorm groups, fixed in the public code

# Config keys the port's code accepts but that do not change the network: recorded, not used.
# (``legacy`` and ``num_heads_upsample`` are ignored by the port's code too.)
IGNORED_KEYS = ("image_size", "use_checkpoint", "legacy", "num_heads_upsample", "ip_weight")


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[N] -> [N, dim]``: ``cat(cos(t f), sin(t f))``, f_i = max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def _zero(module: nn.Module) -> nn.Module:
    """The public code starts these layers at zero (a from-scratch UNet; loaded weights replace them)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + the embedding (per channel), GroupNorm-SiLU-dropout-conv, + skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(nn.GroupNorm(GROUPS, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(GROUPS, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Attention(nn.Module):
    """Multi-head attention of ``x`` to ``context`` (``x`` itself when None)."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context

        def split(t):  # [b, l, heads * d] -> [b, heads, l, d]
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock3D(nn.Module):
    """Self-attention across the views of a sample, cross-attention to the text, feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn1 = Attention(dim, None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = Attention(dim, context_dim, heads, dim_head, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        n, tokens, dim = x.shape  # n = samples * num_frames
        joint = x.reshape(n // num_frames, num_frames * tokens, dim)  # one sequence per sample
        joint = self.attn1(self.norm1(joint)) + joint
        x = joint.reshape(n, tokens, dim)
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer3D(nn.Module):
    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, depth: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head  # == channels (checked by MultiViewUNetModel)
        self.norm = nn.GroupNorm(GROUPS, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock3D(inner, heads, dim_head, context_dim, dropout) for _ in range(depth))
        self.proj_out = _zero(nn.Linear(inner, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # [n, h*w, inner]
        for block in self.transformer_blocks:
            tokens = block(tokens, context, num_frames)
        return self.proj_out(tokens).transpose(1, 2).reshape(n, c, h, w) + x


class UNetBlock(nn.Sequential):
    """One entry of input_blocks / output_blocks / middle_block: its layers in order, each given
    what it takes (ResBlock: the embedding; SpatialTransformer3D: the text and num_frames)."""

    def forward(self, x, emb, context, num_frames):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer3D):
                x = layer(x, context, num_frames)
            else:
                x = layer(x)
        return x


@dataclass
class MultiViewUNetOutput(BaseOutput):
    sample: torch.Tensor  # [B * num_frames, out_channels, h, w]: the epsilon prediction


def _unsupported(**options) -> None:
    """Reject openaimodel options the port's config never sets and this network does not build."""
    wrong = {name: (value, default) for name, (value, default) in options.items() if value != default}
    if wrong:
        listed = ", ".join(f"{n}={v!r} (supported: {d!r})" for n, (v, d) in wrong.items())
        raise ValueError(f"MultiViewUNetModel: unsupported config {listed}; this implementation builds "
                         "MVDream's text-to-multi-view UNet (ashawkey/mvdream-sd2.1-diffusers) only")


class MultiViewUNetModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """MVDream's UNet: ``forward(x [B*V, C, h, w], timesteps [B*V], context [B*V, L, D],
    camera [B*V, 16] or None, num_frames=V)`` -> ``.sample``, epsilon like ``x``.

    The ``__init__`` arguments are the port's ``unet/config.json`` keys (and the other arguments
    of its constructor, at the values the port uses)."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 4,
        model_channels: int = 320,
        out_channels: int = 4,
        num_res_blocks: int | list[int] = 2,
        attention_resolutions: list[int] = (4, 2, 1),
        dropout: float = 0.0,
        channel_mult: list[int] = (1, 2, 4, 4),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        num_heads: int = -1,
        num_head_channels: int = 64,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        transformer_depth: int = 1,
        context_dim: int = 1024,
        n_embed: int | None = None,
        num_attention_blocks: list[int] | None = None,
        adm_in_channels: int | None = None,
        camera_dim: int | None = 16,
        ip_dim: int = 0,
        ip_weight: float = 1.0,
        use_checkpoint: bool = False,
        legacy: bool = False,
        use_spatial_transformer: bool = True,
        use_linear_in_transformer: bool = True,
    ):
        super().__init__()
        _unsupported(conv_resample=(conv_resample, True), dims=(dims, 2), num_classes=(num_classes, None),
                     use_scale_shift_norm=(use_scale_shift_norm, False), resblock_updown=(resblock_updown, False),
                     n_embed=(n_embed, None), num_attention_blocks=(num_attention_blocks, None),
                     adm_in_channels=(adm_in_channels, None), ip_dim=(ip_dim, 0),
                     use_spatial_transformer=(use_spatial_transformer, True),
                     use_linear_in_transformer=(use_linear_in_transformer, True))
        if context_dim is None:
            raise ValueError("MultiViewUNetModel needs context_dim (the text encoder's hidden size)")
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError("MultiViewUNetModel: set exactly one of num_heads and num_head_channels "
                             f"(got num_heads={num_heads}, num_head_channels={num_head_channels})")
        levels = len(channel_mult)
        res_blocks = [num_res_blocks] * levels if isinstance(num_res_blocks, int) else list(num_res_blocks)
        if len(res_blocks) != levels:
            raise ValueError(f"num_res_blocks {num_res_blocks} needs one entry per channel_mult level ({levels})")
        self.gradient_checkpointing = False

        def heads_for(ch: int) -> tuple[int, int]:
            heads, dim_head = (ch // num_head_channels, num_head_channels) if num_head_channels != -1 \
                else (num_heads, ch // num_heads)
            if heads * dim_head != ch:
                raise ValueError(f"MultiViewUNetModel: {ch} channels do not split into heads of "
                                 f"num_head_channels={num_head_channels} / num_heads={num_heads}")
            return heads, dim_head

        def transformer(ch: int) -> SpatialTransformer3D:
            return SpatialTransformer3D(ch, *heads_for(ch), context_dim, transformer_depth, dropout)

        for ch in {model_channels * m for m in channel_mult}:
            if ch % GROUPS:
                raise ValueError(f"MultiViewUNetModel: channel counts must be multiples of {GROUPS} "
                                 f"(GroupNorm groups), got {ch} from model_channels x channel_mult")

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if camera_dim is not None:
            self.camera_embed = nn.Sequential(nn.Linear(camera_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([UNetBlock(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(res_blocks[level]):
                layers = [ResBlock(ch, emb_dim, mult * model_channels, dropout)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(UNetBlock(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.input_blocks.append(UNetBlock(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = UNetBlock(ResBlock(ch, emb_dim, dropout=dropout), transformer(ch),
                                      ResBlock(ch, emb_dim, dropout=dropout))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(res_blocks[level] + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, model_channels * mult, dropout)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == res_blocks[level]:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(UNetBlock(*layers))

        self.out = nn.Sequential(nn.GroupNorm(GROUPS, ch), nn.SiLU(),
                                 _zero(nn.Conv2d(model_channels, out_channels, 3, padding=1)))

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """Loading a config: an unknown (non-underscore) key is an error, not a warning, since it
        may change the network this class would silently build without it."""
        known = set(cls._get_init_keys(cls)) - {"self"}
        unknown = sorted(k for k in config_dict if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"MultiViewUNetModel config has unknown keys {unknown}; the known keys are "
                             f"{sorted(known)} (MVDream's unet/config.json, ashawkey/mvdream-sd2.1-diffusers)")
        return super().extract_init_dict(config_dict, **kwargs)

    def _run(self, block: UNetBlock, h, emb, context, num_frames):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, h, emb, context, num_frames)
        return block(h, emb, context, num_frames)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                camera: torch.Tensor | None = None, num_frames: int = 1,
                return_dict: bool = True) -> MultiViewUNetOutput | tuple[torch.Tensor]:
        if x.shape[0] % num_frames:
            raise ValueError(f"batch of {x.shape[0]} images is not a whole number of samples of {num_frames} views")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        if camera is not None:
            if not hasattr(self, "camera_embed"):
                raise ValueError("this MultiViewUNetModel has no camera_embed (camera_dim is None); pass camera=None")
            emb = emb + self.camera_embed(camera.to(emb.dtype))
        h, skips = x, []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context, num_frames)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, num_frames)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context, num_frames)
        # (The port casts h to x's dtype first: a no-op but under autocast, where it would hand
        # float32 activations to low-precision GroupNorm weights, which CPU kernels refuse.)
        sample = self.out(h)
        return MultiViewUNetOutput(sample=sample) if return_dict else (sample,)
