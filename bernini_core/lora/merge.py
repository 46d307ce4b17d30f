"""Standalone merge: apply LoRAs to the loaded experts in place, per expert, in the weights' own format.

Each parameter gets all of its patches (every LoRA of the expert, in the order given) on one float32 copy and is
rounded back once, as ComfyUI's patcher does. By layer kind:

* a dense float parameter (bf16 / fp16 / fp32): merged, cast back to its dtype;
* an fp8 ``Fp8ScaledLinear`` weight: dequantised (``weight.float() * scale_weight``), merged and quantised again
  with a fresh per-tensor scale (amax / fp8 max), so the layer stays fp8;
* a quantised layer (GGUF) whose weight is not a float tensor and which has a ``weight_function`` list (ComfyUI's
  cast-layer convention, applied after dequantisation on every forward): a function adding the patches is
  appended; the quantised bytes stay as they are.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Iterable, Optional, Sequence, Union

import torch

from ..errors import BerniniError
from ..quant import Fp8ScaledLinear, is_fp8
from .files import LoraFile, read_lora
from .keys import describe_layout
from .patches import Patch, apply_fp32_, lora_patches
from .spec import LoraSpec, as_lora_specs

log = logging.getLogger("bernini.lora")

EXPERT_NAMES = {"high": "high-noise expert", "low": "low-noise expert"}


class LoraWeightFunction:
    """``weight_function`` entry of a quantised layer: the dequantised weight plus its patches, in the weight's
    dtype. The LoRA factors are kept per device after the first call (small); their product is not (it is the
    size of the weight)."""

    def __init__(self, patches: Sequence[tuple[float, Patch]]):
        self.patches = list(patches)
        self._cache: dict = {}

    def _fetch(self, patch: Patch, key: str, device: torch.device) -> torch.Tensor:
        slot = (id(patch.lora), key, str(device))
        if slot not in self._cache:
            self._cache[slot] = patch.lora.tensor(key).to(device=device, dtype=torch.float32)
        return self._cache[slot]

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        patched = weight.to(torch.float32, copy=True)
        apply_fp32_(patched, self.patches, self._fetch)
        return patched.to(weight.dtype)


@torch.no_grad()
def _merge_dense_(param: torch.Tensor, patches, device) -> None:
    patched = param.detach().to(device=device, dtype=torch.float32, copy=True)
    apply_fp32_(patched, patches)
    param.data.copy_(patched.to(param.dtype))


@torch.no_grad()
def _merge_fp8_(layer: Fp8ScaledLinear, patches, device) -> None:
    weight = layer.weight
    patched = weight.detach().to(device=device, dtype=torch.float32) * layer.scale_weight.to(device, torch.float32)
    apply_fp32_(patched, patches)
    limit = torch.finfo(weight.dtype).max
    scale = (patched.abs().amax() / limit).clamp(min=1e-12)
    weight.data.copy_((patched / scale).clamp(-limit, limit).to(weight.dtype))
    if layer.scale_weight.numel() == 1:
        layer.scale_weight.copy_(scale.reshape(layer.scale_weight.shape))
    else:  # a per-channel scale becomes one per-tensor scale
        layer.scale_weight = scale.reshape(()).to(layer.scale_weight.device)
    layer._fp8_matmul_state = None  # the fast path is checked again against the new weight


def merge_patches_(dit: torch.nn.Module, patches: Iterable[tuple[float, Patch]],
                   compute_device: Optional[Union[str, torch.device]] = None) -> int:
    """Apply (strength, patch) pairs to `dit` in place; returns how many parameters changed. `compute_device`:
    where the float32 arithmetic runs (default: where each parameter lives)."""
    by_target: "OrderedDict[str, list]" = OrderedDict()
    for strength, patch in patches:
        if strength != 0.0:
            by_target.setdefault(patch.target, []).append((strength, patch))
    for target, items in by_target.items():
        module_path, _, leaf = target.rpartition(".")
        module = dit.get_submodule(module_path) if module_path else dit
        param = getattr(module, leaf)
        device = torch.device(compute_device) if compute_device is not None else param.device
        if isinstance(module, Fp8ScaledLinear) and leaf == "weight" and is_fp8(param):
            _merge_fp8_(module, items, device)
        elif param.is_floating_point() and not is_fp8(param):
            _merge_dense_(param, items, device)
        elif isinstance(getattr(module, f"{leaf}_function", None), list):
            getattr(module, f"{leaf}_function").append(LoraWeightFunction(items))
        else:
            raise BerniniError(f"cannot apply a LoRA to '{target}': it is stored as {param.dtype} in a "
                               f"{type(module).__name__}, which has no {leaf}_function hook for patches; load the "
                               "expert in bf16/fp16/fp32 or fp8 'scaled' to use LoRAs standalone.")
    return len(by_target)


# ------------------------------------------------------------------------------------------ experts
def _module_of(item) -> Optional[torch.nn.Module]:
    return getattr(item, "module", item)  # a runtime.ModelHandle, or the module itself


def experts_of(target) -> dict[str, Optional[torch.nn.Module]]:
    """{"high": DiT, "low": DiT or None} of a pipeline, its components, an ``Experts`` pair, a dict or one DiT."""
    if isinstance(target, torch.nn.Module):
        return {"high": target, "low": None}
    if isinstance(target, dict):
        unknown = sorted(set(target) - set(EXPERT_NAMES))
        if unknown or target.get("high") is None:
            raise BerniniError(f"LoRA target dict must map 'high' (and optionally 'low') to DiTs, got keys "
                               f"{sorted(target)}.")
        return {"high": target["high"], "low": target.get("low")}
    if hasattr(target, "components") and hasattr(target, "experts"):  # a pipeline
        if target.experts is None:
            raise BerniniError("this pipeline was loaded without its experts (parts=...), so there is nothing to "
                               "apply a LoRA to; load it with the 'experts' part.")
        target = target.experts
    if hasattr(target, "high") and hasattr(target, "low"):  # denoise.Experts
        return {"high": _module_of(target.high), "low": _module_of(target.low) if target.low is not None else None}
    if hasattr(target, "dit_high") and hasattr(target, "dit_low"):  # loaders' components
        if target.dit_high is None:
            raise BerniniError("the experts were not loaded (parts=...), so there is nothing to apply a LoRA to.")
        return {"high": target.dit_high, "low": target.dit_low}
    raise BerniniError(f"cannot apply LoRAs to a {type(target).__name__}: pass a pipeline, its experts or a DiT.")


def _check_mergeable(name: str, dit: torch.nn.Module) -> None:
    if any(hasattr(p, "device_mesh") for p in dit.parameters()):  # FSDP2 shards are DTensors
        raise BerniniError(f"the {EXPERT_NAMES[name]} is already sharded (FSDP); LoRAs are merged into whole "
                           "weights: pass them to from_pretrained(loras=...), which merges before sharding.")


def check_loras(loras, parts=None) -> list[LoraSpec]:
    """``loras`` as LoraSpec objects, every file checked to be a readable LoRA (headers only): what to run before
    a long model load. `parts`: the load's parts (loaders.PARTS; None = all), which must include the experts."""
    from ..loaders import resolve_parts

    specs = as_lora_specs(loras)
    if specs and parts is not None and "experts" not in resolve_parts(parts):
        raise BerniniError("loras= patch the DiT experts, but parts= leaves them out; add 'experts' to parts or "
                           "drop loras.")
    for path in dict.fromkeys(spec.path for spec in specs):
        read_lora(path)
    return specs


