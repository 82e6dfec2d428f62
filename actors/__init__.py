"""Rollout actors and the data that crosses actors (RolloutBatch, RewardResult)."""
