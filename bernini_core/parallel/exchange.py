"""Moving small results between the ranks of a parallel run without pickle: tensors, JSON metadata, and checks
that every rank works on the same thing (docs/architecture.md §5.1).

Everything here is a collective over ``group``: every member calls it in the same order, with the same ``src``
(a *global* rank that belongs to the group). ``group=None`` is the default (whole-world) group; when
torch.distributed is not initialised, or the group has one member, nothing is sent and the input comes back.

Wire format, with no pickle anywhere (a rank never unpickles bytes another process sent):
* ``broadcast_json``: the UTF-8 JSON text as a uint8 tensor, preceded by its length (an int64 tensor);
* ``broadcast_tensors``: a JSON header (names, shapes, dtypes; None values marked), then every non-empty tensor
  as its raw bytes (a contiguous tensor viewed as uint8), so any dtype (bf16, bool, complex...) crosses any backend,
  and receivers fill their final tensors in place (no staging copy).

Tensors travel on ``device``: a CUDA device for NCCL groups; for gloo the CPU (gloo also accepts CUDA tensors). When
``device`` is None it is the current CUDA device for an NCCL group and the CPU otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from ..errors import BerniniError

__all__ = ["broadcast_tensors", "broadcast_json", "broadcast_object", "broadcast_into", "check_identical",
           "flatten_tensors", "unflatten_tensors", "comm_device", "group_size", "dtype_name", "dtype_from_name"]


# ----------------------------------------------------------------------------- groups and devices
def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(group) -> int:
    """Members of ``group`` (1 when torch.distributed is not initialised)."""
    return dist.get_world_size(group) if _active() else 1


def comm_device(group, device=None) -> torch.device:
    """Where tensors for a collective over ``group`` must live: ``device`` if given, else the current CUDA device
    for an NCCL group and the CPU for anything else."""
    if device is not None:
        return torch.device(device)
    if _active() and "nccl" in str(dist.get_backend(group)).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_source(src: int, group) -> None:
    if group is None:
        if not 0 <= src < dist.get_world_size():
            raise BerniniError(f"broadcast: the source rank {src} is outside the world of {dist.get_world_size()}.")
        return
    try:
        dist.get_group_rank(group, src)
    except (ValueError, RuntimeError) as error:
        raise BerniniError(f"broadcast: the source rank {src} is not a member of the group ({error}).") from None


# ----------------------------------------------------------------------------- dtypes by name
_DTYPES = {str(t).removeprefix("torch."): t for t in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)}
for _name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):  # present in recent torch versions
    if hasattr(torch, _name):
        _DTYPES[_name] = getattr(torch, _name)


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if _DTYPES.get(name) is not dtype:
        raise BerniniError(f"cannot send tensors of dtype {dtype} between ranks.")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise BerniniError(f"a rank sent a tensor of unknown dtype {name!r}.")
    return _DTYPES[name]


# ----------------------------------------------------------------------------- raw bytes
def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 view (no copy): any dtype crosses any backend."""
    flat = tensor.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def broadcast_into(tensor: torch.Tensor, src: int, group) -> torch.Tensor:
    """Broadcast ``tensor`` from global rank ``src`` into the same-shaped, same-dtype, contiguous ``tensor`` of every
    other member (their buffers are overwritten in place, e.g. ``torch.empty_like``); returns ``tensor``. For
    tensors whose shape and dtype every rank already knows (a guidance arm's output)."""
    if group_size(group) == 1 or tensor.numel() == 0:
        return tensor
    if not tensor.is_contiguous():
        raise BerniniError("broadcast_into needs a contiguous tensor (it is filled in place).")
    dist.broadcast(_as_bytes(tensor), src=src, group=group)
    return tensor


def _send_bytes(payload: Optional[bytes], src: int, group, device: torch.device) -> bytes:
    """Length then bytes, from src to every member; returns the bytes everywhere."""
    is_src = dist.get_rank() == src
    length = torch.tensor([len(payload) if is_src else 0], dtype=torch.int64, device=device)
    dist.broadcast(length, src=src, group=group)
    size = int(length.item())
    if is_src:
        buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if size else \
            torch.empty(0, dtype=torch.uint8, device=device)
    else:
        buffer = torch.empty(size, dtype=torch.uint8, device=device)
    if size:
        dist.broadcast(buffer, src=src, group=group)
    return payload if is_src else bytes(buffer.cpu().numpy().tobytes())


