"""Carve3D's reward: Multi-view Reconstruction Consistency (reward = -MRC).

Modules:
  cameras         the project's camera convention (+Z up world, OpenCV cameras,
                  the 2x2 grid rig)
  render          the project's volume renderer
  reconstructors  sparse-view reconstruction (built-in voxel fit; plug-in path
                  for external models such as an LRM)
  mrc             MRC scoring (MRCScorer) and its command line

This package imports nothing itself; import the submodules you need (only
``mrc`` pulls in lpips).
"""
