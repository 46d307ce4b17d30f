"""The Wan 2.1 video VAE (16 latent channels, x8 space, x4 time): chunked causal encode and decode.

Numerics follow diffusers `AutoencoderKLWan` (= Wan-Video `wan/modules/vae.py`, docs/wan_qwen.md §2), and the
parameter names are diffusers' exactly, so a diffusers `vae/` folder loads with strict=True (the original /
ComfyUI single-file names are mapped by `keymaps.wan_vae`).

Video is processed causally in chunks — encode: the first frame alone, then 4 frames at a time; decode: one
latent frame at a time — and every causal conv keeps the last 2 frames it saw (`CausalCache`) as context for
the next chunk, so memory does not grow with the frame count. Spatial tiling lives in `vae_tiling`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BerniniError
from .ops import resolve_ops
from .vae_tiling import TilingConfig, tile_count, tiled_decode, tiled_encode

CACHE_T = 2  # frames of causal context every conv keeps between chunks (kernel 3 in time)

# Wan 2.1 per-channel latent statistics (docs/wan_qwen.md §2; diffusers vae/config.json).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class VAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple = ()
    temperal_downsample: tuple = (False, True, True)  # (sic) diffusers' spelling, kept for config.json parity
    dropout: float = 0.0
    latents_mean: tuple = WAN21_LATENTS_MEAN
    latents_std: tuple = WAN21_LATENTS_STD

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise BerniniError(
                f"VAE config: temperal_downsample has {len(self.temperal_downsample)} entries, "
                f"it needs len(dim_mult) - 1 = {len(self.dim_mult) - 1}."
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise BerniniError(f"VAE config: latents_mean/latents_std need z_dim = {self.z_dim} values each.")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)  # 8 for Wan 2.1

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temperal_downsample)  # 4 for Wan 2.1

    @classmethod
    def from_dict(cls, d: Mapping) -> "VAEConfig":
        """From a diffusers `vae/config.json` (AutoencoderKLWan); unknown keys are ignored."""
        if d.get("is_residual") or d.get("patch_size") not in (None, 1) or d.get("z_dim", 16) != 16:
            raise BerniniError(
                "The VAE config describes a Wan 2.2-style VAE (is_residual / patch_size / z_dim "
                f"{d.get('z_dim')}); only the Wan 2.1 16-channel VAE is supported."
            )
        for key, expected in (("in_channels", 3), ("out_channels", 3)):
            if d.get(key, expected) != expected:
                raise BerniniError(f"The VAE config has {key}={d[key]}; the Wan 2.1 VAE uses {expected}.")
        if d.get("decoder_base_dim") not in (None, d.get("base_dim", cls.base_dim)):
            raise BerniniError("The VAE config sets a decoder_base_dim different from base_dim (not Wan 2.1).")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class CausalCache:
    """Causal context carried from one chunk to the next, one entry per module of one encode/decode run."""

    def __init__(self):
        self._state = {}

    def exchange(self, conv: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Return the frames `conv` saw last time (None at the start); remember the last CACHE_T of `x`."""
        prev = self._state.get(conv)
        keep = x[:, :, -CACHE_T:]
        if keep.shape[2] < CACHE_T and prev is not None:
            keep = torch.cat([prev[:, :, -1:], keep], dim=2)
        else:
            keep = keep.clone()  # a view would pin the whole chunk in memory
        self._state[conv] = keep
        return prev

    def first_visit(self, module: nn.Module) -> bool:
        """True exactly once per module and run."""
        seen = module in self._state
        self._state[module] = True
        return not seen

    def swap(self, module: nn.Module, value: torch.Tensor) -> Optional[torch.Tensor]:
        """Store `value` for `module`, return what was stored before (None at the start)."""
        prev = self._state.get(module)
        self._state[module] = value
        return prev


def _causal_conv3d(ops, cin: int, cout: int, kernel, stride=1, padding=0) -> nn.Module:
    """An ops.Conv3d whose time padding is causal: all 2*p frames go in front (applied by `_causal`)."""
    kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
    padding = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
    # Space is padded by the conv itself (zeros, symmetric); time by `_causal` with cached frames or zeros.
    conv = ops.Conv3d(cin, cout, kernel, stride=stride, padding=(0, padding[1], padding[2]))
    conv.causal_time_pad = 2 * padding[0]
    return conv


