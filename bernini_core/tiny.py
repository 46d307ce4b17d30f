"""Tiny random checkpoints written in the exact official layouts (tests, ``--config tiny``).

Everything is seeded: the same seed gives byte-identical files. Parameter shapes
come from tables derived from the configs here, independent of any model class,
so the files can be checked against diffusers / transformers (tests/test_tiny.py).
The same seed gives the same expert weights in every layout (Bernini-R-Diffusers,
split checkpoints, ComfyUI single files), so layouts can be compared tensor for tensor.
"""

import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from .keymaps.wan_dit import dit_key_to_original

# diffusers WanTransformer3DModel config (transformer/config.json): heads 2 x 24, 2 layers (docs/wan_qwen.md §6).
TINY_DIT = {
    "_class_name": "WanTransformer3DModel",
    "_diffusers_version": "0.35.0",
    "added_kv_proj_dim": None,
    "attention_head_dim": 24,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 64,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "num_attention_heads": 2,
    "num_layers": 2,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "pos_embed_seq_len": None,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 32,
}

# diffusers AutoencoderKLWan config (vae/config.json): the Wan 2.1 structure, narrow channels.
TINY_VAE = {
    "_class_name": "AutoencoderKLWan",
    "_diffusers_version": "0.35.0",
    "attn_scales": [],
    "base_dim": 8,
    "dim_mult": [1, 1, 1, 1],
    "dropout": 0.0,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
    "z_dim": 16,
}

# Words of the tiny tokenizer vocabulary (whole-word pieces); with the specials, the "▁" piece,
# the 94 printable ASCII characters and "▁a".."▁z" they make exactly TINY_UMT5["vocab_size"] pieces.
_TINY_WORDS = (
    "the an of and in on to with is are at by from for as it this that his her their "
    "man woman person cat dog car tree sky sea city street room light red blue green white black "
    "video image scene camera moves slowly walks runs style change into replace add remove"
).split()

# transformers UMT5Config of the text_encoder/ folder: d_model = TINY_DIT text_dim.
TINY_UMT5 = {
    "architectures": ["UMT5EncoderModel"],
    "classifier_dropout": 0.0,
    "d_ff": 64,
    "d_kv": 8,
    "d_model": 32,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "umt5",
    "num_decoder_layers": 2,
    "num_heads": 4,
    "num_layers": 2,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "scalable_attention": True,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 3 + 1 + 94 + 26 + len(_TINY_WORDS),
}

# UniPC flow-matching scheduler config of the Wan2.2 -Diffusers / Bernini-R-Diffusers releases.
TINY_SCHEDULER = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.35.0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}

# Renderer config.json fields of the official configs/bernini_renderer_wan22 (docs/official_behaviour.md §2.3); the
# 1.3B variant differs as listed.
_RENDERER_CONFIG = {
    "model_type": "bernini_renderer",
    "wan22_base": "ByteDance/Bernini-R-Diffusers",
    "skip_transformer_1": False,
    "skip_transformer_2": False,
    "switch_dit_boundary": 0.875,
    "max_sequence_length": 512,
    "shift": 3.0,
    "use_unipc": True,
    "use_src_id_rotary_emb": True,
}
_RENDERER_CONFIG_1P3B = {"wan22_base": "ByteDance/Bernini-R-1.3B-Diffusers", "skip_transformer_2": True,
                         "switch_dit_boundary": 0}

# Salts so every component draws from its own random stream.
_SALT = {"dit_high": 1, "dit_low": 2, "dit_high_ema": 3, "vae": 4, "umt5": 5}

Shapes = Dict[str, Tuple[int, ...]]


# -- shape tables --------------------------------------------------------------------------------
def _linear(shapes: Shapes, name: str, out_dim: int, in_dim: int, bias: bool = True) -> None:
    shapes[f"{name}.weight"] = (out_dim, in_dim)
    if bias:
        shapes[f"{name}.bias"] = (out_dim,)


