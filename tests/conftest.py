"""Shared fixtures: one tiny random model per test session, built in code and
saved in diffusers format, loaded through the same loader as real models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
def one_torch_thread():
    """One torch thread for a module of tiny models: fastest, and far faster on a busy machine
    (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_ray():
    """One embedded Ray per test module; the driver uses it instead of starting its own."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def run_command():
    """``run(command, timeout, **popen_args)``: subprocess.run with captured text output, for
    commands that start runs (learner.main and its embedded Ray).  Past ``timeout`` the whole
    process group is killed, the command's own children included, so that a run left behind
    does not take the cores from the tests after it; the test then fails with the output."""
    def run(command: list[str], timeout: float, **popen_args) -> subprocess.CompletedProcess:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, **popen_args)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{' '.join(map(str, command))} ran past {timeout} s and was killed with its process "
                        f"group\n{out[-2000:]}{err[-2000:]}")
        return subprocess.CompletedProcess(command, proc.returncode, out, err)
    return run


# Fixtures that start Ray: a test that uses one belongs to the integration tier even where its
# file does not say so (tests/test_learner_group.py, the actor runs of test_model_families.py).
RAY_FIXTURES = {"local_ray", "ray_with_metrics_port", "ray_head"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The two tiers: ``-m "not integration"`` is the fast unit tier; the integration tier is
    every test marked ``integration``, every test on a Ray fixture, and every ``slow`` test."""
    for item in items:
        if "slow" in item.keywords or RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process without the interpreter's finalisation once pytest is done.

    A dozen modules start and stop an embedded Ray in this process; after a suite whose every
    test had passed, the interpreter once died with SIGSEGV while finalising (CI, exit 139),
    and no crash came from the tests themselves.  Every result has been reported by now (the
    summary and any report files are written in ``pytest_sessionfinish``), so the process stops
    here with pytest's own exit status instead of running the native libraries' teardown."""
    if not _exit_status:
        return  # pytest ended before the session ran (a usage error): let it exit as usual
    main = Path(getattr(sys.modules.get("__main__"), "__file__", None) or "")
    if main.name not in ("pytest", "py.test") and main.parent.name != "pytest":
        return  # pytest.main() inside another program (not `pytest` / `python -m pytest`): never end it

    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status[0])
