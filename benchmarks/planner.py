"""Planner benchmark: one whole full-Bernini run, timed stage by stage, with the planner looked at closely.

    python benchmarks/planner.py                                     # tiny random v1 checkpoint, t2v, CPU
    python benchmarks/planner.py --config /models/Bernini-Diffusers --task t2v --device cuda
    python benchmarks/planner.py --config /models/Bernini-Diffusers-v2 --task v2v --video clip.mp4

Stages (wall clock, `torch.cuda.synchronize` around each on a GPU): sources (VAE encode + the Qwen ViT tower),
UMT5, planning (MaskGIT, docs/official_behaviour.md §3.5), rendering (the dual-expert DiT), decode. Each MLLM forward is
timed by wrapping `PlannerModel.hidden` (3 per planning step that reveals tokens — steps revealing nothing run
no forward, docs/official_behaviour.md §7.2 — plus 2 final ones, §3.5), the ViT-decoder sampling by wrapping
`ViTDecoder.sample`, and each planning step by `plan_semantics(on_step=...)`.

FLOPs of one MLLM forward (L tokens of one branch): per decoder layer run, q/k/v/o projections and the SwiGLU
MLP cost 2L(2·D·H·d + 2·D·K·d + 3·D·F) and attention over the full L×L square (an additive mask, no causal
skipping) 4L²·H·d (D hidden, H / K query / key-value heads of width d, F MLP width, multiply-add = 2 FLOPs).
`PlannerModel.hidden` stops at the input of the last layer (hidden_states[-2], docs/official_behaviour.md §3.1), so
num_layers − 1 layers run and no LM head. With all 28 layers, and the embedding and LM head counted as matmuls too, it
is the "2 · 7.6e9 FLOP per token" (twice every parameter) of Qwen2.5-VL-7B prefill in docs/wan_qwen.md §5.1.

Without --config the weights are random and tiny: the run proves the instrumentation, its shares say nothing
about the real model. Model loading is timed but left out of the shares. On a CPU shared with other work, run
with OMP_NUM_THREADS=1: the planner's many tiny ops slow down 10-100x when OpenMP threads wait for busy cores.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bernini_core.errors import BerniniError  # noqa: E402
from bernini_core.pipeline import vae_tiling  # noqa: E402
from bernini_core.pipeline_full import FullPipeline  # noqa: E402
from bernini_core.runtime import resolve_device, resolve_dtype  # noqa: E402
from bernini_core.tasks import TASK_NAMES, get_task  # noqa: E402

# Dense bf16 tensor-core peaks (vendor datasheets), TFLOP/s — the same table as benchmarks/renderer.py.
GPU_PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2, "RTX 5090": 209.5}

# Qwen2.5-VL-7B text model (mllm/config.json of Bernini-Diffusers; docs/wan_qwen.md §4).
QWEN25_VL_7B_TEXT = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                     "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064}

# The tiny default run: small enough for ~15 s on 2 CPU cores, big enough that planning reveals tokens on
# most steps (224x224 -> a 16x16 ViT patch grid -> 64 target tokens per temporal patch).
TINY_DEFAULTS = {"num_frames": 9, "height": 224, "width": 224, "num_inference_steps": 8}
STAGES = ("sources", "umt5", "planning", "rendering", "decode")
STAGE_LABELS = {"sources": "sources (VAE encode + ViT tower)", "umt5": "UMT5 text encoder",
                "planning": "planning (MaskGIT + final forwards)", "rendering": "rendering (DiT denoising)",
                "decode": "VAE decode"}


# ---------------------------------------------------------------------------------------------- FLOPs
def _field(config, name: str, default=None):
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def mllm_forward_flops(text_config, tokens: int, layers: Optional[int] = None) -> float:
    """FLOPs of ``layers`` Qwen decoder layers on ``tokens`` tokens (default: every layer but the last, what
    ``PlannerModel.hidden`` runs). ``text_config``: a Qwen2.5-VL text config object or dict."""
    d = _field(text_config, "hidden_size")
    heads, kv_heads = _field(text_config, "num_attention_heads"), _field(text_config, "num_key_value_heads")
    head_dim = _field(text_config, "head_dim") or d // heads
    ffn = _field(text_config, "intermediate_size")
    if layers is None:
        layers = _field(text_config, "num_hidden_layers") - 1
    linear = 2 * tokens * (2 * d * heads * head_dim + 2 * d * kv_heads * head_dim + 3 * d * ffn)
    attention = 4 * tokens * tokens * heads * head_dim
    return float(layers * (linear + attention))


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def gpu_peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in GPU_PEAKS.items() if key in name), None)


# ---------------------------------------------------------------------------------------------- probes
class Measurements:
    """What one run records (a plain class: the test loads this script without registering it as a module,
    which dataclasses with postponed annotations cannot handle)."""

    def __init__(self):
        self.stage_seconds: dict = {}
        self.stage_peak_bytes: dict = {}  # CUDA only
        self.load_seconds = 0.0
        self.forwards: list = []  # (start, seconds, branch name, tokens) per MLLM forward
        self.vit_tower_seconds: list = []
        self.vit_decoder_seconds: list = []
        self.step_ends: list = []  # (perf_counter, forwards so far) at each on_step
        self.denoise_steps = 0


class Probe:
    """Wall-clock timing with a device sync on both sides, and the instance-level wrappers that count calls."""

    def __init__(self, device: torch.device):
        self.device = device
        self.m = Measurements()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.m.stage_seconds[name] = time.perf_counter() - start
        if self.device.type == "cuda":
            self.m.stage_peak_bytes[name] = torch.cuda.max_memory_allocated(self.device)

    def _timed(self, function, record):
        def wrapper(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = function(*args, **kwargs)
            self.sync()
            record(start, time.perf_counter() - start, args)
            return out
        return wrapper

    @contextlib.contextmanager
    def wrap_planner(self, planner):
        """Shadow ``hidden`` / ``vision_features`` / ``vit_decoder.sample`` on the instances (the engine is
        untouched; the class methods come back when the attributes are deleted)."""
        m = self.m
        planner.hidden = self._timed(planner.hidden, lambda t, s, a: m.forwards.append((t, s, a[1].name, a[1].length)))
        planner.vision_features = self._timed(planner.vision_features, lambda t, s, a: m.vit_tower_seconds.append(s))
        decoder = planner.vit_decoder
        decoder.sample = self._timed(decoder.sample, lambda t, s, a: m.vit_decoder_seconds.append(s))
        try:
            yield
        finally:
            del planner.hidden, planner.vision_features, decoder.sample

    def on_plan_step(self, step: int, total: int) -> None:
        self.sync()
        self.m.step_ends.append((time.perf_counter(), len(self.m.forwards)))

    def on_denoise_step(self, *args) -> None:
        self.m.denoise_steps += 1


# ---------------------------------------------------------------------------------------------- inputs
def synthetic_video(frames: int, height: int, width: int) -> np.ndarray:
    """uint8 [F, H, W, 3]: a moving gradient (content does not change the cost)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([np.stack([(x + 8 * f) % 256, (y + 4 * f) % 256, (x + y) % 256], -1)
                     for f in range(frames)]).astype(np.uint8)


