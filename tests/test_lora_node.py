"""Apply Bernini LoRA inside ComfyUI (the stand-in of tests/comfy_stub.py, which patches weights as
comfy/model_patcher.py does): LoRAs become weight patches on clones of the experts' ModelPatchers, one strength per
expert; loading the clone patches the shared module, loading the original restores it bit for bit; the numbers equal
`W + strength · alpha/rank · up @ down` computed here and the standalone merge; fp8 layers are patched through their
convert/set hooks and GGUF layers after dequantisation, their packed bytes untouched."""

import logging

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from bernini_core import comfy_bridge, node_api
from bernini_core.errors import BerniniError
from bernini_core.gguf.layers import GGUFLinear
from bernini_core.loaders import load_renderer
from bernini_core.node_models import RendererModel, TextEncoderModel, VAEModel
from bernini_core.pipeline import RendererPipeline
from bernini_core.quant import Fp8ScaledLinear

RANK, ALPHA = 4, 2.0
MODULES = {  # original-Wan module path -> our parameter (norm3 is the affine norm before cross-attention)
    "blocks.0.self_attn.q": "blocks.0.attn1.to_q.weight",
    "blocks.1.ffn.2": "blocks.1.ffn.net.2.weight",
    "head.head": "proj_out.weight",
}


def comfy_renderer(tiny_renderer_dir):
    components = load_renderer(tiny_renderer_dir, dtype=torch.float32, ops=comfy_bridge.comfy_ops())
    pipe = RendererPipeline(components, comfy_bridge.ComfyRuntime())
    return RendererModel(pipe, "bernini_renderer", "R", "tiny")


