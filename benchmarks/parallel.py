"""Parallel engine benchmark: time per denoising step per layout (Ulysses U x guidance-arm groups C), the bytes each
collective moves, and an arithmetic model of Wan2.2-A14B on 8 GPUs.

    python benchmarks/parallel.py                      # tiny DiT on CPU (gloo): layouts 1, U2, C2, U2xC2
    python benchmarks/parallel.py --quick              # smoke run: tiny, 2 steps, layouts 1, U2, C2
    python benchmarks/parallel.py --model-only         # only the A14B arithmetic model
    python benchmarks/parallel.py --preset small --head_dim 64 --ffn 2048 --frames 17 --height 128 --width 128 \\
        --steps 4 --repeats 3                            # a moderate CPU run (a couple of minutes on 2 cores)
    python benchmarks/parallel.py --device cuda --preset a14b --layers 4 --layouts 1,U2,U4,U8,U4xC2,U2xC4 \\
        --steps 3                                        # A14B widths, 480p, one process per GPU (NCCL)

Run it as a script: the worlds' processes re-import this file.

Measured part. The same ``bernini_core.denoise.denoise`` call (random experts, random sources and contexts, seed 3)
runs once in one process and then in a torch.distributed world per layout (torch.multiprocessing "spawn", a free
local port, gloo on CPU or NCCL on CUDA; every world has a hard time limit). Layouts of one world size share one
world; the one-process run happens in rank 0 of the smallest world while the other ranks wait in a barrier. Each
step is timed with denoise's ``on_step`` (the first step, which also holds the start-of-run checks, is left out
of the median when there are more); with ``--repeats`` the layouts run again in turn and each keeps its fastest
run. On a CPU every world first measures, for one second, how much matmul throughput the host gives all its
processes at once against one alone ("host ceiling"): on a shared or hyper-threaded host that, more than the
process count, bounds the speed-up. The collectives are counted by wrapping ``torch.distributed``'s
``all_to_all_single``, ``all_gather``, ``broadcast`` (and any other it calls) in every rank; the caller names
the kind (docs/architecture.md §5.1):

* Ulysses q/k/v all-to-all (``seq_to_heads``, one call per self-attention layer: q, k and v concatenated) and
  output all-to-all (``heads_to_seq``, one per layer), then one all-gather of the output slices per forward
  (``gather_sequence``);
* the guidance arms' outputs, each broadcast over the cfg group from its owner group (``broadcast_into``);
* the start-of-run check that every rank got the same inputs (``check_identical``: one all-gather of 8 bytes).

"Bytes" are what a rank receives from the other ranks (the payload any algorithm must deliver; what the ranks
send adds up to the same over the world), as a mean over the ranks. Next to each measured count the script
prints the formula (see ``comm_formula``) and whether the two agree.

Arithmetic model (``--model-only`` prints only it). Compute per rank per step and communication per layer for
A14B (40 layers, dim 5120 = 40 heads x 128, FFN 13824; FLOPs per forward as docs/wan_qwen.md §5.1) at 480p and
720p, for the real guidance modes' arms, on 8 GPUs of an assumed throughput and link bandwidth. Steps are
modelled as compute + communication with no overlap (the engine issues its all-to-alls on the critical path).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import inspect
import json
import math
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bernini_core.parallel import ParallelConfig, ParallelState  # noqa: E402
from bernini_core.parallel.arms import arms_of_group, assign_arms  # noqa: E402
from bernini_core.renderer.config import DiTConfig  # noqa: E402
from bernini_core.sampling.guidance import RENDERER_MODES  # noqa: E402
from bernini_core.sampling.guidance_full import FULL_MODES  # noqa: E402


def _load_renderer_benchmark():
    spec = importlib.util.spec_from_file_location("_bernini_bench_renderer", Path(__file__).with_name("renderer.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


forward_flops = _load_renderer_benchmark().forward_flops  # docs/wan_qwen.md §5.1, the renderer benchmark's formula

LATENT_CHANNELS, PATCH_TOKENS = 16, 4  # (1, 2, 2) patches: a latent [16, T, h, w] is T * h/2 * w/2 tokens
PRESETS = {
    # name: DiT sizes (heads, head_dim, ffn, layers, text_dim) and video geometry (frames, height, width)
    "tiny": dict(heads=4, head_dim=8, ffn=32, layers=2, text_dim=32, frames=5, height=32, width=48),
    "small": dict(heads=8, head_dim=32, ffn=1024, layers=4, text_dim=64, frames=9, height=64, width=96),
    "a14b": dict(heads=40, head_dim=128, ffn=13824, layers=40, text_dim=4096, frames=81, height=480, width=832),
}


# ================================================================================================ arms and tokens
def stream_tokens(latent_shape) -> int:
    """Tokens of one latent stream [B, 16, T, h, w]."""
    return math.prod(latent_shape[2:]) // PATCH_TOKENS


def latent_shape(frames: int, height: int, width: int) -> tuple:
    return (1, LATENT_CHANNELS, (frames - 1) // 4 + 1, height // 8, width // 8)


def build_case(mode: str, frames: int, height: int, width: int, videos: int, images: int, text_dim: int,
               text_rows: int, device="cpu"):
    """(guidance, combos, contexts, omegas) of a run, the same in every process: ``videos`` source videos of the
    target's size and ``images`` single-frame references of the target's size, random (seeded) latents and
    contexts. On the meta device it only gives shapes (for the arithmetic model)."""
    from bernini_core.denoise import renderer_combos
    from bernini_core.renderer.rope import source_ids_for
    from bernini_core.sampling.guidance import APGConfig, Omegas, RendererGuidance
    from bernini_core.sampling.guidance_full import FULL_CONTEXTS, FullGuidance
    from bernini_core.stages import Sources

    shape = latent_shape(frames, height, width)
    image_shape = shape[:2] + (1,) + shape[3:]
    if str(device) == "meta":
        def rand(*s):
            return torch.empty(s, device="meta")
    else:
        gen = torch.Generator().manual_seed(7)

        def rand(*s):
            return torch.randn(s, generator=gen)
    video_latents = [rand(*shape) for _ in range(videos)]
    image_latents = [rand(*image_shape) for _ in range(images)]
    omegas = Omegas(vid=1.5, img=2.0, txt=3.0, tgt=0.5)
    if mode in RENDERER_MODES:
        guidance = RendererGuidance(mode, APGConfig(eta=0.5, momentum=0.5))
        sources = Sources(mode, videos=video_latents, images=image_latents)
        combos = renderer_combos(sources, use_source_ids=True, max_trained=5, interpolate=True)
        keys = ("pos", "neg")
    elif mode in FULL_MODES:
        guidance = FullGuidance(mode)

        def ids(n):
            return source_ids_for(n, max_trained=5, interpolate=True)

        combos = {"wovae": ([], []), "wimgvae": (image_latents, ids(images)), "wvidvae": (video_latents, ids(videos)),
                  "wvae": (image_latents + video_latents, ids(images + videos))}
        keys = FULL_CONTEXTS
    else:
        raise SystemExit(f"--mode {mode!r}: choose one of {', '.join(RENDERER_MODES + FULL_MODES)}")
    contexts = {key: rand(1, text_rows, text_dim) for key in keys}
    return guidance, combos, contexts, omegas


def arm_tokens(guidance, combos, omegas, target_tokens: int) -> list[int]:
    """Tokens of each DiT pass of a step, in arm order: the target plus the arm's source streams (what
    ``denoise`` balances the arm groups by)."""
    return [target_tokens + sum(stream_tokens(lat.shape) for lat in combos[arm.combo][0])
            for arm in guidance.arms(omegas)]


# ================================================================================================ formulas
def padded(tokens: int, ulysses: int) -> int:
    return -(-tokens // ulysses) * ulysses


def rank_forward_flops(cfg: DiTConfig, tokens: int, text_rows: int, ulysses: int) -> float:
    """FLOPs one rank of a Ulysses group of ``ulysses`` spends on one forward of ``tokens`` tokens: the per-token
    parts on its padded slice, self-attention over all real tokens for its H/U heads, the context's k/v
    projections whole on every rank. ulysses=1 is ``forward_flops``."""
    d, f = cfg.inner_dim, cfg.ffn_dim
    shard = padded(tokens, ulysses) // ulysses
    per_layer = (2 * shard * (6 * d * d + 2 * d * f) + 4 * text_rows * d * d + 4 * tokens * tokens * d / ulysses
                 + 4 * shard * text_rows * d)
    return cfg.num_layers * per_layer


def a2a_layer_bytes(tokens: int, dim: int, ulysses: int, elem: int) -> float:
    """Bytes one rank receives (and sends) per self-attention layer: q, k, v (one all-to-all of 3 tensors) and the
    output (one all-to-all), 4 tensors of B * L/U * D elements each, of which (U-1)/U comes from other ranks."""
    return 4 * padded(tokens, ulysses) * dim * elem * (ulysses - 1) / ulysses ** 2


def gather_bytes(tokens: int, dim: int, ulysses: int, elem: int) -> float:
    """Bytes one rank receives in the all-gather of the output slices after the blocks: U-1 slices of L/U x D."""
    return padded(tokens, ulysses) * dim * elem * (ulysses - 1) / ulysses


def comm_formula(arms: list[int], ulysses: int, cfg_groups: int, cfg: DiTConfig, elem: int, eps_bytes: int) -> dict:
    """{kind: (calls per rank per step, bytes received per rank per step)}, means over the ranks of the world, for a
    step with arms of ``arms`` tokens; "check" is per run. Each group runs its arms (``assign_arms``) on U ranks."""
    owners = assign_arms(arms, cfg_groups)
    layers, dim, u, c = cfg.num_layers, cfg.inner_dim, ulysses, cfg_groups
    out = {}
    if u > 1:  # every arm runs on U ranks of one of the C groups: mean over the U*C ranks = sum over arms / C
        out["a2a q/k/v"] = (layers * len(arms) / c,
                            sum(layers * 3 / 4 * a2a_layer_bytes(t, dim, u, elem) for t in arms) / c)
        out["a2a output"] = (layers * len(arms) / c,
                             sum(layers * 1 / 4 * a2a_layer_bytes(t, dim, u, elem) for t in arms) / c)
        out["all-gather output"] = (len(arms) / c, sum(gather_bytes(t, dim, u, elem) for t in arms) / c)
    if c > 1:  # every rank joins every arm's broadcast; it receives the arms its group does not own
        mine = [len(arms_of_group(owners, g)) for g in range(c)]
        out["arm broadcast"] = (len(arms), sum(len(arms) - n for n in mine) * eps_bytes / c)
    if u * c > 1:
        out["start check"] = (1, (u * c - 1) * 8)
    return out


# ================================================================================================ instrumentation
KINDS = {"seq_to_heads": "a2a q/k/v", "heads_to_seq": "a2a output", "gather_sequence": "all-gather output",
         "broadcast_into": "arm broadcast", "check_identical": "start check"}
WRAPPED = ("all_to_all_single", "all_gather", "broadcast", "all_reduce", "all_gather_into_tensor",
           "reduce_scatter_tensor", "all_to_all", "send", "recv", "scatter", "gather", "reduce")


class CollectiveMeter:
    """Counts every torch.distributed collective this process issues while ``on``: per kind (found from the calling
    function's name), the calls, the bytes received from other ranks and the wall time inside the call (on CUDA
    with a synchronize before and after, so that it is the collective's own time)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.on = False
        self.records = defaultdict(lambda: [0, 0, 0.0])
        self.originals = {}

    def install(self) -> None:
        for name in WRAPPED:
            original = getattr(dist, name, None)
            if original is not None and name not in self.originals:
                self.originals[name] = original
                setattr(dist, name, self._wrap(name, original))

    def uninstall(self) -> None:
        for name, original in self.originals.items():
            setattr(dist, name, original)
        self.originals.clear()

    def reset(self) -> dict:
        records = {kind: list(value) for kind, value in self.records.items()}
        self.records.clear()
        return records

    @staticmethod
    def _kind(name: str) -> str:
        frame = sys._getframe(2)
        for _ in range(6):
            if frame is None:
                break
            if frame.f_code.co_name in KINDS:
                return KINDS[frame.f_code.co_name]
            frame = frame.f_back
        caller = sys._getframe(2).f_code.co_name
        return f"other: {name} from {caller}"

    def _wrap(self, name, original):
        signature = inspect.signature(original)

        def wrapper(*args, **kwargs):
            if not self.on:
                return original(*args, **kwargs)
            kind = self._kind(name)
            received = _received_bytes(name, signature.bind(*args, **kwargs).arguments)
            if self.cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = original(*args, **kwargs)
            if self.cuda:
                torch.cuda.synchronize()
            record = self.records[kind]
            record[0] += 1
            record[1] += received
            record[2] += time.perf_counter() - start
            return result

        wrapper.__wrapped__ = original
        return wrapper


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _received_bytes(name: str, a: dict) -> int:
    """Bytes this rank receives from the others in one call (collectives the engine does not use: the buffer)."""
    group = a.get("group")
    size, me = dist.get_world_size(group), dist.get_rank(group)
    if name == "all_to_all_single":
        out = a["output"]
        splits = a.get("output_split_sizes")
        if not splits:
            return _nbytes(out) * (size - 1) // size
        row = _nbytes(out) // max(1, out.shape[0])
        return (sum(splits) - splits[me]) * row
    if name == "all_gather":
        return sum(_nbytes(t) for i, t in enumerate(a["tensor_list"]) if i != me)
    if name == "broadcast":
        src = a.get("src")
        if src is None and a.get("group_src") is not None:
            src = dist.get_global_rank(group, a["group_src"]) if group is not None else a["group_src"]
        return 0 if dist.get_rank() == src else _nbytes(a["tensor"])
    if name == "all_gather_into_tensor":
        return _nbytes(a["output_tensor"]) * (size - 1) // size
    tensor = next((v for v in a.values() if isinstance(v, torch.Tensor)), None)
    return 0 if tensor is None else _nbytes(tensor)


# ================================================================================================ what a rank runs
def build_experts(job: dict, device: torch.device):
    from bernini_core.denoise import Experts
    from bernini_core.renderer import BerniniDiT
    from bernini_core.renderer.transformer import cast_dit_
    from bernini_core.runtime import Runtime, resolve_dtype

    cfg = DiTConfig(**job["dit"])
    dtype = resolve_dtype(job["dtype"])
    runtime = Runtime(device, offload=False)
    handles = []
    for name, seed in (("high", 0), ("low", 10))[:job["experts"]]:
        torch.manual_seed(seed)
        if device.type == "cpu":  # default init, then every parameter perturbed (not a near-identity DiT)
            model = BerniniDiT(cfg).eval()
            gen = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(0.2 * torch.randn(param.shape, generator=gen))
        else:  # built in place; speed does not depend on the values, the seed makes every rank's equal
            model = BerniniDiT(cfg, device=device, dtype=dtype if dtype != torch.float32 else None).eval()
        cast_dit_(model, dtype, keep_fp32_islands=job["mode"] in RENDERER_MODES)
        model.requires_grad_(False)
        model.set_attention_backend(job["attention"])
        handles.append(runtime.handle(name, model))
    experts = Experts(high=handles[0], low=handles[1] if len(handles) > 1 else None,
                      boundary=0.875 if len(handles) > 1 else 0.0)
    return experts, runtime


def run_denoise(job: dict, experts, runtime, parallel, device) -> tuple[torch.Tensor, list, float]:
    """(final latent, per-step seconds, total seconds) of one denoise call."""
    from bernini_core.denoise import denoise

    guidance, combos, contexts, omegas = build_case(job["mode"], job["frames"], job["height"], job["width"],
                                                    job["videos"], job["images"], job["dit"]["text_dim"],
                                                    job["text_rows"])
    stamps = []

    def on_step(index, total, sample):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        latent = denoise(experts, guidance, combos, contexts, omegas, num_frames=job["frames"], height=job["height"],
                         width=job["width"], num_inference_steps=job["steps"], flow_shift=5.0, omega_scale=0.7,
                         seed=3, runtime=runtime, use_unipc=True, on_step=on_step, parallel=parallel)
    times = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    return latent, times, stamps[-1] - start


def matmul_rate(seconds: float) -> float:
    """FLOP/s of fp32 matmuls in this process for ``seconds`` (the CPU host-capacity probe)."""
    a, b = torch.randn(256, 1024), torch.randn(1024, 256)
    a @ b
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * 256 * 1024 * 256 * n / (time.perf_counter() - start)


def rank_main(rank: int, world: int, port: int, job: dict, out_dir: str) -> None:
    """One process of a world: every layout of this world size in turn; results to out_dir/rank{r}.json."""
    torch.set_num_threads(job["threads"])
    cuda = job["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if sys.platform.startswith("linux") and not cuda:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = datetime.timedelta(seconds=job["timeout"])
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timeout)
    barrier = dist.barrier
    meter = CollectiveMeter(cuda)
    results = {}
    try:
        experts, runtime = build_experts(job, device)
        if not cuda and world > 1:  # how much faster this host runs `world` busy processes than one, right now
            barrier()
            alone = matmul_rate(1.0) if rank == 0 else 0.0
            barrier()
            results["probe"] = {"alone": alone, "together": matmul_rate(1.0)}
            barrier()
        states = {name: ParallelState.build(ParallelConfig(ulysses=u, cfg=c), timeout=timeout)
                  for name, (u, c) in job["layouts"] if u * c > 1}  # collective: all ranks, same order
        for repeat in range(job["repeats"]):
            for name, (u, c) in job["layouts"]:
                barrier()
                if u * c == 1:  # the one-process run: rank 0 alone, the others wait
                    if rank == 0:
                        latent, times, total = run_denoise(job, experts, runtime, None, device)
                        torch.save(latent, os.path.join(out_dir, f"latent_{name}.pt"))
                        entry = results.setdefault(name, {"runs": [], "collectives": {}, "cfg_rank": 0})
                        entry["runs"].append(times)
                    barrier()
                    continue
                state = states[name]
                handler = state.sequence_parallel()
                for handle in (experts.high, experts.low):
                    if handle is not None:
                        handle.module.use_sequence_parallel(handler)
                barrier()
                meter.install()
                meter.on = True
                try:
                    latent, times, total = run_denoise(job, experts, runtime, state, device)
                finally:
                    meter.on = False
                    meter.uninstall()
                if rank == 0:
                    torch.save(latent, os.path.join(out_dir, f"latent_{name}.pt"))
                entry = results.setdefault(name, {"runs": [], "cfg_rank": state.cfg_rank})
                entry["runs"].append(times)
                entry["collectives"] = meter.reset()  # the same every repeat: the last one's
                entry["checksum"] = float(latent.double().sum())
                for handle in (experts.high, experts.low):
                    if handle is not None:
                        handle.module.use_sequence_parallel(None)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(world: int, job: dict, out_dir: str) -> list[dict]:
    """rank_main in ``world`` new processes; their results in rank order. Fails with a message (never hangs) when a
    rank raises, dies, or the world runs past job["timeout"] seconds."""
    port = free_port()
    context = mp.start_processes(rank_main, args=(world, port, job, out_dir), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + job["timeout"]
    try:
        while not context.join(timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                alive = [i for i, p in enumerate(context.processes) if p.is_alive()]
                raise SystemExit(f"the world of {world} did not finish within {job['timeout']:.0f} s (ranks still "
                                 f"running: {alive}); raise --timeout or choose a smaller config.")
    except mp.ProcessRaisedException as error:
        raise SystemExit(f"the world of {world} failed:\n{error}") from None
    except mp.ProcessExitedException as error:
        raise SystemExit(f"the world of {world}: a rank died: {error}") from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    results = []
    for rank in range(world):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results


# ================================================================================================ printing
def print_table(headers: list, rows: list, align: str = "") -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(row):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)) + " |"

    print(line(cells[0]))
    print("|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, align)) + "|")
    for row in cells[1:]:
        print(line(row))
    print()


def si(value: float, unit: str, digits: int = 3) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g} {prefix}{unit}"
    return f"{value:.{digits}g} {unit}"


def fmt_bytes(value: float) -> str:
    return "0 B" if value == 0 else si(value, "B", 4)


def fmt_calls(value: float) -> str:
    return f"{value:g}" if value == int(value) else f"{value:.2f}"


def layout_name(u: int, c: int) -> str:
    if u * c == 1:
        return "1"
    return "x".join(p for p in ((f"U{u}" if u > 1 else ""), (f"C{c}" if c > 1 else "")) if p)


def parse_layouts(text: str) -> list[tuple[int, int]]:
    layouts = []
    for item in text.split(","):
        item = item.strip().upper()
        if not item:
            continue
        if item == "1":
            layouts.append((1, 1))
            continue
        parts = dict((k, int(v)) for k, v in re.findall(r"([UC])(\d+)", item))
        if not parts or re.sub(r"[UC]\d+|[X×*]", "", item):
            raise SystemExit(f"--layouts: cannot read {item!r}; write e.g. 1,U2,C2,U2xC2")
        layouts.append((parts.get("U", 1), parts.get("C", 1)))
    if (1, 1) not in layouts:
        layouts.insert(0, (1, 1))  # the reference every layout is compared with
    return list(dict.fromkeys(layouts))


# ================================================================================================ measured part
def measured(args) -> None:
    cfg = DiTConfig(num_attention_heads=args.heads, attention_head_dim=args.head_dim, ffn_dim=args.ffn,
                    num_layers=args.layers, text_dim=args.text_dim)
    layouts = parse_layouts(args.layouts)
    for u, _ in layouts:
        ParallelConfig(ulysses=u).check(heads=cfg.num_attention_heads)  # a clear error before any process starts
    if args.height % 16 or args.width % 16:
        raise SystemExit("--height and --width must be multiples of 16")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cuda" and max(u * c for u, c in layouts) > torch.cuda.device_count():
        raise SystemExit(f"a layout needs {max(u * c for u, c in layouts)} GPUs, {torch.cuda.device_count()} seen")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    job = {"dit": {"num_attention_heads": cfg.num_attention_heads, "attention_head_dim": cfg.attention_head_dim,
                   "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers, "text_dim": cfg.text_dim},
           "mode": args.mode, "frames": args.frames, "height": args.height, "width": args.width,
           "videos": args.source_videos, "images": args.ref_images, "text_rows": args.text_rows, "steps": args.steps,
           "experts": args.experts, "dtype": dtype, "device": device, "threads": args.threads,
           "attention": args.attention, "timeout": args.timeout, "repeats": args.repeats}

    guidance, combos, contexts, omegas = build_case(args.mode, args.frames, args.height, args.width,
                                                    args.source_videos, args.ref_images, args.text_dim,
                                                    args.text_rows, device="meta")
    shape = latent_shape(args.frames, args.height, args.width)
    arms = arm_tokens(guidance, combos, omegas, stream_tokens(shape))
    elem = {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]
    eps_bytes = math.prod(shape) * elem
    step_flops = sum(forward_flops(cfg, t, args.text_rows) for t in arms)
    params = cfg.num_layers * (4 * cfg.inner_dim ** 2 * 2 + 2 * cfg.inner_dim * cfg.ffn_dim) + cfg.inner_dim * (
        cfg.text_dim + cfg.inner_dim)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    print("## Measured: one denoise per layout\n")
    print_table(["quantity", "value"], [
        ["DiT", f"dim {cfg.inner_dim} ({cfg.num_attention_heads} heads x {cfg.attention_head_dim}), FFN "
                f"{cfg.ffn_dim}, {cfg.num_layers} layers, text dim {cfg.text_dim}, ~{params / 1e6:.2f}M params "
                f"per expert, {args.experts} expert(s)"],
        ["video", f"{args.frames} frames {args.height}x{args.width} -> latent {list(shape[2:])}, "
                  f"{stream_tokens(shape)} tokens per stream; {args.source_videos} source video(s), "
                  f"{args.ref_images} reference image(s); {args.text_rows} text rows"],
        ["guidance", f"{args.mode}: {len(arms)} DiT forwards per step, tokens {arms}"],
        ["FLOPs per step", f"{si(step_flops, 'FLOP')} (docs/wan_qwen.md formula, all arms)"],
        ["steps", f"{args.steps} (per-step time: median of steps 2..{args.steps})" if args.steps > 2 else
         f"{args.steps} (per-step time: the last step)"],
        ["repeats", f"{args.repeats} run(s) per layout, layouts interleaved; the fastest run counts"],
        ["device / backend / dtype", f"{device} / {'nccl' if device == 'cuda' else 'gloo'} / {dtype}, "
                                     f"{args.threads} thread(s) per process, {cores} cores, load average "
                                     f"{load:.1f} at the start"],
    ], align="ll")

    sizes = sorted({u * c for u, c in layouts})
    per_world = {n: [] for n in sizes if n > 1} or {1: []}
    smallest = min(per_world)
    for u, c in layouts:
        per_world[smallest if u * c == 1 else u * c].append((layout_name(u, c), (u, c)))
    results, probes = {}, {}
    with tempfile.TemporaryDirectory(prefix="bernini_bench_parallel_") as out_dir:
        for world, items in per_world.items():
            started = time.perf_counter()
            ranks = run_world(world, dict(job, layouts=items), out_dir)
            print(f"(world of {world}: {', '.join(n for n, _ in items)} in {time.perf_counter() - started:.1f} s)")
            if "probe" in ranks[0]:
                probes[world] = sum(r["probe"]["together"] for r in ranks) / ranks[0]["probe"]["alone"]
            for name, (u, c) in items:
                ranked = [r[name] for r in ranks if name in r]
                latent = torch.load(os.path.join(out_dir, f"latent_{name}.pt"), weights_only=True)
                results[name] = ((u, c), ranked, latent)
    print()

    def step_time(runs):  # the median step of a run (the first step left out when there are more), best run
        return min(statistics.median(times[1:]) if len(times) > 2 else times[-1] for times in runs)

    (_, base_ranks, base_latent) = results["1"]
    base = step_time(base_ranks[0]["runs"])
    rows, comm_rows, matches = [], [], []
    for name, ((u, c), ranked, latent) in results.items():
        world = u * c
        t = max(step_time(r["runs"]) for r in ranked)  # the step ends when the slowest rank has the velocity
        rank_flops = [sum(rank_forward_flops(cfg, arms[i], args.text_rows, u)
                          for i in arms_of_group(assign_arms(arms, c), g)) for g in range(c)]
        bound = step_flops / max(rank_flops)  # speed-up if compute split perfectly and communication were free
        diff = ((latent.double() - base_latent.double()).abs().max() / base_latent.double().abs().max()).item()
        checks = {r.get("checksum") for r in ranked if "checksum" in r}
        steps = args.steps
        coll = defaultdict(lambda: [0.0, 0.0, 0.0])
        for r in ranked:
            for kind, (calls, received, seconds) in r["collectives"].items():
                per = 1 if kind == "start check" else steps
                coll[kind][0] += calls / per / world
                coll[kind][1] += received / per / world
                coll[kind][2] += seconds / per / world
        in_collectives = sum(v[2] if k != "start check" else v[2] / steps for k, v in coll.items())
        owners = assign_arms(arms, c)
        split = " / ".join("+".join(str(arms[i]) for i in arms_of_group(owners, g)) or "idle" for g in range(c))
        ceiling = probes.get(world, 1.0 if world == 1 else float("nan"))
        rows.append([name, world, split, f"{t * 1e3:.1f} ms", f"{base / t:.2f}x", f"{base / t / world:.0%}",
                     f"{bound:.2f}x", f"{ceiling:.2f}x", f"{in_collectives * 1e3:.1f} ms",
                     si(step_flops / t / world, "FLOP/s"),
                     f"{diff:.1e}" + ("" if len(checks) <= 1 else " (ranks differ!)")])
        formula = comm_formula(arms, u, c, cfg, elem, eps_bytes)
        for kind in sorted(set(coll) | set(formula), key=lambda k: (k.startswith("other"), k)):
            calls, received, seconds = coll.get(kind, (0.0, 0.0, 0.0))
            f_calls, f_bytes = formula.get(kind, (0, 0))
            same = abs(calls - f_calls) < 1e-9 and abs(received - f_bytes) <= 1e-6 * max(1.0, f_bytes)
            per = "per run" if kind == "start check" else "per step"
            comm_rows.append([name, f"{kind} ({per})", fmt_calls(calls), fmt_bytes(received), fmt_calls(f_calls),
                              fmt_bytes(f_bytes), "yes" if same else "NO", f"{seconds * 1e3:.2f} ms"])
            matches.append(same)
    print_table(["layout", "processes", "arm tokens per group", "time per step", "speed-up", "efficiency",
                 "compute bound", "host ceiling", "in collectives / step", "FLOP/s per process",
                 "max rel. diff vs 1"], rows, align="lrlrrrrrrrr")
    print("speed-up and efficiency: versus the one-process run (same threads per process); efficiency = speed-up / "
          "processes. compute bound: the speed-up if each rank's FLOPs ran at the one-process rate with free "
          "communication (arm balance and padding included). host ceiling (CPU): how many times the matmul rate of "
          "one process the host gave that many busy processes at once, a 1-second snapshot when the world started "
          "(below the process count on a shared or hyper-threaded host; other work on the host changes it during the "
          "run). in collectives: mean wall time per rank inside the wrapped calls, waiting for slower ranks "
          "included.\n")
    print_table(["layout", "collective", "calls / rank", "received / rank", "formula calls", "formula bytes",
                 "match", "time / rank"], comm_rows, align="llrrrrlr")
    print(f"instrumented bytes {'equal' if all(matches) else 'DIFFER FROM'} the formula for every collective.\n")
    print("received / rank: bytes arriving from other ranks, mean over the world's ranks (instrumented); formula: "
          "a2a q/k/v = layers x 3 x L_pad x D x b x (U-1)/U^2 per arm, a2a output = the same with 1 tensor, "
          "all-gather = L_pad x D x b x (U-1)/U per forward, arm broadcast = the arms a group does not own x the "
          "target latent's bytes, start check = (world-1) x 8 bytes; arms split over the groups by assign_arms, "
          "means over groups.\n")
    if cores < max(u * c for u, c in layouts) * args.threads and device == "cpu":
        print(f"note: {cores} cores for up to {max(u * c for u, c in layouts) * args.threads} threads: layouts "
              "with more processes than cores share cores, and their efficiency says so.\n")


# ================================================================================================ arithmetic model
A14B = DiTConfig()  # 40 layers, 40 heads x 128 = 5120, FFN 13824 (docs/wan_qwen.md)
EXPERT_BYTES = 28.58e9  # one A14B expert in bf16 (docs/wan_qwen.md §5.2): what FSDP all-gathers per forward
MODEL_MODES = [  # (mode, what it is, videos, images): each arm's tokens follow from the guidance classes
    ("t2v_apg", "Bernini-R t2v, single stream", 0, 0),
    ("r2v_apg", "Bernini-R r2v, 1 reference image", 0, 1),
    ("v2v_apg", "Bernini-R v2v, 1 source video", 1, 0),
    ("rv2v", "Bernini-R rv2v, video + image", 1, 1),
    ("vae_txt_vit_wapg", "full Bernini v2v (1 source video)", 1, 0),
]
RESOLUTIONS = {"480p": (81, 480, 832), "720p": (81, 720, 1280)}
MODEL_LAYOUTS = [(1, 1), (1, 2), (8, 1), (4, 2), (2, 4), (1, 8)]


def model_step(arms: list[int], u: int, c: int, tflops: float, link_gbps: float, eps_bytes: int,
               cfg: DiTConfig = A14B, text_rows: int = 512, elem: int = 2, fsdp_ranks: int = 1) -> dict:
    """Predicted step of one layout: the busiest group's compute + its Ulysses traffic (no overlap), then the arm
    broadcasts. fsdp_ranks > 1: weights sharded over that many ranks and all-gathered once per forward."""
    owners = assign_arms(arms, c)
    best = None
    for g in range(c):
        mine = [arms[i] for i in arms_of_group(owners, g)]
        flops = sum(rank_forward_flops(cfg, t, text_rows, u) for t in mine)
        comm = sum(cfg.num_layers * a2a_layer_bytes(t, cfg.inner_dim, u, elem)
                   + gather_bytes(t, cfg.inner_dim, u, elem) for t in mine)
        fsdp = len(mine) * EXPERT_BYTES * (fsdp_ranks - 1) / fsdp_ranks
        group = {"arms": mine, "flops": flops, "comm_bytes": comm, "compute_s": flops / (tflops * 1e12),
                 "comm_s": comm / (link_gbps * 1e9), "fsdp_s": fsdp / (link_gbps * 1e9)}
        group["time"] = group["compute_s"] + group["comm_s"] + group["fsdp_s"]
        if best is None or group["time"] > best["time"]:
            best = group
    others = len(arms) - min(len(arms_of_group(owners, g)) for g in range(c))
    best["bcast_s"] = (others * eps_bytes / (link_gbps * 1e9)) if c > 1 else 0.0
    best["step"] = best["time"] + best["bcast_s"]
    largest = max(arms)
    best["a2a_layer"] = a2a_layer_bytes(largest, cfg.inner_dim, u, elem)
    return best


def mode_arms(mode: str, videos: int, images: int, frames: int, height: int, width: int) -> tuple[list[int], int]:
    guidance, combos, _, omegas = build_case(mode, frames, height, width, videos, images, 8, 1, device="meta")
    shape = latent_shape(frames, height, width)
    return arm_tokens(guidance, combos, omegas, stream_tokens(shape)), math.prod(shape) * 2


def model(args) -> None:
    gpus, tflops, link = 8, args.gpu_tflops, args.link_gbps
    layer_bytes, rank_flops = a2a_layer_bytes(32760, 5120, 8, 2), rank_forward_flops(A14B, 32760, 512, 8)
    print("## Arithmetic model: Wan2.2-A14B experts on 8 GPUs\n")
    print(f"Assumptions: {tflops:g} TFLOP/s usable bf16 per GPU (H100 SXM dense bf16 peak 989, NVIDIA datasheet; "
          f"790 = 80% of it, an estimate), all-to-all at {link:g} GB/s per GPU each way (NVLink 4 on H100 SXM: "
          "900 GB/s per GPU both directions together = 450 each way, NVIDIA datasheet; NCCL all-to-all reaches "
          "less, so this is an upper bound: halve it to see the sensitivity), bf16 activations (2 bytes), 512 text "
          "rows, no overlap of communication and compute, weights replicated on every GPU (no FSDP traffic), "
          "VAE/text/planner not counted (they run once per group, outside the step).\n")
    print("All-to-all volume. In a Ulysses group of U ranks each rank holds B x L/U tokens x D features of q, k, v "
          "and of the attention output. seq_to_heads sends q, k, v (3 tensors, one call) and heads_to_seq sends the "
          "output back (1 tensor): 4 tensors of B x L/U x D x b bytes per layer, of which (U-1)/U leaves the rank "
          "(its own head group stays). Per layer per rank, each way: 4 x B x L x D x b x (U-1)/U^2. 480p, U=8: "
          f"{fmt_bytes(layer_bytes)} per layer, x40 = {fmt_bytes(40 * layer_bytes)} per forward, against "
          f"{si(rank_flops, 'FLOP')} of compute per rank: the link would need "
          f"{40 * layer_bytes / (rank_flops / tflops / 1e12) / 1e9:.0f} GB/s to take as long as the compute. Plus "
          "one all-gather of the output (L/U x D per rank) per forward, "
          "and, with C > 1, each arm's velocity (the target latent, 4.2 MB at 480p) broadcast over the cfg group.\n")
    rows = []
    for res, (frames, height, width) in RESOLUTIONS.items():
        for mode, what, videos, images in MODEL_MODES:
            arms, eps_bytes = mode_arms(mode, videos, images, frames, height, width)
            one = model_step(arms, 1, 1, tflops, link, eps_bytes)
            for u, c in MODEL_LAYOUTS:
                if u * c > gpus:
                    continue
                m = model_step(arms, u, c, tflops, link, eps_bytes)
                speed = one["step"] / m["step"]
                rows.append([res, f"{mode} ({what}): {len(arms)} arms", layout_name(u, c), u * c,
                             "+".join(f"{t / 1000:.1f}k" for t in m["arms"]), si(m["flops"], "FLOP"),
                             fmt_bytes(m["a2a_layer"]), fmt_bytes(m["comm_bytes"]), f"{m['compute_s']:.2f} s",
                             f"{(m['comm_s'] + m['bcast_s']) * 1e3:.0f} ms",
                             f"{(m['comm_s'] + m['bcast_s']) / m['compute_s']:.1%}", f"{m['step']:.2f} s",
                             f"{speed:.2f}x", f"{speed / (u * c):.0%}"])
    print_table(["res", "mode: DiT forwards per step", "layout", "GPUs", "busiest group's arms (tokens)",
                 "compute / rank / step", "a2a / layer / rank (largest arm)", "Ulysses traffic / rank / step",
                 "compute time", "comm time", "comm / compute", "step", "speed-up vs 1 GPU", "efficiency"], rows,
                align="lllrlrrrrrrrrr")
    print("480p = 480x832x81 -> 21x30x52 = 32,760 tokens per stream; 720p = 720x1280x81 -> 21x45x80 = 75,600; a "
          "reference image adds one latent frame (1,560 / 3,600 tokens). Arms per step and their streams come from "
          "the guidance classes (t2v_apg 2, r2v_apg 3, v2v_apg 2, rv2v 4, vae_txt_vit_wapg 4); groups get arms by "
          "assign_arms (token counts, as the engine does), so C beyond the arm count leaves groups idle and uneven "
          "arms cap the speed-up. Sequence lengths are padded to a multiple of U.\n")

    print(f"### Two GPUs: Ulysses or arm groups, NVLink ({link:g} GB/s) or PCIe ({args.pcie_gbps:g} GB/s each way)\n")
    rows = []
    frames, height, width = RESOLUTIONS["480p"]
    for mode, what, videos, images in MODEL_MODES:
        arms, eps_bytes = mode_arms(mode, videos, images, frames, height, width)
        one = model_step(arms, 1, 1, tflops, link, eps_bytes)["step"]
        cells = [f"{mode}: {len(arms)} arms", f"{one:.2f} s"]
        for u, c, bw in ((2, 1, link), (2, 1, args.pcie_gbps), (1, 2, args.pcie_gbps)):
            m = model_step(arms, u, c, tflops, bw, eps_bytes)
            cells.append(f"{m['step']:.2f} s = {one / m['step']:.2f}x")
        rows.append(cells)
    print_table(["480p mode", "1 GPU", "U2, NVLink", "U2, PCIe", "C2, PCIe"], rows, align="lrrrr")
    print("Ulysses moves 4 x L x D x b x (U-1)/U^2 per layer whatever the link; arm groups move one latent per arm. "
          "Without NVLink C2 beats U2 in every mode here, most where the arms split evenly; Ulysses pays "
          f"{40 * a2a_layer_bytes(32760, 5120, 2, 2) / 1e9:.1f} GB per 480p forward per rank.\n")

    print("### Anchors\n")
    rows = []
    # Wan2.2 official T2V-A14B (CFG: 2 forwards of one stream per step, 40 steps), H100 x1 vs x8 (Ulysses 8 + FSDP)
    for res, single, eight in (("480p", 326.9, 51.5), ("720p", 1041.5, 155.1)):
        frames, height, width = RESOLUTIONS[res]
        tokens = stream_tokens(latent_shape(frames, height, width))
        eps_bytes = math.prod(latent_shape(frames, height, width)) * 2
        all_in = 80 * forward_flops(A14B, tokens, 512) / single / 1e12  # the 1-GPU run's rate, everything included
        cells = []
        for rate in (tflops, all_in):
            one = model_step([tokens, tokens], 1, 1, rate, link, eps_bytes)
            u8 = model_step([tokens, tokens], 8, 1, rate, link, eps_bytes, fsdp_ranks=8)
            bare = u8["compute_s"] + u8["comm_s"]
            cells.append(f"{rate:.0f} TFLOP/s: {40 * one['step']:.0f} s -> {40 * bare:.0f} s = "
                         f"{one['step'] / bare:.2f}x ({40 * u8['step']:.0f} s = {one['step'] / u8['step']:.2f}x with "
                         f"FSDP gathers not overlapped)")
        rows.append([f"Wan2.2 T2V-A14B {res}, 40 steps x 2 forwards, H100 x1 -> x8 (Ulysses 8 + FSDP)",
                     f"{single:g} s -> {eight:g} s = {single / eight:.2f}x; "
                     f"{80 * forward_flops(A14B, tokens, 512) / eight / 8 / 1e12:.0f} TFLOP/s per GPU at 8"] + cells)
    # full Bernini, 8 x A800, Ulysses 8, vae_txt_vit_wapg, 480p (official CLI default 480x848), 81 frames, 40 steps
    a100_all_in = 80 * forward_flops(A14B, 32760, 512) / 785.7 / 1e12  # Wan2.2 A100/A800 x1 480p, all-in
    for what, videos in (("v2v, 1 source video", 1), ("t2v, no source", 0)):
        arms, eps_bytes = mode_arms("vae_txt_vit_wapg", videos, 0, 81, 480, 848)
        step_flops = sum(forward_flops(A14B, t, 512) for t in arms)
        cells = []
        for rate in (args.a800_tflops, a100_all_in):
            m = model_step(arms, 8, 1, rate, args.a800_link_gbps, eps_bytes, fsdp_ranks=8)
            cells.append(f"{rate:.0f} TFLOP/s: {m['compute_s'] + m['comm_s']:.1f} s/step ({m['compute_s']:.1f} "
                         f"compute + {m['comm_s']:.2f} a2a), {m['step']:.1f} s with FSDP gathers; measured / model "
                         f"= {34.8 / m['step']:.1f}")
        rows.append([f"full Bernini vae_txt_vit_wapg 480x848x81 ({what}: arms {arms}), A800 x8 Ulysses 8 + FSDP",
                     f"34.8 s/step (23 min 12 s / 40, all stages) = {step_flops / 34.8 / 8 / 1e12:.0f} TFLOP/s "
                     f"per GPU ({step_flops / 34.8 / 8 / 1e12 / 312:.0%} of the 312 peak)"] + cells)
    print_table(["anchor", "measured", "model at the assumed usable rate", "model at the 1-GPU all-in rate"], rows,
                align="llll")
    print("Sources: Wan2.2 T2V-A14B totals from the official Wan-Video/Wan2.2 README (Computational Efficiency; "
          "all stages; the 1-GPU runs offload the model, the 8-GPU runs use Ulysses 8 and FSDP). The 1-GPU all-in "
          "rate is that table's 1-GPU FLOPs / seconds (H100 480p/720p; A100/A800 480p 785.7 s for the A800 rows). "
          "Full Bernini: a user's report in bytedance/Bernini#7 (8 x A800 80 GB, 480p, 81 frames, 40 steps, "
          "23 min 12 s in total, which holds loading, planning with the 7B MLLM, VAE and the DiT: 34.8 s is an upper "
          "bound on the DiT step; the task is not stated, so v2v and t2v bracket it). A800: "
          f"{args.a800_tflops:g} TFLOP/s usable of the 312 dense bf16 peak, NVLink 400 GB/s per GPU both directions "
          f"together = {args.a800_link_gbps:g} GB/s each way (NVIDIA A800 datasheet). FSDP: one expert (28.6 GB "
          "bf16) all-gathered per forward, 7/8 of it over the link.\n")


# ================================================================================================ main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny DiT, 2 steps, layouts 1,U2,C2")
    p.add_argument("--model-only", dest="model_only", action="store_true", help="print only the arithmetic model")
    p.add_argument("--no-model", dest="no_model", action="store_true", help="skip the arithmetic model")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="DiT sizes and video geometry")
    for name in ("heads", "head_dim", "ffn", "layers", "text_dim", "frames", "height", "width"):
        p.add_argument(f"--{name}", type=int, default=None, help="overrides the preset")
    p.add_argument("--mode", default="vae_txt_vit_wapg", help="guidance mode (Bernini-R or full Bernini)")
    p.add_argument("--source_videos", type=int, default=1, help="source videos of the target's size")
    p.add_argument("--ref_images", type=int, default=0, help="single-frame references of the target's size")
    p.add_argument("--text_rows", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--experts", type=int, default=2, choices=(1, 2))
    p.add_argument("--repeats", type=int, default=1, help="runs per layout, interleaved; the best counts")
    p.add_argument("--layouts", default="1,U2,C2,U2xC2", help="comma-separated: 1, U2, C2, U2xC2, U4, ...")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--dtype", default=None, help="fp32 (CPU default) | bf16 (CUDA default) | fp16")
    p.add_argument("--attention", default="sdpa")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (the one-process run too)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds a world may run (collectives too)")
    p.add_argument("--gpu_tflops", type=float, default=790.0, help="model: usable bf16 TFLOP/s per GPU (H100)")
    p.add_argument("--link_gbps", type=float, default=450.0, help="model: all-to-all GB/s per GPU each way")
    p.add_argument("--pcie_gbps", type=float, default=25.0,
                   help="model: GPU-to-GPU GB/s each way without NVLink (PCIe 4.0 x16 in practice; 5.0 doubles it)")
    p.add_argument("--a800_tflops", type=float, default=250.0)
    p.add_argument("--a800_link_gbps", type=float, default=200.0)
    p.add_argument("--ray", action="store_true", help="also the ComfyUI/Ray rows: each multi-process layout through "
                   "a Bernini Multi-GPU pool vs a torch.distributed world (benchmarks/ray_pool.py; needs ray)")
    p.add_argument("--ray_model", default=None, help="--ray: a Bernini-R folder (default: the tiny random one)")
    p.add_argument("--ray_steps", type=int, default=4)
    p.add_argument("--ray_frames", type=int, default=5)
    p.add_argument("--ray_size", type=int, default=32)
    p.add_argument("--ray_dtype", default="fp32")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.steps, args.layouts, args.timeout = "tiny", 2, "1,U2,C2", min(args.timeout, 120.0)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps < 1 or args.repeats < 1:
        raise SystemExit("--steps and --repeats must be >= 1")
    if not args.model_only:
        measured(args)
        if args.ray:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from ray_pool import ray_rows

            ray_rows(args, parse_layouts(args.layouts), print_table)
    if not args.no_model:
        model(args)


if __name__ == "__main__":
    main()
