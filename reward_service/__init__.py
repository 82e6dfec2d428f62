"""Carve3D's reward: Multi-view Reconstruction Consistency (reward = -MRC).

Modules:
  reconstructors  sparse-view reconstruction (the built-in voxel fit; the registry
                  where plug-ins such as MiniCarve's LRM add theirs)
  rewards         reward functions and alignment evaluators (registries)
  mrc             MRC scoring (MRCScorer) and its command line
  pool            the reward actor

Cameras and the renderer are the bottom package ``geometry``.

This package imports nothing itself; import the submodules you need (only
``mrc`` pulls in lpips).
"""
