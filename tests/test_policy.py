import pytest
import torch
from diffusers import DDIMScheduler

from geometry.cameras import grid_rig
from policy import ddim_step_with_logprob, grid_to_views, views_to_grid
from policy.ddim import predict_x0_and_eps
from policy.models import check_model_dir, load_components, resolve_model_path
from policy.pipeline import MultiViewPolicy, SamplingSettings


def make_scheduler(prediction_type="epsilon", steps=10):
    s = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    s.set_timesteps(steps)
    return s


def test_log_prob_is_the_closed_form_gaussian_density():
    s = make_scheduler()
    torch.manual_seed(0)
    x_t, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = s.timesteps[3]
    prev, log_prob = ddim_step_with_logprob(s, eps, t, x_t, eta=0.7, generator=torch.Generator().manual_seed(1))
    # Closed form, written independently from the REFERENCES formulas.
    a_t = s.alphas_cumprod[t]
    a_prev = s.alphas_cumprod[t - 100]
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    sigma = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    std = 0.7 * sigma
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    expected = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)
    # Re-evaluating the same action gives the same number.
    _, again = ddim_step_with_logprob(s, eps, t, x_t, eta=0.7, prev_sample=prev)
    torch.testing.assert_close(again, log_prob)


def test_last_step_uses_alphas_cumprod_0():
    s = make_scheduler()
    x_t, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = s.timesteps[-1]  # 1: its previous timestep is clamped to 0
    assert int(t) == 1
    prev, log_prob = ddim_step_with_logprob(s, eps, t, x_t, prev_sample=x_t * 0.9)
    assert torch.isfinite(log_prob).all()


@pytest.mark.parametrize("eta", [0.0, -0.5])
def test_eta_zero_or_negative_is_rejected(eta):
    s = make_scheduler()
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step_with_logprob(s, torch.randn(1, 3, 4, 4), s.timesteps[0], torch.randn(1, 3, 4, 4), eta=eta)


def test_prediction_types_agree():
    """The same underlying (x0, eps), given as epsilon, sample or v, gives the same log-prob."""
    torch.manual_seed(0)
    x_t, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    s_eps = make_scheduler("epsilon")
    t = s_eps.timesteps[4]
    x0, _ = predict_x0_and_eps(s_eps, eps, t, x_t)
    a_t = s_eps.alphas_cumprod[t]
    v = a_t.sqrt() * eps - (1 - a_t).sqrt() * x0
    prev, ref = ddim_step_with_logprob(s_eps, eps, t, x_t, generator=torch.Generator().manual_seed(0))
    for kind, output in [("sample", x0), ("v_prediction", v)]:
        _, lp = ddim_step_with_logprob(make_scheduler(kind), output, t, x_t, prev_sample=prev)
        torch.testing.assert_close(lp, ref, rtol=1e-4, atol=1e-4)


def test_per_sample_timesteps_match_scalar():
    s = make_scheduler()
    x_t, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    prev = torch.randn(2, 3, 4, 4)
    t = torch.tensor([int(s.timesteps[2]), int(s.timesteps[7])])
    _, both = ddim_step_with_logprob(s, eps, t, x_t, prev_sample=prev)
    _, first = ddim_step_with_logprob(s, eps[:1], t[0], x_t[:1], prev_sample=prev[:1])
    _, second = ddim_step_with_logprob(s, eps[1:], t[1], x_t[1:], prev_sample=prev[1:])
    torch.testing.assert_close(both, torch.cat([first, second]))


def test_grid_round_trip_and_order():
    grid = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    views = grid_to_views(grid)
    assert views.shape == (2, 4, 3, 4, 4)
    torch.testing.assert_close(views[:, 0], grid[:, :, :4, :4])  # top-left
    torch.testing.assert_close(views[:, 1], grid[:, :, :4, 4:])  # top-right
    torch.testing.assert_close(views[:, 2], grid[:, :, 4:, :4])  # bottom-left
    torch.testing.assert_close(views[:, 3], grid[:, :, 4:, 4:])  # bottom-right
    torch.testing.assert_close(views_to_grid(views), grid)
    with pytest.raises(ValueError):
        grid_to_views(torch.zeros(3, 7, 8))


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_components(tmp_path / "nope")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="lacks text_encoder/"):
        check_model_dir(tmp_path / "half")
    with pytest.raises(ValueError, match="unknown built-in"):
        resolve_model_path("builtin:sdxl")


