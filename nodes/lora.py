"""Apply Bernini LoRA: declarative inputs over bernini_core.node_api.apply_lora."""

from bernini_core import node_api


def _strength(tooltip):
    return ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": tooltip})


class BerniniApplyLora:
    DESCRIPTION = ("Patches a LoRA into the renderer's DiT experts, with one strength for the high-noise and one for "
                   "the low-noise expert (Wan 2.2 LoRAs come as high/low pairs: chain two nodes, each with the other "
                   "expert's strength at 0). Applied as ComfyUI weight patches: removing the node restores the "
                   "original weights without reloading. Works with bf16/fp8 and GGUF experts; layouts: ComfyUI / "
                   "original Wan, kohya / musubi, diffusers / PEFT, and lightx2v's full-weight diffs.")
    CATEGORY = "Bernini/loaders"
    FUNCTION = "apply"
    RETURN_TYPES = ("BERNINI_RENDERER",)
    RETURN_NAMES = ("renderer",)
    OUTPUT_TOOLTIPS = ("The renderer with the LoRA patched in; connect to Sample Bernini Video or another Apply "
                       "Bernini LoRA.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "renderer": ("BERNINI_RENDERER", {"tooltip": "The renderer output of Load Bernini Renderer (or of another "
                                                         "Apply Bernini LoRA)."}),
            "lora_name": (node_api.lora_choices(), {"tooltip": "A LoRA file in models/loras."}),
            "strength_high": _strength("Strength on the high-noise expert (the first steps); 0 = not applied. A "
                                       "single-expert renderer (Bernini-R 1.3B) uses this one."),
            "strength_low": _strength("Strength on the low-noise expert (the last steps); 0 = not applied. Ignored "
                                      "when the renderer has a single expert."),
        }}

    def apply(self, renderer, lora_name, strength_high, strength_low):
        return (node_api.apply_lora(renderer, lora_name, strength_high, strength_low),)


NODE_CLASS_MAPPINGS = {"BerniniApplyLora": BerniniApplyLora}
NODE_DISPLAY_NAME_MAPPINGS = {"BerniniApplyLora": "Apply Bernini LoRA"}
