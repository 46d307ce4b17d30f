"""The Bernini-R denoising loop: dual experts, in-context source streams, guidance, scheduler.

Mirrors `GEN_Wanx22.sample` of the official renderer (docs/official_behaviour.md §4.2–§4.7, §7.1):
* initial noise from a CPU generator seeded with `seed`, float32, shape [1,16,T,H/8,W/8];
* the high-noise expert while t ≥ boundary·1000, the low-noise one after; at the first
  low-noise step omega_vid/img/txt are multiplied once by `omega_scale` and the idle
  expert is offloaded;
* source combos (docs/official_behaviour.md §4.3): V = the first video only (sid 1); I = the images with their own ids
  from 1; VI = videos then images on one id axis; ids interpolate to linspace(1, 5, n) when
  there are more than `max_trained_src_id` sources (full Bernini builds its own combos and
  contexts and reuses the same loop, `denoise`);
* the noisy target is cast to the DiT dtype for the forward; the scheduler steps the float32
  latent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .errors import BerniniError
from .renderer.rope import source_ids_for
from .runtime import ModelHandle, Runtime
from .sampling.guidance import APGConfig, Omegas, RendererGuidance
from .sampling.schedulers import make_scheduler
from .stages import PromptEmbeds, Sources
from .text_encoder import pad_context

LATENT_CHANNELS = 16
VAE_STRIDE_T, VAE_STRIDE_S = 4, 8


def force_4n_plus_1(num_frames: int) -> int:
    """The official frame rule: num_frames // 4 * 4 + 1 (docs/official_behaviour.md §4.8)."""
    return max(int(num_frames) // VAE_STRIDE_T * VAE_STRIDE_T + 1, 1)


def initial_noise(seed: int, num_frames: int, height: int, width: int) -> torch.Tensor:
    """The official initial noise (docs/official_behaviour.md §7.1 item 4): CPU generator, float32, [1,16,T,H/8,W/8]."""
    shape = (1, LATENT_CHANNELS, (num_frames - 1) // VAE_STRIDE_T + 1, height // VAE_STRIDE_S, width // VAE_STRIDE_S)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")


# A combo is the source streams one guidance arm sees: (latents, source ids), the target excluded.
Combos = dict[str, tuple[list, list]]


def renderer_combos(sources: Sources, *, use_source_ids: bool, max_trained: int, interpolate: bool) -> Combos:
    """Bernini-R combos (docs/official_behaviour.md §4.3): V = the first video only; I = the images with their own ids
    from 1; VI = videos then images on one id axis."""

    def ids(n: int) -> list[float]:
        if not use_source_ids:
            return [0.0] * n
        return source_ids_for(n, max_trained=max_trained, interpolate=interpolate)

    videos, images = list(sources.videos), list(sources.images)
    vi_ids = ids(len(videos) + len(images))
    return {
        "none": ([], []),
        "V": (videos[:1], vi_ids[:1]),
        "I": (images, ids(len(images))),
        "VI": (videos + images, vi_ids),
    }


@dataclass
class Experts:
    high: ModelHandle
    low: Optional[ModelHandle]
    boundary: float  # switch_dit_boundary (0.875; 0 for a single expert)


def check_geometry(height: int, width: int) -> None:
    if height % 16 or width % 16:
        raise BerniniError(f"height/width must be multiples of 16, got {height}x{width}.")


def check_scheduler(guidance, guidance_mode: str, use_unipc: bool) -> None:
    if guidance.uses_apg and not use_unipc:
        # The official CLI: UniPC is required by the *_apg modes (the Euler schedule ends at sigma 0,
        # where the x-space conversion divides by zero).
        raise BerniniError(f"guidance_mode {guidance_mode!r} needs the UniPC scheduler; drop --no-use_unipc "
                           "or choose a mode without APG.")


def denoise(
    experts: Experts,
    guidance,
    combos: Combos,
    contexts: dict[str, torch.Tensor],
    omegas: Omegas,
    *,
    num_frames: int,
    height: int,
    width: int,
    num_inference_steps: int,
    flow_shift: float,
    omega_scale: float,
    seed: int,
    runtime: Runtime,
    use_unipc: bool = True,
    on_step: Optional[Callable[[int, int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """The guided sampling loop shared by both families; returns the normalised float32 latent on the CPU.

    `guidance.arms(omegas)` names, per step, the DiT calls to make: each arm's `combo` selects the source
    streams (`combos`) and its context key (`text` for Bernini-R arms, `context` for full-Bernini arms)
    the cross-attention context (`contexts`, [1, L, D], L ≥ 512).
    """
    scheduler = make_scheduler(use_unipc, flow_shift)
    scheduler.set_timesteps(int(num_inference_steps))
    device = experts.high.load_device  # where the experts run (ComfyUI may differ from runtime.device)
    sample = initial_noise(seed, num_frames, height, width).to(device)

    # Constant across steps, built once per expert: the projected contexts and the cast source streams.
    prepared: dict = {}

    def inputs_for(handle: ModelHandle, dit):
        if handle.name not in prepared:
            dtype = dit.compute_dtype
            with torch.no_grad():
                embedded = {name: dit.embed_context(ctx, device=device) for name, ctx in contexts.items()}
            streams = {name: [lat.to(device=device, dtype=dtype) for lat in latents] for name, (latents, _) in combos.items()}
            prepared.clear()  # the other expert's projections are no longer needed
            prepared[handle.name] = (embedded, streams)
        return prepared[handle.name]

    boundary_t = experts.boundary * 1000.0
    total = len(scheduler.timesteps)
    # The largest arm's sequence (all sources + target) sizes the activations the memory manager must make room for.
    patch = 4  # (1, 2, 2) patches
    target_tokens = sample[0, 0].numel() // patch
    source_tokens = max((sum(lat[0, 0].numel() // patch for lat in latents) for latents, _ in combos.values()),
                        default=0)
    rows = max((ctx.shape[-2] for ctx in contexts.values()), default=512)

    def load(handle: ModelHandle):
        return runtime.acquire(handle, handle.module.working_memory(target_tokens + source_tokens, rows))

    current = experts.high
    dit = load(current)
    switched = False
    try:
        for index, t in enumerate(scheduler.timesteps):
            runtime.check_interrupt()
            if experts.low is not None and not switched and float(t) < boundary_t:
                runtime.release(current)
                current, switched = experts.low, True
                dit = load(current)
                omegas = omegas.scaled(omega_scale)
            context_inputs, stream_inputs = inputs_for(current, dit)
            target = sample.to(dit.compute_dtype)
            timestep = torch.full((1,), float(t), device=device)
            eps = {}
            for arm in guidance.arms(omegas):
                context = context_inputs[getattr(arm, "text", None) or arm.context]
                ids = list(combos[arm.combo][1]) + [0.0]
                eps[arm] = dit(stream_inputs[arm.combo] + [target], ids, timestep, context)
            sigma = scheduler.current_sigma
            velocity = guidance.combine(eps, omegas, sample=sample, sigma=sigma)
            denoised = sample - sigma * velocity.float()  # the x0 estimate, what ComfyUI previews
            sample = scheduler.step(velocity, sample)
            if not bool(torch.isfinite(sample).all()):  # one reduction per step; a NaN video is never written
                raise BerniniError(
                    f"sampling step {index + 1}/{total} ({current.name}) produced non-finite latents (NaN or inf): "
                    "the expert's weights hold NaN/inf (a corrupt or wrongly converted checkpoint: re-download "
                    "it), a source or LATENT input is broken, or a guidance weight is extreme. Nothing was written.")
            runtime.progress("sample", index + 1, total, latent=denoised)
            if on_step is not None:
                on_step(index, total, sample)
    finally:
        runtime.release(current)
    return sample.float().cpu()


def renderer_denoise(
    experts: Experts,
    embeds: PromptEmbeds,
    sources: Sources,
    *,
    num_frames: int,
    height: int,
    width: int,
    guidance_mode: str,
    num_inference_steps: int,
    flow_shift: float,
    omega_vid: float,
    omega_img: float,
    omega_txt: float,
    omega_scale: float,
    eta: float,
    momentum: float,
    norm_threshold: Sequence[float],
    seed: int,
    runtime: Runtime,
    use_unipc: bool = True,
    use_source_ids: bool = True,
    max_trained_src_id: int = 5,
    interpolate_src_id: bool = True,
    on_step: Optional[Callable[[int, int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Bernini-R sampling (`GEN_Wanx22.sample`): contexts = positive / negative UMT5 features padded to 512."""
    check_geometry(height, width)
    thresholds = (norm_threshold,) if isinstance(norm_threshold, (int, float)) else tuple(norm_threshold)
    guidance = RendererGuidance(guidance_mode, APGConfig(eta=eta, momentum=momentum, norm_threshold=thresholds))
    check_scheduler(guidance, guidance_mode, use_unipc)
    combos = renderer_combos(sources, use_source_ids=use_source_ids, max_trained=max_trained_src_id,
                             interpolate=interpolate_src_id)
    contexts = {"pos": pad_context([embeds.positive]), "neg": pad_context([embeds.negative])}
    return denoise(
        experts, guidance, combos, contexts, Omegas(vid=omega_vid, img=omega_img, txt=omega_txt),
        num_frames=num_frames, height=height, width=width, num_inference_steps=num_inference_steps,
        flow_shift=flow_shift, omega_scale=omega_scale, seed=seed, runtime=runtime, use_unipc=use_unipc,
        on_step=on_step,
    )
