"""The CLI's prompt enhancer: the official ``--use_pe`` / ``--pe_model`` and our ``--pe_backend`` /
``--pe_local_model`` (docs/prompt_enhancer.md §6). bernini_core/cli.py declares the flags (so --help imports no
torch), calls ``check_flags`` before the model loads, and asks ``CliEnhancer`` for each run's prompt on the process
that encodes it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

from ..errors import BerniniError
from . import enhance, make_backend
from .endpoint import endpoint_settings
from .local import check_local_folder

log = logging.getLogger("bernini.cli")

PROMPT_SUFFIX = ".prompt.txt"  # the enhanced prompt beside the output: out.mp4 -> out.prompt.txt


def check_flags(args: argparse.Namespace, family: str) -> None:
    """Before the model loads: the backend can run (a key for the endpoint, a Qwen2.5-VL for the local one); flags
    that do nothing get one warning line each."""
    if not args.use_pe:
        given = [f"--{name}" for name in ("pe_model", "pe_backend", "pe_local_model", "pe_max_new_tokens")
                 if getattr(args, name, None) is not None]
        if given:
            log.warning("%s ignored: prompt enhancement is off (add --use_pe).", ", ".join(given))
        return
    if (args.pe_backend or "openai") == "openai":
        endpoint_settings(model=args.pe_model)  # no key: the error names the variables
        for name in ("pe_local_model", "pe_max_new_tokens"):
            if getattr(args, name, None) is not None:
                log.warning("--%s is ignored: it belongs to --pe_backend local.", name)
        return
    limit = getattr(args, "pe_max_new_tokens", None)
    if limit is not None and limit < 1:
        raise BerniniError(f"--pe_max_new_tokens {limit}: must be at least 1.")
    if args.pe_model:
        log.warning("--pe_model is ignored: it names the endpoint's model; --pe_backend local runs %s.",
                    "--pe_local_model" if args.pe_local_model else "the planner's Qwen2.5-VL")
    if args.pe_local_model:
        check_local_folder(args.pe_local_model)
    elif family != "full":
        raise BerniniError("--pe_backend local runs the full-Bernini planner's Qwen2.5-VL, which a Bernini-R model "
                           "has not: use a full-Bernini --config (Bernini-Diffusers(-v2), tiny-full), pass "
                           "--pe_local_model DIR (a Qwen2.5-VL or Bernini-Diffusers folder), or use --pe_backend "
                           "openai.")


class CliEnhancer:
    """One backend for every run of a batch (made at the first run): the endpoint, the loaded planner's Qwen2.5-VL
    (``pipe``, read from ``config``'s folder) or the --pe_local_model folder."""

    def __init__(self, args: argparse.Namespace, pipe, config: str):
        self.args, self.pipe, self.config = args, pipe, config
        self.backend_name = args.pe_backend or "openai"
        self._backend = None

    def backend(self):
        if self._backend is None:
            if self.backend_name == "openai":
                self._backend = make_backend("openai", model=self.args.pe_model)
            else:
                limit = getattr(self.args, "pe_max_new_tokens", None)
                options = {"max_new_tokens": limit} if limit is not None else {}
                if self.args.pe_local_model:
                    self._backend = make_backend("local", folder=self.args.pe_local_model,
                                                 device=str(self.pipe.runtime.device), dtype=self.args.dtype,
                                                 offload=self.args.offload, **options)
                else:
                    self._backend = make_backend("local", planner=self.pipe, folder=self.config, **options)
        return self._backend

    def enhance(self, entry: dict, default_task: str) -> str:
        task = entry.get("task_type") or default_task
        sources = {"video": entry.get("video"), "image": entry.get("image"), "images": entry.get("images")}
        text = enhance(task, entry["prompt"], sources, backend=self.backend())
        if text != entry["prompt"]:
            log.info("enhanced prompt (%s, %s backend): %s", task, self.backend_name, text)
        return text

    def record(self, out, original: str, used: str) -> Optional[Path]:
        """The prompt used, beside the output (numbered, never over another file unless --overwrite), and in the
        run's settings (so --save_latents keeps it). Returns the .txt path."""
        out.settings["prompt_enhancer"] = {"backend": self.backend_name, "original_prompt": original,
                                           "prompt": used, "enhanced": used != original}
        if not out.output_path:
            return None
        return write_prompt_file(Path(out.output_path), used, overwrite=bool(self.args.overwrite))


def prompt_file_for(output: Path) -> Path:
    """out.mp4 -> out.prompt.txt (a numbered output, out_00001.mp4, gets out_00001.prompt.txt)."""
    return output.with_name(output.stem + PROMPT_SUFFIX)


def write_prompt_file(output: Path, text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` to the output's .prompt.txt; an existing file is kept and the next free numbered name
    (media.numbered_names) is used instead, unless ``overwrite``."""
    from .. import media

    target = prompt_file_for(output)
    if overwrite:
        target.write_text(text + "\n", encoding="utf-8")
        return target
    for candidate in media.numbered_names(target):
        try:
            with open(candidate, "x", encoding="utf-8") as handle:  # exclusive: never over an existing file
                handle.write(text + "\n")
        except FileExistsError:
            continue
        return candidate
    raise BerniniError(f"{str(target)!r} and its numbered names all exist; remove some or pass --overwrite.")
