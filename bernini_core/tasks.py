"""The task table: which sources each official task takes, and the Bernini-R presets.

Sources per task follow the official gradio routing (docs/official_behaviour.md §6.3): i2i edits
one `image`; v2v/mv2v/ads2v edit a `video` (ads2v: source video then reference video);
r2v renders from reference `images` (a single `image` joins them); rv2v needs both.
Presets are the Bernini-R table of docs/official_behaviour.md §5.3 (gradio BASE + RENDERER_TASK_DEFAULTS); the
full-Bernini presets of docs/official_behaviour.md §5.1–§5.2 live beside them once the planner lands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .errors import BerniniError

# Every task the official pipelines expose (docs/official_behaviour.md §1, §6.3), in the order the UI lists them.
TASK_NAMES = ("t2i", "i2i", "t2v", "v2v", "mv2v", "rv2v", "r2v", "ads2v")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    video: str  # "required" | "optional" | "none"
    image: str  # the single edited image (i2i): "required" | "optional" | "none"
    images: str  # reference images: "required" | "optional" | "none"
    single_frame: bool  # t2i / i2i always render one frame

    @property
    def needs_video(self) -> bool:
        return self.video == "required"


TASKS: dict[str, TaskSpec] = {
    "t2i": TaskSpec("t2i", "text to image", "none", "none", "none", True),
    "i2i": TaskSpec("i2i", "image editing", "none", "required", "optional", True),
    "t2v": TaskSpec("t2v", "text to video", "none", "none", "none", False),
    "v2v": TaskSpec("v2v", "video editing", "required", "optional", "optional", False),
    "mv2v": TaskSpec("mv2v", "motion / style video editing", "required", "optional", "optional", False),
    "rv2v": TaskSpec("rv2v", "video editing with reference images", "required", "optional", "required", False),
    "r2v": TaskSpec("r2v", "reference (subject) to video", "none", "optional", "required", False),
    "ads2v": TaskSpec("ads2v", "ads insertion: source video + reference video", "required", "optional", "optional", False),
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise BerniniError(f"task_type {name!r} is not an official Bernini task; choose one of {', '.join(TASK_NAMES)}.")
    return TASKS[name]


@dataclass(frozen=True)
class SourceInputs:
    """How a caller names the source inputs in messages: the Python/CLI keywords, or the ComfyUI node's sockets."""

    prefix: str
    video: str
    give_video: str
    image: str
    give_image: str
    images: str
    give_images: str
    give_ref_video: str = "pass two videos: `video=[source, reference]` (--video SOURCE REFERENCE)"


PYTHON_INPUTS = SourceInputs("", "`video`", "pass `video` (--video)", "`image`", "pass `image` (--image)",
                             "`images`", "pass `images` (--images)")


def check_sources(task: TaskSpec, *, n_videos: int, has_image: bool, n_images: int,
                  inputs: SourceInputs = PYTHON_INPUTS) -> None:
    """Reject source combinations the task cannot use, naming the input and the fix."""
    where = f"{inputs.prefix}task {task.name!r} ({task.description})"
    if task.video == "required" and n_videos == 0:
        raise BerniniError(f"{where} needs a source video: {inputs.give_video}.")
    if task.name == "ads2v" and n_videos > 2:
        raise BerniniError(f"{where} takes two videos, the source and then the reference (the ad to insert), got "
                           f"{n_videos}; drop the others.")
    if task.name == "ads2v" and n_videos < 2:
        raise BerniniError(f"{where} needs the source video and then the reference video (the ad to insert), got "
                           f"{n_videos} video; {inputs.give_ref_video}.")
    if task.video == "none" and n_videos:
        raise BerniniError(f"{where} takes no source video but {inputs.video} was given; use v2v/mv2v/rv2v/ads2v to "
                           "edit a video, or drop it.")
    if task.image == "required" and not has_image:
        raise BerniniError(f"{where} needs the image to edit: {inputs.give_image}.")
    if task.image == "none" and has_image:
        raise BerniniError(f"{where} takes no source image but {inputs.image} was given; use i2i or r2v, or drop it.")
    if task.images == "required" and n_images == 0 and not has_image:
        raise BerniniError(f"{where} needs reference images: {inputs.give_images}.")
    if task.images == "none" and n_images:
        raise BerniniError(f"{where} takes no reference images but {inputs.images} were given; use r2v/rv2v, or drop "
                           "them.")


