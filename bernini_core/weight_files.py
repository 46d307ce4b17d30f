"""Broken or foreign weight and config files, named before any heavy work.

A truncated shard, a garbage header, a pickle renamed ``.safetensors``, a shard that lacks a tensor its index
lists, a config value of the wrong JSON type: each becomes one BerniniError that names the file, says what is
wrong and how to get a good copy (``broken_file``), instead of a traceback from safetensors, json or transformers
half-way through a load. Only headers are read (the 8-byte length and the JSON header of a safetensors file);
nothing is ever unpickled: foreign formats are told apart by their first bytes.
"""

from __future__ import annotations

import json
import shlex
import types
import typing
from collections.abc import Mapping
from pathlib import Path

from .errors import BerniniError

# Hub repositories of downloads Bernini points people to, by folder name (download.OFFICIAL_MODELS adds Bernini's
# own): a broken file inside such a folder gets the exact `hf download` command that replaces it.
_OTHER_REPOS = {"Wan2.2-T2V-A14B-Diffusers": "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
                "Wan2.1-T2V-1.3B-Diffusers": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
# Bits per element of every safetensors dtype (safetensors 0.8); an unknown code skips only the size check.
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
               "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
               "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model", "vocab.json")


# ---------------------------------------------------------------------------- the one error
def hub_origin(path) -> tuple[str, Path, bool] | None:
    """(repo id, folder the repo was downloaded into, whether that is the Hugging Face cache) for a path inside a
    known download: a folder named like an official repository, or a hub cache snapshot."""
    # Imported here: download imports checkpoints, which imports this module.
    from .download import OFFICIAL_MODELS

    repos = {**_OTHER_REPOS, **OFFICIAL_MODELS}
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if folder.name in repos:
            return repos[folder.name], folder, False
        cache = folder.parent.parent.name
        if folder.parent.name == "snapshots" and cache.startswith("models--") and "--" in cache[8:]:
            return cache[8:].replace("--", "/", 1), folder, True
    return None


def refetch_hint(path) -> str:
    """How to get a good copy of ``path``: the `hf download` command when the repository is known."""
    origin = hub_origin(path)
    if origin is None:
        return "re-download it (or copy it again from where it came from)"
    repo, folder, cached = origin
    path = Path(path).absolute()
    relative = path.relative_to(folder).as_posix()
    if relative == ".":
        what = ""
    elif path.is_dir():
        what = " --include " + shlex.quote(relative + "/*")
    else:
        what = " " + shlex.quote(relative)
    where = "" if cached else f" --local-dir {shlex.quote(str(folder))}"
    # --force-download: a file already there is replaced even when hf's own bookkeeping calls it complete.
    return f"re-download it with `hf download {repo}{what}{where} --force-download`"


def broken_file(path, problem: str, fix: str | None = None) -> BerniniError:
    """The error for a broken or foreign file: "'<path>' <problem>; <fix>." (default fix: re-download it)."""
    return BerniniError(f"'{path}' {problem}; {fix or refetch_hint(path)}.")


