"""The GPU checks of issue 15 in one command: kernels verified against references, the sampler free of host syncs,
and the renderer yardstick tables. Prints every result and writes them under --out ($OUT by default): the files
gpu_checks (every section) and renderer (section f), each as .md (tables) and .json (all numbers).

    bash benchmarks/gpu_wheels.sh                          # here, with network: diffusers + gguf wheels
    pip install --no-deps --no-index .gpu_wheels/*.whl; python3 benchmarks/gpu_checks.py --out $OUT   # GPU machine

Sections, run in this order (cheap and decisive first; each catches its own failure, and once the time budget
--budget is spent the remaining ones are skipped with a note):
  e  no host-device sync in the sampler's step loop: torch.cuda.set_sync_debug_mode around denoise steps of a
     real-dims one-block expert, plus a torch.profiler count of synchronising calls inside the loop
  a  attention: every backend that imports (and SDPA's own kernels) against SDPA on the same bf16 inputs at the real
     head layout [1, L, 40, 128], max / mean error, ms, and what "auto" picks
  b  fp8-scaled Linear via torch._scaled_mm against bf16 compute on A14B-sized weights, and a whole block
  c  compiled block == eager (max error), compile time, graph breaks
  d  block swap equal to no swap, time and VRAM per N blocks on the host
  g  ComfyUI's low-VRAM streaming (legacy ModelPatcher partial load) of a real-dims expert on our ComfyUI-ops
     layers: full vs partial loads, equality, time, peak memory (benchmarks/gpu_comfyui.py)
  f  the yardstick (benchmarks/renderer.py): A14B, --blocks 2 scaled to 40, 480p / 720p, t2v / one source,
     bf16 / fp8 / compiled, diffusers side by side
`--quick` runs every section on tiny shapes (a dry run on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import renderer as bench  # noqa: E402  (benchmarks/renderer.py)
from bernini_core.renderer.config import WAN22_A14B  # noqa: E402

ORDER = "eabcdgf"
MD = ".md"  # the result files' suffix (kept apart: a bare Markdown file name in this repository is a citation)
TITLES = {"e": "No host-device sync in the step loop", "a": "Attention backends vs SDPA",
          "b": "fp8 scaled_mm vs bf16 compute", "c": "Compiled block vs eager", "d": "Block swap vs no swap",
          "f": "Renderer yardstick (A14B, 2 blocks scaled to 40)",
          "g": "ComfyUI's low-VRAM streaming of our layers"}
# Rough seconds a section needs on an H100; a section starts only with this much budget left.
NEEDS = {"e": 20, "a": 20, "b": 15, "c": 60, "d": 30, "f": 60, "g": 30}


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


@dataclasses.dataclass
class Context:
    device: torch.device
    quick: bool
    budget: Budget
    out: Path
    compile_backend: str
    comfyui: Optional[str] = None

    @property
    def cfg(self):
        """The real A14B dims, or the tiny config for a --quick dry run."""
        return bench.load_config("tiny") if self.quick else WAN22_A14B

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16


# ------------------------------------------------------------------------------------------------ helpers
def cuda_ms(fn, device, repeats: int = 5, warmup: int = 1) -> float:
    """Median ms of fn() (CUDA events on a GPU, synchronised wall clock elsewhere)."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - t) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (out.float() - ref.float()).abs()
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "rel_l2": float((out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)),
            "finite": bool(torch.isfinite(out).all())}


def table(header, rows) -> str:
    return bench.render_table(tuple(header), [tuple(r) for r in rows])


def fmt(value, spec=".3g") -> str:
    return "-" if value is None else format(value, spec)


def real_tokens(quick: bool, preset: str = "480p") -> int:
    """Video tokens of an 81-frame preset (21 latent frames x H/16 x W/16), or a small count for --quick."""
    if quick:
        return 256
    height, width, frames = bench.PRESETS[preset]
    return ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)


def one_block_model(ctx: Context, blocks: int = 1, fmt_name: str = "bf16"):
    cfg = dataclasses.replace(ctx.cfg, num_layers=blocks)
    torch.manual_seed(0)
    return bench.build_model(cfg, fmt_name, ctx.device, ctx.dtype, True), cfg


