"""Devices, dtypes and the offloading policy (docs/architecture.md §5).

Every large module (DiT experts, UMT5, VAE, later the planner) is held through one
`ModelHandle`. Stages ask the runtime to `use(handle)` and never call `.to(device)`
themselves, so the same stage code runs under two policies:

* standalone (tests, CLI, Python): the handle moves the module itself; with
  `offload=True` a module goes back to the offload device after its stage, so at most
  one big module sits on the accelerator (the official pipeline's behaviour, docs/official_behaviour.md §6.4);
* inside ComfyUI: `comfy_bridge` supplies a runtime whose handles are ModelPatchers
  loaded with `load_models_gpu`, with ComfyUI's progress bar and interrupt check.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from .errors import BerniniError

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in set(DTYPES.values()):
            raise BerniniError(f"dtype {dtype} is not supported; use one of bf16, fp16, fp32.")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise BerniniError(f"dtype {dtype!r} is not supported; use one of bf16, fp16, fp32.")


def resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BerniniError(f"device {device!r} is not a valid torch device (e.g. 'cuda', 'cuda:1', 'cpu').") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BerniniError(f"device {str(device)!r} was requested but CUDA is not available; use device='cpu'.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BerniniError(f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                           f"device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}.")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise BerniniError(f"device {str(device)!r} was requested but Apple's MPS is not available on this machine; "
                           "use device='cpu' (or 'cuda' where there is an NVIDIA GPU).")
    if device.type not in ("cuda", "cpu", "mps"):
        raise BerniniError(f"device {str(device)!r} cannot run Bernini ('{device.type}' holds no data to compute "
                           "with or is not supported); use 'cuda', 'cuda:N' or 'cpu'.")
    return device


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's tensors held by this process (a weight sharded with --fsdp, a DTensor, counts only
    this rank's shard)."""
    total = 0
    for t in module.state_dict().values():
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


@dataclass
class ModelHandle:
    """One large module with where it runs and where it rests."""

    name: str
    module: torch.nn.Module
    load_device: torch.device
    offload_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def size_bytes(self) -> int:
        return module_bytes(self.module)

    def load(self, memory_required: int = 0) -> torch.nn.Module:
        """Put the module on its load device. `memory_required`: working memory (bytes) the caller will need
        beside the weights; a memory manager (ComfyUI's) frees that much, the standalone policy ignores it."""
        self._move(self.load_device)
        return self.module

    def offload(self) -> None:
        if self.offload_device != self.load_device:
            self._move(self.offload_device)

    def _move(self, device: torch.device) -> None:
        swap = getattr(self.module, "block_swap", None)  # acceleration/block_swap.py: its host blocks stay put
        if swap is not None:
            swap.move_resident(device)
        else:
            self.module.to(device)


# How many stages hold each module now, process-wide: a module can be shared by two pipelines (shared components or
# planner bundle, one Runtime or two), so one thread's release must not offload weights another thread computes with.
# Moves happen under the lock, so a load never interleaves with an offload of the same weights.
_USERS: dict = {}  # module -> count
_USERS_LOCK = threading.Lock()


class Runtime:
    """Standalone policy: moves modules itself; progress and interrupts are callbacks."""

    def __init__(
        self,
        device="auto",
        *,
        offload: bool = True,
        progress: Optional[Callable[[str, int, int], None]] = None,
        interrupted: Optional[Callable[[], bool]] = None,
    ):
        self.device = resolve_device(device)
        self.offload = offload and self.device.type != "cpu"
        self._progress = progress
        self._interrupted = interrupted

    def handle(self, name: str, module: torch.nn.Module) -> ModelHandle:
        offload_device = torch.device("cpu") if self.offload else self.device
        return ModelHandle(name, module, self.device, offload_device)

    @contextlib.contextmanager
    def use(self, *handles: ModelHandle, memory_required: int = 0) -> Iterator[tuple[torch.nn.Module, ...]]:
        """Load the handles' modules for one stage; offload them afterwards under the offload policy.
        `memory_required`: the stage's working memory in bytes (see ModelHandle.load)."""
        acquired = []
        try:
            for h in handles:
                self.acquire(h)
                acquired.append(h)
            yield tuple(h.module for h in acquired)
        finally:
            self.release(*acquired)

    def acquire(self, handle: ModelHandle, memory_required: int = 0) -> torch.nn.Module:
        """Load one module for a stage that calls `release` when done with it (counted, see release)."""
        with _USERS_LOCK:
            module = handle.load(memory_required)
            _USERS[handle.module] = _USERS.get(handle.module, 0) + 1
            return module

    def release(self, *handles: ModelHandle) -> None:
        """A stage is done with these modules (the idle expert, a finished stage): under the offload policy move each
        off the accelerator now, unless another stage (another thread) still holds it; its last release does."""
        with _USERS_LOCK:
            for h in handles:
                users = _USERS.pop(h.module, 0) - 1
                if users > 0:
                    _USERS[h.module] = users
                elif self.offload:
                    h.offload()
        if self.offload and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def progress(self, stage: str, step: int, total: int, latent: Optional[torch.Tensor] = None) -> None:
        """One step of a stage done ("plan", "sample"); `latent` (normalised Wan latent) lets a UI preview it."""
        if self._progress is not None:
            self._progress(stage, step, total)

    def check_interrupt(self) -> None:
        if self._interrupted is not None and self._interrupted():
            raise InterruptedError("Bernini run interrupted")
