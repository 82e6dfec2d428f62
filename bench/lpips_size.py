"""What LPIPS at its calibrated 64 px costs: MRC of MiniCarve grids with the box crops fed to LPIPS
at 64 px (reward.lpips_min_size=64, the default) vs at the 32 px render resolution, side by side.

    python -m bench.lpips_size [--samples 32 --repeats 5 --threads 1]

Both settings score the same ground-truth grids of MiniCarve test prompts with the same MRCScorer
pipeline (LRM reconstruction, re-rendering, box crops, LPIPS); the two are timed alternately,
``--repeats`` times each, and the median per-sample seconds of the whole MRC and of LPIPS alone
are printed with their ratio.  Writes docs/results/performance/lpips_size.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.common import FULL_OUT, log, machine_info, median, ratio, write_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a reward actor's default is 1)")
    parser.add_argument("--out", type=Path, default=FULL_OUT / "lpips_size.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from learner.config import PromptsConfig, load_prompts
    from geometry.views import views_as_float
    from minicarve.dataset import TEST_PROMPTS, ground_truth_views
    from minicarve.lrm import LRMReconstructor
    from reward_service.mrc import MRCScorer, mrc_from_renders

    prompts = load_prompts(PromptsConfig(file=str(TEST_PROMPTS), limit=args.samples))
    views, cameras = ground_truth_views(prompts)
    views = views_as_float(torch.from_numpy(views))
    scorers = {size: MRCScorer(LRMReconstructor(), lpips_min_size=size) for size in (32, 64)}
    with torch.no_grad():
        rerenders = scorers[64].score_views(views, cameras).rerenders
    seconds: dict[int, dict[str, list[float]]] = {size: {"mrc": [], "lpips": []} for size in scorers}
    values = {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
        for size, scorer in scorers.items():
            start = time.perf_counter()
            with torch.no_grad():
                result = scorer.score_views(views, cameras)
            mrc_seconds = time.perf_counter() - start
            start = time.perf_counter()
            with torch.no_grad():
                mrc_from_renders(views, rerenders, scorer.lpips, min_size=size)
            lpips_seconds = time.perf_counter() - start
            values[size] = float(result.mrc.mean())
            if repeat:
                seconds[size]["mrc"].append(mrc_seconds / len(views))
                seconds[size]["lpips"].append(lpips_seconds / len(views))
        log(f"round {repeat}/{args.repeats}: " + ", ".join(
            f"{size} px {seconds[size]['mrc'][-1] * 1e3:.1f} ms/sample" for size in scorers if repeat))
    out = {
        "samples": len(views), "repeats": args.repeats, "threads": args.threads, "machine": machine_info(),
        "command": "python -m bench.lpips_size " + " ".join(argv if argv is not None else sys.argv[1:]),
        **{f"{kind}_seconds_per_sample_{size}px": median(seconds[size][kind]) for size in scorers
           for kind in ("mrc", "lpips")},
        "mrc_ratio_64_vs_32": ratio(median(seconds[64]["mrc"]), median(seconds[32]["mrc"])),
        "lpips_ratio_64_vs_32": ratio(median(seconds[64]["lpips"]), median(seconds[32]["lpips"])),
        "mean_mrc_32px": values[32], "mean_mrc_64px": values[64],
    }
    write_json(args.out, out)
    log(f"MRC per sample (4 views): {out['mrc_seconds_per_sample_64px'] * 1e3:.1f} ms at 64 px vs "
        f"{out['mrc_seconds_per_sample_32px'] * 1e3:.1f} ms at 32 px (ratio {out['mrc_ratio_64_vs_32']:.2f}); "
        f"LPIPS alone {out['lpips_seconds_per_sample_64px'] * 1e3:.2f} vs {out['lpips_seconds_per_sample_32px'] * 1e3:.2f} ms "
        f"(ratio {out['lpips_ratio_64_vs_32']:.2f}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
