"""Renderer DiT benchmark, the speed yardstick: time per forward, achieved TFLOP/s, fraction of the device's peak,
peak memory; optionally diffusers' WanTransformer3DModel side by side, compiled blocks, weight formats, block swap.

    python benchmarks/renderer.py                                   # tiny config on CPU
    python benchmarks/renderer.py --config a14b --blocks 2 --preset 480p,720p --sources 0,1 --device cuda \\
        --formats bf16,fp8 --compile --diffusers --block_swap 0,10,20 --markdown /tmp/perf.md --json /tmp/perf.json
    python benchmarks/renderer.py --formats bf16,fp8,q8_0,q4_k              # weight formats side by side

`--blocks K` builds only K blocks of the configuration (random weights: speed does not depend on them) and scales
to all L blocks: the forward without any block (patch embedding, output head) is timed on its own as t0, and a
full forward is t0 + (t_K - t0)·L/K. FLOPs are always those of the whole L-block model; peak memory is measured
with K blocks and extrapolated by the (L-K) missing blocks' weight bytes. Every table says when it is scaled.

The FLOP count of one forward follows docs/wan_qwen.md §5.1 (per block, L video tokens, T text rows,
D model dim, F FFN dim, multiply-add = 2 FLOPs): linear 2L(6D² + 2DF) + 4TD², self-attention 4L²D,
cross-attention 4LTD, times the number of blocks. A denoising step runs one forward per guidance arm
(`--arms`: 2 for v2v_apg/t2v_apg, 3 for r2v_apg, 4 for rv2v). The fraction of peak is against the device's dense
bf16 tensor-core datasheet rate (fp8 rows too, whose datasheet rate is twice that).

`--preset 480p,720p` sets 480x832 / 720x1280 at 81 frames; `--sources 0,1` times single-stream (t2v) and one
source stream of the target's size (v2v: twice the tokens). `--compile` adds rows with every DiT block compiled
(bernini_core.acceleration.compile, regional); the first call's extra time is reported as compile time.

`--diffusers` times diffusers' WanTransformer3DModel with the same dimensions, the same K blocks and the same
weights (bf16, fp32 islands as diffusers keeps them) on the same shape, eager and (with --compile) compiled, and
states its output's relative error against ours (same weights, same inputs: a check that the two compute the same
function). diffusers takes one latent stream: for v2v it gets one stream of 2T latent frames, the same token count
and FLOPs (Bernini's two-stream RoPE layout itself is not expressible in diffusers, so no error is stated there).

`--formats` adds a table of the weight formats users load (issue 11): bf16 (and fp16/fp32), fp8 e4m3fn "scaled"
(`fp8`: `torch._scaled_mm` where the GPU has it, decided by quant.prepare_fp8_matmul; `fp8_dequant`: kept fp8,
dequantised per layer) and GGUF Q8_0 / Q4_K (packed bytes, dequantised per layer in torch): resident weight bytes
and time per forward. GGUF blocks are random bytes with small finite scales (a GGUF layer's speed does not depend
on its values); Linear layers whose input size is not a multiple of the type's block stay float, as in real files.

`--block_swap 0,10,20` adds a table per N blocks kept on the host (bernini_core.acceleration.block_swap): device
weight bytes (memory_plan) and time per forward. With K = L every N is measured; with K < L the K-block model is
timed with no block and with all K blocks swapped, and N of L is t0 + (L-N)·t_resident + N·t_swapped (per-block
times), device weights nonblock + (L-N) blocks + min(N, 2) staging blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bernini_core.renderer.config import WAN21_1_3B, WAN22_A14B, DiTConfig  # noqa: E402
from bernini_core.gguf.dequant import QUANT_TYPES  # noqa: E402
from bernini_core.gguf.layers import GGUFLinear, gguf_ops  # noqa: E402
from bernini_core.acceleration.compile import compile_blocks  # noqa: E402
from bernini_core.quant import E4M3_MAX, Fp8ScaledLinear, fp8_ops, prepare_fp8_matmul  # noqa: E402
from bernini_core.renderer.attention import resolve_attention  # noqa: E402
from bernini_core.renderer.transformer import BerniniDiT, cast_dit_  # noqa: E402
from bernini_core.runtime import resolve_device, resolve_dtype  # noqa: E402
from bernini_core.tiny import TINY_DIT  # noqa: E402

# Dense bf16 tensor-core peaks (vendor datasheets), TFLOP/s; checked in this order against the device name.
GPU_PEAKS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
             ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("RTX 4090", 165.2), ("RTX 5090", 209.5))
PRESETS = {"480p": (480, 832, 81), "720p": (720, 1280, 81)}
GGUF_FORMATS = {"q8_0": 8, "q4_k": 12}  # GGML type codes
FLOAT_FORMATS = ("bf16", "fp16", "fp32")
FORMATS = FLOAT_FORMATS + ("fp8", "fp8_dequant") + tuple(GGUF_FORMATS)
TIMESTEP = 900.0


def load_config(name: str) -> DiTConfig:
    if name == "tiny":
        return DiTConfig.from_dict(TINY_DIT)
    if name == "a14b":
        return WAN22_A14B
    if name == "1.3b":
        return WAN21_1_3B
    return DiTConfig.from_dict(json.loads(Path(name).read_text()))


def forward_flops(cfg: DiTConfig, tokens: int, text_rows: int) -> float:
    d, f = cfg.inner_dim, cfg.ffn_dim
    linear = 2 * tokens * (6 * d * d + 2 * d * f) + 4 * text_rows * d * d
    self_attn = 4 * tokens * tokens * d
    cross = 4 * tokens * text_rows * d
    return cfg.num_layers * (linear + self_attn + cross)


def scaled_time(t_blocks: float, t_none: float, blocks: int, layers: int) -> float:
    """Time of an L-block forward from a K-block one: the block part scales by L/K, the rest (t_none) does not."""
    return t_none + (t_blocks - t_none) * layers / blocks


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:.3f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def gpu_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in GPU_PEAKS if key in name), None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------------------- shapes
@dataclasses.dataclass(frozen=True)
class Case:
    """One input shape: a target video of `frames` x `height` x `width` plus `sources` streams of its size."""

    label: str
    height: int
    width: int
    frames: int
    sources: int
    text_rows: int

    @property
    def latent(self) -> tuple[int, int, int]:
        return (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8

    def tokens(self, cfg: DiTConfig) -> int:
        t, h, w = self.latent
        pt, ph, pw = cfg.patch_size
        return (self.sources + 1) * (t // pt) * (h // ph) * (w // pw)

    @property
    def name(self) -> str:
        return f"{self.label} {'t2v' if self.sources == 0 else f'{self.sources} source(s)'}"


def parse_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: expected a comma list of integers, got {text!r}")
    if not values or any(v < 0 for v in values):
        raise SystemExit(f"{flag}: expected non-negative integers, got {text!r}")
    return values


def cases_from(args) -> list[Case]:
    sources = parse_ints(args.sources, "--sources")
    if args.preset:
        names = [p.strip().lower() for p in args.preset.split(",") if p.strip()]
        unknown = [p for p in names if p not in PRESETS]
        if unknown:
            raise SystemExit(f"--preset: unknown {unknown}; choose from {', '.join(PRESETS)}")
        shapes = [(name, *PRESETS[name]) for name in names]
    else:
        shapes = [(f"{args.height}x{args.width}", args.height, args.width, args.frames)]
    return [Case(f"{label} {frames}f", h, w, frames, s, args.text_rows) for label, h, w, frames in shapes
            for s in sources]


def case_inputs(cfg: DiTConfig, case: Case, device, dtype, seed: int = 0) -> dict:
    """Random latent / context of `case` (drawn on the CPU: every model sees the same numbers)."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, cfg.in_channels, *case.latent, generator=generator).to(device)
    context = torch.randn(1, case.text_rows, cfg.text_dim, generator=generator).to(device=device, dtype=dtype)
    return {"streams": [latent.clone() for _ in range(case.sources)] + [latent],
            "ids": [float(i + 1) for i in range(case.sources)] + [0.0],
            "timestep": torch.tensor([TIMESTEP], device=device), "context": context}


