"""MiniCarve: a small text-to-multi-view world that runs on one CPU (work in progress).

So far: procedural scenes and their prompts (``minicarve.scenes``), rendered by
the project's one volume renderer at the project's one camera rig.
"""
