"""ComfyUI node classes (V1 interface): the seven stage nodes, Bernini APG Settings, Apply Bernini LoRA and Bernini
Multi-GPU, and Enhance Bernini Prompt (nodes/prompt.py), one module per stage.

Node modules declare inputs only; the work lives in bernini_core.node_api. Nothing here imports ComfyUI.
"""

from . import conditioning, latent, loaders, lora, parallel, prompt, sampling

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in (loaders, lora, parallel, prompt, conditioning, sampling, latent):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
