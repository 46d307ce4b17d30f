"""The Bernini-R denoising loop: dual experts, in-context source streams, guidance, scheduler.

Mirrors `GEN_Wanx22.sample` of the official renderer (docs/official_behaviour.md §4.2–§4.7, §7.1):
* initial noise from a CPU generator seeded with `seed`, float32, shape [1,16,T,H/8,W/8];
* the high-noise expert while t ≥ boundary·1000 (or, with `switch_step`, for the first `switch_step` steps: the
  distill schedule's boundary_step_index, docs/fast_sampling.md), the low-noise one after; at the first
  low-noise step omega_vid/img/txt are multiplied once by `omega_scale` and the idle
  expert is offloaded;
* source combos (docs/official_behaviour.md §4.3): V = the first video only (sid 1); I = the images with their own ids
  from 1; VI = videos then images on one id axis; ids interpolate to linspace(1, 5, n) when
  there are more than `max_trained_src_id` sources (full Bernini builds its own combos and
  contexts and reuses the same loop, `denoise`);
* the noisy target is cast to the DiT dtype for the forward; the scheduler steps the float32
  latent;
* parallel (``parallel=ParallelState``, docs/architecture.md §5.1): with C guidance-arm groups each step's arms are
  spread over the groups by token count (``parallel.arms.assign_arms``), each rank runs only its group's arms (a
  Ulysses group's ranks run them together), and every arm's output is broadcast from its group over the cfg group,
  so every rank combines the same arms into the same velocity and steps the same sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .errors import BerniniError
from .parallel.arms import assign_arms
from .parallel.exchange import broadcast_into, check_identical
from .parallel.fsdp import is_sharded
from .parallel.state import ParallelState
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


def check_scheduler(guidance, guidance_mode: str, use_unipc: bool, sampler: Optional[str] = None) -> None:
    """`sampler`: the settings' sampler (None = the official choice, UniPC unless `use_unipc` is off)."""
    euler = sampler == "euler" or (sampler is None and not use_unipc)
    if guidance.uses_apg and euler:
        # The official CLI: UniPC is required by the *_apg modes (the Euler schedule ends at sigma 0,
        # where the x-space conversion divides by zero). The distill schedule's sigmas are all above 0.
        if sampler == "euler":
            raise BerniniError(f"guidance_mode {guidance_mode!r} needs sampler unipc or distill (Euler's last sigma is "
                               "0); choose another sampler or a mode without APG.")
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
    parallel: Optional[ParallelState] = None,
    sampler: Optional[str] = None,
    switch_step: Optional[int] = None,
) -> torch.Tensor:
    """The guided sampling loop shared by both families; returns the normalised float32 latent on the CPU.

    `sampler`: "unipc" | "euler" | "distill" (None: the official choice by `use_unipc`). `switch_step`: the
    low-noise expert takes over at this step index (lightx2v's boundary_step_index) instead of at the first
    timestep below `experts.boundary`·1000 (None, the official rule).

    `guidance.arms(omegas)` names, per step, the DiT calls to make: each arm's `combo` selects the source
    streams (`combos`) and its context key (`text` for Bernini-R arms, `context` for full-Bernini arms)
    the cross-attention context (`contexts`, [1, L, D], L ≥ 512).

    `parallel`: this process's place in a parallel run (None: one process alone). Every rank of a data-parallel
    replica calls `denoise` at once with the same inputs (checked once, up front); with `parallel.cfg_size` > 1
    each rank runs only the arms of its arm group and receives the others' outputs, so all return the same latent.
    A Ulysses group shards each forward through the experts' own handler (`BerniniDiT.use_sequence_parallel`).
    """
    parallel = ParallelState.single() if parallel is None else parallel
    arm_groups = parallel.cfg_size
    scheduler = make_scheduler(use_unipc, flow_shift, sampler)
    scheduler.set_timesteps(int(num_inference_steps))
    device = experts.high.load_device  # where the experts run (ComfyUI may differ from runtime.device)
    sample = initial_noise(seed, num_frames, height, width).to(device)

    # Constant across steps, built once per expert: the projected contexts and the cast source streams (with arm
    # groups only those of this rank's arms; the arms change only with the omegas, i.e. at the expert switch).
    prepared: dict = {}

    def inputs_for(handle: ModelHandle, dit, arms):
        if arm_groups == 1:
            needed = (tuple(contexts), tuple(combos))
        else:
            needed = (tuple(dict.fromkeys(_context_key(arm) for arm in arms)),
                      tuple(dict.fromkeys(arm.combo for arm in arms)))
        if prepared.get("key") != (handle.name, needed):
            prepared.clear()  # the other expert's projections are no longer needed
            dtype = dit.compute_dtype
            with torch.no_grad():
                embedded = {name: dit.embed_context(contexts[name], device=device) for name in needed[0]}
            streams = {name: [lat.to(device=device, dtype=dtype) for lat in combos[name][0]] for name in needed[1]}
            prepared.update(key=(handle.name, needed), inputs=(embedded, streams))
        return prepared["inputs"]

    boundary_t = experts.boundary * 1000.0
    total = len(scheduler.timesteps)
    # The largest arm's sequence (all sources + target) sizes the activations the memory manager must make room for.
    patch = 4  # (1, 2, 2) patches
    target_tokens = sample[0, 0].numel() // patch
    combo_tokens = {name: sum(lat[0, 0].numel() // patch for lat in latents) for name, (latents, _) in combos.items()}
    source_tokens = max(combo_tokens.values(), default=0)
    rows = max((ctx.shape[-2] for ctx in contexts.values()), default=512)
    if parallel.is_parallel:  # a rank given other inputs would silently desynchronise (or hang) the group
        check_identical(_run_signature(guidance, combos, contexts, omegas, num_frames, height, width,
                                       num_inference_steps, flow_shift, omega_scale, seed, use_unipc, sampler,
                                       switch_step, experts),
                        parallel.replica_group, "the sampling inputs (combos, contexts, settings)", device)

    def load(handle: ModelHandle):
        return runtime.acquire(handle, handle.module.working_memory(target_tokens + source_tokens, rows))

    current = experts.high
    dit = load(current)
    switched = False
    finite = LaggedFiniteCheck(total)
    try:
        for index, t in enumerate(scheduler.timesteps):
            runtime.check_interrupt()
            low_now = float(t) < boundary_t if switch_step is None else index >= switch_step
            if experts.low is not None and not switched and low_now:
                runtime.release(current)
                current, switched = experts.low, True
                dit = load(current)
                omegas = omegas.scaled(omega_scale)
            arms = guidance.arms(omegas)
            if arm_groups == 1:
                owners, mine = None, arms
            else:  # this rank's arm group runs its share; the other groups run theirs meanwhile
                owners = assign_arms([target_tokens + combo_tokens[arm.combo] for arm in arms], arm_groups)
                mine = [arm for arm, owner in zip(arms, owners) if owner == parallel.cfg_rank]
            context_inputs, stream_inputs = inputs_for(current, dit, mine)
            target = sample.to(dit.compute_dtype)
            timestep = torch.full((1,), float(t), device=device)
            shared_time = _embed_time(dit, timestep, device)  # one time embedding for all arms of the step
            eps = {}
            for arm in mine:
                context = context_inputs[_context_key(arm)]
                ids = list(combos[arm.combo][1]) + [0.0]
                eps[arm] = dit(stream_inputs[arm.combo] + [target], ids, timestep, context, **shared_time)
            if owners is not None:
                eps = _share_arms(eps, arms, owners, target, parallel)
            sigma = scheduler.current_sigma
            velocity = guidance.combine(eps, omegas, sample=sample, sigma=sigma)
            denoised = sample - sigma * velocity.float()  # the x0 estimate, what ComfyUI previews
            sample = scheduler.step(velocity, sample)
            finite.push(sample, index, current.name)  # raises for the step before, read only now
            runtime.progress("sample", index + 1, total, latent=denoised)
            if on_step is not None:
                on_step(index, total, sample)
        finite.finish()  # the last step's flag: a NaN latent is never returned
    finally:
        runtime.release(current)
    return sample.float().cpu()


def _embed_time(dit, timestep: torch.Tensor, device) -> dict:
    """forward's `embedded_time` keyword for this step, or none where the DiT embeds it itself: an FSDP-sharded
    expert gathers its root weights only inside forward, and other modules may not offer embed_time."""
    embed = getattr(dit, "embed_time", None)
    if embed is None or is_sharded(dit):
        return {}
    with torch.no_grad():
        return {"embedded_time": embed(timestep, device=device)}


class LaggedFiniteCheck:
    """Stops sampling at the first step whose latents are not finite, without a host-device sync per step.

    Each step queues a one-element finite flag (copied to pinned host memory without blocking, on CUDA) and the
    host reads the previous step's flag only after the current step is queued: the device never idles waiting on
    the host, and the error still names the step that went non-finite. `finish` reads the last step's flag, so a
    NaN latent is never returned (a step's progress / on_step callback may see its latent before its check).
    """

    def __init__(self, total: int):
        self.total = total
        self._pending = None  # (host flag, ready event or None, step index, expert name)

    def push(self, sample: torch.Tensor, index: int, expert: str) -> None:
        flag = torch.isfinite(sample).all()
        event = None
        if flag.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flag = host
        previous, self._pending = self._pending, (flag, event, index, expert)
        self._read(previous)

    def finish(self) -> None:
        previous, self._pending = self._pending, None
        self._read(previous)

    def _read(self, pending) -> None:
        if pending is None:
            return
        flag, event, index, expert = pending
        if event is not None:
            event.synchronize()  # waits for that step only; the step queued after it keeps the device busy
        if not bool(flag):
            raise BerniniError(
                f"sampling step {index + 1}/{self.total} ({expert}) produced non-finite latents (NaN or inf): "
                "the expert's weights hold NaN/inf (a corrupt or wrongly converted checkpoint: re-download "
                "it), a source or LATENT input is broken, or a guidance weight is extreme. Nothing was written.")


def _context_key(arm) -> str:
    """The contexts key of an arm: `text` for Bernini-R arms, `context` for full-Bernini arms."""
    return getattr(arm, "text", None) or arm.context


def _share_arms(eps: dict, arms: list, owners: list, target: torch.Tensor, parallel: ParallelState) -> dict:
    """Every arm's output on every rank of the cfg group, in arm order: each is broadcast from the rank of its
    owner group that has this rank's Ulysses rank (every rank of a Ulysses group holds the whole output). An arm's
    output has the target's shape and dtype, so receivers allocate it without a header."""
    shared = {}
    for arm, owner in zip(arms, owners):
        if owner == parallel.cfg_rank:
            out = eps.pop(arm)
            if out.shape != target.shape or out.dtype != target.dtype:
                raise BerniniError(f"guidance arm {arm}: the DiT returned {list(out.shape)} {out.dtype}, expected the "
                                   f"target's {list(target.shape)} {target.dtype}.")
            out = out.contiguous()
        else:
            out = torch.empty_like(target, memory_format=torch.contiguous_format)
        shared[arm] = broadcast_into(out, parallel.cfg_ranks[owner], parallel.cfg_group)
    return shared


def _run_signature(guidance, combos, contexts, omegas, *settings_and_experts) -> dict:
    """What every rank of a replica must agree on before sampling: the arms, every stream's and context's shape,
    dtype and source ids, the omegas and the settings (values of tensors are not compared)."""
    *settings, experts = settings_and_experts
    return {
        "guidance": [type(guidance).__name__, getattr(guidance, "mode", None), [str(a) for a in guidance.arms(omegas)]],
        "combos": {name: [[[list(lat.shape), str(lat.dtype)] for lat in latents], [float(i) for i in ids]]
                   for name, (latents, ids) in combos.items()},
        "contexts": {name: [list(ctx.shape), str(ctx.dtype)] for name, ctx in contexts.items()},
        "omegas": [omegas.vid, omegas.img, omegas.txt, omegas.tgt],
        "settings": [repr(value) for value in settings],
        "experts": [experts.boundary, experts.low is not None],
    }


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
    parallel: Optional[ParallelState] = None,
    sampler: Optional[str] = None,
    switch_step: Optional[int] = None,
) -> torch.Tensor:
    """Bernini-R sampling (`GEN_Wanx22.sample`): contexts = positive / negative UMT5 features padded to 512.
    `parallel`, `sampler`, `switch_step`: see `denoise`."""
    check_geometry(height, width)
    thresholds = (norm_threshold,) if isinstance(norm_threshold, (int, float)) else tuple(norm_threshold)
    guidance = RendererGuidance(guidance_mode, APGConfig(eta=eta, momentum=momentum, norm_threshold=thresholds))
    check_scheduler(guidance, guidance_mode, use_unipc, sampler)
    combos = renderer_combos(sources, use_source_ids=use_source_ids, max_trained=max_trained_src_id,
                             interpolate=interpolate_src_id)
    contexts = {"pos": pad_context([embeds.positive]), "neg": pad_context([embeds.negative])}
    return denoise(
        experts, guidance, combos, contexts, Omegas(vid=omega_vid, img=omega_img, txt=omega_txt),
        num_frames=num_frames, height=height, width=width, num_inference_steps=num_inference_steps,
        flow_shift=flow_shift, omega_scale=omega_scale, seed=seed, runtime=runtime, use_unipc=use_unipc,
        on_step=on_step, parallel=parallel, sampler=sampler, switch_step=switch_step,
    )
