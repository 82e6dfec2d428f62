"""Helpers shared by the performance benchmarks (``bench/performance.py``).

Pure functions (ratios, means, the ideal critical path, the JSON and Markdown
writers) and a local Ray session.  Nothing here times anything itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
# Full-size figures of each benchmark; --quick runs write under runs/ (not committed).
FULL_OUT = RESULTS / "performance"
QUICK_OUT = ROOT / "runs" / "bench-quick"

# Ray's worker processes must import this checkout (not whatever an editable install points
# at), wherever the command was started from.
_paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != "."]
if str(ROOT) not in _paths:
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *_paths])


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def model_family(path: str) -> str | None:
    """The family of the model a benchmark ran (``policy.families.detect_family``), so that a page
    says which world its figures are from (MiniCarve v1 is pixel-grid, v2 sd-grid); None when the
    path is not a model directory here (a builtin)."""
    from policy.families import detect_family

    try:
        return detect_family(path)
    except (OSError, ValueError):
        return None


def mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def median(values) -> float:
    values = sorted(float(v) for v in values)
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def stdev(values) -> float:
    values = [float(v) for v in values]
    if len(values) < 2:
        return float("nan")
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; NaN when either is missing or the denominator is 0."""
    try:
        numerator, denominator = float(numerator), float(denominator)
    except (TypeError, ValueError):
        return float("nan")
    if not math.isfinite(numerator) or not math.isfinite(denominator) or denominator == 0:
        return float("nan")
    return numerator / denominator


def after_warmup(values, warmup: int = 1) -> list[float]:
    """Drop the first ``warmup`` epochs (model loads, first-call costs); keep at least one value."""
    values = [float(v) for v in values]
    return values[warmup:] if len(values) > warmup else values[-1:]


def hidden_share(reward_seconds: float, reward_tail_seconds: float) -> float:
    """Share of the reward work that ran while sampling was still going on (clamped to [0, 1]).

    ``reward_seconds``: scoring time measured alone (the plain loop); ``reward_tail_seconds``:
    scoring left after the last batch was sampled (the actors' run)."""
    share = 1.0 - ratio(reward_tail_seconds, reward_seconds)
    return float(min(1.0, max(0.0, share))) if math.isfinite(share) else float("nan")


def ideal_epoch_seconds(batches_per_actor: int, sample_seconds: float, score_seconds: float,
                        num_rollout: int, num_reward: int) -> float:
    """Critical path of one simulated epoch with a perfect controller.

    Every rollout actor samples its batches back to back; the reward pool keeps up while
    sampling goes on (the caller sizes it so), so what is left is the last round: the
    ``num_rollout`` batches that finish together, shared by ``num_reward`` reward actors."""
    last_round = math.ceil(num_rollout / num_reward) * score_seconds
    return batches_per_actor * sample_seconds + last_round


def machine_info(shared: bool | None = None, note: str = "") -> dict:
    """CPU model and cores (from /proc/cpuinfo), memory, load, and whether others used the machine."""
    model, logical = platform.processor() or "unknown", os.cpu_count()
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
        if names:
            model, logical = names[0], len(names)
    info = {"cpu_model": model, "logical_cpus": logical, "platform": platform.platform(),
            "python": platform.python_version()}
    with contextlib.suppress(ImportError):
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    with contextlib.suppress(OSError, AttributeError):
        info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    with contextlib.suppress(ImportError):
        import ray
        import torch

        info["torch"], info["ray"] = torch.__version__, ray.__version__
        info["cuda_available"] = bool(torch.cuda.is_available())
    if shared is not None:
        info["shared"] = shared
    if note:
        info["note"] = note
    return info


def started() -> dict:
    """When a benchmark starts and the load then; :func:`stamp` adds both to its result."""
    return {"time": time.time(), "clock": time.perf_counter(), "load": os.getloadavg()[0]}


def stamp(result: dict, start: dict) -> dict:
    """Record when a benchmark ran, how long it took (``wall_seconds``) and the 1-minute
    load average at its start and end."""
    result["wall_seconds"] = time.perf_counter() - start["clock"]
    result["measured_at"] = time.strftime("%Y-%m-%d %H:%M", time.localtime(start["time"]))
    result["load_average_1min_start_end"] = [round(start["load"], 2), round(os.getloadavg()[0], 2)]
    return result


def available_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**30


def write_json(path: str | Path, data: dict) -> Path:
    """Write ``data`` as indented JSON (NaN becomes null, so any JSON reader takes it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(data), indent=2, sort_keys=False) + "\n")
    return path


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        return _finite(value.item())
    return value


def fmt(value, digits: int = 2) -> str:
    """A number for a table; '-' when missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


@contextlib.contextmanager
def local_ray(num_cpus: float = 2):
    """A private embedded Ray for one benchmark: no dashboard, never a shared cluster."""
    import ray

    if ray.is_initialized():  # the caller owns one
        yield
        return
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level="warning")
    try:
        yield
    finally:
        ray.shutdown()