def write_lora(folder, dit, name="x.safetensors", seed=0):
    """A LoRA in the ComfyUI / original-Wan layout: low-rank pairs with alpha, a bias diff and a modulation diff."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(dit.named_parameters())
    state, expected = {}, {}
    for module, ours in MODULES.items():
        out_f, in_f = params[ours].shape
        up, down = torch.randn(out_f, RANK, generator=gen), torch.randn(RANK, in_f, generator=gen)
        state[f"diffusion_model.{module}.lora_up.weight"] = up
        state[f"diffusion_model.{module}.lora_down.weight"] = down
        state[f"diffusion_model.{module}.alpha"] = torch.tensor(ALPHA)
        expected[ours] = ALPHA / RANK * (up @ down)
    diff_b = torch.randn(params["blocks.0.attn1.to_q.bias"].shape, generator=gen)
    state["diffusion_model.blocks.0.self_attn.q.diff_b"] = diff_b
    expected["blocks.0.attn1.to_q.bias"] = diff_b
    shift = params["blocks.1.scale_shift_table"]
    state["diffusion_model.blocks.1.modulation.diff"] = modulation = torch.randn(shift.shape, generator=gen)
    expected["blocks.1.scale_shift_table"] = modulation
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / name))
    return expected


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def load(handle, comfy):
    comfy.mm.load_models_gpu([handle.patcher])
    return handle.module


def test_patches_per_expert_and_unpatching_restores_the_weights(comfy, tiny_renderer_dir):
    renderer = comfy_renderer(tiny_renderer_dir)
    experts = renderer.pipeline.experts
    before_high, before_low = weights(experts.high.module), weights(experts.low.module)
    expected = write_lora(comfy.models / "loras", experts.high.module)
    assert node_api.lora_choices() == ["x.safetensors"]

    patched = node_api.apply_lora(renderer, "x.safetensors", 0.7, 0.0)
    assert patched.pipeline is renderer.pipeline and patched.loras == (("x.safetensors", 0.7, 0.0),)
    assert patched.experts.low is experts.low  # strength 0: no clone, no patch
    high = load(patched.experts.high, comfy)
    after = weights(high)
    for name, value in before_high.items():
        if name in expected:
            assert torch.allclose(after[name], value + 0.7 * expected[name], atol=1e-6, rtol=0), name
        else:
            assert torch.equal(after[name], value), name
    assert all(torch.equal(v, before_low[k]) for k, v in weights(load(experts.low, comfy)).items())

    # loading the unpatched original of the same expert takes the patches off: bit for bit
    assert all(torch.equal(v, before_high[k]) for k, v in weights(load(experts.high, comfy)).items())
    # and the clone patches again on its next load
    assert torch.equal(weights(load(patched.experts.high, comfy))["proj_out.weight"], after["proj_out.weight"])


def test_comfyui_patches_equal_the_standalone_merge(comfy, tiny_renderer_dir):
    from bernini_core.lora import LoraSpec, apply_loras_

    renderer = comfy_renderer(tiny_renderer_dir)
    experts = renderer.pipeline.experts
    write_lora(comfy.models / "loras", experts.high.module)
    patched = node_api.apply_lora(renderer, "x.safetensors", 0.6, -1.3)
    in_comfy = (weights(load(patched.experts.high, comfy)), weights(load(patched.experts.low, comfy)))

    merged = load_renderer(tiny_renderer_dir, dtype=torch.float32)
    apply_loras_(merged, [LoraSpec(comfy.models / "loras" / "x.safetensors", 0.6, "high"),
                          LoraSpec(comfy.models / "loras" / "x.safetensors", -1.3, "low")])
    for ours, theirs in zip(in_comfy, (weights(merged.dit_high), weights(merged.dit_low))):
        for name, value in theirs.items():
            assert torch.allclose(ours[name], value, atol=1e-6, rtol=0), name


def test_sampling_with_the_patched_renderer_and_back(comfy, tiny_renderer_dir):
    renderer = comfy_renderer(tiny_renderer_dir)
    write_lora(comfy.models / "loras", renderer.pipeline.experts.high.module)
    text_encoder = TextEncoderModel(renderer.pipeline, "bernini_renderer", "R")
    vae = VAEModel(renderer.pipeline, "bernini_renderer", "R")
    conditioning = node_api.encode_prompt(text_encoder, "t2v", "a red fox")
    sources = node_api.prepare_sources(conditioning, vae, 32, 32, 5)

    def sample(model):
        return node_api.sample(model, conditioning, sources, steps=2, seed=3)["samples"]

    base = sample(renderer)
    off = node_api.apply_lora(renderer, "x.safetensors", 0.0, 0.0)
    assert torch.equal(sample(off), base)  # strength 0 on both experts: bit-identical
    chained = node_api.apply_lora(node_api.apply_lora(renderer, "x.safetensors", 1.0, 0.0), "x.safetensors", 0.0, 0.5)
    assert len(chained.loras) == 2
    assert not torch.allclose(sample(chained), base)
    assert torch.equal(sample(renderer), base)  # removing the node: the original weights, no reload


def test_bad_lora_inputs_are_named(comfy, tiny_renderer_dir, caplog):
    renderer = comfy_renderer(tiny_renderer_dir)
    folder = comfy.models / "loras"
    folder.mkdir(parents=True)
    save_file({"text_encoders.foo.lora_up.weight": torch.zeros(2, 2),
               "text_encoders.foo.lora_down.weight": torch.zeros(2, 2)}, str(folder / "sdxl.safetensors"))
    with pytest.raises(BerniniError, match="matches no parameter.*text_encoders.foo"):
        node_api.apply_lora(renderer, "sdxl.safetensors")
    with pytest.raises(BerniniError, match="not found"):
        node_api.apply_lora(renderer, "missing.safetensors")
    with pytest.raises(BerniniError, match="strength_low is nan"):
        node_api.apply_lora(renderer, "sdxl.safetensors", 1.0, float("nan"))
    # partly matching: one warning line with the count, the matching part applied
    original = renderer.pipeline.experts.high.module.proj_out.weight.detach().clone()
    expected = write_lora(folder, renderer.pipeline.experts.high.module, "partial.safetensors")
    from safetensors.torch import load_file

    state = load_file(str(folder / "partial.safetensors"))
    state["diffusion_model.blocks.9.self_attn.q.lora_up.weight"] = torch.zeros(2, 2)
    save_file(state, str(folder / "partial.safetensors"))
    with caplog.at_level(logging.WARNING):
        patched = node_api.apply_lora(renderer, "partial.safetensors", 1.0, 1.0)
    lines = [r.getMessage() for r in caplog.records if "matched nothing" in r.getMessage()]
    assert len(lines) == 1 and "1 of" in lines[0] and "blocks.9" in lines[0]
    high = load(patched.experts.high, comfy)
    assert torch.allclose(high.proj_out.weight, original + expected["proj_out.weight"], atol=1e-6, rtol=0)


def patch_in_comfy(comfy, module, patches):
    """Load a clone of `module`'s patcher carrying `patches`, as ComfyUI would: (the original's handle, the clone's)."""
    handle = comfy_bridge.ComfyRuntime("cpu").handle("dit_high", module)
    clone = comfy_bridge.patched_handle(handle, patches, 1.0)
    comfy.mm.load_models_gpu([clone.patcher])
    return handle, clone


