"""What the Bernini Multi-GPU node asks for, checked and turned into a layout before anything starts.

`gpus` is a count ("4") or a list of this machine's device ids ("0,2,3,5"); `ulysses` 0 means auto: the largest
divisor of the DiT's head count that fits the GPUs left per guidance-arm group. The layout is always one replica
(dp 1): the pool renders one video at a time, ulysses x cfg ranks wide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from ...errors import BerniniError
from ..config import ParallelConfig, divisors

log = logging.getLogger("bernini.pool")

NODE = "Bernini Multi-GPU"
DEVICES = ("cuda", "cpu")
DEFAULT_TIMEOUT_S = 1800.0  # as the CLI's --parallel_timeout


@dataclass(frozen=True)
class PoolOptions:
    """The node's settings, as given (device ids parsed)."""

    gpus: int
    device_ids: Optional[tuple[int, ...]] = None  # None: any `gpus` GPUs the Ray cluster offers
    ulysses: int = 0  # 0 = auto
    cfg: int = 1
    fsdp: bool = False
    ray_address: str = ""
    device: str = "cuda"  # "cpu": CPU processes with gloo (tests, trying the node without GPUs)
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def from_node(cls, gpus: str, ulysses: int = 0, cfg_parallel: int = 1, fsdp: bool = False, ray_address: str = "",
                  device: str = "cuda", timeout_s: float = DEFAULT_TIMEOUT_S) -> "PoolOptions":
        count, ids = parse_gpus(gpus)
        if device not in DEVICES:
            raise BerniniError(f"{NODE}: device must be one of {', '.join(DEVICES)}, got {device!r}.")
        if device == "cpu" and ids is not None:
            raise BerniniError(f"{NODE}: gpus {gpus!r} lists device ids, but device is cpu (CPU processes); give a "
                               "count, e.g. 2.")
        for name, value, low in (("ulysses", ulysses, 0), ("cfg_parallel", cfg_parallel, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BerniniError(f"{NODE}: {name} must be a whole number >= {low}, got {value!r}.")
        if not isinstance(ray_address, str):
            raise BerniniError(f"{NODE}: ray_address must be text ('' = this machine, 'auto' or host:port), got "
                               f"{type(ray_address).__name__}.")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise BerniniError(f"{NODE}: timeout must be a positive number of seconds, got {timeout_s!r}.")
        return cls(gpus=count, device_ids=ids, ulysses=ulysses, cfg=cfg_parallel, fsdp=bool(fsdp),
                   ray_address=ray_address.strip(), device=device, timeout_s=float(timeout_s))

    def layout(self, heads: int) -> ParallelConfig:
        """The ulysses x cfg layout for a DiT with `heads` attention heads on these GPUs (BerniniError if none fits)."""
        if self.gpus % self.cfg:
            raise BerniniError(f"{NODE}: cfg_parallel {self.cfg} does not divide the {self.gpus} GPUs; each arm group "
                               f"needs the same number of GPUs (choose cfg_parallel from "
                               f"{', '.join(map(str, divisors(self.gpus)))}).")
        per_group = self.gpus // self.cfg
        if self.ulysses:
            if self.ulysses * self.cfg != self.gpus:
                raise BerniniError(f"{NODE}: ulysses {self.ulysses} x cfg_parallel {self.cfg} = "
                                   f"{self.ulysses * self.cfg} ranks, but gpus is {self.gpus}; set ulysses to "
                                   f"{per_group} or 0 (auto).")
            return ParallelConfig(ulysses=self.ulysses, cfg=self.cfg).check(heads=heads)
        ulysses = max(d for d in divisors(heads) if d <= per_group)
        if ulysses * self.cfg < 2:
            raise BerniniError(f"{NODE}: {self.gpus} GPU(s) with cfg_parallel {self.cfg} leave one rank; a pool needs "
                               "at least 2 (disconnect the node to render in ComfyUI's own process).")
        if ulysses < per_group:
            log.warning("%s: ulysses must divide the DiT's %d attention heads; auto chose %d, so %d of the %d GPUs "
                        "render (set gpus to a multiple of a divisor of %d to use them all).", NODE, heads, ulysses,
                        ulysses * self.cfg, self.gpus, heads)
        return ParallelConfig(ulysses=ulysses, cfg=self.cfg)

    def describe(self, layout: ParallelConfig) -> str:
        where = "CPU processes" if self.device == "cpu" else (
            f"GPUs {','.join(map(str, self.device_ids))}" if self.device_ids else f"{layout.world_size} GPUs")
        return (f"{layout.world_size} ranks on {where}: ulysses {layout.ulysses} x guidance-arm groups {layout.cfg}"
                + (", experts sharded (FSDP)" if self.fsdp else ""))


def parse_gpus(text) -> tuple[int, Optional[tuple[int, ...]]]:
    """(count, device ids or None) from "4" or "0,2,3"."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str) or not text.strip():
        raise BerniniError(f"{NODE}: gpus must be a count (e.g. 4) or a list of device ids (e.g. 0,1,2,3), got "
                           f"{text!r}.")
    parts = [p.strip() for p in text.replace(";", ",").split(",")]
    if not all(p.isdigit() for p in parts):
        raise BerniniError(f"{NODE}: gpus {text!r} is neither a count (e.g. 4) nor a list of device ids (e.g. "
                           "0,1,2,3).")
    numbers = [int(p) for p in parts]
    if len(numbers) == 1 and "," not in text:
        if numbers[0] < 2:
            raise BerniniError(f"{NODE}: gpus {numbers[0]}: a pool needs at least 2 GPUs (disconnect the node to "
                               "render in ComfyUI's own process).")
        return numbers[0], None
    if len(set(numbers)) != len(numbers):
        raise BerniniError(f"{NODE}: gpus {text!r} lists a device twice.")
    if len(numbers) < 2:
        raise BerniniError(f"{NODE}: gpus {text!r} lists one device; a pool needs at least 2.")
    return len(numbers), tuple(numbers)