def source_kwargs(task: str, video_path: Optional[str], frames: int, height: int, width: int) -> dict:
    """The sources the task needs: --video, else a synthetic clip; one synthetic image where the task needs one."""
    spec = get_task(task)
    kwargs = {}
    if video_path:  # passed as given: a task that takes no video rejects it with the pipeline's message
        kwargs["video"] = video_path
    elif spec.needs_video:
        kwargs["video"] = synthetic_video(frames, height, width)
    if spec.image == "required":
        kwargs["image"] = synthetic_video(1, height, width)[0]
    elif spec.images == "required":
        kwargs["images"] = [synthetic_video(1, height, width)[0]]
    return kwargs


# ---------------------------------------------------------------------------------------------- run
def run(pipe: FullPipeline, probe: Probe, task: str, prompt: str, sources_in: dict, settings: dict) -> dict:
    """The stages of ``FullPipeline.__call__`` in its order, each timed; returns what the tables need."""
    tiling = vae_tiling(settings)
    planner = pipe.components.planner
    with probe.wrap_planner(planner), torch.no_grad():
        with probe.stage("sources"):
            sources = pipe.prepare_sources(
                task, fps=settings["fps"], num_frames=settings["num_frames"], height=settings["height"],
                width=settings["width"], max_image_size=settings["max_image_size"],
                video_fps=settings.get("video_fps"), tiling=tiling, **sources_in)
        with probe.stage("umt5"):
            embeds = pipe.encode_prompt(task, prompt, settings["neg_prompt"], settings.get("system_prompt"))
        with probe.stage("planning"):
            plan = pipe.plan_semantics(
                sources, embeds, prompt=prompt, neg_prompt=settings["neg_prompt"], seed=settings["seed"],
                planning_step=settings["planning_step"], vit_denoising_step=settings["vit_denoising_step"],
                vit_txt_cfg=settings["vit_txt_cfg"], vit_img_cfg=settings["vit_img_cfg"], on_step=probe.on_plan_step)
        with probe.stage("rendering"):
            latents = pipe.sample(plan, sources, settings, on_step=probe.on_denoise_step)
        with probe.stage("decode"):
            frames = pipe.decode(latents, tiling=tiling)
    return {"sources": sources, "plan": plan, "frames": frames}


