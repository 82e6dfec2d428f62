import numpy as np
import pytest
import torch

from actors.batches import RewardResult, RolloutBatch
from geometry.cameras import grid_rig
from learner.advantages import PerPromptStatTracker, combine_advantages
from learner.config import TrainConfig
from learner.losses import ddpo_is_loss, ddpo_sf_loss
from learner.trainer import NoFiniteRewardError, StaleTrajectoryError, Trainer
from policy.pipeline import MultiViewPolicy, Trajectory
from policy.settings import SamplingSettings


def test_stat_tracker_uses_batch_stats_until_min_count():
    tracker = PerPromptStatTracker(buffer_size=10, min_count=3)
    values = np.array([1.0, 2.0, 3.0, 10.0])
    out = tracker.update(["a", "a", "b", "b"], values)
    # fewer than 3 values per prompt: normalised with the whole batch's mean/std
    expected = (values - values.mean()) / (values.std() + 1e-6)
    np.testing.assert_allclose(out, expected)
    # now 'a' has 4 values >= min_count: its own statistics
    out = tracker.update(["a", "a", "b"], np.array([3.0, 4.0, 5.0]))
    a_hist = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(out[:2], (np.array([3.0, 4.0]) - a_hist.mean()) / (a_hist.std() + 1e-6))
    b_hist = np.array([3.0, 10.0, 5.0])
    np.testing.assert_allclose(out[2], (5.0 - b_hist.mean()) / (b_hist.std() + 1e-6))


def test_stat_tracker_buffer_is_bounded_and_round_trips():
    tracker = PerPromptStatTracker(buffer_size=2, min_count=1)
    tracker.update(["p"] * 3, [1.0, 2.0, 3.0])
    assert list(tracker.buffers["p"]) == [2.0, 3.0]
    clone = PerPromptStatTracker(5, 5)
    clone.load_state_dict(tracker.state_dict())
    np.testing.assert_allclose(clone.update(["p"], [4.0]), tracker.update(["p"], [4.0]))


def test_advantages_combine_and_clip():
    reward_z = np.array([0.0, 10.0, -10.0, 1.0])
    kl_z = np.array([0.0, 0.0, 0.0, 5.0])
    out = combine_advantages(reward_z, kl_z, reward_weight=1.0, kl_weight=0.2, clip=5.0)
    np.testing.assert_allclose(out, [0.0, 5.0, -5.0, 0.0])


def test_sf_gradient_is_reinforce_and_is_ratio_one_matches():
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    def log_prob():
        return torch.stack([theta.sum(), (2 * theta).sum()])

    adv = torch.tensor([1.5, -0.5])
    (g_sf,) = torch.autograd.grad(ddpo_sf_loss(log_prob(), adv), theta)
    expected = -(adv[0] * torch.ones(2) + adv[1] * 2 * torch.ones(2)) / 2
    torch.testing.assert_close(g_sf, expected)
    lp = log_prob()
    (g_is,) = torch.autograd.grad(ddpo_is_loss(lp, lp.detach(), adv, 1e-4), theta)
    torch.testing.assert_close(g_is, g_sf)


def test_is_loss_clips_the_ratio():
    log_prob = torch.tensor([0.5], requires_grad=True)
    loss = ddpo_is_loss(log_prob, torch.tensor([0.0]), torch.tensor([1.0]), clip_range=0.1)
    # ratio e^0.5 > 1.1 with a positive advantage: the clipped branch, no gradient
    assert loss.item() == pytest.approx(-1.1)
    (grad,) = torch.autograd.grad(loss, log_prob)
    assert grad.item() == 0.0


def _batch(ids, version, prompts, steps=2):
    n = len(ids)
    traj = Trajectory(prompts=prompts, seeds=list(range(n)), latents=torch.randn(n, steps + 1, 3, 64, 64),
                      timesteps=torch.tensor([501, 1][:steps]), log_probs=torch.zeros(n, steps),
                      ref_log_probs=torch.zeros(n, steps), views=torch.zeros(n, 4, 3, 32, 32, dtype=torch.uint8),
                      cameras=grid_rig())
    return RolloutBatch.of(ids, version, traj)


