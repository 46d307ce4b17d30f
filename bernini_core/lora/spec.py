"""Which LoRA, how strong, on which expert: ``LoraSpec`` and the CLI form ``FILE[:STRENGTH[:high|low|both]]``."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

from ..errors import BerniniError

EXPERTS = ("high", "low", "both")
FLAG_FORM = "FILE[:STRENGTH[:high|low|both]]"


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file applied with ``strength`` to the high-noise expert, the low-noise one, or both.
    A single-expert renderer (1.3B) takes "high" or "both"."""

    path: str
    strength: float = 1.0
    expert: str = "both"

    def __post_init__(self):
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path):
            raise BerniniError(f"a LoRA needs the path of its .safetensors file, got {self.path!r}.")
        object.__setattr__(self, "path", str(self.path))
        strength = self.strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise BerniniError(f"LoRA '{self.path}': strength must be a finite number (e.g. 1.0, 0.5, -0.3), got "
                               f"{strength!r}.")
        object.__setattr__(self, "strength", float(strength))
        if self.expert not in EXPERTS:
            raise BerniniError(f"LoRA '{self.path}': expert must be one of {', '.join(EXPERTS)}, got {self.expert!r}.")

    def applies_to(self, expert: str) -> bool:
        return self.expert in (expert, "both")


def _as_number(text: str):
    try:
        value = float(text)
    except ValueError:
        return None
    return value


def parse_lora_arg(text: str) -> LoraSpec:
    """``FILE[:STRENGTH[:high|low|both]]`` read from the right, so a path holding ':' (C:\\...) still works;
    ``FILE:high`` (strength 1) is accepted too. The file must exist (its content is checked by read_lora)."""
    if not isinstance(text, str) or not text.strip():
        raise BerniniError(f"--lora needs {FLAG_FORM}, got {text!r}.")
    if Path(text).is_file():  # a file whose own name holds ':' wins over the suffixes
        return LoraSpec(text)
    rest, strength, expert = text, 1.0, "both"
    head, sep, last = rest.rpartition(":")
    if sep and last.strip().lower() in EXPERTS:
        rest, expert = head, last.strip().lower()
        head, sep, last = rest.rpartition(":")
    if sep and _as_number(last) is not None:
        rest, strength = head, _as_number(last)
    if not rest:
        raise BerniniError(f"--lora {text!r}: no file named; the flag reads {FLAG_FORM}.")
    hint = ""
    if rest == text and ":" in text:
        tail = text.rpartition(":")[2]
        hint = (f" (the flag reads {FLAG_FORM} from the right, and '{tail}' is neither a strength (a number) nor "
                f"high, low or both)")
    check_lora_path(rest, hint)
    if not math.isfinite(strength):
        raise BerniniError(f"--lora {text!r}: the strength must be a finite number, got {strength}.")
    return LoraSpec(rest, strength, expert)


def check_lora_path(path, hint: str = "") -> None:
    """The LoRA path names an existing file (its content is checked by read_lora)."""
    if Path(path).is_dir():
        raise BerniniError(f"LoRA '{path}' is a folder; a LoRA is one .safetensors file.")
    if not Path(path).exists():
        raise BerniniError(f"LoRA file '{path}' does not exist{hint}; check the path.")


def as_lora_specs(loras: Union[None, str, os.PathLike, LoraSpec, Iterable]) -> list[LoraSpec]:
    """``loras=`` of from_pretrained as a list of LoraSpec: None, one spec / path / ``FILE[:...]`` text, or a
    list of them. Paths are checked to exist here; contents when the LoRA is read."""
    if loras is None:
        return []
    if isinstance(loras, (str, os.PathLike, LoraSpec)):
        loras = [loras]
    try:
        items = list(loras)
    except TypeError:
        raise BerniniError(f"loras must be a LoraSpec, a path or a list of them, got {type(loras).__name__}.") from None
    specs = []
    for item in items:
        if isinstance(item, (LoraSpec, os.PathLike)):
            spec = item if isinstance(item, LoraSpec) else LoraSpec(os.fspath(item))
            check_lora_path(spec.path)
            specs.append(spec)
        elif isinstance(item, str):
            specs.append(parse_lora_arg(item))
        else:
            raise BerniniError(f"loras entries must be LoraSpec objects or paths, got {type(item).__name__} {item!r}.")
    return specs
