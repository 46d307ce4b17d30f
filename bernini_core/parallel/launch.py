"""Starting and joining a multi-process run: torchrun's environment, this machine's own launcher for
`--gpus N`, the device of each rank, and errors that say what went wrong.

`torchrun --nproc-per-node N -m bernini_core generate ...` (one node or several, with its rendezvous flags) sets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for every process; `generate --gpus N` starts the N
processes itself with torch's elastic launcher (the library behind torchrun), so a user never needs torchrun.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import BerniniError


@dataclass(frozen=True)
class DistributedEnv:
    """What torchrun (or our launcher) told this process about its place in the run."""

    rank: int
    world_size: int
    local_rank: int


def distributed_env() -> Optional[DistributedEnv]:
    """This process's rank in a launched multi-process run, or None when it runs alone."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        env = DistributedEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                             int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    except ValueError:
        raise BerniniError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} / "
                           f"LOCAL_RANK={os.environ.get('LOCAL_RANK')!r} are not whole numbers; start the run with "
                           "torchrun or `generate --gpus N`.") from None
    return env if env.world_size > 1 else None


def rank_device(requested: Optional[str], local_rank: int) -> torch.device:
    """Each rank's device: `auto`/`cuda` mean this node's GPU number LOCAL_RANK; `cpu` keeps every rank on the CPU
    (tests, or machines without GPUs)."""
    from ..runtime import resolve_device

    if requested in (None, "auto", "cuda"):
        if not torch.cuda.is_available():
            if requested == "cuda":
                raise BerniniError("--device cuda was requested but CUDA is not available; use --device cpu.")
            return torch.device("cpu")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise BerniniError(f"local rank {local_rank} needs GPU cuda:{local_rank} but this node has {count} GPU(s); "
                               f"start at most {count} processes per node (--nproc-per-node / --gpus).")
        return torch.device("cuda", local_rank)
    device = resolve_device(requested)
    if device.type == "cuda":
        raise BerniniError(f"--device {requested} names one GPU for every rank; in a multi-GPU run pass --device cuda "
                           "(rank i uses this node's GPU i) or --device cpu.")
    return device


def init_process_group(device: torch.device, timeout_s: float) -> None:
    """Join the process group torchrun's environment describes (NCCL on CUDA, gloo on the CPU), or say why not."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=float(timeout_s)),
                                **({"device_id": device} if device.type == "cuda" else {}))
    except (RuntimeError, ValueError, OSError) as exc:
        raise BerniniError(
            f"rank {os.environ.get('RANK')} could not join the {backend} process group at {where} "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}). Check that every process was started "
            f"with the same world size ({os.environ.get('WORLD_SIZE')}) and rendezvous endpoint, that the port is "
            "free and reachable from every node, and that no process of an earlier run still holds it.") from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_local(nprocs: int, argv: Sequence[str], *, device: Optional[str], timeout_s: float) -> None:
    """`generate --gpus N`: start N copies of this command on this machine as one process group (torch's elastic
    launcher, what torchrun runs) and wait for them. A rank that fails stops the others; the error names it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nprocs < 2:
        raise BerniniError(f"--gpus {nprocs}: a multi-GPU run needs at least 2 processes; drop --gpus to run in one.")
    on_cpu = device == "cpu"
    if not on_cpu:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available < nprocs:
            fix = f"pass --gpus {available}" if available >= 2 else "use --device cpu to try it on the CPU"
            raise BerniniError(f"--gpus {nprocs} asks for {nprocs} GPUs but this machine has {available}; {fix}.")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=f"bernini-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
                          monitor_interval=0.5, start_method="spawn",
                          rdzv_configs={"join_timeout": max(60.0, float(timeout_s))})
    try:
        elastic_launch(config, sys.executable)("-m", "bernini_core", *argv)
    except ChildFailedError as exc:
        raise BerniniError(describe_failures(exc)) from None


def describe_failures(exc) -> str:
    """One line per failed rank: its exit code or signal and, where it wrote one, its error."""
    lines = []
    for rank, failure in sorted(exc.failures.items()):
        code = failure.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        message = ""
        if failure.error_file and Path(failure.error_file).is_file():
            message = f": {failure.message}" if getattr(failure, "message", None) else ""
        lines.append(f"rank {rank} {how}{message}")
    return ("the multi-process run failed, the other ranks were stopped: " + "; ".join(lines)
            + ". Its own output above says why.")


def describe_collective_error(exc: BaseException, rank: int) -> str:
    """A failed collective (a peer died, hung past the timeout, or the network broke) in words."""
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    hint = "it timed out: a rank hung or is far slower than the others" if "imed out" in text else \
        "a peer rank stopped or lost its connection"
    return (f"rank {rank}: a collective operation with the other ranks failed ({hint}: {text}). The rank that "
            "failed first names the cause in its own output; nothing was written by this run.")
