"""The renderer DiT: a Wan T2V transformer run "in context" over several latent streams.

Parameter names are exactly diffusers' ``WanTransformer3DModel`` state-dict keys (docs/wan_qwen.md §1.3), so
diffusers checkpoints and the official ``diff_dec.transformer.<key>`` tensors load as-is.

Bernini behaviour (docs/official_behaviour.md §4.2–§4.4): each stream (source images/videos, noisy target last)
is patch-embedded on its own with the shared Conv3d and the token blocks are concatenated; every
token gets the same timestep modulation; self-attention is full over all tokens with per-stream
3D RoPE x source-id phase; cross-attention sees the text context zero-padded to >= 512 rows (never
truncated); only the target's tokens are projected out.

Precision mirrors the official/diffusers block: LayerNorms run in fp32 on ``.float()`` input, the
AdaLN modulation and residual gates in fp32, results cast back to the activation dtype
(docs/official_behaviour.md §7.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BerniniError
from ..ops import resolve_ops
from .attention import attention, check_backend, resolve_attention
from .config import DiTConfig
from .rope import RopeTableCache, apply_rope

# Name components (matched against ``name.split(".")``, as diffusers' _keep_in_fp32_modules is) of the
# parameters Bernini-R keeps in fp32 while the rest is bf16 (docs/official_behaviour.md §7.3). time_proj is NOT among
# them.
FP32_PARAM_PATTERNS: tuple[str, ...] = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")

MIN_CONTEXT_ROWS = 512  # Wan pads T5 features to 512 rows; padded rows are attended (docs/official_behaviour.md §4.4)
_HALF_OR_FULL = (torch.float32, torch.bfloat16, torch.float16)


def is_fp32_param(name: str) -> bool:
    parts = name.split(".")
    return any(pattern in parts for pattern in FP32_PARAM_PATTERNS)


@torch.no_grad()
def cast_dit_(model: nn.Module, dtype: torch.dtype, keep_fp32_islands: bool) -> nn.Module:
    """Cast parameters in place, one tensor at a time (no second copy of the model).

    keep_fp32_islands=True: Bernini-R policy (bf16 except FP32_PARAM_PATTERNS in fp32);
    False: full-Bernini policy (everything in ``dtype``), docs/official_behaviour.md §7.3.
    """
    for name, param in model.named_parameters():
        target = torch.float32 if keep_fp32_islands and is_fp32_param(name) else dtype
        if param.dtype != target:
            param.data = param.data.to(target)
    return model


def _layer_norm_fp32(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm of x.float() with fp32 statistics and affine params (diffusers FP32LayerNorm)."""
    x = x.float()
    if isinstance(norm, nn.Identity):
        return x
    weight = getattr(norm, "weight", None)
    if type(norm) is nn.LayerNorm and weight is not None and weight.dtype != torch.float32:
        # plain torch refuses fp32 input with bf16 params; an ops LayerNorm casts by itself.
        return F.layer_norm(x, norm.normalized_shape, weight.float(),
                            None if norm.bias is None else norm.bias.float(), norm.eps)
    return norm(x)


