"""Wan 2.1 VAE key names: original Wan / ComfyUI single-file layout <-> ours (= diffusers AutoencoderKLWan).

The original layout (Wan-Video `wan/modules/vae.py`, shipped by ComfyUI as `wan_2.1_vae.safetensors`) keeps
the encoder and decoder as flat `nn.Sequential`s; ours groups them the way diffusers does (docs/wan_qwen.md §2):

    conv1 / conv2 (top level)            -> quant_conv / post_quant_conv
    {encoder,decoder}.conv1              -> {encoder,decoder}.conv_in
    {encoder,decoder}.head.{0,2}         -> {encoder,decoder}.{norm_out, conv_out}
    {encoder,decoder}.middle.{0,1,2}     -> {encoder,decoder}.mid_block.{resnets.0, attentions.0, resnets.1}
    encoder.downsamples.N                -> encoder.down_blocks.N            (both flat, same index)
    decoder.upsamples.N                  -> decoder.up_blocks.B.{resnets.R | upsamplers.0}
    residual.{0,2,3,6} / shortcut        -> norm1.gamma, conv1, norm2.gamma, conv2 / conv_shortcut

The decoder's flat index depends on the block structure: each of the `num_levels` up blocks holds
`num_res_blocks + 1` residual blocks followed, except the last, by one upsampler (full Wan 2.1: 3 + 1 per
block, so upsamples.{3,7,11} are the upsamplers). The per-key functions take that structure as arguments;
`convert_vae_state_dict` infers it from the keys.
"""

from __future__ import annotations

import re
from typing import Mapping

from ..errors import BerniniError

# Residual-block sub-module names: original -> ours. Resample (`resample.1`, `time_conv`) and attention
# (`norm`, `to_qkv`, `proj`) names are identical in both layouts.
_RESIDUAL_TO_OURS = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_RESIDUAL_TO_ORIGINAL = {v: k for k, v in _RESIDUAL_TO_OURS.items()}
_TOP_TO_OURS = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
_TOP_TO_ORIGINAL = {v: k for k, v in _TOP_TO_OURS.items()}
_HEAD_TO_OURS = {"head.0.gamma": "norm_out.gamma", "head.2.weight": "conv_out.weight", "head.2.bias": "conv_out.bias"}
_HEAD_TO_ORIGINAL = {v: k for k, v in _HEAD_TO_OURS.items()}
_MIDDLE_TO_OURS = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_MIDDLE_TO_ORIGINAL = {v: k for k, v in _MIDDLE_TO_OURS.items()}

# Prefixes some single-file checkpoints put in front of the VAE keys.
_KNOWN_PREFIXES = ("first_stage_model.", "vae.")

_WAN21_ONLY = (
    "Only the Wan 2.1 16-channel VAE (wan_2.1_vae.safetensors / a diffusers AutoencoderKLWan 'vae' folder) is "
    "supported; Bernini's renderer was trained on it (Wan 2.2's 48-channel VAE will not work)."
)


def _unknown(key: str) -> BerniniError:
    return BerniniError(f"VAE weight {key!r} is not part of the Wan 2.1 VAE layout. {_WAN21_ONLY}")


def _sub_from_original(rest: str, key: str) -> str:
    """Rename the part of a key below a residual / attention / resample block."""
    if rest in _RESIDUAL_TO_OURS:
        return _RESIDUAL_TO_OURS[rest]
    if rest.startswith(("resample.", "time_conv.", "norm.", "to_qkv.", "proj.")):
        return rest
    raise _unknown(key)


def _sub_to_original(rest: str, key: str) -> str:
    if rest in _RESIDUAL_TO_ORIGINAL:
        return _RESIDUAL_TO_ORIGINAL[rest]
    if rest.startswith(("resample.", "time_conv.", "norm.", "to_qkv.", "proj.")):
        return rest
    raise _unknown(key)


def vae_key_from_original(key: str, num_res_blocks: int = 2, num_levels: int = 4) -> str:
    """Original Wan / ComfyUI VAE key -> our (diffusers) key."""
    top, _, rest = key.partition(".")
    if top in _TOP_TO_OURS and rest in ("weight", "bias"):
        return f"{_TOP_TO_OURS[top]}.{rest}"
    if top not in ("encoder", "decoder"):
        raise _unknown(key)
    if rest.startswith("conv1."):
        return f"{top}.conv_in.{rest[len('conv1.'):]}"
    if rest in _HEAD_TO_OURS:
        return f"{top}.{_HEAD_TO_OURS[rest]}"
    m = re.fullmatch(r"(middle|downsamples|upsamples)\.(\d+)\.(.+)", rest)
    if m is None:
        raise _unknown(key)
    group, index, sub = m.group(1), int(m.group(2)), m.group(3)
    if group == "middle":
        if str(index) not in _MIDDLE_TO_OURS:
            raise _unknown(key)
        return f"{top}.mid_block.{_MIDDLE_TO_OURS[str(index)]}.{_sub_from_original(sub, key)}"
    if group == "downsamples" and top == "encoder":
        return f"encoder.down_blocks.{index}.{_sub_from_original(sub, key)}"
    if group == "upsamples" and top == "decoder":
        per_block = num_res_blocks + 2  # residual blocks + one upsampler (absent in the last block)
        block, position = divmod(index, per_block)
        if block >= num_levels or (block == num_levels - 1 and position > num_res_blocks):
            raise _unknown(key)
        if position <= num_res_blocks:
            return f"decoder.up_blocks.{block}.resnets.{position}.{_sub_from_original(sub, key)}"
        return f"decoder.up_blocks.{block}.upsamplers.0.{_sub_from_original(sub, key)}"
    raise _unknown(key)


