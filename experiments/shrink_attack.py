"""Can MRC be gamed by shrinking the object?  ``python -m experiments.shrink_attack``

The direct test of the incentive behind Carve3D's box normalisation (Sec. 3.2): render
MiniCarve's held-out test scenes with the whole scene scaled by s about the origin (a
smaller object that is still perfectly 3D-consistent), and score every view set as
the reward does, with the square foreground box (MRC) and without it (LPIPS of the
whole views). If the whole-view
score falls as the object shrinks, a policy rewarded by it gains by making objects
smaller; inside the box the object fills the crop at every s, so shrinking gains nothing.

    python -m experiments.shrink_attack --prompts 16 --out runs/experiments/reward_hacking/shrink_attack.json

(``python -m experiments.run reward_hacking`` runs it as its preparation step.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

SCALES = (1.0, 0.8, 0.6, 0.45, 0.3, 0.2, 0.12)


def scaled_views(prompts: list[str], scale: float) -> torch.Tensor:
    """uint8 views [N, 4, 3, h, w] at the grid rig of each prompt's scene scaled by ``scale``
    about the origin."""
    from minicarve.dataset import scene_from_prompt
    from minicarve.scenes import SceneField
    from geometry.cameras import grid_rig
    from geometry.render import render_field
    from geometry.views import views_as_uint8

    class ScaledField(SceneField):
        # d_s(p) = s * d(p / s): the signed distance of the scaled scene, so edges keep
        # their sharpness in world units and normals their direction.
        def _sdfs(self, points):
            return scale * super()._sdfs(points / scale)

    with torch.no_grad():
        return torch.stack([views_as_uint8(render_field(ScaledField(scene_from_prompt(prompt)), grid_rig(),
                                                        32, 32, 64)) for prompt in prompts])


def shrink_attack(prompts: list[str], scales=SCALES, reconstructor: str = "lrm",
                  lpips_backbone: str | None = None) -> dict:
    import minicarve.plugin  # noqa: F401  (registers reconstructor="lrm")
    from geometry.cameras import grid_rig
    from reward_service.rewards import MRCReward

    # One reconstruction serves both: with box_normalize=False the reward is whole-view LPIPS,
    # and the reported MRC is the boxed one that box_normalize=True rewards.
    scorer = MRCReward(reconstructor, lpips_backbone=lpips_backbone, box_normalize=False)
    out = {"scales": list(scales), "prompts": len(prompts), "object_size": [],
           **{name: {"penalty": [], "penalty_se": []} for name in ("box", "no_box")}}
    for scale in scales:
        result = scorer(scaled_views(prompts, scale), grid_rig(), prompts)
        for name, penalty in (("box", result.mrc), ("no_box", -result.rewards)):
            out[name]["penalty"].append(float(penalty.mean()))
            out[name]["penalty_se"].append(float(penalty.std(ddof=1) / np.sqrt(len(prompts))))
        out["object_size"].append(float(result.object_size.mean()))
        print(f"scale {scale:.2f}: object size {out['object_size'][-1]:.3f}, -reward with box (MRC) "
              f"{out['box']['penalty'][-1]:.4f}, without (whole-view LPIPS) {out['no_box']['penalty'][-1]:.4f}",
              file=sys.stderr, flush=True)
    out["warnings"] = sorted(set(scorer.scorer.warnings))
    return out


def main(argv=None) -> int:
    from learner.config import PROJECT_ROOT, ConfigError, PromptsConfig, load_prompts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16, help="the first N held-out test prompts")
    parser.add_argument("--prompt-file", default="data/minicarve/test_prompts.txt")
    parser.add_argument("--lpips-backbone", default=None, help="AlexNet weights file for LPIPS")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.prompts < 2:
        parser.error("--prompts must be at least 2 (the standard errors need two)")
    try:
        prompts = load_prompts(PromptsConfig(file=args.prompt_file, limit=args.prompts))
    except ConfigError as err:
        parser.error(f"{err} (--prompt-file)")
    torch.set_num_threads(2)
    start = time.perf_counter()
    out = shrink_attack(prompts, lpips_backbone=args.lpips_backbone)
    out["seconds"] = time.perf_counter() - start
    print("| scale | object size | -reward with box (MRC) | -reward without box (whole-view LPIPS) |")
    print("|---|---|---|---|")
    for i, s in enumerate(out["scales"]):
        print(f"| {s:.2f} | {out['object_size'][i]:.3f} | {out['box']['penalty'][i]:.4f} ± "
              f"{out['box']['penalty_se'][i]:.4f} | {out['no_box']['penalty'][i]:.4f} ± {out['no_box']['penalty_se'][i]:.4f} |")
    if args.out:
        target = Path(args.out)
        target = target if target.is_absolute() else PROJECT_ROOT / target
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(out, indent=2))
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
