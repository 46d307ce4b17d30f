"""Renderer DiT benchmark: time per forward and per denoising step, peak memory, FLOPs, fraction of peak.

    python benchmarks/renderer.py                                   # tiny config on CPU
    python benchmarks/renderer.py --config a14b --height 480 --width 832 --frames 81 --device cuda --sources 1

The FLOP count of one forward follows docs/wan_qwen.md §5.1 (per block, L video tokens, T text rows,
D model dim, F FFN dim, multiply-add = 2 FLOPs): linear 2L(6D² + 2DF) + 4TD², self-attention 4L²D,
cross-attention 4LTD, times the number of blocks. A denoising step runs one forward per guidance arm
(`--arms`: 2 for v2v_apg/t2v_apg, 3 for r2v_apg, 4 for rv2v). Weights are random: speed does not depend on them.
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

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.repeats):
            sync()
            start = time.perf_counter()
            model(streams, ids, timestep, context)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)

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
    width = max(len(k) for k, _ in rows)
    print("| " + "quantity".ljust(width) + " | value |")
    print("|" + "-" * (width + 2) + "|-------|")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
