"""Procedural 3D scenes of 1 to 3 primitives, their prompts, and their renders.

A scene is a composition described by a tiny grammar::

    a large red cube
    a small blue sphere on top of a large green cylinder   (also: next to, in front of)
    a red cone, a blue torus and a yellow cube             (three in a row)

Geometry follows the project's camera convention (``geometry.cameras``):
+Z up, the grid's first view looks from +X.  "on top of" stacks along +Z,
"next to" places side by side along Y (left/right in the first view), "in front
of" places the first object towards +X (closer in the first view).  Everything
fits in the unit sphere.

The split holds out whole (colour, shape) combinations: a test prompt names at
least one held-out pair, a train prompt none, so the test set measures
generalisation to unseen combinations.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from policy.grid import views_to_grid
from geometry.cameras import Cameras, grid_rig
from geometry.render import render_field

SHAPES = ("sphere", "cube", "cylinder", "cone", "torus")
COLORS = {
    "red": (0.85, 0.12, 0.10), "green": (0.15, 0.65, 0.20), "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.80, 0.10), "purple": (0.55, 0.20, 0.70), "orange": (0.95, 0.50, 0.10),
}
SIZES = {"small": 0.42, "large": 0.60}  # bounding radius in world units, before fitting the frame
SCENE_RADIUS = 0.95  # every scene is scaled down, if needed, to fit this sphere
RELATIONS = ("on top of", "next to", "in front of")
# (axis, side of the first object): above along +Z; left in the first view (its right is
# +Y); closer to the first view's camera (+X).
RELATION_AXES = {"on top of": ((0, 0, 1), 1.0), "next to": ((0, 1, 0), -1.0), "in front of": ((1, 0, 0), 1.0)}
GAP = 0.04  # space between neighbouring objects


def _noun_phrase(part: "Part", with_size: bool) -> str:
    words = ([part.size] if with_size else []) + [part.color, part.shape]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


@dataclass(frozen=True)
class Part:
    shape: str
    color: str
    size: str


@dataclass(frozen=True)
class Scene:
    parts: tuple[Part, ...]
    relation: str | None = None  # between the two parts of a two-part scene

    @property
    def prompt(self) -> str:
        if len(self.parts) == 1:
            return _noun_phrase(self.parts[0], with_size=True)
        if len(self.parts) == 2:
            first, second = (_noun_phrase(p, with_size=True) for p in self.parts)
            return f"{first} {self.relation} {second}"
        first, second, third = (_noun_phrase(p, with_size=False) for p in self.parts)
        return f"{first}, {second} and {third}"

    def layout(self) -> list[tuple[Part, tuple[float, float, float], float]]:
        """(part, centre, radius) of each part, the whole scene centred at the origin."""
        radii = [SIZES[p.size] for p in self.parts]
        if len(self.parts) == 1:
            centres = [(0.0, 0.0, 0.0)]
        elif len(self.parts) == 2:
            # The first object sits at the `side` end of `axis`, the pair centred on the origin.
            axis, side = RELATION_AXES[self.relation]
            a, b = radii
            half = (2 * a + 2 * b + GAP) / 2
            centres = [tuple(side * (half - a) * np.array(axis)), tuple(-side * (half - b) * np.array(axis))]
            centres = [tuple(float(x) for x in c) for c in centres]
        else:  # three in a row along Y
            width = sum(2 * r for r in radii) + 2 * GAP
            y, centres = -width / 2, []
            for r in radii:
                centres.append((0.0, y + r, 0.0))
                y += 2 * r + GAP
        # Shrink the whole scene (never grow it) so that it fits the frame of every
        # camera of the rig: objects stay as large in the views as they can be.
        extent = max(float(np.linalg.norm(c)) + r for c, r in zip(centres, radii))
        scale = min(1.0, SCENE_RADIUS / extent)
        centres = [tuple(float(scale * x) for x in c) for c in centres]
        radii = [scale * r for r in radii]
        return list(zip(self.parts, centres, radii))


def all_parts() -> list[Part]:
    return [Part(s, c, z) for s in SHAPES for c in COLORS for z in SIZES]


def held_out_pairs(seed: int = 0) -> set[tuple[str, str]]:
    """One (colour, shape) pair per colour, never seen in training."""
    rng = np.random.default_rng(seed)
    shapes = rng.permutation(len(SHAPES))
    return {(color, SHAPES[shapes[i % len(SHAPES)]]) for i, color in enumerate(COLORS)}


def is_test_scene(scene: Scene, held_out: set[tuple[str, str]]) -> bool:
    return any((p.color, p.shape) in held_out for p in scene.parts)


def random_scene(rng: np.random.Generator) -> Scene:
    parts = all_parts()
    count = int(rng.choice([1, 2, 3], p=[0.25, 0.5, 0.25]))
    chosen = tuple(parts[i] for i in rng.integers(len(parts), size=count))
    if count == 3:  # rows do not name sizes: one scene per prompt
        chosen = tuple(Part(p.shape, p.color, "large") for p in chosen)
    return Scene(chosen, RELATIONS[int(rng.integers(len(RELATIONS)))] if count == 2 else None)


def scene_split(num_train: int, num_test: int, seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """Disjoint train and test scenes with distinct prompts; deterministic from the seed."""
    held_out = held_out_pairs(seed)
    rng = np.random.default_rng([seed, 1])
    train, test, seen = [], [], set()
    for _ in itertools.count():
        if len(train) >= num_train and len(test) >= num_test:
            return train, test
        scene = random_scene(rng)
        if scene.prompt in seen:
            continue
        seen.add(scene.prompt)
        bucket, limit = (test, num_test) if is_test_scene(scene, held_out) else (train, num_train)
        if len(bucket) < limit:
            bucket.append(scene)
    raise AssertionError("unreachable")


# ---- rendering ------------------------------------------------------------------------
def _sdf(shape: str, p: torch.Tensor, r: float) -> torch.Tensor:
    """Signed distance (approximate for cone and torus) of a primitive of bounding radius r
    centred at the origin, axis +Z."""
    xy = p[..., :2].norm(dim=-1)
    z = p[..., 2]
    if shape == "sphere":
        return p.norm(dim=-1) - r
    if shape == "cube":
        q = p.abs() - r * 0.72
        return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)
    if shape == "cylinder":
        return torch.maximum(xy - r * 0.7, z.abs() - r * 0.7)
    if shape == "cone":  # base radius 0.8r at z = -0.75r, apex at z = +0.75r
        radius = 0.8 * r * (0.75 * r - z) / (1.5 * r)
        return torch.maximum(xy - radius.clamp(min=0), z.abs() - 0.75 * r)
    if shape == "torus":  # a ring lying flat
        return torch.sqrt((xy - 0.68 * r) ** 2 + z**2) - 0.3 * r
    raise ValueError(f"unknown shape {shape!r}; shapes are {', '.join(SHAPES)}")


class SceneField:
    """A scene as a radiance field: density from the union of SDFs, colours shaded by a
    hemisphere light (sky above, dark ground below).

    The light is fixed in the world and symmetric about +Z, so shading is part of the
    object, identical from every camera (a consistent 3D object), and a sphere looks
    the same from every azimuth of the rig.
    """

    def __init__(self, scene: Scene, sharpness: float = 60.0, max_density: float = 80.0,
                 ambient: float = 0.55):
        self.layout = scene.layout()
        self.sharpness, self.max_density, self.ambient = sharpness, max_density, ambient

    def _sdfs(self, points: torch.Tensor) -> torch.Tensor:
        return torch.stack([_sdf(part.shape, points - torch.tensor(c, dtype=points.dtype), r)
                            for part, c, r in self.layout], dim=-1)  # [..., P]

    def __call__(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sdfs = self._sdfs(points)
        distance, nearest = sdfs.min(dim=-1)
        # Normal from forward differences of the union's distance (its z part is all we need
        # for the hemisphere light, but the normal must be normalised over all three axes).
        step = 1e-3
        offsets = torch.eye(3, dtype=points.dtype) * step
        gradient = torch.stack([self._sdfs(points + offsets[i]).min(dim=-1).values - distance
                                for i in range(3)], dim=-1)
        normal_z = gradient[..., 2] / gradient.norm(dim=-1).clamp(min=1e-8)
        shade = self.ambient + (1 - self.ambient) * normal_z
        albedo = torch.tensor([COLORS[part.color] for part, _, _ in self.layout], dtype=points.dtype)
        density = self.max_density * torch.sigmoid(-self.sharpness * distance)
        return density, (albedo[nearest] * shade[..., None]).clamp(0, 1)


def render_scene(scene: Scene, size: int = 32, cameras: Cameras | None = None,
                 num_samples: int = 64) -> torch.Tensor:
    """Views ``[V, 3, size, size]`` in [0, 1] on white, at the grid rig by default."""
    with torch.no_grad():
        return render_field(SceneField(scene), cameras or grid_rig(), size, size, num_samples).clamp(0, 1)


def render_grid(scene: Scene, view_size: int = 32) -> torch.Tensor:
    """The 2x2 grid ``[3, 2*view_size, 2*view_size]`` of the grid rig's four views."""
    return views_to_grid(render_scene(scene, view_size))
