"""Spatial tiling for the Wan VAE: encode/decode overlapping tiles and blend them linearly.

Same geometry and blend as diffusers `AutoencoderKLWan.enable_tiling()` (docs/wan_qwen.md §2): tiles of
`tile_px` pixels every `tile_px - overlap_px` pixels (defaults 256 / 192), each tile runs the full chunked
causal encode/decode over all frames, and a tile is blended into the one above and the one to its left
over the overlap with linear ramps, the neighbours already blended (so results match diffusers' tiled
output). Unlike diffusers we stitch row by row into the preallocated output: only the current tile, the
one to its left and the bottom strips of the row above are alive, never a full-frame set of tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import BerniniError

_ALIGN = 8  # the Wan VAE's spatial factor: tiles must start and end on latent pixels


@dataclass(frozen=True)
class TilingConfig:
    tile_px: int = 256
    overlap_px: int = 64

    def __post_init__(self):
        for name in ("tile_px", "overlap_px"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value % _ALIGN:
                raise BerniniError(f"VAE tiling {name}={value!r}: use a non-negative multiple of {_ALIGN} pixels.")
        if self.tile_px < 2 * _ALIGN:
            raise BerniniError(f"VAE tiling tile_px={self.tile_px}: use at least {2 * _ALIGN} pixels (256 is typical).")
        if self.overlap_px >= self.tile_px:
            raise BerniniError(
                f"VAE tiling overlap_px={self.overlap_px} must be smaller than tile_px={self.tile_px} "
                "(e.g. tile 256, overlap 64)."
            )

    @property
    def stride_px(self) -> int:
        return self.tile_px - self.overlap_px

    def applies_to(self, height_px: int, width_px: int) -> bool:
        """Tiling is used only when the frame does not fit in one tile (as in diffusers)."""
        return height_px > self.tile_px or width_px > self.tile_px


def _blend(prev: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """In place: ramp `tile`'s first rows/cols (dim -2/-1) from `prev`'s last ones to its own values."""
    n = min(prev.shape[dim], tile.shape[dim], extent)
    if n <= 0:
        return
    # weights as Python floats rounded once to fp32, the same values diffusers' per-row loop multiplies by
    w_new = torch.tensor([k / n for k in range(n)], dtype=torch.float32, device=tile.device)
    w_old = torch.tensor([1 - k / n for k in range(n)], dtype=torch.float32, device=tile.device)
    shape = (n, 1) if dim == -2 else (n,)
    head = tile.narrow(dim, 0, n)
    tail = prev.narrow(dim, prev.shape[dim] - n, n)
    head.copy_(tail * w_old.view(shape) + head * w_new.view(shape))


def _stitch(
    out: torch.Tensor,
    starts_h: list,
    starts_w: list,
    stride: int,
    extent: int,
    tile_at: Callable[[int, int], torch.Tensor],
) -> None:
    """Fill `out` [..., H, W] from tiles produced by `tile_at(row, col)`, each placed at (starts_h[row],
    starts_w[col]) in `out` units, blended over `extent` with its upper and left neighbours, cropped to `stride`."""
    above = [None] * len(starts_w)  # bottom strips of the previous tile row, taken after their own blends
    for i, y in enumerate(starts_h):
        left = None
        for j, x in enumerate(starts_w):
            tile = tile_at(i, j)
            if above[j] is not None:
                _blend(above[j], tile, extent, dim=-2)
            if left is not None:
                _blend(left, tile, extent, dim=-1)
            out[..., y : y + stride, x : x + stride] = tile[..., :stride, :stride]
            above[j] = tile[..., tile.shape[-2] - min(extent, tile.shape[-2]) :, :].clone() if extent else None
            left = tile


def tiled_encode(vae, video: torch.Tensor, cfg: TilingConfig) -> torch.Tensor:
    """Raw latent mean of `video` [B,3,F,H,W], encoded tile by tile and blended in latent space."""
    vae.check_video(video)
    sf, tf, z = vae.config.spatial_factor, vae.config.temporal_factor, vae.config.z_dim
    b, _, f, height, width = video.shape
    tile, stride = cfg.tile_px // sf, cfg.stride_px // sf  # latent pixels
    starts_h, starts_w = list(range(0, height // sf, stride)), list(range(0, width // sf, stride))
    out = torch.empty(b, z, 1 + (f - 1) // tf, height // sf, width // sf, dtype=vae.dtype, device=video.device)

    def encode_tile(i: int, j: int) -> torch.Tensor:
        y, x = starts_h[i] * sf, starts_w[j] * sf
        return vae.encode_untiled(video[..., y : y + tile * sf, x : x + tile * sf])

    _stitch(out, starts_h, starts_w, stride, tile - stride, encode_tile)
    return out


def tile_count(height: int, width: int, cfg: TilingConfig, factor: int) -> int:
    """Tiles `tiled_encode`/`tiled_decode` cut a frame of height x width into (`factor`: pixels per unit of
    height/width, e.g. 8 for latent sizes)."""
    stride = cfg.stride_px // factor
    return len(range(0, height, stride)) * len(range(0, width, stride))


def tiled_decode(vae, latents: torch.Tensor, cfg: TilingConfig, on_chunk=None) -> torch.Tensor:
    """Video [B,3,F,H,W] in [-1,1] from raw latents, decoded tile by tile and blended in pixel space
    (`on_chunk()` after each decoder call, for progress)."""
    vae.check_latents(latents)
    sf, tf = vae.config.spatial_factor, vae.config.temporal_factor
    b, _, t, h, w = latents.shape
    tile, stride = cfg.tile_px // sf, cfg.stride_px // sf  # latent pixels
    starts_h, starts_w = list(range(0, h, stride)), list(range(0, w, stride))
    out = torch.empty(b, 3, 1 + tf * (t - 1), h * sf, w * sf, dtype=vae.dtype, device=latents.device)

    def decode_tile(i: int, j: int) -> torch.Tensor:
        y, x = starts_h[i], starts_w[j]
        return vae.decode_untiled(latents[..., y : y + tile, x : x + tile], on_chunk)

    _stitch(
        out, [y * sf for y in starts_h], [x * sf for x in starts_w], cfg.stride_px, cfg.overlap_px, decode_tile
    )
    return out.clamp_(-1.0, 1.0)