def dit_shapes(config: dict) -> Shapes:
    """diffusers WanTransformer3DModel parameter shapes for a T2V config (docs/wan_qwen.md §1.3)."""
    if config.get("image_dim") or config.get("added_kv_proj_dim") or config.get("pos_embed_seq_len"):
        raise ValueError("tiny DiT shapes cover the text-to-video Wan DiT only (no image branch)")
    if config.get("qk_norm") not in (None, "rms_norm_across_heads"):
        raise ValueError(f"unsupported qk_norm {config.get('qk_norm')!r}")
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    patch = tuple(config["patch_size"])
    out_channels = config.get("out_channels") or config["in_channels"]
    shapes: Shapes = {"scale_shift_table": (1, 2, inner)}
    shapes["patch_embedding.weight"] = (inner, config["in_channels"], *patch)
    shapes["patch_embedding.bias"] = (inner,)
    _linear(shapes, "condition_embedder.time_embedder.linear_1", inner, config["freq_dim"])
    _linear(shapes, "condition_embedder.time_embedder.linear_2", inner, inner)
    _linear(shapes, "condition_embedder.time_proj", 6 * inner, inner)
    _linear(shapes, "condition_embedder.text_embedder.linear_1", inner, config["text_dim"])
    _linear(shapes, "condition_embedder.text_embedder.linear_2", inner, inner)
    for i in range(config["num_layers"]):
        block = f"blocks.{i}"
        shapes[f"{block}.scale_shift_table"] = (1, 6, inner)
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                _linear(shapes, f"{block}.{attn}.{proj}", inner, inner)
            if config.get("qk_norm"):
                shapes[f"{block}.{attn}.norm_q.weight"] = (inner,)
                shapes[f"{block}.{attn}.norm_k.weight"] = (inner,)
        if config.get("cross_attn_norm"):
            shapes[f"{block}.norm2.weight"] = (inner,)
            shapes[f"{block}.norm2.bias"] = (inner,)
        _linear(shapes, f"{block}.ffn.net.0.proj", config["ffn_dim"], inner)
        _linear(shapes, f"{block}.ffn.net.2", inner, config["ffn_dim"])
    _linear(shapes, "proj_out", out_channels * math.prod(patch), inner)
    return shapes


def _conv(shapes: Shapes, name: str, out_dim: int, in_dim: int, kernel: Tuple[int, ...]) -> None:
    shapes[f"{name}.weight"] = (out_dim, in_dim, *kernel)
    shapes[f"{name}.bias"] = (out_dim,)


def _vae_resblock(shapes: Shapes, name: str, in_dim: int, out_dim: int) -> None:
    shapes[f"{name}.norm1.gamma"] = (in_dim, 1, 1, 1)
    _conv(shapes, f"{name}.conv1", out_dim, in_dim, (3, 3, 3))
    shapes[f"{name}.norm2.gamma"] = (out_dim, 1, 1, 1)
    _conv(shapes, f"{name}.conv2", out_dim, out_dim, (3, 3, 3))
    if in_dim != out_dim:
        _conv(shapes, f"{name}.conv_shortcut", out_dim, in_dim, (1, 1, 1))


def _vae_mid(shapes: Shapes, name: str, dim: int) -> None:
    shapes[f"{name}.attentions.0.norm.gamma"] = (dim, 1, 1)
    _conv(shapes, f"{name}.attentions.0.to_qkv", 3 * dim, dim, (1, 1))
    _conv(shapes, f"{name}.attentions.0.proj", dim, dim, (1, 1))
    _vae_resblock(shapes, f"{name}.resnets.0", dim, dim)
    _vae_resblock(shapes, f"{name}.resnets.1", dim, dim)


