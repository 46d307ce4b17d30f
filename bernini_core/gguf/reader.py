"""Reading a GGUF file (memory-mapped, through the `gguf` package's GGUFReader) and checking it before any model
is built: readable and complete, every tensor of a type we dequantise, shapes consistent with ComfyUI-GGUF's
``comfy.gguf.orig_shape.<name>`` metadata, and the architecture it declares.

GGUF holds no code (a header of typed key/values and tensor descriptions, then raw tensor bytes), which is why it
is the one format accepted besides safetensors. Each problem is one BerniniError naming the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import BerniniError
from ..weight_files import broken_file, foreign_format
from .dequant import QUANT_TYPES, SUPPORTED_TYPE_NAMES, is_block_quantized

ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."  # ComfyUI-GGUF: logical shape of a tensor stored reshaped (> 4 dims)
_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFTensor:
    name: str  # as stored in the file
    qtype: int  # GGML type code
    type_name: str  # "Q4_K", ...
    shape: tuple  # logical shape, torch order (orig_shape metadata applied)
    data: np.ndarray  # the file's bytes (memory-mapped): uint8 [..., bytes per row] for block types, else typed

    @property
    def supported(self) -> bool:
        return self.qtype in QUANT_TYPES

    @property
    def packed(self) -> bool:
        return is_block_quantized(self.qtype)


@dataclass(frozen=True)
class GGUFContents:
    path: Path
    architecture: Optional[str]  # general.architecture; None when the file declares none
    tensors: list  # of GGUFTensor, in file order


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise BerniniError("reading .gguf files needs the 'gguf' package: pip install gguf (into the Python "
                           "environment that runs Bernini or ComfyUI).") from None
    return gguf


def read_gguf(path, *, check_types: bool = True) -> GGUFContents:
    """The tensors and architecture of a GGUF file, after the checks above (that of the tensor types later, by
    :func:`check_tensor_types`, with `check_types` False)."""
    gguf = _import_gguf()
    path = Path(path)
    if not path.is_file():
        raise BerniniError(f"GGUF file '{path}' does not exist; check the path.")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(32)
    if len(head) < len(_MAGIC) and _MAGIC.startswith(head):
        raise broken_file(path, f"is truncated: it holds only {size} bytes (an interrupted download?)"
                                if size else "is empty (an interrupted download?)")
    if not head.startswith(_MAGIC):
        what = (foreign_format(head) or "").replace(" under a .safetensors name", "")
        if head[8:9] == b"{":
            what = "a safetensors file; give it its .safetensors name"
        raise broken_file(path, f"is not a GGUF file ({what or 'its first bytes are not the GGUF magic'})")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError, struct.error) as exc:
        raise _unreadable(path, size, exc, gguf) from None
    if reader.byte_order != "I":
        raise broken_file(path, "is a GGUF file of the other byte order (big-endian); Bernini reads little-endian "
                                "GGUF files, as every published Wan GGUF is", fix="use the little-endian file")
    architecture = _architecture(path, reader, gguf)
    tensors = []
    for tensor in reader.tensors:
        stored = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        shape = _orig_shape(path, reader, tensor.name, stored, gguf) or stored
        tensors.append(GGUFTensor(tensor.name, int(tensor.tensor_type), tensor.tensor_type.name, shape, tensor.data))
    contents = GGUFContents(path, architecture, tensors)
    if check_types:
        check_tensor_types(contents)
    return contents


def check_tensor_types(contents: GGUFContents) -> None:
    """Every tensor is of a type we dequantise; otherwise one error naming the tensors, their types and ours."""
    unsupported = [f"'{t.name}' ({t.type_name})" for t in contents.tensors if not t.supported]
    if unsupported:
        shown = ", ".join(unsupported[:4]) + (f" and {len(unsupported) - 4} more" if len(unsupported) > 4 else "")
        raise BerniniError(f"GGUF file '{contents.path}' holds tensor(s) of types Bernini cannot dequantise: {shown}. "
                           f"Supported types: {', '.join(SUPPORTED_TYPE_NAMES)}; use a GGUF quantised to one of "
                           "them (e.g. Q8_0, Q6_K, Q5_K_M, Q4_K_M).")


def _architecture(path: Path, reader, gguf) -> Optional[str]:
    field = reader.get_field("general.architecture")
    if field is None:
        return None
    if field.types != [gguf.GGUFValueType.STRING]:
        raise broken_file(path, "has a corrupted GGUF header (general.architecture is not a string)")
    return bytes(field.parts[field.data[-1]]).decode("utf-8", "replace")


def _orig_shape(path: Path, reader, name: str, stored: tuple, gguf) -> Optional[tuple]:
    field = reader.get_field(ORIG_SHAPE_PREFIX + name)
    if field is None:
        return None
    ints = {gguf.GGUFValueType[t] for t in ("INT32", "UINT32", "INT64", "UINT64")}
    if len(field.types) != 2 or field.types[0] != gguf.GGUFValueType.ARRAY or field.types[1] not in ints:
        raise broken_file(path, f"has corrupted '{ORIG_SHAPE_PREFIX}{name}' metadata (not an array of integers)")
    shape = tuple(int(field.parts[index][0]) for index in field.data)
    if np.prod(shape, dtype=np.int64) != np.prod(stored, dtype=np.int64) or any(d <= 0 for d in shape):
        raise broken_file(path, f"has '{ORIG_SHAPE_PREFIX}{name}' = {list(shape)}, which does not hold the "
                                f"{int(np.prod(stored, dtype=np.int64))} values of tensor '{name}' {list(stored)}")
    return shape


# ---------------------------------------------------------------------------- why a file cannot be read
_FIXED_VALUE_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class _Short(Exception):
    """The file ends before the header part being read."""


def _unreadable(path: Path, size: int, exc: Exception, gguf) -> BerniniError:
    """The error for a file GGUFReader refused: walks the header itself to say which part is cut short or bad."""
    try:
        problem = _header_problem(path, size, gguf)
    except _Short:
        problem = f"is truncated: the file ends inside its GGUF header ({size} bytes; an interrupted download)"
    except (ValueError, OverflowError, struct.error, UnicodeDecodeError):
        problem = None
    return broken_file(path, problem or f"is not a readable GGUF file ({type(exc).__name__}: {exc}); it is "
                                        "corrupted or truncated")


def _header_problem(path: Path, size: int, gguf) -> Optional[str]:
    with open(path, "rb") as handle:
        def take(n: int) -> bytes:
            if n > size:
                raise _Short
            data = handle.read(n)
            if len(data) < n:
                raise _Short
            return data

        def number(fmt: str) -> int:
            return struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0]

        def skip_value(kind: int) -> Optional[int]:
            if kind in _FIXED_VALUE_BYTES:
                raw = take(_FIXED_VALUE_BYTES[kind])
                return struct.unpack("<I", raw)[0] if kind == 4 else None
            if kind == _STRING:
                take(number("Q"))
            elif kind == _ARRAY:
                item, count = number("I"), number("Q")
                if item in _FIXED_VALUE_BYTES:
                    take(count * _FIXED_VALUE_BYTES[item])
                else:
                    for _ in range(count):
                        skip_value(item)
            else:
                raise ValueError(f"unknown metadata value type {kind}")
            return None

        take(4)
        version = number("I")
        if version not in (2, 3):
            return f"has GGUF version {version}, which cannot be read (versions 2 and 3 can)"
        n_tensors, n_kv = number("Q"), number("Q")
        alignment = 32
        for _ in range(n_kv):
            key = take(number("Q")).decode("utf-8")
            value = skip_value(number("I"))
            if key == "general.alignment" and value:
                alignment = value
        infos = []
        for _ in range(n_tensors):
            name = take(number("Q")).decode("utf-8", "replace")
            dims = [number("Q") for _ in range(number("I"))]
            infos.append((name, dims, number("I"), number("Q")))
        start = -(-handle.tell() // alignment) * alignment
    known = {int(t): t for t in gguf.GGMLQuantizationType}
    for name, dims, code, offset in infos:
        if code not in known:
            return (f"holds tensor '{name}' of GGML type code {code}, which the installed gguf package does not know "
                    f"(a newer quantisation?); Bernini dequantises {', '.join(SUPPORTED_TYPE_NAMES)}")
        block, type_bytes = gguf.GGML_QUANT_SIZES[known[code]]
        end = start + offset + int(np.prod(dims, dtype=np.int64)) // block * type_bytes
        if end > size:
            return (f"is truncated: tensor '{name}' needs bytes up to {end} but the file holds {size} "
                    f"({end - size} missing; an interrupted download)")
    return None
