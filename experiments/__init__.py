"""Carve3D's experiments on MiniCarve: one config per experiment, one command to run it,
one command to turn finished runs into docs/results/.

    python -m experiments.run table1          # or stability, kl, scale, curation, reward_hacking
    python -m experiments.results             # tables, JSON and plots -> docs/results/

Configs live in ``configs/experiments/<name>.yaml``; runs in ``runs/experiments/<name>/``.
"""
