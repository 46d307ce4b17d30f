"""Multi-GPU from inside ComfyUI (or any Python process): a pool of Ray actors, each one rank of the scale-out engine,
rendering with the experts while the owning process keeps the text encoder, VAE and planner
(docs/architecture.md §5.2). Ray is optional: importing this package does not import it."""

from .options import PoolOptions, parse_gpus
from .pool import WorkerPool

__all__ = ["PoolOptions", "WorkerPool", "parse_gpus"]