# ---------------------------------------------------------------------------------------------- summary
def planning_steps(m: Measurements) -> tuple[list, int]:
    """Seconds of each planning step that ran forwards — from its first forward to its on_step, so step 1 leaves
    out the branch tokenisation before it — and the number of steps that revealed nothing (no forward,
    docs/official_behaviour.md §7.2)."""
    seconds, skipped, done = [], 0, 0
    for end, count in m.step_ends:
        if count == done:
            skipped += 1
            continue
        seconds.append(end - m.forwards[done][0])
        done = count
    return seconds, skipped


def summarize(m: Measurements, text_config) -> dict:
    loop_count = m.step_ends[-1][1] if m.step_ends else 0
    step_seconds, skipped = planning_steps(m)
    branch_tokens = {}
    for _, _, name, tokens in m.forwards:
        branch_tokens.setdefault(name, tokens)
    forward_seconds = [s for _, s, _, _ in m.forwards]
    forward_flops = [mllm_forward_flops(text_config, tokens) for _, _, _, tokens in m.forwards]
    total = sum(m.stage_seconds[s] for s in STAGES)
    planner_seconds = m.stage_seconds["planning"] + sum(m.vit_tower_seconds)
    return {
        "branch_tokens": branch_tokens,
        "forwards": len(m.forwards),
        "loop_forwards": loop_count,
        "final_forwards": len(m.forwards) - loop_count,
        "planning_steps": len(m.step_ends),
        "active_steps": len(step_seconds),
        "skipped_steps": skipped,
        "step_seconds": step_seconds,
        "forward_seconds": forward_seconds,
        "branch_seconds": {name: [s for _, s, n, _ in m.forwards if n == name] for name in branch_tokens},
        "flops_per_branch": {name: mllm_forward_flops(text_config, n) for name, n in branch_tokens.items()},
        "mllm_flops": sum(forward_flops),
        "vit_tower_seconds": sum(m.vit_tower_seconds),
        "vit_decoder_seconds": m.vit_decoder_seconds,
        "planning_other_seconds": m.stage_seconds["planning"] - sum(forward_seconds) - sum(m.vit_decoder_seconds),
        "stage_seconds": dict(m.stage_seconds),
        "total_seconds": total,
        "planner_share": planner_seconds / total,
        "renderer_share": m.stage_seconds["rendering"] / total,
        "denoise_steps": m.denoise_steps,
        "peak_bytes": max(m.stage_peak_bytes.values()) if m.stage_peak_bytes else None,
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _spread(values: list) -> str:
    if not values:
        return "n/a"
    return f"{_ms(statistics.fmean(values))}  (min {_ms(min(values))}, max {_ms(max(values))}, {len(values)} calls)"


def print_table(header: tuple, rows: list) -> None:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header) - 1)]
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths + [0])) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|-------|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths + [0])) + " |")