class RMSNormAcrossHeads(nn.Module):
    """RMSNorm over the whole q or k projection (all heads), as diffusers' RMSNorm computes it."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        normed = x * torch.rsqrt(variance + self.eps)
        weight = self.weight.to(device=x.device)
        out_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else x.dtype
        return normed.to(out_dtype) * weight.to(out_dtype)


class DiTAttention(nn.Module):
    """Self- (context=None, with RoPE) or cross-attention with q/k RMSNorm across heads."""

    def __init__(self, dim: int, heads: int, eps: float, ops, factory: dict):
        super().__init__()
        self.heads = heads
        self.to_q = ops.Linear(dim, dim, bias=True, **factory)
        self.to_k = ops.Linear(dim, dim, bias=True, **factory)
        self.to_v = ops.Linear(dim, dim, bias=True, **factory)
        self.to_out = nn.ModuleList([ops.Linear(dim, dim, bias=True, **factory), nn.Identity()])  # [1] = dropout
        self.norm_q = RMSNormAcrossHeads(dim, eps, **factory)
        self.norm_k = RMSNormAcrossHeads(dim, eps, **factory)

    def forward(self, x, context=None, rope_freqs=None, key_mask=None, backend=None, sequence_parallel=None):
        """sequence_parallel: self-attention over a sequence shard (see attention()); ignored for cross-attention,
        whose queries stay sharded and whose keys are the whole context."""
        source = x if context is None else context
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.heads, -1))
        k = self.norm_k(self.to_k(source)).unflatten(-1, (self.heads, -1))
        v = self.to_v(source).unflatten(-1, (self.heads, -1))
        if rope_freqs is not None:
            q = apply_rope(q, rope_freqs)
            k = apply_rope(k, rope_freqs)
        out = attention(q, k, v, key_mask=key_mask, backend=backend,
                        sequence_parallel=sequence_parallel if context is None else None)
        return self.to_out[0](out.flatten(2).to(q.dtype))


class GeluTanhProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, ops, factory: dict):
        super().__init__()
        self.proj = ops.Linear(dim_in, dim_out, bias=True, **factory)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, ops, factory: dict):
        super().__init__()
        # net.0 = projection + GELU(tanh), net.1 = dropout placeholder, net.2 = output (diffusers names)
        self.net = nn.ModuleList([GeluTanhProjection(dim, ffn_dim, ops, factory), nn.Identity(),
                                  ops.Linear(ffn_dim, dim, bias=True, **factory)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, ops, factory: dict):
        super().__init__()
        dim = cfg.inner_dim
        self.norm1 = ops.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False, **factory)
        self.attn1 = DiTAttention(dim, cfg.num_attention_heads, cfg.eps, ops, factory)
        self.attn2 = DiTAttention(dim, cfg.num_attention_heads, cfg.eps, ops, factory)
        self.norm2 = (ops.LayerNorm(dim, eps=cfg.eps, elementwise_affine=True, **factory)
                      if cfg.cross_attn_norm else nn.Identity())
        self.ffn = FeedForward(dim, cfg.ffn_dim, ops, factory)
        self.norm3 = ops.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False, **factory)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim, **factory) / dim**0.5)

    def forward(self, x, context, modulation, rope_freqs, context_key_mask=None, backend=None,
                sequence_parallel=None):
        table = self.scale_shift_table.to(device=x.device, dtype=torch.float32)
        shift, scale, gate, ffn_shift, ffn_scale, ffn_gate = (table + modulation.float()).chunk(6, dim=1)
        dtype = x.dtype

        h = (_layer_norm_fp32(self.norm1, x) * (1 + scale) + shift).to(dtype)
        x = (x.float() + self.attn1(h, rope_freqs=rope_freqs, backend=backend,
                                    sequence_parallel=sequence_parallel) * gate).to(dtype)

        h = _layer_norm_fp32(self.norm2, x).to(dtype)
        x = x + self.attn2(h, context=context, key_mask=context_key_mask, backend=backend)

        h = (_layer_norm_fp32(self.norm3, x) * (1 + ffn_scale) + ffn_shift).to(dtype)
        return (x.float() + self.ffn(h).float() * ffn_gate).to(dtype)


class TimeEmbedder(nn.Module):
    def __init__(self, freq_dim: int, dim: int, ops, factory: dict):
        super().__init__()
        self.linear_1 = ops.Linear(freq_dim, dim, bias=True, **factory)
        self.linear_2 = ops.Linear(dim, dim, bias=True, **factory)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TextProjection(nn.Module):
    def __init__(self, text_dim: int, dim: int, ops, factory: dict):
        super().__init__()
        self.linear_1 = ops.Linear(text_dim, dim, bias=True, **factory)
        self.linear_2 = ops.Linear(dim, dim, bias=True, **factory)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class ConditionEmbedder(nn.Module):
    def __init__(self, cfg: DiTConfig, ops, factory: dict):
        super().__init__()
        dim = cfg.inner_dim
        self.freq_dim = cfg.freq_dim
        self.time_embedder = TimeEmbedder(cfg.freq_dim, dim, ops, factory)
        self.time_proj = ops.Linear(dim, 6 * dim, bias=True, **factory)
        self.text_embedder = TextProjection(cfg.text_dim, dim, ops, factory)
        self._sinusoid_cache: dict = {}

    def _sinusoid(self, timestep: torch.Tensor) -> torch.Tensor:
        """[cos, sin] features of the raw timestep in fp32 (diffusers Timesteps, flip_sin_to_cos, shift 0)."""
        key = str(timestep.device)
        frequencies = self._sinusoid_cache.get(key)
        if frequencies is None:
            half = self.freq_dim // 2
            exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
            frequencies = self._sinusoid_cache[key] = torch.exp(exponent)
        angles = timestep.float()[:, None] * frequencies[None, :]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)

    def time(self, timestep: torch.Tensor, dtype: torch.dtype):
        """(temb [B, D], modulation [B, 6, D]) in ``dtype``."""
        features = self._sinusoid(timestep)
        embedder_dtype = self.time_embedder.linear_1.weight.dtype
        # the official code feeds the embedder in its own dtype (fp32 island or bf16); quantised
        # weights (fp8 under ComfyUI) compute in the activation dtype instead.
        features = features.to(embedder_dtype if embedder_dtype in _HALF_OR_FULL else dtype)
        temb = self.time_embedder(features).to(dtype)  # official: .type_as(text context)
        modulation = self.time_proj(F.silu(temb))
        return temb, modulation.unflatten(1, (6, -1))


@dataclass
class EmbeddedContext:
    """Text context after zero-padding and the DiT's text projection (constant across steps)."""

    hidden: torch.Tensor  # [B, rows, dim]
    key_mask: Optional[torch.Tensor]  # [B, rows] bool or None