@pytest.fixture
def trainer(tiny_components):
    policy = MultiViewPolicy(tiny_components(), "lora")
    return Trainer(policy, TrainConfig(), SamplingSettings(num_steps=2), seed=0)


def test_assemble_rejects_stale_and_drops_nonfinite(trainer):
    batches = [_batch(["a", "b"], 0, ["x", "y"]), _batch(["c", "d"], 0, ["x", "y"])]
    results = [RewardResult(["a", "b"], np.array([1.0, np.nan])), RewardResult(["c", "d"], np.array([np.inf, 2.0]))]
    samples = trainer.assemble(batches, results)
    assert samples.sample_ids == ["a", "d"] and samples.num_dropped == 2
    np.testing.assert_allclose(samples.rewards, [1.0, 2.0])

    with pytest.raises(StaleTrajectoryError, match="version"):
        trainer.assemble([_batch(["a"], 1, ["x"])], [RewardResult(["a"], np.array([1.0]))])
    with pytest.raises(NoFiniteRewardError, match="all 2 samples"):
        trainer.assemble([_batch(["a", "b"], 0, ["x", "y"])], [RewardResult(["a", "b"], np.array([np.nan, np.nan]))])


def test_update_moves_weights_and_bumps_version(trainer):
    batches = [_batch(["a", "b", "c", "d"], 0, ["x", "x", "y", "y"])]
    samples = trainer.assemble(batches, [RewardResult(["a", "b", "c", "d"], np.array([1.0, 2.0, 3.0, 0.0]))])
    before = {k: v.clone() for k, v in trainer.policy.trainable_state_dict().items()}
    metrics = trainer.update(samples, trainer.advantages(samples))
    assert trainer.version == 1 and metrics["skipped_steps"] == 0 and np.isfinite(metrics["loss"])
    after = trainer.policy.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_ddpo_is_takes_one_step_per_minibatch_on_a_fraction_of_timesteps(tiny_components):
    policy = MultiViewPolicy(tiny_components(), "lora")
    cfg = TrainConfig(algorithm="ddpo-is", num_minibatches=2, timestep_fraction=0.5, clip_range=0.2)
    trainer = Trainer(policy, cfg, SamplingSettings(num_steps=2), seed=0)
    ids = ["a", "b", "c", "d"]
    samples = trainer.assemble([_batch(ids, 0, ["x", "x", "y", "y"])],
                               [RewardResult(ids, np.array([1.0, 2.0, 3.0, 0.0]))])
    steps = []
    original_step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: steps.append(1) or original_step(*a, **k)
    metrics = trainer.update(samples, trainer.advantages(samples))
    assert len(steps) == 2 and metrics["trained_steps_per_sample"] == 1
    assert trainer.version == 1  # one version per epoch, however many optimizer steps


def test_nonfinite_gradients_are_skipped_then_stop_the_run(tiny_components):
    from learner.trainer import NonFiniteGradientError

    policy = MultiViewPolicy(tiny_components(), "lora")
    trainer = Trainer(policy, TrainConfig(max_nonfinite_steps=2), SamplingSettings(num_steps=2), seed=0)
    ids = ["a", "b"]
    samples = trainer.assemble([_batch(ids, 0, ["x", "y"])], [RewardResult(ids, np.array([1.0, 2.0]))])
    before = {k: v.clone() for k, v in policy.trainable_state_dict().items()}
    metrics = trainer.update(samples, np.array([np.nan, 1.0]))  # a NaN advantage poisons the loss
    assert metrics["skipped_steps"] == 1
    after = policy.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # never applied
    with pytest.raises(NonFiniteGradientError, match="2 optimizer steps in a row"):
        trainer.update(samples, np.array([np.nan, 1.0]))
