"""ComfyUI-Bernini: the ComfyUI entry point (NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEB_DIRECTORY).

Imports cleanly in plain Python: nothing from ComfyUI is imported here or at the top of any node module.
"""

import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
# ComfyUI imports this file under a mangled package name; appending (not prepending) the pack directory makes
# the engine importable as `bernini_core` without shadowing any module ComfyUI already has (e.g. its `nodes`).
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from bernini_core.example_inputs import install_into_comfyui

    install_into_comfyui()  # the shared workflows' example media into ComfyUI's input/, only where absent
else:  # executed as a plain script (no package context): nothing to register
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
