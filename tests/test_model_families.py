"""SD and SDXL 2x2-grid models (sd-grid, sdxl-grid) through the same policy and learner code.

Tiny random models are built in code, saved in the diffusers layout and loaded by
the project's loader: the families are told apart by that layout alone.
"""

import shutil

import numpy as np
import pytest
import torch

import policy_checks
from actors.batches import RewardResult, RolloutBatch
from learner.config import ConfigError, TrainConfig, load_config
from learner.trainer import Trainer
from policy.families import FamilyMismatchError, detect_family
from policy.models import (create_tiny_sd_model, create_tiny_sdxl_model, load_components,
                           resolve_model_path)
from policy.pipeline import MultiViewPolicy, vae_dtype
from policy.settings import SamplingSettings

WORDS = ["a", "red", "blue", "green", "cube", "ball", "chair"]
PROMPTS = ["a red cube", "a blue ball", "a red cube"]
SETTINGS = SamplingSettings(num_steps=2, guidance_scale=3.0)
FAMILIES = ["sd-grid", "sdxl-grid"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {"sd-grid": create_tiny_sd_model(root / "sd", seed=0, words=WORDS),
            "sdxl-grid": create_tiny_sdxl_model(root / "sdxl", seed=0, words=WORDS)}


def make_policy(family_dirs, family, finetune="lora", **kwargs) -> MultiViewPolicy:
    torch.manual_seed(0)  # the LoRA initialisation
    return MultiViewPolicy(load_components(family_dirs[family], family=family), finetune, **kwargs)


def recompute(policy, traj, settings=SETTINGS) -> torch.Tensor:
    return policy_checks.recompute(policy, traj, settings)


def one_update(policy, traj) -> dict:
    """One learner update (the project's Trainer) on the trajectory with fake rewards."""
    trainer = Trainer(policy, TrainConfig(learning_rate=1e-2), SETTINGS, seed=0)
    ids = [f"s{i}" for i in range(len(traj.prompts))]
    samples = trainer.assemble([RolloutBatch.of(ids, 0, traj)],
                               [RewardResult(ids, np.arange(len(ids), dtype=np.float64))])
    metrics = trainer.update(samples, trainer.advantages(samples))
    assert trainer.version == 1 and metrics["skipped_steps"] == 0 and np.isfinite(metrics["loss"])
    return metrics


def test_family_is_read_from_the_directory(family_dirs, tiny_model_dir):
    assert detect_family(tiny_model_dir) == "pixel-grid"
    for family, path in family_dirs.items():
        assert detect_family(path) == family
        c = load_components(path)  # auto
        assert c.family == family and c.vae is not None
        assert (c.text_encoder_2 is not None) == (family == "sdxl-grid")
    assert load_components(tiny_model_dir).family == "pixel-grid"


def test_a_path_without_a_model_is_no_family(tmp_path):
    """No silent 'pixel-grid' for a missing or empty directory: the error names the missing file."""
    for path in (tmp_path / "missing", tmp_path):
        with pytest.raises(FamilyMismatchError, match="not a model directory.*unet/config.json"):
            detect_family(path)


def test_builtin_names_map_to_families(tmp_path, monkeypatch):
    import policy.models as models

    made = []
    for name in ("create_tiny_model", "create_tiny_sd_model", "create_tiny_sdxl_model"):
        monkeypatch.setattr(models, name, lambda path, seed, name=name: made.append((name, seed)))
    models.resolve_model_path("builtin:tiny-sd", tmp_path)
    models.resolve_model_path("builtin:tiny-sdxl-3", tmp_path)
    models.resolve_model_path("builtin:tiny-2", tmp_path)
    assert made == [("create_tiny_sd_model", 0), ("create_tiny_sdxl_model", 3), ("create_tiny_model", 2)]
    with pytest.raises(ValueError, match="builtin:tiny-sdxl"):
        resolve_model_path("builtin:sdxl")


def test_a_directory_of_another_family_is_a_clear_error(family_dirs, tmp_path):
    with pytest.raises(FamilyMismatchError) as err:
        load_components(family_dirs["sd-grid"], family="sdxl-grid")
    message = str(err.value)
    assert "model.family=sdxl-grid" in message and "holds a sd-grid model" in message
    assert "Set model.family=sd-grid (or auto)" in message
    with pytest.raises(FamilyMismatchError, match="holds a sdxl-grid model: it has text_encoder_2/"):
        load_components(family_dirs["sdxl-grid"], family="pixel-grid")
    # Checked by the config, before anything starts.
    with pytest.raises(ConfigError, match="model.family=sd-grid but model directory .* holds a sdxl-grid"):
        load_config([f"model.path={family_dirs['sdxl-grid']}", "model.family=sd-grid"])
    with pytest.raises(ConfigError, match="model.family must be auto or one of pixel-grid, sd-grid, sdxl-grid"):
        load_config(["model.family=sd3"])
    # Half an SDXL directory names what is missing.
    broken = tmp_path / "broken"
    shutil.copytree(family_dirs["sdxl-grid"], broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FamilyMismatchError, match="looks like an SDXL model .* lacks text_encoder_2/"):
        load_components(broken)


@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sample_recompute_and_update(family_dirs, family, finetune):
    policy = make_policy(family_dirs, family, finetune)
    traj = policy.sample(PROMPTS, [1, 2, 3], SETTINGS)
    assert traj.latents.shape == (3, SETTINGS.num_steps + 1, 4, 8, 8)  # latents: 64 px grid / 8
    assert traj.views.shape == (3, 4, 3, 32, 32) and traj.views.dtype == torch.uint8  # the grid's 4 views
    assert traj.cameras.num_views == 4
    assert traj.log_probs.shape == (3, SETTINGS.num_steps) and torch.isfinite(traj.log_probs).all()
    assert torch.equal(traj.log_probs, traj.ref_log_probs)  # the reference is the policy at the start
    # Deterministic per (prompt, seed), whatever the batch.
    alone = policy.sample([PROMPTS[1]], [2], SETTINGS)
    torch.testing.assert_close(alone.latents[0], traj.latents[1], atol=1e-4, rtol=0)
    # The training-time recomputation gives the sampling log-probs (float32).
    torch.testing.assert_close(recompute(policy, traj).detach(), traj.log_probs, atol=1e-5, rtol=0)

    frozen = {n: p.detach().clone() for n, p in policy.text_encoder.named_parameters()}
    before = policy.trainable_state_dict()
    metrics = one_update(policy, traj)
    assert metrics["logprob_recompute_gap"] < 1e-5
    after = policy.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p, frozen[n]) for n, p in policy.text_encoder.named_parameters())
    # The reference did not move with the policy: KL is no longer 0.
    moved = policy.sample(PROMPTS[:1], [1], SETTINGS)
    assert not torch.equal(moved.log_probs, moved.ref_log_probs)


