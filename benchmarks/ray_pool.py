"""The "ComfyUI/Ray" rows of benchmarks/parallel.py (`--ray`): one Bernini-R checkpoint rendered by the same layout
twice, once as a torch.distributed world of the engine's own processes (what torchrun or `generate --gpus` runs, timed
inside the ranks) and once through a Bernini Multi-GPU pool (bernini_core/parallel/pool) from a driver process, as
ComfyUI drives it: the driver packs the inputs, the Ray actors sample, the leader's latents come back. The difference
per step is the cost of the driver round trip (input transfer, the 0.1 s progress poll, the result transfer), spread
over the run's steps.

The checkpoint is the tiny random Bernini-R of bernini_core/tiny.py unless --ray_model names a Bernini-R folder.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

PROMPT = "a red fox trots through fresh snow"


def _settings(pipe, args) -> dict:
    return pipe.resolve("t2v", {"num_frames": args.ray_frames, "height": args.ray_size, "width": args.ray_size,
                                "num_inference_steps": args.ray_steps, "seed": 3})


def _world_rank(rank: int, world: int, port: int, path: str, layout: tuple, args, out: str) -> None:
    """One rank of the torch.distributed world: the engine's pipeline with parallel=, per-step times by rank 0."""
    import json

    from bernini_core import BerniniPipeline
    from bernini_core.parallel import ParallelConfig
    from bernini_core.parallel.handoff import pack_renderer, unpack_renderer

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(args.threads)
    device = f"cuda:{rank}" if args.device == "cuda" else "cpu"
    torch.distributed.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        pipe = BerniniPipeline.from_pretrained(path, device=device.split(":")[0], dtype=args.ray_dtype,
                                               parallel=ParallelConfig(ulysses=layout[0], cfg=layout[1]))
        settings = _settings(pipe, args)
        embeds, sources = pipe.prepared_inputs(
            lambda: (pipe.encode_prompt("t2v", PROMPT), pipe.prepare_sources("t2v", num_frames=args.ray_frames)),
            pack_renderer, unpack_renderer)
        runs = []
        for _ in range(args.repeats + 1):  # the first run warms up
            stamps = [time.perf_counter()]
            pipe.sample(embeds, sources, settings, on_step=lambda i, n, z: stamps.append(time.perf_counter()))
            runs.append([b - a for a, b in zip(stamps, stamps[1:])])
        if rank == 0:
            Path(out).write_text(json.dumps(runs[1:]))
    finally:
        torch.distributed.destroy_process_group()


def world_step(path: str, layout: tuple, args) -> float:
    """Median step time of the world run (the fastest repeat)."""
    import json

    from bernini_core.parallel.launch import free_port

    world = layout[0] * layout[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "steps.json")
        mp.start_processes(_world_rank, args=(world, free_port(), path, layout, args, out), nprocs=world,
                           start_method="spawn")
        runs = json.loads(Path(out).read_text())
    return min(statistics.median(r) for r in runs)


def pool_step(path: str, layout: tuple, args) -> tuple[float, float]:
    """(driver wall per step, pool start seconds) of the same render through a Bernini Multi-GPU pool."""
    from bernini_core.parallel.handoff import pack_renderer
    from bernini_core.parallel.pool import PoolOptions, WorkerPool
    from bernini_core.pipeline import RendererPipeline

    driver = RendererPipeline.from_pretrained(path, device="cpu", dtype=args.ray_dtype, parts=("text_encoder", "vae"))
    settings = _settings(driver, args)
    tensors, meta = pack_renderer(driver.encode_prompt("t2v", PROMPT),
                                  driver.prepare_sources("t2v", num_frames=args.ray_frames))
    world = layout[0] * layout[1]
    options = PoolOptions.from_node(str(world), layout[0], layout[1], False, "", args.device)
    pool = WorkerPool(options, {"kind": "folder", "path": str(path)}, heads=_heads(path), dtype=args.ray_dtype)
    started = time.perf_counter()
    pool.start()
    start_s = time.perf_counter() - started
    try:
        walls = []
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            pool.sample("bernini_renderer", tensors, meta, settings)
            walls.append((time.perf_counter() - t0) / args.ray_steps)
        return min(walls[1:]), start_s
    finally:
        pool.shutdown()


def _heads(path) -> int:
    from bernini_core.loaders import read_dit_config

    return read_dit_config(Path(path) / "transformer" / "config.json").num_attention_heads


def ray_rows(args, layouts, print_table) -> None:
    """Print the ComfyUI/Ray table for the multi-process layouts of this run (`print_table`: parallel.py's)."""
    import ray

    from bernini_core.tiny import make_tiny_renderer

    layouts = [(u, c) for u, c in layouts if u * c > 1]
    with tempfile.TemporaryDirectory(prefix="bernini_bench_ray_") as tmp:
        path = args.ray_model or str(make_tiny_renderer(Path(tmp) / "Bernini-R-Diffusers"))
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        rows = []
        try:
            for u, c in layouts:
                world = world_step(path, (u, c), args)
                pool, start_s = pool_step(path, (u, c), args)
                rows.append([f"U{u}xC{c}".replace("xC1", "").replace("U1x", ""), f"{world * 1e3:.1f} ms",
                             f"{pool * 1e3:.1f} ms", f"{(pool - world) * 1e3:+.1f} ms",
                             f"{start_s:.1f} s"])
        finally:
            ray.shutdown()
    print(f"## ComfyUI/Ray: the same layout through a Bernini Multi-GPU pool ({args.ray_steps} steps, "
          f"{args.ray_frames} frames {args.ray_size}x{args.ray_size}, Bernini-R t2v, {args.ray_dtype}, "
          f"{'tiny random checkpoint' if not args.ray_model else args.ray_model})\n")
    print_table(["layout", "torch.distributed world (per step)", "Ray pool from the driver (per step)",
                 "driver round trip (per step)", "pool start"], rows)
    print("world: median step inside the ranks (what torchrun / generate --gpus runs); pool: the driver's wall time of "
          "a whole render / steps (inputs out, progress polled every 0.1 s, latents back), as ComfyUI waits for it. "
          "Fastest of --repeats runs after one warm-up each. pool start: actors, process group and weight load.\n")
