"""The mvdream family: MVDream's MultiViewUNetModel (policy/mvdream_unet.py) against the public code's
own numbers (tests/data/mvdream_unet_*.json, from tests/data/mvdream_unet_reference.py), and a tiny
random MVDream-layout model through the policy and the learner's update."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import policy_checks
from actors.batches import RewardResult, RolloutBatch
from geometry.conventions import mvdream_camera_matrices, mvdream_cameras
from learner.config import TrainConfig
from learner.trainer import Trainer
from policy.families import FamilyMismatchError, detect_family
from policy.grid import pictures
from policy.models import create_tiny_mvdream_model, load_components
from policy.mvdream_unet import MultiViewUNetModel
from policy.pipeline import MultiViewPolicy
from policy.settings import SamplingSettings

DATA = Path(__file__).resolve().parent / "data"
WORDS = ["a", "red", "blue", "green", "cube", "ball", "chair"]
PROMPTS = ["a red cube", "a blue ball", "a red cube"]
SETTINGS = SamplingSettings(num_steps=2, guidance_scale=3.0)
V, LATENT, VIEW = 4, 8, 32  # the tiny model: 4 views of 8x8 latents, 32 px views (VAE x4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return create_tiny_mvdream_model(tmp_path_factory.mktemp("mvdream") / "tiny", seed=0, words=WORDS)


def make_policy(model_dir, finetune="lora", **kwargs) -> MultiViewPolicy:
    torch.manual_seed(0)  # the LoRA initialisation
    return MultiViewPolicy(load_components(model_dir), finetune, **kwargs)


def recompute(policy, traj, settings=SETTINGS) -> torch.Tensor:
    return policy_checks.recompute(policy, traj, settings)


def fill(model: torch.nn.Module, seed: int = 0) -> None:
    """tests/data/mvdream_unet_reference.py's weights: randn * 0.2, tensors in sorted name order."""
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state):
            state[name].copy_(torch.randn(state[name].shape, generator=g) * 0.2)


# ---- the UNet against the public code ------------------------------------------------------

def test_full_size_state_dict_is_the_public_ports():
    reference = json.loads((DATA / "mvdream_unet_keys.json").read_text())
    assert reference["source"]["repository"].endswith("ashawkey/mvdream_diffusers")
    with torch.device("meta"):
        unet = MultiViewUNetModel(**reference["source"]["config"])
    ours = [(name, list(t.shape)) for name, t in unet.state_dict().items()]
    assert ours == list(reference["keys"].items())
    assert sum(t.numel() for t in unet.state_dict().values()) == reference["source"]["num_parameters"]


def test_forward_matches_the_public_code():
    reference = json.loads((DATA / "mvdream_unet_reference.json").read_text())
    unet = MultiViewUNetModel(**reference["source"]["config"]).eval()
    fill(unet)
    g = torch.Generator().manual_seed(1)
    x, context, camera = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 77, 16, generator=g), \
        torch.randn(8, 16, generator=g)
    recipe = reference["recipe"]
    with torch.no_grad():
        out = unet(x, torch.tensor(recipe["timesteps"]), context, camera=camera,
                   num_frames=recipe["num_frames"]).sample
    expected = torch.tensor(reference["output"]).reshape(reference["output_shape"])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)  # float32, other attention kernels
    # The views of a sample attend to each other, samples do not.
    x2 = x.clone()
    x2[0] += 1  # sample 0, view 0
    with torch.no_grad():
        moved = unet(x2, torch.tensor(recipe["timesteps"]), context, camera=camera, num_frames=4).sample
    assert not torch.allclose(moved[1:4], out[1:4]) and torch.equal(moved[4:], out[4:])


