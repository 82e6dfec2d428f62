"""Shared fixtures: one tiny random model per test session, built in code and
saved in diffusers format, loaded through the same loader as real models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from policy.models import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_components(tiny_model_dir):
    from policy.models import load_components

    return lambda: load_components(tiny_model_dir)


@pytest.fixture(scope="module")
def local_ray():
    """One embedded Ray per test module; the driver uses it instead of starting its own."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
