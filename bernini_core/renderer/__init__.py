"""The renderer DiT (Wan2.2-A14B / Wan2.1-1.3B) with Bernini's in-context streams and SA-3D RoPE."""

from .attention import attention, available_backends
from .config import WAN21_1_3B, WAN22_A14B, DiTConfig
from .rope import source_ids_for
from .transformer import FP32_PARAM_PATTERNS, BerniniDiT, cast_dit_

__all__ = [
    "BerniniDiT", "DiTConfig", "WAN22_A14B", "WAN21_1_3B", "FP32_PARAM_PATTERNS", "cast_dit_",
    "source_ids_for", "attention", "available_backends",
]
