"""Wan DiT parameter names: original Wan / ComfyUI  <->  diffusers ``WanTransformer3DModel``.

Our DiT uses the diffusers names (docs/wan_qwen.md §1.3). ComfyUI single files and the
original Wan release use the original module names. The map works on module
paths, so any leaf is carried along unchanged: ``weight``/``bias`` and also the
fp8 side tensors (``scale_weight``, ``weight_scale``, ``comfy_quant``).

The one trap (docs/wan_qwen.md §1.3): the original block order is norm1, norm3, norm2,
so the affine LayerNorm before cross-attention is ``norm3`` in the original and
``norm2`` in diffusers (and the parameter-free ones swap the other way).
"""

from typing import Iterable, Optional

# Module paths outside the blocks (original -> diffusers).
_GLOBAL_TO_DIFFUSERS = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
    # Wan2.1 I2V / FLF2V image branch (not in Wan2.2 A14B; kept so such files map cleanly).
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
}

# Module paths inside ``blocks.<i>.`` (original -> diffusers).
_BLOCK_TO_DIFFUSERS = {
    "modulation": "scale_shift_table",
    "norm1": "norm1",
    "norm2": "norm3",  # parameter-free LN before the FFN
    "norm3": "norm2",  # affine LN before cross-attention (the trap)
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
for _orig, _diff in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    _BLOCK_TO_DIFFUSERS.update({
        f"{_orig}.q": f"{_diff}.to_q",
        f"{_orig}.k": f"{_diff}.to_k",
        f"{_orig}.v": f"{_diff}.to_v",
        f"{_orig}.o": f"{_diff}.to_out.0",
        f"{_orig}.norm_q": f"{_diff}.norm_q",
        f"{_orig}.norm_k": f"{_diff}.norm_k",
    })
_BLOCK_TO_DIFFUSERS.update({
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
})

_GLOBAL_TO_ORIGINAL = {v: k for k, v in _GLOBAL_TO_DIFFUSERS.items()}
_BLOCK_TO_ORIGINAL = {v: k for k, v in _BLOCK_TO_DIFFUSERS.items()}

# Prefixes ComfyUI (and some trainers) put in front of the DiT keys, most specific first.
COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


def _rename_path(path: str, table: dict) -> Optional[str]:
    """Rename the longest module path of ``table`` that ``path`` starts with (on dot boundaries)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return ".".join([table[head]] + parts[cut:])
    return None


def _convert(key: str, global_table: dict, block_table: dict) -> str:
    if key.startswith("blocks."):
        parts = key.split(".", 2)
        if len(parts) == 3 and parts[1].isdigit():
            renamed = _rename_path(parts[2], block_table)
            if renamed is not None:
                return f"blocks.{parts[1]}.{renamed}"
        return key
    renamed = _rename_path(key, global_table)
    return key if renamed is None else renamed


def dit_key_from_original(key: str) -> str:
    """Original Wan / ComfyUI DiT key -> diffusers key. Unknown keys pass through unchanged."""
    return _convert(key, _GLOBAL_TO_DIFFUSERS, _BLOCK_TO_DIFFUSERS)


def dit_key_to_original(key: str) -> str:
    """diffusers DiT key -> original Wan / ComfyUI key. Unknown keys pass through unchanged."""
    return _convert(key, _GLOBAL_TO_ORIGINAL, _BLOCK_TO_ORIGINAL)


def comfy_prefix(keys: Iterable[str]) -> str:
    """The wrapper prefix (``model.diffusion_model.`` ...) every DiT key carries, or "".

    A prefix counts only when every key that is not a loose marker (``scaled_fp8``)
    starts with it, so a bare Wan file whose keys happen to start with "model" is
    never cut.
    """
    keys = [k for k in keys if k != "scaled_fp8"]
    for prefix in COMFY_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def strip_comfy_prefix(key: str, prefix: str) -> str:
    return key[len(prefix):] if prefix and key.startswith(prefix) else key


def is_original_wan_keys(keys: Iterable[str]) -> bool:
    """True when the (prefix-stripped or not) keys use the original Wan module names."""
    keys = list(keys)
    prefix = comfy_prefix(keys)
    markers = ("head.head.", "head.modulation", "text_embedding.0.", "time_projection.1.")
    for key in keys:
        bare = strip_comfy_prefix(key, prefix)
        if bare.startswith(markers):
            return True
        if bare.startswith("blocks.") and (".self_attn." in bare or ".cross_attn." in bare):
            return True
    return False


def is_diffusers_dit_keys(keys: Iterable[str]) -> bool:
    """True when the keys look like diffusers ``WanTransformer3DModel`` parameter names."""
    keys = list(keys)
    prefix = comfy_prefix(keys)
    for key in keys:
        bare = strip_comfy_prefix(key, prefix)
        if bare.startswith(("condition_embedder.", "proj_out.")):
            return True
        if bare.startswith("blocks.") and (".attn1." in bare or ".attn2." in bare):
            return True
    return False
