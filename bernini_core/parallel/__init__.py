"""Multi-process inference: the layout config, each process's state, and Ulysses sequence parallelism of the DiT
(docs/architecture.md §5.1)."""

from .config import ParallelConfig
from .state import ParallelState, rank_layout
from .ulysses import UlyssesAttention, gather_sequence, heads_to_seq, seq_to_heads, shard_sequence

__all__ = ["ParallelConfig", "ParallelState", "rank_layout", "UlyssesAttention", "shard_sequence",
           "seq_to_heads", "heads_to_seq", "gather_sequence"]