# ----------------------------------------------------------------------------- public API
_ERROR_KEY = "__bernini_broadcast_error__"


def broadcast_json(obj: Any, src: int, group=None, device=None) -> Any:
    """Send a small JSON-able value (numbers, strings, lists, dicts with string keys, None) from global rank
    ``src`` to every member of ``group``; returns it on every rank (on ``src``: the value after a JSON round trip,
    so all ranks hold equal values, e.g. tuples become lists). Other ranks' ``obj`` is ignored."""
    return _broadcast_json(obj, src, group, device)


def _broadcast_json(obj: Any, src: int, group, device, error: Optional[str] = None) -> Any:
    """broadcast_json; ``error`` (on src): send a failure instead, so the receivers raise too rather than hang."""
    if group_size(group) == 1:
        if error is not None:
            raise BerniniError(error)
        return json.loads(json.dumps(obj))
    _check_source(src, group)
    device = comm_device(group, device)
    payload = None
    if dist.get_rank() == src and error is None:
        try:
            payload = json.dumps(obj, separators=(",", ":")).encode("utf-8")
        except (TypeError, ValueError) as failure:
            error = f"broadcast_json: the value cannot be sent as JSON ({failure})."
    if error is not None:  # only on src
        _send_bytes(json.dumps({_ERROR_KEY: error}).encode("utf-8"), src, group, device)
        raise BerniniError(error)
    value = json.loads(_send_bytes(payload, src, group, device).decode("utf-8"))
    if isinstance(value, dict) and set(value) == {_ERROR_KEY}:
        raise BerniniError(f"rank {src} could not send its data: {value[_ERROR_KEY]}")
    return value


def broadcast_tensors(tensors: Optional[Mapping[str, Optional[torch.Tensor]]], src: int, group=None,
                      device=None) -> dict[str, Optional[torch.Tensor]]:
    """Send a dict of tensors (any dtype and shape, zero-size included; a None value arrives as None) from global
    rank ``src`` to every member of ``group``. Returns {name: tensor on ``device``} in the sender's order on every
    rank, the sender included (its tensors moved to ``device``, made contiguous; detached). Other ranks pass None
    (their argument is ignored).

    A header goes first (JSON of names, shapes, dtypes), then each non-empty tensor's bytes in one broadcast each,
    received straight into the returned tensors."""
    device = comm_device(group, device)
    is_src = not _active() or dist.get_rank() == src
    header, error = None, None
    if is_src:
        tensors = {} if tensors is None else tensors
        try:
            header = _header(tensors)
        except BerniniError as failure:
            error = str(failure)
    if group_size(group) == 1:
        if error is not None:
            raise BerniniError(error)
        return {name: None if t is None else t.detach().to(device).contiguous() for name, t in tensors.items()}
    header = _broadcast_json(header, src, group, device, error)
    out: dict[str, Optional[torch.Tensor]] = {}
    for name, shape, dtype in header:
        if shape is None:
            out[name] = None
            continue
        if is_src:
            tensor = tensors[name].detach().to(device).contiguous()
        else:
            tensor = torch.empty(shape, dtype=dtype_from_name(dtype), device=device)
        if tensor.numel():
            dist.broadcast(_as_bytes(tensor), src=src, group=group)
        out[name] = tensor
    return out


def _header(tensors) -> list:
    """[[name, shape, dtype name] or [name, None, None] for a None value, ...] in the dict's order."""
    if not isinstance(tensors, Mapping):
        raise BerniniError(f"broadcast_tensors: expected a dict of tensors, got {type(tensors).__name__}.")
    header = []
    for name, value in tensors.items():
        if not isinstance(name, str) or not (value is None or isinstance(value, torch.Tensor)):
            raise BerniniError(f"broadcast_tensors: {name!r} must be a string naming a tensor or None, "
                               f"got a {type(value).__name__}.")
        header.append([name, None, None] if value is None else [name, list(value.shape), dtype_name(value.dtype)])
    return header


