"""Reading checkpoints: lazy safetensors sources, layout detection, shard-by-shard loading.

Nothing here unpickles: ``.bin``/``.pt``/``.pth``/``.ckpt`` files are refused with a
message (docs/architecture.md §7). Loading never holds two full copies of a model: tensors
are read one shard at a time, cast, and assigned into a module that may live on
the meta device (docs/architecture.md §5).
"""

import enum
import json
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, TypeVar, Union

import torch

from .errors import BerniniError
from .keymaps.wan_dit import is_diffusers_dit_keys, is_original_wan_keys
from .weight_files import broken_file, check_config_types, refetch_hint
from .weight_files import read_safetensors_header as _checked_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_SUFFIX = ".safetensors.index.json"

# The official prefix search for split renderer checkpoints, in order (official `bernini/weights.py`,
# docs/official_behaviour.md §2.3).
HIGH_NOISE_PREFIXES = ("diff_dec.transformer.", "transformer.", "")
LOW_NOISE_PREFIXES = ("diff_dec.transformer_2.", "transformer_2.", "")
EMA_PREFIX = "ema."

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
T = TypeVar("T")


def _refuse_pickle(path: Path) -> None:
    raise BerniniError(
        f"'{path}' is a pickle checkpoint ({path.suffix}). Bernini loads safetensors only, because "
        f"unpickling can run arbitrary code; use the .safetensors release of this model."
    )


def read_json(path) -> dict:
    """Parse a JSON object file; a missing or corrupted file becomes a BerniniError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise broken_file(path, "is missing: the model folder is incomplete") from None
    except UnicodeDecodeError:
        raise broken_file(path, "is not a UTF-8 text file; it is probably corrupted") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise broken_file(path, f"is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); the file "
                                f"is probably corrupted or truncated") from None
    if not isinstance(data, dict):
        raise broken_file(path, f"must hold a JSON object, found {type(data).__name__}")
    return data


def read_config(path, build: Callable[[dict], T], types: Optional[dict] = None) -> T:
    """``build(data)`` of a JSON config file, after checking the JSON types of the keys ``types`` names
    (weight_files.check_config_types); every BerniniError the build raises names the file."""
    path = Path(path)
    data = read_json(path)
    if types:
        check_config_types(path, data, types)
    try:
        return build(data)
    except BerniniError as exc:
        if str(path) in str(exc):
            raise
        raise BerniniError(f"'{path}': {exc}") from None


def read_safetensors_header(path) -> Tuple[Dict[str, dict], Dict[str, str]]:
    """(tensor entries {key: {"dtype", "shape", ...}}, ``__metadata__``) without touching tensor data; a
    truncated, corrupted or foreign file is refused naming it (weight_files.read_safetensors_header)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        _refuse_pickle(path)
    return _checked_header(path)


def _select(keys: Iterable[str], prefix: str, prefer_ema: bool) -> Dict[str, str]:
    """{exposed name: stored key} for keys under ``prefix``; with ``prefer_ema`` an ``ema.`` copy wins."""
    chosen: Dict[str, str] = {}
    for key in keys:
        is_ema = prefer_ema and key.startswith(EMA_PREFIX)
        base = key[len(EMA_PREFIX):] if is_ema else key
        if not base.startswith(prefix):
            continue
        name = base[len(prefix):]
        if name not in chosen or (is_ema and not chosen[name].startswith(EMA_PREFIX)):
            chosen[name] = key
    return chosen


