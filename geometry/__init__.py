"""The project's geometry, the bottom layer that policy, reward_service and minicarve share.

Modules:
  cameras  the one camera convention (+Z up world, OpenCV cameras, the 2x2 grid rig),
           camera rays and Plucker rays
  render   the one volume renderer (emission-absorption along camera rays)
  splatting  a differentiable 3D Gaussian splatting renderer in plain torch (gsplat optional)
  conventions  MVDream's and LGM's camera conventions (facts and sources) and converters
               to the project's

Imports torch only, nothing of the project (docs/architecture.md, "Layers").
"""
