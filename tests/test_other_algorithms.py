"""MVC-ZigAL and Nabla-GFlowNet (algorithm=mv-zigal | mvc-zigal | nabla-gfn): their core math on
tiny inputs, then one short run of each through the real actors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DDIMScheduler

from learner.advantages import LagrangeMultiplier, zigal_advantage_gap
from learner.config import ConfigError, load_config
from learner.losses import nabla_db_loss, zigal_pair_loss
from policy.ddim import ddim_inversion_step, ddim_step_mean_std, ddim_step_with_logprob
from geometry.cameras import grid_rig
from policy.pipeline import MultiViewPolicy
from policy.settings import SamplingSettings


def _scheduler(prediction_type="epsilon"):
    s = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                      prediction_type=prediction_type, timestep_spacing="trailing")
    s.set_timesteps(8)
    return s


@pytest.mark.parametrize("t", [999, 624, 124])
def test_inversion_undoes_a_deterministic_ddim_step(t):
    s = _scheduler()
    gen = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
    x_prev, std = ddim_step_mean_std(s, eps, t, x_t, eta=0.0)
    assert float(std.max()) == 0.0
    torch.testing.assert_close(ddim_inversion_step(s, eps, t, x_prev), x_t, atol=1e-5, rtol=1e-5)


def test_inversion_reads_v_prediction_at_the_source_level():
    """v-prediction: the inverse step takes the model's output at (x_{t-1}, t-1); the v that
    carries the step's eps there brings x_t back."""
    s = _scheduler("v_prediction")
    t, prev_t = 749, 624
    gen = torch.Generator().manual_seed(1)
    x_t, v = torch.randn(1, 3, 8, 8, generator=gen), torch.randn(1, 3, 8, 8, generator=gen)
    a_t, a_p = s.alphas_cumprod[t], s.alphas_cumprod[prev_t]
    eps = a_t.sqrt() * v + (1 - a_t).sqrt() * x_t
    x_prev, _ = ddim_step_mean_std(s, v, t, x_t, eta=0.0)
    x0 = (x_prev - (1 - a_p).sqrt() * eps) / a_p.sqrt()
    v_prev = a_p.sqrt() * eps - (1 - a_p).sqrt() * x0  # the same eps and x0, as v at level t-1
    torch.testing.assert_close(ddim_inversion_step(s, v_prev, t, x_prev), x_t, atol=1e-4, rtol=1e-4)


def test_zmv_sampling_starts_from_the_same_noise_and_its_log_probs_recompute(tiny_components):
    policy = MultiViewPolicy(tiny_components(), "lora")
    settings = SamplingSettings(num_steps=4, zmv_steps=1, zmv_inversion_guidance=0.0)
    standard = policy.sample(["a red cube"], [7], settings, sampler="standard")
    zmv = policy.sample(["a red cube"], [7], settings, sampler="zmv")
    assert zmv.latents.shape == standard.latents.shape
    assert not torch.equal(zmv.latents[:, 0], standard.latents[:, 0])  # x~_T, re-inverted from x_T
    assert torch.isfinite(zmv.latents).all() and zmv.views.shape == standard.views.shape
    embeds = policy.encode_prompts(["a red cube"])
    negative = policy.negative_embeds(embeds, "zero")
    policy.scheduler.set_timesteps(4)
    for j, t in enumerate(zmv.timesteps):
        with torch.no_grad():
            lp = policy.step_log_prob(zmv.latents[:, j], t, zmv.latents[:, j + 1], embeds, negative, settings)
        torch.testing.assert_close(lp, zmv.log_probs[:, j], atol=1e-5, rtol=1e-5)


