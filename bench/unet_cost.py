"""One UNet call's cost, per sample, for MiniCarve's worlds side by side: the v1 pixel UNet,
the v2 latent UNet (the shipped ``sft-short``, the "fast" architecture of
``minicarve.base_model.UNET_ARCHITECTURES``), and v2's previous architecture, "v2.0".

    python -m bench.unet_cost [--rounds 5] [--threads 1]

A forward pass at the rollout's classifier-free-guidance batch (16: 8 samples x cond/uncond)
and a forward + backward at a training microbatch (8), the models alternating round by round
so that load changes hit all alike; the best round after a warm-up counts.  The v2.0 model is
randomly initialised (a call costs the same as with its trained weights, which no longer ship).
Prints and writes each model's ms per sample and the ratios against v1 and v2.0; the whole
loop's ratio is ``bench.world_throughput``'s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.common import FULL_OUT, QUICK_OUT, log, machine_info, ratio, stamp, started, write_json

V1 = "minicarve/weights/v1-sft-short/unet"
V2 = "minicarve/weights/sft-short/unet"
PAIRS = (("v2.0", "v1"), ("v2", "v1"), ("v2", "v2.0"))  # (model, against): how many times cheaper a call


def call_seconds(unet, batch: int, backward: bool) -> float:
    import torch

    size, channels = unet.config.sample_size, unet.config.in_channels
    x = torch.randn(batch, channels, size, size)
    text = torch.randn(batch, 8, unet.config.cross_attention_dim)
    t = torch.full((batch,), 500)
    start = time.perf_counter()
    if backward:
        unet(x, t, text).sample.square().mean().backward()
    else:
        with torch.no_grad():
            unet(x, t, text)
    return time.perf_counter() - start


def main(argv=None, quick: bool | None = None, out_dir: Path | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 rounds (a smoke test)")
    args = parser.parse_args(argv if argv is not None else ([] if quick is not None else None))
    quick = args.quick if quick is None else quick
    rounds = 2 if quick else max(2, args.rounds)
    out = (out_dir or (QUICK_OUT if quick else FULL_OUT)) / "unet_cost.json"

    import torch
    from diffusers import UNet2DConditionModel

    from minicarve.base_model import unet_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unets = {"v1": UNet2DConditionModel.from_pretrained(V1), "v2.0": UNet2DConditionModel(**unet_config("v2.0")),
             "v2": UNet2DConditionModel.from_pretrained(V2)}
    unets = {name: unet.float() for name, unet in unets.items()}
    cases = {"forward_cfg16": (16, False), "forward_backward_8": (8, True)}
    seconds = {name: {case: [] for case in cases} for name in unets}
    start = started()
    for round_index in range(rounds):
        for name, unet in unets.items():
            for case, (batch, backward) in cases.items():
                seconds[name][case].append(call_seconds(unet, batch, backward) / batch)
        log(f"round {round_index + 1}/{rounds}: " + ", ".join(
            f"{name} {seconds[name]['forward_cfg16'][-1] * 1e3:.1f}/{seconds[name]['forward_backward_8'][-1] * 1e3:.1f} ms"
            for name in unets))
    result: dict = {"machine": machine_info(), "command": "python -m bench.unet_cost " + " ".join(
        argv if argv is not None else sys.argv[1:]), "threads": args.threads, "rounds": rounds, "models": {}}
    for name, unet in unets.items():
        best = {case: min(values[1:]) * 1e3 for case, values in seconds[name].items()}
        result["models"][name] = {"parameters": sum(p.numel() for p in unet.parameters()),
                                  "ms_per_sample": best}
    for name, base in PAIRS:
        for case in cases:
            result[f"{case}_{name}_vs_{base}"] = ratio(result["models"][base]["ms_per_sample"][case],
                                                       result["models"][name]["ms_per_sample"][case])
    for name, row in result["models"].items():
        log(f"{name}: {row['parameters'] / 1e6:.2f}M parameters; forward {row['ms_per_sample']['forward_cfg16']:.1f} "
            f"ms/sample, forward+backward {row['ms_per_sample']['forward_backward_8']:.1f} ms/sample")
    log("cheaper than v1 (forward, forward+backward): v2.0 {:.2f}x {:.2f}x, v2 {:.2f}x {:.2f}x; v2 vs v2.0 {:.2f}x {:.2f}x"
        .format(*(result[f"{case}_{name}_vs_{base}"] for name, base in PAIRS for case in cases)))
    write_json(out, stamp(result, start))
    return result


if __name__ == "__main__":
    main()