def _causal(conv: nn.Module, x: torch.Tensor, cache: Optional[CausalCache]) -> torch.Tensor:
    pad = conv.causal_time_pad
    if pad == 0:
        return conv(x)
    front = cache.exchange(conv, x) if cache is not None else None
    parts = [x]
    if front is not None:
        front = front.to(device=x.device, dtype=x.dtype)
        parts.insert(0, front)
        pad -= front.shape[2]
    if pad > 0:
        parts.insert(0, x.new_zeros(x.shape[0], x.shape[1], pad, x.shape[3], x.shape[4]))
    return conv(torch.cat(parts, dim=2))


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) * gamma (no eps term, no bias: docs/wan_qwen.md §2)."""

    def __init__(self, dim: int, spatial_dims: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):  # normalise in fp32 like diffusers
            normalized = F.normalize(x.float(), dim=1).to(x.dtype)
        else:
            normalized = F.normalize(x, dim=1)
        return normalized * self.scale * self.gamma.to(device=x.device, dtype=x.dtype)


class ResidualBlock(nn.Module):
    def __init__(self, ops, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(in_dim, 3)
        self.conv1 = _causal_conv3d(ops, in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim, 3)
        self.conv2 = _causal_conv3d(ops, out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = _causal_conv3d(ops, in_dim, out_dim, 1) if in_dim != out_dim else None
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = _causal(self.conv1, F.silu(self.norm1(x)), cache)
        x = F.dropout(F.silu(self.norm2(x)), self.dropout, self.training)
        return _causal(self.conv2, x, cache) + shortcut


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately."""

    def __init__(self, ops, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = ops.Conv2d(dim, dim * 3, 1)
        self.proj = ops.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        qkv = self.to_qkv(y).reshape(b * t, 3 * c, h * w).transpose(1, 2).unsqueeze(1)
        q, k, v = qkv.chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # [bt, 1, hw, c]
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)


class _Upsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nearest-exact at an exact x2 is a pure copy, so running it in the input dtype is lossless
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class Resample(nn.Module):
    """x2 up/down-sampling in space (per frame), optionally also in time (the "3d" modes).

    upsample3d: the time conv doubles the channels, which are interleaved into 2x frames; the very first
    latent frame is not doubled (1 latent frame -> 1 frame). downsample3d: a stride-2 time conv over
    [last frame of the previous chunk, this chunk]; the first chunk (one frame) passes through.
    """

    def __init__(self, ops, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(_Upsample2x(), ops.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = _causal_conv3d(ops, dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), ops.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = _causal_conv3d(ops, dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # The time conv first runs on the 2nd latent frame, with zero context (not the 1st frame's features):
        # that is what diffusers' "Rep" marker amounts to.
        if self.mode == "upsample3d" and not cache.first_visit(self):
            b, c, t, h, w = x.shape
            x = _causal(self.time_conv, x, cache).reshape(b, 2, c, t, h, w)
            x = x.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)  # frame pairs (first, second) in order
        b, c, t, h, w = x.shape
        y = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        x = y.view(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)
        if self.mode == "downsample3d":
            prev = cache.swap(self, x[:, :, -1:].clone())
            if prev is not None:
                x = self.time_conv(torch.cat([prev.to(x.device), x], dim=2))
        return x


class MidBlock(nn.Module):
    def __init__(self, ops, dim: int, dropout: float):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(ops, dim, dim, dropout), ResidualBlock(ops, dim, dim, dropout)])
        self.attentions = nn.ModuleList([AttentionBlock(ops, dim)])

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)


