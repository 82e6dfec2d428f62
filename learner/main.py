"""``python -m learner.main [--config FILE] [key=value ...]``: run Carve3D RL finetuning.

Without a cluster address it starts an embedded local Ray; under
``ray job submit`` (RAY_ADDRESS set) it joins that cluster.  See README.md.
``algorithm=NAME`` (short for train.algorithm) picks ddpo-sf (Carve3D, default), ddpo-is,
mv-zigal, mvc-zigal, nabla-gfn or grpo (docs/algorithms.md; one file each in learner/algorithms/).
"""

from __future__ import annotations

import sys

from learner.config import ConfigError, load_config, valid_keys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("Config keys (see learner/config.py for types and defaults):\n  " + "\n  ".join(valid_keys()))
        return 0
    try:
        config = load_config(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from learner.driver import RunStopped, run  # heavy imports after the config is known good

    try:
        run(config)
    except (RunStopped, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