def apply_loras_(target, specs, *, compute_device: Optional[Union[str, torch.device]] = None) -> dict[str, int]:
    """Merge LoRAs into the experts in place. `specs`: LoraSpec objects, ``FILE[:STRENGTH[:high|low|both]]``
    texts or paths (see spec.as_lora_specs), applied in order; each names its expert(s). Every LoRA is read and
    checked against its experts before any weight changes. Strength 0 leaves the weights bit-identical.
    Returns {expert: parameters changed}."""
    specs = as_lora_specs(specs)
    experts = experts_of(target)
    for spec in specs:
        if spec.expert == "low" and experts["low"] is None:
            raise BerniniError(f"LoRA '{spec.path}' is given for the low-noise expert, but this renderer has one "
                               "expert (Bernini-R 1.3B); give it for 'high' or 'both'.")
    for name, dit in experts.items():
        if dit is not None and any(spec.applies_to(name) for spec in specs):
            _check_mergeable(name, dit)

    files: dict[str, LoraFile] = {}
    plan: dict[str, list] = {name: [] for name in experts}
    for spec in specs:
        if spec.path not in files:
            files[spec.path] = read_lora(spec.path)
        lora = files[spec.path]
        warned = False
        for name, dit in experts.items():
            if dit is None or not spec.applies_to(name):
                continue
            patches = lora_patches(lora, dit, warn=not warned)
            warned = True
            plan[name] += [(spec.strength, patch) for patch in patches]
            log.info("LoRA '%s' (%s): %d tensor patches for the %s at strength %g%s", spec.path,
                     describe_layout(lora.keys()), len(patches), EXPERT_NAMES[name], spec.strength,
                     " (no change)" if spec.strength == 0 else "")
    return {name: merge_patches_(experts[name], items, compute_device) for name, items in plan.items()
            if experts[name] is not None}


__all__ = ["LoraSpec", "LoraWeightFunction", "apply_loras_", "check_loras", "experts_of", "merge_patches_"]
