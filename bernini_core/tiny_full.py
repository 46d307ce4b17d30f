"""A tiny random full-Bernini checkpoint in the exact Bernini-Diffusers(-v2) layout
(docs/official_behaviour.md §2.1, §2.2).

    config.json                    model_type "bernini", every field, tiny clip_diff_cfg / connector_cfg
    transformer_config.json        the DiT config (also transformer_2_config.json)
    bernini/                       ONE combined checkpoint: model-0000i-of-0000n.safetensors (F32, 3 shards) +
                                   model.safetensors.index.json, prefixes diff_dec.transformer.,
                                   diff_dec_low.transformer_2., mllm. (original HF Qwen layout), t5_text_encoder.,
                                   connector., vit_decoder., mask_tokens — no ema. copies
    mllm/                          tiny Qwen2.5-VL config, tokenizer, processor (planner/tiny_mllm.py)
    t5_text_encoder/ t5_tokenizer/ vae/ scheduler/

Shapes come from tables written from docs/official_behaviour.md §2.1 (independent of our model classes), so a
strict load checks the classes against the layout. Same seed -> byte-identical files; the UMT5 and VAE weights equal
those of the tiny Bernini-R layouts (tiny.py) for the same seed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict

import torch

from .tiny import (TINY_DIT, TINY_UMT5, Shapes, _save_sharded, _write_json, _write_text_encoder_tokenizer_vae_scheduler,
                   tiny_dit_state_dict, tiny_umt5_state_dict)

V2_DIRNAME = "Bernini-Diffusers-v2"
COMBINED_SHARDS = 3  # enough that modules straddle shard boundaries, as in the 38-shard release

# The full-Bernini DiT: the source-id RoPE is built with head dim 128 whatever the config says
# (docs/official_behaviour.md §7.2), so the tiny DiT has heads of 128; two of them, so a Ulysses degree of 2 can
# split them (multi-process tests); text_dim = UMT5 d_model = connector out_dim_for_gen (the context width).
TINY_FULL_DIT = dict(TINY_DIT, num_attention_heads=2, attention_head_dim=128, text_dim=TINY_UMT5["d_model"])

TINY_NUM_MASK_TOKEN = 1024  # [1, 1024, hidden]; bounds the target-token count (check_target_tokens)
TINY_VIT_DECODER_WIDTH = 32
TINY_VIT_DECODER_DEPTH = 2

# Salts: streams of their own, disjoint from tiny.py's (1..5).
_SALT = {"mllm": 11, "connector": 12, "vit_decoder": 13, "mask_tokens": 14}


# -- config.json ---------------------------------------------------------------------------------
def full_config(hidden: int, *, version: str = "v1") -> dict:
    """config.json of Bernini-Diffusers (official ``configs/bernini/config.json``, docs/official_behaviour.md §2.1)
    with tiny planner dims.

    v2: the same fields plus interpolate_src_id / max_trained_src_id (docs/official_behaviour.md §2.2) and the v2
    repository as base_dir [inferred]."""
    gen_dim = TINY_UMT5["d_model"]
    config = {
        "model_type": "bernini",
        "architectures": ["BerniniModel"],
        "mllm_attn_implementation": "sdpa",
        "partial_pretrain_model": "",
        "base_dir": "ByteDance/Bernini-Diffusers",
        "vae_subfolder": "vae",
        "cotrain": True,
        "boundary_ratio": 0.417,
        "switch_dit_boundary": 0.875,
        "shift": 3.0,
        "logit_mean": 0.5,
        "logit_std": 1,
        "mode_scale": 1.29,
        "scratch": True,
        "transformers_version": "4.57.3",
        "mllm_subfolder": "mllm",
        "processor_subfolder": "mllm",
        "bernini_ckpt_subfolder": "bernini",
        "scratch_mllm": True,
        "use_src_id_rotary_emb": True,
        "feature_type_from_stage_one": "masked_tgt_embed_with_qwen_txt_vit_tokens",
        "num_mask_token": TINY_NUM_MASK_TOKEN,
        "max_sequence_length": 512,
        "clip_diff_cfg": {"model_type": "flow_match", "z_channels": hidden, "target_channels": hidden,
                          "width": TINY_VIT_DECODER_WIDTH, "depth": TINY_VIT_DECODER_DEPTH,
                          "diffusion_batch_mul": 16, "shift": 2.0},
        "connector_cfg": {"model_type": "MLPConnector", "out_dim_for_gen": gen_dim, "enable_gen_branch": True,
                          "out_dim_for_vit": hidden, "enable_vit_branch": True, "gen_head_type": "zerolinear",
                          "zero_init_proj_gen_last": True},
        "mask_ratio_infer_cfg": {"generator_type": "default"},
        "t5_max_sequence_length": 512,
        "t5_text_encoder_subfolder": "t5_text_encoder",
        "t5_tokenizer_subfolder": "t5_tokenizer",
        "t5_combine_type": "concat_with_zero_init",
        "target_fps": 16,
    }
    if version == "v2":
        config.update(base_dir="ByteDance/Bernini-Diffusers-v2", interpolate_src_id=True, max_trained_src_id=5)
    return config


# -- shape tables --------------------------------------------------------------------------------
def _linear(shapes: Shapes, name: str, out_dim: int, in_dim: int, bias: bool = True) -> None:
    shapes[f"{name}.weight"] = (out_dim, in_dim)
    if bias:
        shapes[f"{name}.bias"] = (out_dim,)


def qwen_text_and_vision(config: dict) -> tuple:
    """(text, vision) settings of a Qwen2.5-VL config.json: transformers 5.x nests ``text_config``,
    4.57 keeps the text fields at the top level (it may also write a text_config)."""
    text = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
    text.update(config.get("text_config") or {})
    return text, dict(config.get("vision_config") or {})


def qwen_shapes(config: dict) -> Shapes:
    """Qwen2.5-VL parameter shapes in the ORIGINAL checkpoint layout (visual.*, model.*, lm_head.weight) that
    the ``mllm.`` keys of the combined checkpoint use (docs/official_behaviour.md §2.1; docs/wan_qwen.md §4:
    390 + 338 + 1 tensors at 7B)."""
    text, vision = qwen_text_and_vision(config)
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    head_dim = text.get("head_dim") or hidden // heads
    kv = text["num_key_value_heads"] * head_dim
    shapes: Shapes = {}
    v_hidden, v_ffn = vision["hidden_size"], vision["intermediate_size"]
    patch, temporal = vision.get("patch_size", 14), vision.get("temporal_patch_size", 2)
    in_channels = vision.get("in_channels", vision.get("in_chans", 3))
    shapes["visual.patch_embed.proj.weight"] = (v_hidden, in_channels, temporal, patch, patch)  # no bias
    for i in range(vision["depth"]):
        block = f"visual.blocks.{i}"
        shapes[f"{block}.norm1.weight"] = (v_hidden,)
        shapes[f"{block}.norm2.weight"] = (v_hidden,)
        _linear(shapes, f"{block}.attn.qkv", 3 * v_hidden, v_hidden)
        _linear(shapes, f"{block}.attn.proj", v_hidden, v_hidden)
        for proj in ("gate_proj", "up_proj"):
            _linear(shapes, f"{block}.mlp.{proj}", v_ffn, v_hidden)
        _linear(shapes, f"{block}.mlp.down_proj", v_hidden, v_ffn)
    merged = v_hidden * vision.get("spatial_merge_size", 2) ** 2
    shapes["visual.merger.ln_q.weight"] = (v_hidden,)
    _linear(shapes, "visual.merger.mlp.0", merged, merged)
    _linear(shapes, "visual.merger.mlp.2", vision["out_hidden_size"], merged)

    shapes["model.embed_tokens.weight"] = (text["vocab_size"], hidden)
    for i in range(text["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        _linear(shapes, f"{layer}.self_attn.q_proj", heads * head_dim, hidden)
        _linear(shapes, f"{layer}.self_attn.k_proj", kv, hidden)
        _linear(shapes, f"{layer}.self_attn.v_proj", kv, hidden)
        _linear(shapes, f"{layer}.self_attn.o_proj", hidden, heads * head_dim, bias=False)
        for proj in ("gate_proj", "up_proj"):
            _linear(shapes, f"{layer}.mlp.{proj}", text["intermediate_size"], hidden, bias=False)
        _linear(shapes, f"{layer}.mlp.down_proj", hidden, text["intermediate_size"], bias=False)
        shapes[f"{layer}.input_layernorm.weight"] = (hidden,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not text.get("tie_word_embeddings", False):  # a tied head is the embedding matrix, stored once
        shapes["lm_head.weight"] = (text["vocab_size"], hidden)
    return shapes


def connector_shapes(hidden: int, gen_dim: int, vit_dim: int) -> Shapes:
    """MLPConnector (docs/official_behaviour.md §2.1): proj_gen = Linear, GELU, RMSNorm, Linear; pred_vit = Linear,
    GELU, Linear, RMSNorm, Linear — 12 tensors."""
    shapes: Shapes = {}
    _linear(shapes, "proj_gen.0", gen_dim, hidden)
    shapes["proj_gen.2.weight"] = (gen_dim,)
    _linear(shapes, "proj_gen.3", gen_dim, gen_dim)
    _linear(shapes, "pred_vit.0", vit_dim, hidden)
    _linear(shapes, "pred_vit.2", vit_dim, vit_dim)
    shapes["pred_vit.3.weight"] = (vit_dim,)
    _linear(shapes, "pred_vit.4", vit_dim, vit_dim)
    return shapes


def vit_decoder_shapes(target_channels: int, z_channels: int, width: int, depth: int,
                       frequency_size: int = 256) -> Shapes:
    """DiffLoss_FM.net = SimpleMLPAdaLN (docs/official_behaviour.md §2.1, §3.6): 8 + 8·depth + 4 tensors (140 at
    depth 16)."""
    shapes: Shapes = {}
    _linear(shapes, "net.time_embed.mlp.0", width, frequency_size)
    _linear(shapes, "net.time_embed.mlp.2", width, width)
    _linear(shapes, "net.cond_embed", width, z_channels)
    _linear(shapes, "net.input_proj", width, target_channels)
    for i in range(depth):
        block = f"net.res_blocks.{i}"
        shapes[f"{block}.in_ln.weight"] = (width,)
        shapes[f"{block}.in_ln.bias"] = (width,)
        _linear(shapes, f"{block}.mlp.0", width, width)
        _linear(shapes, f"{block}.mlp.2", width, width)
        _linear(shapes, f"{block}.adaLN_modulation.1", 3 * width, width)
    _linear(shapes, "net.final_layer.linear", target_channels, width)
    _linear(shapes, "net.final_layer.adaLN_modulation.1", 2 * width, width)
    return shapes


# -- random values -------------------------------------------------------------------------------
def _random_tensors(shapes: Shapes, seed: int, salt: int) -> Dict[str, torch.Tensor]:
    """Seeded float32 values in sorted-name order: 1-D weights ~1 (norms), biases small, matrices ~1/sqrt(fan_in)."""
    generator = torch.Generator().manual_seed(seed * 1009 + salt)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if name.endswith(".bias"):
            state[name] = 0.02 * noise
        elif len(shape) == 1:
            state[name] = 1.0 + 0.1 * noise
        else:
            state[name] = noise / math.sqrt(max(1, math.prod(shape[1:])))
    return state


def tiny_full_state_dict(mllm_config: dict, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Every tensor of the tiny combined ``bernini/`` checkpoint, with its official prefix, in float32."""
    text, _ = qwen_text_and_vision(mllm_config)
    hidden, gen_dim = text["hidden_size"], TINY_UMT5["d_model"]
    parts = {
        "mllm.": _random_tensors(qwen_shapes(mllm_config), seed, _SALT["mllm"]),
        "connector.": _random_tensors(connector_shapes(hidden, gen_dim, hidden), seed, _SALT["connector"]),
        "vit_decoder.": _random_tensors(
            vit_decoder_shapes(hidden, hidden, TINY_VIT_DECODER_WIDTH, TINY_VIT_DECODER_DEPTH), seed,
            _SALT["vit_decoder"]),
        "diff_dec.transformer.": tiny_dit_state_dict(TINY_FULL_DIT, seed, expert="high", dtype=torch.float32),
        "diff_dec_low.transformer_2.": tiny_dit_state_dict(TINY_FULL_DIT, seed, expert="low", dtype=torch.float32),
        "t5_text_encoder.": {k: v.float() for k, v in tiny_umt5_state_dict(TINY_UMT5, seed).items()},
    }
    # The release's UMT5 copy also stores the tied embed_tokens (243 = 24 x 10 + 3 tensors,
    # docs/official_behaviour.md §2.1).
    parts["t5_text_encoder."]["encoder.embed_tokens.weight"] = parts["t5_text_encoder."]["shared.weight"].clone()
    state = {prefix + key: value for prefix, tensors in parts.items() for key, value in tensors.items()}
    generator = torch.Generator().manual_seed(seed * 1009 + _SALT["mask_tokens"])
    # The official initialises the table as randn * 0.01 (official `bernini/models/bernini.py`).
    state["mask_tokens"] = 0.01 * torch.randn(1, TINY_NUM_MASK_TOKEN, hidden, generator=generator)
    return state


