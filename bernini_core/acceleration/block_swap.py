"""Block swap: run a DiT whose weights do not fit the GPU by keeping its last N blocks in host memory.

Standalone path only (inside ComfyUI its own low-VRAM streaming moves our ComfyUI-ops layers instead).

How a forward runs with N blocks on the host. The swapped blocks' parameters and buffers (fp8 weights with their
``scale_weight``, GGUF packed uint8 bytes, biases, tables...) live in host memory, pinned when the device is CUDA;
that host copy is the truth: inference never modifies weights, so nothing is ever copied back. Up to two device
staging buffers (flat bytes, each as large as the largest swapped block) are taken from the allocator at the first
swapped block of a forward and given back at its end. While block i computes on the main stream, the next swapped
block is copied into the other staging buffer on a side CUDA stream; the main stream waits on that copy's event
before block i+1 runs, whose parameters then point at views of the staging buffer (``tensor.data`` swapped, so the
Parameter objects and any references to them stay the same). After the block ran its parameters point back at the
host copies and an event on the main stream marks its staging buffer free; the side stream waits on that event
before it overwrites the buffer with the block after next. So device memory for swapped weights is bounded by two
blocks whatever the CPU's lead over the GPU, and no host-device synchronisation happens inside a forward. The
staging buffers come from the main stream, so returning them to the allocator needs no ``record_stream``: every
side-stream copy into them was waited on by the main stream first.

On a device without CUDA streams (the CPU, where device == host) the same schedule runs with plain copies into the
same staging views, so the whole logic is testable there; every pass records its schedule as ("prefetch" | "wait" |
"run" | "release", block index) pairs in ``BlockSwap.schedule``.

Not supported together with Ulysses sequence parallel (untested together) or FSDP sharding (which already divides
the weights).
Enable it after weights and LoRAs are loaded; call :func:`disable_block_swap` before replacing any weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from ..errors import BerniniError

_ALIGN = 256  # byte alignment of each tensor inside a staging buffer (fp8 matmul and vector loads need >= 16)


@dataclass
class _HostBlock:
    """One swapped block: the registered tensors whose ``.data`` is swapped and their host copies."""

    index: int
    tensors: list  # the Parameter / buffer objects of the block (identity kept for the block's lifetime)
    hosts: list  # host copies, contiguous (pinned for CUDA)
    offsets: list  # byte offset of each tensor inside a staging buffer
    nbytes: int  # staging bytes this block needs (aligned)
    buffer: int = 0  # which staging buffer it uses
    ready: Optional[object] = None  # CUDA event of its prefetch; on the CPU True once copied
    waited: bool = False


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _unique_tensors(module: nn.Module) -> list:
    """The module's parameters and buffers, each tensor object once (shared ones are swapped once)."""
    seen, tensors = set(), []
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors.append(tensor)
    return tensors