def vae_key_to_original(key: str, num_res_blocks: int = 2, num_levels: int = 4) -> str:
    """Our (diffusers) VAE key -> original Wan / ComfyUI key (inverse of `vae_key_from_original`)."""
    top, _, rest = key.partition(".")
    if top in _TOP_TO_ORIGINAL and rest in ("weight", "bias"):
        return f"{_TOP_TO_ORIGINAL[top]}.{rest}"
    if top not in ("encoder", "decoder"):
        raise _unknown(key)
    if rest.startswith("conv_in."):
        return f"{top}.conv1.{rest[len('conv_in.'):]}"
    if rest in _HEAD_TO_ORIGINAL:
        return f"{top}.{_HEAD_TO_ORIGINAL[rest]}"
    m = re.fullmatch(r"mid_block\.(resnets\.\d+|attentions\.\d+)\.(.+)", rest)
    if m is not None:
        if m.group(1) not in _MIDDLE_TO_ORIGINAL:
            raise _unknown(key)
        return f"{top}.middle.{_MIDDLE_TO_ORIGINAL[m.group(1)]}.{_sub_to_original(m.group(2), key)}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest)
    if m is not None and top == "encoder":
        return f"encoder.downsamples.{m.group(1)}.{_sub_to_original(m.group(2), key)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)", rest)
    if m is not None and top == "decoder":
        block = int(m.group(1))
        position = int(m.group(3)) if m.group(3) is not None else num_res_blocks + 1
        if block >= num_levels or position > num_res_blocks + 1:
            raise _unknown(key)
        return f"decoder.upsamples.{block * (num_res_blocks + 2) + position}.{_sub_to_original(m.group(4), key)}"
    raise _unknown(key)


def _strip_prefix(sd: Mapping) -> dict:
    for prefix in _KNOWN_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def _decoder_structure(keys) -> tuple[int, int]:
    """(num_res_blocks, num_levels) of an original-layout decoder, read off its `upsamples.N` keys."""
    indices, upsamplers = set(), set()
    for key in keys:
        m = re.match(r"decoder\.upsamples\.(\d+)\.(.+)", key)
        if m is None:
            continue
        indices.add(int(m.group(1)))
        if m.group(2).startswith(("resample.", "time_conv.")):
            upsamplers.add(int(m.group(1)))
    if not indices:
        raise BerniniError(f"The VAE file has no decoder weights (decoder.upsamples.*). {_WAN21_ONLY}")
    num_levels = len(upsamplers) + 1
    residuals, rem = divmod(max(indices) + 1 - len(upsamplers), num_levels)
    if rem or residuals < 1:
        raise BerniniError(f"The VAE decoder blocks do not have the Wan 2.1 structure. {_WAN21_ONLY}")
    return residuals - 1, num_levels


def _check_wan21(sd: Mapping, latent_conv_key: str, pixel_conv_key: str) -> None:
    latent_conv, pixel_conv = sd.get(latent_conv_key), sd.get(pixel_conv_key)
    if latent_conv is None or pixel_conv is None:
        raise BerniniError(f"The VAE file lacks {latent_conv_key!r} or {pixel_conv_key!r}. {_WAN21_ONLY}")
    z_dim, in_channels = latent_conv.shape[0], pixel_conv.shape[1]
    if z_dim != 16 or in_channels != 3:
        raise BerniniError(
            f"The VAE file has {z_dim} latent channels and {in_channels} input channels (Wan 2.1: 16 and 3). "
            + _WAN21_ONLY
        )


def convert_vae_state_dict(sd: Mapping) -> dict:
    """Return a Wan 2.1 VAE state dict with our (diffusers) key names, whatever layout it came in.

    Accepts the diffusers `AutoencoderKLWan` layout (returned as is) and the original Wan / ComfyUI
    single-file layout (renamed). Tensors are passed through untouched (no copies). Raises BerniniError
    for anything else, notably Wan 2.2's 48-channel VAE.
    """
    sd = _strip_prefix(sd)
    if "encoder.conv_in.weight" in sd:  # diffusers layout
        _check_wan21(sd, "post_quant_conv.weight", "encoder.conv_in.weight")
        if any(".resnets." in k for k in sd if k.startswith("encoder.down_blocks.")):
            raise BerniniError(f"The VAE has residual down blocks (Wan 2.2 layout). {_WAN21_ONLY}")
        return sd
    if "encoder.conv1.weight" in sd:  # original Wan / ComfyUI layout
        _check_wan21(sd, "conv2.weight", "encoder.conv1.weight")
        if any(k.startswith("encoder.downsamples.") and ".downsamples." in k[len("encoder.downsamples."):] for k in sd):
            raise BerniniError(f"The VAE has nested down blocks (Wan 2.2 layout). {_WAN21_ONLY}")
        num_res_blocks, num_levels = _decoder_structure(sd)
        return {vae_key_from_original(k, num_res_blocks, num_levels): v for k, v in sd.items()}
    sample = ", ".join(sorted(sd)[:3]) or "no keys at all"
    raise BerniniError(f"This file is not a Wan VAE checkpoint (first keys: {sample}). {_WAN21_ONLY}")