# ------------------------------------------------------------------------------------------------ e: syncs
def section_e(ctx: Context) -> tuple[str, dict]:
    """denoise on a real-dims one-block expert: warm-up run, then sync debug mode "warn" (every sync recorded with
    the Python line), "error" from the second step to the last (any sync raises), and a profiler count."""
    from bernini_core.denoise import Experts, denoise
    from bernini_core.runtime import Runtime
    from bernini_core.sampling.guidance import Omegas, RendererGuidance

    device = ctx.device
    model, cfg = one_block_model(ctx)
    runtime = Runtime(device, offload=False)
    experts = Experts(high=runtime.handle("dit_high", model), low=None, boundary=0.0)
    generator = torch.Generator().manual_seed(1)
    contexts = {name: torch.randn(1, 512, cfg.text_dim, generator=generator).to(device, torch.bfloat16)
                for name in ("pos", "neg")}
    combos = {name: ([], []) for name in ("none", "V", "I", "VI")}
    steps = 4
    height, width, frames = (64, 64, 5) if ctx.quick else (480, 832, 17)
    marks = {}

    def run(on_step=None):
        return denoise(experts, RendererGuidance("t2v_apg"), combos, contexts, Omegas(vid=1.0, img=1.0, txt=5.0),
                       num_frames=frames, height=height, width=width, num_inference_steps=steps, flow_shift=5.0,
                       omega_scale=1.0, seed=0, runtime=runtime, on_step=on_step)

    with torch.inference_mode():
        run()  # warm-up: kernels chosen, allocator filled, fp8 / attention decided
    result = {"steps": steps, "video": f"{frames}x{height}x{width}", "arms_per_step": 2}
    lines = []
    if device.type == "cuda":
        # "warn": every synchronising call of the whole denoise, with the innermost bernini_core frame
        seen = []
        original_show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            frames_ = [f for f in traceback.extract_stack() if "bernini_core" in f.filename]
            where = f"{Path(frames_[-1].filename).name}:{frames_[-1].name}:{frames_[-1].lineno}" if frames_ else \
                f"{Path(filename).name}:{lineno}"
            seen.append({"where": where, "step": marks.get("step"), "message": str(message).splitlines()[0][:120]})

        def track(index, total, sample):
            marks["step"] = index + 1

        def first_forward(*_):
            if marks["step"] is None:
                marks["step"] = 0

        hook = model.register_forward_pre_hook(first_forward)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                marks["step"] = None  # setup until the first forward; then the step being run; `steps` after
                with torch.inference_mode():
                    run(on_step=track)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning = original_show
                hook.remove()
        in_loop = [s for s in seen if s["step"] is not None and s["step"] < steps]
        result["warn_mode_syncs"] = seen
        result["warn_mode_syncs_in_loop"] = len(in_loop)
        lines.append(f"sync debug mode 'warn' over the whole denoise: {len(seen)} synchronising call(s), "
                     f"{len(in_loop)} of them between the first forward and the end of the last step: "
                     + (", ".join(f"{s['where']} ({_phase(s['step'], steps)})" for s in seen) or "none"))

        # "error" from after step 1 to after the last step: any sync in steps 2..n raises
        def strict(index, total, sample):
            torch.cuda.set_sync_debug_mode("error" if index + 1 < total else "default")

        try:
            with torch.inference_mode():
                run(on_step=strict)
            result["error_mode"] = f"passed: steps 2..{steps} ran under set_sync_debug_mode('error')"
        except RuntimeError as error:
            result["error_mode"] = f"FAILED: {str(error).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        lines.append(f"sync debug mode 'error': {result['error_mode']}")
    else:
        lines.append("sync debug mode: CUDA only (skipped on this device); the profiler count below still runs")

    # profiler: synchronising runtime calls and device->host copies between the first forward and the last step
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    loop = {}

    def enter(*_):
        if "range" not in loop:
            loop["range"] = record_function("bernini.step_loop")
            loop["range"].__enter__()

    def leave(index, total, sample):
        if index + 1 == total and "range" in loop:
            loop.pop("range").__exit__(None, None, None)

    hook = model.register_forward_pre_hook(enter)
    try:
        with profile(activities=activities) as prof, torch.inference_mode():
            run(on_step=leave)
    finally:
        hook.remove()
    events = prof.events()
    window = next((e for e in events if e.name == "bernini.step_loop"), None)
    # CPU-side calls are counted inside / outside the loop's range; device-side copies (GPU clock) for the whole run
    names = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync",
             "cudaMemcpy", "aten::item", "aten::_local_scalar_dense", "Memcpy DtoH")
    counts = {}
    for e in events:
        key = next((n for n in names if e.name.startswith(n)), None)
        if key is None:
            continue
        label = e.name if key == "Memcpy DtoH" else key
        bucket = counts.setdefault(label, [0, 0])
        if key == "Memcpy DtoH":
            bucket[1] += 1
        elif window is not None and window.time_range.start <= e.time_range.start <= window.time_range.end:
            bucket[0] += 1
        else:
            bucket[1] += 1
    result["profiler"] = {k: {"in_loop": v[0], "outside": v[1]} for k, v in counts.items()}
    result["expected"] = (f"inside the loop {steps - 1} cudaEventSynchronize (the lagged finite checks of the "
                          f"steps before the last) and their non-blocking flag copies (cudaMemcpyAsync; Device -> "
                          "Pinned); no stream or device synchronize; one pageable DtoH copy in the whole "
                          "run (the result)")
    lines.append(table(("call", "inside the step loop", "outside the loop (Memcpy rows: whole run, device clock)"),
                       [(k, v[0], v[1]) for k, v in sorted(counts.items())] or [("none", 0, 0)]))
    lines.append(f"expected {result['expected']}. aten::item also counts reads of host tensors (the scheduler's "
                 "CPU tables, no device involved): a read of a device tensor shows as cudaStreamSynchronize.")
    return "\n\n".join(lines), result


