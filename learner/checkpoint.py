"""Checkpoints: trainable weights and optimizer tensors in safetensors, the rest in JSON.

No pickle anywhere, so a checkpoint from elsewhere cannot run code.  Each
checkpoint is written into a temporary directory and renamed into place, so a
crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "trainer_state.json"


def optimizer_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (safetensors) and plain data (JSON)."""
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            name = f"state.{index}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: str | Path, weights: dict[str, torch.Tensor], optimizer_state: dict,
                    trainer_state: dict) -> Path:
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp / WEIGHTS)
    opt_tensors, opt_meta = optimizer_to_flat(optimizer_state)
    save_file(opt_tensors, tmp / OPTIMIZER)
    (tmp / STATE).write_text(json.dumps({**trainer_state, "optimizer": opt_meta}, indent=1))
    for path in tmp.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def load_checkpoint(directory: str | Path) -> tuple[dict, dict, dict]:
    """-> (weights, optimizer state_dict, trainer state)."""
    directory = Path(directory)
    state = json.loads((directory / STATE).read_text())
    optimizer = optimizer_from_flat(load_file(directory / OPTIMIZER), state.pop("optimizer"))
    return load_file(directory / WEIGHTS), optimizer, state
