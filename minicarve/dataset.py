"""Rendered MiniCarve data, cached on disk, and the prompt files the runs use.

Every trainer of MiniCarve (base model, LRM, alignment evaluator) draws its
scenes from :func:`minicarve.scenes.scene_split` with the same seed, so the test
prompts (held-out colour-shape pairs) are never seen by any of them.

Renders are cached under ``~/.cache/carve3d/minicarve/`` (override with
``CARVE3D_CACHE``), keyed by everything that changes them, and written
atomically, so an interrupted render is simply redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from minicarve import scenes as scenes_module
from minicarve.scenes import Scene, render_grid, render_scene, scene_split

SPLIT_SEED = 0
# Sizes of the split.  The train split is the pool every trainer draws from; the RL
# train prompts are its first NUM_RL_TRAIN_PROMPTS (Carve3D trains on 30 prompts).
NUM_TRAIN_SCENES = 8000
NUM_TEST_SCENES = 250
NUM_RL_TRAIN_PROMPTS = 30
# Validation prompts: the next train scenes after the RL prompts (the training distribution,
# never a test prompt), for choosing settings; the test prompts are evaluated once.
NUM_VAL_PROMPTS = 64
VIEW_SIZE = 32  # pixels per view; the grid is 2 * VIEW_SIZE square

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROMPT_DIR = PROJECT_ROOT / "data" / "minicarve"
TRAIN_PROMPTS = PROMPT_DIR / "train_prompts.txt"
TEST_PROMPTS = PROMPT_DIR / "test_prompts.txt"
VAL_PROMPTS = PROMPT_DIR / "val_prompts.txt"


def cache_dir() -> Path:
    root = os.environ.get("CARVE3D_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "carve3d") / "minicarve"


def split(num_train: int = NUM_TRAIN_SCENES, num_test: int = NUM_TEST_SCENES) -> tuple[list[Scene], list[Scene]]:
    """The project's one MiniCarve split (seed ``SPLIT_SEED``)."""
    return scene_split(num_train, num_test, seed=SPLIT_SEED)


def scene_from_prompt(prompt: str) -> Scene:
    """The scene a MiniCarve prompt describes (inverse of ``Scene.prompt``)."""
    lookup = _prompt_lookup()
    if prompt not in lookup:
        raise KeyError(f"{prompt!r} is not a MiniCarve prompt; prompts come from the grammar in "
                       "minicarve/scenes.py (e.g. 'a large red cube')")
    return lookup[prompt]


_LOOKUP: dict[str, Scene] = {}


def _prompt_lookup() -> dict[str, Scene]:
    if not _LOOKUP:
        parts = scenes_module.all_parts()
        for a in parts:
            _LOOKUP[Scene((a,)).prompt] = Scene((a,))
            for b in parts:
                for relation in scenes_module.RELATIONS:
                    s = Scene((a, b), relation)
                    _LOOKUP[s.prompt] = s
        # Three-part prompts do not name sizes; the grammar renders them "large".
        large = [p for p in parts if p.size == "large"]
        for a in large:
            for b in large:
                for c in large:
                    s = Scene((a, b, c))
                    _LOOKUP[s.prompt] = s
    return _LOOKUP


def _render_key(name: str, scenes: list[Scene], view_size: int) -> str:
    text = json.dumps([name, view_size, [s.prompt for s in scenes],
                       Path(scenes_module.__file__).read_text()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rendered_grids(scenes: list[Scene], name: str, view_size: int = VIEW_SIZE,
                   progress: bool = True) -> torch.Tensor:
    """uint8 grids ``[N, 3, 2*view_size, 2*view_size]`` of ``scenes``, rendered once and cached.

    The cache key includes the scene module's source, so changing how scenes look
    re-renders instead of training on stale images.
    """
    path = cache_dir() / f"{name}-{len(scenes)}-{_render_key(name, scenes, view_size)}.pt"
    if path.exists():
        return torch.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grids = torch.empty(len(scenes), 3, 2 * view_size, 2 * view_size, dtype=torch.uint8)
    start = time.time()
    for i, scene in enumerate(scenes):
        grids[i] = (render_grid(scene, view_size) * 255).round().to(torch.uint8)
        if progress and (i + 1) % 500 == 0:
            rate = (i + 1) / (time.time() - start)
            print(f"rendered {i + 1}/{len(scenes)} {name} grids ({rate:.0f}/s)", file=sys.stderr, flush=True)
    tmp = path.with_suffix(f".partial-{os.getpid()}")
    torch.save(grids, tmp)
    tmp.rename(path)
    return grids


def write_prompt_files() -> None:
    """Write ``data/minicarve/{train,val,test}_prompts.txt`` from the split (deterministic)."""
    train, test = split()
    PROMPT_DIR.mkdir(parents=True, exist_ok=True)
    TRAIN_PROMPTS.write_text("\n".join(s.prompt for s in train[:NUM_RL_TRAIN_PROMPTS]) + "\n")
    validation = train[NUM_RL_TRAIN_PROMPTS:NUM_RL_TRAIN_PROMPTS + NUM_VAL_PROMPTS]
    VAL_PROMPTS.write_text("\n".join(s.prompt for s in validation) + "\n")
    TEST_PROMPTS.write_text("\n".join(s.prompt for s in test) + "\n")


if __name__ == "__main__":
    write_prompt_files()
    print(f"wrote {TRAIN_PROMPTS}, {VAL_PROMPTS} and {TEST_PROMPTS}")


def ground_truth_views(prompts: list[str]):
    """``learner.evaluate --model ground-truth``: each prompt's scene rendered by the project's
    renderer at the grid rig, uint8 views ``[N, 4, 3, h, w]`` and the rig (deterministic: one
    render per distinct prompt, repeated)."""
    import numpy as np

    from geometry.cameras import grid_rig
    from geometry.views import views_as_uint8

    cache: dict[str, np.ndarray] = {}
    for prompt in prompts:
        if prompt not in cache:
            cache[prompt] = views_as_uint8(render_scene(scene_from_prompt(prompt), VIEW_SIZE)).numpy()
    return np.stack([cache[p] for p in prompts]), grid_rig()
