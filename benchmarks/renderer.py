"""Renderer DiT benchmark: time per forward and per denoising step, peak memory, FLOPs, fraction of peak.

    python benchmarks/renderer.py                                   # tiny config on CPU
    python benchmarks/renderer.py --config a14b --height 480 --width 832 --frames 81 --device cuda --sources 1
    python benchmarks/renderer.py --formats bf16,fp8,q8_0,q4_k              # weight formats side by side

The FLOP count of one forward follows docs/wan_qwen.md §5.1 (per block, L video tokens, T text rows,
D model dim, F FFN dim, multiply-add = 2 FLOPs): linear 2L(6D² + 2DF) + 4TD², self-attention 4L²D,
cross-attention 4LTD, times the number of blocks. A denoising step runs one forward per guidance arm
(`--arms`: 2 for v2v_apg/t2v_apg, 3 for r2v_apg, 4 for rv2v). Weights are random: speed does not depend on them.

`--formats` adds a table of the weight formats users load (issue 11): bf16 (and fp16/fp32), fp8 e4m3fn "scaled"
(kept fp8, dequantised per layer, or `torch._scaled_mm` where the GPU has it) and GGUF Q8_0 / Q4_K (packed bytes,
dequantised per layer in torch): resident weight bytes and time per forward on the current device. GGUF blocks are
random bytes with small finite scales (a GGUF layer's speed does not depend on its values); Linear layers whose
input size is not a multiple of the type's block stay float, as in real GGUF files.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bernini_core.renderer.config import WAN21_1_3B, WAN22_A14B, DiTConfig  # noqa: E402
from bernini_core.gguf.dequant import QUANT_TYPES  # noqa: E402
from bernini_core.gguf.layers import GGUFLinear, gguf_ops  # noqa: E402
from bernini_core.quant import E4M3_MAX, Fp8ScaledLinear, fp8_ops  # noqa: E402
from bernini_core.renderer.transformer import BerniniDiT, cast_dit_  # noqa: E402
from bernini_core.runtime import resolve_device, resolve_dtype  # noqa: E402
from bernini_core.tiny import TINY_DIT  # noqa: E402

# Dense bf16 tensor-core peaks (vendor datasheets), TFLOP/s.
GPU_PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2, "RTX 5090": 209.5}


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


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:.3f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def gpu_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in GPU_PEAKS.items():
        if key in name:
            return value
    return None


GGUF_FORMATS = {"q8_0": 8, "q4_k": 12}  # GGML type codes
FLOAT_FORMATS = ("bf16", "fp16", "fp32")
FORMATS = FLOAT_FORMATS + ("fp8",) + tuple(GGUF_FORMATS)


def build_model(cfg: DiTConfig, fmt: str, device: torch.device, dtype: torch.dtype, fp32_islands: bool) -> BerniniDiT:
    """A random DiT whose Linear weights are held in `fmt`; activations in `dtype` (fp8 / GGUF) or `fmt` itself."""
    ops = fp8_ops() if fmt == "fp8" else gguf_ops() if fmt in GGUF_FORMATS else None
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


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def time_forwards(model, inputs, device, warmup: int, repeats: int) -> list[float]:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            model(*inputs)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def print_table(header: tuple, rows: list) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")


def format_table(args, cfg, device, dtype, inputs) -> None:
    formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise SystemExit(f"--formats: unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
    rows, first = [], None
    for fmt in formats:
        torch.manual_seed(0)
        model = build_model(cfg, fmt, device, dtype, args.fp32_islands)
        model.set_attention_backend(args.attention)
        packed = sum(1 for m in model.modules() if getattr(m, "bernini_quantized", False))
        times = time_forwards(model, inputs, device, args.warmup, args.repeats)
        fwd = statistics.median(times)
        first = first or fwd
        size = weight_bytes(model)
        note = f"{packed} packed layers" if fmt in GGUF_FORMATS else ""
        rows.append((fmt, f"{size / 2**20:,.1f} MiB", f"{fwd * 1e3:.2f}", f"{fwd / first:.2f}x", note))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print(f"## Weight formats ({device}, activations {args.dtype})")
    print()
    print_table(("format", "resident weights", "ms / forward (median)", "vs first", "note"), rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="tiny | a14b | 1.3b | path to a transformer config.json")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--sources", type=int, default=0, help="source video streams of the target's size (v2v: 1)")
    p.add_argument("--arms", type=int, default=2, help="forwards per denoising step (guidance arms)")
    p.add_argument("--text_rows", type=int, default=512)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--fp32_islands", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--attention", default="auto")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--formats", default="", help=f"comma list out of {', '.join(FORMATS)}: a weight-format table")
    args = p.parse_args(argv)

    cfg = load_config(args.config)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    torch.manual_seed(0)
    model = BerniniDiT(cfg, device=device, dtype=torch.float32 if device.type == "cpu" else dtype)
    cast_dit_(model, dtype, keep_fp32_islands=args.fp32_islands)
    model.set_attention_backend(args.attention)
    model.eval().requires_grad_(False)

    lat_t, lat_h, lat_w = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
    latent = torch.randn(1, cfg.in_channels, lat_t, lat_h, lat_w, device=device)
    streams = [latent.clone() for _ in range(args.sources)] + [latent]
    ids = [float(i + 1) for i in range(args.sources)] + [0.0]
    context = torch.randn(1, args.text_rows, cfg.text_dim, device=device, dtype=dtype)
    timestep = torch.tensor([900.0], device=device)
    tokens = (args.sources + 1) * lat_t * (lat_h // 2) * (lat_w // 2)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    inputs = (streams, ids, timestep, context)
    times = time_forwards(model, inputs, device, args.warmup, args.repeats)

    flops = forward_flops(cfg, tokens, args.text_rows)
    fwd = statistics.median(times)
    peak = gpu_peak_tflops(device)
    if device.type == "cuda":
        memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (GPU, allocated)"
    else:
        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"
    params = sum(p.numel() for p in model.parameters())
    rows = [
        ("config", f"{args.config}: dim {cfg.inner_dim}, {cfg.num_layers} layers, {params / 1e6:.1f}M params"),
        ("device / dtype / attention", f"{device} / {args.dtype} / {model.attention_backend}"),
        ("video", f"{args.frames} frames {args.height}x{args.width}, {args.sources} source stream(s)"),
        ("tokens (self-attention)", f"{tokens:,}"),
        ("FLOPs per forward", _si(flops, "FLOP")),
        ("time per forward (median)", f"{fwd * 1e3:.2f} ms  (min {min(times) * 1e3:.2f} ms, {len(times)} runs)"),
        ("time per step", f"{fwd * args.arms * 1e3:.2f} ms  ({args.arms} guidance arms)"),
        ("achieved", _si(flops / fwd, "FLOP/s")),
        ("fraction of peak", f"{flops / fwd / 1e12 / peak:.1%} of {peak:.0f} TFLOP/s" if peak else "n/a (no GPU peak known)"),
        ("peak memory", memory),
    ]
    print_table(("quantity", "value"), rows)
    if args.formats:
        del model
        format_table(args, cfg, device, dtype, inputs)


if __name__ == "__main__":
    main()
