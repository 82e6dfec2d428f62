"""The keyed batch (protocol/batch.py) and the algorithm registry (learner/algorithms/)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from protocol.batch import KeyedBatch

ROOT = Path(__file__).resolve().parents[1]


def _batch(start: int, n: int) -> KeyedBatch:
    return KeyedBatch({"latents": torch.arange(start, start + n).float().reshape(n, 1),
                       "rewards": np.arange(start, start + n, dtype=np.float64),
                       "prompts": [f"p{i}" for i in range(start, start + n)]}, {"timesteps": torch.tensor([9, 1])})


def test_concat_select_split_keep_rows_together():
    whole = KeyedBatch.concat([_batch(0, 2), _batch(2, 3)])
    assert len(whole) == 5 and whole["prompts"] == ["p0", "p1", "p2", "p3", "p4"]
    assert torch.equal(whole.meta["timesteps"], torch.tensor([9, 1]))
    picked = whole.select([4, 0])
    assert picked["prompts"] == ["p4", "p0"] and picked["rewards"].tolist() == [4.0, 0.0]
    assert picked["latents"].flatten().tolist() == [4.0, 0.0]
    empty = whole.select([])
    assert len(empty) == 0 and empty["latents"].shape == (0, 1) and empty["rewards"].shape == (0,)
    parts = whole.split(2)
    assert [len(p) for p in parts] == [2, 2, 1]
    again = KeyedBatch.concat(parts)
    assert again["prompts"] == whole["prompts"] and torch.equal(again["latents"], whole["latents"])


def test_keys_are_added_with_the_batch_length_and_mismatches_are_refused():
    batch = _batch(0, 3)
    batch["zmv/latents"] = torch.zeros(3, 2)
    assert "zmv/latents" in batch and list(batch.keys())[-1] == "zmv/latents"
    with pytest.raises(ValueError, match="rows"):
        batch["bad"] = torch.zeros(2)
    with pytest.raises(ValueError, match="one length"):
        KeyedBatch({"a": [1, 2], "b": np.zeros(3)})
    with pytest.raises(ValueError, match="keys"):
        KeyedBatch.concat([_batch(0, 1), KeyedBatch({"other": [1]})])


def test_protocol_imports_neither_diffusers_nor_ray():
    code = "import sys, protocol.batch; print(sorted(m for m in ('diffusers', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_algorithm_is_registered_and_the_generic_code_names_none():
    from learner.algorithms import algorithm_names, get_algorithm

    names = algorithm_names()
    assert {"ddpo-sf", "ddpo-is", "mv-zigal", "mvc-zigal", "nabla-gfn"} <= set(names)
    assert all(get_algorithm(n).name == n for n in names)
    validate = (ROOT / "learner/config.py").read_text().split("def validate(")[1]
    for source in [(ROOT / "learner/trainer.py").read_text(), (ROOT / "actors/rollout.py").read_text(), validate]:
        code = "\n".join(line.split("#")[0] for line in source.splitlines())  # comments may name them
        named = [n for n in names if re.search(rf"""["']{re.escape(n)}["']""", code)]
        assert not named, f"generic code names algorithm(s) {named}"
