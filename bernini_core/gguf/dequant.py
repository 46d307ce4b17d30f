"""GGML tensor types dequantised in torch, on whatever device the packed bytes sit.

Every function mirrors the float32 operation order of the `gguf` package's numpy dequantisers
(``gguf.quants``), so both give the same bits for the same bytes; only integer work (unpacking bits) is free in
its order. Blocks are handled all at once (no Python loop over blocks). Byte layouts: ggml's ``block_q*``
structs (ggml-common.h), little-endian.

The block sizes are the GGUF format's own constants (gguf ``GGML_QUANT_SIZES``), repeated here so that a
quantised model runs without the `gguf` package, which is needed to read files only.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

QK_K = 256  # values per super-block of the k-quants


class QuantType(NamedTuple):
    name: str
    code: int  # ggml_type / gguf.GGMLQuantizationType value
    block_size: int  # values per block
    type_size: int  # bytes per block


# ---------------------------------------------------------------------------- byte helpers
def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 field at byte `start` of each block, as float32 [n, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).to(torch.float32)


def _shifts(values: Sequence[int], shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=like.device).reshape(shape)


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """[n, groups * 2, width] 4-bit values: per group of `width` bytes, the low nibbles, then the high ones."""
    n = qs.shape[0]
    width = qs.shape[1] // groups
    return ((qs.reshape(n, groups, 1, width) >> _shifts([0, 4], (1, 1, 2, 1), qs)) & 0x0F).reshape(n, 2 * groups, width)


def _bits(raw: torch.Tensor, groups: int) -> torch.Tensor:
    """[n, groups * 8, width] single bits: bit j of each of a group's `width` bytes, for j = 0..7 in turn."""
    n = raw.shape[0]
    width = raw.shape[1] // groups
    return ((raw.reshape(n, groups, 1, width) >> _shifts(range(8), (1, 1, 8, 1), raw)) & 1).reshape(n, 8 * groups,
                                                                                                     width)


