"""A lower bound of the working memory a render needs, checked against what the machine has before any work.

A size typed wrong (100000×100000, 10**6 frames) otherwise reaches the allocator deep inside a stage and dies
with an allocator error after minutes of loading and encoding. The bound counts only what must exist at once —
the latents, the DiT activations of the longest sequence (the engine's own `working_memory`), the decoded
frames — never the weights, so a size it refuses can never run; sizes it lets through may still run out of
memory once the weights are counted (the offload policy and ComfyUI decide that).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .errors import BerniniError

GIB = 1024**3
LATENT_CHANNELS = 16
# Latent-sized tensors alive at once while sampling: the sample, one ε per guidance arm (up to 6), the combined
# velocity and the x0 estimate.
LATENT_COPIES = 9


def host_memory_bytes() -> Optional[int]:
    """Physical memory of this machine, or None where it cannot be told."""
    try:
        import psutil  # ComfyUI ships it; not a dependency of ours

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def device_memory_bytes(device: torch.device) -> Optional[int]:
    """Total memory of an accelerator; None for the CPU (its memory is the host's) or where unknown."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


def render_estimate(num_frames: int, height: int, width: int, *, dit=None, source_tokens: int = 0,
                    context_rows: int = 512) -> tuple[int, int]:
    """(bytes on the device that samples and decodes, bytes on the host) a render of this size needs at least."""
    latent_frames = (max(int(num_frames), 1) - 1) // 4 + 1
    latent_px = (height // 8) * (width // 8)
    latents = LATENT_CHANNELS * latent_frames * latent_px * 4 * LATENT_COPIES
    activations = dit.working_memory(latent_frames * latent_px // 4 + source_tokens, context_rows) if dit else 0
    pixels = int(num_frames) * height * width * 3
    decoded = pixels * 4  # the decoder's float32 output
    # host: the float32 frames handed back, the uint8 copy written to disk
    return max(latents + activations, decoded), pixels * 4 + pixels


def check_fits(num_frames: int, height: int, width: int, device, *, dit=None, source_tokens: int = 0,
               context_rows: int = 512, force: bool = False) -> None:
    """Refuse, with the estimate, a render whose working memory alone exceeds the device's or the host's."""
    if force:
        return
    device = torch.device(device)
    on_device, on_host = render_estimate(num_frames, height, width, dit=dit, source_tokens=source_tokens,
                                         context_rows=context_rows)
    host = host_memory_bytes()
    accelerator = device_memory_bytes(device)
    if accelerator is None:  # the CPU samples and decodes in host memory too
        checks = [(on_device + on_host, host, "this machine's memory")]
    else:
        checks = [(on_device, accelerator, f"{device} memory"), (on_host, host, "this machine's memory")]
    for needed, available, where in checks:
        if available is not None and needed > available:
            frames = f"{num_frames} frame{'s' if num_frames != 1 else ''}"
            raise BerniniError(
                f"a {width}x{height} output of {frames} needs at least {needed / GIB:,.1f} GiB of working memory "
                f"(weights not counted) but {where} is {available / GIB:,.1f} GiB; lower height/width/num_frames "
                "(the official 480x848, 81 frames), or pass force=True (--force) to try anyway.")