# What each guidance mode's arms condition on (bernini_core/sampling/guidance.py and guidance_full.py): a mode
# whose arms hold a source would run as plain text-to-video without it, so it is refused instead.
# "video": the first source video; "images": reference images; "source": any video or image.
MODE_NEEDS = {
    "rv2v": "video", "v2v_chain": "video", "v2v": "source", "v2v_apg": "source", "r2v_apg": "images",
    "rv2v_wapg": "video",
}
TEXT_ONLY_MODES = ("t2v", "t2v_apg")


def check_mode_sources(mode: str, *, n_videos: int, n_images: int, task: str, where: str = "guidance_mode") -> None:
    """Refuse a guidance mode whose arms need sources the run does not have (`n_images` counts the edited image
    and the references)."""
    need = MODE_NEEDS.get(mode)
    missing = {"video": n_videos == 0, "images": n_images == 0, "source": n_videos + n_images == 0}.get(need, False)
    if missing:
        what = {"video": "a source video", "images": "reference images", "source": "a source video or image"}[need]
        raise BerniniError(f"{where} {mode!r} guides with {what}, but task {task!r} has none: it would run as plain "
                           "text-to-video. Use the task's preset mode (leave guidance_mode unset / 'auto'), or give "
                           "the sources.")


def check_text(value, name: str, *, required: bool) -> None:
    """A prompt-like input must be a string; the prompt itself must say something."""
    if value is None and not required:
        return
    if not isinstance(value, str):
        raise BerniniError(f"{name} must be a string, got {type(value).__name__} {value!r}.")
    if required and not value.strip():
        raise BerniniError(f"{name} is empty: describe the image/video to generate or the edit to make.")


# Settings one family accepts (one settings dict serves both) but does not use: given explicitly, each gets one
# warning line instead of being dropped without a word.
IGNORED_SETTINGS = {
    "renderer": {
        "planning_step": "Bernini-R has no planner (a full-Bernini setting)",
        "vit_denoising_step": "Bernini-R has no planner (a full-Bernini setting)",
        "vit_txt_cfg": "Bernini-R has no planner (a full-Bernini setting)",
        "vit_img_cfg": "Bernini-R has no planner (a full-Bernini setting)",
        "omega_tgt": "Bernini-R guidance has no planned-target term (a full-Bernini setting)",
    },
    "full": {
        "eta": "full Bernini's APG uses the official fixed settings (eta 1.0, momentum 0, norm threshold 50)",
        "momentum": "full Bernini's APG uses the official fixed settings (eta 1.0, momentum 0, norm threshold 50)",
        "norm_threshold": "full Bernini's APG uses the official fixed settings (eta 1.0, momentum 0, "
                          "norm threshold 50)",
    },
}


# --- Bernini-R presets (docs/official_behaviour.md §5.3; gradio BASE_TASK_DEFAULTS + RENDERER_TASK_DEFAULTS) ---
RENDERER_BASE: dict[str, Any] = {
    "num_frames": 81,
    "height": 480,
    "width": 848,
    "max_image_size": 848,
    "num_inference_steps": 40,
    "flow_shift": 5.0,
    "seed": 42,
    "fps": 16,
    "omega_vid": 1.25,
    "omega_img": 4.5,
    "omega_txt": 4.0,
    "omega_tgt": 0.5,
    "omega_scale": 0.8,
    "eta": 0.5,
    "momentum": 0.0,
    "norm_threshold": (50.0, 50.0, 50.0),
}
RENDERER_TASK_OVERRIDES: dict[str, dict[str, Any]] = {
    "t2i": {"num_frames": 1, "guidance_mode": "t2v_apg"},
    "i2i": {"num_frames": 1, "guidance_mode": "v2v"},
    "t2v": {"guidance_mode": "t2v_apg"},
    "v2v": {"guidance_mode": "v2v_apg"},
    "mv2v": {"guidance_mode": "v2v_apg"},
    "ads2v": {"guidance_mode": "v2v_apg"},
    "r2v": {"guidance_mode": "r2v_apg"},
    "rv2v": {"guidance_mode": "rv2v"},
}
# The official default negative prompt is the Chinese Wan2.2 one for every Bernini-R task.
RENDERER_NEGATIVE_KIND = "default_zh"


