"""The resumable state of MiniCarve's training commands: modules, optimizer, RNG and step in one
file, written atomically (a half-written state is never loaded)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_training_state(path: Path, step: int, modules: dict[str, torch.nn.Module],
                        optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    state = {"step": step, **{name: module.state_dict() for name, module in modules.items()},
             "optimizer": optimizer.state_dict(), "generator": generator.get_state()}
    tmp = path.with_suffix(".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_training_state(path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                        generator: torch.Generator) -> int | None:
    """Restore ``modules``, ``optimizer`` and ``generator`` in place; the step, or None without a state."""
    if not path.exists():
        return None
    state = torch.load(path, weights_only=True)
    for name, module in modules.items():
        module.load_state_dict(state[name])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return state["step"]