def vae_shapes(config: dict) -> Shapes:
    """diffusers AutoencoderKLWan parameter shapes for the Wan 2.1 structure (docs/wan_qwen.md §2)."""
    if config.get("is_residual") or config.get("attn_scales"):
        raise ValueError("tiny VAE shapes cover the Wan 2.1 VAE only (no residual blocks, no attn_scales)")
    z, mult, blocks = config["z_dim"], list(config["dim_mult"]), config["num_res_blocks"]
    down = list(config["temperal_downsample"])
    in_ch, out_ch = config.get("in_channels", 3), config.get("out_channels", 3)
    shapes: Shapes = {}
    dims = [config["base_dim"] * u for u in [1] + mult]
    _conv(shapes, "encoder.conv_in", dims[0], in_ch, (3, 3, 3))
    index = 0
    for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(blocks):
            _vae_resblock(shapes, f"encoder.down_blocks.{index}", in_dim, out_dim)
            index, in_dim = index + 1, out_dim
        if level != len(mult) - 1:
            _conv(shapes, f"encoder.down_blocks.{index}.resample.1", out_dim, out_dim, (3, 3))
            if down[level]:
                _conv(shapes, f"encoder.down_blocks.{index}.time_conv", out_dim, out_dim, (3, 1, 1))
            index += 1
    _vae_mid(shapes, "encoder.mid_block", dims[-1])
    shapes["encoder.norm_out.gamma"] = (dims[-1], 1, 1, 1)
    _conv(shapes, "encoder.conv_out", 2 * z, dims[-1], (3, 3, 3))
    _conv(shapes, "quant_conv", 2 * z, 2 * z, (1, 1, 1))
    _conv(shapes, "post_quant_conv", z, z, (1, 1, 1))

    base = config.get("decoder_base_dim") or config["base_dim"]
    dims = [base * u for u in [mult[-1]] + mult[::-1]]
    up = down[::-1]
    _conv(shapes, "decoder.conv_in", dims[0], z, (3, 3, 3))
    _vae_mid(shapes, "decoder.mid_block", dims[0])
    for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        if level > 0:
            in_dim //= 2  # the Wan 2.1 upsamplers halve the channels
        for j in range(blocks + 1):
            _vae_resblock(shapes, f"decoder.up_blocks.{level}.resnets.{j}", in_dim, out_dim)
            in_dim = out_dim
        if level != len(mult) - 1:
            name = f"decoder.up_blocks.{level}.upsamplers.0"
            _conv(shapes, f"{name}.resample.1", out_dim // 2, out_dim, (3, 3))
            if up[level]:
                _conv(shapes, f"{name}.time_conv", 2 * out_dim, out_dim, (3, 1, 1))
    shapes["decoder.norm_out.gamma"] = (dims[-1], 1, 1, 1)
    _conv(shapes, "decoder.conv_out", out_ch, dims[-1], (3, 3, 3))
    return shapes


def umt5_shapes(config: dict) -> Shapes:
    """transformers UMT5EncoderModel parameter shapes (docs/wan_qwen.md §3); the tied embed_tokens is not stored."""
    d, inner, heads = config["d_model"], config["num_heads"] * config["d_kv"], config["num_heads"]
    shapes: Shapes = {"shared.weight": (config["vocab_size"], d)}
    for i in range(config["num_layers"]):
        att = f"encoder.block.{i}.layer.0.SelfAttention"
        for proj in ("q", "k", "v"):
            shapes[f"{att}.{proj}.weight"] = (inner, d)
        shapes[f"{att}.o.weight"] = (d, inner)
        shapes[f"{att}.relative_attention_bias.weight"] = (config["relative_attention_num_buckets"], heads)
        shapes[f"encoder.block.{i}.layer.0.layer_norm.weight"] = (d,)
        ffn = f"encoder.block.{i}.layer.1.DenseReluDense"
        shapes[f"{ffn}.wi_0.weight"] = (config["d_ff"], d)
        shapes[f"{ffn}.wi_1.weight"] = (config["d_ff"], d)
        shapes[f"{ffn}.wo.weight"] = (d, config["d_ff"])
        shapes[f"encoder.block.{i}.layer.1.layer_norm.weight"] = (d,)
    shapes["encoder.final_layer_norm.weight"] = (d,)
    return shapes


# -- random values -------------------------------------------------------------------------------
def _random_state(shapes: Shapes, seed: int, salt: int, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Seeded values drawn in sorted-name order: norms ~1, biases small, weights ~ 1/sqrt(fan_in)."""
    generator = torch.Generator().manual_seed(seed * 1009 + salt)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        is_norm = leaf == "gamma" or (len(shape) == 1 and "norm" in name and leaf == "weight")
        if is_norm:
            value = 1.0 + 0.1 * noise
        elif leaf == "bias":
            value = 0.02 * noise
        elif "scale_shift_table" in name:
            value = noise / math.sqrt(shape[-1])
        elif name == "shared.weight":
            value = noise
        elif "relative_attention_bias" in name:
            value = 0.1 * noise
        else:
            value = noise / math.sqrt(max(1, math.prod(shape[1:])))
        state[name] = value.to(dtype)
    return state


def tiny_dit_state_dict(config: dict = TINY_DIT, seed: int = 0, *, expert: str = "high",
                        dtype: torch.dtype = torch.bfloat16) -> Dict[str, torch.Tensor]:
    """Seeded diffusers-named DiT weights; ``expert`` ("high", "low", "high_ema") picks an independent stream."""
    return _random_state(dit_shapes(config), seed, _SALT[f"dit_{expert}"], dtype)


def tiny_vae_state_dict(config: dict = TINY_VAE, seed: int = 0) -> Dict[str, torch.Tensor]:
    return _random_state(vae_shapes(config), seed, _SALT["vae"], torch.float32)


def tiny_umt5_state_dict(config: dict = TINY_UMT5, seed: int = 0) -> Dict[str, torch.Tensor]:
    return _random_state(umt5_shapes(config), seed, _SALT["umt5"], torch.bfloat16)


# -- writers -------------------------------------------------------------------------------------
def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save(path: Path, tensors: Dict[str, torch.Tensor]) -> int:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _save_sharded(folder: Path, stem: str, tensors: Dict[str, torch.Tensor], num_shards: int = 2) -> None:
    """``<stem>-0000i-of-0000n.safetensors`` + ``<stem>.safetensors.index.json`` (sorted keys split evenly)."""
    names = sorted(tensors)
    per_shard = math.ceil(len(names) / num_shards)
    weight_map, total = {}, 0
    for i in range(num_shards):
        shard_name = f"{stem}-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = names[i * per_shard:(i + 1) * per_shard]
        total += _save(folder / shard_name, {k: tensors[k] for k in chunk})
        weight_map.update({k: shard_name for k in chunk})
    _write_json(folder / f"{stem}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _tokenizer_vocab() -> List[Tuple[str, float]]:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(chr(c), -6.0) for c in range(33, 127)]
    vocab += [("\u2581" + chr(c), -4.0) for c in range(ord("a"), ord("z") + 1)]
    vocab += [("\u2581" + word, -3.0) for word in _TINY_WORDS]
    if len(vocab) != TINY_UMT5["vocab_size"] or len({p for p, _ in vocab}) != len(vocab):
        raise AssertionError("tiny tokenizer vocabulary does not match TINY_UMT5['vocab_size']")
    return vocab


def write_tiny_tokenizer(folder: Path) -> None:
    """A T5-style SentencePiece-Unigram tokenizer built offline: pad 0, eos 1, unk 2, "</s>" appended."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tokenizer = Tokenizer(models.Unigram(_tokenizer_vocab(), unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tokenizer.add_special_tokens(["<pad>", "</s>", "<unk>"])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(folder / "tokenizer_config.json", {
        **specials, "tokenizer_class": "T5Tokenizer", "extra_ids": 0, "additional_special_tokens": [],
        "model_max_length": 512, "clean_up_tokenization_spaces": False,
    })


