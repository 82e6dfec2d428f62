"""Differentiable 3D Gaussian splatting in plain PyTorch (CPU and GPU, no compiled extension).

Gaussians (``Gaussians``), all in the project's world (geometry/cameras.py):

* ``means [N, 3]``: centres.
* ``scales [N, 3]``: standard deviations along the Gaussian's own axes, positive (not log).
* ``rotations [N, 4]``: quaternions ``(w, x, y, z)``, the order of 3DGS's rasteriser and of gsplat;
  they are normalised here, so any non-zero quaternion is accepted. The covariance is
  ``R S S^T R^T`` with ``R`` the quaternion's rotation and ``S = diag(scales)``.
* ``opacities [N]`` in [0, 1] and ``colors [N, 3]`` in [0, 1] (view-independent, no SH).

All five may carry one leading batch dimension ``B`` (B independent scenes, same cameras).

Rendering (EWA splatting as in 3DGS, Kerbl et al. 2023), for each camera:

1. Move the means into the OpenCV camera frame; a Gaussian with depth ``z < near`` is dropped.
2. Project the covariance with the perspective Jacobian: ``Sigma_2D = J W Sigma W^T J^T``
   (W the world-to-camera rotation, J the Jacobian of ``(f x/z + W/2, f y/z + H/2)`` at the
   mean), plus ``dilation`` px^2 on the diagonal (3DGS's low-pass filter, 0.3 by default).
   As in 3DGS, ``x/z`` and ``y/z`` inside J are clamped to 1.3 times the half field of view,
   which only changes Gaussians far outside the image.
3. At every pixel centre ``p`` (pixel ``(i, j)`` at ``(i + 0.5, j + 0.5)``):
   ``alpha = min(max_alpha, opacity * exp(-0.5 d^T Sigma_2D^{-1} d))``, ``d = p - mean_2D``.
4. Sort by depth and composite front to back: ``weight_i = alpha_i prod_{j<i} (1 - alpha_j)``;
   the transmittance left shows ``background``.

Differences from the 3DGS CUDA rasteriser, on purpose: no 1/255 alpha cut-off and no early
stop at transmittance 1e-4 (every Gaussian reaches every pixel, so the image is smooth in every
parameter and matches the formulas above to float precision), and no tiles. The cost is dense:
``pixels x Gaussians`` per camera, chunked over Gaussians (``chunk_size``) so memory stays
bounded without gradients; with gradients autograd keeps every chunk. That suits tests and small
scenes; LGM-sized ones (16k-65k Gaussians at 256-512 px) want ``backend="gsplat"`` on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from geometry.cameras import Cameras

Backend = Literal["torch", "gsplat", "auto"]

# 3DGS clamps the projected position used in the Jacobian to 1.3x the half field of view, so
# Gaussians far off-screen do not get huge 2D footprints (cuda_rasterizer/forward.cu).
JACOBIAN_CLAMP = 1.3
# Pixels x Gaussians evaluated at once (per camera) when chunk_size is not given: ~16 MB per
# float32 [P, C] tensor, as render.py bounds its sample points.
MAX_PAIRS_PER_CHUNK = 2**22


@dataclass(frozen=True, eq=False)  # eq on tensors is ambiguous
class Gaussians:
    """A set of 3D Gaussians (see the module docstring for shapes and conventions)."""

    means: Tensor  # [(B,) N, 3]
    scales: Tensor  # [(B,) N, 3], positive standard deviations
    rotations: Tensor  # [(B,) N, 4], quaternions (w, x, y, z)
    opacities: Tensor  # [(B,) N] in [0, 1]
    colors: Tensor  # [(B,) N, 3] in [0, 1]

    @property
    def batched(self) -> bool:
        return self.means.dim() == 3

    def __getitem__(self, index: int) -> Gaussians:
        """Scene ``index`` of a batched set."""
        return Gaussians(self.means[index], self.scales[index], self.rotations[index],
                         self.opacities[index], self.colors[index])

    @staticmethod
    def from_lgm(features: Tensor) -> Gaussians:
        """Unpack LGM's ``[..., N, 14]`` layout: position 0:3, opacity 3:4, scale 4:7,
        rotation 7:11 (w, x, y, z), rgb 11:14, all already activated (3DTopia/LGM
        core/models.py ``forward_gaussians``). Positions stay in LGM's world; see
        geometry/conventions.py to move them into the project's."""
        return Gaussians(features[..., 0:3], features[..., 4:7], features[..., 7:11],
                         features[..., 3], features[..., 11:14])