def test_multiplier_rises_while_the_constraint_is_violated_then_decays():
    m = LagrangeMultiplier(initial=0.0, maximum=5.0, lr_violated=0.1, lr_satisfied=0.01, threshold=1.0)
    values = [m.update(0.5) for _ in range(5)]  # J = 0.5 < b = 1: violated
    assert values == sorted(values) and values[0] == pytest.approx(0.05) and values[-1] == pytest.approx(0.25)
    assert [m.update(2.0) for _ in range(3)][-1] == pytest.approx(0.25 - 3 * 0.01)  # satisfied: decays
    assert LagrangeMultiplier(threshold=1.0, lr_violated=10.0).update(0.0) == 5.0  # capped at the max
    assert LagrangeMultiplier(threshold=0.0).update(5.0) == 0.0  # never below 0
    selfpaced = LagrangeMultiplier(threshold=None, threshold_ema=0.5, lr_violated=1.0)
    selfpaced.update(1.0)  # the first batch sets the threshold: no violation
    assert selfpaced.value == 0.0 and selfpaced.threshold == 1.0
    assert selfpaced.update(0.0) == pytest.approx(0.5) and selfpaced.threshold == pytest.approx(0.5)
    restored = LagrangeMultiplier(threshold=None)
    restored.load_state_dict(selfpaced.state_dict())
    assert (restored.value, restored.threshold) == (selfpaced.value, selfpaced.threshold)


def test_zigal_advantage_gap_pools_both_samplers_and_weighs_the_constraint():
    fid, zmv_fid = np.array([0.0, 1.0]), np.array([1.0, 1.0])
    gap = zigal_advantage_gap(fid, zmv_fid)
    assert gap[0] < 0 and gap[1] == pytest.approx(0.0)
    cons, zmv_cons = np.array([1.0, 1.0]), np.array([0.0, 1.0])  # ZMV worse on consistency for pair 0
    unconstrained = zigal_advantage_gap(fid, zmv_fid, cons, zmv_cons, multiplier=0.0)
    np.testing.assert_allclose(unconstrained, gap)
    weighted = zigal_advantage_gap(fid, zmv_fid, cons, zmv_cons, multiplier=4.0)
    assert weighted[0] > 0  # with a large multiplier the consistency term wins


def test_zigal_pair_loss_raises_the_better_trajectory():
    lp = torch.zeros(3, requires_grad=True)
    zmv_lp = torch.zeros(3, requires_grad=True)
    gap = torch.tensor([-1.0, 0.0, 2.0])  # ZMV better, tie, standard better
    loss = zigal_pair_loss(lp, torch.zeros(3), zmv_lp, torch.zeros(3), gap, clip_range=1e-4)
    grad_lp, grad_zmv = torch.autograd.grad(loss, [lp, zmv_lp])
    # gradient descent moves log p(std) - log p(zmv) towards the gap
    assert grad_lp[0] > 0 and grad_zmv[0] < 0 and grad_lp[1] == 0 and grad_lp[2] < 0 and grad_zmv[2] > 0
    assert loss.item() == pytest.approx((1 + 0 + 4) / 3)


def test_gradient_matching_loss_is_zero_when_the_score_matches_the_target():
    gen = torch.Generator().manual_seed(0)
    ref_mean, flow = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
    std = torch.full((2, 1, 1, 1), 0.3)
    mean = (ref_mean + std**2 * flow).requires_grad_(True)  # the tilted step: score gap = flow gradient
    loss = nabla_db_loss(mean, ref_mean, std, flow)
    assert loss.item() == pytest.approx(0.0, abs=1e-9)
    (grad,) = torch.autograd.grad(loss, mean)
    assert float(grad.abs().max()) < 1e-6
    off = nabla_db_loss(ref_mean, ref_mean, std, flow)  # the reference misses by flow (std-weighted)
    assert off.item() == pytest.approx(0.09 * float(flow.pow(2).mean()), rel=1e-5)
    # the same through the DDIM step: a model whose step mean is shifted by std^2 * flow matches
    s = _scheduler()
    x_t, eps = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
    m, sd = ddim_step_mean_std(s, eps, 624, x_t, eta=1.0)
    assert nabla_db_loss(m, m, sd, torch.zeros_like(m)).item() == 0.0
    _, lp = ddim_step_with_logprob(s, eps, 624, x_t, eta=1.0, generator=gen)
    assert torch.isfinite(lp).all()