class TensorSource:
    """A lazy, read-only view over safetensors weights: one file, an indexed shard set, or a folder of shards.

    Keys are exposed after an optional prefix selection (``prefix`` stripped,
    ``ema.`` copies preferred when asked). Opening reads headers / the index only.
    """

    def __init__(self, path: Path, stored: Dict[str, Path], entries: Dict[str, str]):
        self.path = path
        self._stored = stored          # stored key -> file
        self._entries = entries        # exposed name -> stored key
        self._headers: Dict[Path, Tuple[dict, dict]] = {}

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def open(cls, path, *, prefix: str = "", prefer_ema: bool = False) -> "TensorSource":
        path = Path(path)
        if not path.exists():
            raise BerniniError(f"Checkpoint '{path}' does not exist; check the path.")
        if path.is_file():
            stored = cls._stored_from_file(path)
        else:
            stored = cls._stored_from_dir(path)
        return cls(path, stored, {}).select(prefix, prefer_ema)

    @staticmethod
    def _stored_from_file(path: Path) -> Dict[str, Path]:
        name = path.name.lower()
        if name.endswith(INDEX_SUFFIX):
            return TensorSource._stored_from_index(path)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        if not name.endswith(".safetensors"):
            raise BerniniError(f"'{path}' is not a .safetensors file or index; Bernini loads safetensors only.")
        header, _ = read_safetensors_header(path)
        return {key: path for key in header}

    @staticmethod
    def _stored_from_index(index: Path) -> Dict[str, Path]:
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise broken_file(index, "has no 'weight_map'; the file is corrupted")
        if not all(isinstance(v, str) and v.endswith(".safetensors") for v in weight_map.values()):
            raise broken_file(index, "has a 'weight_map' whose values are not .safetensors file names; the file is "
                                     "corrupted")
        files = {shard: index.parent / shard for shard in set(weight_map.values())}
        for shard, file in sorted(files.items()):
            if not file.is_file():
                raise BerniniError(f"Shard '{shard}' named in index '{index}' is missing; the download is incomplete: "
                                   f"{refetch_hint(file)}.")
        # Every shard's header is checked now, before anything is built: a truncated shard, or one from another
        # download that lacks tensors the index lists, is named here rather than deep inside a load.
        listed: Dict[str, List[str]] = {}
        for key, shard in weight_map.items():
            listed.setdefault(shard, []).append(key)
        for shard, keys in sorted(listed.items()):
            header, _ = read_safetensors_header(files[shard])
            lacking = [key for key in keys if key not in header]
            if lacking:
                raise broken_file(files[shard], f"lacks {len(lacking)} tensor(s) that the index '{index.name}' "
                                                f"lists ({_listing(lacking, 3)}): it is from another download or "
                                                f"was overwritten")
        return {key: files[shard] for key, shard in weight_map.items()}

    @staticmethod
    def _stored_from_dir(path: Path) -> Dict[str, Path]:
        indexes = sorted(path.glob("*" + INDEX_SUFFIX))
        if len(indexes) > 1:
            names = ", ".join(i.name for i in indexes)
            raise BerniniError(f"'{path}' holds several shard indexes ({names}); pass the one to load.")
        if indexes:
            return TensorSource._stored_from_index(indexes[0])
        shards = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        if not shards:
            pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                _refuse_pickle(path / pickles[0])
            raise BerniniError(f"'{path}' contains no .safetensors weights.")
        stored: Dict[str, Path] = {}
        for shard in shards:
            header, _ = read_safetensors_header(shard)
            stored.update({key: shard for key in header})
        return stored

    def select(self, prefix: str = "", prefer_ema: bool = False) -> "TensorSource":
        """A new view over the same files with another prefix / EMA selection (applied to stored keys)."""
        return TensorSource(self.path, self._stored, _select(self._stored, prefix, prefer_ema))

    # -- queries ------------------------------------------------------------------------------
    def keys(self) -> List[str]:
        return list(self._entries)

    def stored_keys(self) -> List[str]:
        """All keys as written in the files, before prefix / EMA selection."""
        return list(self._stored)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def files(self) -> List[Path]:
        return sorted({self._stored[k] for k in self._entries.values()})

    def _header(self, file: Path) -> Tuple[dict, dict]:
        if file not in self._headers:
            self._headers[file] = read_safetensors_header(file)
        return self._headers[file]

    def _info(self, key: str) -> dict:
        stored = self._stored_key(key)
        entry = self._header(self._stored[stored])[0].get(stored)
        if entry is None:
            raise BerniniError(f"'{stored}' is listed in the index of '{self.path}' but missing from its shard "
                               f"'{self._stored[stored].name}'; the download is corrupted.")
        return entry

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self._info(key)["shape"])

    def dtype(self, key: str) -> torch.dtype:
        code = self._info(key)["dtype"]
        if code not in _SAFETENSORS_DTYPES:
            raise BerniniError(f"Tensor '{key}' in '{self.path}' has unsupported dtype {code}.")
        return _SAFETENSORS_DTYPES[code]

    def metadata(self) -> Dict[str, str]:
        """The ``__metadata__`` header of the first file (e.g. ComfyUI's ``_quantization_metadata``)."""
        files = self.files() or sorted(set(self._stored.values()))
        return dict(self._header(files[0])[1]) if files else {}

    def _stored_key(self, key: str) -> str:
        try:
            return self._entries[key]
        except KeyError:
            raise BerniniError(f"Tensor '{key}' is not in checkpoint '{self.path}'.") from None

    # -- reading ------------------------------------------------------------------------------
    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        stored = self._stored_key(key)
        with safe_open(str(self._stored[stored]), framework="pt", device="cpu") as handle:
            return handle.get_tensor(stored)

    def iter_shards(self) -> Iterator[Dict[str, torch.Tensor]]:
        """Yield {name: tensor} for one file at a time, in file order; never all shards at once."""
        from safetensors import safe_open

        by_file: Dict[Path, List[Tuple[str, str]]] = {}
        for name, stored in self._entries.items():
            by_file.setdefault(self._stored[stored], []).append((name, stored))
        for file in sorted(by_file):
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                shard = {name: handle.get_tensor(stored) for name, stored in by_file[file]}
            yield shard
            del shard


