"""tests/data/mvdream_unet_keys.json and mvdream_unet_reference.json, from the public MVDream code itself
(tests/test_mvdream.py checks policy/mvdream_unet.py against both).

Runs in a scratch directory, on the public ``mv_unet.py`` of github.com/ashawkey/mvdream_diffusers (the code of
the diffusers port ashawkey/mvdream-sd2.1-diffusers); its imports xformers, kiui and einops are stubbed here
(xformers' attention by torch's scaled_dot_product_attention, einops' rearrange/repeat by the one pattern each
that the code uses), so only torch and diffusers are needed:

    git clone https://github.com/ashawkey/mvdream_diffusers /tmp/mvd && git -C /tmp/mvd checkout 8b318ef
    python tests/data/mvdream_unet_reference.py /tmp/mvd 8b318efac486784819502b88952fae970f40a47d tests/data
"""

import json
import re
import sys
import types

import diffusers.models.modeling_utils  # noqa: F401  (before the stubs: diffusers probes for xformers)
import torch
import torch.nn.functional as F


def _stub_imports() -> None:
    xformers = types.ModuleType("xformers")
    xformers.ops = types.ModuleType("xformers.ops")
    xformers.ops.memory_efficient_attention = lambda q, k, v, attn_bias=None, op=None: (
        F.scaled_dot_product_attention(q, k, v))
    kiui = types.ModuleType("kiui")
    kiui.cam = types.ModuleType("kiui.cam")
    kiui.cam.orbit_camera = None  # only get_camera uses it
    einops = types.ModuleType("einops")

    def rearrange(x, pattern, f=None, h=None, w=None):
        pattern = re.sub(r"\s+", " ", pattern.strip())
        if pattern == "(b f) l c -> b (f l) c":
            return x.reshape(x.shape[0] // f, f * x.shape[1], x.shape[2])
        if pattern == "b (f l) c -> (b f) l c":
            return x.reshape(x.shape[0] * f, x.shape[1] // f, x.shape[2])
        if pattern == "b c h w -> b (h w) c":
            return x.flatten(2).transpose(1, 2)
        if pattern == "b (h w) c -> b c h w":
            return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
        raise NotImplementedError(pattern)

    einops.rearrange = rearrange
    einops.repeat = None  # only timestep_embedding(repeat_only=True), never called
    sys.modules.update({"xformers": xformers, "xformers.ops": xformers.ops, "kiui": kiui, "kiui.cam": kiui.cam,
                        "einops": einops})


_stub_imports()
sys.path.insert(0, sys.argv[1])
import mv_unet as public  # noqa: E402

COMMIT = sys.argv[2]
out_dir = sys.argv[3]


def dump(obj, keys_field, path):
    """JSON with one state-dict entry (or one row) per line."""
    head = json.dumps({k: v for k, v in obj.items() if k != keys_field}, indent=1)[:-2]
    rows = obj[keys_field]
    if isinstance(rows, dict):
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in rows.items())
        text = f'{head},\n "{keys_field}": {{\n{body}\n }}\n}}\n'
    else:
        body = ",\n".join(f"  {json.dumps(r)}" for r in rows)
        text = f'{head},\n "{keys_field}": [\n{body}\n ]\n}}\n'
    json.loads(text)
    open(path, "w").write(text)


# 1. full-size state-dict names and shapes
config = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
              num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64, transformer_depth=1,
              context_dim=1024, use_checkpoint=False, camera_dim=16)
with torch.device("meta"):
    unet = public.MultiViewUNetModel(**config)
sd = unet.state_dict()
keys = {k: list(v.shape) for k, v in sd.items()}
source = {
    "repository": "https://github.com/ashawkey/mvdream_diffusers",
    "commit": COMMIT,
    "file": "mv_unet.py",
    "class": "MultiViewUNetModel",
    "config": config,
    "config_origin": ("unet_config.params of github.com/bytedance/MVDream mvdream/configs/sd-v2-base.yaml "
                      "(commit c6a4d392145d3083cd29c712fd653312bbf62bb7) minus the keys the port's "
                      "convert_mvdream_to_diffusers.py pops (legacy, use_linear_in_transformer, "
                      "use_spatial_transformer): "
                      "the dict that conversion registers, i.e. the port's unet/config.json"),
    "method": ("the public class itself instantiated on the meta device with this config (xformers, kiui and einops "
               "stubbed: used only in forward and get_camera); state_dict() names and shapes in its order"),
    "num_tensors": len(keys),
    "num_parameters": sum(v.numel() for v in sd.values()),
}
dump({"source": source, "keys": keys}, "keys", f"{out_dir}/mvdream_unet_keys.json")

# 2. a tiny config's output from the public forward, for a numerical check
tiny = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
            num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16, transformer_depth=1, context_dim=16,
            camera_dim=16)
model = public.MultiViewUNetModel(**tiny).eval()
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    msd = model.state_dict()
    for name in sorted(msd):
        msd[name].copy_(torch.randn(msd[name].shape, generator=g) * 0.2)
g = torch.Generator().manual_seed(1)
x = torch.randn(8, 4, 8, 8, generator=g)
context = torch.randn(8, 77, 16, generator=g)
camera = torch.randn(8, 16, generator=g)
t = [999.0] * 4 + [500.0] * 4
with torch.no_grad():
    y = model(x, torch.tensor(t), context, camera=camera, num_frames=4)
ref = {
    "source": dict(source, config=tiny, config_origin="a tiny config of the same class",
                   method=("the public class's forward (xformers.ops.memory_efficient_attention replaced by "
                           "torch scaled_dot_product_attention, the same math; einops.rearrange by the equivalent "
                           "reshapes, bit-identical to einops 0.8.2 here), float32 on CPU, eval mode"),
                   num_tensors=len(msd), num_parameters=sum(v.numel() for v in msd.values())),
    "recipe": {
        "weights": ("every state_dict tensor, in sorted name order, = "
                    "randn(shape, generator=Generator().manual_seed(0)) * 0.2"),
        "inputs": ("g = Generator().manual_seed(1); x = randn(8, 4, 8, 8), context = randn(8, 77, 16), "
                   "camera = randn(8, 16), in that order"),
        "timesteps": t,
        "num_frames": 4,
    },
    "output_shape": list(y.shape),
    "output": [[round(v, 7) for v in row] for row in y.flatten(1).tolist()],
}
dump(ref, "output", f"{out_dir}/mvdream_unet_reference.json")
print(len(keys), source["num_parameters"], y.abs().max().item())
