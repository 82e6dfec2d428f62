"""The 2x2 multi-view grid (Instant3D layout) and its four views.

The grid is the grid families' layout (``policy/families.py``: their one image holds the four
views), split once where they decode (``MultiViewPolicy.decode``), and the picture of four views
in PNG files (:func:`picture`).  Everything between works on views and cameras
(``geometry/views.py``).

Views are in grid order: top-left, top-right, bottom-left, bottom-right, which
the camera rig maps to azimuths 0, 90, 180 and 270 degrees.  Works on any
channel-first tensor ``[..., C, H, W]``; the grid is ``[..., C, 2h, 2w]`` and the
views ``[..., 4, C, h, w]``.
"""

from __future__ import annotations

import numpy as np
import torch

NUM_VIEWS = 4


def grid_to_views(grid: torch.Tensor) -> torch.Tensor:
    """``[..., C, 2h, 2w]`` -> ``[..., 4, C, h, w]`` in grid order."""
    *lead, c, height, width = grid.shape
    if height % 2 or width % 2:
        raise ValueError(f"a 2x2 grid needs even height and width, got {height}x{width}")
    h, w = height // 2, width // 2
    # [..., C, 2, h, 2, w] -> [..., 2(row), 2(col), C, h, w]
    views = grid.reshape(*lead, c, 2, h, 2, w).movedim(-4, -5).movedim(-2, -4)
    return views.reshape(*lead, NUM_VIEWS, c, h, w)


def views_to_grid(views: torch.Tensor) -> torch.Tensor:
    """``[..., 4, C, h, w]`` -> ``[..., C, 2h, 2w]``; the inverse of :func:`grid_to_views`."""
    *lead, v, c, h, w = views.shape
    if v != NUM_VIEWS:
        raise ValueError(f"a 2x2 grid holds {NUM_VIEWS} views, got {v}")
    rows = views.reshape(*lead, 2, 2, c, h, w)  # [..., row, col, C, h, w]
    grid = rows.movedim(-3, -5)  # [..., C, row, col, h, w]
    grid = grid.movedim(-3, -2)  # [..., C, row, h, col, w]
    return grid.reshape(*lead, c, 2 * h, 2 * w)


def picture(views: torch.Tensor | np.ndarray) -> np.ndarray:
    """One sample's views ``[V, 3, h, w]`` as one image ``[H, W, 3]`` for a PNG (same dtype): the
    2x2 grid of four views (the grid families' own image), any other number side by side."""
    # A copy of a read-only array (a Ray object's), which torch would warn about; only reshaped.
    views = torch.from_numpy(np.array(views)) if isinstance(views, np.ndarray) else views
    image = views_to_grid(views) if views.shape[0] == NUM_VIEWS else torch.cat(list(views), dim=-1)
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())


def pictures(views: torch.Tensor | np.ndarray) -> np.ndarray:
    """:func:`picture` of each sample of ``[B, V, 3, h, w]`` -> ``[B, H, W, 3]``."""
    return np.stack([picture(v) for v in views])
