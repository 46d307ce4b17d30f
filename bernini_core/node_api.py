"""The engine side of the ComfyUI nodes: one function per node beyond declaring its inputs.

No ComfyUI import here (the runtime, ops and intermediate device come from `comfy_bridge`), so every node can be
called and tested in plain Python. Data flow (docs/architecture.md §6): Load Renderer → (RendererModel,
TextEncoderModel, VAEModel) sharing one pipeline (node_models); Encode Prompt → Conditioning (the task is chosen
there and travels with it); Sources → SourcesBundle; Plan Semantics (full Bernini) → Conditioning with a Plan;
Sample → LATENT {"samples": raw Wan 2.1 latents}; Decode → IMAGE. Widget sentinels (0 / -1 / "auto") mean "the
preset of this task for this model", and an input that contradicts another raises BerniniError naming both and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Optional

import numpy as np
import torch

from . import comfy_bridge, media
from .errors import BerniniError
from .node_models import (  # re-exported: the nodes use node_api only
    ATTENTION_CHOICES, DOWNLOAD_CHOICES, FULL_FAMILY, NONE, OFFICIAL_FULL, OFFICIAL_RENDERERS, PLANNER_DTYPES,
    RENDERER_DTYPES, RENDERER_FAMILY, SINGLE_FILES, Conditioning, PlannerModel, RendererModel, SourcesBundle,
    TextEncoderModel, VAEModel, file_choices, load_planner, load_renderer, log, planner_choices, renderer_choices)
from .lora.node_patches import apply_lora
from .prompt_enhancer.node import ENHANCE_BACKENDS, enhance_prompt  # Enhance Bernini Prompt
from .prompt_enhancer.node import MAX_NEW_TOKENS_LIMIT as PE_MAX_NEW_TOKENS_LIMIT
from .sampling.guidance import RENDERER_MODES
from .sampling.guidance_full import FULL_MODES
from .tasks import (NO_GUIDANCE, PRESET_NAMES, RENDERER_NEGATIVE_KIND, SAMPLER_NAMES, TASK_NAMES, SourceInputs,
                    bernini_preset, check_numbers, check_sources, get_task, ignored_by_mode)

__all__ = [
    "ATTENTION_CHOICES", "DOWNLOAD_CHOICES", "FULL_FAMILY", "GUIDANCE_CHOICES", "NONE", "OFFICIAL_FULL",
    "OFFICIAL_RENDERERS", "PLANNER_DTYPES", "RENDERER_DTYPES", "RENDERER_FAMILY", "SINGLE_FILES", "TASKS",
    "Conditioning", "PlannerModel", "RendererModel", "SourcesBundle", "TextEncoderModel", "VAEModel", "decode",
    "apg_settings", "default_negative_prompt", "encode_prompt", "file_choices", "load_planner", "load_renderer", "plan",
    "planner_choices", "prepare_sources", "renderer_choices", "sample", "apply_lora", "lora_choices", "multi_gpu",
    "ENHANCE_BACKENDS", "PE_MAX_NEW_TOKENS_LIMIT", "enhance_prompt"]

TASKS = TASK_NAMES


def multi_gpu(gpus: str = "2", ulysses: int = 0, cfg_parallel: int = 1, fsdp: bool = False, ray_address: str = "",
              device: str = "cuda", timeout: int = 1800):
    """The Bernini Multi-GPU node: its settings, checked (parallel.pool.PoolOptions); the pool starts when Load Bernini
    Renderer loads with them."""
    from .parallel.pool import PoolOptions
    from .parallel.pool.pool import import_ray

    options = PoolOptions.from_node(gpus, ulysses, cfg_parallel, fsdp, ray_address, device, float(timeout))
    import_ray()  # without Ray: how to install it, on this node
    return options


def lora_choices() -> list[str]:
    """The LoRA files ComfyUI finds in models/loras (its own list; empty outside ComfyUI)."""
    return list(comfy_bridge.list_models("loras"))


GUIDANCE_CHOICES = ("auto",) + RENDERER_MODES + tuple(m for m in FULL_MODES if m not in RENDERER_MODES) + (NO_GUIDANCE,)
PRESET_CHOICES = PRESET_NAMES  # Sample Bernini Video: official (default) | fast (distill LoRAs)
SAMPLER_CHOICES = ("auto",) + SAMPLER_NAMES  # auto = the preset's (official: the model's UniPC; fast: distill)


# ---------------------------------------------------------------------------- prompt
def default_negative_prompt(family: str, version: str, task: str) -> str:
    """The negative prompt the official presets use for this task and model (docs/official_behaviour.md §5.1–§5.3)."""
    from .text_encoder import negative_prompt

    kind = RENDERER_NEGATIVE_KIND if family == RENDERER_FAMILY else bernini_preset(task, version)["negative"]
    return negative_prompt(kind)


def encode_prompt(text_encoder: TextEncoderModel, task: str, prompt: str, negative_prompt: str = "") -> Conditioning:
    get_task(task)
    if not isinstance(prompt, str):
        raise BerniniError(f"Encode Bernini Prompt: prompt must be a string, got {type(prompt).__name__} {prompt!r}.")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise BerniniError(f"Encode Bernini Prompt: negative_prompt must be a string, got "
                           f"{type(negative_prompt).__name__} {negative_prompt!r}.")
    if not prompt.strip():
        raise BerniniError("Encode Bernini Prompt: prompt is empty; describe the image/video to generate or the edit "
                           "to make.")
    negative = negative_prompt if negative_prompt and negative_prompt.strip() else \
        default_negative_prompt(text_encoder.family, text_encoder.version, task)
    # The system prompt: the preset's when it names one (v1 v2v/mv2v, as run_v2v.sh passes it), else the task's
    # (docs/official_behaviour.md §4.4).
    system_prompt = text_encoder.pipeline.default_settings(task).get("system_prompt")
    embeds = text_encoder.pipeline.encode_prompt(task, prompt, negative, system_prompt)
    return Conditioning(task=task, embeds=embeds, prompt=prompt, negative_prompt=negative,
                        family=text_encoder.family, version=text_encoder.version, pipeline=text_encoder.pipeline)


# ---------------------------------------------------------------------------- sources
def _rgb_frames(image, input_name: str) -> torch.Tensor:
    """A ComfyUI IMAGE [F,H,W,C] (float 0..1) checked and reduced to RGB, NOT converted: the engine converts
    only the frames it samples (a long clip is never copied whole)."""
    if not isinstance(image, torch.Tensor):
        image = torch.as_tensor(np.asarray(image))
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[-1] not in (3, 4) or image.shape[0] == 0:
        raise BerniniError(f"Bernini Sources: {input_name} must be an IMAGE batch [frames, height, width, 3]; "
                           f"got shape {tuple(image.shape)}.")
    return image[..., :3]  # RGBA from some loaders: alpha dropped, as PIL convert("RGB")


def _uint8_frames(image, input_name: str) -> np.ndarray:
    """A ComfyUI IMAGE → uint8 [F,H,W,3], floats rounded to 8 bit as media does."""
    return media.to_uint8(_rgb_frames(image, input_name), f"Bernini Sources: {input_name}")


NODE_INPUTS = SourceInputs("Bernini Sources: ", "source_video", "connect source_video (e.g. from GetVideoComponents)",
                           "source_image", "connect source_image", "reference images",
                           "connect reference_images (or reference_image_2..4)",
                           "connect source_video and reference_video (the video to insert)")


def _check_source_inputs(task: str, has_video: bool, has_ref_video: bool, has_image: bool, n_refs: int) -> None:
    """The task's source rules (tasks.check_sources) in terms of the node's inputs, plus the reference video."""
    check_sources(get_task(task), n_videos=int(has_video) + int(has_ref_video), has_image=has_image, n_images=n_refs,
                  inputs=NODE_INPUTS)
    if has_ref_video and task != "ads2v":
        raise BerniniError(f"Bernini Sources: task {task!r} takes no reference_video (only ads2v does): disconnect "
                           "it or pick ads2v in Encode Bernini Prompt.")


def _check_same_model(first, first_input: str, second, second_input: str, node: str) -> None:
    if (first.family, first.version) != (second.family, second.version):
        raise BerniniError(
            f"{node}: {first_input} comes from {first.label} but {second_input} from {second.label}; connect the "
            "outputs of one Load Bernini Renderer (sources are resized per model: full Bernini keeps a 240 px "
            "minimum short edge, Bernini-R does not).")


def prepare_sources(conditioning: Conditioning, vae: VAEModel, width: int = 0, height: int = 0, frames: int = 0,
                    fps: int = 16, max_image_size: int = 0, source_video=None, source_image=None,
                    reference_images=None, reference_image_2=None, reference_image_3=None, reference_image_4=None,
                    reference_video=None, video_fps: float = 0.0, reference_video_fps: float = 0.0) -> SourcesBundle:
    """IMAGE inputs → the engine's sources; 0 widgets take the preset of the conditioning's task and model."""
    _check_same_model(conditioning, "conditioning", vae, "vae", "Bernini Sources")
    task, pipe = conditioning.task, vae.pipeline
    preset = pipe.default_settings(task)
    num_frames = int(frames) if frames else int(preset["num_frames"])
    height = int(height) if height else int(preset["height"])
    width = int(width) if width else int(preset["width"])
    max_image_size = int(max_image_size) if max_image_size else int(preset["max_image_size"])
    if not fps or fps <= 0:
        raise BerniniError(f"Bernini Sources: fps is {fps}; it must be positive (16 is the official rate).")
    for name, value in (("video_fps", video_fps), ("reference_video_fps", reference_video_fps)):
        if not math.isfinite(float(value)) or not 0 <= float(value) <= 1000:  # NaN passes ComfyUI's min/max check
            raise BerniniError(f"Bernini Sources: {name} is {value}; give the frame rate of the frames (e.g. 24), or "
                               "0 for the fps setting.")
    if vae.family == FULL_FAMILY and (height % 16 or width % 16):
        raise BerniniError(f"Bernini Sources: width × height {width}x{height} must be multiples of 16 for full "
                           f"Bernini; set e.g. width {max(16, round(width / 16) * 16)}, height "
                           f"{max(16, round(height / 16) * 16)} (0 = the preset).")
    rate = float(video_fps) if video_fps and video_fps > 0 else None  # None: the frames are at `fps`
    ref_rate = float(reference_video_fps) if reference_video_fps and reference_video_fps > 0 else rate
    references = (("reference_images", reference_images), ("reference_image_2", reference_image_2),
                  ("reference_image_3", reference_image_3), ("reference_image_4", reference_image_4))
    _check_source_inputs(task, source_video is not None, reference_video is not None, source_image is not None,
                         sum(value is not None for _, value in references))

    videos = [_rgb_frames(v, n) for n, v in (("source_video", source_video), ("reference_video", reference_video))
              if v is not None]
    image = None
    if source_image is not None:
        batch = _uint8_frames(source_image, "source_image")
        if batch.shape[0] != 1:
            raise BerniniError(f"Bernini Sources: source_image holds {batch.shape[0]} images; it takes the one image "
                               "to edit (pass references through reference_images).")
        image = batch[0]
    refs = []
    for input_name, value in references:
        if value is not None:
            refs.extend(_uint8_frames(value, input_name))  # a batch = several references, in batch order

    rates = [r for r, v in ((rate, source_video), (ref_rate, reference_video)) if v is not None]  # one per video
    common = dict(video=videos or None, image=image, images=refs or None, fps=int(fps), num_frames=num_frames,
                  max_image_size=max_image_size, video_fps=rates)
    if vae.family == FULL_FAMILY:
        sources = pipe.prepare_sources(task, height=height, width=width, **common)
    else:
        sources = pipe.prepare_sources(task, **common)
    return SourcesBundle(task=task, sources=sources, family=vae.family, version=vae.version, num_frames=num_frames,
                         height=height, width=width, max_image_size=max_image_size, fps=int(fps), video_fps=rate)


# ---------------------------------------------------------------------------- planning
def plan(planner: PlannerModel, conditioning: Conditioning, sources: SourcesBundle, planning_steps: int = 0,
         vit_denoising_steps: int = 0, vit_txt_cfg: float = -1.0, vit_img_cfg: float = -1.0,
         seed: int = 42) -> Conditioning:
    """MaskGIT planning (docs/official_behaviour.md §3.4–§3.7) on the renderer pipeline that encoded the prompt;
    returns the conditioning with its Plan (the four renderer contexts)."""
    node = "Plan Bernini Semantics"
    if conditioning.family != FULL_FAMILY:
        raise BerniniError(f"{node}: the conditioning comes from {conditioning.label}, which renders without a "
                           "planner; connect Encode Bernini Prompt straight to Sample Bernini Video, or load "
                           "Bernini-Diffusers(-v2) in Load Bernini Renderer.")
    if conditioning.plan is not None:
        raise BerniniError(f"{node}: the conditioning already carries a plan; connect the output of Encode Bernini "
                           "Prompt, not of another Plan Bernini Semantics.")
    if planner.version != conditioning.version:
        raise BerniniError(f"{node}: the planner is Bernini {planner.version} but the conditioning comes from the "
                           f"Bernini {conditioning.version} text encoder; load the planner and the renderer of the "
                           "same release.")
    _check_same_model(sources, "sources", conditioning, "conditioning", node)
    _check_same_task(conditioning, sources, node)
    preset = bernini_preset(conditioning.task, conditioning.version)
    try:  # NaN passes ComfyUI's min/max check; direct calls skip the widget limits
        check_numbers({"planning_step": planning_steps or preset["planning_step"],
                       "vit_denoising_step": vit_denoising_steps or preset["vit_denoising_step"],
                       "vit_txt_cfg": vit_txt_cfg, "vit_img_cfg": vit_img_cfg})
    except BerniniError as exc:
        raise BerniniError(f"{node}: {exc}") from None
    pipe = conditioning.pipeline
    planning_pipe = pipe
    if planner.dtype != pipe.dtype:  # the planner runs in its own dtype; contexts are cast to the renderer's below
        planning_pipe = copy.copy(pipe)
        planning_pipe.dtype = planner.dtype
    result = planning_pipe.plan_semantics(
        sources.sources, conditioning.embeds, prompt=conditioning.prompt, neg_prompt=conditioning.negative_prompt,
        seed=int(seed), planning_step=int(planning_steps) or int(preset["planning_step"]),
        vit_denoising_step=int(vit_denoising_steps) or int(preset["vit_denoising_step"]),
        vit_txt_cfg=float(vit_txt_cfg) if vit_txt_cfg >= 0 else float(preset["vit_txt_cfg"]),
        vit_img_cfg=float(vit_img_cfg) if vit_img_cfg >= 0 else float(preset["vit_img_cfg"]),
        planner=planner.bundle)
    if planning_pipe is not pipe:
        result.contexts = {k: v.to(pipe.dtype) for k, v in result.contexts.items()}
    return dataclasses.replace(conditioning, plan=result)


def _check_same_task(conditioning: Conditioning, sources: SourcesBundle, node: str) -> None:
    if conditioning.task != sources.task:
        raise BerniniError(f"{node}: the conditioning is for task {conditioning.task!r} but the sources were "
                           f"prepared for {sources.task!r}; feed Bernini Sources the same conditioning.")


# ---------------------------------------------------------------------------- sampling
def _check_renderer_inputs(renderer: RendererModel, conditioning: Conditioning, sources: SourcesBundle) -> None:
    node = "Sample Bernini Video"
    if renderer.family == RENDERER_FAMILY and conditioning.family != RENDERER_FAMILY:
        what = "a plan (Plan Bernini Semantics)" if conditioning.plan is not None else "prompt features"
        raise BerniniError(f"{node}: the conditioning carries {what} from {conditioning.label} but the renderer is "
                           "Bernini-R, which uses no planner; encode the prompt with the Bernini-R text encoder and "
                           "connect Encode Bernini Prompt directly.")
    if renderer.family == FULL_FAMILY:
        if conditioning.family != FULL_FAMILY:
            raise BerniniError(f"{node}: the conditioning comes from the {conditioning.label} text encoder but the "
                               f"renderer is {renderer.label}; use the text encoder of the same Load Bernini Renderer.")
        if conditioning.plan is None:
            raise BerniniError(f"{node}: {renderer.label} renders from the planner's semantics: connect Plan Bernini "
                               "Semantics between Encode Bernini Prompt and Sample Bernini Video.")
        if conditioning.plan.version != renderer.version:
            raise BerniniError(f"{node}: the conditioning was planned by Bernini {conditioning.plan.version} but the "
                               f"renderer is Bernini {renderer.version}; plan and render with the same release.")
    _check_same_model(sources, "sources", renderer, "renderer", node)
    _check_same_task(conditioning, sources, node)


def _guidance_mode(renderer: RendererModel, guidance_mode: str, preset: dict) -> Optional[str]:
    if guidance_mode in (None, "", "auto"):
        return None
    valid = (RENDERER_MODES if renderer.family == RENDERER_FAMILY else FULL_MODES) + (NO_GUIDANCE,)
    if guidance_mode not in valid:
        if guidance_mode in FULL_MODES or guidance_mode in RENDERER_MODES:
            kind = "full-Bernini" if guidance_mode in FULL_MODES else "Bernini-R"
            what = f"is a {kind} mode but the renderer is {renderer.label}"
        else:
            what = f"is not a guidance mode of {renderer.label}"
        raise BerniniError(f"Sample Bernini Video: guidance_mode {guidance_mode!r} {what}; choose auto "
                           f"({preset['guidance_mode']}) or one of {', '.join(valid)}.")
    return guidance_mode


def apg_settings(eta: float = 0.5, momentum: float = 0.0, norm_threshold: float = 50.0) -> dict:
    """The Bernini APG Settings node: the official --eta / --momentum / --norm_threshold (one value for every rung,
    as the CLI's default 50 50 50)."""
    if norm_threshold < 0:
        raise BerniniError(f"Bernini APG Settings: norm_threshold {norm_threshold} must be ≥ 0 (0 = no cap).")
    return {"eta": float(eta), "momentum": float(momentum), "norm_threshold": (float(norm_threshold),) * 3}


def sample(renderer: RendererModel, conditioning: Conditioning, sources: SourcesBundle, guidance_mode: str = "auto",
           steps: int = 0, flow_shift: float = 0.0, omega_vid: float = -1.0, omega_img: float = -1.0,
           omega_txt: float = -1.0, omega_tgt: float = -1.0, omega_scale: float = -1.0, seed: int = 42,
           expert_boundary: float = -1.0, apg: Optional[dict] = None, preset: str = "official",
           sampler: str = "auto") -> dict:
    """Guided denoising with the task preset overridden by every non-sentinel widget; returns ComfyUI's LATENT
    with RAW (un-normalised) Wan 2.1 latents [1,16,T,H/8,W/8] on the intermediate device. `preset` "fast" starts
    from the distill-LoRA settings (tasks.FAST_OVERRIDES); `sampler` "auto" keeps the preset's."""
    _check_renderer_inputs(renderer, conditioning, sources)
    pipe, task = renderer.pipeline, conditioning.task
    task_preset = pipe.default_settings(task)

    def given(value, sentinel_below: float):
        return None if value is None or value < sentinel_below else value

    overrides = {
        "num_frames": sources.num_frames, "height": sources.height, "width": sources.width,
        "max_image_size": sources.max_image_size, "fps": sources.fps, "seed": int(seed),
        "guidance_mode": _guidance_mode(renderer, guidance_mode, task_preset),
        "num_inference_steps": int(steps) if steps else None,
        "flow_shift": float(flow_shift) if flow_shift else None,
        "preset": preset or None, "sampler": None if sampler in (None, "", "auto") else sampler,
        **{name: given(value, 0) for name, value in (("omega_vid", omega_vid), ("omega_img", omega_img),
                                                     ("omega_txt", omega_txt), ("omega_tgt", omega_tgt),
                                                     ("omega_scale", omega_scale))},
    }
    if apg is not None:
        if renderer.family == FULL_FAMILY:
            raise BerniniError("Sample Bernini Video: the apg input applies to Bernini-R's *_apg modes; full Bernini's "
                               "v2v_apg uses fixed settings (η 1, momentum 0, threshold 50) as the official does — "
                               "disconnect Bernini APG Settings.")
        overrides.update(apg)
    settings = pipe.resolve(task, overrides)
    if expert_boundary is not None and expert_boundary >= 0:  # the widget's timestep boundary beats a step index
        settings["boundary_step_index"] = None
    for name in ignored_by_mode(settings, overrides):
        log.warning("Sample Bernini Video: %s is ignored: guidance_mode 'none' reads no guidance weights.", name)
    task_inputs = conditioning.plan if renderer.family == FULL_FAMILY else conditioning.embeds
    if renderer.pool is not None:  # Bernini Multi-GPU: the experts render on the pool
        from .parallel.pool.nodes import pool_sample

        boundary = _checked_boundary(expert_boundary)
        latents = pool_sample(renderer, task_inputs, sources.sources, settings, boundary=boundary)
        return {"samples": pipe.components.vae.denormalize(latents).to(comfy_bridge.intermediate_device())}
    if renderer.experts is not None:  # Apply Bernini LoRA: the experts' patched clones
        pipe = copy.copy(pipe)
        pipe.experts = renderer.experts
    pipe = _with_expert_boundary(pipe, expert_boundary)
    latents = pipe.sample(task_inputs, sources.sources, settings)
    raw = pipe.components.vae.denormalize(latents)  # ComfyUI's Wan LATENT convention (docs/architecture.md §6)
    return {"samples": raw.to(comfy_bridge.intermediate_device())}


def _checked_boundary(expert_boundary: float) -> Optional[float]:
    """The widget's expert boundary, or None for the model's own (-1)."""
    if expert_boundary is not None and not math.isfinite(expert_boundary):  # NaN passes ComfyUI's min/max check
        raise BerniniError(f"Sample Bernini Video: expert_boundary is {expert_boundary}; give a number in [0, 1] "
                           "(0.875 in the release) or -1 for the model's own.")
    if expert_boundary is None or expert_boundary < 0:
        return None
    if expert_boundary > 1:
        raise BerniniError(f"Sample Bernini Video: expert_boundary {expert_boundary} must be in [0, 1] (a fraction of "
                           "the 1000 timesteps; 0.875 in the release) or -1 for the model's own.")
    return float(expert_boundary)


def _with_expert_boundary(pipe, expert_boundary: float):
    """A shallow copy of the pipeline switching experts at `expert_boundary` (-1: the model's own)."""
    expert_boundary = _checked_boundary(expert_boundary)
    if expert_boundary is None:
        return pipe
    if pipe.experts.low is None:
        log.warning("Sample Bernini Video: expert_boundary ignored; this renderer has a single expert.")
        return pipe
    switched = copy.copy(pipe)
    switched.experts = dataclasses.replace(pipe.experts, boundary=float(expert_boundary))
    return switched


# ---------------------------------------------------------------------------- decoding
def decode(vae: VAEModel, latent: dict, tiled: bool = False, tile_size: int = 256, tile_overlap: int = 64):
    """LATENT (raw Wan 2.1 latents, ours or a native Wan node's) → IMAGE [F,H,W,3] float32 0..1 on the CPU.
    A batch of B latents decodes to B·F frames, one video after the other."""
    from .vae_tiling import TilingConfig

    if not isinstance(latent, dict) or "samples" not in latent:
        got = type(latent).__name__ if not isinstance(latent, dict) else f"a dict with keys {sorted(latent)}"
        raise BerniniError(f"Decode Bernini VAE: samples must be a LATENT, i.e. {{'samples': tensor [batch, 16, T, "
                           f"H/8, W/8]}}; got {got}. Connect a LATENT output (Sample Bernini Video, a Wan node).")
    samples = latent["samples"]
    z_dim = vae.pipeline.components.vae.config.z_dim
    if not isinstance(samples, torch.Tensor) or samples.dim() != 5 or samples.shape[1] != z_dim:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise BerniniError(f"Decode Bernini VAE: samples must be a Wan 2.1 video LATENT [batch, {z_dim}, T, H/8, W/8]; "
                           f"got {shape} (48-channel Wan 2.2 5B latents need the Wan 2.2 VAE).")
    tiling = None
    if tiled:
        if tile_overlap >= tile_size:
            raise BerniniError(f"Decode Bernini VAE: tile_overlap {tile_overlap} must be smaller than tile_size "
                               f"{tile_size} (e.g. 256 and 64).")
        tiling = TilingConfig(tile_px=int(tile_size), overlap_px=int(tile_overlap))
    return vae.pipeline.decode_raw(samples, tiling=tiling)  # the pipelines' own decode: same latents, same frames
