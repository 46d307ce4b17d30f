"""Test driver for a rank that fails mid-run: runs `bernini_core generate` in one rank of a torchrun world, with
rank 1 breaking down at its third DiT call. BERNINI_TEST_FAULT=exit: the process exits at once with code 17;
hang: it stops answering (sleeps far past the collective timeout, though never long enough to outlive the test run)."""

import os
import sys
import time

from bernini_core.cli import main
from bernini_core.renderer.transformer import BerniniDiT

FAULT = os.environ.get("BERNINI_TEST_FAULT", "exit")
_forward = BerniniDiT.forward
calls = []


def failing_forward(self, *args, **kwargs):
    calls.append(1)
    if os.environ.get("RANK") == "1" and len(calls) == 3:
        if FAULT == "exit":
            os._exit(17)
        time.sleep(150)  # far past the test's collective timeout, short enough to never outlive the test run
    return _forward(self, *args, **kwargs)


BerniniDiT.forward = failing_forward

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