# --- Samplers and the "fast" preset (docs/fast_sampling.md; not official) ---
# The renderer's samplers: the official UniPC (default) and Euler fallback, and lightx2v's step-distill sampler
# (bernini_core/sampling/schedulers.py). A setting of None keeps the model's own choice (its use_unipc).
SAMPLER_NAMES = ("unipc", "euler", "distill")
# "none": one DiT pass per step, the arm with every source and the positive context (its output is the velocity).
NO_GUIDANCE = "none"
PRESET_NAMES = ("official", "fast")  # "official" (the default) = the tables below, unchanged
# lightx2v's Wan2.2 A14B 4-step distill configs (configs/distill/wan22/wan_moe_*_distill_*.json): 4 steps at
# timesteps 1000/750/500/250, sample_shift 5.0, no CFG (enable_cfg false), the low-noise expert from step index 2
# (boundary_step_index). Every other setting stays the task's official one.
FAST_OVERRIDES: dict[str, Any] = {
    "guidance_mode": NO_GUIDANCE,
    "num_inference_steps": 4,
    "sampler": "distill",
    "flow_shift": 5.0,
    "boundary_step_index": 2,
}
# Settings guidance "none" does not read: given explicitly, each gets one warning line.
NO_GUIDANCE_IGNORES = ("omega_vid", "omega_img", "omega_txt", "omega_tgt", "omega_scale", "eta", "momentum",
                       "norm_threshold")


