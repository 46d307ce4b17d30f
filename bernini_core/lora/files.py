"""A LoRA file: its keys and shapes from the safetensors header, its tensors read when a merge needs them."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch

from ..errors import BerniniError
from .keys import canonical_key, split_key


class LoraFile:
    """Keys, shapes and tensors of one LoRA (a .safetensors file, or an in-memory state dict)."""

    def __init__(self, name: str, shapes: Mapping[str, tuple], source=None, tensors: Optional[Mapping] = None):
        self.name = name
        self.shapes = dict(shapes)
        self._source = source    # a checkpoints.TensorSource, or None for an in-memory LoRA
        self._tensors = tensors  # the in-memory state dict
        self._handle = None      # safetensors handle, opened at the first read

    @classmethod
    def from_state_dict(cls, name: str, state: Mapping[str, torch.Tensor]) -> "LoraFile":
        return cls(name, {k: tuple(v.shape) for k, v in state.items()}, tensors=dict(state))

    def keys(self) -> list[str]:
        return list(self.shapes)

    def tensor(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self._source.files()[0]), framework="pt", device="cpu")
        return self._handle.get_tensor(key)

    def scalar(self, key: str) -> float:
        value = self.tensor(key)
        if value.numel() != 1:
            raise BerniniError(f"LoRA '{self.name}': '{key}' should hold one number, it holds shape "
                               f"{tuple(value.shape)}; the file is not a LoRA of a known layout.")
        return value.item()


def read_lora(path) -> LoraFile:
    """Open a LoRA .safetensors file: headers only (tensors are read by the merge). A missing file, a folder, a
    pickle or a broken file is refused by the project's checks (checkpoints.TensorSource); a file with no LoRA
    keys (a model checkpoint, say) is refused here, naming some of its keys."""
    from ..checkpoints import TensorSource

    path = Path(path)
    if path.is_dir():
        raise BerniniError(f"LoRA '{path}' is a folder; a LoRA is one .safetensors file.")
    if path.name.lower().endswith(".json"):
        raise BerniniError(f"LoRA '{path}' is a JSON file; a LoRA is one .safetensors file.")
    source = TensorSource.open(path)
    lora = LoraFile(str(path), {key: source.shape(key) for key in source.keys()}, source=source)
    check_is_lora(lora)
    return lora


def check_is_lora(lora: LoraFile) -> None:
    """A BerniniError unless some key carries a LoRA suffix (lora_up/down, lora_A/B, diff, ...)."""
    keys = lora.keys()
    if not any(split_key(canonical_key(key))[1] is not None for key in keys):
        sample = ", ".join(sorted(keys)[:5]) or "no tensors at all"
        raise BerniniError(f"'{lora.name}' holds no LoRA weights (its keys: {sample}{', …' if len(keys) > 5 else ''}); "
                           "a LoRA has keys ending in .lora_up/.lora_down, .lora_A/.lora_B or .diff. A full model "
                           "checkpoint is loaded as the model, not with --lora.")
