"""Segment-aware 3D RoPE: Wan's 3D rotary embedding plus Bernini's per-stream source-id phase.

Per docs/official_behaviour.md §4.3: every stream (source image, source video, noisy target) gets its own
(t, h, w) patch grid starting at 0; pair k of the head then rotates by
    pos_axis(k) * omega_axis,k  +  sid * omega'_k,
with omega_axis,k = theta^(-2k/d_axis) over the t/h/w split of the head and
omega'_k = theta^(-2k/head_dim) over all head_dim/2 pairs. sid = 0 (the target) is plain Wan RoPE.

Numerics follow the official code: angle tables in float64, turned into unit complex numbers and
multiplied (3D part x source phase) in complex128 (docs/official_behaviour.md §4.3 "complex fp64"), then cached as
real float64 (cos, sin) pairs. q/k pairs (x[2k], x[2k+1]) are rotated by that complex128 product: eagerly as
complex numbers (a view of the cached table), under torch.compile written out in real float64 arithmetic,
    out[2k] = x[2k] cos - x[2k+1] sin,   out[2k+1] = x[2k] sin + x[2k+1] cos,
which inductor fuses into one kernel (it has no complex dtypes). Both give the official result bit for bit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Sequence

import torch

from ..errors import BerniniError

ROPE_THETA = 10000.0


def axis_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of the head given to the t, h and w axes: d-4(d//6), 2(d//6), 2(d//6) (44/42/42 for 128)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def source_ids_for(n_sources: int, max_trained: int = 5, interpolate: bool = True) -> list[float]:
    """Source ids 1..n, or float32 ``linspace(1, max_trained, n)`` when n exceeds the trained range.

    docs/official_behaviour.md §4.3 / §7.2: the ids are float32 values (e.g. 1.7999999523 for n = 6), not exact
    decimals.
    """
    if n_sources < 0:
        raise BerniniError(f"source ids: the number of sources must be >= 0, got {n_sources}.")
    if max_trained < 1:
        raise BerniniError(f"source ids: max_trained must be >= 1, got {max_trained}.")
    if n_sources == 0:
        return []
    if interpolate and n_sources > max_trained:
        return torch.linspace(1.0, float(max_trained), n_sources, dtype=torch.float32).tolist()
    return [float(i) for i in range(1, n_sources + 1)]


def _inverse_frequencies(dim: int, device) -> torch.Tensor:
    """theta^(-2k/dim) for k < dim/2, float64, in the same operation order as diffusers' 1D RoPE."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=device)[: dim // 2] / dim
    return 1.0 / (ROPE_THETA ** exponents)


def _unit_complex(angles: torch.Tensor) -> torch.Tensor:
    return torch.polar(torch.ones_like(angles), angles)


def stream_frequencies(grid: Sequence[int], source_id: float, head_dim: int, device=None) -> torch.Tensor:
    """complex128 [T*H*W, head_dim/2] rotation of every token of one stream (token order t, h, w)."""
    frames, rows, cols = (int(g) for g in grid)
    per_axis = []
    for count, dim in zip((frames, rows, cols), axis_split(head_dim)):
        positions = torch.arange(count, dtype=torch.float64, device=device)
        per_axis.append(_unit_complex(torch.outer(positions, _inverse_frequencies(dim, device))))
    t_part = per_axis[0][:, None, None, :].expand(frames, rows, cols, -1)
    h_part = per_axis[1][None, :, None, :].expand(frames, rows, cols, -1)
    w_part = per_axis[2][None, None, :, :].expand(frames, rows, cols, -1)
    freqs = torch.cat([t_part, h_part, w_part], dim=-1).reshape(frames * rows * cols, head_dim // 2)
    sid = float(source_id)
    if sid != 0.0:
        # Source phase over the FULL head dim (a 1D RoPE evaluated at position sid), docs/official_behaviour.md §4.3.
        sid_angles = torch.tensor([sid], dtype=torch.float64, device=device) * _inverse_frequencies(head_dim, device)
        freqs = freqs * _unit_complex(sid_angles)[None, :]
    return freqs


def rotation_table(freqs: torch.Tensor) -> torch.Tensor:
    """float64 [L, head_dim] holding a complex128 [L, head_dim/2] table as interleaved (cos, sin) pairs: the same
    bytes as ``view_as_real(freqs)``, so an eager call views it as complex for free.

    One real 2D tensor, so that sequence-parallel sharding along tokens works unchanged; a zero (padding) row is a
    zero rotation exactly as a zero complex row was.
    """
    return torch.view_as_real(freqs).flatten(-2).contiguous()


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, heads, head_dim] by a float64 [L, head_dim] rotation table (see rotation_table); float64
    arithmetic, returns x's dtype. Equal to the complex128 product of the official code, bit for bit.

    Eager runs that complex128 product itself (three kernels: the fewest bytes moved); under torch.compile the same
    product is written in real arithmetic, which inductor fuses into one kernel (it has no complex dtypes)."""
    if torch.compiler.is_compiling():
        return rotate_real(x, table)
    return rotate_complex(x, table)


def rotate_complex(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    pairs = torch.view_as_complex(x.to(torch.float64).unflatten(-1, (-1, 2)))
    rotation = torch.view_as_complex(table.unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation[None, :, None, :]).flatten(-2).to(x.dtype)


def rotate_real(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(a + ib)(c + id) = (ac - bd) + i(ad + bc), element by element in float64."""
    rotation = table.unflatten(-1, (-1, 2))[None, :, None]
    cos, sin = rotation[..., 0], rotation[..., 1]
    pairs = x.to(torch.float64).unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).to(x.dtype)


class RopeTableCache:
    """Per-call constant RoPE rotation tables (float64 [tokens, head_dim], see rotation_table), keyed by the
    stream grids, their source ids and the device.

    A sampler calls the DiT with a handful of stream layouts (guidance arms) every step; each layout's
    table is built once (in complex128, then kept as its real parts only). Small LRU so that changing resolution
    does not grow memory without bound.
    """

    def __init__(self, head_dim: int, max_positions: int, max_entries: int = 8):
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.max_entries = max_entries
        self._tables: OrderedDict = OrderedDict()
        self.builds = 0  # number of tables built (observable by tests / benchmarks)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # copy.deepcopy / pickle of a DiT: a lock cannot be copied, make a new one
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def get(self, grids: Sequence[Sequence[int]], source_ids: Sequence[float], device) -> torch.Tensor:
        # locked: a DiT shared by two pipelines runs in two threads, and an eviction must not race a lookup
        with self._lock:
            return self._get(grids, source_ids, device)

    def _get(self, grids: Sequence[Sequence[int]], source_ids: Sequence[float], device) -> torch.Tensor:
        grids = tuple(tuple(int(g) for g in grid) for grid in grids)
        sids = tuple(float(s) for s in source_ids)
        key = (grids, sids, str(torch.device(device)))
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
            return table
        for grid in grids:
            if max(grid) > self.max_positions:
                raise BerniniError(
                    f"stream of {grid[0]}x{grid[1]}x{grid[2]} patches exceeds the RoPE table of "
                    f"{self.max_positions} positions per axis (rope_max_seq_len); use fewer frames or a "
                    "smaller resolution."
                )
        freqs = torch.cat([stream_frequencies(g, s, self.head_dim, device) for g, s in zip(grids, sids)], dim=0)
        table = rotation_table(freqs)
        self._tables[key] = table
        self.builds += 1
        while len(self._tables) > self.max_entries:
            self._tables.popitem(last=False)
        return table

    def clear(self) -> None:
        self._tables.clear()
