"""Writing small GGUF files for the tests, in the layout ComfyUI-GGUF reads: original Wan tensor names,
architecture "wan", 2-D Linear weights quantised, biases / norms / modulation in F32, the 5-D patch embedding
flattened to 2-D with ``comfy.gguf.orig_shape.*`` metadata (or stored 5-D, as ComfyUI-GGUF's fix_5d tool does).

Quantisation uses the `gguf` package's own quantisers; gguf-py has none for the k-quants, so Q4_K is packed here
by a plain (not ggml's optimised) quantiser: any valid Q4_K bytes serve, as every test compares against
gguf-py's dequantisation of the very bytes written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import gguf
import numpy as np
import torch

from bernini_core.keymaps.wan_dit import dit_key_to_original
from bernini_core.tiny import TINY_DIT

Q = gguf.GGMLQuantizationType
QUANTIZE_MIN_VALUES = 1024  # ComfyUI-GGUF keeps tensors this small in F32

# The tiny Wan DiT of bernini_core/tiny.py widened so every Linear input is a multiple of 256 values (the k-quant
# super-block): 2 heads of 128, FFN 512, text 256; 2 blocks.
GGUF_TINY_DIT = dict(TINY_DIT, attention_head_dim=128, ffn_dim=512, text_dim=256)


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """Q4_K bytes [rows, cols / 256 * 144] of float32 [rows, cols]: per 32 values an unsigned 4-bit code with a
    6-bit scale and min, those scaled by the super-block's fp16 d / dmin (ggml block_q4_K layout)."""
    rows, cols = values.shape
    sub = values.astype(np.float32).reshape(-1, 8, 32)
    low = np.minimum(sub.min(axis=-1), 0)
    scale, mins = (sub.max(axis=-1) - low) / 15, -low
    d = (scale.max(axis=-1, keepdims=True) / 63).astype(np.float16)
    dmin = (mins.max(axis=-1, keepdims=True) / 63).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d > 0, np.rint(scale / d.astype(np.float32)), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dmin > 0, np.rint(mins / dmin.astype(np.float32)), 0).clip(0, 63).astype(np.uint8)
        step = (d.astype(np.float32) * sc)[..., None]
        offset = (dmin.astype(np.float32) * mn)[..., None]
        q = np.where(step > 0, np.rint((sub + offset) / step), 0).clip(0, 15).astype(np.uint8)
    packed_scales = np.concatenate([(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
                                    (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6),
                                    (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=-1)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # 32 bytes per pair of sub-blocks: low, high nibbles
    blocks = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), packed_scales, qs], axis=-1)
    return blocks.reshape(rows, cols // 256 * 144)


def quantize(values: np.ndarray, qtype) -> np.ndarray:
    """File bytes of `values` in type `qtype` (gguf-py's quantiser, or quantize_q4_k)."""
    if qtype == Q.Q4_K:
        return quantize_q4_k(values)
    return gguf.quants.quantize(values.astype(np.float32), qtype)


def wan_state(seed: int = 0, config: dict = GGUF_TINY_DIT) -> Dict[str, torch.Tensor]:
    """Seeded fp32 weights of the tiny Wan DiT, diffusers names (bernini_core/tiny.py)."""
    from bernini_core.tiny import tiny_dit_state_dict

    return tiny_dit_state_dict(config, seed, dtype=torch.float32)


def write_gguf(path, tensors: Dict[str, tuple], *, arch: Optional[str] = "wan", metadata: Optional[dict] = None) -> Path:
    """A GGUF file of {name: (array as stored, GGMLQuantizationType)} plus integer-array metadata."""
    writer = gguf.GGUFWriter(str(path), arch=arch or "")  # "": no general.architecture, as stable-diffusion.cpp
    for key, value in (metadata or {}).items():
        writer.add_array(key, [int(v) for v in value])
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def write_wan_expert(path, state: Dict[str, torch.Tensor], qtype, *, prefix: str = "", patch_5d: bool = False,
                     arch: Optional[str] = "wan") -> Path:
    """The expert `state` (diffusers names, fp32) as a ComfyUI-GGUF-layout file with Linear weights in `qtype`."""
    tensors, metadata = {}, {}
    for key, value in state.items():
        name = prefix + dit_key_to_original(key)
        array = value.float().numpy()
        if array.ndim == 5 and not patch_5d:
            metadata[f"comfy.gguf.orig_shape.{name}"] = array.shape
            tensors[name] = (array.reshape(array.shape[0], -1), Q.F32)
        elif array.ndim == 2 and array.size > QUANTIZE_MIN_VALUES and ".modulation" not in name:
            tensors[name] = (quantize(array, qtype), qtype)
        else:
            tensors[name] = (array, Q.F32)
    return write_gguf(path, tensors, arch=arch, metadata=metadata)