@dataclass
class EmbeddedTime:
    """One denoising step's timestep embedding (``BerniniDiT.embed_time``): the same for every guidance arm of the
    step, so a sampler computes it once per step and expert instead of once per forward."""

    timestep: torch.Tensor  # the tensor it was made from (forward checks it is the one it is given)
    temb: torch.Tensor  # [B, D] in the compute dtype (the output norm's modulation)
    modulation: torch.Tensor  # [B, 6, D] (the blocks' AdaLN shift/scale/gate)


class BerniniDiT(nn.Module):
    """Wan2.2-A14B / Wan2.1-1.3B DiT with Bernini's in-context streams and SA-3D RoPE."""

    def __init__(self, config: DiTConfig, ops=None, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, DiTConfig):
            raise BerniniError(f"BerniniDiT needs a DiTConfig, got {type(config).__name__}.")
        self.config = config
        ops = resolve_ops(ops)
        factory = {"device": device, "dtype": dtype}
        dim = config.inner_dim
        self.patch_embedding = ops.Conv3d(config.in_channels, dim, kernel_size=config.patch_size,
                                          stride=config.patch_size, **factory)
        self.condition_embedder = ConditionEmbedder(config, ops, factory)
        self.blocks = nn.ModuleList([DiTBlock(config, ops, factory) for _ in range(config.num_layers)])
        self.norm_out = ops.LayerNorm(dim, eps=config.eps, elementwise_affine=False, **factory)
        self.proj_out = ops.Linear(dim, config.out_channels * math.prod(config.patch_size), bias=True, **factory)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim, **factory) / dim**0.5)
        self.rope_cache = RopeTableCache(config.attention_head_dim, config.rope_max_seq_len)
        self.attention_backend = "auto"
        self.sequence_parallel = None  # a UlyssesAttention (bernini_core/parallel/ulysses.py) or None: plain
        self._compute_dtype: Optional[torch.dtype] = None

    # ------------------------------------------------------------------ settings
    def set_attention_backend(self, name: str) -> None:
        """Select the attention kernel ("sdpa", "flash", "sage", "auto"); BerniniError if unknown/missing."""
        self.attention_backend = check_backend(name)

    def use_sequence_parallel(self, handler) -> None:
        """Shard this instance's forwards over a Ulysses group (``ParallelState.sequence_parallel()``, a
        ``UlyssesAttention``); None restores the plain forward. Only this instance is affected. Every rank of the
        group must then call forward with the same inputs; each gets the whole output (docs/architecture.md §5.1).
        """
        if handler is not None:
            check_heads = getattr(handler, "check_heads", None)
            if check_heads is not None:
                check_heads(self.config.num_attention_heads)  # BerniniError naming the sizes that fit
        self.sequence_parallel = handler

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype: the patch-embedding weight dtype unless set (e.g. bf16 for fp8 weights)."""
        if self._compute_dtype is not None:
            return self._compute_dtype
        weight_dtype = self.patch_embedding.weight.dtype
        return weight_dtype if weight_dtype in _HALF_OR_FULL else torch.bfloat16

    @compute_dtype.setter
    def compute_dtype(self, dtype: Optional[torch.dtype]) -> None:
        self._compute_dtype = dtype

    def working_memory(self, tokens: int, context_rows: int = 512) -> int:
        """Bytes of activations one forward over `tokens` video tokens needs beside the weights (an estimate for
        the memory manager): hidden state, q/k/v, attention output, the FFN hidden (ffn/dim wide) and casts."""
        cfg, dtype_bytes = self.config, torch.finfo(self.compute_dtype).bits // 8
        per_token = cfg.inner_dim * (6 + 2 * cfg.ffn_dim / cfg.inner_dim) * dtype_bytes
        return int(tokens * per_token + 4 * context_rows * cfg.inner_dim * dtype_bytes)

    # ------------------------------------------------------------------ forward
    def forward(self, streams: Sequence[torch.Tensor], source_ids: Sequence[float], timestep: torch.Tensor,
                context: torch.Tensor, context_lens: Optional[Sequence[int]] = None, *,
                embedded_time: Optional[EmbeddedTime] = None) -> torch.Tensor:
        """Velocity of the target (last) stream, [B, out_channels, T, H, W] in the target's dtype.

        streams: latents [B, in_channels, T_i, H_i, W_i], sources first, noisy target last.
        source_ids: one float per stream (target normally 0.0). timestep: [B] values in 0..1000.
        context: [B, L, text_dim]; context_lens: per-sample valid rows when L is a common padded length.
        embedded_time: ``embed_time(timestep)`` made once for all forwards of a step (or pass it as `timestep`).
        """
        grids = self._check_streams(streams, source_ids)
        target = streams[-1]
        dtype = self.compute_dtype
        device = target.device
        batch = target.shape[0]

        if isinstance(timestep, EmbeddedTime):
            timestep, embedded_time = timestep.timestep, timestep
        if embedded_time is None:
            embedded_time = self.embed_time(timestep, batch=batch, device=device)
        elif embedded_time.timestep is not timestep or embedded_time.modulation.shape[0] != batch:
            raise BerniniError(
                f"embedded_time: made from another timestep tensor or for batch {embedded_time.modulation.shape[0]} "
                f"(streams have batch {batch}); pass embed_time(timestep) of this very timestep tensor.")

        x = torch.cat([self.patch_embedding(s.to(dtype)).flatten(2).transpose(1, 2) for s in streams], dim=1)
        x = x.contiguous()
        rope_freqs = self.rope_cache.get(grids, source_ids, device)
        attention_kernel = resolve_attention(self.attention_backend, device, dtype)  # once, outside the blocks
        temb, modulation = embedded_time.temb, embedded_time.modulation
        if not isinstance(context, EmbeddedContext):
            context = self.embed_context(context, context_lens, device=device)
        elif context.hidden.shape[0] != batch:
            raise BerniniError(f"context: embedded for batch {context.hidden.shape[0]}, streams have batch {batch}.")
        context, key_mask = context.hidden, context.key_mask

        parallel, attend = self.sequence_parallel, None
        if parallel is not None:
            # Ulysses: this rank keeps its slice of the (zero-padded) token sequence and the matching RoPE rows;
            # per-sample modulation and the text context stay whole.
            x, length = parallel.shard(x, dim=1)
            rope_freqs, _ = parallel.shard(rope_freqs, dim=0)
            attend = parallel.bind(length)
        swap = getattr(self, "block_swap", None)  # acceleration/block_swap.py streams host-held blocks in
        for block in (self.blocks if swap is None else swap.blocks()):
            x = block(x, context, modulation, rope_freqs, key_mask, attention_kernel, sequence_parallel=attend)
        if parallel is not None:
            x = parallel.gather(x, length, dim=1)

        frames, rows, cols = grids[-1]
        x = x[:, -frames * rows * cols:]
        shift, scale = (self.scale_shift_table.to(device=device, dtype=torch.float32)
                        + temb.float()[:, None, :]).chunk(2, dim=1)
        x = (_layer_norm_fp32(self.norm_out, x) * (1 + scale) + shift).to(dtype)
        x = self.proj_out(x)
        return self._unpatchify(x, grids[-1]).to(target.dtype)

    def embed_context(self, context: torch.Tensor, context_lens: Optional[Sequence[int]] = None, *,
                      device=None) -> "EmbeddedContext":
        """Pad and project text features once; pass the result as `context` to every forward that uses it
        (the projection is constant across denoising steps)."""
        device = self.patch_embedding.weight.device if device is None else torch.device(device)
        hidden, key_mask = self._prepare_context(context, context_lens, context.shape[0], self.compute_dtype, device)
        return EmbeddedContext(self.condition_embedder.text_embedder(hidden), key_mask)

    def embed_time(self, timestep, *, batch: Optional[int] = None, device=None) -> EmbeddedTime:
        """Timestep embedding and block modulation of one step ([B] values in 0..1000, or one value for `batch`
        samples); pass it as `embedded_time` to every forward of the step with that same timestep tensor."""
        device = self.patch_embedding.weight.device if device is None else torch.device(device)
        values = torch.as_tensor(timestep, device=device)
        if values.ndim == 0:
            values = values.expand(1 if batch is None else batch)
        if values.ndim != 1 or (batch is not None and values.shape[0] != batch):
            expected = "[B]" if batch is None else f"[{batch}]"
            raise BerniniError(f"timestep: expected shape {expected} (one value per sample), got {list(values.shape)}.")
        temb, modulation = self.condition_embedder.time(values, self.compute_dtype)
        return EmbeddedTime(timestep, temb, modulation)

    def _check_streams(self, streams, source_ids) -> list[tuple[int, int, int]]:
        cfg = self.config
        if len(streams) == 0:
            raise BerniniError("streams: give at least the noisy target latent.")
        if len(source_ids) != len(streams):
            raise BerniniError(f"source_ids: need one id per stream ({len(streams)} streams), got {len(source_ids)}.")
        batch = streams[-1].shape[0]
        grids = []
        for i, s in enumerate(streams):
            if s.ndim != 5 or s.shape[0] != batch or s.shape[1] != cfg.in_channels:
                raise BerniniError(
                    f"streams[{i}]: expected a latent [{batch}, {cfg.in_channels}, T, H, W], got {list(s.shape)}."
                )
            if any(size % p for size, p in zip(s.shape[2:], cfg.patch_size)) or min(s.shape[2:]) == 0:
                raise BerniniError(
                    f"streams[{i}]: latent T, H, W {list(s.shape[2:])} must be non-zero multiples of the patch "
                    f"size {list(cfg.patch_size)} (pixel height/width multiples of 16)."
                )
            grids.append(tuple(size // p for size, p in zip(s.shape[2:], cfg.patch_size)))
        return grids

    def _prepare_context(self, context, context_lens, batch, dtype, device):
        """Zero-pad to max(L, 512) rows (never truncate, docs/official_behaviour.md §3.7/§4.4) and build the per-sample
        key mask."""
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.config.text_dim:
            raise BerniniError(
                f"context: expected [{batch}, L, {self.config.text_dim}] text features, got {list(context.shape)}."
            )
        length = context.shape[1]
        rows = max(length, MIN_CONTEXT_ROWS)
        context = context.to(device=device, dtype=dtype)
        key_mask = None
        if context_lens is not None:
            lens = [int(n) for n in context_lens]
            if len(lens) != batch or not all(1 <= n <= length for n in lens):
                raise BerniniError(
                    f"context_lens: need {batch} lengths between 1 and the context length {length}, got {lens}."
                )
            row = torch.arange(rows, device=device)
            lens_t = torch.tensor(lens, device=device)
            if min(lens) < length:  # rows past a sample's own length are padding: make them zeros
                context = torch.where((row[:length][None, :] < lens_t[:, None])[..., None], context, 0)
            attended = torch.clamp(lens_t, min=MIN_CONTEXT_ROWS)  # a lone call would pad to 512 and attend
            if int(attended.min()) < rows:
                key_mask = row[None, :] < attended[:, None]
        if rows > length:
            context = F.pad(context, (0, 0, 0, rows - length))
        return context, key_mask

    def _unpatchify(self, x: torch.Tensor, grid) -> torch.Tensor:
        frames, rows, cols = grid
        pt, ph, pw = self.config.patch_size
        x = x.reshape(x.shape[0], frames, rows, cols, pt, ph, pw, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (pt ph pw c) token features -> [B, C, T, H, W]
        return x.reshape(x.shape[0], x.shape[1], frames * pt, rows * ph, cols * pw)