def _check_blocks_on_host(dit: nn.Module, blocks_on_host) -> int:
    blocks = getattr(dit, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise BerniniError(f"block swap needs a DiT with a `blocks` ModuleList, got {type(dit).__name__}.")
    count = len(blocks)
    if isinstance(blocks_on_host, bool) or not isinstance(blocks_on_host, int) or not 0 <= blocks_on_host <= count:
        raise BerniniError(f"blocks_on_host={blocks_on_host!r}: give a whole number of DiT blocks to keep in host "
                           f"memory, from 0 (none, everything on the GPU) to {count} (all of this DiT's blocks).")
    return blocks_on_host


def _check_not_sequence_parallel(dit: nn.Module) -> None:
    if getattr(dit, "sequence_parallel", None) is not None:
        raise BerniniError("block swap and Ulysses sequence parallel (--ulysses) are not supported together: "
                           "drop the block swap (each rank then needs the whole expert on its GPU), or use --fsdp "
                           "with --ulysses to divide the weights over the GPUs instead.")


def _check_not_sharded(dit: nn.Module) -> None:
    from ..parallel import fsdp

    if any(fsdp.is_sharded(module) for module in dit.modules()):
        raise BerniniError("block swap and FSDP sharding (--fsdp) are not supported together: an FSDP-sharded "
                           "expert already holds only its share of the weights. Use one or the other.")


def memory_plan(dit: nn.Module, blocks_on_host: int) -> dict:
    """Bytes of weights per place when the last `blocks_on_host` blocks are swapped (works on a meta DiT).

    device_bytes: weights resident on the device (non-block weights and the first blocks);
    device_peak_bytes: plus the staging buffers (two swapped blocks, one if only one is swapped);
    host_bytes: weights kept in host memory (pinned under CUDA), which is also what each forward copies to the device.
    Activations are not included (see BerniniDiT.working_memory).
    """
    count = _check_blocks_on_host(dit, blocks_on_host)
    first_swapped = len(dit.blocks) - count
    swapped_ids, block_bytes = set(), []
    for block in list(dit.blocks)[first_swapped:]:
        tensors = _unique_tensors(block)
        swapped_ids.update(id(t) for t in tensors)
        block_bytes.append(sum(_aligned(_tensor_bytes(t)) for t in tensors))
    resident = sum(_tensor_bytes(t) for t in _unique_tensors(dit) if id(t) not in swapped_ids)
    host = sum(_tensor_bytes(t) for t in _unique_tensors(dit) if id(t) in swapped_ids)
    staging = min(count, 2) * max(block_bytes, default=0)
    return {"blocks_on_host": count, "device_bytes": resident, "device_peak_bytes": resident + staging,
            "host_bytes": host, "transfer_bytes_per_forward": host}


class BlockSwap:
    """The swap state of one DiT (``dit.block_swap``); made by :func:`enable_block_swap`.

    ``swapped``: indices of the blocks kept on the host; ``schedule``: the last forward's events;
    ``pinned``: whether the host copies are page-locked (fast asynchronous copies).
    """

    def __init__(self, dit: nn.Module, blocks_on_host: int, device: torch.device):
        self.device = device
        self.blocks_on_host = blocks_on_host
        self.schedule: list[tuple[str, int]] = []
        self.pinned = False
        self._dit: Optional[nn.Module] = dit
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device=device) if self._cuda else None
        self._free_events: list = []
        self._staging: Optional[list] = None
        self._pass = 0  # guards against a stale pass (aborted by an exception) releasing a newer one's blocks
        first = len(dit.blocks) - blocks_on_host
        self._host_blocks: dict[int, _HostBlock] = {}
        for position, index in enumerate(range(first, len(dit.blocks))):
            tensors = _unique_tensors(dit.blocks[index])
            offsets, nbytes = [], 0
            for tensor in tensors:
                offsets.append(nbytes)
                nbytes += _aligned(_tensor_bytes(tensor))
            self._host_blocks[index] = _HostBlock(index, tensors, [], offsets, nbytes,
                                                  buffer=position % min(blocks_on_host, 2))
        self._staging_bytes = max((b.nbytes for b in self._host_blocks.values()), default=0)

    @property
    def swapped(self) -> tuple[int, ...]:
        return tuple(self._host_blocks)

    # ------------------------------------------------------------------ placement
    def _place(self) -> None:
        """Swapped blocks to the host (pinned under CUDA), every other weight to the device, one tensor at a time."""
        self.move_resident(self.device)
        self.pinned = self._cuda and torch.cuda.is_available()
        for block in self._host_blocks.values():
            for tensor in block.tensors:
                tensor.data = host = self._host_copy(tensor.data)
                block.hosts.append(host)

    def move_resident(self, device) -> None:
        """Move the weights that are not swapped (the device-resident part) to `device`, one tensor at a time; the
        swapped blocks' host copies stay where they are. The runtime's load / offload of a swapped expert calls this
        instead of ``module.to`` (which would pull the swapped blocks onto the GPU too)."""
        self._abandon_pass()
        swapped_ids = {id(t) for block in self._host_blocks.values() for t in block.tensors}
        for tensor in _unique_tensors(self._dit):
            if id(tensor) not in swapped_ids:
                tensor.data = tensor.data.to(device)

    def _host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.pinned:
            try:
                return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor)
            except RuntimeError:  # page-locked memory exhausted: pageable copies still work, only slower
                self.pinned = False
        return tensor.to("cpu").contiguous()

    def _restore(self) -> None:
        """Every weight back on the device (plain, unpinned copies); the swap is unusable afterwards."""
        self._abandon_pass()
        for block in self._host_blocks.values():
            for tensor, host in zip(block.tensors, block.hosts):
                tensor.data = host.to(self.device)
            block.hosts = []
        self._dit = None

    # ------------------------------------------------------------------ the forward schedule
    def blocks(self) -> Iterator[nn.Module]:
        """The DiT's blocks in order, each with its weights on the device while the caller runs it."""
        dit = self._dit
        if dit is None or getattr(dit, "block_swap", None) is not self:
            raise BerniniError("this block swap was disabled; call enable_block_swap again to use one.")
        _check_not_sequence_parallel(dit)  # may have been set after enabling
        self._abandon_pass()
        self._pass += 1
        this_pass = self._pass
        self.schedule = []
        blocks = dit.blocks
        try:
            for index, block in enumerate(blocks):
                swapped = index in self._host_blocks
                if swapped:
                    self._prefetch(index)  # no-op when the previous block already prefetched it
                    self._wait(index)
                if index + 1 in self._host_blocks:
                    self._prefetch(index + 1)  # overlaps with this block's compute
                self.schedule.append(("run", index))
                yield block
                if swapped:
                    self._release(index)
        finally:
            if self._pass == this_pass:
                self._abandon_pass()

    def _prefetch(self, index: int) -> None:
        block = self._host_blocks[index]
        if block.ready is not None:
            return
        registered = _unique_tensors(self._dit.blocks[index])
        if len(registered) != len(block.tensors) or any(
                now is not known or known.data_ptr() != host.data_ptr()
                for now, known, host in zip(registered, block.tensors, block.hosts)):
            raise BerniniError(f"block {index}'s weights were replaced after enable_block_swap; call "
                               "disable_block_swap before changing weights (or loading LoRAs), then enable it again.")
        self.schedule.append(("prefetch", index))
        staging = self._staging_buffer(block.buffer)
        if self._stream is None:
            for host, offset in zip(block.hosts, block.offsets):
                self._view(staging, offset, host).copy_(host)
            block.ready = True
            return
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(self._free_events[block.buffer])  # the block before last finished reading it
            for host, offset in zip(block.hosts, block.offsets):
                self._view(staging, offset, host).copy_(host, non_blocking=True)
            block.ready = torch.cuda.Event()
            block.ready.record(self._stream)

    def _wait(self, index: int) -> None:
        block = self._host_blocks[index]
        self.schedule.append(("wait", index))
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_event(block.ready)
        block.waited = True
        staging = self._staging[block.buffer]
        for tensor, host, offset in zip(block.tensors, block.hosts, block.offsets):
            tensor.data = self._view(staging, offset, host)

    def _release(self, index: int) -> None:
        block = self._host_blocks[index]
        self.schedule.append(("release", index))
        self._unstage(block)

    def _unstage(self, block: _HostBlock) -> None:
        if block.waited:
            for tensor, host in zip(block.tensors, block.hosts):
                tensor.data = host
        elif self._stream is not None and block.ready is not None:
            # prefetched but never used (an aborted pass): order the buffer's reuse after the copy
            torch.cuda.current_stream(self.device).wait_event(block.ready)
        if self._stream is not None and block.ready is not None:
            self._free_events[block.buffer].record(torch.cuda.current_stream(self.device))
        block.ready, block.waited = None, False

    def _abandon_pass(self) -> None:
        """Point every staged block back at its host copy and give the staging buffers back to the allocator."""
        for block in self._host_blocks.values():
            if block.ready is not None:
                self._unstage(block)
        self._staging, self._free_events = None, []

    def _staging_buffer(self, number: int) -> torch.Tensor:
        if self._staging is None:
            count = min(self.blocks_on_host, 2)
            self._staging = [torch.empty(self._staging_bytes, dtype=torch.uint8, device=self.device)
                             for _ in range(count)]
            if self._stream is not None:
                # allocated on the main stream: the side stream may write only after the main stream's earlier work
                # on this memory (it may have been activations a moment ago)
                main = torch.cuda.current_stream(self.device)
                self._free_events = [torch.cuda.Event() for _ in range(count)]
                for event in self._free_events:
                    event.record(main)
        return self._staging[number]

    @staticmethod
    def _view(staging: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
        return staging.narrow(0, offset, _tensor_bytes(like)).view(like.dtype).view(like.shape)


def enable_block_swap(dit: nn.Module, blocks_on_host: int, device) -> BlockSwap:
    """Keep the DiT's last `blocks_on_host` blocks in host memory and stream them to `device` during forwards.

    Every other weight moves to `device`. Returns the swap state, also set as ``dit.block_swap`` (what the forward
    consults). Enabling again first restores the plain model. 0 keeps every block on the device but still runs the
    (empty) schedule.
    """
    count = _check_blocks_on_host(dit, blocks_on_host)
    _check_not_sequence_parallel(dit)
    _check_not_sharded(dit)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise BerniniError(f"block swap device {device!r}: not a torch device name (e.g. 'cuda', 'cuda:1').") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BerniniError(f"block swap device {device}: CUDA is not available on this machine.")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    if any(t.is_meta for t in _unique_tensors(dit)):
        raise BerniniError("block swap needs the DiT's weights loaded; this one still has meta tensors. Load the "
                           "weights first, then call enable_block_swap.")
    disable_block_swap(dit)
    swap = BlockSwap(dit, count, device)
    swap._place()
    dit.block_swap = swap
    return swap


def disable_block_swap(dit: nn.Module) -> bool:
    """Move every swapped block back onto the swap's device and drop the swap; False when none was enabled."""
    swap = getattr(dit, "block_swap", None)
    if swap is None:
        return False
    swap._restore()
    del dit.block_swap
    return True
