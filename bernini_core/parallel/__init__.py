"""Multi-process inference: the layout config, each process's state, Ulysses sequence parallelism of the DiT,
guidance arms spread over arm groups, and pickle-free broadcasts of results (docs/architecture.md §5.1)."""

from .arms import assign_arms
from .config import ParallelConfig
from .exchange import broadcast_json, broadcast_object, broadcast_tensors
from .state import ParallelState, rank_layout
from .ulysses import UlyssesAttention, gather_sequence, heads_to_seq, seq_to_heads, shard_sequence

__all__ = ["ParallelConfig", "ParallelState", "rank_layout", "UlyssesAttention", "shard_sequence",
           "seq_to_heads", "heads_to_seq", "gather_sequence", "assign_arms", "broadcast_tensors", "broadcast_json",
           "broadcast_object"]
