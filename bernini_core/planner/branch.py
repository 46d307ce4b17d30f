"""One planner branch (cond / imgcond / uncond) as the template encodes it (docs/official_behaviour.md §3.2–§3.4).

The template (`template.py`) produces these; the planning loop (`maskgit.py`) consumes them.
All tensors are on the CPU until the loop moves them; L is the branch's token count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BRANCHES = ("cond", "imgcond", "uncond")  # the official encoding and forward order (docs/official_behaviour.md §7.1)


@dataclass
class EncodedBranch:
    name: str  # "cond" | "imgcond" | "uncond"
    input_ids: torch.Tensor  # [L] int64; visual pads already replaced by image_pad / video_pad ids
    token_types: torch.Tensor  # [L] int64: 0 text, 1 planning (never produced), 2 visual input, 3 visual output
    segment_ids: torch.Tensor  # [L] int64: visual item number + 1 for visual tokens, own position for text
    visual_input_mask: torch.Tensor  # [L] bool: positions that receive source ViT features
    visual_output_mask: torch.Tensor  # [L] bool: the target positions (planned tokens)
    attention_mask_4d: torch.Tensor  # [L, L] float32 additive mask: 0 = attend, -inf = blocked
    position_ids: torch.Tensor  # [3, L] int64 M-RoPE ids (t, h, w), as transformers' get_rope_index computes
    # Source ViT features in conversation order (videos first, then images), each [n_tokens_i, hidden];
    # empty for imgcond / uncond. Their concatenation fills visual_input_mask positions in order.
    visual_inputs: list = field(default_factory=list)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_target_tokens(self) -> int:
        return int(self.visual_output_mask.sum())
