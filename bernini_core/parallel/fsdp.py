"""Shard a DiT expert's weights over its Ulysses group with FSDP2 (``--fsdp``), so that a 14B expert needs about
1/U of its bytes per GPU instead of all of them (docs/architecture.md §5.1).

What is sharded, and over whom. Every parameter is split row-wise (FSDP2's ``Shard(0)``) over the ranks of this
process's **Ulysses group**; each DiT block is one FSDP unit and the rest (patch embedding, time and text
embedders, output head) is the root unit. Before a unit runs, its parameters are all-gathered, unchanged, into
full tensors; right after it they are freed again (``reshard_after_forward=True``, the root too), so during a
forward a rank holds its shards, the root unit (about 0.5 GiB for A14B) and one whole block (0.65 GiB). The
gathered tensors are byte-for-byte the original parameters (mixed dtypes travel as raw bytes), so the forward
computes exactly what the unsharded expert computes: same dtypes (the fp32 islands of ``cast_dit_`` stay fp32,
no mixed-precision policy), same kernels, the same output bits.

Why the Ulysses group and not the whole replica: an FSDP all-gather is a collective, so every rank of the mesh
must run the same forwards in the same order. The ranks of a Ulysses group always do (they shard the same
forward); the arm groups of a replica (``--cfg_parallel``) do not: they run different guidance arms, and a step's
2-6 arms split over C groups give them different numbers of forwards (3 arms over 2 groups: 2 and 1), which
would deadlock a replica-wide mesh. So ``--fsdp`` divides the expert by U, and needs U >= 2.

Weights are for inference only: ``shard_expert`` turns ``requires_grad`` off (FSDP2 then accepts the mixed bf16 /
fp32 parameters of one block in one unit). Moving a sharded expert with ``.to(device)`` (the runtime's offload
policy) is supported by FSDP2 (``FSDPModule._apply`` moves the shards and re-registers them). Not supported: the
ComfyUI runtime (a ModelPatcher casts and moves weights itself), ``copy.deepcopy`` of a sharded expert (FSDP2
refuses), and changing or reloading its weights in place.
"""

from __future__ import annotations

import math
import types
from typing import Optional

import torch
from torch import nn

from ..errors import BerniniError
from .config import ParallelConfig
from .state import ParallelState


def check_fsdp(config: ParallelConfig) -> None:
    """Raise BerniniError unless ``--fsdp`` can shard the experts on this layout (pure arithmetic: call it before
    any weight loads)."""
    if config.ulysses < 2:
        raise BerniniError(
            f"--fsdp shards each expert's weights over the ranks of one Ulysses group, but ulysses={config.ulysses}: "
            "there is no group to shard over. Use --ulysses 2 or more with --fsdp (each rank then holds 1/ulysses of "
            "the weights), or drop --fsdp. Arm groups (--cfg_parallel) cannot share the weights: they run different "
            "numbers of forwards per step, and a sharded forward needs every rank of its group to run it.")


def _fsdp2():
    """torch's FSDP2 (public in torch.distributed.fsdp from torch 2.6), or a BerniniError saying what to install."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        raise BerniniError(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); this is torch "
                           f"{torch.__version__}. Upgrade torch or drop --fsdp.") from None
    return FSDPModule, fully_shard


def _is_dtensor(tensor) -> bool:
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "to_local")


def is_sharded(module: nn.Module) -> bool:
    """True when ``shard_expert`` (or any FSDP2 ``fully_shard``) was applied to ``module``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def _local_rows(rows: int, ways: int) -> int:
    return math.ceil(rows / ways) if rows else 0


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of parameters this rank holds for ``module``: all of them when unsharded; a sharded parameter counts
    its local row shard as FSDP2 allocates it (rows padded to ceil(rows / group size), the same on every rank)."""
    total = 0
    for param in module.parameters():
        if _is_dtensor(param):
            ways = param.device_mesh.size()
            rows = param.shape[0] if param.dim() else 1
            per_row = param.numel() // rows if rows else 0
            total += _local_rows(rows, ways) * per_row * param.element_size()
        else:
            total += param.numel() * param.element_size()
    return total


def planned_parameter_bytes(module: nn.Module, ways: int) -> int:
    """``parameter_bytes`` the module will have per rank once sharded over ``ways`` ranks (pure arithmetic on the
    parameter shapes and dtypes; works on a meta-device model, for memory estimates)."""
    if ways < 1:
        raise BerniniError(f"planned_parameter_bytes: the group size must be >= 1, got {ways}.")
    total = 0
    for param in module.parameters():
        rows = param.shape[0] if param.dim() else 1
        per_row = param.numel() // rows if rows else 0
        total += _local_rows(rows, ways) * per_row * param.element_size()
    return total


def _mesh_for(state: ParallelState, device: torch.device):
    """The 1-D device mesh of this rank's Ulysses group (the group already exists: no new communicator)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    group = state.ulysses_group
    backend = str(dist.get_backend(group))
    if device.type == "cuda":
        current = torch.cuda.current_device()
        if device.index is not None and device.index != current:
            raise BerniniError(
                f"shard_expert: this rank computes on {device} but its current CUDA device is cuda:{current}; call "
                f"torch.cuda.set_device({str(device)!r}) first (the launcher does this for every rank).")
        if "nccl" not in backend:
            raise BerniniError(f"shard_expert: the process group's backend is {backend}, which cannot all-gather "
                               "CUDA tensors; initialise torch.distributed with the nccl backend for GPU runs.")
    elif device.type == "cpu":
        if "gloo" not in backend:
            raise BerniniError(f"shard_expert: device cpu needs a gloo process group, this one is {backend}; pass "
                               "this rank's GPU as the device (the experts are sharded where they compute).")
    else:
        raise BerniniError(f"shard_expert: --fsdp runs on CUDA or CPU devices, not {device}.")
    return DeviceMesh.from_group(group, device.type, mesh_dim_names=("fsdp",))


