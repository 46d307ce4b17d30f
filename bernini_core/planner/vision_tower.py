"""The Qwen2.5-VL vision tower forward as the official Bernini model computes it, on transformers' modules.

The official planner runs its own copy of the Qwen2.5-VL model (official ``bernini/models/modeling_qwen2_5_vl.py``,
pinned to transformers 4.57.3). Two things there differ from what newer transformers compute, both of which move
bf16 ViT features (and with them every full-Bernini task with a source image or video):

* **Attention** (``Qwen2_5_VLVisionSdpaAttention``): ONE attention call per vision block over every patch of the
  call, with a ``[1, L, L]`` boolean block-diagonal mask built from ``cu_seqlens`` (window blocks: the windows;
  full-attention blocks: one block per image / video frame group). transformers >= 4.57 splits the patches at
  ``cu_seqlens`` and attends chunk by chunk without a mask: the same mathematics through another kernel, ~5e-3
  apart in bf16 on the real weights.
* **Rotary table** (``Qwen2_5_VisionTransformerPretrainedModel.rot_pos_emb``): ``outer(arange(max_grid), inv_freq)``
  in the dtype of ``inv_freq`` — bf16 once the official ``mllm.to(weight_dtype)`` has cast the buffer — and
  ``cos``/``sin`` of that bf16 table. transformers 5.x computes the angles and their cos/sin in float32.

``official_vision_forward`` is that forward, written out; it runs transformers' own patch embedding, block norms
and MLPs and merger (identical code in every supported version). ``use_official_vision_attention`` gives each
vision block of ONE model instance an ``OfficialVisionAttention`` that takes over the block's ``qkv`` / ``proj``
layers (no weight copy; the state-dict keys stay ``visual.blocks.N.attn.qkv.*``), so even a direct
``visual(...)`` call attends the official way. Nothing process-wide is patched. The facts:
docs/official_behaviour.md §3.10.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BerniniError

OFFICIAL_IMPLEMENTATIONS = ("sdpa", "eager")


# --------------------------------------------------------------------------- attention

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The official ``apply_rotary_pos_emb_vision``: rotate in float32, cast back to the input dtype."""
    dtype = q.dtype
    q, k = q.float(), k.float()
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    return (q * cos + _rotate_half(q) * sin).to(dtype), (k * cos + _rotate_half(k) * sin).to(dtype)


def block_diagonal_mask(cu_seqlens: torch.Tensor, length: int, device) -> torch.Tensor:
    """``[1, L, L]`` bool, True inside each ``cu_seqlens`` block: the tensor the official loop fills
    (``mask[..., a:b, a:b] = True`` for consecutive boundaries), built in one comparison."""
    bounds = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = bounds[1:] - bounds[:-1]
    block = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    if block.numel() != length:
        raise ValueError(f"cu_seqlens covers {block.numel()} patches but the vision tower holds {length}.")
    return (block[:, None] == block[None, :]).unsqueeze(0)


class _MaskCache:
    """The masks of one tower call (windows, full), shared by all blocks of one model.

    The blocks of a call receive the same ``cu_seqlens`` tensor objects, so each mask is built once per call
    instead of once per block; the tower's hooks (and ``official_vision_forward``) drop them after the call."""

    def __init__(self):
        self.entries: list[tuple[torch.Tensor, torch.Tensor]] = []

    def get(self, cu_seqlens: torch.Tensor, length: int, device) -> torch.Tensor:
        for key, mask in self.entries:
            if key is cu_seqlens:
                return mask
        mask = block_diagonal_mask(cu_seqlens, length, device)
        self.entries.append((cu_seqlens, mask))
        return mask

    def clear(self, *_args) -> None:
        self.entries.clear()