def test_loads_a_unet_saved_as_the_port_saves_it(tmp_path):
    """The port's unet/: config.json with only its conversion's keys, fp16 safetensors."""
    from safetensors.torch import save_file

    config = json.loads((DATA / "mvdream_unet_reference.json").read_text())["source"]["config"]
    unet = MultiViewUNetModel(**config)
    fill(unet)
    (tmp_path / "config.json").write_text(json.dumps(
        {"_class_name": "MultiViewUNetModel", "_diffusers_version": "0.25.0", **config, "use_checkpoint": False}))
    save_file({k: v.half().contiguous() for k, v in unet.state_dict().items()},
              tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = MultiViewUNetModel.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert all(torch.equal(loaded.state_dict()[k], v.half().float()) for k, v in unet.state_dict().items())


def test_wrong_config_is_a_clear_error(model_dir, tmp_path):
    unet_dir = tmp_path / "unet"
    shutil.copytree(model_dir / "unet", unet_dir)
    config = json.loads((unet_dir / "config.json").read_text())
    # Keys that do not change the network (and the private ones) are accepted.
    (unet_dir / "config.json").write_text(json.dumps({**config, "use_checkpoint": True, "_name_or_path": "x"}))
    MultiViewUNetModel.from_pretrained(unet_dir)
    (unet_dir / "config.json").write_text(json.dumps({**config, "num_frames": 4}))
    with pytest.raises(ValueError, match=r"unknown keys \['num_frames'\]"):
        MultiViewUNetModel.from_pretrained(unet_dir)
    (unet_dir / "config.json").write_text(json.dumps({**config, "ip_dim": 16}))
    with pytest.raises(ValueError, match="unsupported config ip_dim=16"):
        MultiViewUNetModel.from_pretrained(unet_dir)
    with pytest.raises(ValueError, match="multiples of 32"):
        MultiViewUNetModel(model_channels=16, channel_mult=(1,), context_dim=8)
    with pytest.raises(TypeError, match="num_frames"):
        MultiViewUNetModel(num_frames=4)


# ---- the family ---------------------------------------------------------------------------

def test_family_is_read_from_the_port_layout(model_dir, tmp_path):
    assert detect_family(model_dir) == "mvdream"
    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "MVDreamPipeline" and index["unet"] == ["mv_unet", "MultiViewUNetModel"]
    assert json.loads((model_dir / "unet" / "config.json").read_text())["_class_name"] == "MultiViewUNetModel"
    c = load_components(model_dir)
    assert c.family == "mvdream" and isinstance(c.unet, MultiViewUNetModel) and c.vae is not None
    assert c.text_encoder_2 is None
    with pytest.raises(FamilyMismatchError, match="holds a mvdream model: its unet/config.json names the class"):
        load_components(model_dir, family="sd-grid")
    # ImageDream (same UNet class, image-prompted) is refused by name.
    imagedream = tmp_path / "imagedream"
    shutil.copytree(model_dir, imagedream)
    config = json.loads((imagedream / "unet" / "config.json").read_text())
    (imagedream / "unet" / "config.json").write_text(json.dumps({**config, "ip_dim": 16}))
    with pytest.raises(FamilyMismatchError, match="ImageDream"):
        detect_family(imagedream)
    shutil.rmtree(imagedream / "vae")
    (imagedream / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FamilyMismatchError, match="MVDream UNet .* but no vae/"):
        detect_family(imagedream)


def test_builtin_tiny_mvdream(tmp_path):
    from policy.models import TINY_MVDREAM_MODEL_VERSION, resolve_model_path

    path = resolve_model_path("builtin:tiny-mvdream-3", tmp_path)
    assert path == tmp_path / f"tiny-mvdream-random-v{TINY_MVDREAM_MODEL_VERSION}-seed3"
    assert detect_family(path) == "mvdream"
    assert resolve_model_path("builtin:tiny-mvdream-3", tmp_path) == path  # created once


def test_cameras_and_their_conditioning(model_dir):
    policy = make_policy(model_dir)
    expected = mvdream_cameras(15.0, 2.7, 50.0)
    assert torch.equal(policy.cameras.c2w, expected.c2w) and policy.cameras.fov_deg == 50.0
    # What the UNet sees: MVDream's own matrices (its get_camera at elevation 15), flattened.
    torch.testing.assert_close(policy.layout.camera_conditioning, mvdream_camera_matrices(15.0).flatten(1),
                               atol=1e-6, rtol=0)
    assert policy.image_size == VIEW


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_sample_recompute_and_update(model_dir, finetune):
    policy = make_policy(model_dir, finetune)
    traj = policy.sample(PROMPTS, [1, 2, 3], SETTINGS)
    assert traj.latents.shape == (3, SETTINGS.num_steps + 1, V, 4, LATENT, LATENT)  # [B, T+1, V, 4, h, w]
    assert traj.views.shape == (3, V, 3, VIEW, VIEW) and traj.views.dtype == torch.uint8
    assert traj.cameras.num_views == V
    assert pictures(traj.views).shape == (3, 2 * VIEW, 2 * VIEW, 3)  # the PNGs' 2x2 picture
    assert traj.log_probs.shape == (3, SETTINGS.num_steps) and torch.isfinite(traj.log_probs).all()
    assert torch.equal(traj.log_probs, traj.ref_log_probs)
    # Deterministic per (prompt, seed), whatever the batch.
    alone = policy.sample([PROMPTS[1]], [2], SETTINGS)
    # (float32 batched kernels round differently; x0 = (x - sqrt(1 - a) eps) / sqrt(a) scales that by
    # up to 1 / sqrt(a) ~ 15 at the first step: the same tolerance as the grid families')
    torch.testing.assert_close(alone.latents[0], traj.latents[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(alone.log_probs[0], traj.log_probs[1], atol=1e-4, rtol=0)
    again = policy.sample(PROMPTS, [1, 2, 3], SETTINGS)
    assert torch.equal(again.latents, traj.latents) and torch.equal(again.log_probs, traj.log_probs)
    # The training-time recomputation from the stored trajectory gives the sampling log-probs.
    assert (recompute(policy, traj).detach() - traj.log_probs).abs().max() < 1e-5

    probe = traj.latents[:1, 0].to(policy.device)
    embeds = policy.encode_prompts(PROMPTS[:1])
    negative = policy.negative_embeds(embeds, SETTINGS.negative_prompt)
    t = traj.timesteps[0]
    with torch.no_grad():
        output_before = policy.guided_model_output(policy.unet, probe, t, embeds, negative, 3.0)
    frozen = {n: p.detach().clone() for n, p in policy.text_encoder.named_parameters()}
    before = policy.trainable_state_dict()
    # One learner update (DDPO, the default algorithm) with fake rewards.
    trainer = Trainer(policy, TrainConfig(learning_rate=1e-2), SETTINGS, seed=0)
    ids = [f"s{i}" for i in range(len(PROMPTS))]
    samples = trainer.assemble([RolloutBatch.of(ids, 0, traj)],
                               [RewardResult(ids, np.arange(len(ids), dtype=np.float64))])
    metrics = trainer.update(samples, trainer.advantages(samples))
    assert trainer.version == 1 and metrics["skipped_steps"] == 0 and np.isfinite(metrics["loss"])
    assert metrics["logprob_recompute_gap"] < 1e-4
    after = policy.trainable_state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if finetune == "lora":  # every adapter moved (lora_B starts at zero)
        assert {k for k in before if "lora_B" in k} <= changed
    else:
        assert {"out.2.weight", "camera_embed.0.weight", "time_embed.0.weight"} <= changed
    assert all(torch.equal(p, frozen[n]) for n, p in policy.text_encoder.named_parameters())
    with torch.no_grad():
        output_after = policy.guided_model_output(policy.unet, probe, t, embeds, negative, 3.0)
    assert not torch.allclose(output_after, output_before)
    moved = policy.sample(PROMPTS[:1], [1], SETTINGS)
    assert not torch.equal(moved.log_probs, moved.ref_log_probs)  # the reference stayed


def test_lora_targets_the_attention_projections(model_dir):
    policy = make_policy(model_dir)
    names = {n for n, _ in policy.unet.named_parameters() if "lora_A" in n}
    for projection in ("to_q", "to_k", "to_v", "to_out.0"):
        assert any(f"attn1.{projection}.lora_A" in n for n in names)
        assert any(f"attn2.{projection}.lora_A" in n for n in names)
    assert all(n.startswith(("input_blocks", "middle_block", "output_blocks")) for n in names)


def test_views_decode_one_by_one_and_pull_gradients_back(model_dir):
    policy = make_policy(model_dir)
    traj = policy.sample(PROMPTS[:2], [1, 2], SETTINGS, record_x0=True)
    x0 = traj.latents[:, -1]
    with torch.no_grad():
        views = policy.decode(x0)
        single = policy.decode(x0[1:, 2:3])  # one view alone decodes the same
    assert views.shape == (2, V, 3, VIEW, VIEW)
    torch.testing.assert_close(single[0, 0], views[1, 2], atol=1e-5, rtol=0)
    grad = policy.view_gradient_to_model(x0, torch.ones_like(views))
    assert grad.shape == x0.shape and grad.abs().sum() > 0
    # Nabla-GFlowNet's x0 predictions: one per state after the first, decoded per (sample, step).
    assert traj.x0_predictions.shape == (2, SETTINGS.num_steps, V, 4, LATENT, LATENT)
    x0s = traj.x0_predictions
    with torch.no_grad():
        assert policy.decode(x0s.flatten(0, 1)).unflatten(0, x0s.shape[:2]).shape == (2, 2, V, 3, VIEW, VIEW)
    zmv = policy.sample(PROMPTS[:1], [1], SETTINGS, sampler="zmv", reference=False)
    assert torch.isfinite(zmv.log_probs).all()


def test_gradient_checkpointing_gives_the_same_gradients(model_dir):
    policy_checks.assert_checkpointing_keeps_gradients(lambda **kw: make_policy(model_dir, **kw), PROMPTS, SETTINGS)


def test_bf16_on_cpu(model_dir):
    policy = make_policy(model_dir, dtype="bf16")
    assert {p.dtype for p in policy.unet.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in policy.trainable_parameters()} == {torch.float32}
    traj = policy.sample(PROMPTS[:2], [1, 2], SETTINGS)
    assert traj.latents.dtype == torch.float32 and torch.isfinite(traj.log_probs).all()
    torch.testing.assert_close(recompute(policy, traj).detach(), traj.log_probs, atol=1e-5, rtol=0)


def test_rollout_and_learner_roles_build_the_policy_from_the_config(model_dir, tmp_path):
    """The actors' classes (without Ray): model.family=mvdream reaches both roles, weights cross,
    the learner's recompute matches the rollout's log-probs, and a checkpoint round-trips."""
    from actors.batches import SampleSpec
    from actors.rollout import RolloutWorker
    from learner.actor import Learner
    from learner.config import load_config

    path = str(model_dir)
    config = load_config([f"model.path={path}", "model.family=mvdream", "model.lora.rank=2", "sampling.num_steps=2",
                          "train.torch_threads=1", "rollout.torch_threads=1"])
    learner = Learner(path, config)
    worker = RolloutWorker(path, config.model, config.sampling, torch_threads=1)
    assert learner.policy.family == worker.policy.family == "mvdream"
    worker.load_weights(0, learner.policy.trainable_state_dict())
    specs = [SampleSpec(f"e0-{i}", i, p, seed=i) for i, p in enumerate(PROMPTS)]
    batch, reward_input, _ = worker.sample(specs)
    assert reward_input.views.shape == (3, V, 3, VIEW, VIEW) and reward_input.cameras.num_views == V
    trainer = learner.trainer
    samples = trainer.assemble([batch], [RewardResult(batch.sample_ids, np.array([0.0, 1.0, 2.0]))])
    metrics = trainer.update(samples, trainer.advantages(samples))
    assert metrics["logprob_recompute_gap"] < 1e-4
    learner.save_checkpoint(str(tmp_path / "ckpt"), epoch=0)
    weights = learner.policy.trainable_state_dict()
    fresh = Learner(path, config)
    assert fresh.load_checkpoint(str(tmp_path / "ckpt"))["version"] == 1
    assert all(torch.equal(v, fresh.policy.trainable_state_dict()[k]) for k, v in weights.items())