def apply_preset(preset: Mapping[str, Any], name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The task preset under the named preset kind: "official" returns it unchanged; "fast" overlays
    FAST_OVERRIDES. A step count given without `boundary_step_index` moves the fast expert switch with it:
    ⌈steps · 2/4⌉ (lightx2v's 2 of 4 steps on the high-noise expert, the same share for other counts)."""
    if name not in PRESET_NAMES:
        raise BerniniError(f"preset {name!r} is unknown; choose one of {', '.join(PRESET_NAMES)} (official = the "
                           "release's settings, fast = 4 distill steps without guidance, for distill LoRAs).")
    settings = dict(preset)
    if name == "fast":
        settings.update(FAST_OVERRIDES)
        steps = given.get("num_inference_steps")
        if steps is not None and given.get("boundary_step_index") is None and _real(steps) and steps >= 1:
            high, of = FAST_OVERRIDES["boundary_step_index"], FAST_OVERRIDES["num_inference_steps"]
            settings["boundary_step_index"] = -(-int(steps) * high // of)
    return settings


def ignored_by_mode(settings: Mapping[str, Any], given) -> list[str]:
    """The explicitly given settings (names, or a mapping whose None values count as not given) the resolved
    guidance mode does not read: guidance "none" reads no weights."""
    if settings.get("guidance_mode") != NO_GUIDANCE:
        return []
    named = {k for k, v in given.items() if v is not None} if isinstance(given, Mapping) else set(given)
    return [name for name in NO_GUIDANCE_IGNORES if name in named]


def check_choices(settings: Mapping[str, Any]) -> None:
    """The named-choice settings: preset, sampler (None = the model's own)."""
    sampler = settings.get("sampler")
    if sampler is not None and sampler not in SAMPLER_NAMES:
        raise BerniniError(f"sampler {sampler!r} is unknown; choose one of {', '.join(SAMPLER_NAMES)} (unipc = the "
                           "official default, distill = lightx2v's step-distill sampler).")


def renderer_preset(task: str) -> dict[str, Any]:
    """The full Bernini-R default settings for a task (a fresh dict the caller may edit)."""
    get_task(task)
    preset = dict(RENDERER_BASE)
    preset.update(RENDERER_TASK_OVERRIDES[task])
    return preset


# The real-valued settings and the range each must lie in. NaN / inf / 1e30 there give a black or NaN video after
# the whole run, so they are refused up front. The bounds are generous sanity limits, far outside every official
# preset and the gradio sliders (omegas 0-10, omega_scale 0-2, flow_shift 0-12, fps 1-30).
FLOAT_RANGES: dict[str, tuple[float, float, str]] = {
    **{name: (-100.0, 100.0, "a guidance weight (the presets use 0.5-5)")
       for name in ("omega_vid", "omega_img", "omega_txt", "omega_tgt")},
    "omega_scale": (0.0, 100.0, "the low-noise expert's scale of the guidance weights (the presets use 0.75-1)"),
    "eta": (-100.0, 100.0, "the APG parallel-component weight (the official 0.5 / 1.0)"),
    "momentum": (-10.0, 10.0, "the APG momentum (the official 0)"),
    "norm_threshold": (0.0, 1e6, "the APG norm threshold (the official 50)"),
    "flow_shift": (1e-3, 100.0, "the scheduler's flow shift (the official 5.0)"),
    "vit_txt_cfg": (-100.0, 100.0, "the planner's text CFG scale (the official 1.2)"),
    "vit_img_cfg": (-100.0, 100.0, "the planner's image CFG scale (the official 1.0)"),
    "fps": (1e-3, 1000.0, "the output frame rate (the official 16)"),
    "video_fps": (1e-3, 1000.0, "the frame rate of in-memory source frames"),
}
# Step counts above this are refused unless forced: 200 is the Sample node's maximum (the official presets use
# 40-50 steps, the gradio sliders stop at 50); 100000 steps would run for weeks with no sign of a mistake.
MAX_STEPS = 200
TORCH_SEEDS = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
# The whole-number settings: (lowest, highest or None, what it is). height/width 0 = the source's size.
INT_RANGES: dict[str, tuple[int, Optional[int], str]] = {
    "num_frames": (1, None, "the number of output frames (the form 4n+1, e.g. 81)"),
    "num_inference_steps": (1, MAX_STEPS, "the renderer's denoising steps (the official 40-50)"),
    "planning_step": (1, MAX_STEPS, "the planner's MaskGIT steps (the official 25 / 50)"),
    "vit_denoising_step": (1, MAX_STEPS, "the planner's ViT denoising steps (the official 5 / 1)"),
    "max_image_size": (16, None, "the longest source edge in pixels (the official 848)"),
    "seed": (TORCH_SEEDS[0], TORCH_SEEDS[1], "the random seed"),
    "height": (0, None, "the output height in pixels (a multiple of 16; 0 = the source's where the task allows it)"),
    "width": (0, None, "the output width in pixels (a multiple of 16; 0 = the source's where the task allows it)"),
    "vae_tile_px": (0, None, "the VAE tile size in pixels (0 = untiled)"),
    "vae_tile_overlap_px": (0, None, "the VAE tile overlap in pixels"),
    "boundary_step_index": (0, MAX_STEPS, "the number of leading steps on the high-noise expert (fast: 2 of 4)"),
}
FORCEABLE = ("num_inference_steps", "planning_step", "vit_denoising_step")  # maxima a user may exceed on purpose


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or (
        hasattr(value, "item") and getattr(value, "ndim", 1) == 0 and not isinstance(value, (str, bytes)))


def whole_number(name: str, value, what: str) -> int:
    """`value` as an int when it is a whole number (an int, or a float like 40.0); anything else (2.7, "9", True,
    NaN) is refused, never truncated."""
    if isinstance(value, bool) or not _real(value):
        raise BerniniError(f"{name} must be a whole number, got {value!r} ({type(value).__name__}); it is {what}.")
    number = value.item() if hasattr(value, "item") else value
    if isinstance(number, float) and (not math.isfinite(number) or not number.is_integer()):
        raise BerniniError(f"{name} is {value!r}; it must be a whole number (it is {what}), not rounded for you.")
    return int(number)


def check_numbers(settings: Mapping[str, Any], *, force: bool = False) -> dict[str, int]:
    """Every real-valued setting finite and in its range; whole-number settings whole and in theirs (step counts
    above MAX_STEPS only with `force`). One error naming the setting, its value and the range, before any work.
    Returns the whole-number settings as ints (40.0 → 40) for the caller to store."""
    for name, (low, high, what) in FLOAT_RANGES.items():
        value = settings.get(name)
        if value is None:
            continue
        values = list(value) if isinstance(value, (list, tuple)) and name == "norm_threshold" else [value]
        for item in values:
            if not _real(item):
                raise BerniniError(f"{name} must be a number, got {item!r}; it is {what}.")
            number = float(item)
            if not math.isfinite(number) or not low <= number <= high:
                raise BerniniError(f"{name} is {item!r}; it must be a finite number in [{low:g}, {high:g}]: "
                                   f"{what}.")
    whole = {}
    for name, (low, high, what) in INT_RANGES.items():
        value = settings.get(name)
        if value is None:
            continue
        number = whole_number(name, value, what)
        if name == "seed" and not low <= number <= high:
            raise BerniniError(f"seed {value!r} is out of range; use a seed in {low}..{high}.")
        if number < low:
            raise BerniniError(f"{name} is {value!r}; it must be at least {low}: {what}.")
        if high is not None and number > high:
            if not force:
                raise BerniniError(f"{name} is {value!r}, above the sane maximum of {high} ({what}); lower it, or "
                                   "pass force=True (--force) if you really mean it.")
        whole[name] = number
    return whole


def resolve_settings(preset: Mapping[str, Any], overrides: Mapping[str, Any], *, force: bool = False) -> dict[str, Any]:
    """Preset values overridden by every explicitly given (non-None) keyword, with every number checked
    (``check_numbers``; `force` lifts the step-count maxima) and whole numbers stored as ints. The keyword
    `preset` ("official" | "fast", default official) picks the preset kind first (``apply_preset``)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    settings = apply_preset(preset, given.get("preset", "official"), given)
    settings.update(given)
    check_choices(settings)
    settings.update(check_numbers(settings, force=force))
    return settings


# --- Full Bernini presets: v1 from the official scripts/bernini/run_*.sh (docs/official_behaviour.md §5.1), completed
# from gradio's BERNINI_V1_TASK_DEFAULTS where the scripts are silent; v2 from gradio's BERNINI_V2_TASK_DEFAULTS
# (docs/official_behaviour.md §5.2) ---
# Base: gradio BASE_TASK_DEFAULTS (the CLI defaults of docs/official_behaviour.md §5.4 for planner settings).
BERNINI_BASE: dict[str, Any] = {
    **RENDERER_BASE,
    "planning_step": 25,
    "vit_denoising_step": 5,
    "vit_txt_cfg": 1.2,
    "vit_img_cfg": 1.0,
}
_WAPG = "vae_txt_vit_wapg"
_V2V_SYSTEM = "You are a helpful assistant specialized in video editing."  # scripts/bernini/run_v2v.sh --system_prompt


def _full(mode, frames, height, width, max_img, steps, txt, tgt, img, vid, scale, **extra) -> dict[str, Any]:
    return {"guidance_mode": mode, "num_frames": frames, "height": height, "width": width, "max_image_size": max_img,
            "num_inference_steps": steps, "omega_txt": txt, "omega_tgt": tgt, "omega_img": img, "omega_vid": vid,
            "omega_scale": scale, **extra}


# height = width = 0: the output follows the source (target VAE shape × 8), as the scripts pass 0/0
# (docs/official_behaviour.md §4.8).
BERNINI_V1_OVERRIDES: dict[str, dict[str, Any]] = {
    "t2i": _full(_WAPG, 1, 512, 512, 842, 50, 4.0, 0.5, 1.0, 1.0, 1.0),
    "i2i": _full(_WAPG, 1, 512, 512, 842, 40, 4.0, 0.5, 1.25, 1.25, 0.75),
    "t2v": _full(_WAPG, 81, 480, 848, 842, 50, 4.0, 0.5, 1.0, 1.0, 1.0),
    # run_v2v.sh (which also runs the mv2v case) passes the English negative prompt and the v2v system prompt
    # explicitly, so mv2v gets v2v's system prompt for UMT5, not its own.
    "v2v": _full(_WAPG, 81, 0, 0, 848, 40, 4.0, 0.5, 1.25, 1.25, 0.75, negative="english", system_prompt=_V2V_SYSTEM),
    "mv2v": _full(_WAPG, 81, 0, 0, 848, 40, 4.0, 0.5, 1.25, 1.25, 0.75, negative="english", system_prompt=_V2V_SYSTEM),
    "rv2v": _full("rv2v_wapg", 81, 0, 0, 848, 40, 4.0, 1.5, 3.0, 0.75, 0.75),
    "r2v": _full(_WAPG, 81, 480, 848, 842, 40, 4.0, 1.5, 4.5, 1.25, 0.8),
    # No v1 script; gradio's v1 table sets no size, so the base 480x848 applies.
    "ads2v": _full(_WAPG, 81, 480, 848, 848, 40, 4.0, 0.5, 1.25, 1.25, 0.75),
}
_V2_PLAN = {"planning_step": 50, "vit_denoising_step": 1}
BERNINI_V2_OVERRIDES: dict[str, dict[str, Any]] = {
    "t2i": _full(_WAPG, 1, 512, 512, 842, 50, 4.0, 0.5, 1.0, 1.0, 1.0, vit_denoising_step=5),
    "i2i": _full(_WAPG, 1, 512, 512, 842, 40, 4.0, 0.5, 1.25, 1.25, 0.75, vit_denoising_step=5),
    "t2v": _full(_WAPG, 81, 480, 848, 842, 50, 5.0, 1.2, 1.0, 1.0, 1.0, **_V2_PLAN),
    "v2v": _full(_WAPG, 81, 0, 0, 848, 40, 4.0, 1.2, 1.25, 1.25, 0.75, negative="english", **_V2_PLAN),
    "mv2v": _full(_WAPG, 81, 0, 0, 848, 40, 4.0, 1.2, 1.25, 1.25, 0.75, negative="english", **_V2_PLAN),
    # gradio's v2 rv2v values (docs/official_behaviour.md §5.2 notes the scripts' 4.0/0.5/4.5 conflict; gradio is the UI
    # default).
    "rv2v": _full("rv2v_wapg", 81, 0, 0, 848, 40, 5.5, 1.5, 4.0, 1.75, 0.75, **_V2_PLAN),
    "r2v": _full(_WAPG, 81, 480, 848, 842, 40, 4.5, 1.5, 3.0, 1.0, 0.75, negative="english", **_V2_PLAN),
    "ads2v": _full(_WAPG, 81, 0, 0, 848, 40, 4.0, 1.2, 1.25, 1.25, 0.75, **_V2_PLAN),
}


def bernini_preset(task: str, version: str) -> dict[str, Any]:
    """Full-Bernini defaults for a task and release ("v1" | "v2"); `negative` names the negative prompt kind."""
    get_task(task)
    table = {"v1": BERNINI_V1_OVERRIDES, "v2": BERNINI_V2_OVERRIDES}.get(version)
    if table is None:
        raise BerniniError(f"Bernini version {version!r} is unknown; use 'v1' or 'v2'.")
    preset = dict(BERNINI_BASE, negative="default_zh")
    preset.update(table[task])
    return preset
