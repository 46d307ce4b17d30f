"""Patch records: what one LoRA does to each of our parameters, and the float32 arithmetic ComfyUI applies.

ComfyUI (``comfy/lora.py`` ``load_lora`` / ``calculate_weight``, ``comfy/weight_adapter/lora.py``) patches a
float32 copy of the weight, in the order the patches were added, and casts the result back to the parameter's
dtype once (round to nearest for bf16/fp16). Per patch:

* low rank: ``W += (strength * m) * (up.flatten(1) @ down.flatten(1)).reshape(W.shape)`` where ``m`` is
  ``alpha / rank`` (rank = ``down.shape[0]``) when the file has ``<base>.alpha``, else 1.0; with
  ``<base>.dora_scale`` the DoRA weight decomposition instead;
* ``.diff`` / ``.w_norm``: ``W += strength * diff``; ``.diff_b`` / ``.b_norm``: the same on the bias;
* ``.set_weight``: ``W = set_weight`` (ComfyUI ignores the strength here, and so do we).

When one base carries several of these, the last ComfyUI assigns wins: set_weight over diff over w_norm over the
low-rank pair (and diff_b over b_norm for the bias).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from ..errors import BerniniError
from .files import LoraFile, read_lora
from .keys import ACCEPTED_LAYOUTS, PAIR_SUFFIXES, UNSUPPORTED_SUFFIXES, KeyMatcher, canonical_key, \
    describe_layout, split_key

log = logging.getLogger("bernini.lora")

LISTED_KEYS = 5  # keys named in a warning or an error
# priority of the patch kinds one base can carry (higher replaces lower, as ComfyUI's load_lora assigns them)
_WEIGHT_KINDS = ("lora", "w_norm", "diff", "set_weight")
_BIAS_KINDS = ("b_norm", "diff_b")


@dataclass(frozen=True)
class Patch:
    """One change to one of our parameters, its tensors still in the LoRA file."""

    target: str                       # our parameter name (diffusers WanTransformer3DModel naming)
    kind: str                         # "lora" | "diff" | "set"
    keys: tuple                       # the LoRA keys read: lora (up, down), diff/set (tensor,)
    lora: LoraFile
    alpha: Optional[float] = None     # the file's <base>.alpha, None when absent (multiplier 1)
    dora_scale: Optional[str] = None  # key of <base>.dora_scale

    @property
    def key(self) -> str:
        return self.keys[0]


def parameter_shapes(dit: torch.nn.Module) -> dict[str, tuple]:
    """Our parameter names -> the shape of the value they stand for: a packed quantised weight (GGUF, not a float
    tensor) reports its layer's ``weight_shape`` (or the tensor's ``tensor_shape``), every other its own shape."""
    shapes = {}
    for module_name, module in dit.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            shape = tuple(param.shape)
            if leaf == "weight" and not param.is_floating_point():
                shape = tuple(getattr(module, "weight_shape", None) or getattr(param, "tensor_shape", None) or shape)
            shapes[f"{module_name}.{leaf}" if module_name else leaf] = shape
    return shapes


def _listing(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:LISTED_KEYS])
    return shown + (", …" if len(keys) > LISTED_KEYS else "")


def _size_hint(lora: LoraFile, key: str, shape, target: str, target_shape) -> BerniniError:
    shape = shape if isinstance(shape, str) else list(shape)
    return BerniniError(f"LoRA '{lora.name}': '{key}' has shape {shape} but our parameter '{target}' is "
                        f"{list(target_shape)}; is this LoRA for Wan 2.2 A14B / 1.3B (the model it is applied to)?")


def _group(lora: LoraFile) -> tuple[dict, list]:
    """{canonical base: {kind: raw key}} and the keys with no known suffix."""
    groups: dict[str, dict] = {}
    unknown = []
    for key in lora.keys():
        base, kind = split_key(canonical_key(key))
        if base is None:
            unknown.append(key)
            continue
        if kind == "unsupported":
            adapter = next(name for suffix, name in UNSUPPORTED_SUFFIXES.items() if key.endswith(suffix))
            raise BerniniError(f"LoRA '{lora.name}' holds {adapter} weights ('{key}'), which the standalone merge "
                               "does not apply (it applies LoRA up/down or A/B pairs, DoRA and .diff deltas); "
                               "ComfyUI's own LoRA loader handles them: load it with the Bernini ComfyUI nodes.")
        if kind in ("lora_mid", "reshape_weight"):
            raise BerniniError(f"LoRA '{lora.name}' holds '{key}' ({kind}: a conv LoRA form not used for Wan), which "
                               "the standalone merge does not apply; ComfyUI's own LoRA loader handles it.")
        if kind in ("up", "down"):
            canon = canonical_key(key)
            style = next(i for i, pair in enumerate(PAIR_SUFFIXES) if canon.endswith(pair[kind == "down"]))
            kind = f"{kind}{style}"
        groups.setdefault(base, {})[kind] = key
    return groups, unknown


def _pair(lora: LoraFile, base: str, kinds: dict) -> Optional[tuple[str, str]]:
    """(up key, down key) of the first pair style present, as ComfyUI's LoRAAdapter.load picks it."""
    for style, (up_suffix, down_suffix) in enumerate(PAIR_SUFFIXES):
        up, down = kinds.get(f"up{style}"), kinds.get(f"down{style}")
        if up and not down:
            raise BerniniError(f"LoRA '{lora.name}': '{up}' has no '{base}{down_suffix}' beside it; the file is "
                               "incomplete.")
        if down and not up:
            raise BerniniError(f"LoRA '{lora.name}': '{down}' has no '{base}{up_suffix}' beside it; the file is "
                               "incomplete.")
        if up:
            return up, down
    return None


