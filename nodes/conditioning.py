"""Encode Bernini Prompt / Bernini Sources / Plan Bernini Semantics: declarative inputs over bernini_core.node_api."""

from bernini_core import node_api

PLANNER_SEED_MAX = 0xFFFFFFFF  # the planner seeds numpy (official np.random.seed), which takes 32 bits


def _reference(tooltip):
    return ("IMAGE", {"tooltip": tooltip})


class BerniniEncodePrompt:
    DESCRIPTION = ("Chooses the task and encodes the prompt with the model's UMT5, adding the task's official system "
                   "prompt. The task travels with the conditioning; later nodes read it from there.")
    CATEGORY = "Bernini/conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = ("BERNINI_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Task + prompt features; Bernini-R: connect to Bernini Sources and Sample Bernini Video; full "
                       "Bernini: also through Plan Bernini Semantics.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("BERNINI_TEXT_ENCODER", {"tooltip": "The text_encoder output of Load Bernini Renderer."}),
            "task": (list(node_api.TASKS), {
                "default": "t2v",
                "tooltip": "t2i text→image, i2i image edit, t2v text→video, v2v video edit, mv2v motion/style edit, "
                           "rv2v video edit with reference images, r2v references→video, ads2v insert a reference "
                           "video into a source video."}),
            "prompt": ("STRING", {"default": "", "multiline": True,
                                  "tooltip": "What to generate, or the edit to make."}),
            "negative_prompt": ("STRING", {"default": "", "multiline": True,
                                           "tooltip": "Empty = the task's official default negative prompt for this "
                                                      "model."}),
        }}

    def encode(self, text_encoder, task, prompt, negative_prompt):
        return (node_api.encode_prompt(text_encoder, task, prompt, negative_prompt),)


class BerniniSources:
    DESCRIPTION = ("Resizes, resamples and VAE-encodes the source media of the task by the official rules (full "
                   "Bernini also keeps them for the planner). Widgets at 0 take the task preset of the model.")
    CATEGORY = "Bernini/conditioning"
    FUNCTION = "prepare"
    RETURN_TYPES = ("BERNINI_SOURCES",)
    RETURN_NAMES = ("sources",)
    OUTPUT_TOOLTIPS = ("The encoded sources and output geometry; connect to Plan Bernini Semantics (full Bernini) and "
                       "Sample Bernini Video.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("BERNINI_CONDITIONING", {"tooltip": "From Encode Bernini Prompt (gives the task)."}),
                "vae": ("BERNINI_VAE", {"tooltip": "The vae output of the same Load Bernini Renderer."}),
                "width": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 16,
                                  "tooltip": "Output width when no source fixes the size; 0 = preset."}),
                "height": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 16,
                                   "tooltip": "Output height when no source fixes the size; 0 = preset."}),
                "frames": ("INT", {"default": 0, "min": 0, "max": 1025, "step": 1,
                                   "tooltip": "Output frames (forced to 4n+1; 1 for t2i/i2i); 0 = preset (81)."}),
                "fps": ("INT", {"default": 16, "min": 1, "max": 120,
                                "tooltip": "Frame rate the sources are resampled to and the output plays at "
                                           "(16 = official)."}),
                "max_image_size": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 16,
                                           "tooltip": "Longest edge sources are resized to; 0 = preset."}),
            },
            "optional": {
                "source_video": ("IMAGE", {"tooltip": "Frames of the video to edit (v2v, mv2v, rv2v, ads2v), e.g. "
                                                      "from GetVideoComponents."}),
                "source_image": ("IMAGE", {"tooltip": "The image i2i edits (r2v: a reference image)."}),
                "reference_images": _reference("A batch of same-size reference images (r2v, rv2v), in order."),
                "reference_image_2": _reference("Another reference image (any size), after reference_images."),
                "reference_image_3": _reference("Another reference image (any size), after reference_image_2."),
                "reference_image_4": _reference("Another reference image (any size), after reference_image_3."),
                "reference_video": ("IMAGE", {"tooltip": "ads2v: frames of the reference video to insert."}),
                "video_fps": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 240.0, "step": 0.001,
                                        "tooltip": "Frame rate of the incoming source_video frames, e.g. "
                                                   "GetVideoComponents' fps; 0 = fps."}),
                "reference_video_fps": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 240.0, "step": 0.001,
                                                  "tooltip": "Frame rate of the incoming reference_video frames "
                                                             "(ads2v); 0 = video_fps."}),
            },
        }

    def prepare(self, conditioning, vae, width, height, frames, fps, max_image_size, source_video=None,
                source_image=None, reference_images=None, reference_image_2=None, reference_image_3=None,
                reference_image_4=None, reference_video=None, video_fps=0.0, reference_video_fps=0.0):
        return (node_api.prepare_sources(
            conditioning, vae, width=width, height=height, frames=frames, fps=fps, max_image_size=max_image_size,
            source_video=source_video, source_image=source_image, reference_images=reference_images,
            reference_image_2=reference_image_2, reference_image_3=reference_image_3,
            reference_image_4=reference_image_4, reference_video=reference_video, video_fps=video_fps,
            reference_video_fps=reference_video_fps),)


class BerniniPlanSemantics:
    DESCRIPTION = ("Full Bernini only: the planner reads the prompt and the sources and plans the target's semantics "
                   "(MaskGIT over ViT tokens); the renderer then draws from the plan.")
    CATEGORY = "Bernini/conditioning"
    FUNCTION = "plan"
    RETURN_TYPES = ("BERNINI_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The conditioning with its plan; connect to Sample Bernini Video.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "planner": ("BERNINI_PLANNER", {"tooltip": "From Load Bernini Planner (same release as the renderer)."}),
            "conditioning": ("BERNINI_CONDITIONING", {"tooltip": "From Encode Bernini Prompt."}),
            "sources": ("BERNINI_SOURCES", {"tooltip": "From Bernini Sources (same conditioning)."}),
            "planning_steps": ("INT", {"default": 0, "min": 0, "max": 100,
                                       "tooltip": "MaskGIT planning steps; 0 = preset (v1 25, v2 video 50)."}),
            "vit_denoising_steps": ("INT", {"default": 0, "min": 0, "max": 50,
                                            "tooltip": "ViT-decoder flow steps per planning step; 0 = preset."}),
            "vit_txt_cfg": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 10.0, "step": 0.05,
                                      "tooltip": "Planner text guidance; -1 = preset (1.2)."}),
            "vit_img_cfg": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 10.0, "step": 0.05,
                                      "tooltip": "Planner source-media guidance; -1 = preset (1.0)."}),
            "seed": ("INT", {"default": 42, "min": 0, "max": PLANNER_SEED_MAX, "control_after_generate": True,
                             "tooltip": "Seed of the planning draws (the official run uses one seed for planning "
                                        "and sampling)."}),
        }}

    def plan(self, planner, conditioning, sources, planning_steps, vit_denoising_steps, vit_txt_cfg, vit_img_cfg,
             seed):
        return (node_api.plan(planner, conditioning, sources, planning_steps, vit_denoising_steps, vit_txt_cfg,
                              vit_img_cfg, seed),)


NODE_CLASS_MAPPINGS = {"BerniniEncodePrompt": BerniniEncodePrompt, "BerniniSources": BerniniSources,
                       "BerniniPlanSemantics": BerniniPlanSemantics}
NODE_DISPLAY_NAME_MAPPINGS = {"BerniniEncodePrompt": "Encode Bernini Prompt", "BerniniSources": "Bernini Sources",
                              "BerniniPlanSemantics": "Plan Bernini Semantics"}