class Encoder(nn.Module):
    def __init__(self, ops, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = _causal_conv3d(ops, 3, dims[0], 3, padding=1)
        # One flat list (diffusers' layout): residual blocks [+ attention], then the level's downsampler.
        blocks, scale = [], 1.0
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(ops, in_dim, out_dim, cfg.dropout))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(ops, out_dim))
                in_dim = out_dim
            if level != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temperal_downsample[level] else "downsample2d"
                blocks.append(Resample(ops, out_dim, mode))
                scale /= 2.0
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(ops, dims[-1], cfg.dropout)
        self.norm_out = RMSNorm(dims[-1], 3)
        self.conv_out = _causal_conv3d(ops, dims[-1], cfg.z_dim * 2, 3, padding=1)  # mu and logvar

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = _causal(self.conv_in, x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return _causal(self.conv_out, F.silu(self.norm_out(x)), cache)


class UpBlock(nn.Module):
    def __init__(self, ops, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, upsample: Optional[str]):
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList(ResidualBlock(ops, a, b, dropout) for a, b in zip(dims[:-1], dims[1:]))
        self.upsamplers = nn.ModuleList([Resample(ops, out_dim, upsample)]) if upsample else None

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        return self.upsamplers[0](x, cache) if self.upsamplers is not None else x


class Decoder(nn.Module):
    def __init__(self, ops, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = tuple(reversed(cfg.temperal_downsample))
        self.conv_in = _causal_conv3d(ops, cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(ops, dims[0], cfg.dropout)
        blocks = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if level > 0:
                in_dim //= 2  # every upsampler halves the channels
            upsample = None
            if level != len(cfg.dim_mult) - 1:
                upsample = "upsample3d" if temporal_upsample[level] else "upsample2d"
            blocks.append(UpBlock(ops, in_dim, out_dim, cfg.num_res_blocks, cfg.dropout, upsample))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1], 3)
        self.conv_out = _causal_conv3d(ops, dims[-1], 3, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.mid_block(_causal(self.conv_in, x, cache), cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return _causal(self.conv_out, F.silu(self.norm_out(x)), cache)


class WanVAE(nn.Module):
    """Wan 2.1 VAE. Call under torch.no_grad()/inference_mode(); inputs are cast to `dtype`.

    `encode`/`decode` work on NORMALISED latents ((mu - mean) / std, the renderer's space;
    docs/official_behaviour.md §4.1), `encode_raw`/`decode_raw` on raw Wan latents (ComfyUI's LATENT convention).
    Encoding returns the posterior mean, as the official `_vae_encode` does (`latent_dist.mode()`). The official
    pipelines run the VAE in fp32 (docs/official_behaviour.md §7.3); bf16 works (RMS norms in fp32) at ~1e-2
    relative error.
    """

    def __init__(self, config: VAEConfig = VAEConfig(), ops=None):
        super().__init__()
        ops = resolve_ops(ops)
        self.config = config
        z = config.z_dim
        self.encoder = Encoder(ops, config)
        self.quant_conv = _causal_conv3d(ops, z * 2, z * 2, 1)
        self.post_quant_conv = _causal_conv3d(ops, z, z, 1)
        self.decoder = Decoder(ops, config)
        self.compute_dtype: Optional[torch.dtype] = None  # None: the parameters' dtype
        self._stats = {}  # (device, dtype) -> (mean, std) broadcast tensors, built once

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype or self.decoder.conv_out.weight.dtype

    def working_memory(self, height_px: int, width_px: int, tiling=None) -> int:
        """Bytes a chunked encode/decode of frames of this size needs beside the weights. ComfyUI budgets the
        Wan 2.1 VAE at 7000 · (H/8) · (W/8) · 64 · dtype bytes (docs/wan_qwen.md §2); tiling bounds H and W by a
        tile."""
        if tiling is not None and tiling.applies_to(height_px, width_px):
            height_px, width_px = min(height_px, tiling.tile_px), min(width_px, tiling.tile_px)
        dtype_bytes = torch.finfo(self.dtype).bits // 8 if self.dtype.is_floating_point else 4
        return 7000 * (height_px // 8) * (width_px // 8) * 64 * dtype_bytes

    # ---- (un)normalisation ------------------------------------------------------------------------
    def _latent_stats(self, ref: torch.Tensor):
        key = (ref.device, ref.dtype)
        if key not in self._stats:
            shape = (1, self.config.z_dim, 1, 1, 1)
            mean = torch.tensor(self.config.latents_mean, dtype=ref.dtype, device=ref.device).view(shape)
            std = torch.tensor(self.config.latents_std, dtype=ref.dtype, device=ref.device).view(shape)
            self._stats[key] = (mean, std)
        return self._stats[key]

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_stats(raw)
        return (raw - mean) / std

    def denormalize(self, normalised: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_stats(normalised)
        return normalised * std + mean

    # ---- checks -------------------------------------------------------------------------------------
    def check_video(self, video: torch.Tensor, name: str = "video") -> None:
        sf, tf = self.config.spatial_factor, self.config.temporal_factor
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != 3:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise BerniniError(f"{name} must be a [B, 3, F, H, W] tensor in [-1, 1]; got {shape}.")
        _, _, f, h, w = video.shape
        if f < 1 or (f - 1) % tf:
            lo = 1 + (max(f, 1) - 1) // tf * tf
            raise BerniniError(
                f"{name} has {f} frames; the Wan VAE needs 1 + {tf}k frames (e.g. {lo} or {lo + tf}): "
                "trim or pad the frames."
            )
        if h < sf or w < sf or h % sf or w % sf:
            raise BerniniError(
                f"{name} is {h}x{w} pixels; height and width must be positive multiples of {sf}: resize or crop it."
            )

    def check_latents(self, latents: torch.Tensor, name: str = "latents") -> None:
        z = self.config.z_dim
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5 or latents.shape[1] != z:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise BerniniError(f"{name} must be a [B, {z}, T, H/8, W/8] Wan 2.1 latent tensor; got {shape}.")
        if min(latents.shape[2:]) < 1:
            raise BerniniError(f"{name} is empty (shape {tuple(latents.shape)}).")

    # ---- encode ---------------------------------------------------------------------------------------
    def encode_raw(self, video: torch.Tensor, tiling: Optional[TilingConfig] = None) -> torch.Tensor:
        """[B,3,F,H,W] pixels in [-1,1] -> raw posterior mean [B,16,1+(F-1)/4,H/8,W/8]."""
        self.check_video(video)
        if tiling is not None and tiling.applies_to(video.shape[-2], video.shape[-1]):
            return tiled_encode(self, video, tiling)
        return self.encode_untiled(video)

    def encode(self, video: torch.Tensor, tiling: Optional[TilingConfig] = None) -> torch.Tensor:
        return self.normalize(self.encode_raw(video, tiling))

    def encode_untiled(self, video: torch.Tensor) -> torch.Tensor:
        """Chunked causal encode of a whole frame (or one tile); shapes must already be valid."""
        b, _, f, h, w = video.shape
        sf, tf, z = self.config.spatial_factor, self.config.temporal_factor, self.config.z_dim
        out = torch.empty(b, z, 1 + (f - 1) // tf, h // sf, w // sf, dtype=self.dtype, device=video.device)
        cache = CausalCache()
        for i in range(out.shape[2]):
            chunk = video[:, :, :1] if i == 0 else video[:, :, 1 + tf * (i - 1) : 1 + tf * i]
            moments = self.quant_conv(self.encoder(chunk.to(self.dtype), cache))  # cast per chunk: no full copy
            out[:, :, i : i + 1] = moments[:, :z]  # the mean half; the log-variance is unused (mode())
        return out

    # ---- decode ---------------------------------------------------------------------------------------
    def decode_raw(self, latents: torch.Tensor, tiling: Optional[TilingConfig] = None,
                   on_chunk: Optional[Callable[[], None]] = None) -> torch.Tensor:
        """Raw latents [B,16,T,h,w] -> video [B,3,1+4(T-1),8h,8w] clamped to [-1, 1]. `on_chunk()` is called after
        each decoder call (`decode_chunks` of them; progress)."""
        self.check_latents(latents)
        sf = self.config.spatial_factor
        if tiling is not None and tiling.applies_to(latents.shape[-2] * sf, latents.shape[-1] * sf):
            return tiled_decode(self, latents, tiling, on_chunk)
        return self.decode_untiled(latents, on_chunk).clamp_(-1.0, 1.0)

    def decode_chunks(self, latents: torch.Tensor, tiling: Optional[TilingConfig] = None) -> int:
        """How many decoder calls `decode_raw(latents, tiling)` makes: one per latent frame, per tile when tiled."""
        sf = self.config.spatial_factor
        h, w = latents.shape[-2], latents.shape[-1]
        tiles = tile_count(h, w, tiling, sf) if tiling is not None and tiling.applies_to(h * sf, w * sf) else 1
        return latents.shape[2] * tiles

    def decode(self, latents: torch.Tensor, tiling: Optional[TilingConfig] = None) -> torch.Tensor:
        self.check_latents(latents)
        return self.decode_raw(self.denormalize(latents.to(self.dtype)), tiling)

    def decode_untiled(self, latents: torch.Tensor, on_chunk: Optional[Callable[[], None]] = None) -> torch.Tensor:
        """One latent frame per decoder call with the causal cache; NOT clamped (tiles blend first)."""
        b, _, t, h, w = latents.shape
        sf, tf = self.config.spatial_factor, self.config.temporal_factor
        out = torch.empty(b, 3, 1 + tf * (t - 1), h * sf, w * sf, dtype=self.dtype, device=latents.device)
        cache = CausalCache()
        for i in range(t):
            frames = self.decoder(self.post_quant_conv(latents[:, :, i : i + 1].to(self.dtype)), cache)
            start = 0 if i == 0 else 1 + tf * (i - 1)
            out[:, :, start : start + frames.shape[2]] = frames
            if on_chunk is not None:
                on_chunk()
        return out
