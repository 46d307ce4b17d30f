"""Who this process is in a parallel run: its rank in the world and in its Ulysses, guidance-arm and replica groups.

Rank layout (as the official, docs/architecture.md §5.1), for ``ParallelConfig(ulysses=U, cfg=C, dp=D)``:
global rank = dp_rank * (C*U) + cfg_rank * U + ulysses_rank. Consecutive blocks of U ranks form a Ulysses group
(they shard one DiT forward); C such blocks form one data-parallel replica (each block runs some guidance arms);
D replicas work on different samples. The cfg group joins the ranks of one replica that have the same Ulysses
rank (they exchange guidance-arm outputs); the dp group joins the ranks with the same place in every replica.

No module state: ``ParallelState.build`` returns an object that travels with whatever holds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional

from ..errors import BerniniError
from .config import ParallelConfig

if TYPE_CHECKING:
    from .ulysses import UlyssesAttention


@dataclass(frozen=True)
class RankLayout:
    """The global ranks of each group a rank belongs to (pure arithmetic, no process group)."""

    rank: int
    ulysses_ranks: tuple[int, ...]
    cfg_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]
    replica_ranks: tuple[int, ...]


def rank_layout(config: ParallelConfig, rank: int) -> RankLayout:
    u, c, d = config.ulysses, config.cfg, config.dp
    if not 0 <= rank < config.world_size:
        raise BerniniError(f"rank {rank} is outside the world of {config.world_size} processes of {config}.")
    block = c * u
    dp_rank, within = divmod(rank, block)
    cfg_rank, ulysses_rank = divmod(within, u)
    first = dp_rank * block
    return RankLayout(
        rank=rank,
        ulysses_ranks=tuple(first + cfg_rank * u + i for i in range(u)),
        cfg_ranks=tuple(first + i * u + ulysses_rank for i in range(c)),
        dp_ranks=tuple(i * block + cfg_rank * u + ulysses_rank for i in range(d)),
        replica_ranks=tuple(range(first, first + block)),
    )


def all_groups(config: ParallelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every group of the layout as (kind, ranks), in the one order all ranks create them."""
    layouts = [rank_layout(config, rank) for rank in range(config.world_size)]
    for kind in ("ulysses", "cfg", "dp", "replica"):
        for ranks in sorted({getattr(layout, kind + "_ranks") for layout in layouts}):
            yield kind, ranks


@dataclass(frozen=True)
class ParallelState:
    """This process's place in a parallel run. Groups are torch.distributed process groups (real ones, even of
    size 1, whenever the world has more than one process) or None in the single-process state."""

    config: ParallelConfig = field(default_factory=ParallelConfig)
    layout: RankLayout = field(default_factory=lambda: rank_layout(ParallelConfig(), 0))
    ulysses_group: Any = None
    cfg_group: Any = None
    dp_group: Any = None
    replica_group: Any = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def single(cls) -> "ParallelState":
        """One process, no groups: every size 1, every rank 0."""
        return cls()

    @classmethod
    def build(cls, config: ParallelConfig, timeout=None) -> "ParallelState":
        """The state of this process in an initialised default process group. Collective: every rank must call it
        (once per config, in the same order), because creating process groups is collective. `timeout` (a
        timedelta): how long a collective of these groups waits for a slow or dead rank; torch's default for new
        groups is 30 minutes, whatever the default group was given."""
        import torch.distributed as dist

        if not isinstance(config, ParallelConfig):
            raise BerniniError(f"ParallelState.build needs a ParallelConfig, got {type(config).__name__}.")
        if not (dist.is_available() and dist.is_initialized()):
            raise BerniniError(
                "ParallelState.build: torch.distributed is not initialised; call "
                "torch.distributed.init_process_group() in every process first (e.g. start them with torchrun)."
            )
        world, rank = dist.get_world_size(), dist.get_rank()
        config.check(world_size=world)
        layout = rank_layout(config, rank)
        mine = {"ulysses": layout.ulysses_ranks, "cfg": layout.cfg_ranks, "dp": layout.dp_ranks,
                "replica": layout.replica_ranks}
        groups = {}
        for kind, ranks in all_groups(config):
            group = dist.new_group(list(ranks), timeout=timeout)  # collective over the whole world, members or not
            if ranks == mine[kind]:
                groups[kind] = group
        return cls(config=config, layout=layout, ulysses_group=groups["ulysses"], cfg_group=groups["cfg"],
                   dp_group=groups["dp"], replica_group=groups["replica"])

    # ------------------------------------------------------------------ ranks and sizes
    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def world(self) -> int:
        return self.config.world_size

    @property
    def ulysses_ranks(self) -> tuple[int, ...]:
        return self.layout.ulysses_ranks

    @property
    def ulysses_size(self) -> int:
        return self.config.ulysses

    @property
    def ulysses_rank(self) -> int:
        return self.layout.ulysses_ranks.index(self.rank)

    @property
    def cfg_ranks(self) -> tuple[int, ...]:
        return self.layout.cfg_ranks

    @property
    def cfg_size(self) -> int:
        return self.config.cfg

    @property
    def cfg_rank(self) -> int:
        return self.layout.cfg_ranks.index(self.rank)

    @property
    def dp_ranks(self) -> tuple[int, ...]:
        return self.layout.dp_ranks

    @property
    def dp_size(self) -> int:
        return self.config.dp

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_ranks.index(self.rank)

    @property
    def replica_ranks(self) -> tuple[int, ...]:
        return self.layout.replica_ranks

    @property
    def replica_leader(self) -> int:
        """Global rank of the first rank of this data-parallel replica (the one that writes its outputs)."""
        return self.layout.replica_ranks[0]

    @property
    def is_replica_leader(self) -> bool:
        return self.rank == self.replica_leader

    @property
    def is_parallel(self) -> bool:
        return self.world > 1

    # ------------------------------------------------------------------ what a DiT needs
    def sequence_parallel(self, *, attend_padding: bool = False) -> Optional["UlyssesAttention"]:
        """The Ulysses handler for ``BerniniDiT.use_sequence_parallel``; None when ulysses is 1 (plain forward)."""
        if self.ulysses_size == 1:
            return None
        from .ulysses import UlyssesAttention

        return UlyssesAttention(self.ulysses_group, attend_padding=attend_padding)

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world}: replica {self.dp_rank}/{self.dp_size}, arm group "
                f"{self.cfg_rank}/{self.cfg_size}, ulysses {self.ulysses_rank}/{self.ulysses_size}")
