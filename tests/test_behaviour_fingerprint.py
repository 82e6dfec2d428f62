"""Issue 18's acceptance 1: the refactoring into a keyed batch and registered algorithms kept every
per-epoch figure (docs/results/behaviour_{baseline,after}.json, from bench/behaviour_fingerprint.py)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.behaviour_fingerprint import compare

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def test_every_figure_is_bit_for_bit_the_baselines():
    baseline, after = (json.loads((RESULTS / f"behaviour_{n}.json").read_text()) for n in ("baseline", "after"))
    assert set(after["runs"]) == set(baseline["runs"])
    assert compare(baseline, after, tolerance=0.0) == 0
