"""The 2x2 multi-view grid (Instant3D layout) and its four views.

Views are in grid order: top-left, top-right, bottom-left, bottom-right, which
the camera rig maps to azimuths 0, 90, 180 and 270 degrees.  Works on any
channel-first tensor ``[..., C, H, W]``; the grid is ``[..., C, 2h, 2w]`` and the
views ``[..., 4, C, h, w]``.
"""

from __future__ import annotations

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