def test_tiny_model_saved_in_diffusers_layout(tiny_model_dir):
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_model_dir / sub).is_dir()
    assert (tiny_model_dir / "model_index.json").is_file()
    c = load_components(tiny_model_dir)
    ids = c.tokenizer(["a red cube"], return_tensors="pt").input_ids
    assert ids[0, 0] == c.tokenizer.bos_token_id


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_sampling_recompute_and_reference(tiny_components, finetune):
    torch.manual_seed(0)
    policy = MultiViewPolicy(tiny_components(), finetune)
    settings = SamplingSettings(num_steps=3, guidance_scale=3.0)
    traj = policy.sample(["a red cube", "a blue ball", "a red cube"], [1, 2, 3], settings)
    assert traj.latents.shape == (3, 4, 3, 64, 64)
    assert traj.views.shape == (3, 4, 3, 32, 32) and traj.views.dtype == torch.uint8
    # the views are the decoded 2x2 grid, split in grid order (the family's layout)
    grid = ((traj.latents[:, -1].clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    assert torch.equal(views_to_grid(traj.views), grid) and torch.equal(traj.cameras.c2w, grid_rig().c2w)
    # At initialisation the policy is the reference: KL is exactly 0.
    assert torch.equal(traj.log_probs, traj.ref_log_probs)

    # Per-sample seeds: the same (prompt, seed) gives the same sample in another batch.
    alone = policy.sample(["a blue ball"], [2], settings)
    torch.testing.assert_close(alone.latents[0], traj.latents[1], atol=1e-4, rtol=0)

    # Training-time recomputation equals sampling to 1e-5 (float32).
    embeds = policy.encode_prompts(traj.prompts)
    negative = policy.negative_embeds(embeds, "zero")
    policy.scheduler.set_timesteps(settings.num_steps)
    recomputed = torch.stack([
        policy.step_log_prob(traj.latents[:, j], t, traj.latents[:, j + 1], embeds, negative, settings)
        for j, t in enumerate(traj.timesteps)], dim=1)
    torch.testing.assert_close(recomputed.detach(), traj.log_probs, atol=1e-5, rtol=0)

    # Move the trainable weights: the reference (adapter off / frozen copy) does not move.
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = policy.sample(["a red cube"], [1], settings)
    assert not torch.equal(moved.log_probs, moved.ref_log_probs)
    assert moved.kl.abs().item() > 0

    # The reference only at the trained steps: the same ref log-probs there, a copy elsewhere,
    # and the same samples.
    from policy.ddim import trained_steps

    ten = SamplingSettings(num_steps=10, guidance_scale=3.0)
    full = policy.sample(["a red cube"], [1], ten)
    part = policy.sample(["a red cube"], [1], ten, reference_min_relative_std=0.5)
    steps = trained_steps(policy.scheduler, full.timesteps, ten.eta, 0.5)
    assert 0 < len(steps) < 10
    rest = torch.ones(10, dtype=torch.bool)
    rest[steps] = False
    torch.testing.assert_close(part.ref_log_probs[:, steps], full.ref_log_probs[:, steps], atol=1e-5, rtol=0)
    assert torch.equal(part.ref_log_probs[:, rest], part.log_probs[:, rest])
    assert not torch.equal(full.ref_log_probs[:, rest], full.log_probs[:, rest])
    assert torch.equal(part.latents, full.latents)


def test_trainable_state_round_trip(tiny_components):
    torch.manual_seed(0)
    a = MultiViewPolicy(tiny_components(), "lora")
    torch.manual_seed(1)
    b = MultiViewPolicy(tiny_components(), "lora")
    state = a.trainable_state_dict()
    assert all("lora" in k for k in state)
    b.load_trainable_state_dict(state)
    for k, v in b.trainable_state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(ValueError, match="do not match"):
        b.load_trainable_state_dict({"nope": torch.zeros(1)})
