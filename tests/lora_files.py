"""LoRA files for the tiny Wan DiT in each published layout, with the deltas they should make.

The names are written out by hand (original Wan module, our diffusers parameter), not taken from the code under
test, so a wrong map in bernini_core/lora or keymaps fails the tests. The norm entry is the trap: the original
"norm3" is our "norm2".
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file

# short name -> (original Wan / ComfyUI module, our module); all are layers (".weight") of the tiny DiT
MODULES = {
    "q": ("blocks.0.self_attn.q", "blocks.0.attn1.to_q"),
    "o2": ("blocks.1.cross_attn.o", "blocks.1.attn2.to_out.0"),
    "ffn": ("blocks.0.ffn.0", "blocks.0.ffn.net.0.proj"),
    "text": ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    "time_proj": ("time_projection.1", "condition_embedder.time_proj"),
    "head": ("head.head", "proj_out"),
    "patch": ("patch_embedding", "patch_embedding"),
    "norm": ("blocks.0.norm3", "blocks.0.norm2"),
}

# layout -> (how a module is named, up suffix, down suffix)
LAYOUTS = {
    "comfy": (lambda orig, ours: "diffusion_model." + orig, ".lora_up.weight", ".lora_down.weight"),
    "comfy_ab": (lambda orig, ours: "diffusion_model." + orig, ".lora_B.weight", ".lora_A.weight"),
    "original_bare": (lambda orig, ours: orig, ".lora_B.weight", ".lora_A.weight"),
    "kohya": (lambda orig, ours: "lora_unet_" + orig.replace(".", "_"), ".lora_up.weight", ".lora_down.weight"),
    "wan_fun": (lambda orig, ours: "lora_unet__" + orig.replace(".", "_"), ".lora_up.weight", ".lora_down.weight"),
    "diffusers": (lambda orig, ours: "transformer." + ours, ".lora_B.weight", ".lora_A.weight"),
    "peft": (lambda orig, ours: "base_model.model." + ours, ".lora_B.weight", ".lora_A.weight"),
    "peft_bare": (lambda orig, ours: ours, ".lora_B.default.weight", ".lora_A.default.weight"),
}


def base_name(layout: str, module: str) -> str:
    original, ours = MODULES[module]
    return LAYOUTS[layout][0](original, ours)


def low_rank(dit, layout: str, modules, *, rank: int = 3, alpha=None, seed: int = 0):
    """(state dict, {our parameter: expected delta at strength 1, float32}) of a LoRA with random up/down pairs
    for `modules`; alpha None = no alpha tensor (multiplier 1)."""
    generator = torch.Generator().manual_seed(seed)
    params = dict(dit.named_parameters())
    _, up_suffix, down_suffix = LAYOUTS[layout]
    state, expected = {}, {}
    for module in modules:
        target = MODULES[module][1] + ".weight"
        shape = params[target].shape
        up = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=generator) * 0.1
        down = torch.randn(rank, *shape[1:], generator=generator) * 0.1
        base = base_name(layout, module)
        state[base + up_suffix], state[base + down_suffix] = up, down
        multiplier = 1.0
        if alpha is not None:
            state[base + ".alpha"] = torch.tensor(float(alpha))
            multiplier = alpha / rank
        expected[target] = multiplier * (up.reshape(shape[0], rank) @ down.reshape(rank, -1)).reshape(shape)
    return state, expected


def write(path, state) -> str:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)