# ---------------------------------------------------------------------------------------------------- models
def build_model(cfg: DiTConfig, fmt: str, device: torch.device, dtype: torch.dtype, fp32_islands: bool) -> BerniniDiT:
    """A random DiT whose Linear weights are held in `fmt`; activations in `dtype` (fp8 / GGUF) or `fmt` itself."""
    fp8 = fmt in ("fp8", "fp8_dequant")
    ops = fp8_ops(fp8_matmul=fmt == "fp8") if fp8 else gguf_ops() if fmt in GGUF_FORMATS else None
    compute = resolve_dtype(fmt) if fmt in FLOAT_FORMATS else dtype
    model = BerniniDiT(cfg, ops=ops, device=device, dtype=torch.float32 if device.type == "cpu" else compute)
    cast_dit_(model, compute, keep_fp32_islands=fp32_islands)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, Fp8ScaledLinear):
                scale = (layer.weight.float().abs().amax() / E4M3_MAX).clamp(min=1e-12)
                layer.weight = torch.nn.Parameter((layer.weight.float() / scale).to(torch.float8_e4m3fn),
                                                  requires_grad=False)
                layer.scale_weight.fill_(scale)
            elif isinstance(layer, GGUFLinear) and fmt in GGUF_FORMATS:
                _pack_random_(layer, GGUF_FORMATS[fmt], device)
    if ops is not None:
        model.compute_dtype = compute
    if fp8:  # each fp8 layer's kernel (scaled_mm or dequantise) decided in eager, as the loader does
        model.fp8_kernels = prepare_fp8_matmul(model, device, compute)
    return model.eval().requires_grad_(False)


