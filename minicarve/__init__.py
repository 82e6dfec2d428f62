"""MiniCarve: a small text-to-multi-view world that runs on one CPU (docs/minicarve.md).

* ``scenes``: procedural scenes of 1-3 primitives, their grammar prompts and renders
  (the project's one renderer and camera rig);
* ``dataset``: the train/test split that holds out colour-shape pairs, cached renders,
  the prompt files;
* ``base_model`` / ``train_base``: the SFT base models ``sft-short`` and ``sft-long``;
* ``lrm`` / ``train_lrm``: the feed-forward reconstruction model behind MRC;
* ``alignment`` / ``train_alignment``: the prompt-alignment evaluator;
* ``base_table``: the base-model table (test MRC and alignment).

Shipped weights live in ``minicarve/weights/``.
"""