def _base_patches(lora: LoraFile, base: str, kinds: dict, target: str, params: dict) -> tuple[list, list]:
    """(patches, keys left over) of one LoRA base whose module maps to `target`; shapes checked against our
    parameters (`params`: name -> shape, parameter_shapes). A bias delta for a module without bias (RMSNorm, ...)
    is left over."""
    weight_shape = params[target]
    chosen: dict[str, Patch] = {}  # "weight" / "bias" -> the winning patch
    left = []
    pair = _pair(lora, base, kinds)
    if pair is not None:
        up, down = (tuple(lora.shapes[k]) for k in pair)
        if (len(up) < 2 or len(down) < 2 or up[1] != down[0] or up[0] != weight_shape[0]
                or math.prod(down[1:]) != math.prod(weight_shape[1:])):
            raise _size_hint(lora, pair[0], f"up {list(up)} / down {list(down)}", target, weight_shape)
        alpha = lora.scalar(kinds["alpha"]) if "alpha" in kinds else None
        chosen["weight"] = Patch(target, "lora", pair, lora, alpha, kinds.get("dora_scale"))
    for kind in _WEIGHT_KINDS[1:] + _BIAS_KINDS:
        key = kinds.get(kind)
        if key is None:
            continue
        slot, name = "weight", target
        if kind in _BIAS_KINDS:
            slot, name = "bias", target[: -len("weight")] + "bias" if target.endswith(".weight") else None
            if name not in params:
                left.append(key)
                continue
        shape = params[name]
        if tuple(lora.shapes[key]) != shape:
            raise _size_hint(lora, key, lora.shapes[key], name, shape)
        chosen[slot] = Patch(name, "set" if kind == "set_weight" else "diff", (key,), lora)
    return list(chosen.values()), left


def plan_patches(lora: LoraFile, dit: torch.nn.Module) -> tuple[list[Patch], list[str]]:
    """(patches, unmatched keys) of one LoRA on one DiT; BerniniError for unsupported or mis-shaped tensors."""
    params = parameter_shapes(dit)
    matcher = KeyMatcher(params)
    groups, unmatched = _group(lora)
    patches = []
    for base, kinds in groups.items():
        target = matcher.target(base)
        if target is None:
            unmatched += list(kinds.values())
            continue
        found, left = _base_patches(lora, base, kinds, target, params)
        patches += found
        unmatched += left if found else list(kinds.values())
    return patches, sorted(unmatched)


def lora_patches(lora: Union[LoraFile, str], dit: torch.nn.Module, *, warn: bool = True) -> list[Patch]:
    """The patches one LoRA makes to `dit` (a BerniniDiT). Keys no parameter takes: none at all is an error naming
    some of them and the accepted layouts; some is one warning line with their count (``warn``)."""
    if not isinstance(lora, LoraFile):
        lora = read_lora(lora)
    patches, unmatched = plan_patches(lora, dit)
    total = len(lora.keys())
    if not patches:
        raise BerniniError(f"LoRA '{lora.name}' matches no parameter of the Wan DiT: none of its {total} keys "
                           f"({describe_layout(lora.keys())} layout; e.g. {_listing(sorted(lora.keys()))}) names a "
                           f"module of the model. Accepted layouts: {ACCEPTED_LAYOUTS}. Is it a LoRA for a Wan 2.x "
                           "text-to-video DiT?")
    if unmatched and warn:
        log.warning("LoRA '%s': %d of %d keys matched nothing: %s", lora.name, len(unmatched), total,
                    _listing(unmatched))
    return patches


# ------------------------------------------------------------------------------------------ float32 arithmetic
Fetch = Callable[[Patch, str, torch.device], torch.Tensor]


def read_fp32(patch: Patch, key: str, device: torch.device) -> torch.Tensor:
    return patch.lora.tensor(key).to(device=device, dtype=torch.float32)


def _dora_(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor, strength: float) -> None:
    """DoRA (ComfyUI weight_decompose): rescale W + delta to the stored magnitude, blended by strength."""
    combined = weight + delta
    if dora_scale.shape[0] == combined.shape[0]:  # magnitude per output row
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:  # magnitude per input column
        norm = combined.transpose(0, 1).reshape(combined.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(combined.shape[1], *[1] * (combined.dim() - 1)).transpose(0, 1)
    combined *= dora_scale / (norm + torch.finfo(weight.dtype).eps)
    if strength != 1.0:
        weight += strength * (combined - weight)
    else:
        weight.copy_(combined)


def apply_fp32_(weight: torch.Tensor, patches: Sequence[tuple[float, Patch]], fetch: Fetch = read_fp32) -> None:
    """Apply (strength, patch) pairs in order to a float32 weight, in place, as ComfyUI's calculate_weight."""
    for strength, patch in patches:
        if patch.kind == "set":
            weight.copy_(fetch(patch, patch.keys[0], weight.device))
        elif patch.kind == "diff":
            if strength != 0.0:
                weight += strength * fetch(patch, patch.keys[0], weight.device)
        else:
            up, down = (fetch(patch, key, weight.device) for key in patch.keys)
            multiplier = 1.0 if patch.alpha is None else patch.alpha / down.shape[0]
            delta = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(weight.shape)
            if patch.dora_scale is not None:
                _dora_(weight, delta * multiplier, fetch(patch, patch.dora_scale, weight.device), strength)
            else:
                weight += (strength * multiplier) * delta
