"""Full Bernini (v1 and v2): the Qwen2.5-VL planner plans the target in ViT space, the dual-expert renderer
draws it (docs/official_behaviour.md §3, §4.7 full-Bernini modes, §5.1–§5.2, §7).

`__call__` follows the official `BerniniPipeline.__call__` step by step, including its random-number
protocol (docs/official_behaviour.md §7.1): seed Python, numpy and torch generators (our own, per call: the caller's
global ones are never touched); preprocess the sources (no draws);
encode the three planner branches cond, imgcond, uncond with their unused draws; MaskGIT planning; UMT5; renderer noise
from a separate CPU generator. The stage methods split the same work for the ComfyUI nodes.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from . import media
from .denoise import Experts, check_geometry, check_scheduler, denoise, force_4n_plus_1
from .errors import BerniniError
from .pipeline import (CALL_KEYWORDS, BerniniPipeline, as_parallel_state, loaded_parts, serialised, source_count,
                       vae_tiling, video_rate)
from .planner import vision
from .planner.maskgit import PlannerContexts, plan
from .parallel.state import ParallelState
from .planner.rng import MAX_PLANNER_SEED, PlannerRng
from .planner.template import PlannerTemplate, VisualItem
from .progress import Progress, StageSteps
from .renderer.rope import source_ids_for
from .runtime import Runtime, resolve_dtype
from .sampling.guidance import Omegas
from .sampling.guidance_full import FullGuidance
from .stages import BerniniOutput, PromptEmbeds
from .tasks import (bernini_preset, check_mode_sources, check_sources, check_text, get_task,
                    resolve_settings)
from .text_encoder import negative_prompt, pad_context, prompt_clean, t5_negative_text, t5_positive_text

log = logging.getLogger("bernini.pipeline_full")

# full Bernini resizes sources and the target placeholder to a ≥ 240 px short edge (docs/official_behaviour.md §7.4)
FULL_MIN_SHORT_EDGE = 240
CONTEXT_NAMES = ("wtxt_wvit", "wtxt_wovit", "wotxt_wvit", "wotxt_wovit")


@dataclass
class PlannerSources:
    """Sources as both halves of full Bernini see them (conversation order: videos, then images)."""

    task: str
    videos: list = field(default_factory=list)  # normalised VAE latents [1,16,T,h,w]
    images: list = field(default_factory=list)  # normalised VAE latents [1,16,1,h,w]
    video_items: list = field(default_factory=list)  # VisualItem per video (ViT grid)
    image_items: list = field(default_factory=list)
    video_vit_frames: list = field(default_factory=list)  # uint8 [F,H,W,3] per video, sampled at the ViT rate
    image_vit_inputs: list = field(default_factory=list)  # the images as the ViT side reads them
    target: Optional[VisualItem] = None  # the target placeholder's ViT grid
    target_latent_shape: tuple = ()  # (T, h, w) of the target placeholder's VAE latent
    model_family: str = "bernini"

    @property
    def visual_items(self) -> list:
        return self.video_items + self.image_items


@dataclass
class PlannerBundle:
    """What planning needs: the planner model, its template and ViT preprocessor, and its release's config."""

    model: Any  # planner.model.PlannerModel
    template: PlannerTemplate
    vit_processor: Any
    config: Any  # loaders_full.BerniniConfig

    @classmethod
    def from_components(cls, components) -> "PlannerBundle":
        # transformers' processor when torchvision is installed (what the official runs), else our torch port
        processor = (vision.load_vit_processor(components.paths.processor) if components.paths
                     else components.processor)
        return cls(components.planner, PlannerTemplate(components.tokenizer), processor, components.config)

    @property
    def version(self) -> str:
        return self.config.version


@dataclass
class Plan:
    """The planner's output: the four renderer contexts of docs/official_behaviour.md §3.7 joined to the UMT5
    features (≥ 512 rows)."""

    task: str
    contexts: dict  # name -> [1, L, D]
    model_family: str = "bernini"
    version: str = "v1"


