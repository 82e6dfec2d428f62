"""The multi-view diffusion policy (plain torch, no Ray).

Light imports only: ``MultiViewPolicy`` and the model loaders live in
``policy.pipeline`` and ``policy.models`` and pull in diffusers/transformers.
"""

from policy.ddim import ddim_step_with_logprob
from policy.grid import grid_to_views, views_to_grid

__all__ = ["ddim_step_with_logprob", "grid_to_views", "views_to_grid"]
