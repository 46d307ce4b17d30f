"""Run a function in a fresh torch.distributed world of several CPU processes (gloo), for the parallel tests.

``run_world(fn, world_size, *args)`` spawns ``world_size`` processes (start method "spawn"), each of which
initialises a gloo process group on a free local port, calls ``fn(rank, world_size, *args)`` and returns its
JSON-able result; the parent gets the results in rank order. Every world has a hard timeout: a hung collective
kills all its processes and fails with a message instead of hanging the test run. ``fn`` must be a module-level
function; each rank loads its module from the file (pytest's importlib import mode gives test modules names that
a fresh process may not be able to import).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import inspect
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago (bound to port 0, then released)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load_function(path: str, qualname: str):
    name = "_bernini_world_" + os.path.splitext(os.path.basename(path))[0]
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    target = module
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _rank_main(rank, fn_where, world_size, port, args, out_dir, collective_timeout):
    fn = _load_function(*fn_where)
    torch.set_num_threads(1)  # several processes share few cores
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # stay on loopback whatever the host name resolves to
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=collective_timeout))
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_world(fn, world_size: int, *args, timeout: float = 120.0, collective_timeout: float = 60.0) -> list:
    """fn(rank, world_size, *args) in every rank of a new gloo world; its results in rank order.

    Raises AssertionError with the failing rank's traceback, or when the world runs past ``timeout`` seconds."""
    with tempfile.TemporaryDirectory(prefix="bernini_world_") as out_dir:
        port = free_port()
        fn_where = (os.path.abspath(inspect.getfile(fn)), fn.__qualname__)
        context = mp.start_processes(_rank_main, args=(fn_where, world_size, port, args, out_dir, collective_timeout),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    alive = [i for i, p in enumerate(context.processes) if p.is_alive()]
                    raise AssertionError(
                        f"world of {world_size} running {fn.__name__} did not finish within {timeout:.0f} s "
                        f"(ranks still running: {alive}); a collective probably waits for a rank that never calls it."
                    )
        except mp.ProcessRaisedException as error:  # a rank raised: its traceback is in the message
            raise AssertionError(f"world of {world_size} running {fn.__name__} failed:\n{error}") from None
        except mp.ProcessExitedException as error:
            raise AssertionError(f"world of {world_size} running {fn.__name__}: a rank died: {error}") from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join(5)
        results = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.json")
            if not os.path.exists(path):
                raise AssertionError(f"world of {world_size} running {fn.__name__}: rank {rank} returned no result.")
            with open(path) as f:
                results.append(json.load(f))
        return results