class FullPipeline(BerniniPipeline):
    """Bernini-Diffusers / Bernini-Diffusers-v2: planner + UMT5 + two experts + Wan 2.1 VAE."""

    family = "bernini"
    required_parts = ("text_encoder", "vae", "planner", "experts")

    def __init__(self, components, runtime: Runtime, dtype: torch.dtype, planner: Optional[PlannerBundle] = None):
        self.components = components
        self.config = components.config
        self.runtime = runtime
        self._lock = threading.RLock()  # see pipeline.serialised
        self.dtype = dtype
        if planner is None and components.planner is not None:
            planner = PlannerBundle.from_components(components)
        self.planner = planner
        # parts not loaded (load_full `parts`): their components and handles are None
        self.parts = loaded_parts(components) | ({"planner"} if planner is not None else set())
        self.text_encoder_handle = (runtime.handle("umt5", components.text_encoder.module)
                                    if components.text_encoder is not None else None)
        self.vae_handle = runtime.handle("vae", components.vae) if components.vae is not None else None
        self.experts = None
        if components.dit_high is not None:
            self.experts = Experts(
                high=runtime.handle("dit_high", components.dit_high),
                low=runtime.handle("dit_low", components.dit_low),
                boundary=self.config.switch_dit_boundary,
            )

    @classmethod
    def from_pretrained(cls, path, *, device="auto", dtype="bf16", attention: str = "auto", offload: bool = True,
                        high_noise_ckpt=None, low_noise_ckpt=None, progress: Optional[Progress] = None,
                        parts=None, parallel: Optional[ParallelState] = None, fsdp: bool = False,
                        loras=None, speed=None, **config_overrides) -> "FullPipeline":
        """``progress(stage, step, total)``: stage "load", one step per component (bernini_core/progress.py).

        ``parts``: None (every part) or some of "experts", "text_encoder", "vae", "planner" (loaders_full.load_full);
        a stage that needs a part not loaded raises a BerniniError saying so. ``sample`` needs only the experts.
        ``parallel``: as in ``RendererPipeline.from_pretrained`` (the planner, too, runs on the group leader only).
        ``loras``: as in ``RendererPipeline.from_pretrained`` (merged into the two experts right after the load).
        ``speed``: as in ``RendererPipeline.from_pretrained``."""
        from .loaders_full import CLI_OVERRIDES, load_full
        from .lora import apply_loras_, check_loras

        lora_specs = check_loras(loras, parts)

        parallel = None if parallel is None else as_parallel_state(parallel)
        if speed is not None:
            speed.check(multi_process=parallel is not None and parallel.is_parallel, fsdp=fsdp)
        if parallel is not None and parts is None and not parallel.is_replica_leader:
            parts = ("experts",)

        if high_noise_ckpt or low_noise_ckpt:
            raise BerniniError("full Bernini loads from its self-contained Bernini-Diffusers folder; drop "
                               "--high_noise_ckpt/--low_noise_ckpt (they belong to the Bernini-R split release).")
        overrides = dict(CLI_OVERRIDES)  # what the official CLI passes to BerniniPipeline.from_pretrained
        overrides.update({k: v for k, v in config_overrides.items() if v is not None})
        dtype = resolve_dtype(dtype)
        runtime = Runtime(device, offload=offload)  # a device this machine lacks is refused before the load
        components = load_full(path, dtype=dtype, attention=attention, overrides=overrides, progress=progress,
                               parts=parts)
        if lora_specs and components.dit_high is not None:  # before any sharding: merged into whole weights
            apply_loras_(components, lora_specs, compute_device=runtime.device)
        pipe = cls(components, runtime, dtype)
        if parallel is not None:
            pipe.use_parallel(parallel, fsdp=fsdp)
        elif fsdp:
            raise BerniniError("fsdp=True shards the experts over a multi-process run: pass parallel= too.")
        if speed is not None and components.dit_high is not None:
            speed.apply((components.dit_high, components.dit_low), runtime.device, offload=runtime.offload)
        return pipe

    @property
    def version(self) -> str:
        return self.config.version

    def default_settings(self, task: str) -> dict[str, Any]:
        return bernini_preset(task, self.version)

    def resolve(self, task: str, overrides: dict[str, Any], *, force: bool = False) -> dict[str, Any]:
        unknown = sorted(set(overrides) - CALL_KEYWORDS)
        if unknown:
            raise BerniniError(f"unknown keyword(s) {unknown}; valid keywords: {sorted(CALL_KEYWORDS)}.")
        settings = resolve_settings(self.default_settings(task), overrides, force=force)
        if settings.get("neg_prompt") is None:
            settings["neg_prompt"] = negative_prompt(settings["negative"])
        return settings

    # ------------------------------------------------------------------ stage 1: text
    @serialised
    def encode_prompt(self, task: str, prompt: str, neg_prompt: Optional[str] = None,
                      system_prompt: Optional[str] = None) -> PromptEmbeds:
        """UMT5 features of the full-Bernini texts (cleaned twice, the negative cleaned too;
        docs/official_behaviour.md §3.7)."""
        self.require_parts("prompt encoding (encode_prompt)", "text_encoder")
        get_task(task)
        check_text(prompt, "prompt", required=True)
        check_text(neg_prompt, "neg_prompt", required=False)
        check_text(system_prompt, "system_prompt", required=False)
        neg = neg_prompt if neg_prompt is not None else negative_prompt()
        positive_text = t5_positive_text(task, prompt, system_prompt, full_bernini=True)
        negative_text = t5_negative_text(neg, full_bernini=True)
        with self.runtime.use(self.text_encoder_handle):
            positive, negative = self.components.text_encoder.encode([positive_text, negative_text])
        return PromptEmbeds(task=task, positive=positive.cpu(), negative=negative.cpu(), positive_text=positive_text,
                            negative_text=negative_text, model_family=self.family)

    # ------------------------------------------------------------------ stage 2: sources
    @serialised
    def prepare_sources(self, task: str, *, video=None, image=None, images=None, fps: int = 16,
                        num_frames: int = 81, height: int = 480, width: int = 848, max_image_size: int = 848,
                        video_fps=None, tiling=None, on_source=None) -> PlannerSources:
        """VAE latents and ViT features of every source, and the target placeholder
        (docs/official_behaviour.md §3.2, §4.8, §7.4). ``on_source()`` is called after each source (progress)."""
        self.require_parts("source encoding (prepare_sources)", "vae")
        spec = get_task(task)
        videos = [] if video is None else (list(video) if isinstance(video, (list, tuple)) else [video])
        refs = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        if image is not None and task != "i2i":
            # gradio routing: a single image joins the references (docs/official_behaviour.md §6.3)
            refs, image = [image] + refs, None
        check_sources(spec, n_videos=len(videos), has_image=image is not None, n_images=len(refs))
        if image is not None and refs:  # the official would build mismatched planner and renderer inputs
            raise BerniniError("full Bernini i2i edits one image: pass `image` without reference `images`.")
        image_list = [image] if image is not None else refs
        num_frames = 1 if spec.single_frame else int(num_frames)
        out = PlannerSources(task=task)
        device, vae = self.vae_handle.load_device, self.components.vae
        with self.runtime.use(self.vae_handle), torch.inference_mode():
            for index, item in enumerate(videos):
                rate = video_rate(video_fps, index)
                pixels = media.load_video(item, fps=fps, num_frames=num_frames, max_image_size=max_image_size,
                                          min_short_edge=FULL_MIN_SHORT_EDGE, video_fps=rate)
                out.videos.append(vae.encode(pixels.unsqueeze(0).to(device), tiling=tiling).float().cpu())
                vit_frames = _vit_frames(item, rate if rate is not None else fps, fps, num_frames)
                out.video_vit_frames.append(vit_frames)
                out.video_items.append(VisualItem("video", vision.video_grid(*vit_frames.shape[:3])))
                if on_source is not None:
                    on_source()
            for item in image_list:
                pixels = media.load_image(item, max_image_size=max_image_size, min_short_edge=FULL_MIN_SHORT_EDGE)
                out.images.append(vae.encode(pixels.unsqueeze(0).to(device), tiling=tiling).float().cpu())
                vit_input = _image_array(item)
                out.image_vit_inputs.append(vit_input)
                height_px, width_px = _image_size(vit_input)
                out.image_items.append(VisualItem("image", vision.image_grid(height_px, width_px)))
                if on_source is not None:
                    on_source()
        out.target, out.target_latent_shape = self._target(task, out, num_frames, height, width, max_image_size, fps)
        return out

    def _source_features(self, planner: PlannerBundle, sources: PlannerSources, device) -> list:
        """ViT features of the sources in conversation order (videos, then images), merger output
        (docs/official_behaviour.md §3.1)."""
        features = []
        inputs = [(vision.preprocess_video_for_vit, frames) for frames in sources.video_vit_frames]
        inputs += [(vision.preprocess_image_for_vit, image) for image in sources.image_vit_inputs]
        with torch.inference_mode():
            for (preprocess, data), item in zip(inputs, sources.visual_items):
                pixel_values, grid = preprocess(planner.vit_processor, data)
                if tuple(grid) != tuple(item.grid_thw):
                    raise BerniniError(f"internal: ViT grid {grid} differs from the planned {item.grid_thw}.")
                grid_t = torch.tensor([grid], device=device)
                features.append(planner.model.vision_features(pixel_values.to(device, self.dtype), grid_t)[0].cpu())
        return features

    def _target(self, task, sources: PlannerSources, num_frames, height, width, max_image_size, fps):
        """The target placeholder (docs/official_behaviour.md §3.2): its ViT grid and its VAE latent shape (which
        fixes the target-token count, the unused RNG draws and, with height/width 0, the output size)."""
        if sources.videos and num_frames > 1:
            first = sources.video_items[0]
            return vision.target_item(task, num_frames, height, width, first, fps=fps), tuple(sources.videos[0].shape[2:])
        if height <= 0 or width <= 0:
            raise BerniniError(f"task {task!r}: height/width must be positive when no source video fixes the size "
                               f"(got {height}x{width}).")
        h, w = media.resized_size(height, width, max_long_edge=max_image_size, min_short_edge=FULL_MIN_SHORT_EDGE)
        frames = 1 if num_frames == 1 else media.smart_video_nframes(num_frames, fps, fps, frame_factor=4,
                                                                      max_frames=num_frames, add_one=True)
        return vision.target_item(task, num_frames, height, width, fps=fps), ((frames - 1) // 4 + 1, h // 8, w // 8)

    # ------------------------------------------------------------------ stage 3: planning
    @serialised
    def plan_semantics(self, sources: PlannerSources, embeds: PromptEmbeds, *, prompt: str, neg_prompt: str,
                       seed: int, planning_step: int, vit_denoising_step: int, vit_txt_cfg: float,
                       vit_img_cfg: Optional[float], planner: Optional[PlannerBundle] = None, on_step=None) -> Plan:
        """Seed, encode the three branches (with their unused draws), run MaskGIT planning, join UMT5
        (docs/official_behaviour.md §3.4–§3.7)."""
        from .loaders_full import check_target_tokens

        planner = planner or self.planner
        if planner is None:
            self.require_parts("planning (plan_semantics)", "planner",
                               hint="or pass planner= (in ComfyUI: load it with Load Bernini Planner and connect it)")
        if planner.version != self.version:
            raise BerniniError(f"the planner is Bernini {planner.version} but the renderer is Bernini {self.version}; "
                               "use the planner and renderer of the same release.")
        if embeds.model_family != self.family or sources.model_family != self.family:
            raise BerniniError("the prompt embeddings and sources must come from this full-Bernini renderer's text "
                               "encoder and VAE (a Bernini-R renderer prepares them differently).")
        check_target_tokens(sources.target.n_tokens, planner.config)
        rng = PlannerRng.from_seed(seed)  # the official global seeding, on generators of this call
        t, h, w = sources.target_latent_shape
        n_vae_tokens = t * (h // 2) * (w // 2)
        raw_prompt = prompt_clean(prompt)
        handle = self.runtime.handle("planner", planner.model)
        with self.runtime.use(handle):
            features = self._source_features(planner, sources, handle.load_device)
            branches = {}
            for name in ("cond", "imgcond", "uncond"):  # the official encoding order (docs/official_behaviour.md §7.1)
                text = neg_prompt if name == "uncond" else raw_prompt
                branches[name] = planner.template.encode_branch(
                    name, task=sources.task, text=text, visual_inputs=sources.visual_items, target=sources.target,
                    visual_features=features if name == "cond" else ())
                planner.template.random_draws(sources.target.n_tokens, n_vae_tokens, rng)
            ctx: PlannerContexts = plan(
                planner.model, branches, planning_step=planning_step,
                vit_denoising_step=vit_denoising_step, vit_txt_cfg=vit_txt_cfg, vit_img_cfg=vit_img_cfg,
                dtype=self.dtype, device=handle.load_device, rng=rng, on_step=self._planning_progress(on_step))
        pos, neg = embeds.positive.to(self.dtype), embeds.negative.to(self.dtype)
        contexts = {}
        # trimmed T5 first, then the planner tokens, zero-padded to ≥ 512 rows (docs/official_behaviour.md §3.7)
        for name in CONTEXT_NAMES:
            t5 = pos if name.startswith("wtxt") else neg
            planner_rows = getattr(ctx, name)[0].to("cpu", self.dtype)
            contexts[name] = pad_context([torch.cat([t5, planner_rows], dim=0)])
        return Plan(task=sources.task, contexts=contexts, version=self.version)

    def _planning_progress(self, on_step):
        def step_done(step: int, total: int) -> None:  # maskgit.plan reports 1-based steps
            self.runtime.check_interrupt()
            self.runtime.progress("plan", step, total)
            if on_step is not None:
                on_step(step, total)

        return step_done

    # ------------------------------------------------------------------ stage 4: rendering
    @serialised
    def sample(self, plan_: Plan, sources: PlannerSources, settings: dict[str, Any], on_step=None, *,
               force: bool = False) -> torch.Tensor:
        """The renderer under a full-Bernini guidance mode; returns the normalised latent (float32, CPU).
        ``force``: run a geometry whose working memory exceeds the machine's."""
        self.require_parts("sampling (sample)", "experts")
        if plan_.model_family != self.family or plan_.version != self.version:
            raise BerniniError(f"the plan was made by Bernini {plan_.version}; this renderer is Bernini {self.version}. "
                               "Plan with the planner of the same release.")
        num_frames, height, width = self.output_geometry(sources, settings)
        check_geometry(height, width)
        guidance = FullGuidance(settings["guidance_mode"])
        check_scheduler(guidance, settings["guidance_mode"], self.config.use_unipc, settings.get("sampler"))
        check_mode_sources(settings["guidance_mode"], n_videos=len(sources.videos), n_images=len(sources.images),
                           task=sources.task)
        self.check_render_memory(num_frames, height, width, sum(lat[0, 0].numel() // 4 for lat in
                                                                sources.videos + sources.images), force=force)
        n_videos, n_images = len(sources.videos), len(sources.images)
        # Ids in conversation order: videos first, then images (docs/official_behaviour.md §4.3). The official full
        # pipeline builds the source RoPE with use_src_id_rotary_emb=True hard-coded (transform_inputs), so the config
        # flag has no effect here.
        ids = source_ids_for(n_videos + n_images, max_trained=self.config.max_trained_src_id,
                             interpolate=self.config.interpolate_src_id)
        video_ids, image_ids = ids[:n_videos], ids[n_videos:]
        combos = {  # token order: images, then videos, then the target (docs/official_behaviour.md §4.2)
            "wovae": ([], []),
            "wimgvae": (list(sources.images), image_ids),
            "wvidvae": (list(sources.videos), video_ids),
            "wvae": (list(sources.images) + list(sources.videos), image_ids + video_ids),
        }
        omegas = Omegas(vid=settings["omega_vid"], img=settings["omega_img"], txt=settings["omega_txt"],
                        tgt=settings["omega_tgt"])
        return denoise(
            self.experts, guidance, combos, plan_.contexts, omegas, num_frames=num_frames, height=height,
            width=width, num_inference_steps=settings["num_inference_steps"], flow_shift=settings["flow_shift"],
            omega_scale=settings["omega_scale"], seed=settings["seed"], runtime=self.runtime,
            use_unipc=self.config.use_unipc, on_step=on_step, parallel=self.parallel, sampler=settings.get("sampler"),
            switch_step=settings.get("boundary_step_index"))

    def output_geometry(self, sources: PlannerSources, settings: dict[str, Any]) -> tuple[int, int, int]:
        """Frames = min(num_frames, 1 + 4(T−1)) of the target placeholder; size = height/width if > 0, else the
        placeholder's latent size × 8 (docs/official_behaviour.md §4.8)."""
        t, h, w = sources.target_latent_shape
        frames = 1 if get_task(sources.task).single_frame else int(settings["num_frames"])
        if force_4n_plus_1(frames) != frames:
            log.warning("num_frames=%d is not of the form 4n+1; using %d as the official pipeline does.", frames,
                        force_4n_plus_1(frames))
        frames = force_4n_plus_1(min(frames, 1 + 4 * (t - 1)))
        height = int(settings["height"]) if int(settings["height"] or 0) > 0 else h * 8
        width = int(settings["width"]) if int(settings["width"] or 0) > 0 else w * 8
        return frames, height, width

    # ------------------------------------------------------------------ call
    @serialised
    @torch.no_grad()
    def __call__(self, task: str, prompt: str, *, video=None, image=None, images=None,
                 output_path: Optional[str] = None, overwrite: bool = False, progress: Optional[Progress] = None,
                 force: bool = False, **kwargs) -> BerniniOutput:
        """As ``RendererPipeline.__call__``: planner, renderer, decode; ``output_path`` / ``overwrite`` /
        ``progress`` alike (stages "encode", "plan", "sample", "decode")."""
        self.require_parts("a whole render (__call__)", *self.parts_for_rank())
        settings = self.resolve(task, kwargs, force=force)
        FullGuidance(settings["guidance_mode"])  # reject a Bernini-R mode early (docs/official_behaviour.md §7.4)
        self.check_call(task, prompt, settings, video=video, image=image, images=images, output_path=output_path,
                        force=force, overwrite=overwrite, progress=progress, given=kwargs)
        if not 0 <= settings["seed"] <= MAX_PLANNER_SEED:  # a whole call seeds the planner (numpy) with it too
            raise BerniniError(f"seed {settings['seed']} is out of range for full Bernini: the planner seeds numpy, "
                               f"which takes 0..{MAX_PLANNER_SEED}; pick a seed in that range.")
        tiling = vae_tiling(settings)
        check_geometry(int(settings["height"] or 0), int(settings["width"] or 0))  # 0 = the source's size

        texts = {}  # what UMT5 saw, for BerniniOutput.prompt_text

        def prepare():
            encoding = StageSteps(progress, "encode", source_count(video, image, images) + 1)  # sources, then prompt
            sources = self.prepare_sources(
                task, video=video, image=image, images=images, fps=settings["fps"], num_frames=settings["num_frames"],
                height=settings["height"], width=settings["width"], max_image_size=settings["max_image_size"],
                video_fps=settings.get("video_fps"), tiling=tiling, on_source=encoding.advance)
            embeds = self.encode_prompt(task, prompt, settings["neg_prompt"], settings.get("system_prompt"))
            encoding.advance()
            planning = StageSteps(progress, "plan", settings["planning_step"])
            plan_ = self.plan_semantics(
                sources, embeds, prompt=prompt, neg_prompt=settings["neg_prompt"], seed=settings["seed"],
                planning_step=settings["planning_step"], vit_denoising_step=settings["vit_denoising_step"],
                vit_txt_cfg=settings["vit_txt_cfg"], vit_img_cfg=settings["vit_img_cfg"], on_step=planning.advance)
            texts["positive"] = embeds.positive_text
            return plan_, sources

        from .parallel.handoff import pack_full, unpack_full

        plan_, sources = self.prepared_inputs(prepare, pack_full, unpack_full)
        sampling = StageSteps(progress, "sample", settings["num_inference_steps"])
        latents = self.sample(plan_, sources, settings, on_step=sampling.advance, force=force)
        if not self.is_leader:  # the group's leader decodes and writes the result
            return BerniniOutput(frames=None, latents=None, settings=settings)
        raw = self.components.vae.denormalize(latents)
        frames = self.decode_raw(raw, tiling=tiling, progress=progress)
        out = BerniniOutput(frames=frames, latents=raw, settings=settings,
                            prompt_text=texts.get("positive", ""))
        if output_path is not None:
            out.output_path = str(media.save_output(frames, output_path, fps=settings["fps"], make_parents=True,
                                                    overwrite=overwrite))
        return out


def _vit_frames(item, rate: float, fps: int, num_frames: int) -> np.ndarray:
    """The frames the ViT sees (sampled at fps // 8, docs/official_behaviour.md §3.2), decoding only those from a
    file."""
    if isinstance(item, (str, bytes)) or hasattr(item, "__fspath__"):
        total, rate = media.probe_video(item)
        return media.decode_frames(item, vision.video_vit_frame_indices(total, rate, fps, num_frames))
    frames = item if hasattr(item, "shape") else np.asarray(item)
    if len(frames.shape) != 4 or frames.shape[0] == 0:
        return vision.video_uint8(frames)  # raises the shape message
    # only the picked frames are converted (elementwise rounding: the same values as converting all first)
    return vision.video_uint8(frames[vision.video_vit_frame_indices(frames.shape[0], rate, fps, num_frames)])


def _image_array(item):
    """An image source as the ViT preprocessing takes it: a path is opened the way the official processor
    opens it (EXIF orientation applied, RGB), in-memory images pass through."""
    if isinstance(item, (str, bytes)) or hasattr(item, "__fspath__"):
        return vision.open_image_for_vit(item)
    return item


def _image_size(image) -> tuple[int, int]:
    """(height, width) of a PIL image or an [H,W,3] / [1,H,W,3] array."""
    if hasattr(image, "size") and not hasattr(image, "shape"):
        width, height = image.size
        return height, width
    shape = tuple(image.shape)
    return (shape[-3], shape[-2]) if shape[-1] in (3, 4) else (shape[-2], shape[-1])