def _pack_random_(layer: GGUFLinear, code: int, device: torch.device) -> None:
    qt = QUANT_TYPES[code]
    if layer.in_features % qt.block_size:
        return  # stays float, as a GGUF file keeps such tensors
    blocks = layer.out_features * layer.in_features // qt.block_size
    packed = torch.randint(0, 256, (blocks, qt.type_size), dtype=torch.uint8, device=device)
    scales = torch.tensor([0.01, 0.001], dtype=torch.float16).view(torch.uint8).to(device)  # d (and dmin) fields
    packed[:, :4] = scales if qt.name.endswith("_K") else scales[:2].repeat(2)
    layer.expect_packed(code, (layer.out_features, layer.in_features // qt.block_size * qt.type_size))
    layer.weight = torch.nn.Parameter(packed.reshape(layer.out_features, -1), requires_grad=False)


def build_diffusers(cfg: DiTConfig, device: torch.device, dtype: torch.dtype, fp32_islands: bool, state=None):
    """diffusers' WanTransformer3DModel with `cfg`'s dimensions (random, or `state`: our state dict, same keys)."""
    from diffusers import WanTransformer3DModel

    config = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}
    with torch.device(device):
        model = WanTransformer3DModel.from_config(config)
    # parameters only (its fp32 RoPE buffers stay fp32); diffusers' _keep_in_fp32_modules are our fp32 islands' names
    cast_dit_(model, dtype, keep_fp32_islands=fp32_islands)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def compile_model(model, impl: str, backend: str, mode: str | None) -> str:
    """Compile every transformer block in place (regional); returns how."""
    if impl == "bernini":
        compile_blocks(model, backend=backend, mode=mode)
        return "compile_blocks"
    if impl == "diffusers" and hasattr(model, "compile_repeated_blocks") and getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks(backend=backend, mode=mode)
        return "compile_repeated_blocks"
    for block in model.blocks:
        block.compile(backend=backend, mode=mode)
    return "nn.Module.compile per block"


@contextlib.contextmanager
def without_blocks(model):
    """The model with an empty block list: what a forward costs besides its blocks."""
    blocks = model.blocks
    model.blocks = nn.ModuleList()
    try:
        yield model
    finally:
        model.blocks = blocks


# ---------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, warmup: int, repeats: int) -> dict:
    """Wall times of `fn()` (synchronised): first call (compilation shows here), median and min of the repeats."""
    times, first = [], None
    with torch.inference_mode():
        for i in range(max(warmup, 0) + max(repeats, 1)):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            elapsed = time.perf_counter() - start
            first = elapsed if first is None else first
            if i >= warmup:
                times.append(elapsed)
    return {"first": first, "times": times, "median": statistics.median(times), "min": min(times)}


def time_forwards(model, inputs, device, warmup: int, repeats: int) -> list[float]:
    return time_calls(lambda: model(*inputs), device, warmup, repeats)["times"]


def bernini_call(model, inputs: dict):
    context = model.embed_context(inputs["context"])  # once per run in the sampler, not per forward

    def call():
        return model(inputs["streams"], inputs["ids"], inputs["timestep"], context)

    return call


def diffusers_call(model, cfg: DiTConfig, case: Case, inputs: dict):
    latent = inputs["streams"][-1]
    if case.sources:  # one stream of (sources + 1)·T latent frames: the same tokens and FLOPs as Bernini's streams
        latent = torch.cat(inputs["streams"], dim=2)
    latent = latent.to(inputs["context"].dtype)  # diffusers does not cast its input (ours casts to its dtype)

    def call():
        return model(hidden_states=latent, timestep=inputs["timestep"], encoder_hidden_states=inputs["context"],
                     return_dict=False)[0]

    return call


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


# ---------------------------------------------------------------------------------------------------- the runs
class Bench:
    """One benchmark run's settings and collected rows."""

    def __init__(self, args, log=print):
        self.args, self.log = args, log
        self.cfg_full = load_config(args.config)
        layers = self.cfg_full.num_layers
        self.blocks = layers if not args.blocks else args.blocks
        if not 1 <= self.blocks <= layers:
            raise SystemExit(f"--blocks: choose 1..{layers} (the config's layers), got {args.blocks}")
        self.cfg = dataclasses.replace(self.cfg_full, num_layers=self.blocks)
        self.device, self.dtype = resolve_device(args.device), resolve_dtype(args.dtype)
        self.peak = args.peak_tflops or gpu_peak_tflops(self.device)
        self.cases = cases_from(args)
        self.rows: list[dict] = []
        self.reference: dict = {}  # case name -> our bf16 output, for the diffusers comparison
        self.state = None  # our float model's weights, for diffusers (same function, same numbers)
        self.deadline = None  # time.monotonic() after which the remaining rows are skipped (gpu_checks' budget)
        self.compile_reserve = 45.0  # seconds a compiled row needs before the deadline (a compile per shape)

    @property
    def scaled(self) -> bool:
        return self.blocks < self.cfg_full.num_layers

    def measure(self, model, call, case: Case, compiled: bool = False) -> dict:
        """Time `call` (a K-block forward), scale it to L blocks; compiled: the first call compiles (not timed)."""
        args, device = self.args, self.device
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        timing = time_calls(call, device, max(args.warmup, 1) if compiled else args.warmup, args.repeats)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        t0 = None
        if self.scaled:
            with without_blocks(model):
                t0 = time_calls(call, device, min(args.warmup, 1), args.repeats)["median"]
        full = scaled_time(timing["median"], t0, self.blocks, self.cfg_full.num_layers) if self.scaled \
            else timing["median"]
        flops = forward_flops(self.cfg_full, case.tokens(self.cfg), case.text_rows)
        missing = self.cfg_full.num_layers - self.blocks
        block_bytes = weight_bytes(model.blocks[0])
        return {
            "ms_forward": full * 1e3, "ms_measured": timing["median"] * 1e3, "ms_min": timing["min"] * 1e3,
            "ms_no_blocks": None if t0 is None else t0 * 1e3, "first_call_s": timing["first"],
            "tflops": flops / full / 1e12, "flops": flops,
            "peak_fraction": flops / full / 1e12 / self.peak if self.peak else None,
            "peak_gib": None if peak is None else peak / 2**30,
            "peak_full_gib": None if peak is None else (peak + missing * block_bytes) / 2**30,
            "weights_gib": (weight_bytes(model) + missing * block_bytes) / 2**30,
        }

    def row(self, case: Case, impl: str, fmt: str, mode: str, **values) -> dict:
        row = {"case": case.name, "shape": f"{case.frames}x{case.height}x{case.width}", "sources": case.sources,
               "tokens": case.tokens(self.cfg), "impl": impl, "format": fmt, "mode": mode, "note": ""}
        row.update(values)
        self.rows.append(row)
        self.log(f"  {case.name:<22} {impl:<9} {fmt:<11} {mode:<9} " + (
            f"{row['ms_forward']:10.2f} ms/forward" if row.get("ms_forward") is not None else row["note"]))
        return row

    def out_of_time(self, mode: str) -> bool:
        reserve = self.compile_reserve if mode == "compiled" else 0.0
        return self.deadline is not None and time.monotonic() + reserve > self.deadline

    def skip_all(self, impl: str, fmt: str, modes, cases) -> bool:
        """Rows "skipped" for every case and mode when none can start in time (no model is built then)."""
        if not all(self.out_of_time(mode) for mode in modes):
            return False
        for mode in modes:
            for case in cases or self.cases:
                self.row(case, impl, fmt, mode, ms_forward=None, note="skipped: time budget spent")
        return True

    def _guarded(self, case, impl, fmt, mode, fn):
        if self.out_of_time(mode):
            return self.row(case, impl, fmt, mode, ms_forward=None, note="skipped: time budget spent")
        try:
            return fn()
        except Exception as error:  # one failing variant must not lose the others (OOM, missing kernel, ...)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if self.args.strict:
                raise
            return self.row(case, impl, fmt, mode, ms_forward=None, note=f"failed: {type(error).__name__}: "
                            f"{str(error).splitlines()[0][:160] if str(error) else ''}")

    def modes(self, modes) -> list[str]:
        return list(modes) if modes is not None else ["eager"] + (["compiled"] if self.args.compile else [])

    def run_bernini(self, fmt: str, modes=None, cases=None) -> None:
        """Rows of our DiT holding its weights in `fmt`, per case (default all) and mode ("eager", "compiled")."""
        args = self.args
        if self.skip_all("bernini", fmt, self.modes(modes), cases):
            return
        torch.manual_seed(0)
        model = build_model(self.cfg, fmt, self.device, self.dtype, args.fp32_islands)
        model.set_attention_backend(args.attention)
        kernels = getattr(model, "fp8_kernels", None)
        note = f"fp8 layers: {kernels}" if kernels else ""
        packed = sum(1 for m in model.modules() if getattr(m, "bernini_quantized", False))
        if fmt in GGUF_FORMATS:
            note = f"{packed} packed layers"
        keep_reference = args.diffusers and fmt in FLOAT_FORMATS and self.state is None
        for mode in self.modes(modes):
            if mode == "compiled":
                how = self._compile(model, "bernini", fmt, cases)
                if how is None:
                    break
            for case in cases or self.cases:
                def one(case=case, mode=mode):
                    inputs = case_inputs(self.cfg, case, self.device, model.compute_dtype)
                    call = bernini_call(model, inputs)
                    values = self.measure(model, call, case, compiled=mode == "compiled")
                    extra = {}
                    if mode == "compiled":
                        extra["compile_s"] = max(values["first_call_s"] - values["ms_measured"] / 1e3, 0.0)
                        extra["note"] = f"{how}, {args.compile_backend}"
                    elif keep_reference and case.sources == 0:
                        with torch.inference_mode():
                            self.reference[case.name] = call().float().cpu()
                    return self.row(case, "bernini", fmt, mode, **values, **extra,
                                    **({} if "note" in extra else {"note": note}))
                self._guarded(case, "bernini", fmt, mode, one)
        if keep_reference:
            self.state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}

    def _compile(self, model, impl: str, fmt: str, cases) -> str | None:
        """compile_model's "how", or None after a "compile unavailable" row per case."""
        try:
            return compile_model(model, impl, self.args.compile_backend, self.args.compile_mode)
        except Exception as error:
            for case in cases or self.cases:
                self.row(case, impl, fmt, "compiled", ms_forward=None, note=f"compile unavailable: {error}")
            return None

    def run_diffusers(self, modes=None, cases=None) -> None:
        """Rows of diffusers' WanTransformer3DModel with our first float model's weights, per case and mode."""
        args = self.args
        fmt = next((f for f in self.formats if f in FLOAT_FORMATS), args.dtype)
        dtype = resolve_dtype(fmt)
        if self.skip_all("diffusers", fmt, self.modes(modes), cases):
            return
        try:
            model = build_diffusers(self.cfg, self.device, dtype, args.fp32_islands, self.state)
        except Exception as error:
            for case in cases or self.cases:
                self.row(case, "diffusers", fmt, "eager", ms_forward=None,
                         note=f"diffusers unavailable: {type(error).__name__}: {error}")
            return
        for mode in self.modes(modes):
            if mode == "compiled":
                how = self._compile(model, "diffusers", fmt, cases)
                if how is None:
                    break
            for case in cases or self.cases:
                def one(case=case, mode=mode):
                    inputs = case_inputs(self.cfg, case, self.device, dtype)
                    call = diffusers_call(model, self.cfg, case, inputs)
                    values = self.measure(model, call, case, compiled=mode == "compiled")
                    note, extra = "", {}
                    if case.sources:
                        note = f"one stream of {case.sources + 1}x{case.latent[0]} latent frames (same tokens)"
                    elif mode == "eager" and case.name in self.reference:
                        with torch.inference_mode():
                            extra["rel_error_vs_bernini"] = relative_error(call(), self.reference[case.name])
                    if mode == "compiled":
                        extra["compile_s"] = max(values["first_call_s"] - values["ms_measured"] / 1e3, 0.0)
                        note = ", ".join(filter(None, [note, how]))
                    return self.row(case, "diffusers", fmt, mode, **values, **extra, note=note)
                self._guarded(case, "diffusers", fmt, mode, one)

    def run_block_swap(self, counts: list[int]) -> list[dict]:
        """Device weight bytes and time per forward for N of L blocks on the host (see the module docstring)."""
        from bernini_core.acceleration.block_swap import disable_block_swap, enable_block_swap, memory_plan

        args, case, layers, k = self.args, self.cases[0], self.cfg_full.num_layers, self.blocks
        bad = [n for n in counts if n > layers]
        if bad:
            raise SystemExit(f"--block_swap: at most {layers} blocks (the config's layers), got {bad}")
        fmt = self.formats[0]
        torch.manual_seed(0)
        model = build_model(self.cfg, fmt, self.device, self.dtype, args.fp32_islands)
        model.set_attention_backend(args.attention)
        inputs = case_inputs(self.cfg, case, self.device, model.compute_dtype)
        call = bernini_call(model, inputs)
        reference = None

        def timed(n: int) -> tuple[float, float | None, float]:
            nonlocal reference
            enable_block_swap(model, n, self.device)
            try:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(self.device)
                timing = time_calls(call, self.device, args.warmup, args.repeats)
                peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
                with torch.inference_mode():
                    out = call().float().cpu()
            finally:
                disable_block_swap(model)
            if reference is None:
                reference = out
            return timing["median"], peak, float((out - reference).abs().max())

        rows = []
        whole = memory_plan(model, k)  # all K blocks swapped: device_bytes = the non-block weights
        per_block = whole["host_bytes"] / k
        if k == layers:
            for n in counts:
                seconds, peak, diff = timed(n)
                plan = memory_plan(model, n)
                rows.append({"blocks_on_host": n, "method": "measured", "ms_forward": seconds * 1e3,
                             "device_weights_gib": plan["device_peak_bytes"] / 2**30,
                             "host_weights_gib": plan["host_bytes"] / 2**30,
                             "peak_gib": None if peak is None else peak / 2**30, "max_abs_diff_vs_no_swap": diff})
        else:
            resident, _, _ = timed(0)
            swapped, peak_all, diff = timed(k)
            with without_blocks(model), torch.inference_mode():
                t0 = time_calls(call, self.device, min(args.warmup, 1), args.repeats)["median"]
            t_res, t_swap = (resident - t0) / k, (swapped - t0) / k
            activations = None if peak_all is None else peak_all - whole["device_peak_bytes"]
            for n in counts:
                device_bytes = whole["device_bytes"] + (layers - n) * per_block + min(n, 2) * per_block
                rows.append({"blocks_on_host": n, "method": f"from {k}-block timings", "ms_forward":
                             (t0 + (layers - n) * t_res + n * t_swap) * 1e3,
                             "device_weights_gib": device_bytes / 2**30, "host_weights_gib": n * per_block / 2**30,
                             "peak_gib": None if activations is None else (device_bytes + activations) / 2**30,
                             "max_abs_diff_vs_no_swap": diff,
                             "ms_block_resident": t_res * 1e3, "ms_block_swapped": t_swap * 1e3})
        return rows

    @property
    def formats(self) -> list[str]:
        names = [f.strip().lower() for f in (self.args.formats or self.args.dtype).split(",") if f.strip()]
        unknown = [f for f in names if f not in FORMATS]
        if unknown:
            raise SystemExit(f"--formats: unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
        return names


# ---------------------------------------------------------------------------------------------------- output
def render_table(header: tuple, rows: list) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


def print_table(header: tuple, rows: list) -> None:
    print(render_table(header, rows))


def _fmt(value, spec: str, empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def _gib(value) -> str:
    return "-" if value is None else format(value, ".2f" if value >= 0.1 else ".2g")


def yardstick_table(bench: Bench) -> str:
    header = ("shape", "streams", "tokens", "impl", "format", "mode", "ms / forward", "TFLOP/s", "% of peak",
              "peak GiB", "compile s", "rel. err vs ours", "note")
    rows = []
    for r in bench.rows:
        rows.append((r["shape"], r["sources"] + 1, f"{r['tokens']:,}", r["impl"], r["format"], r["mode"],
                     _fmt(r.get("ms_forward"), ".1f"),
                     _fmt(r.get("tflops"), ".3g" if (r.get("tflops") or 0) < 10 else ".1f"),
                     _fmt(None if r.get("peak_fraction") is None else 100 * r["peak_fraction"], ".1f"),
                     _gib(r.get("peak_full_gib" if bench.scaled else "peak_gib")),
                     _fmt(r.get("compile_s"), ".1f"), _fmt(r.get("rel_error_vs_bernini"), ".2e"), r["note"]))
    return render_table(header, rows)


def formats_table(bench: Bench) -> str:
    first = bench.cases[0].name
    rows, base = [], None
    for r in bench.rows:
        if r["case"] != first or r["impl"] != "bernini" or r["mode"] != "eager" or r.get("ms_forward") is None:
            continue
        base = base or r["ms_forward"]
        rows.append((r["format"], f"{r['weights_gib'] * 1024:,.1f} MiB", f"{r['ms_forward']:.2f}",
                     f"{r['ms_forward'] / base:.2f}x", r["note"]))
    return render_table(("format", "resident weights", "ms / forward (median)", "vs first", "note"), rows)


def block_swap_table(rows: list[dict]) -> str:
    return render_table(
        ("blocks on host", "method", "ms / forward", "device weights GiB", "host weights GiB", "peak GiB",
         "max abs diff vs no swap"),
        [(r["blocks_on_host"], r["method"], f"{r['ms_forward']:.1f}", _gib(r["device_weights_gib"]),
          _gib(r["host_weights_gib"]), _gib(r["peak_gib"]), f"{r['max_abs_diff_vs_no_swap']:.3g}")
         for r in rows])


def summary_rows(bench: Bench, row: dict, model_params: int) -> list[tuple]:
    args, cfg, case = bench.args, bench.cfg_full, bench.cases[0]
    device = bench.device
    if device.type == "cuda":
        memory = f"{row['peak_gib']:.2f} GiB (GPU, allocated)"
        if bench.scaled:
            memory += f"; {row['peak_full_gib']:.2f} GiB with all {cfg.num_layers} blocks"
    else:
        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"
    fwd = row["ms_forward"]
    timing = f"{fwd:.2f} ms  (min {row['ms_min']:.2f} ms, {args.repeats} runs)"
    if bench.scaled:
        timing = (f"{fwd:.2f} ms  (scaled: {bench.blocks} of {cfg.num_layers} blocks measured {row['ms_measured']:.2f}"
                  f" ms, without blocks {row['ms_no_blocks']:.2f} ms)")
    peak = bench.peak
    return [
        ("config", f"{args.config}: dim {cfg.inner_dim}, {cfg.num_layers} layers"
                   + (f" ({bench.blocks} built)" if bench.scaled else "") + f", {model_params / 1e6:.1f}M params"
                   + (" built" if bench.scaled else "")),
        ("device / dtype / attention", f"{device} ({device_name(device)}) / {row['format']} / {row['attention']}"),
        ("video", f"{case.frames} frames {case.height}x{case.width}, {case.sources} source stream(s)"),
        ("tokens (self-attention)", f"{row['tokens']:,}"),
        ("FLOPs per forward", _si(row["flops"], "FLOP")),
        ("time per forward (median)", timing),
        ("time per step", f"{fwd * args.arms:.2f} ms  ({args.arms} guidance arms)"),
        ("achieved", _si(row["tflops"] * 1e12, "FLOP/s")),
        ("fraction of peak", f"{row['peak_fraction']:.1%} of {peak:.0f} TFLOP/s" if peak
         else "n/a (no GPU peak known)"),
        ("peak memory", memory),
    ]


def header_notes(bench: Bench) -> list[str]:
    cfg = bench.cfg_full
    notes = [f"device: {device_name(bench.device)}; torch {torch.__version__}; "
             f"{datetime.datetime.now().astimezone().isoformat(timespec='minutes')}",
             f"config {bench.args.config}: dim {cfg.inner_dim}, {cfg.num_layers} layers, heads "
             f"{cfg.num_attention_heads}x{cfg.attention_head_dim}, FFN {cfg.ffn_dim}; {bench.args.text_rows} text rows"]
    if bench.scaled:
        notes.append(f"SCALED: {bench.blocks} of {cfg.num_layers} blocks built and timed; ms / forward = t0 + "
                     f"(t_{bench.blocks} - t0)·{cfg.num_layers}/{bench.blocks} with t0 the forward without blocks; "
                     f"peak GiB adds the {cfg.num_layers - bench.blocks} missing blocks' weights")
    notes.append("% of peak: of the dense bf16 datasheet rate " + (f"({bench.peak:.0f} TFLOP/s)" if bench.peak
                                                                   else "(unknown for this device)"))
    return notes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="tiny | a14b | 1.3b | path to a transformer config.json")
    p.add_argument("--blocks", type=int, default=0, help="build only K blocks and scale to the config's layers")
    p.add_argument("--preset", default="", help=f"comma list of {', '.join(PRESETS)} (81 frames); else the sizes")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--sources", default="0", help="comma list: source streams of the target's size (v2v: 1)")
    p.add_argument("--arms", type=int, default=2, help="forwards per denoising step (guidance arms)")
    p.add_argument("--text_rows", type=int, default=512)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--fp32_islands", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--attention", default="auto")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--formats", default="", help=f"comma list out of {', '.join(FORMATS)}: a weight-format table")
    p.add_argument("--compile", action="store_true", help="also time every block compiled (regional)")
    p.add_argument("--compile_backend", default="inductor")
    p.add_argument("--compile_mode", default=None)
    p.add_argument("--diffusers", action="store_true", help="diffusers' WanTransformer3DModel side by side")
    p.add_argument("--block_swap", default="", help="comma list of N blocks on the host: a block-swap table")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's peak (default: datasheet table)")
    p.add_argument("--strict", action="store_true", help="raise instead of reporting a failed variant")
    p.add_argument("--markdown", default="", help="write the tables to this markdown file")
    p.add_argument("--json", default="", help="write all measurements to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return run(parse_args(argv))


def run(args, log=None) -> dict:
    bench = Bench(args, log=log or (lambda message: print(message, file=sys.stderr, flush=True)))
    formats = bench.formats
    for fmt in formats:
        bench.run_bernini(fmt)
    if args.diffusers:
        bench.run_diffusers()
    first = next((r for r in bench.rows if r["impl"] == "bernini" and r.get("ms_forward") is not None), None)
    sections, report = [], {"notes": header_notes(bench), "rows": bench.rows}
    if first is not None:
        first["attention"] = resolve_attention(args.attention, bench.device, resolve_dtype(first["format"]) if
                                               first["format"] in FLOAT_FORMATS else bench.dtype).name
        params = sum(t.numel() for t in BerniniDiT(bench.cfg, device="meta").parameters())
        summary = summary_rows(bench, first, params)
        report["summary"] = dict(summary)
        sections.append(("Summary", render_table(("quantity", "value"), summary)))
    sections.append(("Yardstick", yardstick_table(bench)))
    if args.formats:
        sections.append((f"Weight formats ({bench.device}, activations {args.dtype})", formats_table(bench)))
    if args.block_swap:
        report["block_swap"] = bench.run_block_swap(parse_ints(args.block_swap, "--block_swap"))
        sections.append((f"Block swap ({bench.cases[0].name}, {formats[0]})", block_swap_table(report["block_swap"])))
    text = "\n".join(f"- {n}" for n in report["notes"]) + "\n"
    for title, table in sections:
        text += f"\n## {title}\n\n{table}\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
