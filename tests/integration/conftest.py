"""The integration suite: whole multi-process runs (gloo worlds, torchrun, the --gpus launcher). Its modules share
helpers with each other, so this folder is importable like tests/ (tests/conftest.py adds that one)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
