"""SDXL-size UNet throughput in bf16 on a GPU (needs CUDA; skipped without it).

    python -m bench.gpu_throughput [--batch 4] [--steps 20] [--out DIR]
    python -m bench.gpu_throughput --cpu-smoke      # a tiny config on the CPU: checks the mechanics only

Builds a UNet with SDXL-base's architecture from its config (random weights: the
speed does not depend on the values, and nothing is downloaded), then times
classifier-free-guided denoising steps (one forward pass on 2 x batch latents of
128 x 128, i.e. 1024 px images) in bf16, forward only (sampling) and forward +
backward (the learner's recomputation).  Writes ``gpu_throughput.json``.
Without CUDA it writes ``{"skipped": ...}`` and exits 0.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import FULL_OUT, QUICK_OUT, log, machine_info, started, stamp, write_json

# SDXL-base 1.0's unet/config.json (the fields that shape compute).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
TEXT_EMBED_DIM, TOKENS = 1280, 77
# The same blocks at toy width, to check the mechanics on a CPU.
SMOKE_UNET = dict(SDXL_UNET, sample_size=16, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 1),
                  attention_head_dim=(2, 4, 4), cross_attention_dim=32, addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8)
SMOKE_TEXT_EMBED_DIM = 32


def measure(config: dict, text_dim: int, batch: int, steps: int, device: str, dtype) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**config).to(device=device, dtype=dtype)
    n = 2 * batch  # classifier-free guidance: conditional and unconditional in one pass
    size = config["sample_size"]
    sample = torch.randn(n, config["in_channels"], size, size, device=device, dtype=dtype)
    context = torch.randn(n, TOKENS, config["cross_attention_dim"], device=device, dtype=dtype)
    added = {"text_embeds": torch.randn(n, text_dim, device=device, dtype=dtype),
             "time_ids": torch.randn(n, 6, device=device, dtype=dtype)}
    t = torch.tensor(500, device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def forward():
        return unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=added).sample

    with torch.no_grad():
        forward()  # warm-up (kernels, allocator)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            forward()
        sync()
        fwd = (time.perf_counter() - start) / steps
    start = time.perf_counter()
    for _ in range(max(1, steps // 4)):
        forward().float().pow(2).mean().backward()
        unet.zero_grad(set_to_none=True)
    sync()
    fwd_bwd = (time.perf_counter() - start) / max(1, steps // 4)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"unet_parameters": int(sum(p.numel() for p in unet.parameters())), "batch": batch,
            "cfg_batch": n, "latent_size": size, "dtype": str(dtype).replace("torch.", ""),
            "forward_seconds": fwd, "forward_backward_seconds": fwd_bwd,
            "guided_steps_per_second": 1 / fwd, "images_per_second_at_50_steps": batch / (50 * fwd),
            "peak_memory_gib": peak}


def main(batch: int = 4, steps: int = 20, cpu_smoke: bool = False, out_dir: str | Path | None = None) -> dict:
    import torch

    out_dir = Path(out_dir or (QUICK_OUT if cpu_smoke else FULL_OUT))
    start = started()
    if cpu_smoke:
        log("GPU throughput: CPU smoke run (toy-width UNet, float32); the figures mean nothing")
        result = {"cpu_smoke": True, **measure(SMOKE_UNET, SMOKE_TEXT_EMBED_DIM, 1, 2, "cpu", torch.float32)}
    elif not torch.cuda.is_available():
        result = {"skipped": "no CUDA device on this machine; run `python -m bench.gpu_throughput` on a GPU node"}
        log(result["skipped"])
    else:
        log(f"GPU throughput: SDXL-size UNet, bf16, batch {batch} (x2 for CFG), {steps} steps on "
            f"{torch.cuda.get_device_name()}")
        result = {"gpu": torch.cuda.get_device_name(), **measure(SDXL_UNET, TEXT_EMBED_DIM, batch, steps, "cuda",
                                                                 torch.bfloat16)}
        log(f"{result['guided_steps_per_second']:.2f} guided steps/s, {result['images_per_second_at_50_steps']:.3f} "
            f"images/s at 50 steps, forward+backward {result['forward_backward_seconds']:.3f}s, peak "
            f"{result['peak_memory_gib']:.1f} GiB")
    result["machine"] = machine_info()
    stamp(result, start)
    write_json(out_dir / "gpu_throughput.json", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpu-smoke", action="store_true", help="toy width on the CPU, to check the mechanics")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    main(args.batch, args.steps, args.cpu_smoke, args.out)
