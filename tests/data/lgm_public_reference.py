"""Facts about the public LGM computed by the public code itself, pinned for tests/test_lgm.py.

Writes two files beside this one:

* ``lgm_big_keys.json``: the state-dict key -> shape list of the public ``LGM`` built with
  ``config_defaults['big']`` on the meta device (the network the released checkpoint holds).
* ``lgm_public_reference.json``: (a) the public ``LGM.forward_gaussians`` on a small network
  of the same code (``SMALL_OPTIONS``) with deterministic weights and inputs
  (:func:`reference_state`, :func:`reference_images`; numpy's legacy RandomState, whose
  streams are fixed), a subset of its Gaussians and per-channel statistics; (b) the public
  ``prepare_default_rays`` (kiui's real ``orbit_camera`` + LGM's ``get_rays``) at 4 px.

Runs in a scratch directory with a checkout of the public repository and the kiui wheel's
sources; their heavy imports (the CUDA rasteriser, xformers, tyro, kiui's LPIPS, cv2, roma)
are stubbed, the code that is measured is not:

    git clone https://github.com/3DTopia/LGM /tmp/LGM && git -C /tmp/LGM checkout fe8d12c
    pip download --no-deps kiui==0.3.5 -d /tmp/kiui && unzip -q /tmp/kiui/*.whl -d /tmp/kiui/src
    python tests/data/lgm_public_reference.py /tmp/LGM /tmp/kiui/src

The functions above the ``__main__`` block need only numpy and torch: the tests import them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SEED = 19
BATCH, VIEWS = 2, 4
# The network of our 'test' preset (reward_service/lgm.py), as public Options fields.
SMALL_OPTIONS = dict(input_size=32, down_channels=(32, 32, 64), down_attention=(False, False, True),
                     mid_attention=True, up_channels=(64, 32), up_attention=(True, False), splat_size=16,
                     output_size=32)
GAUSSIAN_STRIDE = 32  # every 32nd Gaussian of each sample is pinned (plus statistics of all)
RAY_SIZE = 4
RAY_ELEVATIONS_KIUI = (0.0, -20.0)  # kiui's sign: -20 is 20 degrees above


def reference_state(shapes: dict[str, tuple[int, ...]], seed: int = SEED) -> dict[str, torch.Tensor]:
    """Deterministic weights for a network's ``key -> shape``: conv/linear weights
    ``N(0, 1 / fan_in)``, GroupNorm weights ``1 + N(0, 0.1^2)``, biases ``N(0, 0.1^2)``;
    keys in sorted order from one RandomState."""
    rng = np.random.RandomState(seed)
    state = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        noise = rng.standard_normal(shape)
        if key.endswith(".bias"):
            value = 0.1 * noise
        elif len(shape) == 1:  # a norm's weight
            value = 1.0 + 0.1 * noise
        else:
            value = noise / np.sqrt(np.prod(shape[1:]))
        state[key] = torch.tensor(value, dtype=torch.float32)
    return state


def reference_images(seed: int = SEED) -> torch.Tensor:
    """``[BATCH, VIEWS, 9, 32, 32]`` inputs (standard normal: the network check needs no meaning)."""
    rng = np.random.RandomState(seed + 1)
    size = SMALL_OPTIONS["input_size"]
    return torch.tensor(rng.standard_normal((BATCH, VIEWS, 9, size, size)), dtype=torch.float32)


def pinned_gaussians(gaussians: torch.Tensor) -> dict:
    """What the reference keeps of ``[B, N, 14]`` Gaussians."""
    return {"stride": GAUSSIAN_STRIDE, "subset": gaussians[:, ::GAUSSIAN_STRIDE].tolist(),
            "mean": gaussians.mean(dim=1).tolist(), "std": gaussians.std(dim=1).tolist()}


def install_stubs(kiui_src: Path) -> None:
    """Stand-ins for the imports the measured code does not use; kiui's cam.py and op.py are real."""
    def module(name: str, **attrs) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        return mod

    module("tyro", extras=types.SimpleNamespace(subcommand_type_from_defaults=lambda *a, **k: None))
    module("roma")
    module("cv2")
    module("diff_gaussian_rasterization", GaussianRasterizationSettings=None, GaussianRasterizer=None)

    class LPIPS(torch.nn.Module):  # a parameter, so we see whether state_dict() keeps lpips keys
        def __init__(self, net="vgg"):
            super().__init__()
            self.marker = torch.nn.Parameter(torch.zeros(1))

    kiui = module("kiui")
    kiui.__path__ = []  # a package, so kiui.cam / kiui.op resolve to the modules below
    module("kiui.lpips", LPIPS=LPIPS)
    typing_stub = module("kiui.typing")  # the wheel's typing.py is only a comment; op.py needs these
    exec("from typing import *\nfrom torch import Tensor\nfrom numpy import ndarray", typing_stub.__dict__)
    for name in ("op", "cam"):
        mod = module(f"kiui.{name}")
        source = (kiui_src / "kiui" / f"{name}.py").read_text()
        exec(compile(source, str(kiui_src / "kiui" / f"{name}.py"), "exec"), mod.__dict__)
        setattr(kiui, name, mod)


