"""One rank of a pool: a Ray actor that joins the torch.distributed group of the pool, holds its DiT experts (whole
or FSDP-sharded) under the scale-out engine, and samples when the driver sends the stage inputs.

The class is plain Python; pool.py makes it a Ray actor (`ray.remote(RenderWorker)`), with three concurrent method
slots so that `stop` and `events` reach the actor while `sample` runs. Inputs arrive as tensors plus a JSON-able
header (parallel/handoff.py's pack), the leader (rank 0) returns the latents; nothing is read from a file but the
weights (safetensors / GGUF).
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Optional

import torch

from ...runtime import Runtime


class PoolRuntime(Runtime):
    """The engine's runtime on a pool rank: the leader records each denoising step (with its latent, for previews)
    for the driver to collect; every rank stops at the same step when the driver asks (the ranks agree on the stop
    flag with one all-reduce per step, so no rank is left waiting in a collective)."""

    def __init__(self, device, *, offload: bool, leader: bool):
        super().__init__(device, offload=offload)
        self.leader = leader
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._events: list = []
        self._latest = None

    def progress(self, stage: str, step: int, total: int, latent: Optional[torch.Tensor] = None) -> None:
        if not self.leader:
            return
        with self._lock:
            self._events.append((stage, step, total))
            if latent is not None:
                self._latest = latent.detach().to("cpu", torch.float32, copy=True)

    def take_events(self) -> tuple[list, Optional[torch.Tensor]]:
        with self._lock:
            events, latest = self._events, self._latest
            self._events, self._latest = [], None
        return events, latest

    def check_interrupt(self) -> None:
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.stop_event.is_set() else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            raise InterruptedError("the driver stopped this pool run")


class RenderWorker:
    """A pool rank. Call order from the driver: where → missing_paths → join → load → sample (any number of times);
    stop / events may come at any time during sample."""

    def __init__(self, rank: int, world: int, device: str):
        self.rank, self.world = rank, world
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")  # Ray sets the GPU
        self.pipe = None
        self.runtime: Optional[PoolRuntime] = None
        self.state = None

    # ------------------------------------------------------------------ start
    def where(self) -> dict:
        """This rank's host, address, process id, visible GPUs, and (rank 0) a free port for the rendezvous."""
        from ..launch import free_port

        try:
            import ray

            address = ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001 - outside Ray (tests call the class directly)
            address = "127.0.0.1"
        return {"host": socket.gethostname(), "address": address, "pid": os.getpid(),
                "port": free_port() if self.rank == 0 else None,
                "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "")}

    def missing_paths(self, paths: list) -> list:
        """The model paths that do not exist on this node (multi-node pools need shared storage or equal paths)."""
        return [p for p in paths if not Path(p).exists()]

    def join(self, address: str, port: int, layout: dict, timeout_s: float) -> str:
        """Join the pool's process group (NCCL on a GPU, gloo on the CPU) and build this rank's ParallelState."""
        from datetime import timedelta

        from ..config import ParallelConfig
        from ..launch import init_process_group
        from ..state import ParallelState

        os.environ.update({"MASTER_ADDR": address, "MASTER_PORT": str(port), "RANK": str(self.rank),
                           "WORLD_SIZE": str(self.world), "LOCAL_RANK": "0"})
        init_process_group(self.device, timeout_s)
        self.state = ParallelState.build(ParallelConfig(**layout), timeout=timedelta(seconds=timeout_s))
        return self.state.describe()

    def load(self, spec: dict, dtype: str, attention: str, fsdp: bool) -> dict:
        """Load the experts this pool renders with (spec: experts.py) and put them on the layout."""
        from .experts import load_experts

        self.runtime = PoolRuntime(self.device, offload=self.device.type == "cuda", leader=self.rank == 0)
        self.pipe = load_experts(spec, device=self.device, dtype=dtype, attention=attention, runtime=self.runtime)
        self.pipe.use_parallel(self.state, fsdp=fsdp)
        experts = self.pipe.experts
        if spec.get("compile"):  # after the layout: the blocks are compiled over their shards / Ulysses handler
            from ...acceleration.settings import SpeedSettings

            SpeedSettings(compile=True, compile_backend=spec["compile"]).apply(
                (experts.high.module, None if experts.low is None else experts.low.module), self.device,
                offload=self.runtime.offload)
        return {"family": self.pipe.family, "boundary": experts.boundary, "low": experts.low is not None,
                "compiled": getattr(experts.high.module, "compiled_blocks", None) is not None}

    # ------------------------------------------------------------------ runs
    def sample(self, request: dict) -> Optional[torch.Tensor]:
        """Denoise one video from the driver's packed inputs; the leader returns the latents (CPU), the others None."""
        import copy
        import dataclasses

        from ..handoff import unpack_full, unpack_renderer

        self.runtime.stop_event.clear()
        self.runtime.take_events()
        pipe = self.pipe
        if request.get("boundary") is not None:  # Sample Bernini Video's expert_boundary override
            pipe = copy.copy(pipe)
            pipe.experts = dataclasses.replace(pipe.experts, boundary=float(request["boundary"]))
        unpack = unpack_renderer if request["family"] == "bernini_renderer" else unpack_full
        conditioning, sources = unpack(request["tensors"], request["meta"])
        latents = pipe.sample(conditioning, sources, request["settings"], force=bool(request.get("force")))
        return latents if self.rank == 0 else None

    def stop(self) -> None:
        if self.runtime is not None:
            self.runtime.stop_event.set()

    def events(self) -> tuple[list, Optional[torch.Tensor]]:
        return self.runtime.take_events() if self.runtime is not None else ([], None)

    def pid(self) -> int:
        return os.getpid()

    def finish(self) -> None:
        """Leave the process group (the driver then ends the actor)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
