"""Sample Bernini Video: declarative inputs over bernini_core.node_api.sample."""

from bernini_core import node_api

SEED_MAX = 0xFFFFFFFFFFFFFFFF


def _omega(tooltip, top=20.0):
    return ("FLOAT", {"default": -1.0, "min": -1.0, "max": top, "step": 0.05, "tooltip": tooltip + " -1 = preset."})


class BerniniSampleVideo:
    DESCRIPTION = ("Denoises the target with the renderer's experts under the task's guidance mode. Settings left at "
                   "their sentinel (auto / 0 / -1) take the official preset of the task for this model.")
    CATEGORY = "Bernini/sampling"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)
    OUTPUT_TOOLTIPS = ("Raw Wan 2.1 latents; decode with Decode Bernini VAE (or ComfyUI's VAE Decode with the Wan 2.1 "
                       "VAE).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "renderer": ("BERNINI_RENDERER", {"tooltip": "The renderer output of Load Bernini Renderer."}),
            "conditioning": ("BERNINI_CONDITIONING", {
                "tooltip": "Bernini-R: from Encode Bernini Prompt; full Bernini: from Plan Bernini Semantics."}),
            "sources": ("BERNINI_SOURCES", {"tooltip": "From Bernini Sources."}),
            "guidance_mode": (list(node_api.GUIDANCE_CHOICES), {
                "default": "auto",
                "tooltip": "auto = the task preset. Bernini-R modes: rv2v, v2v, v2v_chain, t2v, r2v_apg, v2v_apg, "
                           "t2v_apg; full Bernini: vae_txt_vit_wapg, vae_txt_vit, rv2v_wapg, v2v_apg; both: none = "
                           "one pass per step without guidance (distill LoRAs)."}),
            "steps": ("INT", {"default": 0, "min": 0, "max": 200, "tooltip": "Denoising steps; 0 = preset (40-50)."}),
            "flow_shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.1,
                                     "tooltip": "Flow-matching schedule shift; 0 = preset (5.0)."}),
            "omega_vid": _omega("Guidance weight of the source video."),
            "omega_img": _omega("Guidance weight of the images."),
            "omega_txt": _omega("Guidance weight of the text."),
            "omega_tgt": _omega("Full Bernini: guidance weight of the planned target semantics."),
            "omega_scale": _omega("Factor applied to the weights once the low-noise expert takes over.", 4.0),
            "seed": ("INT", {"default": 42, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                             "tooltip": "Seed of the initial noise."}),
            "expert_boundary": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.005,
                                          "tooltip": "Timestep fraction where the low-noise expert takes over; "
                                                     "-1 = the model's switch_dit_boundary (0.875)."}),
            "preset": (list(node_api.PRESET_CHOICES), {
                "default": "official",
                "tooltip": "official = the release's settings per task. fast = for step-distilled experts (e.g. the "
                           "lightx2v 4-step LoRAs): guidance none, 4 steps, the distill sampler, shift 5, the "
                           "low-noise expert from step 2. Widgets off their sentinel still override it."}),
            "sampler": (list(node_api.SAMPLER_CHOICES), {
                "default": "auto",
                "tooltip": "auto = the preset's (official: UniPC; fast: distill). unipc, euler (official fallback) or "
                           "distill (lightx2v's step-distill sampler)."}),
        }, "optional": {
            "apg": ("BERNINI_APG", {"tooltip": "Bernini-R *_apg modes: η, momentum and norm threshold from Bernini "
                                               "APG Settings; unconnected = the preset (0.5, 0, 50)."}),
        }}

    def sample(self, renderer, conditioning, sources, guidance_mode, steps, flow_shift, omega_vid, omega_img,
               omega_txt, omega_tgt, omega_scale, seed, expert_boundary, preset="official", sampler="auto", apg=None):
        return (node_api.sample(renderer, conditioning, sources, guidance_mode, steps, flow_shift, omega_vid,
                                omega_img, omega_txt, omega_tgt, omega_scale, seed, expert_boundary, apg=apg,
                                preset=preset, sampler=sampler),)


class BerniniAPGSettings:
    DESCRIPTION = ("Adaptive Projected Guidance settings for Bernini-R's r2v_apg, v2v_apg and t2v_apg modes (the "
                   "official --eta, --momentum, --norm_threshold). Full Bernini's v2v_apg uses fixed settings, as "
                   "the official does.")
    CATEGORY = "Bernini/sampling"
    FUNCTION = "settings"
    RETURN_TYPES = ("BERNINI_APG",)
    RETURN_NAMES = ("apg",)
    OUTPUT_TOOLTIPS = ("Connect to Sample Bernini Video's apg input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "eta": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 2.0, "step": 0.05,
                              "tooltip": "Weight of the guidance component parallel to the prediction (official 0.5)."}),
            "momentum": ("FLOAT", {"default": 0.0, "min": -1.0, "max": 1.0, "step": 0.05,
                                   "tooltip": "Running-average momentum of the guidance difference across steps "
                                              "(official 0)."}),
            "norm_threshold": ("FLOAT", {"default": 50.0, "min": 0.0, "max": 1000.0, "step": 1.0,
                                         "tooltip": "Per-frame norm cap of the guidance difference; 0 = no cap "
                                                    "(official 50)."}),
        }}

    def settings(self, eta, momentum, norm_threshold):
        return (node_api.apg_settings(eta, momentum, norm_threshold),)


NODE_CLASS_MAPPINGS = {"BerniniSampleVideo": BerniniSampleVideo, "BerniniAPGSettings": BerniniAPGSettings}
NODE_DISPLAY_NAME_MAPPINGS = {"BerniniSampleVideo": "Sample Bernini Video", "BerniniAPGSettings": "Bernini APG Settings"}
