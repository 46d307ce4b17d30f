"""The driver side of a pool: Ray actors (worker.py), one per GPU or CPU process, forming one torch.distributed
group of the scale-out engine. The process that owns the pool (ComfyUI, or a Python script) keeps UMT5, the VAE and
the planner; it sends each render's stage inputs and gets the latents back.

Lifecycle: `start()` connects to Ray (a runtime on this machine, started or reused, or a cluster), checks the
resources and the model paths on every node before any weight loads, then joins the ranks and loads the experts.
`sample()` reports the leader's steps to the caller's runtime (progress bar, previews) and relays its interrupt to
the ranks, which stop together at the next step. A rank that dies or fails ends the whole pool with one error naming
the rank and host; the next `sample()` starts a fresh pool. `shutdown()` ends every actor; so does dropping the last
reference, the process exiting, or starting another pool in this process (GPUs are not shared between pools).
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any, Callable, Optional

from ...errors import BerniniError
from .experts import spec_paths
from .options import NODE, PoolOptions

log = logging.getLogger("bernini.pool")

SETTLE_S = 10.0  # after one rank fails: how long the others get to finish before the pool is ended
POLL_S = 0.1  # how often the driver collects the leader's steps and checks its interrupt while a run is out
INSTALL_HINT = ('Bernini Multi-GPU runs on Ray, which is not installed in this Python: pip install "ray>=2.9" (in '
                "ComfyUI's environment; or pip install \".[parallel]\" in the pack's folder).")


def import_ray():
    try:
        import ray
    except ImportError:
        raise BerniniError(INSTALL_HINT) from None
    return ray


def _kill(actors: list) -> None:
    """End every actor (no wait: a hung rank must not hold up the driver)."""
    try:
        import ray
    except ImportError:
        return
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone, or Ray already shut down at exit
            pass


class WorkerPool:
    """A pool of ranks rendering with one model's experts. `spec` (experts.py) names the weights; `heads` is the DiT's
    attention head count (the Ulysses degree must divide it)."""

    # Pools alive in this process. A process-wide record on purpose: GPUs belong to one pool at a time, so starting
    # a pool ends the others (e.g. the previous settings of a Bernini Multi-GPU node whose output ComfyUI still caches).
    _live: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()

    def __init__(self, options: PoolOptions, spec: dict, *, heads: int, dtype: str = "bf16",
                 attention: str = "auto", label: str = "Bernini"):
        self.options, self.spec, self.dtype, self.attention, self.label = options, spec, dtype, attention, label
        self.heads = heads
        self.layout = options.layout(heads)
        self.actors: list = []
        self.places: list[dict] = []  # per rank: host, address, pid, ...
        self.loaded: Optional[dict] = None
        self._finalizer = None

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        return bool(self.actors)

    @property
    def world(self) -> int:
        return self.layout.world_size

    def describe(self) -> str:
        return self.options.describe(self.layout)

    def pids(self) -> list[int]:
        return [place["pid"] for place in self.places]

    # ------------------------------------------------------------------ start / stop
    def start(self) -> "WorkerPool":
        if self.running:
            return self
        ray = import_ray()
        self._connect(ray)
        self._check_resources(ray)
        for other in list(WorkerPool._live):
            if other is not self:
                other.shutdown()
        world, opts = self.world, self.options
        remote = ray.remote(RenderWorkerActor())
        self.actors = [remote.options(**self._actor_options(rank)).remote(rank, world, opts.device)
                       for rank in range(world)]
        self._finalizer = weakref.finalize(self, _kill, list(self.actors))
        WorkerPool._live.add(self)
        started = time.monotonic()
        try:
            self.places = self._gather([a.where.remote() for a in self.actors], "start")
            missing = self._gather([a.missing_paths.remote(spec_paths(self.spec)) for a in self.actors], "start")
            for place, paths in zip(self.places, missing):
                if paths:
                    raise BerniniError(f"{NODE}: {', '.join(repr(p) for p in paths)} does not exist on {place['host']} "
                                       f"(rank {self.places.index(place)}); every machine of the Ray cluster must "
                                       "see the model at the same path (shared storage, or a copy at that path).")
            leader = self.places[0]
            layout = {"ulysses": self.layout.ulysses, "cfg": self.layout.cfg}
            self._gather([a.join.remote(leader["address"], leader["port"], layout, opts.timeout_s)
                          for a in self.actors], "join")
            loads = self._gather([a.load.remote(self.spec, self.dtype, self.attention, opts.fsdp)
                                  for a in self.actors], "load")
            self.loaded = loads[0]
        except BaseException:
            self.shutdown()
            raise
        hosts = sorted({p["host"] for p in self.places})
        log.info("%s: %s pool ready on %s in %.1f s (%s)", NODE, self.label, ", ".join(hosts),
                 time.monotonic() - started, self.describe())
        return self

    def shutdown(self) -> None:
        """End every rank; the next sample() starts a fresh pool."""
        actors, self.actors = self.actors, []
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        WorkerPool._live.discard(self)
        _kill(actors)
        self.loaded = None

    def _connect(self, ray) -> None:
        address = self.options.ray_address
        if ray.is_initialized():
            return  # this process already talks to a Ray runtime (ours from an earlier pool, or the user's)
        if address and address != "auto":
            _probe(address)  # Ray itself retries an unreachable address for minutes
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False,
                                  "runtime_env": {"env_vars": {"PYTHONPATH": _worker_pythonpath()}}}
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            where = f"the Ray cluster at {address!r}" if address else "a Ray runtime on this machine"
            raise BerniniError(f"{NODE}: could not connect to {where} ({type(exc).__name__}: "
                               f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc}). Start it "
                               "with `ray start --head` (then ray_address auto or host:port), or leave ray_address "
                               "empty to start one here.") from None

    def _check_resources(self, ray) -> None:
        """Fewer GPUs (or CPUs) than asked is an error before anything starts."""
        world, opts = self.world, self.options
        total = ray.cluster_resources()
        if opts.device == "cpu":
            return  # CPU ranks ask Ray for no CPU slot (a test machine may have fewer cores than ranks)
        if opts.device_ids is not None:
            import torch

            here = torch.cuda.device_count() if torch.cuda.is_available() else 0
            absent = [i for i in opts.device_ids if i >= here]
            if absent:
                raise BerniniError(f"{NODE}: gpus lists device(s) {', '.join(map(str, absent))}, but this machine has "
                                   f"{here} GPU(s) (ids 0..{max(here - 1, 0)}); device ids name this machine's GPUs "
                                   "(give a count to use GPUs anywhere in the Ray cluster).")
            return
        gpus = int(total.get("GPU", 0))
        if gpus < world:
            raise BerniniError(f"{NODE}: the layout needs {world} GPUs ({self.describe()}), but the Ray cluster has "
                               f"{gpus}; add machines (ray start --address=...) or lower gpus.")

    def _actor_options(self, rank: int) -> dict:
        opts = self.options
        options: dict[str, Any] = {"max_concurrency": 3, "max_restarts": 0}
        if opts.device == "cpu":
            options.update(num_cpus=0)
        elif opts.device_ids is not None:
            # this machine's GPUs by id: Ray's GPU accounting is bypassed and each rank sees its own device only
            options.update(num_cpus=0, num_gpus=0,
                           runtime_env={"env_vars": {"CUDA_VISIBLE_DEVICES": str(opts.device_ids[rank])}},
                           resources={f"node:{_this_node_address()}": 0.001})
        else:
            options.update(num_cpus=0, num_gpus=1)
        return options

    # ------------------------------------------------------------------ runs
    def sample(self, family: str, tensors: dict, meta: dict, settings: dict, *, runtime=None,
               boundary: Optional[float] = None, force: bool = False):
        """Render one video on the pool; returns the leader's latents. `runtime`: the driver's runtime (progress per
        step with the latest latent for previews, and its interrupt check)."""
        self.start()
        ray = import_ray()
        request = ray.put({"family": family, "tensors": tensors, "meta": meta, "settings": settings,
                           "boundary": boundary, "force": force})
        refs = [a.sample.remote(request) for a in self.actors]
        results = self._gather(refs, "sample", runtime=runtime)
        return results[0]

    def _gather(self, refs: list, stage: str, runtime=None) -> list:
        """The results of one call on every rank. While they run: the leader's steps go to `runtime.progress`, and
        its interrupt stops the ranks. A rank that fails ends the pool with its error (the others would otherwise
        wait for it in a collective until the timeout)."""
        ray = import_ray()
        pending = list(refs)
        interrupted: Optional[BaseException] = None
        deadline = None
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            for ref in done:
                try:
                    ray.get(ref)
                except BaseException as exc:  # noqa: BLE001 - translated below
                    if interrupted is not None and _is_interrupt(exc):
                        continue
                    # A check every rank makes (a bad setting) fails on all of them at once and leaves the pool
                    # sound; a rank failing alone leaves the others waiting in a collective: the pool ends. The
                    # cause named is a rank that died, if one did (its peers only see a broken connection).
                    settled, _ = ray.wait(pending, num_returns=len(pending), timeout=SETTLE_S) if pending else ([], [])
                    failures = [(refs.index(ref), exc)] + [(refs.index(r), e) for r in list(done) + list(settled)
                                                           if r is not ref for e in [_error_of(ray, r)]
                                                           if e is not None]
                    died = [f for f in failures if isinstance(f[1], ray.exceptions.RayActorError)]
                    rank, cause = (died or failures)[0]
                    if died or len(settled) < len(pending) or not isinstance(getattr(cause, "cause", None),
                                                                             BerniniError):
                        self.shutdown()
                    raise self._failure(cause, rank, stage, pool_ended=not self.running) from None
            if runtime is not None and stage == "sample" and self.actors:
                self._relay_progress(ray, runtime)
                if interrupted is None:
                    try:
                        runtime.check_interrupt()
                    except BaseException as exc:  # ComfyUI's interrupt derives from BaseException
                        interrupted = exc
                        for actor in self.actors:
                            actor.stop.remote()
                        deadline = time.monotonic() + max(60.0, self.options.timeout_s)
            if interrupted is not None and deadline is not None and time.monotonic() > deadline:
                self.shutdown()  # a rank did not stop: start fresh next time
                break
        if interrupted is not None:
            raise interrupted
        return ray.get(refs)

    def _relay_progress(self, ray, runtime) -> None:
        try:
            events, latest = ray.get(self.actors[0].events.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the rank's own failure arrives through its sample ref
            return
        for i, (stage, step, total) in enumerate(events):
            runtime.progress(stage, step, total, latent=latest if i == len(events) - 1 else None)

    def _failure(self, exc: BaseException, rank: int, stage: str, pool_ended: bool) -> BerniniError:
        ray = import_ray()
        place = self.places[rank] if rank < len(self.places) else {}
        where = f"rank {rank}" + (f" on {place['host']}" if place.get("host") else "")
        after = " The pool was stopped; the next run starts a fresh one." if pool_ended else ""
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BerniniError):
            return BerniniError(str(cause) + after)
        if isinstance(exc, ray.exceptions.RayActorError):
            return BerniniError(f"{NODE}: {where} died during {stage} ({_first_line(exc)}): killed, or out of memory "
                                f"on its GPU/host.{after}")
        text = _first_line(cause) if cause is not None else _first_line(exc)
        if "No module named 'bernini_core" in str(exc):
            text += (" (the pack must be importable on every machine of the cluster: the same ComfyUI folder at the "
                     "same path, or pip install it there)")
        return BerniniError(f"{NODE}: {where} failed during {stage}: {text}.{after}")


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """A BerniniError unless host:port (or ray://host:port) accepts a TCP connection within `timeout_s`."""
    import socket

    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise BerniniError(f"{NODE}: ray_address {address!r} is not host:port (e.g. 10.0.0.5:6379), 'auto' or empty.")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise BerniniError(f"{NODE}: the Ray cluster at {address!r} cannot be reached ({exc.strerror or exc}); start "
                           f"it with `ray start --head --port={port}` on {host}, check the address and the firewall, "
                           "or leave ray_address empty to start a Ray runtime on this machine.") from None


def _error_of(ray, ref) -> Optional[BaseException]:
    try:
        ray.get(ref, timeout=0)
    except BaseException as exc:  # noqa: BLE001 - the error is the answer
        return exc
    return None


def _is_interrupt(exc: BaseException) -> bool:
    return isinstance(getattr(exc, "cause", None), InterruptedError) or "InterruptedError" in str(exc)[:2000]


def _first_line(exc) -> str:
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    for line in reversed(lines):  # Ray prints the remote traceback; its last line is the exception itself
        if ":" in line and not line.startswith(" "):
            return line.strip()[:400]
    return (lines[-1].strip()[:400] if lines else type(exc).__name__)


def _this_node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def RenderWorkerActor() -> Callable:
    """The actor class (imported lazily: the pack imports without Ray)."""
    from .worker import RenderWorker

    return RenderWorker


def _worker_pythonpath() -> str:
    """Ray workers are fresh interpreters: inside ComfyUI the pack is not installed, only appended to the driver's
    sys.path (its __init__.py), so a worker could not import bernini_core. Its parent folder goes first on their
    PYTHONPATH (found by the real ComfyUI server test, tests/integration/test_comfy_server.py)."""
    import os

    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    existing = os.environ.get("PYTHONPATH", "")
    return here + (os.pathsep + existing if existing else "")
