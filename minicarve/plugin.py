"""MiniCarve's plug-in: the names the default run uses, registered from MiniCarve's own package.

The default ``run.plugins`` is ``[minicarve.plugin]``; every process that resolves these
names imports this module first (``plugins.load_plugins``).  The core packages (policy,
actors, reward_service, learner) never import minicarve.

* ``reward.reconstructor=lrm``: the feed-forward LRM (``minicarve.lrm.LRMReconstructor``;
  it runs on the reward's device);
* ``reward.alignment=minicarve``: the attribute classifier (``minicarve.alignment``), with
  its check that the prompts are MiniCarve prompts;
* ``learner.evaluate --model ground-truth``: the scenes' own renders (views at the grid rig);
  ``ground-truth-vae``: the same after the VAE's round trip (as v2's latent space represents them).

The builders are import paths, so importing this module loads no model.
"""

from learner.evaluate import GROUND_TRUTH, VIEW_SOURCES
from reward_service.reconstructors import RECONSTRUCTORS
from reward_service.rewards import ALIGNMENTS

RECONSTRUCTORS.register("lrm", "minicarve.lrm:LRMReconstructor", on_device=True)
ALIGNMENTS.register("minicarve", "minicarve.alignment:views_evaluator",
                    check_prompts="minicarve.alignment:check_prompts")
VIEW_SOURCES.register(GROUND_TRUTH, "minicarve.dataset:ground_truth_views")
VIEW_SOURCES.register("ground-truth-vae", "minicarve.train_vae:ground_truth_through_vae")
