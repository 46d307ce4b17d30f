"""The example media the shared workflows load (workflows/inputs/), made available in ComfyUI's input/ folder.

Load Image / Load Video read only ComfyUI's input/ folder, so a workflow that names bernini_source.mp4 runs unchanged
only once the file is there. Each file is copied when absent and never overwrites anything: a user's own
bernini_source.mp4 stays as it is. Called once when the pack loads; a failure (e.g. a read-only input folder) is one
warning, never an import error. ComfyUI is not imported here: its folder_paths is looked up only if already loaded.
"""

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("bernini")

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "workflows" / "inputs"
MEDIA_SUFFIXES = (".mp4", ".png", ".jpg", ".webm")


def _copy_if_absent(source: Path, target: Path) -> bool:
    """Copy `source` to `target` unless `target` exists, atomically: a temporary file is linked into place, and a link
    never replaces an existing name (so a file another process created meanwhile is kept too)."""
    if os.path.lexists(target):
        return False
    fd, temp = tempfile.mkstemp(prefix=".bernini-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out)
        try:
            os.link(temp, target)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create, which never overwrites either
            try:
                with open(target, "xb") as out, open(source, "rb") as src:
                    shutil.copyfileobj(src, out)
            except FileExistsError:
                return False
        return True
    finally:
        os.unlink(temp)


def install_example_inputs(input_dir, source_dir=EXAMPLE_DIR) -> list[str]:
    """Copy every example media file of `source_dir` that `input_dir` lacks; returns the names copied. Existing files
    (whatever their content) are left untouched."""
    input_dir, source_dir = Path(input_dir), Path(source_dir)
    if not source_dir.is_dir():
        return []
    input_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for source in sorted(source_dir.iterdir()):
        if source.is_file() and source.suffix.lower() in MEDIA_SUFFIXES:
            if _copy_if_absent(source, input_dir / source.name):
                copied.append(source.name)
    return copied


def install_into_comfyui() -> list[str]:
    """In ComfyUI (its folder_paths already imported): the examples into folder_paths.get_input_directory(). Outside
    ComfyUI nothing happens and nothing is imported."""
    folder_paths = sys.modules.get("folder_paths")
    if folder_paths is None or not hasattr(folder_paths, "get_input_directory"):
        return []
    try:
        input_dir = folder_paths.get_input_directory()
        copied = install_example_inputs(input_dir)
    except OSError as exc:
        log.warning("Bernini: could not copy the example inputs (%s) into ComfyUI's input folder: %s. The shared "
                    "workflows still load; choose your own media in their Load Video / Load Image nodes.",
                    ", ".join(p.name for p in sorted(EXAMPLE_DIR.glob("*"))), exc)
        return []
    if copied:
        log.info("Bernini: copied the example inputs %s into %s (existing files are never replaced).",
                 ", ".join(copied), input_dir)
    return copied