def _embed_context_gathered(dit: nn.Module) -> None:
    """``embed_context`` is called outside ``forward`` (once per expert and context, denoise.py): gather the root
    unit's parameters around it. Inside ``forward`` (which calls it too) they are already gathered: nothing to do.
    Every rank of the group must call it, as every rank calls forward."""
    method = type(dit).embed_context

    def embed_context(self, *args, **kwargs):
        if not _is_dtensor(self.condition_embedder.text_embedder.linear_1.weight):  # inside forward: root is whole
            return method(self, *args, **kwargs)
        self.unshard()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.reshard()

    dit.embed_context = types.MethodType(embed_context, dit)


def shard_expert(dit: nn.Module, state: ParallelState, device=None) -> nn.Module:
    """Shard ``dit`` (a BerniniDiT) over ``state``'s Ulysses group with FSDP2, in place; returns it.

    Collective: every rank of the Ulysses group must call it for the same expert, in the same order (expert by
    expert), and from then on must run the same forwards and ``embed_context`` calls, as Ulysses already requires.
    ``device``: where the shards live and compute (this rank's GPU, or the CPU with gloo); default: where the DiT's
    parameters are now. The parameters are moved there block by block, so a rank never holds more than the shards
    plus one whole block on the device. Loading of the full weights happens before (on the CPU, memory-mapped).
    Calling it again on a sharded expert returns it unchanged.
    """
    from ..renderer import BerniniDiT

    if not isinstance(dit, BerniniDiT):
        raise BerniniError(f"shard_expert needs a BerniniDiT, got {type(dit).__name__}.")
    if not isinstance(state, ParallelState):
        raise BerniniError(f"shard_expert needs a ParallelState, got {type(state).__name__}.")
    check_fsdp(state.config)
    if is_sharded(dit):
        return dit
    if state.ulysses_group is None:
        raise BerniniError("shard_expert: the ParallelState has no process groups (build it with "
                           "ParallelState.build inside an initialised torch.distributed world).")
    device = torch.device(device) if device is not None else dit.patch_embedding.weight.device
    if any(is_sharded(m) for m in dit.modules()):
        raise BerniniError("shard_expert: part of this expert is already sharded by someone else.")
    _, fully_shard = _fsdp2()
    mesh = _mesh_for(state, device)
    dit.eval().requires_grad_(False)  # inference only; lets one unit hold bf16 and fp32 parameters
    for block in dit.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(dit, mesh=mesh, reshard_after_forward=True)
    _embed_context_gathered(dit)
    return dit


def describe_sharding(dit: nn.Module, before_bytes: Optional[int] = None) -> str:
    """One line for logs: this rank's parameter bytes now (and before, when given)."""
    now = parameter_bytes(dit)
    if before_bytes is None:
        return f"expert parameters on this rank: {now / 2**30:.2f} GiB"
    return (f"expert parameters on this rank: {now / 2**30:.2f} GiB (unsharded {before_bytes / 2**30:.2f} GiB, "
            f"{now / max(before_bytes, 1):.1%})")