def test_sdxl_conditioning(family_dirs):
    policy = make_policy(family_dirs, "sdxl-grid")
    cond = policy.encode_prompts(PROMPTS[:2])
    # Both encoders' penultimate hidden states side by side (16 + 16), pooled projection of the
    # second (8), micro-conditioning of the 64 px grid: original size, crop (0, 0), target size.
    assert cond.hidden_states.shape == (2, 77, 32)
    assert cond.text_embeds.shape == (2, 8)
    assert cond.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    first = policy.text_encoder(policy._token_ids(policy.tokenizer, PROMPTS[:2]), output_hidden_states=True)
    torch.testing.assert_close(cond.hidden_states[..., :16], first.hidden_states[-2])
    zero = policy.negative_embeds(cond, "zero")
    assert not zero.hidden_states.any() and not zero.text_embeds.any()
    assert torch.equal(zero.time_ids, cond.time_ids)
    empty = policy.negative_embeds(cond, "empty")
    blank = policy.encode_prompts([""])
    assert len(empty) == 2
    torch.testing.assert_close(empty.text_embeds[1], blank.text_embeds[0])
    torch.testing.assert_close(empty.hidden_states[1], blank.hidden_states[0])
    # "empty" samples too, through the same code.
    traj = policy.sample(PROMPTS[:1], [0], SamplingSettings(num_steps=1, negative_prompt="empty"))
    assert torch.isfinite(traj.log_probs).all()


@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_on_cpu(family_dirs, family, finetune):
    policy = make_policy(family_dirs, family, finetune, dtype="bf16")
    frozen = [policy.text_encoder, policy.vae] + ([policy.text_encoder_2] if policy.text_encoder_2 else [])
    frozen.append(policy.reference_unet if finetune == "full" else policy.unet)
    for module in frozen:  # for LoRA: the base UNet (its adapter is checked below)
        assert {p.dtype for p in module.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in policy.trainable_parameters()} == {torch.float32}  # master weights
    traj = policy.sample(PROMPTS[:2], [1, 2], SETTINGS)
    assert traj.latents.dtype == torch.float32 and torch.isfinite(traj.log_probs).all()
    # Same batch, same numerics: the recomputation still matches.
    torch.testing.assert_close(recompute(policy, traj).detach(), traj.log_probs, atol=1e-5, rtol=0)
    one_update(policy, traj)
    assert {p.dtype for p in policy.trainable_parameters()} == {torch.float32}


def test_fp16_needs_cuda_and_sdxl_vae_is_upcast(family_dirs):
    c = load_components(family_dirs["sdxl-grid"])
    with pytest.raises(ValueError, match="fp16 needs a CUDA device .* use model.dtype=bf16 or fp32"):
        MultiViewPolicy(c, "lora", dtype="fp16")
    with pytest.raises(ConfigError, match="model.dtype=fp16 needs GPUs"):
        load_config(["model.dtype=fp16"])
    with pytest.raises(ConfigError, match="model.dtype must be one of fp32, fp16, bf16"):
        load_config(["model.dtype=fp8"])
    # SDXL's VAE (force_upcast) decodes in float32 under fp16; SD's stays in fp16; bf16 needs no upcast.
    assert vae_dtype(c.vae, torch.float16) == torch.float32
    assert vae_dtype(c.vae, torch.bfloat16) == torch.bfloat16
    assert vae_dtype(load_components(family_dirs["sd-grid"]).vae, torch.float16) == torch.float16


