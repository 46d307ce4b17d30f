"""Fetching the official Bernini checkpoints from the Hugging Face Hub, only when the user asked for it.

Each model and part (planner, renderer, or both) needs only some folders of its repository; the full
Bernini repositories are ~170-190 GB, mostly the one combined ``bernini/`` checkpoint that planner and
renderer share (docs/official_behaviour.md §2.1, §2.2), while Bernini-R is a Wan2.2 -Diffusers style folder (§2.3).
Nothing here touches the network unless ``allow_download`` is true (docs/architecture.md §7); huggingface_hub is
imported only then.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Callable, List, Optional

from .checkpoints import INDEX_SUFFIX, detect_layout, read_json
from .errors import BerniniError

OFFICIAL_MODELS = {
    "Bernini-Diffusers": "ByteDance/Bernini-Diffusers",
    "Bernini-Diffusers-v2": "ByteDance/Bernini-Diffusers-v2",
    "Bernini-R-Diffusers": "ByteDance/Bernini-R-Diffusers",
    # the single-expert renderer fine-tuned from Wan2.1-1.3B (docs/official_behaviour.md §1, §2.3: its config's
    # wan22_base)
    "Bernini-R-1.3B-Diffusers": "ByteDance/Bernini-R-1.3B-Diffusers",
}
PARTS = ("all", "planner", "renderer")
_RENDERER_ONLY = ("Bernini-R-Diffusers", "Bernini-R-1.3B-Diffusers")
_SINGLE_EXPERT = ("Bernini-R-1.3B-Diffusers",)  # skip_transformer_2: no transformer_2/ folder

# allow_patterns (fnmatch: "*" also matches "/"). The full models keep planner and both experts in the one
# combined bernini/ checkpoint, so both parts need it. mllm/ (Qwen2.5-VL config, tokenizer, processor: a few
# MB, no weights) also goes with the renderer so the folder is a recognisable Bernini-Diffusers folder
# (checkpoints.detect_layout wants bernini/ and mllm/) whichever part was fetched first.
_FULL_PLANNER = ("config.json", "bernini/*", "mllm/*")
_FULL_RENDERER = ("config.json", "bernini/*", "mllm/*", "transformer*_config.json", "t5_text_encoder/*",
                  "t5_tokenizer/*", "vae/*", "scheduler/*")
_R_RENDERER = ("config.json", "transformer/*", "transformer_2/*", "text_encoder/*", "tokenizer/*", "vae/*",
               "scheduler/*")

Progress = Callable[..., None]  # (files_done, files_total) or (files_just_done)


def _check_name(name: str) -> str:
    if name not in OFFICIAL_MODELS:
        raise BerniniError(f"Unknown official model {name!r}; the official models are: "
                           f"{', '.join(OFFICIAL_MODELS)}.")
    return OFFICIAL_MODELS[name]


def files_needed(name: str, part: str = "all") -> List[str]:
    """The ``allow_patterns`` that fetch what ``part`` ("all", "planner", "renderer") of ``name`` needs."""
    _check_name(name)
    if part not in PARTS:
        raise BerniniError(f"part must be one of {', '.join(PARTS)}; got {part!r}.")
    if name in _RENDERER_ONLY:
        if part == "planner":
            raise BerniniError(f"{name} is a renderer-only model and has no planner; load the planner from "
                               f"Bernini-Diffusers or Bernini-Diffusers-v2.")
        return [p for p in _R_RENDERER if not (name in _SINGLE_EXPERT and p.startswith("transformer_2/"))]
    chosen = {"planner": _FULL_PLANNER, "renderer": _FULL_RENDERER}.get(part, _FULL_PLANNER + _FULL_RENDERER)
    return list(dict.fromkeys(chosen))  # union without repeats, order kept


def _missing_shards(folder: Path) -> List[str]:
    missing = []
    for index in folder.glob("*" + INDEX_SUFFIX):
        weight_map = read_json(index).get("weight_map") or {}
        missing += [f"{folder.name}/{shard}" for shard in sorted(set(weight_map.values()))
                    if not (folder / shard).is_file()]
    return missing


def missing_files(name: str, root, part: str = "all") -> List[str]:
    """What keeps ``root/name`` from being complete for ``part``: patterns without a match, shards an index
    names but the folder lacks, or the reason the layout is not recognised. Empty when complete."""
    return _missing_in(Path(root) / name, name, part)


def _missing_in(target: Path, name: str, part: str) -> List[str]:
    patterns = files_needed(name, part)
    if not target.is_dir():
        return patterns
    missing = [pattern for pattern in patterns if not any(target.glob(pattern))]
    for pattern in patterns:
        if pattern.endswith("/*") and (target / pattern[:-2]).is_dir():
            missing += _missing_shards(target / pattern[:-2])
    if not missing:
        try:
            detect_layout(target)
        except BerniniError as exc:
            missing.append(str(exc))
    return missing


def download_command(name: str, root) -> str:
    """The `hf` CLI command that downloads ``name`` into ``root/name``."""
    target = Path(root) / name
    return f"hf download {_check_name(name)} --local-dir {shlex.quote(str(target))}"


def _takes_one_argument(callback) -> bool:
    """True for ``advance(n)``-style callbacks (a ProgressBar.update), False for ``progress(done, total)``."""
    import inspect

    try:
        parameters = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):
        return False
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) < 2


def _tqdm_reporting_to(progress):
    """A huggingface_hub tqdm class whose file-count bar also reports to ``progress``: called as
    ``progress(files_done, files_total)``, or ``progress(files_just_done)`` when it takes one argument."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    incremental = _takes_one_argument(progress)

    class ReportingTqdm(hub_tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Byte bars (unit "B") come and go per file or grow their total; the file-count bar is stable.
            # Counted here too: a disabled tqdm (HF_HUB_DISABLE_PROGRESS_BARS) does not advance its own `n`.
            self._bernini_report = kwargs.get("unit", "it") != "B"
            self._bernini_total = kwargs.get("total") or getattr(self, "total", None) or 0
            self._bernini_done = 0

        def update(self, n=1):
            result = super().update(n)
            step = int(n or 0)
            self._bernini_done += step
            if not self._bernini_report:
                return result
            if incremental:
                progress(step)
            elif self._bernini_total:
                progress(min(self._bernini_done, int(self._bernini_total)), int(self._bernini_total))
            return result

    return ReportingTqdm


def staging_folder(target: Path) -> Path:
    """Where a first download of ``target`` is written; it becomes ``target`` (one rename) only once complete, so
    an interrupted or failed download reads as "not downloaded", never as a broken model folder, and a retry
    resumes there. Hidden (a leading dot) so model listings skip it."""
    return target.with_name(f".{target.name}.download")


def _snapshot(repo_id: str, target: Path, patterns: List[str], progress, final: Optional[Path] = None) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise BerniniError("Downloading needs the huggingface_hub package: pip install huggingface_hub "
                           f"(or download by hand: {repo_id} into '{target}').") from None
    tqdm_class = None
    if isinstance(progress, type):
        tqdm_class = progress  # already a tqdm class
    elif progress is not None:
        tqdm_class = _tqdm_reporting_to(progress)
    kwargs = {"repo_id": repo_id, "local_dir": str(target), "allow_patterns": patterns}
    if tqdm_class is not None:
        kwargs["tqdm_class"] = tqdm_class
    try:
        snapshot_download(**kwargs)
    except BerniniError:
        raise
    except Exception as exc:  # network, authentication, disk: say what failed and how to do it by hand
        final = final or target
        raise BerniniError(f"Downloading {repo_id} into '{target}' failed ({type(exc).__name__}: {exc}). Check the "
                           f"network and the free disk space, then retry, or run: hf download {repo_id} "
                           f"--local-dir {shlex.quote(str(final))}") from None


def ensure_official_model(name: str, root, *, part: str = "all", allow_download: bool = False,
                          progress: Optional[Progress] = None) -> Path:
    """``root/name`` when it holds a complete ``part`` of the official model ``name``; otherwise, with
    ``allow_download``, fetch just the files that part needs from the Hub into it first.

    ``progress`` follows the files fetched: ``progress(files_done, files_total)``, or ``progress(n)`` with the
    files just completed when it takes a single argument (a ProgressBar.update); a tqdm class is handed to
    huggingface_hub as is."""
    repo_id = _check_name(name)
    target = Path(root) / name
    if target.exists() and not target.is_dir():
        raise BerniniError(f"'{target}' is a file, but the official model {name} is a folder; move the file away "
                           f"or choose another models folder.")
    missing = missing_files(name, root, part)
    if not missing:
        return target
    stage = staging_folder(target)
    if not allow_download:
        what = "is not downloaded" if not target.exists() else f"is incomplete (missing: {_listing(missing)})"
        resume = (f" (an earlier download stopped part-way; its files wait in '{stage}', and downloading again "
                  f"resumes it)") if stage.is_dir() and not target.exists() else ""
        raise BerniniError(
            f"The official model {name} {what} in '{target}'{resume}. Download it with:\n"
            f"    {download_command(name, root)}\n"
            f"or pick download \"if missing\" in the loader node to let it fetch the files it needs.")
    # A folder that already holds something (another part) is completed in place: the files it shares with the new
    # part (bernini/, ~170 GB) must not be fetched again. A new one is staged and renamed into place when complete.
    fresh = not target.exists() or (target.is_dir() and not any(target.iterdir()))
    folder = stage if fresh else target
    folder.mkdir(parents=True, exist_ok=True)
    _snapshot(repo_id, folder, files_needed(name, part), progress, final=target)
    still_missing = _missing_in(folder, name, part)
    if still_missing:
        raise BerniniError(f"After downloading {repo_id}, '{folder}' still lacks {_listing(still_missing)}; the "
                           f"repository may have changed layout. Run `{download_command(name, root)}` to fetch "
                           f"everything.")
    if fresh:
        if target.exists():
            target.rmdir()  # the empty folder someone made for it
        stage.rename(target)
    return target


def _listing(items: List[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


__all__ = ["OFFICIAL_MODELS", "PARTS", "download_command", "ensure_official_model", "files_needed", "missing_files",
           "staging_folder"]
