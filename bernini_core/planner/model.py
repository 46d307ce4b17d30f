"""The planner model: Qwen2.5-VL (transformers) + connector + ViT decoder + the learned mask token
(docs/official_behaviour.md §3).

Attribute names match the official checkpoint prefixes (docs/official_behaviour.md §2.1): ``connector.``,
``vit_decoder.`` and ``mask_tokens`` load as-is; ``mllm`` is a transformers Qwen2.5-VL whose own key layout the
loader maps. Either ``Qwen2_5_VLModel`` (no lm_head, what ``build`` makes: the head is never used,
docs/official_behaviour.md §3.8) or ``Qwen2_5_VLForConditionalGeneration`` is accepted.

transformers versions (official pin 4.57.3; checked on 4.57.3 and 5.23): both take the planner's custom
mask the same way — a **4D** ``[1, 1, L, L]`` additive float mask is returned as-is by ``masking_utils``
(a 2D/3D one would be rebuilt, or fail in 5.x), so ``hidden`` always passes 4D, cast to the activation dtype
as the official SDPA path does; M-RoPE ids go in as ``[3, 1, L]`` int64 and are used as given (both only
split off a 4th "text" row, which we never send). The vision tower is NOT run through transformers' forward:
``vision_tower.official_vision_forward`` computes it as the official model does (one masked attention call per
block, the rotary table in the weights' dtype), on every transformers version. Attention must be "sdpa" or
"eager": FlashAttention cannot take an arbitrary additive mask.
"""

from __future__ import annotations

import threading
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import BerniniError, require
from .branch import EncodedBranch
from .connector import Connector
from .vision_tower import official_vision_forward, use_official_vision_attention
from .vit_decoder import ViTDecoder

SUPPORTED_ATTENTION = (None, "sdpa", "eager")


class _StopForward(Exception):
    """Raised by the last decoder layer's pre-hook once its input (= hidden_states[-2]) is captured."""


def _inner(mllm: nn.Module) -> nn.Module:
    """The Qwen2_5_VLModel inside a ForConditionalGeneration (transformers >= 4.52), or the model itself."""
    inner = getattr(mllm, "model", None)
    return inner if inner is not None and hasattr(inner, "language_model") else mllm


def _text_config(config):
    return getattr(config, "text_config", None) or config


