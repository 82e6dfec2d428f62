"""Stand-in rollout and reward actors with a fixed cost, for ``bench/controller_scaling.py``.

They answer the calls ``learner.driver.collect_epoch`` and ``sync_weights`` make
(``sample`` with three returns, ``score`` with two, ``load_weights``) but only sleep a
fixed time and return small dicts.  This module imports nothing heavy (no torch), so
dozens of them fit in memory: each Ray worker process imports only this file.
"""

from __future__ import annotations

import os
import time


def memory() -> dict:
    """This process's resident and proportional set size in bytes (Linux; 0 elsewhere)."""
    out = {"pid": os.getpid(), "rss": 0, "pss": 0}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    out[key.lower()] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


class FakeRollout:
    def __init__(self, sample_seconds: float):
        self.sample_seconds = sample_seconds
        self.version = -1

    def load_weights(self, version: int, weights) -> int:
        self.version = version
        return version

    def sample(self, specs, epoch: int = 0, batch_index: int = 0):
        if self.version < 0:
            raise RuntimeError("no weights loaded")
        start = time.perf_counter()
        time.sleep(self.sample_seconds)
        ids = [spec[0] for spec in specs]
        batch = {"sample_ids": ids, "version": self.version, "epoch": epoch, "batch_index": batch_index}
        images = {"sample_ids": ids, "epoch": epoch, "batch_index": batch_index}
        return batch, images, {"version": self.version, "seconds": time.perf_counter() - start, "pid": os.getpid()}

    def memory(self) -> dict:
        return memory()


class FakeReward:
    def __init__(self, score_seconds: float):
        self.score_seconds = score_seconds

    def score(self, images: dict):
        start = time.perf_counter()
        time.sleep(self.score_seconds)
        result = {"sample_ids": images["sample_ids"], "rewards": [0.0] * len(images["sample_ids"])}
        return result, {"seconds": time.perf_counter() - start, "pid": os.getpid()}

    def memory(self) -> dict:
        return memory()