# ---------------------------------------------------------------------------- safetensors headers
def foreign_format(head: bytes) -> str | None:
    """What a file that is not safetensors is, judged from its first bytes; None when unrecognised."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive, i.e. a PyTorch checkpoint written by torch.save (a pickle) under a .safetensors name"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (an old-style PyTorch checkpoint) under a .safetensors name"
    if head.startswith(b"GGUF"):
        return "a GGUF file"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights (the repository was cloned without git-lfs)"
    if head.lstrip()[:1] == b"<":
        return "an HTML/XML page (a download that saved an error page)"
    return None


def read_safetensors_header(path) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor entries, ``__metadata__``) of a safetensors file, after checking the header describes exactly the
    bytes the file holds: what safetensors itself would refuse later (truncation, bad offsets, shapes that do not
    match their byte ranges) is refused here, naming the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(32)
        if len(head) < 8:
            raise broken_file(path, f"is not a safetensors file: it holds only {size} bytes (an interrupted download?)")
        foreign = foreign_format(head)
        if foreign:
            raise broken_file(path, f"is not a safetensors file: it is {foreign}. Bernini reads safetensors weights "
                                    "only and never unpickles")
        length = int.from_bytes(head[:8], "little")
        if length < 2 or length > MAX_HEADER_BYTES:
            raise broken_file(path, f"is not a safetensors file (its header length field reads {length} bytes); it "
                                    "is corrupted or of another format")
        if 8 + length > size:
            raise broken_file(path, f"is truncated: its {length}-byte header does not fit in the {size} bytes the "
                                    "file holds (an interrupted download)")
        handle.seek(8)
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise broken_file(path, f"has a corrupted safetensors header ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise broken_file(path, "has a corrupted safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise broken_file(path, "has a corrupted safetensors header (__metadata__ is not a map of strings)")
    _check_entries(path, header, data_bytes=size - 8 - length)
    return header, metadata


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entries(path: Path, header: dict, data_bytes: int) -> None:
    """Each entry has a dtype, a shape and a byte range of the size they imply; the ranges tile the data."""
    spans = []
    for key, entry in header.items():
        def bad(why: str, key=key):
            return broken_file(path, f"has a corrupted safetensors header: tensor '{key}' {why}")

        if not isinstance(entry, dict):
            raise bad("is not described by a JSON object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or not dtype:
            raise bad(f"has dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise bad(f"has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise bad(f"has data_offsets {offsets!r}")
        if dtype in _DTYPE_BITS:
            numel = 1
            for dim in shape:
                numel *= dim
            need = numel * _DTYPE_BITS[dtype]
            if need % 8 or need // 8 != offsets[1] - offsets[0]:
                raise bad(f"({dtype}, shape {shape}) needs {need / 8:g} bytes but its data_offsets span "
                          f"{offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            raise broken_file(path, f"has a corrupted safetensors header: tensor '{key}' starts at byte {begin} of "
                                    f"the data, where {end} was expected")
        end = stop
    if end > data_bytes:
        raise broken_file(path, f"is truncated: its header describes {end} bytes of tensor data but only "
                                f"{data_bytes} follow it ({end - data_bytes} missing; an interrupted download)")
    if end < data_bytes:
        raise broken_file(path, f"is corrupted: it holds {data_bytes - end} bytes more than its header describes")


# ---------------------------------------------------------------------------- typed config values
_KIND_OF_TYPE = {bool: "bool", int: "int", float: "number", str: "str", tuple: "list", list: "list",
                 dict: "dict", type(None): "null"}
_KIND_TEXT = {"bool": "a JSON boolean (true or false, without quotes)", "int": "an integer (without quotes)",
              "number": "a number (without quotes)", "str": "a string", "list": "a JSON array",
              "dict": "a JSON object", "null": "null"}
_VALUE_TEXT = {"bool": "a boolean", "int": "an integer", "number": "a decimal number", "str": "a string",
               "list": "an array", "dict": "an object", "null": "null"}


def _kinds(annotation) -> frozenset | None:
    """The JSON kinds a field annotation allows; None for annotations JSON cannot be checked against (Any)."""
    origin = typing.get_origin(annotation)
    parts = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (annotation,)
    kinds = set()
    for part in parts:
        part = typing.get_origin(part) or part
        if part not in _KIND_OF_TYPE:
            return None
        kinds.add(_KIND_OF_TYPE[part])
    return frozenset(kinds)


def _kind_of(value) -> str:
    if value is None:
        return "null"
    for kind_type in (bool, int, float, str, list, dict):  # bool before int: True is an int in Python
        if isinstance(value, kind_type):
            return _KIND_OF_TYPE[kind_type]
    return type(value).__name__


def field_types(cls, *, scalars_only: bool = False) -> dict[str, frozenset]:
    """{field: JSON kinds} of a dataclass, read from its annotations (so the checks follow the fields)."""
    import dataclasses

    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        kinds = _kinds(hints[f.name])
        if kinds is not None and not (scalars_only and kinds & {"list", "dict"}):
            out[f.name] = kinds
    return out


def check_config_types(path, data: Mapping, expected: Mapping, prefix: str = "") -> None:
    """Every key of ``data`` that ``expected`` names holds a value of its JSON type: bools are JSON booleans,
    ints integers, floats numbers. Values are types (``int``, ``Optional[str]``) or kind sets (field_types)."""
    for key, want in expected.items():
        if key not in data:
            continue
        kinds = want if isinstance(want, frozenset) else _kinds(want)
        value = data[key]
        kind = _kind_of(value)
        if kinds is None or kind in kinds or (kind == "int" and "number" in kinds):
            continue
        wanted = " or ".join(_KIND_TEXT[k] for k in sorted(kinds, key=list(_KIND_TEXT).index))
        raise config_error(path, prefix + key, value, f"is {_VALUE_TEXT.get(kind, kind)}, but must be {wanted}")


def config_error(path, key: str, value, why: str) -> BerniniError:
    """A config value that cannot be right: names the file, the key and the value."""
    shown = json.dumps(value, ensure_ascii=False)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return broken_file(path, f"has '{key}' = {shown}, which {why}",
                       fix=f"correct it in that file, or {refetch_hint(path)}")


def check_tokenizer_folder(folder, what: str) -> None:
    """A tokenizer folder must hold a tokenizer (transformers 5 otherwise builds an empty one without a word)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise broken_file(folder, f"(the {what} tokenizer folder) does not exist")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise broken_file(folder, f"holds no {what} tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    for path in sorted(folder.glob("*.json")):  # a truncated download fails here, not deep inside transformers
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise broken_file(path, f"is not valid JSON ({type(exc).__name__}: {str(exc)[:120]})") from None


__all__ = ["broken_file", "check_config_types", "check_tokenizer_folder", "config_error", "field_types",
           "foreign_format", "hub_origin", "read_safetensors_header", "refetch_hint"]
