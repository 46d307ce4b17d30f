"""Enhance Bernini Prompt: declarative inputs over bernini_core.node_api.enhance_prompt."""

from bernini_core import node_api

SAMPLING_SEED_MAX = 0xFFFFFFFFFFFFFFFF
_KEYS = ("The openai backend reads the endpoint from the environment ComfyUI runs in: BERNINI_PE_API_KEY (or "
         "OPENAI_API_KEY), BERNINI_PE_BASE_URL (or OPENAI_BASE_URL) and BERNINI_PE_MODEL; no key is ever stored in "
         "the workflow, the history or a log.")


class BerniniEnhancePrompt:
    DESCRIPTION = ("Rewrites a short prompt into the detailed one Bernini was trained on, per task, as the official "
                   "--use_pe does: local = the planner's own Qwen2.5-VL on this machine (no network, no key), openai "
                   "= an OpenAI-compatible endpoint. The model sees frames of the source video and the reference "
                   "images. Connect the output to Encode Bernini Prompt's prompt; the enhanced text is shown here. "
                   "On an endpoint failure the original prompt passes through with a warning.")
    CATEGORY = "Bernini/conditioning"
    FUNCTION = "enhance"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt",)
    OUTPUT_TOOLTIPS = ("The enhanced prompt; convert Encode Bernini Prompt's prompt to an input and connect it.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "task": (list(node_api.TASKS), {
                    "default": "t2v",
                    "tooltip": "The task of the prompt, as picked in Encode Bernini Prompt: it chooses how the prompt "
                               "is rewritten (t2v/t2i: a director's expansion; v2v/mv2v/i2i: the edit and what stays; "
                               "r2v/rv2v: the references named image0, image1, ...; ads2v: one insertion line)."}),
                "prompt": ("STRING", {"default": "", "multiline": True,
                                      "tooltip": "Your short prompt or editing instruction (any language)."}),
                "backend": (list(node_api.ENHANCE_BACKENDS), {
                    "default": "local",
                    "tooltip": "local: the planner's Qwen2.5-VL (connect planner); nothing leaves this machine. "
                               "openai: an OpenAI-compatible chat endpoint. " + _KEYS}),
                "max_new_tokens": ("INT", {"default": 1024, "min": 1, "max": node_api.PE_MAX_NEW_TOKENS_LIMIT,
                                           "step": 1,
                                           "tooltip": "local backend: the most tokens the model may write (an "
                                                      "enhanced prompt takes about 150-400)."}),
                "sampling": ("BOOLEAN", {"default": False,
                                         "tooltip": "local backend: off = greedy decoding, the same text every run; "
                                                    "on = sampled from sampling_seed, for variations."}),
                "sampling_seed": ("INT", {"default": 0, "min": 0, "max": SAMPLING_SEED_MAX,
                                          "tooltip": "local backend with sampling on: the seed of the sampling."}),
            },
            "optional": {
                "planner": ("BERNINI_PLANNER", {"tooltip": "local backend: the planner output of Load Bernini "
                                                           "Planner; its Qwen2.5-VL writes the prompt."}),
                "source_video": ("IMAGE", {"tooltip": "Frames of the source video (v2v, mv2v, rv2v, ads2v): three, "
                                                      "evenly spaced, are shown to the model."}),
                "source_image": ("IMAGE", {"tooltip": "i2i: the image to edit; r2v / rv2v: the first reference "
                                                      "image."}),
                "reference_images": ("IMAGE", {"tooltip": "Reference images (r2v, rv2v; i2i extras), in order: "
                                                          "image0, image1, ..."}),
                "reference_video": ("IMAGE", {"tooltip": "ads2v: frames of the reference video to insert (three "
                                                         "are shown)."}),
                "endpoint_model": ("STRING", {"default": "", "multiline": False,
                                              "tooltip": "openai backend: the model name; empty = BERNINI_PE_MODEL, "
                                                         "else the official default. Never put a key here. " + _KEYS}),
            },
        }

    def enhance(self, task, prompt, backend, max_new_tokens, sampling, sampling_seed, planner=None,
                source_video=None, source_image=None, reference_images=None, reference_video=None,
                endpoint_model=""):
        text = node_api.enhance_prompt(task, prompt, backend, max_new_tokens, sampling, sampling_seed, planner,
                                       source_video, source_image, reference_images, reference_video, endpoint_model)
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {"BerniniEnhancePrompt": BerniniEnhancePrompt}
NODE_DISPLAY_NAME_MAPPINGS = {"BerniniEnhancePrompt": "Enhance Bernini Prompt"}
