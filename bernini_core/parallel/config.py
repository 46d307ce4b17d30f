"""How many processes share one generation, and how: data parallel x guidance arms x Ulysses sequence shards.

``ParallelConfig(ulysses=U, cfg=C, dp=D)`` needs D*C*U processes. Its checks are pure arithmetic, so a launcher
or the CLI can call ``check(heads=..., world_size=...)`` before any weight loads (docs/architecture.md §5.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import BerniniError

_FIELDS = ("dp", "cfg", "ulysses")
_MEANING = {"ulysses": "sequence-parallel (Ulysses) size", "cfg": "guidance-arm parallel size",
            "dp": "data-parallel size"}


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def divisors(n: int) -> list[int]:
    """The positive divisors of n, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelConfig:
    """ulysses: processes sharding one DiT forward's tokens (must divide the head count); cfg: process groups
    that each run some of the guidance arms; dp: independent replicas working on different samples."""

    ulysses: int = 1
    cfg: int = 1
    dp: int = 1

    def __post_init__(self):
        self._check_sizes()

    @property
    def world_size(self) -> int:
        """Number of processes this layout needs: dp x cfg x ulysses."""
        return self.dp * self.cfg * self.ulysses

    def _check_sizes(self) -> None:
        for name in _FIELDS:
            value = getattr(self, name)
            if not _is_whole(value) or value < 1:
                raise BerniniError(
                    f"parallel config: {name} ({_MEANING[name]}) must be a whole number >= 1, got {value!r}."
                )

    def check(self, heads: Optional[int] = None, world_size: Optional[int] = None) -> "ParallelConfig":
        """Raise BerniniError unless the layout fits a DiT with ``heads`` attention heads and a world of
        ``world_size`` processes (either may be None: not checked). Returns self."""
        self._check_sizes()
        if heads is not None:
            if not _is_whole(heads) or heads < 1:
                raise BerniniError(f"parallel config: the head count must be a whole number >= 1, got {heads!r}.")
            if heads % self.ulysses:
                raise BerniniError(
                    f"parallel config: ulysses={self.ulysses} does not divide the DiT's {heads} attention heads "
                    f"(each Ulysses rank attends heads/ulysses whole heads); choose ulysses from "
                    f"{', '.join(str(d) for d in divisors(heads))}."
                )
        if world_size is not None:
            if not _is_whole(world_size) or world_size < 1:
                raise BerniniError(f"parallel config: the world size must be a whole number >= 1, got {world_size!r}.")
            if world_size != self.world_size:
                raise BerniniError(
                    f"parallel config: {world_size} processes were started, but dp={self.dp} x cfg={self.cfg} x "
                    f"ulysses={self.ulysses} needs {self.world_size}; start {self.world_size} processes or change "
                    "dp, cfg or ulysses so that their product is the world size."
                )
        return self