class PlannerModel(nn.Module):
    def __init__(self, mllm: nn.Module, connector: Connector, vit_decoder: ViTDecoder,
                 mask_tokens: torch.Tensor):
        super().__init__()
        self.mllm = mllm
        self.connector = connector
        self.vit_decoder = vit_decoder
        self.mask_tokens = mask_tokens if isinstance(mask_tokens, nn.Parameter) else nn.Parameter(
            mask_tokens, requires_grad=False)
        inner = _inner(mllm)
        require(hasattr(inner, "language_model") and hasattr(inner, "visual"),
                f"The planner MLLM must be a transformers Qwen2.5-VL model (>= 4.52, with .visual and "
                f".language_model); got {type(mllm).__name__}. Install transformers 4.57.x or 5.x.")
        attention = getattr(_text_config(inner.language_model.config), "_attn_implementation", None)
        if attention not in SUPPORTED_ATTENTION:
            raise BerniniError(
                f"The planner needs attn_implementation 'sdpa' or 'eager' (it passes a custom 4D additive mask, "
                f"docs/official_behaviour.md §3.3), but the Qwen model uses {attention!r}; load it with "
                f"attn_implementation='sdpa'.")
        # The vision blocks attend as the official model does (one masked call per block), not as transformers
        # does (one call per chunk): a different kernel and ~5e-3 apart in bf16. Scoped to this instance.
        use_official_vision_attention(inner.visual)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, mllm_config, *, num_mask_tokens: int, gen_dim: int = 4096, vit_dim: Optional[int] = None,
              decoder_width: int = 4096, decoder_depth: int = 16, ops=None, device=None,
              mllm_dtype: torch.dtype = torch.bfloat16, head_dtype: torch.dtype = torch.float32,
              attn_implementation: str = "sdpa") -> "PlannerModel":
        """Modules shaped from a ``Qwen2_5_VLConfig`` and config.json's clip_diff_cfg / connector_cfg
        (docs/official_behaviour.md §2.1).

        Dtypes after the official loader (docs/official_behaviour.md §7.3): Qwen in ``mllm_dtype``; connector, ViT
        decoder and mask_tokens in ``head_dtype`` (fp32) until ``prepare_heads`` casts them for a run. Pass
        ``device="meta"`` to build without memory and fill the weights with a loader afterwards.
        """
        from transformers import Qwen2_5_VLModel  # the package imports without transformers' VL classes

        hidden = _text_config(mllm_config).hidden_size
        vit_dim = hidden if vit_dim is None else vit_dim
        with torch.device(device if device is not None else "cpu"):
            mllm = Qwen2_5_VLModel._from_config(mllm_config, attn_implementation=attn_implementation)
        mllm = mllm.to(mllm_dtype).eval()
        factory = {"device": device, "dtype": head_dtype}
        connector = Connector(hidden, gen_dim, vit_dim, ops=ops, **factory)
        decoder = ViTDecoder(target_channels=vit_dim, z_channels=vit_dim, width=decoder_width, depth=decoder_depth,
                             ops=ops, **factory)
        mask_tokens = nn.Parameter(torch.zeros(1, num_mask_tokens, hidden, **factory), requires_grad=False)
        return cls(mllm, connector.eval(), decoder.eval(), mask_tokens)

    @property
    def language_model(self) -> nn.Module:
        """The Qwen text decoder (a property, so its weights appear once in state_dict, under mllm.)."""
        return _inner(self.mllm).language_model

    @property
    def visual(self) -> nn.Module:
        return _inner(self.mllm).visual

    @property
    def hidden_size(self) -> int:
        return int(self.mask_tokens.shape[-1])

    @torch.no_grad()
    def prepare_heads(self, dtype: torch.dtype) -> None:
        """Cast connector and ViT decoder to the run dtype in place, as the official __call__ does
        (docs/official_behaviour.md §7.3).

        One tensor at a time (no second copy); a no-op when they already have that dtype.
        """
        for module in (self.connector, self.vit_decoder):
            for param in module.parameters():
                if param.dtype != dtype and param.is_floating_point():
                    param.data = param.data.to(dtype)

    # ------------------------------------------------------------------ forwards
    @torch.no_grad()
    def vision_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Qwen vision tower + 2x2 merger output (3584-d in the 7B model), split per image / video
        (docs/official_behaviour.md §3.1), computed as the official model computes it
        (``vision_tower.official_vision_forward``)."""
        param = next(self.visual.parameters())
        grid_thw = torch.as_tensor(grid_thw, dtype=torch.long).reshape(-1, 3)
        require(pixel_values.dim() == 2 and pixel_values.shape[0] == int(grid_thw.prod(-1).sum()),
                f"vision features: grid_thw {grid_thw.tolist()} implies {int(grid_thw.prod(-1).sum())} patches but "
                f"pixel_values has shape {tuple(pixel_values.shape)}; pixel_values and grid_thw come from different "
                "inputs.")
        # The official forward, not transformers' (vision_tower.py: attention kernel and rotary table differ).
        merged = official_vision_forward(self.visual, pixel_values.to(device=param.device, dtype=param.dtype),
                                         grid_thw)
        merge = int(getattr(self.visual, "spatial_merge_size", 2))
        sizes = (grid_thw.prod(-1) // (merge * merge)).tolist()
        require(sum(sizes) == merged.shape[0],
                f"vision features: grid_thw {grid_thw.tolist()} implies {sum(sizes)} tokens but the vision "
                f"tower returned {merged.shape[0]}; pixel_values and grid_thw come from different inputs.")
        return list(torch.split(merged, sizes, dim=0))

    @torch.no_grad()
    def input_embeds(self, branch: EncodedBranch, *, dtype: Optional[torch.dtype] = None,
                     device=None) -> torch.Tensor:
        """[1, L, hidden] inputs: token embeddings, source ViT features at visual_input_mask positions (in
        order), the mask token ``mask_tokens[:, :1]`` at every target position (official
        format_mllm_inputs_embeds + post_process_input_embeds(inference=True))."""
        embed = self.language_model.get_input_embeddings()
        device = torch.device(device) if device is not None else embed.weight.device
        dtype = dtype or embed.weight.dtype
        embeds = embed(branch.input_ids.to(embed.weight.device)[None]).to(device=device, dtype=dtype)
        input_mask = branch.visual_input_mask.to(device)
        n_inputs = int(branch.visual_input_mask.sum())
        if branch.visual_inputs:
            features = torch.cat([f.reshape(-1, f.shape[-1]) for f in branch.visual_inputs], dim=0)
            require(features.shape[0] == n_inputs,
                    f"branch '{branch.name}': {n_inputs} visual input tokens but {features.shape[0]} ViT features; "
                    f"the source features do not belong to this encoding.")
            embeds[0, input_mask] = features.to(device=device, dtype=dtype)
        else:
            require(n_inputs == 0, f"branch '{branch.name}' has {n_inputs} visual input tokens but no ViT features.")
        embeds[0, branch.visual_output_mask.to(device)] = self.mask_tokens[0, 0].to(device=device, dtype=dtype)
        return embeds

    @staticmethod
    def attention_inputs(branch: EncodedBranch, *, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The branch's additive mask as [1, 1, L, L] in ``dtype`` and M-RoPE ids as [3, 1, L] int64."""
        mask = branch.attention_mask_4d.to(device=device, dtype=dtype).reshape(1, 1, branch.length, branch.length)
        position_ids = branch.position_ids.to(device=device, dtype=torch.long).reshape(3, 1, branch.length)
        return mask, position_ids

    @torch.no_grad()
    def hidden(self, inputs_embeds: torch.Tensor, branch: EncodedBranch, *,
               attention: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """hidden_states[-2] of the Qwen language model: the input of its last decoder layer
        (docs/official_behaviour.md §3.1).

        The forward stops there (a pre-hook on the last layer), so the last layer and the final norm —
        whose outputs the planner never reads — are not computed. ``attention`` = precomputed
        ``attention_inputs(branch, ...)`` to avoid rebuilding the mask every step.
        """
        if attention is None:
            attention = self.attention_inputs(branch, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        mask, position_ids = attention
        captured: list[torch.Tensor] = []
        caller = threading.get_ident()

        def capture(_module, args, kwargs):
            if threading.get_ident() != caller:  # another thread's forward of a planner shared by two pipelines
                return
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _StopForward

        handle = self.language_model.layers[-1].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.language_model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                                use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        require(len(captured) == 1, "The Qwen language model did not reach its last decoder layer.")
        return captured[0]
