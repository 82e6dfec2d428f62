"""Prompt-image alignment for MiniCarve: the role CLIP score plays for real models.

Does a generated 2x2 grid show what its prompt says?  A small CNN reads the grid
and predicts the scene's attributes, factorised so that (colour, shape) pairs
never seen in training are still recognisable: colour and shape are separate
heads, and they read separate inputs (:func:`palette_decompose`): the geometry
heads a colour-free coverage/shading image, the colour heads a coarse,
shape-free map of where each palette colour is.  The heads:

* ``count``: number of parts, 1, 2 or 3;
* ``relation``: "on top of" / "next to" / "in front of" (two-part scenes only);
* per part slot ``i`` (0 = the part the prompt names first): ``part{i}.shape``,
  ``part{i}.color`` and ``part{i}.size`` (size only where the prompt names it:
  one- and two-part prompts do, three-part rows do not).

Every head has a ``"none"`` class for what is absent (no relation, empty slot).
:class:`AlignmentEvaluator` scores a grid against its prompt as the fraction of
the prompt's stated attributes that the classifier recovers;
:func:`chance_accuracy` is the same average for uniform guessing.

Weights: ``minicarve/weights/alignment/`` (``config.json`` + ``model.safetensors``),
trained by ``python -m minicarve.train_alignment`` on the train split's renders.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from geometry.cameras import Cameras, grid_rig
from geometry.views import same_cameras, views_as_float
from minicarve.dataset import scene_from_prompt
from policy.grid import views_to_grid
from minicarve.scenes import COLORS, RELATIONS, SHAPES, SIZES, Scene

NONE = "none"
MAX_PARTS = 3
COUNTS = ("1", "2", "3")
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "alignment"
IGNORE = -100  # target index of an attribute the prompt does not state (not trained on)


class NotAMiniCarvePrompt(ValueError):
    """The alignment evaluator only understands prompts of the MiniCarve grammar."""


def attribute_vocab() -> dict[str, tuple[str, ...]]:
    """Every head of the classifier and its classes, in a fixed order."""
    vocab: dict[str, tuple[str, ...]] = {"count": COUNTS, "relation": (NONE, *RELATIONS)}
    for slot in range(MAX_PARTS):
        vocab[f"part{slot}.shape"] = (NONE, *SHAPES)
        vocab[f"part{slot}.color"] = (NONE, *COLORS)
        vocab[f"part{slot}.size"] = (NONE, *SIZES)
    return vocab


def stated_attributes(scene_or_prompt: Scene | str) -> dict[str, str]:
    """The attributes a prompt states, ``{head: value}``: the count, the relation if
    it has one, and each named part's shape, colour and (when named) size.

    A prompt that is not a MiniCarve prompt raises :class:`NotAMiniCarvePrompt`
    (a ``ValueError``) naming the prompt and the grammar.
    """
    if isinstance(scene_or_prompt, str):
        try:
            scene = scene_from_prompt(scene_or_prompt)
        except KeyError as error:
            raise NotAMiniCarvePrompt(error.args[0]) from None
    else:
        scene = scene_or_prompt
    count = len(scene.parts)
    attrs = {"count": str(count)}
    if count == 2:
        attrs["relation"] = scene.relation
    for slot, part in enumerate(scene.parts):
        attrs[f"part{slot}.shape"] = part.shape
        attrs[f"part{slot}.color"] = part.color
        if count < 3:  # three-part rows do not name sizes
            attrs[f"part{slot}.size"] = part.size
    return attrs


def scene_targets(scene: Scene) -> dict[str, int]:
    """Training targets of every head: stated attributes, ``"none"`` for absent ones,
    ``IGNORE`` for a present part's unnamed size (three-part rows)."""
    vocab = attribute_vocab()
    stated = stated_attributes(scene)
    targets = {}
    for head, classes in vocab.items():
        if head in stated:
            targets[head] = classes.index(stated[head])
        elif head.endswith(".size") and int(head[4]) < len(scene.parts):
            targets[head] = IGNORE
        else:
            targets[head] = classes.index(NONE)
    return targets


def targets_tensor(scenes: Sequence[Scene]) -> dict[str, Tensor]:
    rows = [scene_targets(s) for s in scenes]
    return {head: torch.tensor([r[head] for r in rows], dtype=torch.long) for head in attribute_vocab()}


def _num_values(head: str) -> int:
    """How many values a stated attribute can take (its classes less "none")."""
    return len([c for c in attribute_vocab()[head] if c != NONE])


def chance_accuracy(prompts: Sequence[str]) -> float:
    """Expected :meth:`AlignmentEvaluator.score` of guessing every stated attribute
    uniformly over its possible values (count 1/3, relation 1/3, shape 1/5,
    colour 1/6, size 1/2), averaged per prompt then over prompts."""
    if not prompts:
        raise ValueError("chance_accuracy needs at least one prompt")
    per_prompt = []
    for prompt in prompts:
        stated = stated_attributes(prompt)
        per_prompt.append(float(np.mean([1.0 / _num_values(head) for head in stated])))
    return float(np.mean(per_prompt))


