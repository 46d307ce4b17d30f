"""Progress of long work outside ComfyUI: the `progress(stage, step, total)` contract and the CLI's tqdm bars
(docs/architecture.md §6).

Contract: ``from_pretrained(..., progress=)`` and a pipeline call's ``progress=`` take a callable
``progress(stage: str, step: int, total: int)``. Each stage run reports ``step`` 0 when it starts, then each step
done up to ``total``; stages, in order: "load" (from_pretrained, one step per model component), "encode" (the
prompt, then each source image/video), "plan" (full Bernini: MaskGIT steps), "sample" (denoising steps),
"decode" (VAE chunks: one per latent frame, per tile when tiled, per video). The callable travels with the call
only (no pipeline or process state), so two threads can each follow their own call.

The engine imports nothing from tqdm; `TqdmProgress` (the CLI's) imports it when it draws its first bar.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

Progress = Callable[[str, int, int], None]

STAGES = ("load", "encode", "plan", "sample", "decode")


class StageSteps:
    """One stage run for a progress callback: reports step 0 when made, then one step per `advance()`.
    With no callback every call does nothing, so stage code needs no `if`."""

    def __init__(self, progress: Optional[Progress], stage: str, total: int):
        self.progress, self.stage, self.total, self.step = progress, stage, int(total), 0
        self._report()

    def advance(self, *_ignored) -> None:
        """One step done (extra arguments ignored, so it can serve as an on_step hook)."""
        if self.step >= self.total:  # never past total, nor total twice: a bar must not overrun or restart
            return
        self.step += 1
        self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.stage, self.step, self.total)


class TqdmProgress:
    """A progress callback drawing one tqdm bar per stage run on stderr ("denoising: 12/40 [00:48<01:52,
    4.01s/step]"). A new bar starts when the stage or total changes or the step goes back; a bar is closed (and
    left on screen) at its last step. `prefix` is put before every label, e.g. "run 2/5 " in a batch."""

    LABELS = {"load": "loading", "encode": "encoding", "plan": "planning", "sample": "denoising",
              "decode": "decoding"}
    UNITS = {"load": "component", "encode": "input", "plan": "step", "sample": "step", "decode": "chunk"}

    def __init__(self, prefix: str = "", file=None):
        self.prefix = prefix
        self._file = file
        self._bar = None
        self._stage: Optional[str] = None
        self._finished = None  # (stage, total) of the bar closed last: a repeated last step draws no new bar

    def __call__(self, stage: str, step: int, total: int) -> None:
        if self._bar is None and step >= total and (stage, total) == self._finished:
            return
        bar = self._bar
        if bar is None or stage != self._stage or total != bar.total or step < bar.n:
            self.close()
            import shutil

            from tqdm import tqdm

            # tqdm asks the terminal for its size itself and draws nothing where it says 0 x 0 (a pty nobody sized:
            # `script`, some container shells); shutil falls back to $COLUMNS/$LINES or 80 x 24 there
            size = shutil.get_terminal_size()
            bar = self._bar = tqdm(total=total, desc=self.prefix + self.LABELS.get(stage, stage),
                                   unit=self.UNITS.get(stage, "step"), file=self._file or sys.stderr,
                                   ncols=size.columns, nrows=size.lines, leave=True)
            self._stage = stage
        if step > bar.n:
            bar.update(step - bar.n)
        if step >= total:
            self.close()
            self._finished = (stage, total)

    def close(self) -> None:
        """End the open bar, if any (also after an error, so the error message starts on its own line)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._stage = None
        self._finished = None

    def __enter__(self) -> "TqdmProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
