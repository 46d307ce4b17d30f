"""One Wan DiT expert from a GGUF file, in the layout ComfyUI-GGUF reads (and QuantStack / city96 publish):
original Wan tensor names (a ``model.diffusion_model.`` prefix is stripped if present; diffusers names work too),
architecture "wan", block-quantised 2-D Linear weights, F32/F16/BF16 biases, norms and modulation, and the 5-D
patch embedding stored as is or flattened with ``comfy.gguf.orig_shape.*`` metadata.

Linear weights of a block type stay packed in memory (:class:`~.layers.GGUFLinear`); any other packed tensor
(rare: a quantised patch embedding or norm) is dequantised once at load, and float tensors follow the usual dtype
policy (fp32 islands kept). The model is built on meta and filled tensor by tensor by ``checkpoints.load_weights_``.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from ..checkpoints import load_weights_
from ..errors import BerniniError
from ..keymaps.wan_dit import (comfy_prefix, dit_key_from_original, is_diffusers_dit_keys, is_original_wan_keys,
                               strip_comfy_prefix)
from ..renderer.config import DiTConfig
from ..renderer.transformer import BerniniDiT, is_fp32_param
from .dequant import FLOAT_TYPES, dequantize
from .layers import GGUFLinear, gguf_ops
from .reader import ORIG_SHAPE_PREFIX, GGUFContents, GGUFTensor, check_tensor_types, read_gguf

WAN_ARCHITECTURE = "wan"  # ComfyUI-GGUF's name for every Wan 2.x DiT
# Files written by stable-diffusion.cpp declare no architecture, some tools "pig": judged by their tensor names.
_UNDECLARED = (None, "pig")
_TEXT_ARCHITECTURES = {"t5", "t5encoder", "llama", "qwen2", "qwen2vl", "qwen3", "gemma2", "gemma3", "umt5"}


def load_gguf_dit(
    path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    keep_fp32_islands: bool = True,
    head_dim: int = 128,
    ops=None,
    attention: str = "auto",
    config: Optional[DiTConfig] = None,
) -> BerniniDiT:
    """A BerniniDiT from a Wan DiT GGUF file: packed Linear weights dequantised per call to the activation dtype
    (`dtype`), other tensors in `dtype` (fp32 islands in fp32 with `keep_fp32_islands`). `config`: the DiT
    config when known (a split release's base folder); None infers it from the tensor shapes (`head_dim` per
    head, 128 in every released Wan). `ops`: the base layer namespace (Linear is replaced)."""
    contents = read_gguf(path, check_types=False)
    names = [t.name for t in contents.tensors]
    _check_architecture(contents, names)  # first: a llama file's types would be a confusing complaint
    check_tensor_types(contents)
    key_map = _key_map(names)
    targets = {t.name: key_map(t.name) for t in contents.tensors}
    if config is None:
        config = _infer_config(contents, targets, head_dim)
    model = BerniniDiT(config, ops=gguf_ops(ops), device="meta")
    packed = _expect_packed_(model, contents, targets)

    def dtype_for(name: str) -> torch.dtype:
        return torch.float32 if keep_fp32_islands and is_fp32_param(name) else dtype

    load_weights_(model, _tensors(contents.tensors, packed), dtype_for=dtype_for, key_map=targets.get,
                  origin=str(contents.path))
    model.set_attention_backend(attention)
    model.compute_dtype = dtype  # packed weights carry no float dtype to infer the activations' from
    return model.eval().requires_grad_(False)


def _key_map(names: list):
    """GGUF tensor name -> our (diffusers) parameter name."""
    prefix = comfy_prefix(names)
    original = is_original_wan_keys(names)

    def key_map(name: str) -> str:
        bare = strip_comfy_prefix(name, prefix)
        return dit_key_from_original(bare) if original else bare

    return key_map


def _check_architecture(contents: GGUFContents, names: list) -> None:
    arch = contents.architecture
    if arch == WAN_ARCHITECTURE:
        return
    if arch in _UNDECLARED:
        if is_original_wan_keys(names) or is_diffusers_dit_keys(names):
            return
        raise BerniniError(f"GGUF file '{contents.path}' declares no architecture and its tensors are not those of a "
                           f"Wan diffusion model (first: {', '.join(names[:3]) or 'none'}); load a Wan2.2 / Bernini-R "
                           "expert GGUF (architecture 'wan').")
    kind = "a text encoder or language model" if arch.lower() in _TEXT_ARCHITECTURES else "another kind of model"
    raise BerniniError(f"GGUF file '{contents.path}' holds a '{arch}' model ({kind}, per its general.architecture), "
                       "not a Wan diffusion model; the renderer experts are Wan2.2 / Wan2.1 DiT GGUFs (architecture "
                       "'wan', e.g. the Bernini-R or Wan2.2-T2V-A14B high/low-noise GGUFs).")


def _infer_config(contents: GGUFContents, targets: dict, head_dim: int) -> DiTConfig:
    from ..loaders import dit_config_from_weights

    shapes = {targets[t.name]: t.shape for t in contents.tensors}
    patch = shapes.get("patch_embedding.weight")
    if patch is not None and len(patch) != 5:
        raise BerniniError(f"GGUF file '{contents.path}' stores patch_embedding.weight as {list(patch)} without the "
                           f"'{ORIG_SHAPE_PREFIX}patch_embedding.weight' metadata that gives its 5-D shape; convert "
                           "the model again with ComfyUI-GGUF's tools (or a converter that writes that metadata).")
    try:
        return dit_config_from_weights(shapes, head_dim)
    except BerniniError as exc:
        raise BerniniError(f"GGUF file '{contents.path}': {exc}") from None


def _expect_packed_(model: torch.nn.Module, contents: GGUFContents, targets: dict) -> set:
    """Turn the GGUFLinear layers whose weight the file holds packed into placeholders for those bytes; returns
    the names of the tensors that load packed."""
    modules = dict(model.named_modules())
    packed = set()
    for tensor in contents.tensors:
        if not tensor.packed:
            continue
        owner_path, _, leaf = targets[tensor.name].rpartition(".")
        layer = modules.get(owner_path)
        if leaf != "weight" or not isinstance(layer, GGUFLinear):
            continue  # not a Linear weight (or unknown: load_weights_ names it): dequantised at load
        if tuple(tensor.shape) != layer.weight_shape:
            raise BerniniError(f"'{tensor.name}' in {contents.path} has shape {tuple(tensor.shape)} but the model "
                               f"expects {layer.weight_shape} for '{targets[tensor.name]}'; the file belongs to a "
                               "different model size or config than the one being built.")
        layer.expect_packed(tensor.qtype, tensor.data.shape)
        packed.add(tensor.name)
    return packed


def _tensors(tensors: list, packed: set) -> Iterator[dict]:
    """{name: tensor} one tensor at a time, copied out of the memory map: packed bytes as uint8 for the names in
    `packed`, everything else as float values of its logical shape."""
    for tensor in tensors:
        yield {tensor.name: _torch_value(tensor, tensor.name in packed)}


def _torch_value(tensor: GGUFTensor, keep_packed: bool) -> torch.Tensor:
    raw = torch.from_numpy(np.array(tensor.data))  # a private copy: nothing keeps the file mapped
    if keep_packed:
        return raw
    if tensor.qtype in FLOAT_TYPES:
        return raw.reshape(-1).view(torch.uint8).view(FLOAT_TYPES[tensor.qtype][1]).reshape(tensor.shape)
    return dequantize(raw, tensor.qtype, tensor.shape)