def _write_text_encoder_tokenizer_vae_scheduler(root: Path, seed: int, *, text_encoder: str = "text_encoder",
                                                tokenizer: str = "tokenizer") -> None:
    """The UMT5 / tokenizer / VAE / scheduler folders every official layout has (the full layout names the
    first two t5_text_encoder/ and t5_tokenizer/)."""
    _write_json(root / text_encoder / "config.json", TINY_UMT5)
    _save(root / text_encoder / "model.safetensors", tiny_umt5_state_dict(TINY_UMT5, seed))
    write_tiny_tokenizer(root / tokenizer)
    _write_json(root / "vae" / "config.json", TINY_VAE)
    _save(root / "vae" / "diffusion_pytorch_model.safetensors", tiny_vae_state_dict(TINY_VAE, seed))
    _write_json(root / "scheduler" / "scheduler_config.json", TINY_SCHEDULER)


def make_tiny_renderer(out_dir, *, variant: str = "14b", seed: int = 0) -> Path:
    """A Bernini-R-Diffusers folder (docs/official_behaviour.md §2.3): config.json, transformer/ (2 shards + index),
    transformer_2/ (14b only), text_encoder/, tokenizer/, vae/, scheduler/."""
    if variant not in ("14b", "1.3b"):
        raise ValueError(f"variant must be '14b' or '1.3b', got {variant!r}")
    root = Path(out_dir)
    config = dict(_RENDERER_CONFIG, **(_RENDERER_CONFIG_1P3B if variant == "1.3b" else {}))
    _write_json(root / "config.json", config)
    _write_json(root / "transformer" / "config.json", TINY_DIT)
    _save_sharded(root / "transformer", "diffusion_pytorch_model", tiny_dit_state_dict(TINY_DIT, seed, expert="high"))
    if variant == "14b":
        _write_json(root / "transformer_2" / "config.json", TINY_DIT)
        _save_sharded(root / "transformer_2", "diffusion_pytorch_model",
                      tiny_dit_state_dict(TINY_DIT, seed, expert="low"))
    _write_text_encoder_tokenizer_vae_scheduler(root, seed)
    return root


