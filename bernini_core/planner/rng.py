"""The random generators of one full-Bernini planning call (docs/official_behaviour.md §7.1).

The official ``__call__`` seeds Python's, numpy's and torch's process-global generators and draws from them. We
draw the same numbers from generators of our own, made per call, so a call neither re-seeds nor advances the
caller's generators and two calls in two threads cannot interleave their draws:

* ``random.Random(seed)`` is what ``random.seed(seed)`` does to the random module's hidden instance;
* ``np.random.RandomState(seed)``: numpy's legacy global generator is a RandomState seeded the same way by
  ``np.random.seed(seed)``, so ``shuffle`` consumes and returns the same numbers;
* ``torch.Generator("cpu").manual_seed(seed)`` is the CPU generator ``torch.manual_seed(seed)`` seeds (every
  official planner draw is a CPU draw; the CUDA generators it also seeds are never read).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BerniniError

MAX_PLANNER_SEED = 2**32 - 1  # numpy's seed range; the official np.random.seed(seed) has the same limit


@dataclass(frozen=True)
class PlannerRng:
    """The three streams the planner draws from, in the roles of the official global generators. Draw helpers
    use only ``python.random()``, ``numpy.shuffle(x)`` and ``torch.randn(..., generator=self.torch)``."""

    python: random.Random
    numpy: np.random.RandomState
    torch: torch.Generator

    @classmethod
    def from_seed(cls, seed: int) -> PlannerRng:
        """Fresh generators in the state the official ``random.seed``, ``np.random.seed`` and ``torch.manual_seed``
        leave the global ones in."""
        if not 0 <= int(seed) <= MAX_PLANNER_SEED:
            raise BerniniError(f"seed {seed} is out of range for full Bernini: the planner seeds numpy, which takes "
                               f"0..{MAX_PLANNER_SEED}; pick a seed in that range.")
        seed = int(seed)
        return cls(random.Random(seed), np.random.RandomState(seed), torch.Generator(device="cpu").manual_seed(seed))
