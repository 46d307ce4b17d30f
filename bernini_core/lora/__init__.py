"""LoRAs for the renderer's DiT experts: every published Wan layout, ComfyUI's arithmetic, per expert.

Standalone (CLI ``--lora FILE[:STRENGTH[:high|low|both]]``, ``from_pretrained(loras=...)``): ``apply_loras_``
merges into the loaded weights. ComfyUI: ``lora_module_map`` gives the map its own ``comfy.lora.load_lora``
needs (keys.py).
"""

from .files import LoraFile, read_lora
from .keys import ACCEPTED_LAYOUTS, canonical_state_dict, describe_layout, lora_module_map
from .merge import LoraWeightFunction, apply_loras_, check_loras, experts_of, merge_patches_
from .patches import Patch, apply_fp32_, lora_patches
from .spec import LoraSpec, as_lora_specs, parse_lora_arg

__all__ = ["ACCEPTED_LAYOUTS", "LoraFile", "LoraSpec", "LoraWeightFunction", "Patch", "apply_fp32_",
           "apply_loras_", "as_lora_specs", "check_loras", "canonical_state_dict", "describe_layout", "experts_of",
           "lora_module_map", "lora_patches", "merge_patches_", "parse_lora_arg", "read_lora"]