def test_fp8_layers_are_patched_through_their_hooks(comfy):
    torch.manual_seed(0)
    layer = Fp8ScaledLinear(32, 16)
    dense = torch.randn(16, 32) * 0.02
    scale = dense.abs().max() / 448
    layer.weight = torch.nn.Parameter((dense / scale).to(torch.float8_e4m3fn), requires_grad=False)
    layer.scale_weight.fill_(scale)
    layer.bias.data.zero_()
    stored = layer.weight.detach().clone()
    module = torch.nn.Sequential(layer)
    up, down = torch.randn(16, RANK) * 0.05, torch.randn(RANK, 32) * 0.05
    handle, clone = patch_in_comfy(comfy, module, {"inner.0.weight": ("lora", (up, down, ALPHA, None, None,
                                                                                          None))})
    assert layer.weight.dtype == torch.float8_e4m3fn and torch.equal(layer.scale_weight, torch.tensor(float(scale)))
    want = stored.float() * scale + ALPHA / RANK * (up @ down)
    got = layer.dequantized_weight(torch.float32)
    assert (got - want).abs().max() <= 0.07 * want.abs().max(), "fp8 keeps ~2 significant bits of the delta"
    assert not torch.equal(layer.weight.view(torch.uint8), stored.view(torch.uint8))
    comfy.mm.load_models_gpu([handle.patcher])  # the original clone: ComfyUI's backup restores the bytes exactly
    assert torch.equal(layer.weight.view(torch.uint8), stored.view(torch.uint8))


def test_gguf_layers_take_the_patches_after_dequantisation(comfy):
    torch.manual_seed(0)
    dense = torch.randn(16, 64)
    packed = gguf.quants.quantize(dense.numpy(), gguf.GGMLQuantizationType.Q8_0)
    layer = GGUFLinear(64, 16, bias=True)
    layer.expect_packed(int(gguf.GGMLQuantizationType.Q8_0), packed.shape)
    layer.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(packed)), requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.zeros(16), requires_grad=False)
    stored = layer.weight.detach().clone()
    base = layer.dequantized_weight(torch.float32)
    up, down = torch.randn(16, RANK), torch.randn(RANK, 64)
    bias_diff = torch.randn(16)
    x = torch.randn(3, 64)
    module = torch.nn.Sequential(layer)
    handle, clone = patch_in_comfy(comfy, module, {
        "inner.0.weight": ("lora", (up, down, ALPHA, None, None, None)), "inner.0.bias": ("diff", (bias_diff,))})
    assert torch.equal(layer.weight, stored)  # the packed bytes never change
    assert torch.allclose(layer(x), F.linear(x, base + ALPHA / RANK * (up @ down), bias_diff), atol=1e-5)
    comfy.mm.load_models_gpu([handle.patcher])
    assert layer.weight_function == [] and torch.equal(layer.bias, torch.zeros(16))
    assert torch.allclose(layer(x), F.linear(x, base), atol=1e-6)