_WAN_MODEL_INDEX = {
    "_class_name": "WanPipeline",
    "_diffusers_version": "0.35.0",
    "boundary_ratio": 0.875,
    "expand_timesteps": False,
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "transformer_2": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}
WAN_BASE_DIRNAME = "Wan2.2-T2V-A14B-Diffusers"


def make_tiny_split(out_dir, *, seed: int = 0) -> Path:
    """The ``ByteDance/Bernini-R`` release shape (docs/official_behaviour.md §2.3, §2.4) plus the Wan2.2 -Diffusers
    base it needs.

    ``bernini_renderer_high/`` and ``bernini_renderer_low/``: sharded ``model-*.safetensors`` +
    ``model.safetensors.index.json`` as ``tools/merge_dcp_to_hf_pt.py`` writes them, holding the UMT5 copy
    (``t5_text_encoder.*``) and ``diff_dec.transformer.*`` (high) / ``diff_dec.transformer_2.*`` (low); the
    high one also holds ``ema.diff_dec.transformer.*`` with different values (the copy the loader must pick).
    ``Wan2.2-T2V-A14B-Diffusers/``: model_index.json, transformer(_2)/config.json (configs only: the split
    checkpoints carry the expert weights), text_encoder/, tokenizer/, vae/, scheduler/.
    """
    root = Path(out_dir)
    umt5 = {f"t5_text_encoder.{k}": v for k, v in tiny_umt5_state_dict(TINY_UMT5, seed).items()}
    high = {f"diff_dec.transformer.{k}": v for k, v in tiny_dit_state_dict(TINY_DIT, seed, expert="high").items()}
    high_ema = {f"ema.diff_dec.transformer.{k}": v
                for k, v in tiny_dit_state_dict(TINY_DIT, seed, expert="high_ema").items()}
    low = {f"diff_dec.transformer_2.{k}": v for k, v in tiny_dit_state_dict(TINY_DIT, seed, expert="low").items()}
    _save_sharded(root / "bernini_renderer_high", "model", {**umt5, **high, **high_ema})
    _save_sharded(root / "bernini_renderer_low", "model", {**umt5, **low})

    base = root / WAN_BASE_DIRNAME
    _write_json(base / "model_index.json", _WAN_MODEL_INDEX)
    _write_json(base / "transformer" / "config.json", TINY_DIT)
    _write_json(base / "transformer_2" / "config.json", TINY_DIT)
    _write_text_encoder_tokenizer_vae_scheduler(base, seed)
    return root


def quantize_fp8_scaled(tensor: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor fp8 e4m3fn quantisation as in ComfyUI "scaled" files: (fp8 weight, fp32 scale = amax / 448)."""
    value = tensor.to(torch.float32)
    scale = (value.abs().amax() / 448.0).clamp(min=1e-12)
    return (value / scale).to(torch.float8_e4m3fn), scale.reshape(())


def make_tiny_comfy_files(out_dir, *, seed: int = 0) -> Dict[str, Path]:
    """ComfyUI single files with original Wan key names: "high" (bf16), "low" (fp8 e4m3fn scaled: every 2-D
    block Linear weight in fp8 + per-tensor ``scale_weight``, the ``scaled_fp8`` marker, rest bf16) and
    "vae" (Wan 2.1 VAE, original names via keymaps.wan_vae)."""
    from .keymaps.wan_vae import vae_key_to_original

    root = Path(out_dir)
    paths = {"high": root / "bernini_r_high_noise_tiny_bf16.safetensors",
             "low": root / "bernini_r_low_noise_tiny_fp8_e4m3fn_scaled.safetensors",
             "vae": root / "wan_2.1_vae_tiny.safetensors"}
    high = tiny_dit_state_dict(TINY_DIT, seed, expert="high")
    _save(paths["high"], {dit_key_to_original(k): v for k, v in high.items()})

    low = {}
    for key, value in tiny_dit_state_dict(TINY_DIT, seed, expert="low").items():
        original = dit_key_to_original(key)
        if original.startswith("blocks.") and original.endswith(".weight") and value.dim() == 2:
            low[original], low[original[: -len("weight")] + "scale_weight"] = quantize_fp8_scaled(value)
        else:
            low[original] = value
    low["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    _save(paths["low"], low)

    levels, blocks = len(TINY_VAE["dim_mult"]), TINY_VAE["num_res_blocks"]
    vae = tiny_vae_state_dict(TINY_VAE, seed)
    _save(paths["vae"], {vae_key_to_original(k, blocks, levels): v for k, v in vae.items()})
    return paths
