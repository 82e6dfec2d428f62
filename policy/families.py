"""Model families: which kind of multi-view model a directory holds, from its layout alone.

Every family is sampled, scored and trained by the same code (``policy/pipeline.py``); they
differ in what the UNet works on, how it is conditioned and how a sample holds its views
(``policy/layouts.py``).  What leaves the policy is the views and their cameras
(``geometry/views.py``).  The grid families emit one image whose four quadrants are the views
(Instant3D's 2x2 grid, ``policy/grid.py``), split by ``MultiViewPolicy.decode``, taken by the
grid rig; the grid is their layout, not the system's contract:

* ``pixel-grid``: the UNet's sample *is* the grid image in [-1, 1] (no ``vae/``),
  one CLIP text encoder, last hidden state (MiniCarve's models, ``builtin:tiny``);
* ``sd-grid``: Stable Diffusion layout: the UNet works in the latent space of
  ``vae/``, one CLIP text encoder, last hidden state;
* ``sdxl-grid``: SDXL layout (Instant3D): latent space, two text encoders
  (``text_encoder/`` + ``text_encoder_2/``, penultimate hidden states concatenated,
  pooled text embeds from the second) and micro-conditioning time ids; the UNet's
  config has ``addition_embed_type: text_time``;
* ``mvdream``: MVDream (``ashawkey/mvdream-sd2.1-diffusers`` layout): its own UNet
  (``unet/config.json`` ``_class_name`` ``MultiViewUNetModel``, ``policy/mvdream_unet.py``)
  denoises the four views' latents as one batch, attending across them, with each view's
  camera; SD 2.1's ``vae/`` and one CLIP text encoder (last hidden state).  The port's
  ImageDream extras (``image_encoder/``, ``feature_extractor/``) are not used; an ImageDream
  UNet (``ip_dim`` > 0) is not supported.

Detection reads only directory names and ``unet/config.json`` (no torch), so the
run config can check ``model.family`` against ``model.path`` before anything starts.
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("pixel-grid", "sd-grid", "sdxl-grid", "mvdream")
MVDREAM_UNET_CLASS = "MultiViewUNetModel"
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
    """The family of a model directory, from its layout; raises when the layout is inconsistent
    or the path holds no model (no readable unet/config.json) at all."""
    path = Path(path)
    unet_config = _unet_config(path)
    if not unet_config:
        raise FamilyMismatchError(
            f"{str(path)!r} is not a model directory: it has no readable unet/config.json; a model "
            "directory holds unet/, text_encoder/, tokenizer/ and scheduler/ as diffusers saves them")
    has_te2 = (path / "text_encoder_2").is_dir() or (path / "tokenizer_2").is_dir()
    text_time = unet_config.get("addition_embed_type") == "text_time"
    has_vae = (path / "vae").is_dir()
    if unet_config.get("_class_name") == MVDREAM_UNET_CLASS:
        if unet_config.get("ip_dim", 0):
            raise FamilyMismatchError(
                f"model directory {str(path)!r} holds an ImageDream model (its {MVDREAM_UNET_CLASS} has "
                f"ip_dim={unet_config['ip_dim']}: image-prompted), which is not supported; the mvdream family "
                "is MVDream's text-to-multi-view model (ashawkey/mvdream-sd2.1-diffusers)")
        if not has_vae or has_te2:
            raise FamilyMismatchError(
                f"model directory {str(path)!r} has an MVDream UNet ({MVDREAM_UNET_CLASS}) but "
                f"{'no vae/' if not has_vae else 'a second text encoder'}; an mvdream directory holds unet/, "
                "vae/, text_encoder/, tokenizer/ and scheduler/ (the ashawkey/mvdream-sd2.1-diffusers layout)")
        return "mvdream"
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
        "mvdream": f"its unet/config.json names the class {MVDREAM_UNET_CLASS} (MVDream's multi-view UNet)",
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
