"""Which guidance-arm group runs which arm of a sampling step (``ParallelConfig(cfg=C)``, docs/architecture.md §5.1).

Each step runs 2-6 DiT passes ("arms": the target plus a combination of source streams, one context). With C arm
groups, every arm is given to one group, balanced by its cost (tokens: the target's plus its source streams'):
largest first, each to the least-loaded group so far, ties to the lower group; equal costs keep the arms' order.
Pure arithmetic: every rank computes the same assignment from the same arms, with no communication.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import BerniniError


def assign_arms(costs: Sequence[float], groups: int) -> list[int]:
    """The group (0..groups-1) that runs each arm, for arms of the given costs (e.g. token counts).

    Longest-processing-time greedy: arms sorted by cost (descending; equal costs in arm order) each go to the group
    with the smallest load so far (the lowest-numbered one on a tie). With more groups than arms, groups
    ``len(costs)`` and above get nothing. Deterministic: the same costs always give the same owners."""
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise BerniniError(f"assign_arms: the number of arm groups must be a whole number >= 1, got {groups!r}.")
    costs = [float(c) for c in costs]
    if any(not c >= 0 for c in costs):  # also rejects NaN
        raise BerniniError(f"assign_arms: arm costs must be >= 0, got {costs}.")
    owners = [0] * len(costs)
    loads = [0.0] * groups
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        group = min(range(groups), key=lambda g: (loads[g], g))
        owners[index] = group
        loads[group] += costs[index]
    return owners


def group_loads(costs: Sequence[float], owners: Sequence[int], groups: int) -> list[float]:
    """The summed cost each group runs under ``owners`` (for logs, benchmarks and tests)."""
    loads = [0.0] * groups
    for cost, owner in zip(costs, owners):
        loads[owner] += float(cost)
    return loads


def arms_of_group(owners: Sequence[int], group: int) -> list[int]:
    """Indices (in arm order) of the arms that ``group`` runs."""
    return [i for i, owner in enumerate(owners) if owner == group]