def test_gradient_checkpointing_gives_the_same_gradients(family_dirs):
    policy_checks.assert_checkpointing_keeps_gradients(lambda **kw: make_policy(family_dirs, "sdxl-grid", **kw), PROMPTS, SETTINGS)


def test_fp16_loss_scaling_skips_overflows_without_stopping(family_dirs):
    """fp16 runs need CUDA; the loss-scaling logic of the update is the same on CPU."""
    policy = make_policy(family_dirs, "sd-grid")
    traj = policy.sample(PROMPTS[:2], [1, 2], SETTINGS)
    trainer = Trainer(policy, TrainConfig(max_nonfinite_steps=1), SETTINGS, seed=0)
    assert not trainer.scaler.is_enabled()  # fp32: no loss scaling
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # every scaled gradient overflows
    ids = ["a", "b"]
    samples = trainer.assemble([RolloutBatch.of(ids, 0, traj)], [RewardResult(ids, np.array([1.0, 2.0]))])
    advantages = np.array([1.0, -1.0])
    before = policy.trainable_state_dict()
    metrics = trainer.update(samples, advantages)  # an overflow: skipped, but not a failure
    assert metrics["skipped_steps"] == 1 and metrics["grad_scale"] == 2.0**126
    assert all(torch.equal(v, policy.trainable_state_dict()[k]) for k, v in before.items())
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    metrics = trainer.update(samples, advantages)
    assert metrics["skipped_steps"] == 0
    assert any(not torch.equal(v, policy.trainable_state_dict()[k]) for k, v in before.items())


def test_rollout_and_learner_roles_build_the_policy_from_the_config(family_dirs, tmp_path):
    """The actors' classes (without Ray): model.* reaches both roles, weights cross, the
    learner's recompute matches the rollout's log-probs, and a checkpoint round-trips."""
    from actors.batches import SampleSpec
    from actors.rollout import RolloutWorker
    from learner.actor import Learner

    path = str(family_dirs["sdxl-grid"])
    config = load_config([f"model.path={path}", "model.family=sdxl-grid", "model.dtype=bf16",
                          "model.gradient_checkpointing=true", "model.lora.rank=2", "sampling.num_steps=2",
                          "train.torch_threads=1", "rollout.torch_threads=1"])
    learner = Learner(path, config)
    worker = RolloutWorker(path, config.model, config.sampling, torch_threads=1)
    for policy in (learner.policy, worker.policy):
        assert policy.family == "sdxl-grid" and policy.dtype == torch.bfloat16
        assert policy.unet.is_gradient_checkpointing
    worker.load_weights(0, learner.policy.trainable_state_dict())
    specs = [SampleSpec(f"e0-{i}", i, p, seed=i) for i, p in enumerate(PROMPTS)]
    batch, reward_input, _ = worker.sample(specs)
    assert reward_input.views.shape == (3, 4, 3, 32, 32) and reward_input.cameras.num_views == 4
    trainer = learner.trainer
    samples = trainer.assemble([batch], [RewardResult(batch.sample_ids, np.array([0.0, 1.0, 2.0]))])
    metrics = trainer.update(samples, trainer.advantages(samples))
    assert metrics["logprob_recompute_gap"] < 1e-5 and "grad_scale" not in metrics  # no loss scaling in bf16
    learner.save_checkpoint(str(tmp_path / "ckpt"), epoch=0)
    weights = learner.policy.trainable_state_dict()
    fresh = Learner(path, config)
    assert fresh.load_checkpoint(str(tmp_path / "ckpt"))["version"] == 1
    assert all(torch.equal(v, fresh.policy.trainable_state_dict()[k]) for k, v in weights.items())


@pytest.mark.parametrize("family, finetune", [("sd-grid", "lora"), ("sdxl-grid", "full")])
def test_a_run_through_the_actors_with_the_mrc_reward(family, finetune, family_dirs, tmp_path, local_ray):
    """Sampling on a rollout actor, MRC (LRM + LPIPS) on a reward actor, and a learner update:
    the driver's real path, for each family (and each finetuning mode once)."""
    import pandas as pd

    from learner.driver import run

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]))
    run_dir = run(load_config([
        f"model.path={family_dirs[family]}", f"model.finetune={finetune}", f"run.output_dir={tmp_path / 'runs'}",
        f"prompts.file={prompts}", "reward.kind=mrc", "reward.alignment=null", "eval.prompts_file=null",
        "train.epochs=1", "train.samples_per_epoch=4", "train.group_size=1", "rollout.batch_size=2", "sampling.num_steps=2",
        "rollout.num_cpus=0.5", "reward.num_cpus=0.5", "train.num_cpus=0.5", "run.samples_to_save=0"]))
    m = pd.read_parquet(run_dir.path / "metrics.parquet")
    assert m["version"].tolist() == [1] and m["num_samples"].tolist() == [4]
    assert m["mrc_mean"].between(0, 1).all() and np.isfinite(m["grad_norm"]).all()
    assert m["logprob_recompute_gap"].max() < 1e-4
