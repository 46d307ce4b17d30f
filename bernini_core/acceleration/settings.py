"""The user-facing speed settings of the renderer (CLI flags, `from_pretrained` arguments, the loader node's switch):
regional torch.compile and block swap, checked before any weight loads and applied to the experts after the load
(and after LoRAs are merged and the multi-process layout is set)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Iterable, Optional

from ..errors import BerniniError

log = logging.getLogger("bernini")

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # CUDA graphs would pin weight addresses: not offered
DEFAULT_COMPILE_BACKEND = "inductor"
MAX_BLOCKS = 40  # the deepest released expert (Wan2.2-A14B); the exact count is checked against the loaded expert


@dataclass(frozen=True)
class SpeedSettings:
    """compile: torch.compile each DiT block (regional, acceleration/compile.py); compile_mode: inductor's mode;
    block_swap: keep this many of each expert's last blocks in host memory and stream them in during a forward
    (acceleration/block_swap.py; standalone runs on a GPU smaller than an expert)."""

    compile: bool = False
    compile_mode: str = "default"
    block_swap: int = 0
    compile_backend: Optional[str] = None  # None: inductor; "aot_eager" traces without generating code (tests)

    def check(self, *, multi_process: bool = False, fsdp: bool = False) -> "SpeedSettings":
        """Every value, before the load; returns self."""
        if not isinstance(self.compile, bool):
            raise BerniniError(f"compile must be true or false, got {self.compile!r}.")
        if self.compile_mode not in COMPILE_MODES:
            raise BerniniError(f"compile mode {self.compile_mode!r} is unknown; choose one of "
                               f"{', '.join(COMPILE_MODES)}.")
        if isinstance(self.block_swap, bool) or not isinstance(self.block_swap, int) or not (
                0 <= self.block_swap <= MAX_BLOCKS):
            raise BerniniError(f"block_swap {self.block_swap!r}: give a number of blocks from 0 (off) to "
                               f"{MAX_BLOCKS} (an A14B expert has 40 blocks, the 1.3B model 30).")
        if self.block_swap and (multi_process or fsdp):
            raise BerniniError("block_swap runs one process with one GPU; a multi-GPU run divides the work "
                               "instead (and --fsdp divides the weights): drop --block_swap, or run on one GPU.")
        return self

    def apply(self, experts: Iterable, device, *, offload: bool) -> None:
        """Set block swap and compile up on each loaded expert (a BerniniDiT). With `offload` the experts rest on
        the host between stages, so a swapped expert's resident part goes back there until the runtime loads it."""
        import torch

        experts = [dit for dit in experts if dit is not None]
        device = None if device is None else torch.device(device)  # where they run (offloaded experts rest elsewhere)
        if self.block_swap:
            from .block_swap import enable_block_swap, memory_plan

            if device.type != "cuda":
                log.warning("block_swap %d on %s: every weight already lives in host memory there; it only adds "
                            "copies (it is meant for a GPU smaller than an expert).", self.block_swap, device)
            for dit in experts:
                layers = len(dit.blocks)
                if self.block_swap > layers:
                    raise BerniniError(f"block_swap {self.block_swap}: this expert has only {layers} blocks; give "
                                       f"0 to {layers}.")
                plan = memory_plan(dit, self.block_swap)
                swap = enable_block_swap(dit, self.block_swap, device)
                if offload:
                    swap.move_resident(torch.device("cpu"))
                log.info("block swap: %d of %d blocks in host memory (%.2f GiB streamed per forward; %.2f GiB of "
                         "weights on the GPU at most)", self.block_swap, layers,
                         plan["transfer_bytes_per_forward"] / 2**30, plan["device_peak_bytes"] / 2**30)
        if self.compile:
            from .compile import compile_blocks

            for dit in experts:
                compile_blocks(dit, backend=self.compile_backend or DEFAULT_COMPILE_BACKEND,
                               mode=None if self.compile_mode == "default" else self.compile_mode, device=device)
                _report_first_forward(dit)
            log.info("torch.compile: the DiT blocks compile on their first step (one block's graph shared by all "
                     "blocks; a new resolution or source count compiles once more)")


def _report_first_forward(dit) -> None:
    """Log how long the expert's first forward took after compiling: what the compile costs (plus one forward)."""
    import time

    started = []

    def before(_module, _args):
        started.append(time.perf_counter())

    def after(_module, _args, _output):
        log.info("torch.compile: the first forward of this expert took %.1f s (compiling included)",
                 time.perf_counter() - started[0])
        for handle in handles:
            handle.remove()

    handles = [dit.register_forward_pre_hook(before), dit.register_forward_hook(after)]


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("speed (README \"Performance\")")
    g.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (regional: one block's "
                   "graph serves all of them; the first forward of each expert and of each new resolution includes "
                   "the compile time, which the log reports; needs Triton on a GPU, a C++ compiler on the CPU) "
                   "(default: off)")
    g.add_argument("--compile_mode", default="default", choices=COMPILE_MODES,
                   help="inductor mode for --compile: max-autotune-no-cudagraphs tunes the kernels longer "
                   "(default: %(default)s)")
    g.add_argument("--block_swap", type=int, default=0, metavar="N", help="keep the last N blocks of each expert in "
                   "host memory and stream them to the GPU while the blocks before them compute: for a GPU smaller "
                   "than an expert (an A14B expert has 40 blocks of ~0.65 GiB in bf16); one process only "
                   "(default: 0, off)")


def speed_settings_from_args(args: argparse.Namespace, *, multi_process: bool = False) -> Optional[SpeedSettings]:
    """The checked settings of the CLI flags, or None when every speed-up is off."""
    settings = SpeedSettings(compile=bool(args.compile), compile_mode=args.compile_mode,
                             block_swap=int(args.block_swap))
    settings.check(multi_process=multi_process, fsdp=bool(getattr(args, "fsdp", False)))
    return None if settings == SpeedSettings() else settings