# ------------------------------------------------------------------------- model


def palette_decompose(grids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Split grids ``[B, 3, H, W]`` in [0, 1] (white background) into colour-free
    geometry and shape-free colour, using the MiniCarve palette.

    Every pixel of a render is ``(1 - a) * white + a * s * albedo``: coverage ``a``,
    shading ``s`` and one palette albedo.  Per pixel and palette colour this is a
    2-parameter least-squares fit (``u = 1 - a``, ``w = a * s``); the colour with
    the smallest residual (and ``w >= 0``) wins.  Returns coverage ``a [B, 1, H, W]``,
    shaded coverage ``w [B, 1, H, W]`` (both colour-free) and the palette
    membership ``[B, K, H, W]`` (one-hot of the winning colour times ``a``).
    Off-palette pixels (generated images) get their nearest palette colour.
    """
    palette = torch.tensor(list(COLORS.values()), dtype=grids.dtype, device=grids.device)  # [K, 3]
    total = grids.sum(dim=1, keepdim=True)  # [B, 1, H, W]
    dots = torch.einsum("bchw,kc->bkhw", grids, palette)  # [B, K, H, W]
    sums, norms = palette.sum(dim=1)[None, :, None, None], palette.pow(2).sum(dim=1)[None, :, None, None]
    det = 3 * norms - sums**2
    u = (norms * total - sums * dots) / det
    w = (3 * dots - sums * total) / det
    fit = u[:, :, None] + w[:, :, None] * palette[None, :, :, None, None]  # [B, K, 3, H, W]
    residual = (grids[:, None] - fit).pow(2).sum(dim=2) + 1e3 * (w < 0)
    best = residual.argmin(dim=1, keepdim=True)  # [B, 1, H, W]
    coverage = (1 - u.gather(1, best)).clamp(0, 1)
    shaded = w.gather(1, best).clamp(0, 1)
    membership = torch.zeros_like(dots).scatter_(1, best, 1.0) * coverage
    return coverage, shaded, membership


@dataclass
class AlignmentConfig:
    view_size: int = 32  # grid is 2 * view_size square
    # Geometry branch (count, relation, shapes, sizes): sees coverage and shading only, no colour.
    geometry_channels: tuple[int, ...] = (16, 32, 64, 128)  # conv blocks, each halves the resolution
    # Colour branch (colours): sees palette membership only, average-pooled by colour_pool
    # (coarse blobs: where each colour is, not the shape's details).
    colour_channels: tuple[int, ...] = (16, 32, 32)
    colour_pool: int = 2
    bottleneck: int = 32  # 1x1 conv before each branch's spatial flatten (keeps where things are)
    hidden: int = 128
    dropout: float = 0.1
    vocab: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in attribute_vocab().items()})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "AlignmentConfig":
        data = dict(data)
        for key in ("geometry_channels", "colour_channels"):
            data[key] = tuple(data[key])
        return cls(**data)


def _branch(in_channels: int, channels: Sequence[int], bottleneck: int) -> nn.Sequential:
    layers, width = [], in_channels
    for out in channels:
        layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        width = out
    return nn.Sequential(*layers, nn.Conv2d(width, bottleneck, 1), nn.ReLU(inplace=True), nn.Flatten())


class AlignmentClassifier(nn.Module):
    """Grid ``[B, 3, 2v, 2v]`` (uint8 or float in [0, 1]) -> logits per head.

    Factorised so that unseen (colour, shape) pairs are read as well as seen ones:
    the grid is split by :func:`palette_decompose`; the shape, size, count and
    relation heads read a colour-free geometry branch, the colour heads a
    shape-free (coarse) colour branch.  Neither can learn which colours go with
    which shapes in the training set.
    """

    def __init__(self, config: AlignmentConfig | None = None) -> None:
        super().__init__()
        self.config = config or AlignmentConfig()
        cfg = self.config
        if {k: list(v) for k, v in attribute_vocab().items()} != cfg.vocab:
            raise ValueError("config vocab does not match minicarve.scenes (SHAPES/COLORS/SIZES/RELATIONS changed?)")
        grid = 2 * cfg.view_size
        self.geometry = _branch(2, cfg.geometry_channels, cfg.bottleneck)
        self.colour = _branch(len(COLORS), cfg.colour_channels, cfg.bottleneck)
        geometry_side = grid // 2 ** len(cfg.geometry_channels)
        colour_side = grid // cfg.colour_pool // 2 ** len(cfg.colour_channels)
        self.geometry_mlp = nn.Sequential(nn.Linear(cfg.bottleneck * geometry_side**2, cfg.hidden),
                                          nn.ReLU(inplace=True), nn.Dropout(cfg.dropout))
        self.colour_mlp = nn.Sequential(nn.Linear(cfg.bottleneck * colour_side**2, cfg.hidden),
                                        nn.ReLU(inplace=True), nn.Dropout(cfg.dropout))
        self.heads = nn.ModuleDict({self._key(h): nn.Linear(cfg.hidden, len(c)) for h, c in cfg.vocab.items()})

    @staticmethod
    def _key(head: str) -> str:
        return head.replace(".", "_")  # ModuleDict keys cannot contain dots

    def prepare(self, grids: Tensor) -> Tensor:
        """uint8 or float grids -> float in [0, 1], checked."""
        size = 2 * self.config.view_size
        if grids.ndim != 4 or tuple(grids.shape[1:]) != (3, size, size):
            raise ValueError(f"expected grids [B, 3, {size}, {size}], got {tuple(grids.shape)}")
        return views_as_float(grids).to(next(self.parameters()).device)

    def forward(self, grids: Tensor) -> dict[str, Tensor]:
        coverage, shaded, membership = palette_decompose(self.prepare(grids))
        geometry = self.geometry_mlp(self.geometry(torch.cat([coverage, shaded], dim=1) * 2.0 - 1.0))
        if self.config.colour_pool > 1:
            membership = F.avg_pool2d(membership, self.config.colour_pool)
        colour = self.colour_mlp(self.colour(membership))
        return {h: self.heads[self._key(h)](colour if h.endswith(".color") else geometry) for h in self.config.vocab}

    @torch.no_grad()
    def predict(self, grids: Tensor, batch_size: int = 256) -> list[dict[str, str]]:
        """Most likely value of every head, per grid."""
        was_training = self.training
        self.eval()
        out: list[dict[str, str]] = []
        try:
            for start in range(0, len(grids), batch_size):
                logits = self(grids[start:start + batch_size])
                indices = {h: l.argmax(dim=-1).tolist() for h, l in logits.items()}
                for row in range(len(next(iter(indices.values())))):
                    out.append({h: self.config.vocab[h][indices[h][row]] for h in indices})
        finally:
            self.train(was_training)
        return out

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(self.config.to_json() + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path = DEFAULT_WEIGHTS,
                        device: str | torch.device = "cpu") -> "AlignmentClassifier":
        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory / name} not found; train it with python -m minicarve.train_alignment")
        config = AlignmentConfig.from_dict(json.loads((directory / "config.json").read_text()))
        model = cls(config)
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.to(device).eval()


# --------------------------------------------------------------------- evaluator


class AlignmentEvaluator:
    """``score(grids, prompts)``: per-sample fraction of each prompt's stated
    attributes (count, relation, each named part's colour, shape and size) that
    the classifier recovers from the grid, in [0, 1]."""

    def __init__(self, model: AlignmentClassifier | None = None, weights: str | Path = DEFAULT_WEIGHTS,
                 device: str | torch.device = "cpu") -> None:
        self.model = model if model is not None else AlignmentClassifier.from_pretrained(weights, device)
        self.model.eval()

    def details(self, grids: Tensor, prompts: Sequence[str]) -> list[dict[str, bool]]:
        """Per sample, ``{attribute: recovered?}`` over the prompt's stated attributes."""
        if len(grids) != len(prompts):
            raise ValueError(f"{len(grids)} grids but {len(prompts)} prompts")
        stated = [stated_attributes(p) for p in prompts]  # validates prompts before any compute
        predictions = self.model.predict(grids)
        return [{h: pred[h] == v for h, v in s.items()} for s, pred in zip(stated, predictions)]

    def score(self, grids: Tensor, prompts: Sequence[str]) -> Tensor:
        """Per-sample accuracy ``[B]`` in [0, 1]."""
        return torch.tensor([float(np.mean(list(d.values()))) for d in self.details(grids, prompts)])

    @staticmethod
    def chance(prompts: Sequence[str]) -> float:
        return chance_accuracy(prompts)


def views_evaluator(weights: str | Path = DEFAULT_WEIGHTS, device: str | torch.device = "cpu"):
    """``reward.alignment=minicarve``: the shipped classifier as the reward's alignment function,
    ``(uint8 views [B, 4, 3, h, w], cameras, prompts) -> [B]``.  The classifier was trained on
    the 2x2 grid of the grid rig's four views, so it reads the views as that grid."""
    evaluator = AlignmentEvaluator(weights=weights, device=device)
    rig = grid_rig()

    def score(views: Tensor, cameras: Cameras, prompts: Sequence[str]) -> np.ndarray:
        if not same_cameras(cameras, rig):
            raise ValueError(f"reward.alignment=minicarve reads the four views of the grid rig "
                             f"(geometry.cameras.grid_rig), got {cameras.num_views} other cameras; set "
                             "reward.alignment=null (or your own evaluator) for this model family")
        return evaluator.score(views_to_grid(views), prompts).numpy()

    return score


def check_prompts(prompts: Sequence[str]) -> None:
    """The evaluator reads MiniCarve prompts only: a ValueError naming the first other one."""
    for prompt in prompts:
        try:
            scene_from_prompt(prompt)
        except KeyError:
            raise ValueError(
                f"reward.alignment=minicarve scores MiniCarve prompts only, and {prompt!r} is not one; "
                "set reward.alignment=null (or your own evaluator) for other prompts") from None