def find_prefix(keys: Iterable[str], candidates: Sequence[str]) -> str:
    """First candidate that selects at least one key (``ema.`` copies count), the official order of
    docs/official_behaviour.md §2.3."""
    keys = list(keys)
    for prefix in candidates:
        if _select(keys, prefix, prefer_ema=True):
            return prefix
    raise BerniniError(f"No checkpoint keys start with any of {list(candidates)}; this is not a renderer checkpoint.")


def split_checkpoint_source(path, which: str) -> TensorSource:
    """The high- or low-noise expert of an official split Bernini-R checkpoint (docs/official_behaviour.md §2.3), bare
    diffusers keys.

    ``path`` may be the expert's folder, its index or file, or the release folder
    holding ``bernini_renderer_high/`` and ``bernini_renderer_low/``.
    """
    if which not in ("high", "low"):
        raise BerniniError(f"which must be 'high' or 'low', got {which!r}.")
    path = Path(path)
    subdir = path / f"bernini_renderer_{which}"
    if path.is_dir() and subdir.is_dir():
        path = subdir
    raw = TensorSource.open(path)
    own, other = (HIGH_NOISE_PREFIXES, LOW_NOISE_PREFIXES) if which == "high" else (LOW_NOISE_PREFIXES, HIGH_NOISE_PREFIXES)
    prefix = find_prefix(raw.stored_keys(), own)
    if prefix == "" and find_prefix(raw.stored_keys(), other) == other[0]:
        swap = "low" if which == "high" else "high"
        raise BerniniError(f"'{path}' holds the {swap}-noise expert ('{other[0]}' keys) but was given as the "
                           f"{which}-noise checkpoint; swap the high/low checkpoint inputs.")
    return raw.select(prefix, prefer_ema=True)


class LoadReport(NamedTuple):
    missing: List[str]
    unexpected: List[str]