def report(s: dict, m: Measurements, *, describe: dict, device: torch.device) -> None:
    peak = gpu_peak_tflops(device)
    forwards_time = sum(s["forward_seconds"])
    achieved = s["mllm_flops"] / forwards_time if forwards_time else 0.0
    step_flops = sum(s["flops_per_branch"].get(n, 0.0) for n in ("cond", "imgcond", "uncond"))
    if s["peak_bytes"] is not None:
        memory = f"{s['peak_bytes'] / 2**30:.2f} GiB (GPU, allocated; per stage below)"
    else:
        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"
    tokens = s["branch_tokens"]
    rows = [(key, value) for key, value in describe.items()] + [
        ("sequence length cond / imgcond / uncond",
         " / ".join(f"{tokens.get(n, 0):,}" for n in ("cond", "imgcond", "uncond")) + " tokens"),
        ("MLLM forwards", f"{s['forwards']} = {s['loop_forwards']} in {s['active_steps']} planning steps + "
                          f"{s['final_forwards']} final ({s['skipped_steps']} of {s['planning_steps']} steps "
                          f"revealed nothing)"),
        ("FLOPs per forward cond / imgcond / uncond",
         " / ".join(_si(s["flops_per_branch"].get(n, 0.0), "FLOP") for n in ("cond", "imgcond", "uncond"))),
        ("FLOPs per planning step (3 forwards)", _si(step_flops, "FLOP")),
        ("time per MLLM forward (mean)", _spread(s["forward_seconds"])),
        ("time per forward cond / imgcond / uncond",
         " / ".join(_ms(statistics.fmean(s["branch_seconds"][n])) if s["branch_seconds"].get(n) else "n/a"
                    for n in ("cond", "imgcond", "uncond"))),
        ("MLLM achieved", _si(achieved, "FLOP/s")),
        ("MLLM fraction of peak", f"{achieved / 1e12 / peak:.1%} of {peak:.0f} TFLOP/s" if peak
         else "n/a (no GPU peak known)"),
        ("time per planning step (mean)", _spread(s["step_seconds"])),
        ("ViT decoder sampling per step", _spread(s["vit_decoder_seconds"])),
        ("planning outside forwards + decoder",
         _ms(s["planning_other_seconds"]) + " (branch encoding, embeddings, context joins)"),
        ("ViT tower (in sources)", _ms(s["vit_tower_seconds"])),
        ("time per denoising step", _ms(s["stage_seconds"]["rendering"] / max(1, s["denoise_steps"]))
         + f"  ({s['denoise_steps']} steps)"),
        ("planner vs renderer share", f"{s['planner_share']:.1%} planner (ViT tower + planning) / "
                                      f"{s['renderer_share']:.1%} renderer (denoising)"),
        ("model loading (not in shares)", f"{m.load_seconds:.2f} s"),
        ("peak memory", memory),
    ]
    print_table(("quantity", "value"), rows)
    print()
    stage_rows = []
    for name in STAGES:
        seconds = s["stage_seconds"][name]
        gpu = m.stage_peak_bytes.get(name)
        stage_rows.append((STAGE_LABELS[name], f"{seconds:.3f} s", f"{seconds / s['total_seconds']:.1%}",
                           f"{gpu / 2**30:.2f} GiB" if gpu is not None else "n/a (CPU)"))
    stage_rows.append(("total", f"{s['total_seconds']:.3f} s", "100.0%", memory.split(" (")[0]))
    print_table(("stage", "wall time", "share", "peak GPU memory"), stage_rows)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="a Bernini-Diffusers(-v2) folder (default: a tiny random v1)")
    p.add_argument("--tiny_version", default="v1", choices=("v1", "v2"), help="release layout of the tiny checkpoint")
    p.add_argument("--task", default="t2v", choices=TASK_NAMES)
    p.add_argument("--prompt", default="A red fox runs through fresh snow at dawn, cinematic lighting.")
    p.add_argument("--video", default=None, help="source video path (default: a synthetic clip if the task needs one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="bf16 | fp16 | fp32 | auto (bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--attention", default="auto")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True,
                   help="one big module on the GPU at a time (needed for 7B + 2 x 14B on 80 GB); moves are timed")
    p.add_argument("--planning_step", type=int, default=None,
                   help="default: the task preset (docs/official_behaviour.md §5.1, §5.2)")
    p.add_argument("--vit_denoising_step", type=int, default=None)
    p.add_argument("--num_inference_steps", type=int, default=None)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32"))
    overrides = {"num_frames": args.frames, "height": args.height, "width": args.width,
                 "planning_step": args.planning_step, "vit_denoising_step": args.vit_denoising_step,
                 "num_inference_steps": args.num_inference_steps}
    probe = Probe(device)
    with tempfile.TemporaryDirectory(prefix="bernini-planner-bench-") as tmp:  # kept until the run ends
        config = args.config
        if config is None:
            from bernini_core.tiny_full import make_tiny_bernini

            name = "Bernini-Diffusers-v2" if args.tiny_version == "v2" else "Bernini-Diffusers"
            config = make_tiny_bernini(Path(tmp) / name, version=args.tiny_version, seed=0)
            tiny = dict(TINY_DEFAULTS)
            # a real clip fixes the size (height = width = 0 in the video-editing presets,
            # docs/official_behaviour.md §4.8)
            if args.video:
                tiny.pop("height"), tiny.pop("width")
            overrides = {k: tiny.get(k) if v is None else v for k, v in overrides.items()}
        probe.sync()
        start = time.perf_counter()
        pipe = FullPipeline.from_pretrained(config, device=device, dtype=dtype, attention=args.attention,
                                            offload=args.offload)
        probe.m.load_seconds = time.perf_counter() - start
        settings = pipe.resolve(args.task, overrides)
        # a synthetic source takes the requested size, else the preset's (0 = "follow the source": 480x848)
        height, width = (settings["height"] or 480), (settings["width"] or 848)
        sources_in = source_kwargs(args.task, args.video, settings["num_frames"], height, width)
        out = run(pipe, probe, args.task, args.prompt, sources_in, settings)

    sources = out["sources"]
    summary = summarize(probe.m, pipe.components.planner.language_model.config)
    summary["target_tokens"] = sources.target.n_tokens
    summary["source_tokens"] = [item.n_tokens for item in sources.visual_items]
    qwen = pipe.components.planner.language_model.config
    params = sum(t.numel() for t in pipe.components.planner.mllm.parameters())
    out_frames = tuple(out["frames"].shape[:3])
    describe = {
        "config": f"{args.config or 'tiny random ' + args.tiny_version} (Bernini {pipe.version})",
        "planner Qwen": f"hidden {qwen.hidden_size}, {qwen.num_hidden_layers} layers ({qwen.num_hidden_layers - 1} "
                        f"run), {params / 1e6:.1f}M params (with ViT tower)",
        "device / dtype": f"{device} / {str(dtype).replace('torch.', '')}, offload {'on' if args.offload else 'off'}",
        "task / guidance": f"{args.task} / {settings['guidance_mode']}, output {out_frames[0]} frame(s) "
                           f"{out_frames[1]}x{out_frames[2]}",
        "planning_step / vit_denoising_step": f"{settings['planning_step']} / {settings['vit_denoising_step']}",
        "target tokens / source ViT tokens": f"{summary['target_tokens']:,} / "
                                             f"{', '.join(f'{n:,}' for n in summary['source_tokens']) or 'none'}",
    }
    report(summary, probe.m, describe=describe, device=device)
    return summary


if __name__ == "__main__":
    try:
        main()
    except BerniniError as exc:
        sys.exit(f"error: {exc}")