class OfficialVisionAttention(nn.Module):
    """One vision block's attention, computed as the official ``Qwen2_5_VLVision{Sdpa,}Attention``."""

    def __init__(self, qkv: nn.Module, proj: nn.Module, num_heads: int, implementation: str, masks: _MaskCache):
        super().__init__()
        if implementation not in OFFICIAL_IMPLEMENTATIONS:
            raise ValueError(f"vision attention {implementation!r}: expected one of {OFFICIAL_IMPLEMENTATIONS}")
        self.qkv, self.proj = qkv, proj
        self.num_heads = int(num_heads)
        self.implementation = implementation
        self._masks = masks  # a plain attribute: not a submodule, nothing in the state dict

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                rotary_pos_emb: Optional[torch.Tensor] = None,
                position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None, **_kwargs) -> torch.Tensor:
        length = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        if position_embeddings is None:  # the pre-4.54 calling convention
            emb = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
            position_embeddings = (emb.cos(), emb.sin())
        q, k = _apply_rotary(q, k, *position_embeddings)
        allowed = self._masks.get(cu_seqlens, length, q.device)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, L, head_dim]
        if self.implementation == "sdpa":
            # The official call exactly: 4-D q/k/v, the 3-D boolean mask broadcast over heads, default scale.
            out = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), allowed,
                                                 dropout_p=0.0)
            out = out.squeeze(0).transpose(0, 1)
        else:
            # The official eager path: an additive mask of the dtype's minimum, softmax in float32.
            additive = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
            additive.masked_fill_(~allowed, torch.finfo(q.dtype).min)
            weights = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(q.shape[-1])
            weights = F.softmax(weights + additive, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(weights, v).transpose(0, 1)
        return self.proj(out.reshape(length, -1))


def use_official_vision_attention(visual: nn.Module) -> int:
    """Give every vision block of this tower an ``OfficialVisionAttention``; returns how many were swapped.

    Idempotent. The implementation follows the tower's config ('sdpa' when unset, as the official config)."""
    implementation = getattr(getattr(visual, "config", None), "_attn_implementation", None) or "sdpa"
    if implementation not in OFFICIAL_IMPLEMENTATIONS:
        raise BerniniError(f"The planner's vision tower uses attention {implementation!r}; the official planner runs "
                           "'sdpa' (or 'eager'): load the Qwen model with attn_implementation='sdpa'.")
    masks = getattr(visual, "_bernini_vision_masks", None)
    if masks is None:
        masks = _MaskCache()
        visual._bernini_vision_masks = masks
        visual.register_forward_pre_hook(masks.clear)  # a call that raised leaves nothing stale behind
        visual.register_forward_hook(masks.clear)
    swapped = 0
    for block in visual.blocks:
        attn = block.attn
        if isinstance(attn, OfficialVisionAttention):
            continue
        heads = getattr(attn, "num_heads", None) or visual.config.num_heads
        block.attn = OfficialVisionAttention(attn.qkv, attn.proj, heads, implementation, masks)
        swapped += 1
    return swapped


# --------------------------------------------------------------------------- the tower forward

def _rotary_angles(inv_freq: torch.Tensor, grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """The official ``rot_pos_emb``: (h, w) patch positions in 2×2-merge-block order, repeated per frame group,
    looked up in ``outer(arange(max_grid), inv_freq)`` computed in the dtype of ``inv_freq``."""
    positions = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).unsqueeze(1).expand(-1, w).reshape(h // merge, merge, w // merge, merge)
        cols = torch.arange(w).unsqueeze(0).expand(h, -1).reshape(h // merge, merge, w // merge, merge)
        hw = torch.stack([rows.permute(0, 2, 1, 3).flatten(), cols.permute(0, 2, 1, 3).flatten()], dim=-1)
        positions.append(hw.repeat(t, 1))
    positions = torch.cat(positions).to(inv_freq.device)
    steps = torch.arange(int(grid_thw[:, 1:].max()), device=inv_freq.device, dtype=inv_freq.dtype)
    return torch.outer(steps, inv_freq)[positions].flatten(1)


def _window_order(grid_thw: torch.Tensor, window_size: int, merge: int, patch: int, device):
    """The official ``get_window_index``: merged cells reordered window by window, and the window boundaries
    in patches (int32, consecutive duplicates removed)."""
    order, bounds, offset = [], [0], 0
    cells = window_size // merge // patch
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = cells - gh % cells, cells - gw % cells
        rows, cols = (gh + pad_h) // cells, (gw + pad_w) // cells
        padded = F.pad(index, (0, pad_w, 0, pad_h), "constant", -100)
        padded = padded.reshape(t, rows, cells, cols, cells).permute(0, 1, 3, 2, 4).reshape(t, rows * cols, cells, cells)
        sizes = (padded != -100).sum([2, 3]).reshape(-1)
        flat = padded.reshape(-1)
        order.append(flat[flat != -100] + offset)
        bounds.extend((sizes.cumsum(0) * merge * merge + bounds[-1]).tolist())
        offset += t * gh * gw
    bounds = torch.unique_consecutive(torch.tensor(bounds, device=device, dtype=torch.int32))
    return torch.cat(order).to(device), bounds


def official_vision_forward(visual: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """Merged ViT features ``[Σ t·h·w / 4, out_hidden]`` of a Qwen2.5-VL vision tower, computed as the official
    ``Qwen2_5_VisionTransformerPretrainedModel.forward`` does (the module docstring says where that differs from
    transformers). ``use_official_vision_attention(visual)`` must have been applied."""
    if not all(isinstance(block.attn, OfficialVisionAttention) for block in visual.blocks):
        raise RuntimeError("official_vision_forward needs use_official_vision_attention(visual) first")
    merge = int(visual.spatial_merge_size)
    unit = merge * merge
    grid_thw = grid_thw.reshape(-1, 3).cpu()
    hidden = visual.patch_embed(pixel_values)
    device = hidden.device
    angles = _rotary_angles(visual.rotary_pos_emb.inv_freq, grid_thw, merge)
    window_index, cu_window = _window_order(grid_thw, visual.window_size, merge, visual.patch_size, device)
    cu_full = F.pad(torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).cumsum(0, dtype=torch.int32),
                    (1, 0), value=0).to(device)
    length = hidden.shape[0]
    hidden = hidden.reshape(length // unit, unit, -1)[window_index].reshape(length, -1)
    angles = angles.reshape(length // unit, unit, -1)[window_index].reshape(length, -1)
    emb = torch.cat((angles, angles), dim=-1)
    position_embeddings = (emb.cos(), emb.sin())  # in the table's dtype (bf16 in a bf16 planner), as the official
    full_blocks = set(visual.fullatt_block_indexes)
    masks = visual._bernini_vision_masks
    try:
        for i, block in enumerate(visual.blocks):
            hidden = block(hidden, cu_seqlens=cu_full if i in full_blocks else cu_window,
                           position_embeddings=position_embeddings)
    finally:
        masks.clear()
    merged = visual.merger(hidden)
    return merged[torch.argsort(window_index)]
