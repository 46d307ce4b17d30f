"""BerniniPipeline: from_pretrained, __call__, and the stage methods the ComfyUI nodes use.

`BerniniPipeline.from_pretrained(path)` reads the directory's layout (and `config.json`
`model_type`, as the official `build_pipeline` does, docs/official_behaviour.md §6.1) and returns the
matching pipeline. Bernini-R (renderer only) is `RendererPipeline`; full Bernini (planner +
renderer) is `FullPipeline` (bernini_core/pipeline_full.py).

`__call__` reads top to bottom: settings (task preset + caller overrides) → encode prompt →
prepare sources → sample → decode → optionally save.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Any, Optional

import torch

from . import media
from .denoise import Experts, force_4n_plus_1, renderer_denoise
from .errors import BerniniError
from .memory_estimate import check_fits
from .parallel.state import ParallelState
from .progress import Progress, StageSteps
from .runtime import Runtime, resolve_dtype
from .sampling.guidance import RendererGuidance
from .stages import BerniniOutput, PromptEmbeds, Sources
from .tasks import (IGNORED_SETTINGS, check_mode_sources, check_sources, check_text, get_task, ignored_by_mode,
                    renderer_preset, resolve_settings)
from .text_encoder import negative_prompt, t5_negative_text, t5_positive_text

log = logging.getLogger("bernini.pipeline")

# Keywords a call accepts (official CLI names, docs/architecture.md §6). Planner keywords are accepted by
# every pipeline so one settings dict serves both families; the renderer ignores them, like the
# official renderer pipeline's **kwargs.
CALL_KEYWORDS = frozenset(
    {
        "num_frames", "height", "width", "max_image_size", "num_inference_steps", "guidance_mode",
        "omega_vid", "omega_img", "omega_txt", "omega_tgt", "omega_scale", "planning_step",
        "vit_denoising_step", "vit_txt_cfg", "vit_img_cfg", "flow_shift", "eta", "momentum",
        "norm_threshold", "neg_prompt", "system_prompt", "fps", "video_fps", "seed",
        "vae_tile_px", "vae_tile_overlap_px",  # ours: tiled VAE to bound memory at 720p+ (0 = off, the official)
        "preset", "sampler", "boundary_step_index",  # ours: fast sampling for distill LoRAs (docs/fast_sampling.md)
    }
)


def video_rate(video_fps, index: int):
    """The frame rate of in-memory video number `index`: `video_fps` is None (= fps), one rate for every video,
    or one rate per video (None entries = fps)."""
    if isinstance(video_fps, (list, tuple)):
        return video_fps[index] if index < len(video_fps) else None
    return video_fps


def source_count(video=None, image=None, images=None) -> int:
    """How many sources `prepare_sources` encodes (the "encode" stage's steps besides the prompt)."""
    def count(value) -> int:
        return 0 if value is None else (len(value) if isinstance(value, (list, tuple)) else 1)

    return count(video) + (image is not None) + count(images)


def make_divisible(value: int, stride: int = 16) -> int:
    """The official size snap: nearest multiple of `stride`, at least `stride` (docs/official_behaviour.md §4.8)."""
    return max(stride, int(round(value / stride) * stride))


def vae_tiling(settings: dict[str, Any]):
    """The VAE tiling the settings ask for (vae_tile_px > 0), else None (untiled, as the official)."""
    from .vae_tiling import TilingConfig

    tile = int(settings.get("vae_tile_px") or 0)
    if tile <= 0:
        return None
    return TilingConfig(tile_px=tile, overlap_px=int(settings.get("vae_tile_overlap_px") or 64))


def loaded_parts(components) -> frozenset:
    """The parts (loaders.PARTS) whose components a load produced: those not None."""
    present = {"experts": getattr(components, "dit_high", None), "vae": getattr(components, "vae", None),
               "text_encoder": getattr(components, "text_encoder", None),
               "planner": getattr(components, "planner", None)}
    return frozenset(part for part, component in present.items() if component is not None)


def serialised(method):
    """Run a pipeline method under the pipeline's RLock (made in __init__): a pipeline's models, handles and the
    state of one call serve one call at a time, so threads sharing a pipeline queue instead of interleaving."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


def as_parallel_state(parallel) -> ParallelState:
    """A ParallelState from a ParallelState or a ParallelConfig (groups built now, inside the initialised
    process group)."""
    from .parallel import ParallelConfig

    if isinstance(parallel, ParallelConfig):
        return ParallelState.build(parallel)
    if not isinstance(parallel, ParallelState):
        raise BerniniError(f"parallel must be a ParallelConfig or a ParallelState, got {type(parallel).__name__}.")
    return parallel


class BerniniPipeline:
    """Base of every Bernini pipeline; `from_pretrained` picks the family from the directory."""

    family = "bernini"

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "BerniniPipeline":
        if not isinstance(path, (str, os.PathLike)):
            raise BerniniError(f"from_pretrained needs the model folder's path, got {type(path).__name__} {path!r}.")
        pipeline_class = cls.pipeline_class(path, high_noise_ckpt=kwargs.get("high_noise_ckpt"),
                                            low_noise_ckpt=kwargs.get("low_noise_ckpt"))
        return pipeline_class.from_pretrained(path, **kwargs)

    @staticmethod
    def pipeline_class(path, *, high_noise_ckpt=None, low_noise_ckpt=None) -> type:
        """The pipeline `from_pretrained` loads `path` with, told from config.json and the folder listing only
        (no weights read), so a caller can check its inputs before the long load."""
        from .checkpoints import Layout, detect_layout
        from .loaders_full import is_full_bernini_dir

        if is_full_bernini_dir(path):  # full Bernini refuses split checkpoints with its own message
            from .pipeline_full import FullPipeline

            return FullPipeline
        if high_noise_ckpt or low_noise_ckpt:
            return RendererPipeline
        # config.json model_type "bernini" (official `build_pipeline`, docs/official_behaviour.md §6.1)
        if detect_layout(path) == Layout.BERNINI_FULL:
            from .pipeline_full import FullPipeline

            return FullPipeline
        return RendererPipeline

    # ------------------------------------------------------------------ multi-process runs
    parallel = ParallelState.single()  # replaced per instance by use_parallel

    def use_parallel(self, state: ParallelState, *, fsdp: bool = False) -> None:
        """Sample on a multi-process layout (bernini_core/parallel, docs/architecture.md §5.1): this instance's experts
        split their tokens over the Ulysses group, the guidance arms are spread over the cfg groups, and the
        stages before sampling run on the group's leader, which shares their results. Every rank of the layout
        must make the same calls. `state`: a ParallelState (ParallelState.build(config)), or a ParallelConfig,
        whose groups are then built here (collective: every rank must load at the same time). `fsdp`: also shard
        each expert's weights over the Ulysses group (FSDP2, bernini_core/parallel/fsdp.py): 1/U of the weights per
        GPU, gathered block by block during a forward."""
        state = as_parallel_state(state)
        if fsdp:
            from .parallel.fsdp import check_fsdp

            check_fsdp(state.config)
        state.config.check(heads=None if self.experts is None else self.experts.high.module.config.num_attention_heads)
        handler = state.sequence_parallel()
        if self.experts is not None:
            for handle in (self.experts.high, self.experts.low):
                if handle is not None:
                    handle.module.use_sequence_parallel(handler)
                    if fsdp:  # before any load moves the whole expert to the GPU
                        from .parallel.fsdp import describe_sharding, parameter_bytes, shard_expert

                        before = parameter_bytes(handle.module)
                        shard_expert(handle.module, state, handle.load_device)
                        log.info("%s: %s", handle.name, describe_sharding(handle.module, before))
        self.parallel = state

    @property
    def is_leader(self) -> bool:
        """True unless this is a rank of a multi-process run that another rank leads (it then only samples)."""
        return self.parallel.is_replica_leader

    def parts_for_rank(self) -> tuple[str, ...]:
        """The parts a whole render needs on this rank: all of them on a leader, the experts elsewhere."""
        return ("experts",) if not self.is_leader else tuple(p for p in ("text_encoder", "vae", "planner", "experts")
                                                             if p in self.required_parts)

    def prepared_inputs(self, prepare, pack, unpack):
        """The sampling inputs: made by `prepare()` here, or, in a multi-process run, by the group leader and
        received from it (bernini_core/parallel/handoff.py)."""
        if not self.parallel.is_parallel:
            return prepare()
        from .parallel.handoff import share_from_leader

        return share_from_leader(self.parallel, prepare, pack, unpack)

    def require_parts(self, stage: str, *parts: str, hint: Optional[str] = None) -> None:
        """A clear BerniniError when `stage` needs parts this pipeline was loaded without (`parts=` of
        from_pretrained: a multi-process run loads only the experts on the ranks that are not a group's leader)."""
        from .loaders import parts_label

        missing = [part for part in parts if part not in self.parts]
        if missing:
            names = [repr(part) for part in missing]
            needed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
            raise BerniniError(
                f"{stage} needs the {needed} part{'s' if len(missing) > 1 else ''}, but this pipeline was loaded with "
                f"parts={parts_label(self.parts)}. Load the pipeline with {needed} among its parts (in a "
                f"multi-process run this stage belongs to the group's leader){'; ' + hint if hint else ''}.")

    def check_call(self, task: str, prompt, settings: dict[str, Any], *, video=None, image=None, images=None,
                   output_path=None, force: bool = False, overwrite: bool = False, progress=None,
                   given=()) -> None:
        """What ``__call__`` can check with no model work, before its first stage: the texts, the sources the task
        and the guidance mode need, the output path, and the memory of an output sized by the settings. `given`:
        the settings the caller named; those this family ignores get one warning line each."""
        for name, value in (("overwrite", overwrite), ("force", force)):
            if not isinstance(value, bool):  # "false" is truthy: it would replace the user's file
                raise BerniniError(f"{name} must be True or False, got {type(value).__name__} {value!r}.")
        if progress is not None and not callable(progress):
            raise BerniniError(f"progress must be a function progress(stage, step, total), got {progress!r}.")
        family = "full" if self.family == "bernini" else "renderer"
        for name in given:
            if name in IGNORED_SETTINGS[family]:
                log.warning("%s is ignored: %s.", name, IGNORED_SETTINGS[family][name])
        for name in ignored_by_mode(settings, given):
            log.warning("%s is ignored: guidance_mode 'none' runs one pass per step and reads no guidance weights.",
                        name)
        spec = get_task(task)
        check_text(prompt, "prompt", required=True)
        for name in ("neg_prompt", "system_prompt"):
            check_text(settings.get(name), name, required=False)
        videos = [] if video is None else (list(video) if isinstance(video, (list, tuple)) else [video])
        refs = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        has_image = image is not None
        if task in ("r2v", "rv2v") and has_image:  # the single image joins the references (prepare_sources)
            refs, has_image = [image] + refs, False
        check_sources(spec, n_videos=len(videos), has_image=has_image, n_images=len(refs))
        check_mode_sources(settings["guidance_mode"], n_videos=len(videos), n_images=len(refs) + int(has_image),
                           task=task)
        if output_path is not None:
            media.check_output_path(output_path)
            media.planned_output(output_path, 1 if spec.single_frame or settings["num_frames"] == 1 else 2)
        if not videos and not has_image and int(settings.get("height") or 0) > 0:  # the size is the settings'
            frames = 1 if spec.single_frame else int(settings["num_frames"])
            check_fits(frames, int(settings["height"]), int(settings["width"] or 0), self.runtime.device,
                       force=force)

    def check_render_memory(self, num_frames: int, height: int, width: int, source_tokens: int,
                            force: bool = False) -> None:
        """Before the first step: the sampling and decoding working memory of this geometry must fit."""
        self.require_parts("sampling", "experts")
        dit = self.experts.high.module
        check_fits(num_frames, height, width, self.experts.high.load_device, dit=dit,
                   source_tokens=source_tokens, force=force)

    @serialised
    def decode(self, latents: torch.Tensor, tiling=None) -> torch.Tensor:
        """Normalised latents (what ``sample`` returns) → float32 frames [F,H,W,3] in 0..1 on the CPU."""
        self.require_parts("decoding (decode)", "vae")
        return self.decode_raw(self.components.vae.denormalize(latents), tiling=tiling)

    @serialised
    def decode_raw(self, raw: torch.Tensor, tiling=None, progress: Optional[Progress] = None) -> torch.Tensor:
        """Raw Wan 2.1 latents [B,16,T,h,w] (``BerniniOutput.latents``, a ComfyUI LATENT) → float32 frames
        [B·F,H,W,3] in 0..1 on the CPU, one video after the other. The one decoding path of the pipelines and
        the Decode node, so both give the same frames for the same latents. ``progress``: stage "decode", one
        step per decoder call (bernini_core/progress.py)."""
        self.require_parts("decoding (decode_raw)", "vae")
        if not bool(torch.isfinite(raw).all()):  # a NaN video is never made
            raise BerniniError("the latents to decode hold NaN or inf values (a broken LATENT input, or the node that "
                               "made it failed); nothing was decoded.")
        vae = self.components.vae
        memory = vae.working_memory(raw.shape[-2] * 8, raw.shape[-1] * 8, tiling)
        steps = StageSteps(progress, "decode", raw.shape[0] * vae.decode_chunks(raw, tiling))
        videos = []
        with self.runtime.use(self.vae_handle, memory_required=memory), torch.inference_mode():
            for item in raw:
                video = vae.decode_raw(item.unsqueeze(0).to(self.vae_handle.load_device, torch.float32), tiling=tiling,
                                       on_chunk=steps.advance)
                videos.append((video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).cpu())
        return torch.cat(videos, dim=0).contiguous()


class RendererPipeline(BerniniPipeline):
    """Bernini-R: UMT5 + one or two Wan DiT experts + Wan 2.1 VAE (docs/official_behaviour.md §4, §5.3)."""

    family = "bernini_renderer"
    required_parts = ("text_encoder", "vae", "experts")

    def __init__(self, components, runtime: Runtime):
        self.components = components
        self.config = components.config
        self.runtime = runtime
        self._lock = threading.RLock()  # see serialised
        self.parts = loaded_parts(components)  # parts not loaded: their components and handles are None
        self.text_encoder_handle = (runtime.handle("umt5", components.text_encoder.module)
                                    if components.text_encoder is not None else None)
        self.vae_handle = runtime.handle("vae", components.vae) if components.vae is not None else None
        self.experts = None
        if components.dit_high is not None:
            high = runtime.handle("dit_high", components.dit_high)
            low = runtime.handle("dit_low", components.dit_low) if components.dit_low is not None else None
            boundary = self.config.switch_dit_boundary if low is not None else 0.0
            self.experts = Experts(high=high, low=low, boundary=boundary)

    @classmethod
    def from_pretrained(
        cls,
        path,
        *,
        high_noise_ckpt: Optional[str] = None,
        low_noise_ckpt: Optional[str] = None,
        device="auto",
        dtype="bf16",
        attention: str = "auto",
        offload: bool = True,
        progress: Optional[Progress] = None,
        parts=None,
        parallel: Optional[ParallelState] = None,
        fsdp: bool = False,
        loras=None,
        speed=None,
        **config_overrides,
    ) -> "RendererPipeline":
        """``progress(stage, step, total)``: stage "load", one step per component (bernini_core/progress.py).

        ``parts``: None (every part) or some of "experts", "text_encoder", "vae" (loaders.load_renderer); a stage
        that needs a part not loaded raises a BerniniError saying so. ``sample`` needs only the experts.
        ``parallel``: this rank's ``ParallelState`` in a multi-process run (``use_parallel``); ranks that do not lead
        their group then load only the experts.
        ``loras``: LoRAs merged into the experts right after they load (bernini_core/lora): LoraSpec objects or
        ``FILE[:STRENGTH[:high|low|both]]`` texts, checked before the load.
        ``speed``: an acceleration.SpeedSettings (torch.compile of the DiT blocks, block swap), checked before the
        load and applied to the experts after LoRAs and the multi-process layout."""
        from .loaders import load_renderer
        from .lora import apply_loras_, check_loras

        lora_specs = check_loras(loras, parts)
        parallel = None if parallel is None else as_parallel_state(parallel)
        if speed is not None:
            speed.check(multi_process=parallel is not None and parallel.is_parallel, fsdp=fsdp)
        if parallel is not None and parts is None and not parallel.is_replica_leader:
            parts = ("experts",)

        runtime = Runtime(device, offload=offload)
        components = load_renderer(
            path,
            high_noise_ckpt=high_noise_ckpt,
            low_noise_ckpt=low_noise_ckpt,
            dtype=resolve_dtype(dtype),
            attention=attention,
            overrides={k: v for k, v in config_overrides.items() if v is not None},
            progress=progress,
            parts=parts,
        )
        if lora_specs and components.dit_high is not None:  # before any sharding: merged into whole weights
            apply_loras_(components, lora_specs, compute_device=runtime.device)
        pipe = cls(components, runtime)
        if parallel is not None:
            pipe.use_parallel(parallel, fsdp=fsdp)
        elif fsdp:
            raise BerniniError("fsdp=True shards the experts over a multi-process run: pass parallel= too.")
        if speed is not None and components.dit_high is not None:
            speed.apply((components.dit_high, components.dit_low), runtime.device, offload=runtime.offload)
        return pipe

    # ------------------------------------------------------------------ stages
    def default_settings(self, task: str) -> dict[str, Any]:
        return renderer_preset(task)

    @serialised
    def encode_prompt(
        self, task: str, prompt: str, neg_prompt: Optional[str] = None, system_prompt: Optional[str] = None
    ) -> PromptEmbeds:
        """UMT5 features of system_prompt + cleaned prompt and of the negative prompt
        (docs/official_behaviour.md §4.4)."""
        self.require_parts("prompt encoding (encode_prompt)", "text_encoder")
        get_task(task)
        check_text(prompt, "prompt", required=True)
        check_text(neg_prompt, "neg_prompt", required=False)
        check_text(system_prompt, "system_prompt", required=False)
        positive_text = t5_positive_text(task, prompt, system_prompt)
        negative_text = t5_negative_text(neg_prompt if neg_prompt is not None else negative_prompt())
        with self.runtime.use(self.text_encoder_handle):
            positive, negative = self.components.text_encoder.encode([positive_text, negative_text])
        return PromptEmbeds(
            task=task,
            positive=positive.cpu(),
            negative=negative.cpu(),
            positive_text=positive_text,
            negative_text=negative_text,
            model_family=self.family,
        )

    @serialised
    def prepare_sources(
        self,
        task: str,
        *,
        video=None,
        image=None,
        images=None,
        fps: float = 16,
        num_frames: int = 81,
        max_image_size: int = 848,
        video_fps=None,
        min_short_edge: int = 1,
        tiling=None,
        on_source=None,
    ) -> Sources:
        """Resize, resample and VAE-encode the sources by the official rules (docs/official_behaviour.md §4.8).
        ``on_source()`` is called after each source is encoded (progress)."""
        self.require_parts("source encoding (prepare_sources)", "vae")
        spec = get_task(task)
        videos = [] if video is None else (list(video) if isinstance(video, (list, tuple)) else [video])
        refs = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        if task in ("r2v", "rv2v") and image is not None:
            # The official gradio routing merges a single reference image into `images`
            # (docs/official_behaviour.md §6.3).
            refs, image = [image] + refs, None
        check_sources(spec, n_videos=len(videos), has_image=image is not None, n_images=len(refs))

        sources = Sources(task=task)
        vae = self.components.vae
        device = self.vae_handle.load_device
        with self.runtime.use(self.vae_handle), torch.inference_mode():
            for index, item in enumerate(videos):
                pixels = media.load_video(
                    item, fps=fps, num_frames=num_frames, max_image_size=max_image_size,
                    min_short_edge=min_short_edge, video_fps=video_rate(video_fps, index),
                )
                if index == 0:
                    sources.frame_count, sources.height, sources.width = pixels.shape[1], pixels.shape[2], pixels.shape[3]
                sources.videos.append(vae.encode(pixels.unsqueeze(0).to(device), tiling=tiling).float().cpu())
                if on_source is not None:
                    on_source()
            for position, item in enumerate(([image] if image is not None else []) + refs):
                pixels = media.load_image(item, max_image_size=max_image_size, min_short_edge=min_short_edge)
                if position == 0 and image is not None and sources.height is None:
                    sources.height, sources.width = pixels.shape[2], pixels.shape[3]
                sources.images.append(vae.encode(pixels.unsqueeze(0).to(device), tiling=tiling).float().cpu())
                if on_source is not None:
                    on_source()
        return sources

    @serialised
    def sample(self, embeds: PromptEmbeds, sources: Sources, settings: dict[str, Any], on_step=None, *,
               force: bool = False) -> torch.Tensor:
        """Guided denoising; returns the normalised latent [1,16,T,H/8,W/8] (float32, CPU). ``force``: run a
        geometry whose working memory exceeds the machine's."""
        self.require_parts("sampling (sample)", "experts")
        if embeds.model_family != self.family:
            raise BerniniError(
                f"the prompt embeddings were made for {embeds.model_family!r} but this is a {self.family!r} "
                "renderer; encode the prompt with this model's text encoder."
            )
        check_mode_sources(settings["guidance_mode"], n_videos=len(sources.videos), n_images=len(sources.images),
                           task=sources.task)
        num_frames, height, width = self.output_geometry(sources, settings)
        self.check_render_memory(num_frames, height, width, sum(lat[0, 0].numel() // 4 for lat in
                                                                sources.videos + sources.images), force=force)
        cfg = self.config
        return renderer_denoise(
            self.experts,
            embeds,
            sources,
            num_frames=num_frames,
            height=height,
            width=width,
            guidance_mode=settings["guidance_mode"],
            num_inference_steps=settings["num_inference_steps"],
            flow_shift=settings["flow_shift"],
            omega_vid=settings["omega_vid"],
            omega_img=settings["omega_img"],
            omega_txt=settings["omega_txt"],
            omega_scale=settings["omega_scale"],
            eta=settings["eta"],
            momentum=settings["momentum"],
            norm_threshold=settings["norm_threshold"],
            seed=settings["seed"],
            runtime=self.runtime,
            use_unipc=cfg.use_unipc,
            use_source_ids=cfg.use_src_id_rotary_emb,
            max_trained_src_id=cfg.max_trained_src_id,
            interpolate_src_id=cfg.interpolate_src_id,
            on_step=on_step,
            parallel=self.parallel,
            sampler=settings.get("sampler"),
            switch_step=settings.get("boundary_step_index"),
        )

    def output_geometry(self, sources: Sources, settings: dict[str, Any]) -> tuple[int, int, int]:
        """Frames and size: from the first source video / the i2i image, else the settings
        (docs/official_behaviour.md §4.8)."""
        frames = sources.frame_count if sources.frame_count is not None else int(settings["num_frames"])
        if get_task(sources.task).single_frame:
            frames = 1
        fixed = force_4n_plus_1(frames)
        if fixed != frames:
            log.warning("num_frames=%d is not of the form 4n+1; using %d as the official pipeline does.", frames, fixed)
        height = sources.height if sources.height is not None else int(settings["height"])
        width = sources.width if sources.width is not None else int(settings["width"])
        if height <= 0 or width <= 0:
            raise BerniniError(f"height/width must be positive when no source fixes the size, got {height}x{width}.")
        size = []
        for name, value in (("height", height), ("width", width)):
            snapped = make_divisible(value)
            if snapped != value:
                log.warning("%s=%d is not a multiple of 16; using %d (the nearest one) as the official pipeline does.",
                            name, value, snapped)
            size.append(snapped)
        return fixed, size[0], size[1]

    # ------------------------------------------------------------------ call
    def resolve(self, task: str, overrides: dict[str, Any], *, force: bool = False) -> dict[str, Any]:
        unknown = sorted(set(overrides) - CALL_KEYWORDS)
        if unknown:
            raise BerniniError(f"unknown keyword(s) {unknown}; valid keywords: {sorted(CALL_KEYWORDS)}.")
        return resolve_settings(self.default_settings(task), overrides, force=force)

    @serialised
    @torch.no_grad()
    def __call__(
        self,
        task: str,
        prompt: str,
        *,
        video=None,
        image=None,
        images=None,
        output_path: Optional[str] = None,
        overwrite: bool = False,
        progress: Optional[Progress] = None,
        force: bool = False,
        **kwargs,
    ) -> BerniniOutput:
        """Render one task. ``output_path``: also write the result there (image or MP4); an existing file is kept
        and the next free numbered name is used unless ``overwrite`` (``BerniniOutput.output_path`` says which).

        ``progress(stage, step, total)``, for this call only: each stage reports step 0 when it starts, then every
        step done up to ``total``. Stages in order: "encode" (the prompt, then each source), "plan" (full Bernini
        only: MaskGIT steps), "sample" (denoising steps), "decode" (VAE decoder calls). bernini_core/progress.py
        has the contract and a tqdm-backed callback (TqdmProgress)."""
        self.require_parts("a whole render (__call__)", *self.parts_for_rank())
        settings = self.resolve(task, kwargs, force=force)
        RendererGuidance(settings["guidance_mode"])  # a full-Bernini mode is named as such, before anything else
        self.check_call(task, prompt, settings, video=video, image=image, images=images, output_path=output_path,
                        force=force, overwrite=overwrite, progress=progress, given=kwargs)
        tiling = vae_tiling(settings)

        def prepare():
            encoding = StageSteps(progress, "encode", 1 + source_count(video, image, images))
            embeds = self.encode_prompt(task, prompt, settings.get("neg_prompt"), settings.get("system_prompt"))
            encoding.advance()
            sources = self.prepare_sources(
                task,
                video=video,
                image=image,
                images=images,
                fps=settings["fps"],
                num_frames=settings["num_frames"],
                max_image_size=settings["max_image_size"],
                video_fps=settings.get("video_fps"),
                tiling=tiling,
                on_source=encoding.advance,
            )
            return embeds, sources

        from .parallel.handoff import pack_renderer, unpack_renderer

        embeds, sources = self.prepared_inputs(prepare, pack_renderer, unpack_renderer)
        sampling = StageSteps(progress, "sample", settings["num_inference_steps"])
        latents = self.sample(embeds, sources, settings, on_step=sampling.advance, force=force)
        if not self.is_leader:  # the group's leader decodes and writes the result
            return BerniniOutput(frames=None, latents=None, settings=settings, prompt_text=embeds.positive_text)
        raw = self.components.vae.denormalize(latents)
        frames = self.decode_raw(raw, tiling=tiling, progress=progress)
        out = BerniniOutput(
            frames=frames,
            latents=raw,
            settings=settings,
            prompt_text=embeds.positive_text,
        )
        if output_path is not None:
            out.output_path = str(media.save_output(frames, output_path, fps=settings["fps"], make_parents=True,
                                                    overwrite=overwrite))
        return out
