"""The project's geometry, the bottom layer that policy, reward_service and minicarve share.

Modules:
  cameras  the one camera convention (+Z up world, OpenCV cameras, the 2x2 grid rig),
           camera rays and Plucker rays
  render   the one volume renderer (emission-absorption along camera rays)

Imports torch only, nothing of the project (docs/architecture.md, "Layers").
"""