# -- writer --------------------------------------------------------------------------------------
def tiny_bernini_root(out_dir, version: str = "v1") -> Path:
    """Where make_tiny_bernini writes: v2 folders must end with "Bernini-Diffusers-v2" (how the official tells
    v2 from v1, official ``gradio_demo.py`` ``_is_bernini_v2_config``)."""
    if version not in ("v1", "v2"):
        raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
    root = Path(out_dir)
    if version == "v2" and not root.name.endswith(V2_DIRNAME):
        root = root / V2_DIRNAME
    if version == "v1" and root.name.endswith(V2_DIRNAME):
        raise ValueError(f"a v1 checkpoint folder must not be named '*{V2_DIRNAME}' ({root}); it would be read as v2")
    return root


def make_tiny_bernini(out_dir, *, version: str = "v1", seed: int = 0) -> Path:
    """Write a tiny random Bernini-Diffusers (v1) or Bernini-Diffusers-v2 folder and return its path."""
    from .planner.tiny_mllm import write_tiny_mllm_assets
    from .checkpoints import read_json

    root = tiny_bernini_root(out_dir, version)
    mllm_dir = Path(write_tiny_mllm_assets(root / "mllm", seed=seed))
    mllm_config = read_json(mllm_dir / "config.json")
    hidden = qwen_text_and_vision(mllm_config)[0]["hidden_size"]

    _write_json(root / "config.json", full_config(hidden, version=version))
    _write_json(root / "transformer_config.json", TINY_FULL_DIT)
    _write_json(root / "transformer_2_config.json", TINY_FULL_DIT)
    _save_sharded(root / "bernini", "model", tiny_full_state_dict(mllm_config, seed), num_shards=COMBINED_SHARDS)

    _write_text_encoder_tokenizer_vae_scheduler(root, seed, text_encoder="t5_text_encoder", tokenizer="t5_tokenizer")
    return root


__all__ = ["TINY_FULL_DIT", "TINY_NUM_MASK_TOKEN", "V2_DIRNAME", "connector_shapes", "full_config",
           "make_tiny_bernini", "qwen_shapes", "qwen_text_and_vision", "tiny_bernini_root", "tiny_full_state_dict",
           "vit_decoder_shapes"]
