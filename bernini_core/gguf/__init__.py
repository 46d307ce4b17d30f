"""GGUF experts: Wan DiT weights kept GGML-quantised in memory and dequantised per layer on the fly.

* dequant.py: torch dequantisers of F32/F16/BF16 and the block types Q8_0 ... Q2_K (same bits as gguf-py's numpy);
* reader.py: reading and checking a .gguf file (gguf.GGUFReader, memory-mapped);
* layers.py: GGUFLinear (packed weight, per-call dequantisation, ``weight_function`` patches) and gguf_ops;
* loader.py: one BerniniDiT expert from a ComfyUI-GGUF-layout file (``load_gguf_dit``).
"""

from .dequant import SUPPORTED_TYPE_NAMES, dequantize
from .layers import GGUFLinear, gguf_ops
from .loader import load_gguf_dit
from .reader import read_gguf

__all__ = ["GGUFLinear", "SUPPORTED_TYPE_NAMES", "dequantize", "gguf_ops", "load_gguf_dit", "read_gguf"]
