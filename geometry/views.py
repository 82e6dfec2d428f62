"""Views and their cameras: what a model family generates and what a reward scores.

One contract between the policy and the reward, whatever the model's own layout (a 2x2
grid is one family's, ``policy/grid.py``):

* ``views`` ``[B, V, 3, h, w]``: B samples of V views each, channel-first RGB on a white
  background.  ``uint8`` (0..255) where they cross actors: the object store holds the
  same bytes as the generated images, no more.  ``float`` in [0, 1] where they are
  computed on (MRC, the reward's gradient).
* ``cameras``: a :class:`geometry.cameras.Cameras` of the V cameras, shared by the B
  samples, in the project's one convention (``geometry/cameras.py``).  View ``v`` was
  taken by camera ``v``.

Grids exist only at the edges: PNG files and the MRC command line on grid images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from geometry.cameras import Cameras


def check_views(views: Tensor, cameras: Cameras, what: str = "views") -> None:
    """A ValueError unless ``views`` is ``[..., V, 3, h, w]`` with V = the cameras' count."""
    num_views = cameras.num_views
    if views.ndim < 4 or views.shape[-4] != num_views or views.shape[-3] != 3:
        raise ValueError(f"expected {what} [B, {num_views}, 3, h, w] for {num_views} cameras, "
                         f"got {tuple(views.shape)}")
    if views.dtype != torch.uint8 and not views.is_floating_point():
        raise ValueError(f"{what} must be uint8 (0..255) or float in [0, 1], got {views.dtype}")


def views_as_float(views: Tensor) -> Tensor:
    """float32 views in [0, 1]: uint8 divided by 255, float as they are."""
    return views.float() / 255.0 if views.dtype == torch.uint8 else views.float()


def views_as_uint8(views: Tensor) -> Tensor:
    """uint8 views of float views in [0, 1] (clamped, rounded to the nearest level)."""
    return (views.clamp(0.0, 1.0) * 255).round().to(torch.uint8)


def same_cameras(a: Cameras, b: Cameras) -> bool:
    """Whether two camera sets are the same cameras (one batch of views has one set)."""
    return a.fov_deg == b.fov_deg and a.c2w.shape == b.c2w.shape and torch.equal(a.c2w.cpu(), b.c2w.cpu())
