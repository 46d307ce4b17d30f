"""Bernini engine: planner, renderer, schedulers, guidance, VAE, loading — no ComfyUI imports here.

`from bernini_core import BerniniPipeline` is resolved lazily so that importing the package (as ComfyUI
does at start-up) stays cheap.
"""

__version__ = "0.1.0"

__all__ = ["BerniniPipeline", "BerniniOutput", "BerniniError", "__version__"]


def __getattr__(name):
    if name in ("BerniniPipeline", "BerniniOutput"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "BerniniError":
        from .errors import BerniniError

        return BerniniError
    raise AttributeError(f"module 'bernini_core' has no attribute {name!r}")
