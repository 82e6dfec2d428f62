"""Reward functions over generated views: ``reward(views, cameras, prompts) -> RewardResult``.

``views`` are uint8 ``[B, V, 3, h, w]`` (white background) and ``cameras`` the V cameras
that took them (``geometry/views.py``): whatever the model family's layout, a reward sees
views and cameras, never a grid.

Two registries (``plugins.Registry``), one convention: a registered name is a factory
called with the options, an import path names the function itself.

:data:`REWARDS` (``reward.kind``): ``mrc``, Carve3D's reward, -MRC (reconstruct from the
views at their cameras, re-render, LPIPS in the box crop); ``brightness``, mean pixel
value in [0, 1], a cheap sanity reward for checking that learning works;
``package.module:function``: your own, called as ``function(views, cameras, prompts)``,
returning a ``RewardResult`` or an array of B rewards.  A reward that ``nabla-gfn`` can use
also has ``.gradient(views, cameras)``: d reward / d views of float views in [0, 1], same
shape.

:data:`ALIGNMENTS` (``reward.alignment``): prompt-alignment evaluators, ``(views, cameras,
prompts) -> [B]`` in [0, 1]; MiniCarve's plug-in registers ``minicarve`` (with a
``check_prompts`` hook the driver runs before starting).
"""

from __future__ import annotations

import inspect
import time
import zlib
from typing import Callable

import numpy as np
import torch

from actors.batches import RewardResult
from geometry.cameras import Cameras
from geometry.views import check_views, views_as_float, views_as_uint8
from plugins import Registry
from reward_service.reconstructors import RECONSTRUCTORS, build_reconstructor

# (views [B, V, 3, h, w] uint8, cameras, prompts) -> a RewardResult or [B] rewards
RewardFn = Callable[[torch.Tensor, Cameras, list[str]], RewardResult | np.ndarray]
AlignmentFn = Callable[[torch.Tensor, Cameras, list[str]], np.ndarray]  # -> [B] in [0, 1]


def brightness_reward(views: torch.Tensor, cameras: Cameras, prompts: list[str]) -> RewardResult:
    """Mean pixel value of each sample's views, in [0, 1]."""
    rewards = views.float().flatten(1).mean(dim=1).numpy() / 255.0
    return RewardResult(sample_ids=[], rewards=rewards)


def brightness_gradient(views: torch.Tensor, cameras: Cameras) -> torch.Tensor:
    """d mean(views) / d views for float views [N, V, 3, h, w] in [0, 1]: a constant."""
    return torch.full_like(views, 1.0 / views[0].numel())


brightness_reward.gradient = brightness_gradient  # (a function attribute, as MRCReward.gradient)


class MRCReward:
    """reward = -MRC, with the per-view LPIPS and the re-renderings kept for the run report."""

    def __init__(self, reconstructor: str = "voxel", reconstructor_options: dict | None = None,
                 lpips_backbone: str | None = None, device: str = "cpu", box_normalize: bool = True,
                 lpips_min_size: int = 64, foreground_opening: bool = False):
        from reward_service.mrc import MRCScorer

        options = dict(reconstructor_options or {})
        if RECONSTRUCTORS.extra(reconstructor, "on_device"):  # e.g. the LRM's weights go where the
            options.setdefault("device", device)  # scorer runs (a GPU reward actor)
        self.scorer = MRCScorer(build_reconstructor(reconstructor, **options),
                                lpips_backbone=lpips_backbone, device=device, box_normalize=box_normalize,
                                lpips_min_size=lpips_min_size, foreground_opening=foreground_opening)

    def gradient(self, views: torch.Tensor, cameras: Cameras) -> torch.Tensor:
        """d(-MRC)/d views for float views [N, V, 3, h, w] in [0, 1] (nabla-gfn)."""
        return self.scorer.reward_gradient(views.float(), cameras).cpu()

    def __call__(self, views: torch.Tensor, cameras: Cameras, prompts: list[str]) -> RewardResult:
        result = self.scorer.score_views(views_as_float(views), cameras)

        def array(x: torch.Tensor) -> np.ndarray:
            return x.detach().double().cpu().numpy()

        return RewardResult(
            sample_ids=[], rewards=array(result.reward), mrc=array(result.mrc),
            object_size=array(result.object_size), per_view_lpips=array(result.per_view_lpips),
            rerenders=views_as_uint8(result.rerenders).cpu().numpy(), warnings=list(self.scorer.warnings))


# reward.kind: a name -> a factory called with the reward's options; an import path: the function.
REWARDS = Registry("reward function", "reward.kind")
REWARDS.register("mrc", MRCReward)
REWARDS.register("brightness", lambda: brightness_reward)
# reward.alignment: a name -> a factory called without arguments; an import path: the function.
ALIGNMENTS = Registry("alignment evaluator", "reward.alignment")