def _listing(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def load_weights_(module: torch.nn.Module, source: Union[TensorSource, Iterable[dict], dict], *,
                  dtype_for: Optional[Callable[[str], Optional[torch.dtype]]] = None,
                  key_map: Optional[Callable[[str], Optional[str]]] = None,
                  strict: bool = True, device="cpu", origin: Optional[str] = None) -> LoadReport:
    """Assign checkpoint tensors into ``module`` (which may sit on the meta device), shard by shard.

    Each tensor is renamed by ``key_map`` (None drops it), cast to ``dtype_for(name)``
    (None or no policy: the parameter's current dtype) and moved to ``device`` as it
    is assigned, so at most one shard's source tensors exist besides the model.
    Modules may refine the dtype (``_bernini_load_dtype``) and provide defaults for
    tensors a checkpoint may omit (``_bernini_missing_defaults``), as fp8 layers do.
    Tied parameters stay tied. Non-persistent buffers are left to the caller.
    """
    if isinstance(source, TensorSource):
        origin = origin or str(source.path)
        shards: Iterable[dict] = source.iter_shards()
    else:
        shards = [source] if isinstance(source, dict) else source
    origin = origin or "the checkpoint"
    device = torch.device(device)

    modules = dict(module.named_modules(remove_duplicate=False))  # tied modules appear under every path
    expected = set(module.state_dict(keep_vars=True).keys())
    aliases: Dict[int, List[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    alias_of = {name: names for names in aliases.values() if len(names) > 1 for name in names}

    loaded, unexpected = set(), []
    for shard in shards:
        for name, tensor in shard.items():
            target = key_map(name) if key_map is not None else name
            if target is None:
                continue
            owner_path, _, leaf = target.rpartition(".")
            owner = modules.get(owner_path)
            current = None
            if owner is not None:
                current = owner._parameters.get(leaf) if leaf in owner._parameters else owner._buffers.get(leaf)
            if current is None:
                unexpected.append(name)
                continue
            if tuple(tensor.shape) != tuple(current.shape):
                if tensor.numel() == 1 and current.numel() == 1:
                    tensor = tensor.reshape(current.shape)
                else:
                    raise BerniniError(
                        f"'{name}' in {origin} has shape {tuple(tensor.shape)} but the model expects "
                        f"{tuple(current.shape)} for '{target}'; the checkpoint belongs to a different model "
                        f"size or config than the one being built."
                    )
            dtype = dtype_for(target) if dtype_for is not None else None
            dtype = current.dtype if dtype is None else dtype
            refine = getattr(owner, "_bernini_load_dtype", None)
            if refine is not None:
                dtype = refine(leaf, tensor, dtype)
            value = tensor.to(device=device, dtype=dtype)
            if leaf in owner._parameters:
                param = torch.nn.Parameter(value, requires_grad=False)
                for alias in alias_of.get(target, [target]):
                    alias_owner, _, alias_leaf = alias.rpartition(".")
                    modules[alias_owner]._parameters[alias_leaf] = param
                    loaded.add(alias)
            else:
                owner._buffers[leaf] = value
                loaded.add(target)

    missing = []
    for name in sorted(expected - loaded):
        owner_path, _, leaf = name.rpartition(".")
        owner = modules[owner_path]
        defaults = getattr(owner, "_bernini_missing_defaults", None)
        default = defaults().get(leaf) if defaults is not None else None
        if default is None:
            missing.append(name)
            continue
        current = owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]
        value = torch.full(tuple(current.shape), default, dtype=current.dtype, device=device)
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value

    if strict and (missing or unexpected):
        parts = [f"Checkpoint {origin} does not match the model being loaded."]
        if missing:
            parts.append(f"Missing {len(missing)} tensor(s): {_listing(missing)}.")
        if unexpected:
            parts.append(f"Unexpected {len(unexpected)} tensor(s): {_listing(sorted(unexpected))}.")
        parts.append("Check that the file is the right model (and expert) for this loader.")
        raise BerniniError(" ".join(parts))
    return LoadReport(missing, sorted(unexpected))


class Layout(enum.Enum):
    RENDERER_DIFFUSERS = "Bernini-R-Diffusers folder"
    WAN_DIFFUSERS = "Wan2.x -Diffusers folder (model_index.json)"
    SPLIT_RENDERER = "Bernini-R split checkpoints (bernini_renderer_high / bernini_renderer_low)"
    BERNINI_FULL = "Bernini-Diffusers folder (full planner + renderer)"
    WAN_SINGLE_FILE = "single .safetensors file with original Wan / ComfyUI key names"
    DIFFUSERS_SINGLE_FILE = "single .safetensors file with diffusers key names"


_ACCEPTED = "; ".join(layout.value for layout in Layout)
_SPLIT_MARKERS = tuple(p for p in HIGH_NOISE_PREFIXES + LOW_NOISE_PREFIXES if p.startswith("diff_dec."))


def _has_split_keys(keys: Iterable[str]) -> bool:
    for key in keys:
        bare = key[len(EMA_PREFIX):] if key.startswith(EMA_PREFIX) else key
        if bare.startswith(_SPLIT_MARKERS):
            return True
    return False


def _detect_file(path: Path) -> Layout:
    name = path.name.lower()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        _refuse_pickle(path)
    if name in ("config.json", "model_index.json"):
        return detect_layout(path.parent)
    if name.endswith(INDEX_SUFFIX):
        keys = TensorSource.open(path).stored_keys()
        if _has_split_keys(keys):
            return Layout.SPLIT_RENDERER
        raise BerniniError(f"'{path}' is a shard index of another kind; pass the model folder instead of the index.")
    if not name.endswith(".safetensors"):
        raise BerniniError(f"'{path}' is not a .safetensors file. Accepted: {_ACCEPTED}.")
    keys = list(read_safetensors_header(path)[0])
    if _has_split_keys(keys):
        return Layout.SPLIT_RENDERER
    if is_original_wan_keys(keys):
        return Layout.WAN_SINGLE_FILE
    if is_diffusers_dit_keys(keys):
        return Layout.DIFFUSERS_SINGLE_FILE
    raise BerniniError(f"'{path}' holds no Wan diffusion-transformer weights (first keys: {_listing(sorted(keys), 5)}); "
                       f"expected a Wan2.x / Bernini-R diffusion model file. Accepted: {_ACCEPTED}.")


def detect_layout(path) -> Layout:
    """Which of the supported checkpoint layouts ``path`` is; a clear BerniniError otherwise."""
    path = Path(path)
    if not path.exists():
        raise BerniniError(f"Model path '{path}' does not exist; check the path or download the model first.")
    if path.is_file():
        return _detect_file(path)
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        raise BerniniError(f"Model folder '{path}' is empty; download the model into it. Accepted: {_ACCEPTED}.")

    config_path = path / "config.json"
    if config_path.is_file():
        config = read_json(config_path)
        model_type = config.get("model_type")
        if model_type == "bernini_renderer":
            if not (path / "transformer").is_dir():
                raise BerniniError(
                    f"'{path}' is a renderer config folder without weights (no transformer/). Pass a "
                    f"Bernini-R-Diffusers folder, or the split checkpoints bernini_renderer_high/low with a "
                    f"Wan2.2 -Diffusers base."
                )
            check_config_types(config_path, config, {"skip_transformer_2": bool})  # "false" would read as true
            if not config.get("skip_transformer_2", False) and not (path / "transformer_2").is_dir():
                raise BerniniError(f"'{path}' lacks transformer_2/ (the low-noise expert) although its config.json "
                                   f"does not set skip_transformer_2; the download is incomplete.")
            return Layout.RENDERER_DIFFUSERS
        if model_type == "bernini":
            missing = [d for d in ("bernini", "mllm") if not (path / d).is_dir()]
            if missing:
                raise BerniniError(f"'{path}' is a Bernini-Diffusers folder but lacks {', '.join(d + '/' for d in missing)}; "
                                   f"the download is incomplete.")
            return Layout.BERNINI_FULL
        if config.get("_class_name") or model_type:
            kind = config.get("_class_name") or model_type
            raise BerniniError(f"'{path}' holds a config.json for '{kind}': a single component or another kind "
                               f"of model, not a whole Bernini / Wan model. If it is a component (transformer/, "
                               f"vae/ ...), pass its parent folder. Accepted: {_ACCEPTED}.")
    if (path / "model_index.json").is_file():
        read_json(path / "model_index.json")
        return Layout.WAN_DIFFUSERS
    if (path / "bernini_renderer_high").is_dir() or (path / "bernini_renderer_low").is_dir():
        return Layout.SPLIT_RENDERER
    if any(e.endswith((".safetensors", INDEX_SUFFIX)) for e in entries):
        if _has_split_keys(TensorSource.open(path).stored_keys()):
            return Layout.SPLIT_RENDERER
    if any(e.lower().endswith(PICKLE_SUFFIXES) for e in entries) and not any(e.endswith(".safetensors") for e in entries):
        _refuse_pickle(path / next(e for e in entries if e.lower().endswith(PICKLE_SUFFIXES)))
    if {"transformer", "vae"} <= set(entries) and not (path / "config.json").exists():
        raise BerniniError(f"'{path}' holds the component folders of a Bernini-R / Wan Diffusers checkpoint but no "
                           "config.json (it tells the pipeline which model this is; an interrupted download?): fetch "
                           "it again, e.g. `hf download ByteDance/Bernini-R-Diffusers config.json --local-dir "
                           f"{path}`.")
    raise BerniniError(f"'{path}' is not a Bernini or Wan model folder: found {_listing(entries, 8)}. "
                       f"Accepted: {_ACCEPTED}.")
