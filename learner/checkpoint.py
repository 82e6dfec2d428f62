"""Checkpoints: trainable weights and optimizer tensors in safetensors, the rest in JSON.

No pickle anywhere, so a checkpoint from elsewhere cannot run code.  Each
checkpoint is written into a temporary directory, every file fsynced, a
``manifest.json`` with the SHA-256 of every file written last, and the directory
renamed into place: a crash never leaves a half-written checkpoint under the
final name, and a checkpoint damaged later (truncated, bit rot) fails its
checksums, so :func:`latest_good_checkpoint` falls back to the one before.
A checkpoint whose files match their checksums but do not parse (a JSON without
the learner's keys, a bad safetensors header) is damaged just the same.  A
damaged checkpoint is never deleted: :func:`set_aside` moves it to
``checkpoints/damaged/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "trainer_state.json"
MANIFEST = "manifest.json"
PREFIX = "epoch_"
DAMAGED = "damaged"  # under the checkpoints root: checkpoints set aside, never deleted


class CorruptCheckpointError(RuntimeError):
    """A checkpoint that fails its checksums or cannot be read: fall back to the one before."""


class CheckpointMismatchError(RuntimeError):
    """A sound checkpoint that does not fit this run's model (its config changed): no fallback helps."""


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_synced(path: Path, write) -> None:
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(directory: str | Path, weights: dict[str, torch.Tensor], optimizer_state: dict,
                    trainer_state: dict, config_yaml: str = "") -> Path:
    """Write atomically: temp dir, fsync every file, manifest of checksums, rename."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    opt_tensors, opt_meta = optimizer_to_flat(optimizer_state)
    _write_synced(tmp / WEIGHTS, lambda p: save_file({k: v.contiguous() for k, v in weights.items()}, p))
    _write_synced(tmp / OPTIMIZER, lambda p: save_file(opt_tensors, p))
    _write_synced(tmp / STATE, lambda p: p.write_text(json.dumps({**trainer_state, "optimizer": opt_meta})))
    _write_synced(tmp / "config.yaml", lambda p: p.write_text(config_yaml))
    manifest = {name: _sha256(tmp / name) for name in (WEIGHTS, OPTIMIZER, STATE, "config.yaml")}
    _write_synced(tmp / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    dir_fd = os.open(directory.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return directory


def verify_checkpoint(directory: str | Path) -> None:
    """Raise CorruptCheckpointError unless every file matches the manifest and parses: the
    trainer state's JSON with the optimizer's part, the safetensors headers.  (The trainer
    state's other keys are the learner's: it reports those missing as damage too.)"""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise CorruptCheckpointError(f"{directory}: unreadable manifest ({err})") from None
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{directory}: {name} is missing")
        if _sha256(path) != expected:
            raise CorruptCheckpointError(f"{directory}: {name} fails its checksum (truncated or corrupt)")
    try:
        name = STATE
        state = json.loads((directory / STATE).read_text())
        optimizer = state.get("optimizer") if isinstance(state, dict) else None
        missing = [f"optimizer.{k}" for k in ("param_groups", "scalars") if not isinstance(optimizer, dict)
                   or k not in optimizer]
        if missing:
            raise CorruptCheckpointError(f"{directory}: {STATE} lacks {', '.join(missing)}")
        for name in (WEIGHTS, OPTIMIZER):
            with safe_open(directory / name, "pt") as f:
                f.keys()
    except (OSError, ValueError, SafetensorError) as err:
        raise CorruptCheckpointError(f"{directory}: {name} cannot be read ({type(err).__name__}: {err})") from None


def tensor_differences(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """How a checkpoint's weights differ from the model's trainable ones: names and shapes."""
    out = [f"{k} missing" for k in expected if k not in saved]
    out += [f"{k} not in the model" for k in saved if k not in expected]
    out += [f"{k} {tuple(saved[k].shape)} saved, {tuple(v.shape)} in the model" for k, v in expected.items()
            if k in saved and saved[k].shape != v.shape]
    return out


def set_aside(directory: Path) -> Path:
    """Move a damaged checkpoint out of the way (it no longer counts, is never overwritten or
    deleted); returns where it went."""
    target = directory.parent / DAMAGED / directory.name
    suffix = 1
    while target.exists():
        target = directory.parent / DAMAGED / f"{directory.name}.{suffix}"
        suffix += 1
    target.parent.mkdir(exist_ok=True)
    directory.rename(target)
    return target


def load_checkpoint(directory: str | Path) -> tuple[dict, dict, dict]:
    """-> (weights, optimizer state_dict, trainer state), after verifying checksums."""
    directory = Path(directory)
    verify_checkpoint(directory)
    state = json.loads((directory / STATE).read_text())
    optimizer = optimizer_from_flat(load_file(directory / OPTIMIZER), state.pop("optimizer"))
    return load_file(directory / WEIGHTS), optimizer, state


def list_checkpoints(root: str | Path) -> list[Path]:
    """Finished checkpoints under ``root``, oldest first (temp dirs are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and p.name[len(PREFIX):].isdigit())


def latest_good_checkpoint(root: str | Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that passes verification, and a warning per one skipped."""
    warnings = []
    for candidate in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(candidate)
            return candidate, warnings
        except CorruptCheckpointError as err:
            warnings.append(f"checkpoint {candidate.name} is damaged ({err}); falling back to the previous one")
    return None, warnings


def prune_checkpoints(root: str | Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
