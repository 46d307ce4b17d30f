"""Ulysses sequence parallelism of one DiT forward over a process group of U ranks.

The token sequence (all streams concatenated) is zero-padded to a multiple of U and every rank holds one
contiguous slice of ceil(L/U) tokens (``shard_sequence``); per-token work (norms, projections, FFN, cross-attention
with sharded queries) runs on the slice with no communication. Self-attention needs every token: an all-to-all turns
[B, L/U, H, D] (sequence shard, all heads) into [B, L, H/U, D] (whole sequence, a slice of the heads,
``seq_to_heads``), the attention kernel runs locally, and the inverse all-to-all (``heads_to_seq``) returns the
sequence shard. After the blocks ``gather_sequence`` all-gathers the slices and drops the padding.

Unlike the official implementation (docs/architecture.md §5.1), ``UlyssesAttention`` removes the padding rows
before the local kernel, so padded keys are never attended and the result equals the unsharded forward.

Every rank of the group must run the same forward (same streams, timestep and context) in the same order.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import BerniniError


def shard_length(length: int, size: int) -> int:
    """Tokens per rank: ceil(length / size) (the padded length is this times size)."""
    return -(-int(length) // int(size))


def shard_sequence(x: torch.Tensor, size: int, rank: int, dim: int = 1) -> tuple[torch.Tensor, int]:
    """(this rank's slice of x along ``dim`` after zero-padding that dim to a multiple of size, the real length).

    The slice is contiguous; padding rows are zeros (for a complex RoPE table that is a zero rotation, harmless:
    padding rows never reach the attention kernel)."""
    if not 0 <= rank < size:
        raise BerniniError(f"shard_sequence: rank {rank} is outside a group of {size}.")
    dim = dim % x.ndim
    length = x.shape[dim]
    chunk = shard_length(length, size)
    start = rank * chunk
    real = max(0, min(chunk, length - start))
    part = x.narrow(dim, min(start, length), real)
    if real < chunk:
        pad_shape = list(x.shape)
        pad_shape[dim] = chunk - real
        part = torch.cat([part, x.new_zeros(pad_shape)], dim=dim)
    return part.contiguous(), length


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """All-to-all [B, L/U, H, D] (this rank's tokens, all heads) -> [B, L, H/U, D] (all tokens, this rank's heads).

    Rank r receives heads r*H/U .. (r+1)*H/U - 1; tokens come in rank order, i.e. the original sequence order."""
    size = _group_size(group)
    if size == 1:
        return x
    batch, tokens, heads, head_dim = x.shape
    if heads % size:
        raise BerniniError(f"Ulysses: {heads} heads cannot be split over {size} ranks.")
    # chunk j of dim 0 goes to rank j: head group j of our tokens
    send = x.reshape(batch, tokens, size, heads // size, head_dim).permute(2, 0, 1, 3, 4).contiguous()
    received = torch.empty_like(send)  # [U, B, L/U, H/U, D]: received[j] = rank j's tokens of our head group
    dist.all_to_all_single(received, send, group=group)
    return received.permute(1, 0, 2, 3, 4).reshape(batch, size * tokens, heads // size, head_dim)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of ``seq_to_heads``: [B, L, H/U, D] -> [B, L/U, H, D]."""
    size = _group_size(group)
    if size == 1:
        return x
    batch, tokens, heads, head_dim = x.shape
    if tokens % size:
        raise BerniniError(f"Ulysses: {tokens} tokens cannot be split over {size} ranks (pad first).")
    # chunk j of dim 0 goes to rank j: its tokens of our head group
    send = x.reshape(batch, size, tokens // size, heads, head_dim).permute(1, 0, 2, 3, 4).contiguous()
    received = torch.empty_like(send)  # [U, B, L/U, H/U, D]: received[j] = head group j of our tokens
    dist.all_to_all_single(received, send, group=group)
    return received.permute(1, 2, 0, 3, 4).reshape(batch, tokens // size, size * heads, head_dim)


def gather_sequence(x: torch.Tensor, group, length: int, dim: int = 1) -> torch.Tensor:
    """All-gather the ranks' slices along ``dim`` (rank order) and drop the padding: the first ``length`` rows."""
    size = _group_size(group)
    dim = dim % x.ndim
    if size > 1:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        x = torch.cat(parts, dim=dim)
    if x.shape[dim] < length:
        raise BerniniError(f"gather_sequence: {x.shape[dim]} gathered rows cannot hold {length} tokens.")
    return x.narrow(dim, 0, length)


class UlyssesAttention:
    """Sequence-parallel self-attention over one process group, plus the shard / gather steps of the DiT.

    ``group``: the Ulysses process group (``ParallelState.ulysses_group``); None means this process alone (size 1,
    no communication). A DiT instance holds one of these (``BerniniDiT.use_sequence_parallel``), so a process can
    hold a plain and a parallel DiT at once. ``attend_padding=True`` reproduces the official behaviour of attending
    the padding rows as keys (for comparisons only; the result then depends on U).
    """

    def __init__(self, group=None, *, attend_padding: bool = False):
        self.group = group
        self.size = _group_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        if self.rank < 0:
            raise BerniniError("UlyssesAttention: this process is not a member of the given process group.")
        self.attend_padding = bool(attend_padding)

    def __deepcopy__(self, memo) -> "UlyssesAttention":
        return self  # holds a process group, which is shared, never copied (copy.deepcopy of a DiT keeps it)

    def __repr__(self) -> str:
        return f"UlyssesAttention(size={self.size}, rank={self.rank}, attend_padding={self.attend_padding})"

    def check_heads(self, heads: int) -> None:
        from .config import ParallelConfig

        ParallelConfig(ulysses=self.size).check(heads=heads)

    # ----------------------------------------------------------------- sequence shards
    def shard(self, x: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, int]:
        """(this rank's padded slice of x along dim, real length): tokens [B, L, C] (dim 1) or a RoPE table
        [L, head_dim/2] (dim 0)."""
        return shard_sequence(x, self.size, self.rank, dim)

    def gather(self, x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
        return gather_sequence(x, self.group, length, dim)

    def bind(self, length: int) -> Callable:
        """The attention callable of one forward whose full (unpadded) sequence has ``length`` tokens."""
        return functools.partial(self.__call__, length=length)

    # ----------------------------------------------------------------- attention
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local_attention: Callable,
                 length: Optional[int] = None) -> torch.Tensor:
        """Self-attention of sharded q, k, v [B, L/U, H, D]; ``local_attention(q, k, v)`` is the selected kernel.

        length: real tokens of the whole sequence (None: no padding). Returns [B, L/U, H, D] in q's layout."""
        shard_tokens = q.shape[1]
        padded = shard_tokens * self.size
        length = padded if length is None else int(length)
        if length < 1 or shard_length(length, self.size) != shard_tokens:
            raise BerniniError(f"UlyssesAttention: {length} real tokens do not fit shards of {shard_tokens} tokens "
                               f"over {self.size} ranks.")
        if q.dtype == k.dtype == v.dtype and q.shape == k.shape == v.shape:  # one all-to-all for q, k and v
            q, k, v = seq_to_heads(torch.cat([q, k, v], dim=0), self.group).chunk(3, dim=0)
        else:
            q, k, v = (seq_to_heads(t, self.group) for t in (q, k, v))
        if length < padded and not self.attend_padding:
            # Drop the padding rows so no query or key is padding: exactly the unsharded attention. (The official
            # attends its padding rows as keys, which changes every token's output with U.)
            out = local_attention(q[:, :length], k[:, :length], v[:, :length])
            out = F.pad(out, (0, 0, 0, 0, 0, padded - length))
        else:
            out = local_attention(q, k, v)
        return heads_to_seq(out.contiguous(), self.group)
