"""How far does selection alone lower MRC?  ``python -m experiments.best_of_n``

A finetuned policy that only learned to pick, for every prompt, the best of N of its base
model's samples would score the base's expected best-of-N MRC. That number places an RL
result on a scale the base model defines: Carve3D's -7 % is as far as picking the better of
two samples; a target beyond best-of-32 asks the policy for samples better than nearly
everything its base draws for any prompt. Reads an evaluation's ``per_sample.parquet``
(``python -m learner.evaluate ... --samples M``, M >= the largest N) and gives, for each N,
the expected per-prompt minimum of N samples drawn without replacement from the M (exact,
no resampling noise), its change against the per-prompt mean with a standard error over
prompts, and the alignment of the samples that selection would keep.

    python -m learner.evaluate --model minicarve/weights/sft-short --prompts data/minicarve/val_prompts.txt \\
        --num-prompts 32 --samples 32 --out runs/bestofn/sft-short
    python -m experiments.best_of_n runs/bestofn/sft-short/per_sample.parquet --out docs/results/best_of_n_v2.json
"""

from __future__ import annotations

import argparse
import json
from math import comb
from pathlib import Path

import numpy as np
import pandas as pd


def expected_min_weights(m: int, n: int) -> np.ndarray:
    """Weights w over m values sorted ascending such that sum(w * x_sorted) is the expected
    minimum of n of them drawn without replacement: P(the i-th smallest is the minimum)."""
    if not 1 <= n <= m:
        raise ValueError(f"best-of-{n} needs at least {n} samples per prompt, got {m}")
    return np.array([comb(m - 1 - i, n - 1) for i in range(m)], dtype=np.float64) / comb(m, n)


def best_of_n(samples: pd.DataFrame, ns=None) -> dict:
    """``samples``: one row per sample with ``prompt``, ``mrc`` and ``alignment``; every prompt
    needs the same number of samples M >= max(ns) (default: 1, 2, 4, ... up to M)."""
    counts = samples.groupby("prompt").size()
    if counts.nunique() != 1:
        raise ValueError(f"every prompt needs the same number of samples, got {sorted(set(counts))}")
    m = int(counts.iloc[0])
    ns = ns or [2 ** k for k in range(m.bit_length())]  # 1, 2, 4, ... up to M
    ordered = samples.sort_values(["prompt", "mrc"], kind="stable")
    mrc = ordered["mrc"].to_numpy().reshape(-1, m)  # [prompts, M], ascending per prompt
    alignment = ordered["alignment"].to_numpy().reshape(-1, m)
    mean = mrc.mean(axis=1)
    base = float(mean.mean())
    rows = []
    for n in ns:
        w = expected_min_weights(m, n)
        best, best_alignment = mrc @ w, alignment @ w
        change = best - mean  # per prompt: paired with the prompt's own mean
        se = float(change.std(ddof=1) / np.sqrt(len(change)))
        rows.append({"n": n, "mrc": float(best.mean()), "change": float(change.mean()), "change_se": se,
                     "relative_change": float(change.mean() / base), "alignment": float(best_alignment.mean())})
    within = float(np.mean(mrc.var(axis=1, ddof=1)) / np.var(mrc, ddof=1))
    return {"prompts": int(mrc.shape[0]), "samples_per_prompt": m, "mrc": base,
            "alignment": float(alignment.mean()), "within_prompt_variance_share": within, "best_of": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("per_sample", help="an evaluation's per_sample.parquet")
    parser.add_argument("--n", type=int, nargs="+", help="the N to score (default: 1, 2, 4, ... up to the "
                        "samples per prompt)")
    parser.add_argument("--out", help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    result = best_of_n(pd.read_parquet(args.per_sample), args.n)
    result["source"] = str(args.per_sample)
    print(f"{result['prompts']} prompts x {result['samples_per_prompt']} samples: MRC {result['mrc']:.4f}, "
          f"alignment {result['alignment']:.3f}; within-prompt share of MRC's variance "
          f"{result['within_prompt_variance_share']:.2f}")
    for row in result["best_of"]:
        print(f"best of {row['n']:>3}: MRC {row['mrc']:.4f}  {row['change']:+.4f} ± {row['change_se']:.4f} "
              f"({row['relative_change']:+.1%})  alignment {row['alignment']:.3f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
