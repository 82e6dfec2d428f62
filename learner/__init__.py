"""The learner: advantages, losses, the learner actor, and the driver (``python -m learner.main``)."""
