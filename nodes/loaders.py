"""Load Bernini Planner / Load Bernini Renderer: declarative inputs; the work is in bernini_core.node_api."""

from bernini_core import node_api

DOWNLOAD_TOOLTIP = ("never: use only what is in models/bernini (an official model that is missing raises an error "
                    "with the download command). if missing: fetch the official model's needed files from Hugging "
                    "Face into models/bernini.")


class BerniniLoadPlanner:
    DESCRIPTION = ("Loads the planner of full Bernini (v1 or v2): the Qwen2.5-VL model, connector and ViT decoder "
                   "that plan the target in semantic space. Needed only for full Bernini; Bernini-R has no planner.")
    CATEGORY = "Bernini/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("BERNINI_PLANNER",)
    RETURN_NAMES = ("planner",)
    OUTPUT_TOOLTIPS = ("The planner; connect it to Plan Bernini Semantics.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (node_api.planner_choices(), {
                "default": "Bernini-Diffusers-v2",
                "tooltip": "Bernini-Diffusers(-v2) folder in models/bernini. Use the same release as the renderer."}),
            "weight_dtype": (list(node_api.PLANNER_DTYPES), {
                "default": "bf16", "tooltip": "Weight and compute dtype of the planner (bf16 as the official)."}),
            "download": (list(node_api.DOWNLOAD_CHOICES), {"default": "never", "tooltip": DOWNLOAD_TOOLTIP}),
        }}

    def load(self, model, weight_dtype, download):
        return (node_api.load_planner(model, weight_dtype, download),)


class BerniniLoadRenderer:
    DESCRIPTION = ("Loads the renderer of a Bernini model: UMT5 text encoder, the Wan2.2 DiT experts and the Wan 2.1 "
                   "VAE. Full Bernini (v1/v2) loads without its planner (see Load Bernini Planner); Bernini-R loads "
                   "from its folder or, with 'single files', from ComfyUI's diffusion_models / text_encoders / vae.")
    CATEGORY = "Bernini/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("BERNINI_RENDERER", "BERNINI_TEXT_ENCODER", "BERNINI_VAE")
    RETURN_NAMES = ("renderer", "text_encoder", "vae")
    OUTPUT_TOOLTIPS = ("The DiT experts; connect to Sample Bernini Video.",
                       "UMT5 of this model; connect to Encode Bernini Prompt.",
                       "The Wan 2.1 VAE of this model; connect to Bernini Sources and Decode Bernini VAE.")

    @classmethod
    def INPUT_TYPES(cls):
        diffusion, text_encoders, vaes = (node_api.file_choices(kind)
                                          for kind in ("diffusion_models", "text_encoders", "vae"))
        return {
            "required": {
                "model": (node_api.renderer_choices(), {
                    "default": "Bernini-Diffusers-v2",
                    "tooltip": "An official folder in models/bernini (Bernini-Diffusers, Bernini-Diffusers-v2, "
                               "Bernini-R-Diffusers), another folder found there, or 'single files' (Bernini-R from "
                               "the optional file inputs below)."}),
                "weight_dtype": (list(node_api.RENDERER_DTYPES), {
                    "default": "bf16",
                    "tooltip": "Weight and compute dtype. fp8_e4m3fn keeps fp8 single files in fp8 (computing in "
                               "bf16); the VAE always runs in fp32."}),
                "attention": (list(node_api.ATTENTION_CHOICES), {
                    "default": "auto",
                    "tooltip": "Attention backend: auto picks the fastest installed (PyTorch SDPA always works)."}),
                "download": (list(node_api.DOWNLOAD_CHOICES), {"default": "never", "tooltip": DOWNLOAD_TOOLTIP}),
            },
            "optional": {
                "high_noise_model": (diffusion, {
                    "default": "none",
                    "tooltip": "'single files' only: the Bernini-R high-noise expert (or the only expert) from "
                               "models/diffusion_models."}),
                "low_noise_model": (diffusion, {
                    "default": "none",
                    "tooltip": "'single files' only: the Bernini-R low-noise expert; none = one expert for all "
                               "steps."}),
                "text_encoder": (text_encoders, {
                    "default": "none",
                    "tooltip": "'single files' only: UMT5-XXL (umt5_xxl_*.safetensors) from models/text_encoders."}),
                "vae": (vaes, {
                    "default": "none",
                    "tooltip": "'single files' only: the Wan 2.1 VAE (wan_2.1_vae.safetensors) from models/vae."}),
                "parallel": ("BERNINI_PARALLEL", {
                    "tooltip": "From Bernini Multi-GPU: the DiT experts load on a pool of GPUs (Ray workers) and "
                               "Sample Bernini Video renders there; unconnected = this process."}),
                "compile": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "torch.compile the DiT blocks (one block's graph serves all): faster steps on a GPU "
                               "with Triton; the first step of each expert and each new resolution includes the "
                               "compile time (in the log)."}),
            },
        }

    def load(self, model, weight_dtype, attention, download, high_noise_model="none", low_noise_model="none",
             text_encoder="none", vae="none", parallel=None, compile=False):
        return node_api.load_renderer(model, weight_dtype, attention, download, high_noise_model, low_noise_model,
                                      text_encoder, vae, parallel=parallel, compile=compile)


NODE_CLASS_MAPPINGS = {"BerniniLoadPlanner": BerniniLoadPlanner, "BerniniLoadRenderer": BerniniLoadRenderer}
NODE_DISPLAY_NAME_MAPPINGS = {"BerniniLoadPlanner": "Load Bernini Planner",
                              "BerniniLoadRenderer": "Load Bernini Renderer"}
