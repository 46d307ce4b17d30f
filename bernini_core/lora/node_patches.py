"""Apply Bernini LoRA inside ComfyUI: a LoRA file becomes ComfyUI weight patches on clones of the experts'
ModelPatchers, one strength per expert (docs/node_contract.md). ComfyUI applies them when it loads the clone and
takes them off when another clone of the same expert loads, so removing the node restores the exact weights with no
reload; --lowvram streaming and fp8 layers (their convert/set hooks) work as for ComfyUI's own LoRA loader, and GGUF
layers take the patches after dequantisation (comfy_bridge._patcher_class)."""

from __future__ import annotations

import dataclasses
import math

from .. import comfy_bridge
from ..errors import BerniniError

NODE = "Apply Bernini LoRA"


def _check_strength(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BerniniError(f"{NODE}: {name} is {value!r}; give a finite number (1.0 = the LoRA as trained, 0 = off).")
    return float(value)


def apply_lora(renderer, lora_name: str, strength_high: float = 1.0, strength_low: float = 1.0):
    """`renderer` (node_models.RendererModel) with the LoRA `lora_name` (a file in ComfyUI's models/loras) patched into
    the high-noise expert at `strength_high` and the low-noise expert at `strength_low` (a single-expert renderer, e.g.
    Bernini-R 1.3B, takes `strength_high`). Chains: the patches of earlier Apply Bernini LoRA nodes are kept."""
    from .files import read_lora
    from .keys import canonical_state_dict, lora_module_map
    from .patches import lora_patches

    strength_high = _check_strength("strength_high", strength_high)
    strength_low = _check_strength("strength_low", strength_low)
    experts = renderer.effective_experts
    if experts is None and renderer.pool is None:
        raise BerniniError(f"{NODE}: the renderer holds no DiT experts (they were not loaded); load the renderer with "
                           "its experts.")
    if not isinstance(lora_name, str) or not lora_name or lora_name == "none":
        raise BerniniError(f"{NODE}: lora_name is {lora_name!r}; pick a LoRA file from models/loras.")
    path = comfy_bridge.model_path("loras", lora_name)
    if renderer.pool is not None:
        return _pooled(renderer, lora_name, path, strength_high, strength_low)
    lora = read_lora(path)
    dit = experts.high.module
    # the standalone merge's plan: refuses a LoRA matching nothing / of the wrong size, warns once for stray keys
    lora_patches(lora, dit)
    mapping, _ = lora_module_map(lora.keys(), (name for name, _ in dit.named_parameters()))
    to_load = {base: comfy_bridge.PATCHER_PREFIX + param for base, param in mapping.items()}
    patches = comfy_bridge.lora_patches(canonical_state_dict({key: lora.tensor(key) for key in lora.keys()}),
                                        to_load)
    high, low = experts.high, experts.low
    if strength_high != 0:
        high = comfy_bridge.patched_handle(high, patches, strength_high)
    if low is not None and strength_low != 0:
        low = comfy_bridge.patched_handle(low, patches, strength_low)
    applied = (lora_name, strength_high, strength_low if experts.low is not None else None)
    return dataclasses.replace(renderer, experts=dataclasses.replace(experts, high=high, low=low),
                               loras=renderer.loras + (applied,))


def _pooled(renderer, lora_name: str, path, strength_high: float, strength_low: float):
    """A renderer whose experts live on a Bernini Multi-GPU pool: the pool's ranks merge the LoRA into their experts
    when they load (before any sharding). The result carries a new pool of the same layout; starting it ends the
    previous one (GPUs hold one pool at a time), so switching between graphs with and without the LoRA reloads the
    experts instead of patching them in place."""
    from ..parallel.pool import WorkerPool
    from .files import read_lora

    read_lora(path)  # a file that is no LoRA is refused here; its keys are matched on the ranks
    pool = renderer.pool
    entries = list(pool.spec.get("loras", []))
    if strength_high != 0:
        entries.append([str(path), strength_high, "high"])
    has_low = pool.loaded["low"] if pool.loaded else pool.spec.get("kind") == "folder" or bool(pool.spec.get("low"))
    if has_low and strength_low != 0:
        entries.append([str(path), strength_low, "low"])
    new_pool = WorkerPool(pool.options, {**pool.spec, "loras": entries}, heads=pool.heads, dtype=pool.dtype,
                          attention=pool.attention, label=pool.label)
    applied = (lora_name, strength_high, strength_low if has_low else None)
    return dataclasses.replace(renderer, pool=new_pool, loras=renderer.loras + (applied,))