def _bits32(raw4: torch.Tensor) -> torch.Tensor:
    """[n, 32] bits of a little-endian uint32 stored as 4 bytes [n, 4]: bit i is bit i % 8 of byte i // 8."""
    return ((raw4.reshape(-1, 4, 1) >> _shifts(range(8), (1, 1, 8), raw4)) & 1).reshape(-1, 32)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins of a Q4_K / Q5_K super-block, packed in 12 bytes [n, 12] -> 2 x [n, 8]."""
    n = scales.shape[0]
    packed = scales.reshape(n, 3, 4)
    d, m, m_d = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


# ---------------------------------------------------------------------------- block dequantisers
# Each takes [n, type_size] uint8 and returns [n, block_size] float32.
def _q4_0(b):
    d = _f16(b, 0)
    q = (_nibbles(b[:, 2:], 1).reshape(b.shape[0], -1).to(torch.int8) - 8).to(torch.float32)
    return d * q


def _q4_1(b):
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 4:], 1).reshape(b.shape[0], -1).to(torch.float32)
    return (d * q).add_(m)


def _q5_0(b):
    d = _f16(b, 0)
    q = _nibbles(b[:, 6:], 1).reshape(b.shape[0], -1) | (_bits32(b[:, 2:6]) << 4)
    return d * (q.to(torch.int8) - 16).to(torch.float32)


def _q5_1(b):
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 8:], 1).reshape(b.shape[0], -1) | (_bits32(b[:, 4:8]) << 4)
    return (d * q.to(torch.float32)).add_(m)


def _q8_0(b):
    return b[:, 2:].view(torch.int8).to(torch.float32) * _f16(b, 0)


def _q2_k(b):
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = ((qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), qs)) & 3).reshape(n, 16, 16)
    return (dl * q.to(torch.float32)).sub_(ml).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    low = (scales[:, :8].reshape(n, 1, 8) >> _shifts([0, 4], (1, 2, 1), b)).reshape(n, 16)
    high = (scales[:, 8:].reshape(n, 1, 4) >> _shifts([0, 2, 4, 6], (1, 4, 1), b)).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * sc.to(torch.float32)).reshape(n, 16, 1)
    ql = ((qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), qs)) & 3).reshape(n, 16, 16)
    qh = _bits(hmask, 1).reshape(n, 16, 16) ^ 1  # a set bit means no offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 4).to(torch.float32)
    return (dl * q).sub_(ml).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    q = (_nibbles(b[:, 48:], 4) | (_bits(b[:, 16:48], 1) << 4)).to(torch.float32)
    return (dl * q).sub_(ml).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = _f16(b, 208)
    dl = (d * scales.view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    high = ((qh.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), qh)) & 3).reshape(n, 8, 32)
    q = ((_nibbles(ql, 2).reshape(n, 8, 32) | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16)
    return (dl * q.to(torch.float32)).reshape(n, QK_K)


_BLOCK_DEQUANTIZERS: dict[int, tuple[QuantType, Callable[[torch.Tensor], torch.Tensor]]] = {
    qt.code: (qt, fn) for qt, fn in (
        (QuantType("Q4_0", 2, 32, 18), _q4_0),
        (QuantType("Q4_1", 3, 32, 20), _q4_1),
        (QuantType("Q5_0", 6, 32, 22), _q5_0),
        (QuantType("Q5_1", 7, 32, 24), _q5_1),
        (QuantType("Q8_0", 8, 32, 34), _q8_0),
        (QuantType("Q2_K", 10, QK_K, 84), _q2_k),
        (QuantType("Q3_K", 11, QK_K, 110), _q3_k),
        (QuantType("Q4_K", 12, QK_K, 144), _q4_k),
        (QuantType("Q5_K", 13, QK_K, 176), _q5_k),
        (QuantType("Q6_K", 14, QK_K, 210), _q6_k),
    )
}
# Plain float types: stored as such, read as torch tensors of that dtype.
FLOAT_TYPES: dict[int, tuple[QuantType, torch.dtype]] = {
    0: (QuantType("F32", 0, 1, 4), torch.float32),
    1: (QuantType("F16", 1, 1, 2), torch.float16),
    30: (QuantType("BF16", 30, 1, 2), torch.bfloat16),
}
QUANT_TYPES: dict[int, QuantType] = {code: qt for code, (qt, _) in {**FLOAT_TYPES, **_BLOCK_DEQUANTIZERS}.items()}
SUPPORTED_TYPE_NAMES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q4_K", "Q4_0", "Q4_1", "Q3_K",
                        "Q2_K")


def is_block_quantized(code: int) -> bool:
    """True for the block types (packed bytes), False for F32/F16/BF16 and unknown codes."""
    return int(code) in _BLOCK_DEQUANTIZERS


def packed_bytes(numel: int, code: int) -> int:
    """Bytes `numel` values take in type `code` (numel a multiple of its block size)."""
    qt = QUANT_TYPES[int(code)]
    return numel // qt.block_size * qt.type_size


def dequantize(raw: torch.Tensor, code: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of `shape` from the bytes `raw` (uint8, any shape, row-major blocks) of GGML type `code`, computed in
    float32 on `raw`'s device, then cast to `dtype`."""
    code = int(code)
    shape = tuple(int(s) for s in shape)
    if code in FLOAT_TYPES:
        return raw.reshape(-1).view(FLOAT_TYPES[code][1]).to(torch.float32).reshape(shape).to(dtype)
    if code not in _BLOCK_DEQUANTIZERS:
        raise ValueError(f"GGML type {code} has no dequantiser here; supported: {', '.join(SUPPORTED_TYPE_NAMES)}")
    qt, fn = _BLOCK_DEQUANTIZERS[code]
    blocks = raw.reshape(-1, qt.type_size)
    return fn(blocks).reshape(shape).to(dtype)