def test_mrc_reward_gradient_matches_a_finite_difference():
    import minicarve.plugin  # noqa: F401  (registers "lrm")
    from reward_service.rewards import MRCReward

    reward = MRCReward("lrm")
    gen = torch.Generator().manual_seed(0)
    views, rig = torch.ones(1, 4, 3, 32, 32), grid_rig()
    views[:, :, :, 8:24, 8:24] = 0.3 + 0.4 * torch.rand(1, 1, 3, 16, 16, generator=gen)  # one object per view
    grad = reward.gradient(views, rig)
    assert grad.shape == views.shape and float(grad.abs().sum()) > 0
    direction = torch.zeros_like(views)
    direction[:, 0, :, 10:22, 10:22] = torch.randn(1, 3, 12, 12, generator=gen)  # inside the object: box fixed

    def r(x):  # the reward of float views (the reward's uint8 input would quantise them)
        return float(reward.scorer.score_views(x, rig).reward[0])

    h = 1e-3  # ImageNet LPIPS on 64 px crops curves enough that h = 1e-2 is off by ~15%
    numeric = (r(views + h * direction) - r(views - h * direction)) / (2 * h)
    analytic = float((grad * direction).sum())
    assert analytic == pytest.approx(numeric, rel=0.1)


def test_algorithm_shorthand_and_clear_errors():
    assert load_config(["algorithm=mvc-zigal"]).train.algorithm == "mvc-zigal"
    with pytest.raises(ConfigError, match="must be one of ddpo-sf"):
        load_config(["algorithm=dpo"])
    with pytest.raises(ConfigError, match="needs a differentiable reward"):
        load_config(["algorithm=nabla-gfn", "reward.kind=mypkg.rewards:aesthetic"])
    with pytest.raises(ConfigError, match="reward.alignment"):
        load_config(["algorithm=mvc-zigal", "reward.alignment=null"])
    with pytest.raises(ConfigError, match="zmv_steps=1"):
        load_config(["algorithm=mv-zigal", "sampling.zmv_steps=2"])
    with pytest.raises(ConfigError, match="sampling.sampler=standard"):
        load_config(["algorithm=mv-zigal", "sampling.sampler=zmv"])


@pytest.mark.integration
@pytest.mark.usefixtures("local_ray")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("algorithm,reward", [("mv-zigal", "brightness"), ("mvc-zigal", "mrc"),
                                              ("nabla-gfn", "mrc")])
def test_each_algorithm_runs_through_the_actors(tmp_path, tiny_model_dir, algorithm, reward):
    from learner.driver import run

    alignment = "tests.test_other_algorithms:first_pixel_alignment" if algorithm == "mvc-zigal" else "null"
    run_dir = run(load_config([
        f"model.path={tiny_model_dir}", f"run.output_dir={tmp_path}", f"algorithm={algorithm}",
        f"reward.kind={reward}", f"reward.alignment={alignment}", "reward.reconstructor=lrm",
        "sampling.num_steps=2", "prompts.limit=2", "rollout.batch_size=4", "train.samples_per_epoch=4", "train.group_size=1",
        "train.epochs=2", "eval.prompts_file=null", "run.samples_to_save=2"]))
    frame = pd.read_parquet(run_dir.path / "metrics.parquet")
    assert list(frame["version"]) == [1, 2] and (frame["skipped_steps"] == 0).all()
    assert np.isfinite(frame["loss"]).all() and (frame["grad_norm"] > 0).all()
    if algorithm != "nabla-gfn":
        assert np.isfinite(frame["zmv_reward_mean"]).all()
        assert frame["logprob_recompute_gap"].max() < 1e-4  # both trajectories of every pair are on-policy
    if algorithm == "mvc-zigal":
        assert "multiplier" in frame and np.isfinite(frame["constraint_threshold"]).all()


def first_pixel_alignment(views, cameras, prompts):
    """A stand-in per-view fidelity score for the tiny model (its prompts are not MiniCarve's):
    the first view's top-left pixel."""
    return views[:, 0, :, 0, 0].float().mean(dim=1).numpy() / 255.0
