"""The RL algorithms, one file each, registered by name (``train.algorithm``); see base.py.

Adding one: a new file with a class decorated ``@register_algorithm("name")``, and its
import below.
"""

from learner.algorithms.base import Algorithm, Transition, algorithm_names, get_algorithm, register_algorithm

# registration (each module registers its class on import)
from learner.algorithms import ddpo_sf, ddpo_is, mv_zigal, mvc_zigal, nabla_gfn  # noqa: E402,F401  isort:skip
from learner.algorithms import grpo  # noqa: E402,F401  isort:skip


def build_algorithm(train, sampling) -> Algorithm:
    """The algorithm ``train.algorithm`` names, for these settings."""
    return get_algorithm(train.algorithm)(train, sampling)


__all__ = ["Algorithm", "Transition", "algorithm_names", "build_algorithm", "get_algorithm", "register_algorithm"]
