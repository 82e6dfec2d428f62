"""Model families: which kind of multi-view model a directory holds, from its layout alone.

Every family here emits one image whose four quadrants are the views (Instant3D's 2x2
grid, ``policy/grid.py``) and is sampled, scored and trained by the same code
(``policy/pipeline.py``); they differ only in what the UNet works on and how it
is conditioned.  What leaves the policy is the views and their cameras
(``geometry/views.py``): ``MultiViewPolicy.decode`` splits the grid into its four views,
taken by ``MultiViewPolicy.cameras`` (the grid rig), so the grid is these families' layout,
not the system's contract:

* ``pixel-grid``: the UNet's sample *is* the grid image in [-1, 1] (no ``vae/``),
  one CLIP text encoder, last hidden state (MiniCarve's models, ``builtin:tiny``);
* ``sd-grid``: Stable Diffusion layout: the UNet works in the latent space of
  ``vae/``, one CLIP text encoder, last hidden state;
* ``sdxl-grid``: SDXL layout (Instant3D): latent space, two text encoders
  (``text_encoder/`` + ``text_encoder_2/``, penultimate hidden states concatenated,
  pooled text embeds from the second) and micro-conditioning time ids; the UNet's
  config has ``addition_embed_type: text_time``.

Detection reads only directory names and ``unet/config.json`` (no torch), so the
run config can check ``model.family`` against ``model.path`` before anything starts.
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("pixel-grid", "sd-grid", "sdxl-grid")
AUTO = "auto"


class FamilyMismatchError(ValueError):
    """A model directory does not hold the family that was asked for (or holds no consistent one)."""


def _unet_config(path: Path) -> dict:
    config = path / "unet" / "config.json"
    try:
        return json.loads(config.read_text())
    except (OSError, ValueError):
        return {}


def detect_family(path: str | Path) -> str:
    """The family of a model directory, from its layout; raises when the layout is inconsistent."""
    path = Path(path)
    has_te2 = (path / "text_encoder_2").is_dir() or (path / "tokenizer_2").is_dir()
    text_time = _unet_config(path).get("addition_embed_type") == "text_time"
    has_vae = (path / "vae").is_dir()
    if has_te2 or text_time:
        missing = [name for name, ok in [("text_encoder_2/", (path / "text_encoder_2").is_dir()),
                                         ("tokenizer_2/", (path / "tokenizer_2").is_dir()),
                                         ("vae/", has_vae)] if not ok]
        if not text_time:
            missing.append("unet/config.json with addition_embed_type 'text_time'")
        if missing:
            raise FamilyMismatchError(
                f"model directory {str(path)!r} looks like an SDXL model (sdxl-grid) but lacks "
                f"{', '.join(missing)}; an sdxl-grid directory needs unet/ (addition_embed_type 'text_time'), "
                "vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ and scheduler/ "
                "(the diffusers StableDiffusionXLPipeline layout)")
        return "sdxl-grid"
    return "sd-grid" if has_vae else "pixel-grid"


def _evidence(family: str) -> str:
    return {
        "pixel-grid": "it has no vae/, so its UNet works on the grid image itself",
        "sd-grid": "it has vae/ and one text encoder (no text_encoder_2/, no 'text_time' UNet conditioning)",
        "sdxl-grid": "it has text_encoder_2/ and a UNet with addition_embed_type 'text_time'",
    }[family]


def check_family(path: str | Path, requested: str = AUTO) -> str:
    """The directory's family; with ``requested`` other than ``auto`` it must match."""
    if requested != AUTO and requested not in FAMILIES:
        raise FamilyMismatchError(f"unknown model family {requested!r}; model.family must be "
                                  f"{AUTO!r} (detect from the directory) or one of {', '.join(FAMILIES)}")
    found = detect_family(path)
    if requested not in (AUTO, found):
        raise FamilyMismatchError(
            f"model.family={requested} but model directory {str(path)!r} holds a {found} model: "
            f"{_evidence(found)}. Set model.family={found} (or auto), or point model.path at a "
            f"{requested} directory")
    return found