def _phase(mark, steps: int) -> str:
    return "setup" if mark is None else "after the loop" if mark >= steps else f"step {mark + 1}"


# ------------------------------------------------------------------------------------------------ a: attention
def section_a(ctx: Context) -> tuple[str, dict]:
    import importlib

    attn = importlib.import_module("bernini_core.renderer.attention")  # the package re-exports the function

    cfg = ctx.cfg
    heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
    backends = attn.available_backends()
    try:
        auto = attn.resolve_attention("auto", ctx.device, torch.bfloat16).name
    except Exception as error:  # API not there
        auto = f"? ({error})"
    result = {"available": backends, "auto_picks": auto, "rows": []}
    rows = []
    for preset in ("480p",) if ctx.quick else ("480p", "720p"):
        tokens = real_tokens(ctx.quick, preset)
        for row in _attention_rows(attn, ctx, tokens, heads, head_dim, backends, fp32_truth=preset == "480p"):
            result["rows"].append(row)
            rows.append((f"{tokens:,}", row["backend"], fmt(row.get("max_abs")), fmt(row.get("mean_abs")),
                         fmt(row.get("rel_l2_vs_fp32")), fmt(row.get("ms"), ".2f"), fmt(row.get("tflops"), ".0f"),
                         row.get("error", "")))
    text = (f"available backends: {', '.join(backends)}; 'auto' runs: {auto}\n\n"
            + table(("tokens", "backend", "max abs err vs sdpa", "mean abs err", "rel. L2 vs fp32", "ms", "TFLOP/s",
                     "error"), rows))
    return text, result


