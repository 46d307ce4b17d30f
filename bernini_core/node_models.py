"""The models the ComfyUI nodes pass around, and their loading: typed handles for every socket type, the
COMBO choices of the loader nodes, and the loaders behind Load Bernini Planner / Load Bernini Renderer.

No ComfyUI import here: model folders, the runtime and ops come from `comfy_bridge` (plain torch outside
ComfyUI). The renderer, text encoder and VAE handles of one load share one pipeline object, so nothing is held
twice; full Bernini's renderer is built without its planner, which Load Bernini Planner loads on its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from . import comfy_bridge
from .errors import BerniniError
from .runtime import resolve_dtype

log = logging.getLogger("bernini.nodes")

FULL_FAMILY, RENDERER_FAMILY = "bernini", "bernini_renderer"
OFFICIAL_FULL = ("Bernini-Diffusers", "Bernini-Diffusers-v2")
OFFICIAL_R = ("Bernini-R-Diffusers", "Bernini-R-1.3B-Diffusers")
OFFICIAL_RENDERERS = OFFICIAL_FULL + OFFICIAL_R
SINGLE_FILES, NONE = "single files", "none"
DOWNLOAD_CHOICES = ("never", "if missing")
PLANNER_DTYPES = ("bf16", "fp16", "fp32")
RENDERER_DTYPES = PLANNER_DTYPES + ("fp8_e4m3fn",)
ATTENTION_CHOICES = ("auto", "sdpa", "flash", "sage")


# ---------------------------------------------------------------------------- handles
@dataclass(eq=False)
class _ModelRef:
    """One loaded model as a node output; the renderer, text encoder and VAE share the same pipeline."""

    pipeline: Any  # pipeline.RendererPipeline | pipeline_full.FullPipeline (built without its planner)
    family: str  # "bernini_renderer" | "bernini"
    version: str  # "R" | "v1" | "v2"
    name: str = ""

    @property
    def label(self) -> str:
        return model_label(self.family, self.version)


@dataclass(eq=False)
class RendererModel(_ModelRef):
    """BERNINI_RENDERER: the DiT experts (+ config) of one loaded model. After Apply Bernini LoRA, `experts` holds
    the experts' handles over patched clones of ComfyUI's patchers (the pipeline's own handles stay unpatched) and
    `loras` the LoRAs applied, in order, as (file name, strength high, strength low)."""

    experts: Any = None  # denoise.Experts, or None: the pipeline's own
    loras: tuple = ()
    pool: Any = None  # parallel.pool.WorkerPool: the experts live on a Ray pool (Bernini Multi-GPU), not here

    @property
    def effective_experts(self):
        return self.experts if self.experts is not None else self.pipeline.experts


class TextEncoderModel(_ModelRef):
    """BERNINI_TEXT_ENCODER: UMT5 of one loaded model."""


class VAEModel(_ModelRef):
    """BERNINI_VAE: the Wan 2.1 VAE of one loaded model (its resize rule depends on the family)."""


@dataclass(eq=False)
class PlannerModel:
    """BERNINI_PLANNER: Qwen2.5-VL + connector + ViT decoder of a full-Bernini release."""

    bundle: Any  # pipeline_full.PlannerBundle
    version: str  # "v1" | "v2"
    dtype: torch.dtype
    name: str = ""


@dataclass(eq=False)
class Conditioning:
    """BERNINI_CONDITIONING: the task, the UMT5 features, the texts actually used and, once planned, the Plan."""

    task: str
    embeds: Any  # stages.PromptEmbeds
    prompt: str  # the raw prompt (the planner reads it, docs/official_behaviour.md §3.4)
    negative_prompt: str  # the negative actually used (the preset's when the widget was empty)
    family: str
    version: str
    pipeline: Any  # the pipeline whose text encoder made the features (the planner stage runs on it)
    plan: Any = None  # pipeline_full.Plan after Plan Bernini Semantics

    @property
    def label(self) -> str:
        return model_label(self.family, self.version)


@dataclass(eq=False)
class SourcesBundle:
    """BERNINI_SOURCES: the family's preprocessed sources and the geometry / fps they were prepared for."""

    task: str
    sources: Any  # stages.Sources (Bernini-R) | pipeline_full.PlannerSources (full Bernini)
    family: str
    version: str
    num_frames: int
    height: int
    width: int
    max_image_size: int
    fps: int
    video_fps: Optional[float] = None

    @property
    def label(self) -> str:
        return model_label(self.family, self.version)


def model_label(family: str, version: str) -> str:
    return "Bernini-R" if family == RENDERER_FAMILY else f"Bernini {version}"


# ---------------------------------------------------------------------------- model lists (COMBO choices)
def _listed(kind: str) -> list[str]:
    comfy_bridge.register_model_folders()
    return list(comfy_bridge.list_models(kind))


def _unique(names) -> list[str]:
    return list(dict.fromkeys(names))


def _is_renderer_only(name: str) -> bool:
    """True for a models/bernini folder whose config.json says Bernini-R (it holds no planner)."""
    from .checkpoints import read_json

    try:
        return read_json(comfy_bridge.model_path("bernini", name) / "config.json").get("model_type") == RENDERER_FAMILY
    except (BerniniError, OSError, AttributeError):
        return False


def planner_choices() -> list[str]:
    """Full-Bernini folders only: Bernini-R folders hold no planner."""
    found = [n for n in _listed("bernini") if n not in OFFICIAL_R and not _is_renderer_only(n)]
    return _unique([*OFFICIAL_FULL, *found])


def renderer_choices() -> list[str]:
    return _unique([SINGLE_FILES, *OFFICIAL_RENDERERS, *_listed("bernini")])


def file_choices(kind: str) -> list[str]:
    """["none"] + the files ComfyUI finds in models/<kind> (diffusion_models, text_encoders, vae)."""
    return _unique([NONE, *_listed(kind)])


# ---------------------------------------------------------------------------- loading
def _bernini_folder(name: str, part: str, download: str, what: str) -> Path:
    """The folder of `name` in models/bernini. An official model goes through download.ensure_official_model,
    which checks that `part` is complete and fetches what is missing only with download "if missing" (otherwise
    its error gives the download command)."""
    if download not in DOWNLOAD_CHOICES:
        raise BerniniError(f"{what}: download must be one of {', '.join(DOWNLOAD_CHOICES)}, got {download!r}.")
    try:
        found = Path(comfy_bridge.model_path("bernini", name))
    except BerniniError:
        if name not in OFFICIAL_RENDERERS:
            raise BerniniError(
                f"{what}: model {name!r} is neither an official Bernini model ({', '.join(OFFICIAL_RENDERERS)}) nor a "
                "folder in models/bernini; pick one from the list or put the folder in models/bernini.") from None
        found = None
    if name not in OFFICIAL_RENDERERS:  # a user's own folder: nothing to check against or download
        return found
    from .download import ensure_official_model

    root = found.parent if found is not None else comfy_bridge.models_root() / "bernini"
    progress = comfy_bridge.download_progress() if download == "if missing" else None  # report(done, total)
    return Path(ensure_official_model(name, root, part=part, allow_download=download == "if missing",
                                      progress=progress))


def load_planner(name: str, weight_dtype: str = "bf16", download: str = "never") -> PlannerModel:
    """The planner half of a Bernini-Diffusers(-v2) folder (loaders_full.load_full with_renderer=False)."""
    from .loaders_full import CLI_OVERRIDES, is_full_bernini_dir, load_full
    from .pipeline_full import PlannerBundle

    if weight_dtype not in PLANNER_DTYPES:
        raise BerniniError(f"Load Bernini Planner: weight_dtype must be one of {', '.join(PLANNER_DTYPES)}, "
                           f"got {weight_dtype!r}.")
    path = _bernini_folder(name, "planner", download, "Load Bernini Planner")
    if not is_full_bernini_dir(path):
        raise BerniniError(f"Load Bernini Planner: model {name!r} has no planner (it is not a Bernini-Diffusers "
                           "folder; Bernini-R renders without one). Choose Bernini-Diffusers or Bernini-Diffusers-v2.")
    dtype = resolve_dtype(weight_dtype)
    components = load_full(path, dtype=dtype, overrides=dict(CLI_OVERRIDES), ops=comfy_bridge.comfy_ops(dtype),
                           with_planner=True, with_renderer=False)
    bundle = PlannerBundle.from_components(components)
    return PlannerModel(bundle=bundle, version=bundle.version, dtype=dtype, name=name)


def load_renderer(name: str, weight_dtype: str = "bf16", attention: str = "auto", download: str = "never",
                  high_noise_model: str = NONE, low_noise_model: str = NONE, text_encoder: str = NONE,
                  vae: str = NONE, parallel=None, compile: bool = False
                  ) -> tuple[RendererModel, TextEncoderModel, VAEModel]:
    """UMT5 + DiT experts + VAE: an official / models/bernini folder (full Bernini without its planner, or
    Bernini-R), or "single files" from models/diffusion_models, text_encoders and vae (Bernini-R).

    `parallel` (parallel.pool.PoolOptions, from the Bernini Multi-GPU node): the experts load on a pool of Ray
    workers instead (parallel/pool); this process keeps UMT5 and the VAE.
    `compile`: torch.compile the experts' DiT blocks (acceleration/compile.py) on their first step."""
    if not isinstance(compile, bool):
        raise BerniniError(f"Load Bernini Renderer: compile must be true or false, got {compile!r}.")
    if parallel is not None:
        from .parallel.pool.nodes import load_pooled_renderer

        return load_pooled_renderer(name, weight_dtype, attention, download, high_noise_model, low_noise_model,
                                    text_encoder, vae, parallel, compile=compile)
    if weight_dtype not in RENDERER_DTYPES:
        raise BerniniError(f"Load Bernini Renderer: weight_dtype must be one of {', '.join(RENDERER_DTYPES)}, "
                           f"got {weight_dtype!r}.")
    if attention not in ATTENTION_CHOICES:
        raise BerniniError(f"Load Bernini Renderer: attention must be one of {', '.join(ATTENTION_CHOICES)}, "
                           f"got {attention!r}.")
    runtime = comfy_bridge.runtime()
    if name == SINGLE_FILES:
        pipe = _load_single_files(weight_dtype, attention, runtime, high_noise_model, low_noise_model, text_encoder,
                                  vae)
    else:
        chosen = [n for n, v in (("high_noise_model", high_noise_model), ("low_noise_model", low_noise_model),
                                 ("text_encoder", text_encoder), ("vae", vae)) if v not in (None, NONE)]
        if chosen:
            log.warning("Load Bernini Renderer: %s ignored; they are used only with model 'single files'.",
                        ", ".join(chosen))
        pipe = _load_folder(name, weight_dtype, attention, download, runtime)
    if compile and pipe.components.dit_high is not None:
        from .acceleration.settings import SpeedSettings

        SpeedSettings(compile=True).apply((pipe.components.dit_high, pipe.components.dit_low), runtime.device,
                                          offload=True)
    version = pipe.version if pipe.family == FULL_FAMILY else "R"
    return tuple(cls(pipe, pipe.family, version, name) for cls in (RendererModel, TextEncoderModel, VAEModel))


def _load_folder(name, weight_dtype, attention, download, runtime, parts=None):
    from .loaders import load_renderer as load_renderer_folder
    from .loaders_full import CLI_OVERRIDES, is_full_bernini_dir, load_full
    from .pipeline import RendererPipeline
    from .pipeline_full import FullPipeline

    if weight_dtype == "fp8_e4m3fn":
        raise BerniniError(f"Load Bernini Renderer: weight_dtype fp8_e4m3fn keeps fp8 single files in fp8, but "
                           f"{name!r} is a folder of bf16 weights; choose bf16 (or fp16 / fp32).")
    path = _bernini_folder(name, "renderer", download, "Load Bernini Renderer")
    dtype = resolve_dtype(weight_dtype)
    ops = comfy_bridge.comfy_ops(dtype)
    # the official CLI's loader settings (loaders_full.CLI_OVERRIDES, docs/official_behaviour.md §5.4)
    if is_full_bernini_dir(path):
        components = load_full(path, dtype=dtype, attention=attention, overrides=dict(CLI_OVERRIDES), ops=ops,
                               with_planner=False, with_renderer=True, parts=parts)
        return FullPipeline(components, runtime, dtype)
    return RendererPipeline(load_renderer_folder(path, dtype=dtype, attention=attention, ops=ops, parts=parts),
                            runtime)


def _load_single_files(weight_dtype, attention, runtime, high, low, text_encoder, vae, with_experts=True):
    """Bernini-R from ComfyUI single files; one diffusion file = a single expert (boundary 0)."""
    from .loaders import RendererComponents, RendererConfig, load_dit_file, load_vae
    from .pipeline import RendererPipeline
    from .text_encoder import UMT5TextEncoder

    needed = {"high_noise_model": (high, "the Bernini-R high-noise (or single-expert) file in models/diffusion_models"),
              "text_encoder": (text_encoder, "umt5_xxl_*.safetensors in models/text_encoders"),
              "vae": (vae, "the Wan 2.1 VAE (wan_2.1_vae.safetensors) in models/vae")}
    for input_name, (value, what) in needed.items():
        if value in (None, "", NONE):
            raise BerniniError(f"Load Bernini Renderer: model 'single files' needs {input_name}: pick {what}.")
    keep_fp8 = weight_dtype == "fp8_e4m3fn"
    dtype = torch.bfloat16 if keep_fp8 else resolve_dtype(weight_dtype)  # fp8 weights compute in bf16
    ops = comfy_bridge.comfy_ops(dtype)

    def expert(file_name):
        return load_dit_file(comfy_bridge.model_path("diffusion_models", file_name), dtype=dtype, keep_fp8=keep_fp8,
                             attention=attention, ops=ops)

    components = RendererComponents(
        config=RendererConfig(),  # the released renderer config.json values (docs/official_behaviour.md §2.3)
        dit_high=expert(high) if with_experts else None,
        dit_low=expert(low) if with_experts and low not in (None, "", NONE) else None,
        text_encoder=UMT5TextEncoder.from_single_file(comfy_bridge.model_path("text_encoders", text_encoder),
                                                      dtype=dtype),
        vae=load_vae(comfy_bridge.model_path("vae", vae), ops=ops),
    )
    return RendererPipeline(components, runtime)