def quaternion_to_rotation(quaternions: Tensor) -> Tensor:
    """Rotation matrices ``[..., 3, 3]`` of quaternions ``[..., 4]`` (w, x, y, z), normalised first."""
    w, x, y, z = torch.nn.functional.normalize(quaternions, dim=-1).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(*quaternions.shape[:-1], 3, 3)


def rotation_to_quaternion(rotation: Tensor) -> Tensor:
    """The unit quaternion (w, x, y, z) with ``w >= 0`` of one rotation matrix ``[3, 3]``.

    Shepperd's method: branch on the largest of ``w, x, y, z`` so the square root never
    sees a small argument. Meant for fixed frame changes, not for differentiation.
    """
    m = rotation.to(torch.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    candidates = torch.stack([trace, m[0, 0], m[1, 1], m[2, 2]])
    k = int(torch.argmax(candidates))
    if k == 0:
        s = 2 * torch.sqrt(1 + trace)
        q = [s / 4, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif k == 1:
        s = 2 * torch.sqrt(1 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, s / 4, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif k == 2:
        s = 2 * torch.sqrt(1 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, s / 4, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2 * torch.sqrt(1 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, s / 4]
    quaternion = torch.stack(q)
    quaternion = quaternion if quaternion[0] >= 0 else -quaternion
    return quaternion.to(rotation.dtype)


def quaternion_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product ``a * b`` of quaternions ``[..., 4]`` (w, x, y, z): rotate by b, then a."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], dim=-1)


def transform_gaussians(gaussians: Gaussians, rotation: Tensor, scale: float = 1.0) -> Gaussians:
    """The same scene in a world where ``x_new = scale * rotation @ x_old``.

    Means rotate and scale, each Gaussian's orientation is composed with ``rotation``,
    standard deviations scale; opacities and colours are unchanged.
    """
    rotation = rotation.to(gaussians.means)
    q = rotation_to_quaternion(rotation).expand_as(gaussians.rotations)
    return Gaussians(
        means=scale * gaussians.means @ rotation.T,
        scales=scale * gaussians.scales,
        rotations=quaternion_multiply(q, torch.nn.functional.normalize(gaussians.rotations, dim=-1)),
        opacities=gaussians.opacities,
        colors=gaussians.colors,
    )


def covariances(scales: Tensor, rotations: Tensor) -> Tensor:
    """World covariances ``R S S^T R^T``, ``[..., N, 3, 3]``."""
    rs = quaternion_to_rotation(rotations) * scales[..., None, :]  # R @ diag(scales)
    return rs @ rs.transpose(-1, -2)


@dataclass(frozen=True)
class Splats:
    """Gaussians projected into ``V`` cameras (all ``[V, N, ...]``)."""

    means_2d: Tensor  # [V, N, 2] pixel coordinates (x = column, y = row)
    conics: Tensor  # [V, N, 3] (a, b, c) of the inverse 2D covariance [[a, b], [b, c]]
    depths: Tensor  # [V, N] camera-frame z
    visible: Tensor  # [V, N] bool: in front of the near plane


def project_gaussians(
    gaussians: Gaussians, cameras: Cameras, height: int, width: int, near: float, dilation: float
) -> Splats:
    """Step 1-2 of the module docstring for one (unbatched) set of Gaussians."""
    dtype = gaussians.means.dtype
    c2w = cameras.c2w.to(device=gaussians.means.device, dtype=dtype)
    rotation_wc = c2w[:, :3, :3].transpose(1, 2)  # world-to-camera rotation: inverse of a rotation
    translation_wc = -(rotation_wc @ c2w[:, :3, 3:4])[..., 0]
    local = torch.einsum("vij,nj->vni", rotation_wc, gaussians.means) + translation_wc[:, None, :]
    x, y, z = local.unbind(-1)
    visible = z > near
    z = torch.where(visible, z, torch.ones_like(z))  # keeps 1/z finite (and its gradient) for dropped ones
    focal = cameras.focal_px(height)
    limit_x = JACOBIAN_CLAMP * 0.5 * width / focal
    limit_y = JACOBIAN_CLAMP * 0.5 * height / focal
    u, v = (x / z).clamp(-limit_x, limit_x), (y / z).clamp(-limit_y, limit_y)
    zeros = torch.zeros_like(z)
    jacobian = focal / z[..., None, None] * torch.stack([
        torch.stack([torch.ones_like(z), zeros, -u], dim=-1),
        torch.stack([zeros, torch.ones_like(z), -v], dim=-1),
    ], dim=-2)  # [V, N, 2, 3]
    m = jacobian @ rotation_wc[:, None]  # J W
    cov_2d = m @ covariances(gaussians.scales, gaussians.rotations)[None] @ m.transpose(-1, -2)
    a = cov_2d[..., 0, 0] + dilation
    b = cov_2d[..., 0, 1]
    c = cov_2d[..., 1, 1] + dilation
    det = a * c - b * b
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)
    centre = torch.tensor([width / 2, height / 2], dtype=dtype, device=local.device)
    means_2d = focal * torch.stack([x / z, y / z], dim=-1) + centre
    return Splats(means_2d, conics, local[..., 2], visible)


def pixel_centres(height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[H * W, 2]`` (x, y) centres of the pixels in row-major order."""
    rows = torch.arange(height, dtype=dtype, device=device) + 0.5
    cols = torch.arange(width, dtype=dtype, device=device) + 0.5
    y, x = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)


def composite_view(
    pixels: Tensor,
    means_2d: Tensor,
    conics: Tensor,
    depths: Tensor,
    visible: Tensor,
    opacities: Tensor,
    colors: Tensor,
    max_alpha: float,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """Step 3-4 for one camera: returns (premultiplied colour ``[P, 3]``, transmittance ``[P]``)."""
    order = torch.argsort(torch.where(visible, depths, torch.full_like(depths, math.inf)))
    order = order[visible[order]]  # nearest first, dropped Gaussians gone
    color = pixels.new_zeros(len(pixels), 3)
    transmittance = pixels.new_ones(len(pixels))
    for start in range(0, len(order), chunk_size):
        index = order[start:start + chunk_size]
        d = pixels[:, None, :] - means_2d[None, index]  # [P, C, 2]
        a, b, c = conics[index].unbind(-1)
        power = -0.5 * (a * d[..., 0] ** 2 + 2 * b * d[..., 0] * d[..., 1] + c * d[..., 1] ** 2)
        # power <= 0 for a positive-definite conic; the clamp only guards against rounding.
        alpha = (opacities[index] * torch.exp(power.clamp(max=0.0))).clamp(max=max_alpha)
        # Transmittance in front of each Gaussian of the chunk (exclusive product).
        keep = 1 - alpha
        before = torch.cumprod(torch.cat([torch.ones_like(keep[:, :1]), keep[:, :-1]], dim=1), dim=1)
        weights = transmittance[:, None] * before * alpha
        color = color + weights @ colors[index]
        transmittance = transmittance * before[:, -1] * keep[:, -1]
    return color, transmittance


def _background(background: float | tuple[float, float, float] | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(background, dtype=like.dtype, device=like.device).expand(3)


def _render_torch(
    gaussians: Gaussians, cameras: Cameras, height: int, width: int, background: Tensor,
    near: float, dilation: float, max_alpha: float, chunk_size: int,
) -> tuple[Tensor, Tensor]:
    splats = project_gaussians(gaussians, cameras, height, width, near, dilation)
    pixels = pixel_centres(height, width, gaussians.means.dtype, gaussians.means.device)
    images, alphas = [], []
    for view in range(cameras.num_views):
        color, transmittance = composite_view(
            pixels, splats.means_2d[view], splats.conics[view], splats.depths[view],
            splats.visible[view], gaussians.opacities, gaussians.colors, max_alpha, chunk_size)
        images.append(color + transmittance[:, None] * background)
        alphas.append(1 - transmittance)
    rgb = torch.stack(images).reshape(-1, height, width, 3).permute(0, 3, 1, 2)
    return rgb, torch.stack(alphas).reshape(-1, 1, height, width)


def _render_gsplat(
    gaussians: Gaussians, cameras: Cameras, height: int, width: int, background: Tensor,
    near: float, dilation: float,
) -> tuple[Tensor, Tensor]:
    """gsplat's CUDA rasteriser (``gsplat.rasterization``). UNTESTED here: gsplat is not installed
    in the project's environment. gsplat takes OpenCV world-to-camera matrices, pinhole K with
    pixel centres at +0.5 (as ours) and wxyz quaternions; ``eps2d`` is our dilation. It keeps its
    own alpha clamp, 1/255 cut-off and early stop, so images differ slightly from the torch path."""
    from gsplat import rasterization  # guarded by the caller

    means = gaussians.means
    viewmats = torch.linalg.inv(cameras.c2w.to(means))
    focal = cameras.focal_px(height)
    k = torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]],
                     dtype=means.dtype, device=means.device)
    colors, alphas, _ = rasterization(
        means, gaussians.rotations, gaussians.scales, gaussians.opacities, gaussians.colors,
        viewmats, k.expand(cameras.num_views, 3, 3), width, height,
        near_plane=near, eps2d=dilation, backgrounds=background.expand(cameras.num_views, 3),
        rasterize_mode="classic", render_mode="RGB")
    return colors.permute(0, 3, 1, 2), alphas.permute(0, 3, 1, 2)


def gsplat_available(device: torch.device) -> bool:
    """Whether ``backend="auto"`` would use gsplat: importable and a CUDA device."""
    if device.type != "cuda":
        return False
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return False
    return True


def render_gaussians(
    gaussians: Gaussians,
    cameras: Cameras,
    height: int,
    width: int,
    *,
    background: float | tuple[float, float, float] | Tensor = 1.0,
    near: float = 0.01,
    dilation: float = 0.3,
    max_alpha: float = 0.99,
    chunk_size: int | None = None,
    backend: Backend = "torch",
) -> tuple[Tensor, Tensor]:
    """Render Gaussians from ``V`` cameras over a constant ``background`` colour (white default).

    Returns ``(rgb [V, 3, H, W], alpha [V, 1, H, W])`` for an unbatched set and
    ``[B, V, ...]`` for a batched one; ``rgb = sum_i weight_i color_i + (1 - alpha) background``.
    Differentiable with respect to every Gaussian parameter (torch path). ``backend="auto"``
    takes gsplat when :func:`gsplat_available`, else the torch path; ``max_alpha`` and
    ``chunk_size`` (Gaussians composited at once, default ``MAX_PAIRS_PER_CHUNK / (H W)``)
    only apply to the torch path.
    """
    if backend not in ("torch", "gsplat", "auto"):
        raise ValueError(f"backend must be 'torch', 'gsplat' or 'auto', got {backend!r}")
    device = gaussians.means.device
    use_gsplat = backend == "gsplat" or (backend == "auto" and gsplat_available(device))
    if backend == "gsplat" and not gsplat_available(device):
        raise RuntimeError("backend='gsplat' needs the gsplat package and the Gaussians on a CUDA device")
    bg = _background(background, gaussians.means)
    chunk_size = chunk_size or max(1, MAX_PAIRS_PER_CHUNK // (height * width))
    if gaussians.batched:
        renders = [render_gaussians(gaussians[b], cameras, height, width, background=bg, near=near,
                                    dilation=dilation, max_alpha=max_alpha, chunk_size=chunk_size,
                                    backend="gsplat" if use_gsplat else "torch")
                   for b in range(gaussians.means.shape[0])]
        return torch.stack([r[0] for r in renders]), torch.stack([r[1] for r in renders])
    if use_gsplat:
        return _render_gsplat(gaussians, cameras, height, width, bg, near, dilation)
    return _render_torch(gaussians, cameras, height, width, bg, near, dilation, max_alpha, chunk_size)
