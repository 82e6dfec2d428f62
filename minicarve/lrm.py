"""MiniCarve LRM: a small feed-forward sparse-view reconstruction model (plain torch).

Carve3D scores multi-view images with a feed-forward Large Reconstruction Model;
this is its MiniCarve-sized stand-in.  Four posed views in, a triplane radiance
field out, in one forward pass (no per-sample optimisation):

1. Each view ``[3, H, W]`` in [0, 1] (white background) is concatenated per pixel
   with its camera's Plucker rays (``geometry.cameras.plucker_rays``, 6
   channels) and encoded by a small CNN into ``(H/p) x (W/p)`` patch tokens.
   The camera enters only through the rays: there is no view-index embedding,
   so the model reads *where* each view was taken, not which slot it came in.
2. A transformer runs over all views' tokens together with learned triplane
   tokens (3 planes x ``plane_tokens``^2).
3. The triplane tokens are unpatchified into 3 feature planes (xy, xz, yz) of
   ``plane_size``^2 x ``plane_channels`` over the cube [-1, 1]^3, then refined
   by one residual 3x3 conv.
4. :class:`TriplaneField` samples the planes bilinearly at any world point,
   concatenates the 3 features and decodes them with a small MLP into density
   (``density_scale * softplus(raw + density_shift)``, zero outside the cube)
   and rgb (sigmoid).  It is a *batched field* for the project's one renderer
   (``geometry.render.render_field``), so it renders at ANY camera.

Weights: ``save_pretrained(dir)`` writes ``config.json`` + ``model.safetensors``;
:class:`LRMReconstructor` (the project's ``Reconstructor`` protocol, built by
``build_reconstructor("lrm", weights=DIR)``) loads them, by default from
:data:`LRM_WEIGHTS_DIR`, which ``python -m minicarve.train_lrm`` writes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from geometry.cameras import Cameras, plucker_rays
from geometry.render import render_field

LRM_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "lrm"
TRAIN_COMMAND = "python -m minicarve.train_lrm"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "minicarve-lrm"


@dataclass
class LRMConfig:
    image_size: int = 32  # views are resized to this square size before encoding
    patch_size: int = 8  # encoder downsampling: (image_size / patch_size)^2 tokens per view
    dim: int = 128  # transformer width
    depth: int = 3  # transformer layers
    heads: int = 4
    mlp_ratio: int = 2
    plane_tokens: int = 4  # triplane tokens per side of each plane
    plane_size: int = 32  # triplane resolution (a multiple of plane_tokens)
    plane_channels: int = 16
    decoder_hidden: int = 64
    decoder_layers: int = 1  # hidden layers of the point decoder
    density_scale: float = 20.0
    density_shift: float = -4.0  # raw 0 -> density 20 * softplus(-4) = 0.36 per unit (mostly clear)
    bound: float = 1.0  # the field lives in [-bound, bound]^3; empty outside
    num_samples: int = 48  # ray samples when rendering (training may use fewer)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.patch_size & (self.patch_size - 1):
            raise ValueError(f"patch_size {self.patch_size} must be a power of two")
        if self.plane_size % self.plane_tokens:
            raise ValueError(f"plane_size {self.plane_size} is not a multiple of plane_tokens {self.plane_tokens}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")

    @property
    def tokens_per_view(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, data: dict) -> LRMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"model_type"})
        if unknown:
            raise ValueError(f"unknown LRMConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})


# ----------------------------------------------------------------------- the field


class PointDecoder(nn.Module):
    """Triplane features ``[..., 3C]`` -> raw ``[..., 4]`` (density logit, rgb logits)."""

    def __init__(self, config: LRMConfig) -> None:
        super().__init__()
        width, layers = 3 * config.plane_channels, []
        for _ in range(config.decoder_layers):
            layers += [nn.Linear(width, config.decoder_hidden), nn.ReLU(inplace=True)]  # saves a copy of every point's hidden layer
            width = config.decoder_hidden
        layers.append(nn.Linear(width, 4))
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


# Which world axes index each plane, as grid_sample's (x = width, y = height) coordinates.
PLANE_AXES = ((0, 1), (0, 2), (1, 2))  # xy, xz, yz


class TriplaneField:
    """``B`` triplane radiance fields sharing one point decoder.

    A batched field for ``geometry.render``: ``points [B, ..., 3]`` ->
    density ``[B, ...]`` and rgb ``[B, ..., 3]``; ``render(cameras, h, w)`` gives
    ``[B, V, 3, h, w]`` at any cameras.  Differentiable in ``planes`` and the decoder.
    """

    def __init__(self, planes: Tensor, decoder: PointDecoder, config: LRMConfig,
                 num_samples: int | None = None) -> None:
        self.planes = planes  # [B, 3, C, R, R]
        self.decoder = decoder
        self.config = config
        self.num_samples = num_samples or config.num_samples

    @property
    def batch_size(self) -> int:
        return self.planes.shape[0]

    def features(self, points: Tensor) -> Tensor:
        """Concatenated plane features ``[B, ..., 3C]`` at world ``points [B, ..., 3]``."""
        batch, *rest, _ = points.shape
        _, planes, channels, res, _ = self.planes.shape
        coords = points.reshape(batch, -1, 3) / self.config.bound
        grids = torch.stack([coords[..., list(axes)] for axes in PLANE_AXES], dim=1)  # [B, 3, N, 2]
        sampled = F.grid_sample(
            self.planes.reshape(batch * planes, channels, res, res),
            grids.reshape(batch * planes, 1, -1, 2),
            mode="bilinear", padding_mode="border", align_corners=False,
        )  # [B*3, C, 1, N]
        sampled = sampled.reshape(batch, planes * channels, -1).transpose(1, 2)  # [B, N, 3C]
        return sampled.reshape(batch, *rest, planes * channels)

    def __call__(self, points: Tensor) -> tuple[Tensor, Tensor]:
        # Outside the cube the density is zero, so a point there never reaches a pixel (its
        # compositing weight is exactly 0): only points inside it for some scene of the batch
        # are decoded, and the rest get density 0 and rgb 0: the result is the same as decoding
        # them all, and a render's rays pass through a lot of empty space around the cube.
        batch, *rest, _ = points.shape
        inside = (points.abs() <= self.config.bound).all(dim=-1).reshape(batch, -1)  # [B, N]
        kept = inside.any(dim=0).nonzero().squeeze(1)
        raw = self.decoder(self.features(points.reshape(batch, -1, 3)[:, kept]))  # [B, M, 4]
        density = self.config.density_scale * F.softplus(raw[..., 0] + self.config.density_shift) * inside[:, kept]
        size = inside.shape[1]
        density = raw.new_zeros(batch, size).index_copy(1, kept, density)
        rgb = raw.new_zeros(batch, size, 3).index_copy(1, kept, torch.sigmoid(raw[..., 1:]))
        return density.reshape(batch, *rest), rgb.reshape(batch, *rest, 3)

    def render(self, cameras: Cameras, height: int, width: int, num_samples: int | None = None) -> Tensor:
        """Images ``[B, V, 3, H, W]`` in [0, 1] (white background) at any ``cameras``."""
        return render_field(self, cameras, height, width, num_samples or self.num_samples,
                            batch_size=self.batch_size)


# ----------------------------------------------------------------------- the model


class ViewEncoder(nn.Module):
    """RGB + Plucker ``[N, 9, H, W]`` -> patch tokens ``[N, (H/p)(W/p), dim]``.

    A hierarchical patchify: ``log2(p)`` non-overlapping 2x2 stride-2 convs (cheap on
    a CPU: no full-resolution 3x3 conv), then a 1x1 projection.
    """

    def __init__(self, config: LRMConfig) -> None:
        super().__init__()
        stages = int(math.log2(config.patch_size))
        widths = [9] + [min(config.dim, 48 * 2**i) for i in range(stages)]
        layers: list[nn.Module] = []
        for i in range(stages):
            layers += [nn.Conv2d(widths[i], widths[i + 1], 2, stride=2), nn.GELU()]
        layers.append(nn.Conv2d(widths[-1], config.dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten(2).transpose(1, 2)


class MiniLRM(nn.Module):
    """Posed views -> triplane; see the module docstring for the architecture."""

    def __init__(self, config: LRMConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or LRMConfig()
        self.encoder = ViewEncoder(config)
        self.patch_pos = nn.Parameter(torch.randn(config.tokens_per_view, config.dim) * 0.02)
        num_plane_tokens = 3 * config.plane_tokens**2
        self.plane_queries = nn.Parameter(torch.randn(num_plane_tokens, config.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            config.dim, config.heads, config.mlp_ratio * config.dim, dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)
        self.upscale = config.plane_size // config.plane_tokens
        self.unpatchify = nn.Linear(config.dim, config.plane_channels * self.upscale**2)
        self.refine = nn.Conv2d(config.plane_channels, config.plane_channels, 3, padding=1)
        self.decoder = PointDecoder(config)

    @property
    def device(self) -> torch.device:
        return self.plane_queries.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def prepare_views(self, views: Tensor) -> Tensor:
        """Views resized (area / bilinear) to ``image_size`` square."""
        size = self.config.image_size
        if views.shape[-2:] == (size, size):
            return views
        batch, num_views = views.shape[:2]
        mode = "area" if min(views.shape[-2:]) >= size else "bilinear"
        resized = F.interpolate(views.flatten(0, 1), size=(size, size), mode=mode)
        return resized.reshape(batch, num_views, 3, size, size)

    def forward(self, views: Tensor, cameras: Cameras) -> Tensor:
        """``views [B, V, 3, H, W]`` in [0, 1], taken by ``cameras`` (V cameras shared by the
        batch) -> triplanes ``[B, 3, C, R, R]``."""
        if views.ndim != 5 or views.shape[2] != 3 or views.shape[1] != cameras.num_views:
            raise ValueError(f"expected views [B, {cameras.num_views}, 3, H, W], got {tuple(views.shape)}")
        config = self.config
        views = self.prepare_views(views.to(self.device, torch.float32))
        batch, num_views = views.shape[:2]
        rays = plucker_rays(cameras.to(self.device), config.image_size, config.image_size)  # [V, 6, h, w]
        # Views centred on white = 0 so that empty space encodes as zeros.
        x = torch.cat([views * 2 - 1, rays.expand(batch, -1, -1, -1, -1)], dim=2)
        tokens = self.encoder(x.flatten(0, 1)) + self.patch_pos  # [B*V, T, D]
        tokens = tokens.reshape(batch, num_views * config.tokens_per_view, config.dim)
        queries = self.plane_queries.expand(batch, -1, -1)
        out = self.norm(self.transformer(torch.cat([queries, tokens], dim=1)))[:, : queries.shape[1]]
        # Unpatchify: [B, 3 * t * t, C * u * u] -> [B * 3, C, t * u, t * u].
        t, u, c = config.plane_tokens, self.upscale, config.plane_channels
        planes = self.unpatchify(out).reshape(batch * 3, t, t, c, u, u)
        planes = planes.permute(0, 3, 1, 4, 2, 5).reshape(batch * 3, c, t * u, t * u)
        planes = planes + self.refine(F.gelu(planes))
        return planes.reshape(batch, 3, c, t * u, t * u)

    def field(self, planes: Tensor, num_samples: int | None = None) -> TriplaneField:
        return TriplaneField(planes, self.decoder, self.config, num_samples)

    def reconstruct(self, views: Tensor, cameras: Cameras, num_samples: int | None = None) -> TriplaneField:
        return self.field(self(views, cameras), num_samples)

    # ------------------------------------------------------------ save / load

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (float32) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"model_type": MODEL_TYPE, **asdict(self.config)}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "model_type": MODEL_TYPE})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> MiniLRM:
        directory = Path(directory)
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"MiniCarve LRM weights not found: {directory} has no {' or '.join(missing)}. "
                f"Train them with `{TRAIN_COMMAND}` (it exports to {LRM_WEIGHTS_DIR}), "
                "or pass the directory of a saved model (weights=DIR)."
            )
        data = json.loads((directory / CONFIG_FILE).read_text())
        if data.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"{directory / CONFIG_FILE} is a {data['model_type']!r} config, not {MODEL_TYPE!r}")
        model = cls(LRMConfig.from_dict(data))
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
        return model.to(device).eval()


# ------------------------------------------------------------------ reconstructor


class LRMReconstructor:
    """The project's ``Reconstructor``: views ``[B, V, 3, H, W]`` + cameras -> a
    :class:`TriplaneField` in one forward pass (eval mode; differentiable when the caller records gradients).

    ``weights``: a directory written by ``save_pretrained`` (default
    :data:`LRM_WEIGHTS_DIR`); ``num_samples`` overrides the ray samples of the
    returned field's renders.
    """

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu",
                 num_samples: int | None = None) -> None:
        self.weights = Path(weights) if weights is not None else LRM_WEIGHTS_DIR
        self.model = MiniLRM.from_pretrained(self.weights, device)
        self.num_samples = num_samples

    def reconstruct(self, views: Tensor, cameras: Cameras) -> TriplaneField:
        # No gradients unless the caller records them (MRCScorer.reward_gradient does).
        return self.model.reconstruct(views, cameras, self.num_samples)