def main(lgm_repo: Path, kiui_src: Path) -> None:
    import os

    os.environ["XFORMERS_DISABLED"] = "1"  # core/attention.py's plain path (xformers computes the same)
    install_stubs(kiui_src)
    sys.path.insert(0, str(lgm_repo))
    import core.gs
    from core.models import LGM
    from core.options import Options, config_defaults

    core.gs.GaussianRenderer.__init__ = lambda self, opt: None  # it puts a tensor on CUDA; unused here
    commit = subprocess.run(["git", "-C", str(lgm_repo), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    files = ["core/models.py", "core/unet.py", "core/attention.py", "core/options.py", "core/utils.py"]

    with torch.device("meta"):
        big = LGM(config_defaults["big"])
    keys = big.state_dict()
    dropped = sorted(set(torch.nn.Module.state_dict(big)) - set(keys))
    (HERE / "lgm_big_keys.json").write_text(json.dumps({
        "source": {
            "repository": "3DTopia/LGM", "commit": commit, "files": files, "options": "config_defaults['big']",
            "how": "tests/data/lgm_public_reference.py: the public LGM built on the meta device (imports of the "
                   "rasteriser, xformers, tyro, kiui stubbed), state_dict() dumped",
            "lpips": f"the public LGM holds an LPIPS loss network (lpips_loss, kiui.lpips, VGG) when "
                     f"lambda_lpips > 0 (default 1.0); its state_dict() override drops those keys ({dropped} "
                     "with the stub), and training saves with accelerate's save_model (state_dict()), so the "
                     "released checkpoints hold unet.* and conv.* only; not verified on the released file itself",
            "num_parameters": sum(v.numel() for v in keys.values()),
        },
        "keys": "KEYS",
    }, indent=1).replace('"KEYS"', "[\n" + ",\n".join(json.dumps([k, list(v.shape)]) for k, v in keys.items())
                         + "\n ]") + "\n")

    torch.manual_seed(0)
    small = LGM(Options(**SMALL_OPTIONS, lambda_lpips=0.0)).eval()
    small.load_state_dict(reference_state({k: tuple(v.shape) for k, v in small.state_dict().items()}))
    with torch.no_grad():
        gaussians = small.forward_gaussians(reference_images())
    rays = {}
    ray_model = LGM(Options(**{**SMALL_OPTIONS, "input_size": RAY_SIZE}, lambda_lpips=0.0))
    for elevation in RAY_ELEVATIONS_KIUI:
        rays[str(elevation)] = ray_model.prepare_default_rays("cpu", elevation=elevation).float().tolist()
    (HERE / "lgm_public_reference.json").write_text(json.dumps({
        "source": {"repository": "3DTopia/LGM", "commit": commit, "files": files + ["infer.py"],
                   "kiui": "kiui 0.3.5 wheel, kiui/cam.py (orbit_camera) and kiui/op.py (safe_normalize)",
                   "how": "tests/data/lgm_public_reference.py", "torch": torch.__version__},
        "options": SMALL_OPTIONS, "seed": SEED, "batch": BATCH, "views": VIEWS,
        "gaussians": pinned_gaussians(gaussians),
        "rays": {"size": RAY_SIZE, "fovy": Options().fovy, "cam_radius": Options().cam_radius,
                 "elevations_kiui": rays},
    }) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
