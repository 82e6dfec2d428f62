"""MiniCarve's base-model recipe, its data helpers, the shipped weights and the evaluation CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minicarve.base_model import WEIGHTS_DIR, grammar_words
from minicarve.dataset import TEST_PROMPTS, TRAIN_PROMPTS, scene_from_prompt, split

MAX_WEIGHTS_MB = 30


def test_prompt_files_come_from_the_split_and_parse_back():
    train, test = split()
    assert TRAIN_PROMPTS.read_text().split("\n")[:3] == [s.prompt for s in train[:3]]
    test_prompts = TEST_PROMPTS.read_text().strip().split("\n")
    assert len(test_prompts) >= 200 and len(set(test_prompts)) == len(test_prompts)
    assert not set(test_prompts) & {s.prompt for s in train}
    for scene in train[:50] + test[:50]:
        assert scene_from_prompt(scene.prompt) == scene
    with pytest.raises(KeyError, match="not a MiniCarve prompt"):
        scene_from_prompt("a hamburger")


def test_grammar_words_are_single_tokens(tmp_path):
    from transformers import CLIPTokenizer

    from policy.tokenizer import save_word_level_clip_tokenizer

    save_word_level_clip_tokenizer(tmp_path, grammar_words(), max_length=20)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    for word in grammar_words():
        assert tokenizer.tokenize(word) == [word + "</w>"]


def test_vae_loss_is_one_sided_on_white_and_the_trainer_resumes_and_exports(tmp_path):
    from diffusers import AutoencoderKL

    from minicarve.train_vae import VAETrainer, parse_args, reconstruction_loss

    target = torch.ones(1, 3, 4, 4)
    target[..., 0, 0] = 0.2  # one foreground pixel
    over = target.clone()
    over[..., 1:, :] = 1.3  # overshooting white costs nothing (the decode clamps to white)
    assert reconstruction_loss(over, target) == 0
    under = target.clone()
    under[..., 3, 3] = 0.9  # falling below white does
    assert reconstruction_loss(under, target) > 0

    args = parse_args(["--run-dir", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2",
                       "--out", str(tmp_path / "vae")])
    (tmp_path / "run").mkdir()
    trainer = VAETrainer(args)
    grids = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    recon, kl = trainer.train_step(grids[:2])
    assert np.isfinite(recon) and np.isfinite(kl) and trainer.step == 1
    trainer.save_state()
    again = VAETrainer(args)
    assert again.load_state() and again.step == 1
    trainer.export(grids, seconds=1.0)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert vae.config.scaling_factor == pytest.approx(1 / trainer.latent_std(grids))
    assert vae.encode(grids[:1].float() / 127.5 - 1).latent_dist.mean.shape == (1, 4, 16, 16)


def test_base_trainer_steps_on_latents_saves_resumes_and_exports_an_sd_grid_model(tmp_path):
    from minicarve.train_base import BaseTrainer, parse_args
    from minicarve.train_vae import create_vae
    from policy.models import load_components

    create_vae().save_pretrained(tmp_path / "vae")
    args = parse_args(["--run-dir", str(tmp_path / "run"), "--short-steps", "1", "--long-steps", "2",
                       "--vae", str(tmp_path / "vae")])
    prompts = [s.prompt for s in split(num_train=4, num_test=1)[0]]
    trainer = BaseTrainer(args, prompts)
    latents = trainer.encode(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8))
    assert latents.shape == (4, 4, 16, 16)
    loss = trainer.train_step(latents, trainer.input_ids)
    assert np.isfinite(loss) and trainer.step == 1
    trainer.save_state()
    again = BaseTrainer(args, prompts)
    assert again.load_state() and again.step == 1
    for a, b in zip(trainer.ema_unet.parameters(), again.ema_unet.parameters()):
        torch.testing.assert_close(a, b)
    trainer.export(tmp_path / "model")
    components = load_components(tmp_path / "model")
    assert components.family == "sd-grid" and components.vae is not None
    assert components.unet.config.sample_size == 16 and components.scheduler.config.prediction_type == "v_prediction"
    assert not components.scheduler.config.clip_sample  # latents are not bounded to [-1, 1]
    assert json.loads((tmp_path / "model" / "training.json").read_text())["steps"] == 1


def test_unet_architectures_train_in_their_own_run_directories(tmp_path):
    """--unet v2.0 builds the previous, costlier UNet (attention at 16x16 too), in a run directory of
    its own so that it never resumes the other's state; the default architecture is the shipped models'."""
    from minicarve.base_model import unet_config
    from minicarve.train_base import BaseTrainer, parse_args
    from minicarve.train_vae import create_vae

    assert parse_args([]).run_dir.name == "base-seed0"
    assert parse_args(["--unet", "v2.0"]).run_dir.name == "base-v2.0-seed0"
    shipped = json.loads((WEIGHTS_DIR / "sft-short" / "unet" / "config.json").read_text())
    assert all(list(v) == shipped[k] if isinstance(v, tuple) else v == shipped[k] for k, v in unet_config().items())
    with pytest.raises(ValueError, match="unknown MiniCarve UNet architecture"):
        unet_config("huge")
    create_vae().save_pretrained(tmp_path / "vae")
    args = parse_args(["--unet", "v2.0", "--run-dir", str(tmp_path / "run"), "--vae", str(tmp_path / "vae")])
    trainer = BaseTrainer(args, [s.prompt for s in split(num_train=4, num_test=1)[0]])
    assert trainer.model.unet.config.down_block_types[0] == "CrossAttnDownBlock2D"
    latents = trainer.encode(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8))
    assert np.isfinite(trainer.train_step(latents, trainer.input_ids))


def test_shipped_weights_fit_the_budget():
    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert files, "minicarve/weights/ is empty: run the MiniCarve training commands (docs/minicarve.md)"
    total_mb = sum(p.stat().st_size for p in files) / 2**20
    assert total_mb <= MAX_WEIGHTS_MB, f"MiniCarve weights take {total_mb:.1f} MB > {MAX_WEIGHTS_MB} MB"
    for name in ("sft-short", "sft-long"):
        assert (WEIGHTS_DIR / name / "model_index.json").is_file()


def test_evaluate_cli_on_ground_truth_and_a_tiny_model(tmp_path, tiny_model_dir):
    from learner.evaluate import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red cube\na small blue sphere on top of a large green cylinder\n")
    common = ["--prompts", str(prompts), "--samples", "2", "--threads", "1"]
    assert main(["--model", "ground-truth", "--out", str(tmp_path / "gt")] + common) == 0
    gt = json.loads((tmp_path / "gt" / "summary.json").read_text())
    assert gt["num_samples"] == 4 and gt["alignment"] > 0.5 and 0 <= gt["mrc"] < 0.2
    assert (tmp_path / "gt" / "samples.png").is_file() and (tmp_path / "gt" / "per_prompt.parquet").is_file()
    assert main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "tiny"), *common,
                 "sampling.num_steps=2"]) == 0
    tiny = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert tiny["num_samples"] == 4 and np.isfinite(tiny["mrc"])