def _attention_rows(attn, ctx: Context, tokens: int, heads: int, head_dim: int, backends, fp32_truth: bool):
    """Each backend (and on CUDA each SDPA kernel) on the same bf16 q, k, v [1, tokens, heads, head_dim]."""
    device = ctx.device
    generator = torch.Generator(device=device).manual_seed(7)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, device=device, dtype=torch.bfloat16, generator=generator)
               for _ in range(3))
    reference = attn.attention(q, k, v, backend="sdpa")
    truth = None
    candidates = [(name, (lambda name=name: attn.attention(q, k, v, backend=name))) for name in backends]
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if fp32_truth:  # the memory-efficient kernel takes fp32
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                truth = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        for label, kernel in (("sdpa:flash", SDPBackend.FLASH_ATTENTION), ("sdpa:cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("sdpa:efficient", SDPBackend.EFFICIENT_ATTENTION)):
            def run(kernel=kernel):
                with sdpa_kernel(kernel):
                    return attn.attention(q, k, v, backend="sdpa")
            candidates.append((label, run))
    flops = 4 * tokens * tokens * heads * head_dim
    rows = []
    for name, fn in candidates:
        try:
            out = fn()
            e = errors(out, reference)
            ms = cuda_ms(fn, device, repeats=3 if ctx.quick else 5)
            rows.append({"tokens": tokens, "backend": name, **e, "ms": ms, "tflops": flops / ms / 1e9,
                         "rel_l2_vs_fp32": None if truth is None else errors(out, truth)["rel_l2"]})
        except Exception as error:
            rows.append({"tokens": tokens, "backend": name, "error": f"{type(error).__name__}: {error}"[:200]})
    return rows


# ------------------------------------------------------------------------------------------------ b: fp8
def section_b(ctx: Context) -> tuple[str, dict]:
    from bernini_core.quant import E4M3_MAX, Fp8ScaledLinear, fp8_matmul_supported, prepare_fp8_matmul

    device, cfg = ctx.device, ctx.cfg
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    tokens = real_tokens(ctx.quick)
    dim, ffn = cfg.inner_dim, cfg.ffn_dim
    supported = fp8_matmul_supported(device)
    result = {"scaled_mm_supported": supported, "tokens": tokens, "linears": [], "block": None}
    rows = []
    generator = torch.Generator(device=device).manual_seed(3)
    for label, n_in, n_out in (("attn q/k/v/o", dim, dim), ("ffn up", dim, ffn), ("ffn down", ffn, dim)):
        weight = torch.randn(n_out, n_in, device=device, generator=generator) * n_in ** -0.5
        bias = torch.randn(n_out, device=device, generator=generator) * 0.01
        x = torch.randn(tokens, n_in, device=device, generator=generator).to(torch.bfloat16)
        truth = F.linear(x.float(), weight, bias)
        w_bf16 = weight.to(torch.bfloat16)
        scale = (weight.abs().amax() / E4M3_MAX).clamp(min=1e-12)
        variants = {}
        for name, use_mm in (("fp8 scaled_mm", True), ("fp8 dequantised", False)):
            layer = Fp8ScaledLinear(n_in, n_out, bias=True, device=device, dtype=torch.bfloat16, fp8_matmul=use_mm)
            with torch.no_grad():
                layer.weight = torch.nn.Parameter((weight / scale).to(torch.float8_e4m3fn), requires_grad=False)
                layer.scale_weight.fill_(float(scale))
                layer.bias.copy_(bias.to(torch.bfloat16))
            decided = prepare_fp8_matmul(layer, device, torch.bfloat16)
            variants[name] = (layer, decided)
        calls = [("bf16", lambda: F.linear(x, w_bf16, bias.to(torch.bfloat16)), None)]
        calls += [(name, (lambda layer=layer: layer(x)), decided) for name, (layer, decided) in variants.items()]
        for name, fn, decided in calls:
            with torch.no_grad():
                out = fn()
                ms = cuda_ms(fn, device, repeats=3 if ctx.quick else 10)
            e = errors(out, truth)
            flops = 2 * tokens * n_in * n_out
            row = {"layer": label, "shape": f"{tokens}x{n_in} -> {n_out}", "compute": name,
                   "rel_l2_vs_fp32": e["rel_l2"], "max_abs_vs_fp32": e["max_abs"], "ms": ms,
                   "tflops": flops / ms / 1e9, "kernels": decided}
            result["linears"].append(row)
            rows.append((label, row["shape"], name, fmt(e["rel_l2"]), fmt(e["max_abs"]), fmt(ms, ".3f"),
                         fmt(row["tflops"], ".0f"), "" if decided is None else str(decided)))
    text = (f"torch._scaled_mm usable here: {supported}; errors against an fp32 product of the same bf16 input and "
            "the unquantised weight\n\n"
            + table(("layer", "tokens x in -> out", "compute", "rel. L2 vs fp32", "max abs err", "ms", "TFLOP/s",
                     "fp8 layers"), rows))
    # whole block: our one-block DiT in bf16 vs the same weights quantised to fp8 (scaled_mm where supported)
    model, cfg1 = one_block_model(ctx)
    fp8_model = bench.build_model(cfg1, "fp8", ctx.device, ctx.dtype, True)
    with torch.no_grad():
        source = dict(model.named_parameters())
        for name, layer in fp8_model.named_modules():
            if isinstance(layer, Fp8ScaledLinear):
                w = source[f"{name}.weight"].float()
                s = (w.abs().amax() / E4M3_MAX).clamp(min=1e-12)
                layer.weight = torch.nn.Parameter((w / s).to(torch.float8_e4m3fn), requires_grad=False)
                layer.scale_weight.fill_(float(s))
                if layer.bias is not None:
                    layer.bias.copy_(source[f"{name}.bias"])
                layer._fp8_matmul_state = None  # re-decide with the new weights
        for name, param in fp8_model.named_parameters():
            if name in source and param.dtype == source[name].dtype and param.shape == source[name].shape:
                param.copy_(source[name])
    kernels = prepare_fp8_matmul(fp8_model, device, torch.bfloat16)
    case = bench.Case("block", *((64, 64, 9) if ctx.quick else bench.PRESETS["480p"]), 0, 512)
    inputs = bench.case_inputs(cfg1, case, device, torch.bfloat16)
    block_rows = []
    with torch.inference_mode():
        ref_call, fp8_call = bench.bernini_call(model, inputs), bench.bernini_call(fp8_model, inputs)
        ref, out = ref_call(), fp8_call()
        e = errors(out, ref)
        ms_ref, ms_fp8 = cuda_ms(ref_call, device, 3), cuda_ms(fp8_call, device, 3)
    result["block"] = {"tokens": case.tokens(cfg1), "kernels": kernels, **e, "ms_bf16": ms_ref, "ms_fp8": ms_fp8}
    block_rows.append((f"{case.tokens(cfg1):,}", str(kernels), fmt(e["rel_l2"]), fmt(e["max_abs"]), fmt(ms_ref, ".2f"),
                       fmt(ms_fp8, ".2f")))
    text += ("\n\nWhole forward of a one-block A14B DiT (480p, t2v), fp8 weights quantised from the bf16 ones:\n\n"
             + table(("tokens", "fp8 layers", "rel. L2 vs bf16", "max abs err", "ms bf16", "ms fp8"), block_rows))
    return text, result


# ------------------------------------------------------------------------------------------------ c: compile
def section_c(ctx: Context) -> tuple[str, dict]:
    from bernini_core.acceleration.compile import compile_blocks, explain_block

    device = ctx.device
    model, cfg = one_block_model(ctx, blocks=2)
    case = bench.Case("compile", *((64, 64, 9) if ctx.quick else bench.PRESETS["480p"]), 0, 512)
    inputs = bench.case_inputs(cfg, case, device, torch.bfloat16)
    forward_args = (inputs["streams"], inputs["ids"], inputs["timestep"], model.embed_context(inputs["context"]))
    result = {"tokens": case.tokens(cfg), "backend": ctx.compile_backend}
    with torch.inference_mode():
        call = bench.bernini_call(model, inputs)
        eager = call()
        ms_eager = cuda_ms(call, device, 3)
    try:
        result["graph_breaks"] = explain_block(model, forward_args)
    except Exception as error:
        result["graph_breaks"] = f"explain failed: {type(error).__name__}: {error}"[:200]
    torch._dynamo.reset()
    compile_blocks(model, backend=ctx.compile_backend)
    with torch.inference_mode():
        bench._sync(device)
        start = time.perf_counter()
        compiled = call()
        bench._sync(device)
        first = time.perf_counter() - start
        ms_compiled = cuda_ms(call, device, 3)
    e = errors(compiled, eager)
    result.update(e, ms_eager=ms_eager, ms_compiled=ms_compiled, compile_s=first - ms_compiled / 1e3)
    text = table(("tokens", "backend", "graph breaks", "compile s", "ms eager (2 blocks)", "ms compiled",
                  "max abs diff", "rel. L2"),
                 [(f"{case.tokens(cfg):,}", ctx.compile_backend, result["graph_breaks"],
                   fmt(result["compile_s"], ".1f"), fmt(ms_eager, ".2f"), fmt(ms_compiled, ".2f"),
                   fmt(e["max_abs"]), fmt(e["rel_l2"]))])
    return text, result


# ------------------------------------------------------------------------------------------------ d: block swap
def section_d(ctx: Context) -> tuple[str, dict]:
    from bernini_core.acceleration.block_swap import disable_block_swap, enable_block_swap, memory_plan

    device = ctx.device
    blocks = 4
    model, cfg = one_block_model(ctx, blocks=blocks)
    case = bench.Case("swap", *((64, 64, 9) if ctx.quick else bench.PRESETS["480p"]), 0, 512)
    inputs = bench.case_inputs(cfg, case, device, torch.bfloat16)
    call = bench.bernini_call(model, inputs)
    rows, result = [], {"tokens": case.tokens(cfg), "blocks": blocks, "rows": []}
    reference = None
    for n in (0, 1, 2, blocks):
        swap = enable_block_swap(model, n, device)
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            with torch.inference_mode():
                out = call()
                ms = cuda_ms(call, device, 3)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            pinned = getattr(swap, "pinned", None)
        finally:
            disable_block_swap(model)
        reference = out if reference is None else reference
        plan = memory_plan(model, n)
        diff = float((out.float() - reference.float()).abs().max())
        row = {"blocks_on_host": n, "ms": ms, "peak_gib": peak, "equal_to_no_swap": bool(torch.equal(out, reference)),
               "max_abs_diff": diff, "pinned": pinned, **{k: v for k, v in plan.items() if k.endswith("bytes")}}
        result["rows"].append(row)
        rows.append((n, fmt(ms, ".1f"), fmt(peak, ".2f"), f"{plan['device_peak_bytes'] / 2**30:.2f}",
                     f"{plan['host_bytes'] / 2**30:.2f}", row["equal_to_no_swap"], fmt(diff), pinned))
    text = (f"{blocks}-block A14B DiT, {case.tokens(cfg):,} tokens (480p t2v), bf16\n\n"
            + table(("blocks on host", "ms / forward", "peak GiB (measured)", "device weights GiB (plan)",
                     "host GiB", "bit-equal to no swap", "max abs diff", "pinned"), rows))
    return text, result


# ------------------------------------------------------------------------------------------------ f: yardstick
def section_f(ctx: Context) -> tuple[str, dict]:
    argv = ["--config", "tiny" if ctx.quick else "a14b", "--blocks", "1" if ctx.quick else "2",
            "--sources", "0,1", "--device", str(ctx.device), "--dtype", "bf16", "--formats", "bf16,fp8",
            "--diffusers", "--compile_backend", ctx.compile_backend, "--warmup", "1",
            "--repeats", "1" if ctx.quick else "3", "--markdown", str(ctx.out / ("renderer" + MD)),
            "--json", str(ctx.out / "renderer.json")]
    argv += ["--height", "64", "--width", "64", "--frames", "9"] if ctx.quick else ["--preset", "480p,720p"]
    runner = bench.Bench(bench.parse_args(argv), log=lambda m: print(m, flush=True))
    runner.deadline = time.monotonic() + max(ctx.budget.left() - 15, 0)
    # most decisive rows first: ours eager, diffusers eager, fp8; then compiled (a compile per shape), the 480p
    # single-stream headline of both before the other shapes
    first, rest = runner.cases[:1], runner.cases[1:]
    runner.run_bernini("bf16", modes=["eager"])
    runner.run_diffusers(modes=["eager"])
    runner.run_bernini("fp8", modes=["eager"])
    runner.run_bernini("bf16", modes=["compiled"], cases=first)
    runner.run_diffusers(modes=["compiled"], cases=first)
    if rest:
        runner.run_bernini("bf16", modes=["compiled"], cases=rest)
        runner.run_diffusers(modes=["compiled"], cases=rest)
    runner.run_bernini("fp8", modes=["compiled"], cases=first)
    order = {("bernini", "bf16", "eager"): 0, ("bernini", "bf16", "compiled"): 1, ("bernini", "fp8", "eager"): 2,
             ("bernini", "fp8", "compiled"): 3, ("diffusers", "bf16", "eager"): 4, ("diffusers", "bf16", "compiled"): 5}
    cases = [c.name for c in runner.cases]
    runner.rows.sort(key=lambda r: (cases.index(r["case"]), order.get((r["impl"], r["format"], r["mode"]), 9)))
    notes = bench.header_notes(runner)
    text = "\n".join(f"- {n}" for n in notes) + "\n\n" + bench.yardstick_table(runner)
    (ctx.out / ("renderer" + MD)).write_text(text + "\n", encoding="utf-8")
    (ctx.out / "renderer.json").write_text(json.dumps({"notes": notes, "rows": runner.rows}, indent=1, default=str),
                                           encoding="utf-8")
    return text, {"notes": notes, "rows": runner.rows}


def section_g(ctx: Context) -> tuple[str, dict]:
    import gpu_comfyui  # benchmarks/gpu_comfyui.py

    return gpu_comfyui.section_g(ctx, bench, table, fmt, cuda_ms, comfyui=ctx.comfyui)


SECTIONS = {"e": section_e, "a": section_a, "b": section_b, "c": section_c, "d": section_d, "f": section_f,
            "g": section_g}


# ------------------------------------------------------------------------------------------------ main
def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": sys.version.split()[0], "device": bench.device_name(device),
           "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count, cuda=torch.version.cuda)
    for name in ("diffusers", "gguf", "triton", "flash_attn", "flash_attn_interface", "sageattention"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "present")
        except Exception:
            env[name] = None
    return env


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_checks_out"), help="folder for the results")
    p.add_argument("--budget", type=float, default=420.0, help="seconds; sections not started by then are skipped")
    p.add_argument("--sections", default=ORDER, help=f"which sections, in this order (default {ORDER})")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a dry run (CPU)")
    p.add_argument("--compile_backend", default="inductor")
    p.add_argument("--comfyui", default=None, help="ComfyUI folder for section g (default: .gpu_comfyui/ComfyUI)")
    args = p.parse_args(argv)

    from bernini_core.runtime import resolve_device

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    budget = Budget(args.budget)
    ctx = Context(device=device, quick=args.quick, budget=budget, out=out, compile_backend=args.compile_backend,
                  comfyui=args.comfyui)
    report = {"environment": environment(device), "budget_s": args.budget, "sections": {}}
    markdown = [f"# GPU checks ({report['environment']['device']}, {report['environment']['date']})", "",
                "environment: " + ", ".join(f"{k} {v}" for k, v in report["environment"].items()), ""]
    print(markdown[0], flush=True)
    for key in args.sections:
        if key not in SECTIONS:
            raise SystemExit(f"--sections: unknown section {key!r}; choose from {ORDER}")
        title = f"({key}) {TITLES[key]}"
        started = time.monotonic()
        if budget.left() < NEEDS[key]:
            text, entry = f"skipped: {budget.left():.0f} s of the {args.budget:.0f} s budget left", {"skipped": True}
        else:
            try:
                text, entry = SECTIONS[key](ctx)
                entry = {"result": entry}
            except Exception as error:
                detail = traceback.format_exc()
                text = f"FAILED: {type(error).__name__}: {error}\n\n```\n{detail[-3000:]}\n```"
                entry = {"error": f"{type(error).__name__}: {error}", "traceback": detail}
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        entry["seconds"] = round(time.monotonic() - started, 1)
        report["sections"][key] = entry
        markdown += [f"## {title}  ({entry['seconds']} s)", "", text, ""]
        print(f"\n## {title}  ({entry['seconds']} s)\n\n{text}\n", flush=True)
        (out / ("gpu_checks" + MD)).write_text("\n".join(markdown), encoding="utf-8")  # after every section: a kill
        (out / "gpu_checks.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    print(f"total {time.monotonic() - budget.start:.0f} s; results in {out}/gpu_checks.md and gpu_checks.json")
    return report


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