def check_identical(value: Any, group, what: str, device=None) -> None:
    """Raise BerniniError on every member unless all members pass an equal JSON-able ``value`` (compared by a
    SHA-256 digest, one all-gather of 8 bytes). ``what`` names the value in the message."""
    size = group_size(group)
    if size == 1:
        return
    device = comm_device(group, device)
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    digest = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little", signed=True)
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(every, mine, group=group)
    digests = [int(t.item()) for t in every]
    if len(set(digests)) > 1:
        ranks = [dist.get_global_rank(group, i) if group is not None else i for i in range(size)]
        groups: dict[int, list[int]] = {}
        for rank, d in zip(ranks, digests):
            groups.setdefault(d, []).append(rank)
        described = "; ".join(f"ranks {members}" for members in groups.values())
        raise BerniniError(f"the ranks of one parallel group disagree about {what} ({described} hold different "
                           "values): every rank of a group must be given the same inputs and settings.")


# ----------------------------------------------------------------------------- structures with tensors inside
_TRUSTED_PACKAGE = "bernini_core."  # dataclasses are rebuilt only from this package's modules


def flatten_tensors(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able description, {name: tensor}) of a structure made of dicts, lists, tuples, None, bool, int, float,
    str, torch dtypes, tensors and dataclasses of bernini_core (e.g. PromptEmbeds, Sources, a combos dict,
    guidance arms). ``unflatten_tensors`` rebuilds it; the pair is what ``broadcast_object`` sends."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x):
        if isinstance(x, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = x
            return {"__tensor__": name}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, torch.dtype):
            return {"__dtype__": dtype_name(x)}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, dict):
            return {"__dict__": [[walk(k), walk(v)] for k, v in x.items()]}
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            cls = type(x)
            if not cls.__module__.startswith(_TRUSTED_PACKAGE):
                raise BerniniError(f"cannot send a {cls.__module__}.{cls.__qualname__} between ranks (only "
                                   "bernini_core's own dataclasses).")
            fields = {f.name: walk(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init}
            return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
        raise BerniniError(f"cannot send a {type(x).__name__} between ranks (tensors, numbers, strings, lists, "
                           "tuples, dicts and bernini_core dataclasses only).")

    return walk(obj), tensors


def _trusted_class(where: str):
    module_name, _, qualname = where.partition(":")
    if not module_name.startswith(_TRUSTED_PACKAGE):
        raise BerniniError(f"a rank sent a {where}, which is not a bernini_core dataclass.")
    target = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    if not (isinstance(target, type) and dataclasses.is_dataclass(target)):
        raise BerniniError(f"a rank sent a {where}, which is not a dataclass.")
    return target


def unflatten_tensors(meta: Any, tensors: Mapping[str, Optional[torch.Tensor]]) -> Any:
    """The structure ``flatten_tensors`` described, with its tensors taken from ``tensors``."""

    def walk(x):
        if isinstance(x, list):
            return [walk(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            return tensors[x["__tensor__"]]
        if "__dtype__" in x:
            return dtype_from_name(x["__dtype__"])
        if "__tuple__" in x:
            return tuple(walk(v) for v in x["__tuple__"])
        if "__dict__" in x:
            return {walk(k): walk(v) for k, v in x["__dict__"]}
        if "__dataclass__" in x:
            return _trusted_class(x["__dataclass__"])(**{k: walk(v) for k, v in x["fields"].items()})
        raise BerniniError(f"a rank sent an unknown structure {sorted(x)}.")

    return walk(meta)


def broadcast_object(obj: Any, src: int, group=None, device=None) -> Any:
    """Send a structure with tensors inside (see ``flatten_tensors``) from global rank ``src`` to every member of
    ``group``, without pickle; returns it on every rank with its tensors on ``device`` (the sender's own tensors
    too, moved there). Other ranks' ``obj`` is ignored."""
    is_src = not _active() or dist.get_rank() == src
    meta, tensors, error = None, None, None
    if is_src:
        try:
            meta, tensors = flatten_tensors(obj)
        except BerniniError as failure:
            error = str(failure)
    meta = _broadcast_json(meta, src, group, device, error)
    return unflatten_tensors(meta, broadcast_tensors(tensors, src, group, device))
