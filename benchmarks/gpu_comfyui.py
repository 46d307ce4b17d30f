"""Section g of benchmarks/gpu_checks.py: ComfyUI's own low-VRAM streaming of our ComfyUI-ops layers, on the GPU.

Inside ComfyUI an expert that does not fit is not block-swapped by us: ComfyUI's ModelPatcher loads what fits and
marks the other layers `comfy_cast_weights`, whose weights then travel to the GPU layer by layer during the forward
(comfy/ops.py cast_bias_weight). Our DiT is built from ComfyUI's ops (comfy_bridge.comfy_ops), so that must work on
a real GPU: this loads a real-dims A14B expert of a few blocks through our patcher (comfy_bridge.ComfyRuntime)
fully, then partially (a fraction of its bytes), and compares the outputs, times and peak memory.

ComfyUI is not on the GPU machine's image: benchmarks/gpu_wheels.sh unpacks the source this repository tests against
into .gpu_comfyui/ComfyUI and downloads comfy-aimdo (which comfy.model_patcher imports); carry both paths.
`--comfyui DIR` (or $BERNINI_COMFYUI) names another ComfyUI folder. The legacy ModelPatcher is checked (what
`--disable-dynamic-vram` / a machine without comfy-aimdo's driver uses); ComfyUI's dynamic VRAM needs its
start-up (main.py) and is not checked here.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMFYUI = ROOT / ".gpu_comfyui" / "ComfyUI"


def find_comfyui(explicit=None):
    for candidate in (explicit, os.environ.get("BERNINI_COMFYUI"), DEFAULT_COMFYUI):
        if candidate and (Path(candidate) / "comfy" / "model_patcher.py").is_file():
            return Path(candidate)
    return None


def import_comfy(root: Path, device: torch.device):
    """Import comfy.model_management and comfy.model_patcher from `root`, with ComfyUI's command line set for
    `device` (our bridge finds them in sys.modules)."""
    saved = sys.argv
    sys.argv = ["main.py"] + (["--cpu"] if device.type == "cpu" else [])
    sys.path.insert(0, str(root))
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401
        import comfy.model_patcher  # noqa: F401  (what our bridge subclasses)
    finally:
        sys.argv = saved


def section_g(ctx, bench, table, fmt, cuda_ms, comfyui=None) -> tuple[str, dict]:
    """bench: benchmarks/renderer.py; table, fmt, cuda_ms: gpu_checks.py's helpers."""
    root = find_comfyui(comfyui)
    if root is None:
        return ("skipped: no ComfyUI source (run benchmarks/gpu_wheels.sh here and carry .gpu_comfyui, or pass "
                "--comfyui DIR)"), {"skipped": True}
    device = ctx.device
    import_comfy(root, device)
    from bernini_core import comfy_bridge
    from bernini_core.renderer.transformer import BerniniDiT

    blocks = 2 if ctx.quick else 4
    cfg = dataclasses.replace(ctx.cfg, num_layers=blocks)
    torch.manual_seed(0)
    dit = BerniniDiT(cfg, ops=comfy_bridge.comfy_ops(torch.bfloat16), device="cpu", dtype=torch.bfloat16)
    with torch.no_grad():  # ComfyUI's ops skip initialisation: small random weights, as a trained model has
        generator = torch.Generator().manual_seed(1)
        for param in dit.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32).mul_(0.02))
    dit.eval().requires_grad_(False)
    handle = comfy_bridge.ComfyRuntime(str(device)).handle("dit_high", dit)
    patcher = handle.patcher
    case = bench.Case("comfy", *((64, 64, 9) if ctx.quick else bench.PRESETS["480p"]), 0, 512)
    inputs = bench.case_inputs(cfg, case, device, torch.bfloat16)
    total = patcher.model_size()
    rows, result = [], {"blocks": blocks, "tokens": case.tokens(cfg), "model_bytes": total, "rows": [],
                        "comfyui": str(root), "patcher": type(patcher).__name__}
    reference = None
    for label, budget in (("full load", None), ("partial: half the weights", total // 2),
                          ("partial: a tenth", total // 10)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        if budget is None:
            patcher.load(device, full_load=True)
        else:
            patcher.load(device, lowvram_model_memory=budget)
        load_s = time.perf_counter() - started
        streamed = sum(1 for m in dit.modules() if getattr(m, "comfy_cast_weights", False))
        try:
            call = bench.bernini_call(dit, inputs)
            with torch.inference_mode():
                out = call()
                ms = cuda_ms(call, device, 3)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            on_device = patcher.loaded_size()
        finally:
            patcher.unpatch_model(patcher.offload_device)
        reference = out if reference is None else reference
        diff = float((out.float() - reference.float()).abs().max())
        row = {"load": label, "budget_bytes": budget, "loaded_bytes": on_device, "streamed_layers": streamed,
               "load_s": load_s, "ms": ms, "peak_gib": peak, "equal_to_full_load": bool(torch.equal(out, reference)),
               "max_abs_diff": diff, "finite": bool(torch.isfinite(out).all())}
        result["rows"].append(row)
        rows.append((label, f"{on_device / 2**30:.2f}", streamed, fmt(ms, ".1f"), fmt(peak, ".2f"),
                     row["equal_to_full_load"], fmt(diff)))
    text = (f"ComfyUI at {root} ({result['patcher']}); {blocks}-block A14B expert on ComfyUI's ops, "
            f"{total / 2**30:.2f} GiB of weights, {case.tokens(cfg):,} tokens, bf16\n\n"
            + table(("load", "GiB on the GPU", "streamed layers", "ms / forward", "peak GiB", "bit-equal to full",
                     "max abs diff"), rows))
    return text, result