def build_reward(kind: str, **options) -> RewardFn:
    builder = REWARDS.get(kind)
    return builder(**options) if kind in REWARDS else builder


def build_alignment(name: str | None) -> AlignmentFn | None:
    """The prompt-alignment evaluator: a registered name (MiniCarve's plug-in registers
    ``minicarve``, its attribute classifier), an import path ``package.module:function``
    called as ``function(views, cameras, prompts)``, or None."""
    if name is None:
        return None
    builder = ALIGNMENTS.get(name)
    return builder() if name in ALIGNMENTS else builder


def check_alignment_prompts(name: str | None, prompts: list[str]) -> None:
    """The evaluator's own check that it can score these prompts (its ``check_prompts`` hook):
    a ValueError whose message names the prompt and the fix."""
    check = ALIGNMENTS.hook(name, "check_prompts") if name is not None else None
    if check is not None:
        check(prompts)


def reward_gradient(reward_fn: RewardFn, views: torch.Tensor, cameras: Cameras, batch_size: int = 32) -> np.ndarray:
    """dR/d views of float views ``[..., V, 3, h, w]`` in [0, 1] taken by ``cameras``, same
    shape, float32: the reward function's ``gradient`` (MRC, brightness); a custom reward gives
    one the same way."""
    gradient = getattr(reward_fn, "gradient", None)
    if gradient is None:
        raise ValueError(f"the reward {getattr(reward_fn, '__name__', type(reward_fn).__name__)} has no "
                         "gradient, which algorithm=nabla-gfn needs: use reward.kind=mrc or brightness, or give "
                         "your reward function a .gradient(views [N, V, 3, h, w] float, cameras) -> same-shape "
                         "tensor")
    check_views(views, cameras, "gradient views")
    flat = views.reshape(-1, *views.shape[-4:])
    parts = [gradient(flat[i:i + batch_size], cameras).detach().float() for i in range(0, len(flat), batch_size)]
    return torch.cat(parts).reshape(views.shape).numpy()


def inject_nonfinite(sample_ids: list[str], rewards: np.ndarray, fraction: float) -> np.ndarray:
    """Fault injection: NaN for a stable, id-determined share of the samples."""
    if fraction <= 0:
        return rewards
    hit = np.array([zlib.crc32(s.encode()) % 10_000 < fraction * 10_000 for s in sample_ids])
    return np.where(hit, np.nan, rewards)


def function_name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def signature_problem(fn, role: str) -> str | None:
    """Why a custom ``role`` function cannot be called as ``fn(views, cameras, prompts)``, or None:
    one written for another signature (the grids' ``(images, prompts)`` before views) is named
    by the config check, before any actor starts, rather than failing at the first batch."""
    try:
        signature = inspect.signature(fn)
        signature.bind(None, None, None)
    except TypeError:
        return (f"the {role} function {function_name(fn)}{signature} cannot be called as "
                f"{role}(views, cameras, prompts): it gets uint8 views [B, V, 3, h, w], their "
                "geometry.cameras.Cameras and the prompts (geometry/views.py)")
    except ValueError:  # no signature to read (a builtin): the call itself will tell
        pass
    return None


def per_sample(values, count: int, role: str, fn) -> np.ndarray:
    """A user function's output as one float per sample, or a ValueError naming the function:
    a [B, 3] array would otherwise fail later in the learner, far from its cause."""
    name = function_name(fn)
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"the {role} function {name} returned {type(values).__name__}, not numbers ({err}); "
                         f"return an array of {count} floats, one per sample") from None
    if array.shape != (count,):
        raise ValueError(f"the {role} function {name} returned an array of shape {array.shape} for {count} samples; "
                         f"return one float per sample, shape ({count},)")
    return array


def score(reward_fn: RewardFn, sample_ids: list[str], views: torch.Tensor, cameras: Cameras, prompts: list[str],
          nonfinite_fraction: float = 0.0, alignment_fn: AlignmentFn | None = None) -> RewardResult:
    """Run a reward function on ``views`` [B, V, 3, h, w] uint8 taken by ``cameras`` (and the
    alignment evaluator, if any) and tag the result with the sample ids, in order."""
    check_views(views, cameras)
    start = time.perf_counter()
    result = reward_fn(views, cameras, prompts)
    if not isinstance(result, RewardResult):
        result = RewardResult(sample_ids=[], rewards=result)
    result.sample_ids = list(sample_ids)
    result.rewards = inject_nonfinite(sample_ids, per_sample(result.rewards, len(sample_ids), "reward", reward_fn),
                                      nonfinite_fraction)
    if alignment_fn is not None:
        result.alignment = per_sample(alignment_fn(views, cameras, prompts), len(sample_ids), "alignment",
                                      alignment_fn)
    result.score_seconds = time.perf_counter() - start
    return result
