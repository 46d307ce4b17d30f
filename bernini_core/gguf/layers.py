"""The Linear layer of GGUF experts: its weight stays packed (GGML block bytes) and is dequantised per call.

Only one layer's weight ever exists dequantised, for the duration of its forward; a Q4_K 14B expert thus holds
~8 GB of weights instead of 28 GB in bf16. Patches such as LoRAs apply to the dequantised weight through
``weight_function`` / ``bias_function`` (ComfyUI's cast-layer convention: callables applied in order to the weight
cast for this call), so the packed bytes never change.
"""

from __future__ import annotations

import types
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import BerniniError
from .dequant import QUANT_TYPES, dequantize, is_block_quantized, packed_bytes


class GGUFLinear(torch.nn.Module):
    """A Linear whose weight is either a float tensor (a plain Linear) or, after :meth:`expect_packed`, the packed
    bytes of a GGML block type: a uint8 Parameter (so ``.to(device)`` moves it and ``state_dict`` / memory counts
    see the real bytes) plus its type code and the logical (out_features, in_features) shape.

    forward dequantises on the input's device in float32 (bit for bit what ``gguf.quants.dequantize`` gives),
    applies every callable of ``weight_function`` (LoRA patches) in order in float32, casts to the input's dtype,
    then ``F.linear``.
    """

    # The loader (checkpoints.load_weights_) consults this hook: packed bytes are assigned as uint8.
    def _bernini_load_dtype(self, leaf: str, tensor: torch.Tensor, proposed: torch.dtype) -> torch.dtype:
        if leaf == "weight" and self.qtype is not None:
            return torch.uint8
        return proposed

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.empty((out_features, in_features), device=device, dtype=dtype),
                                         requires_grad=False)
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.qtype: Optional[int] = None  # GGML type code of the packed weight; None: a float weight
        self.weight_function: list = []
        self.bias_function: list = []

    @property
    def bernini_quantized(self) -> bool:
        """True when the weight is packed bytes (what ComfyUI's weight patching must leave alone)."""
        return self.qtype is not None

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def expect_packed(self, qtype: int, stored_shape: Sequence[int]) -> None:
        """Make the (meta) weight a placeholder for packed bytes of GGML type `qtype`, stored as `stored_shape`
        (the file's byte shape), so that the loader assigns them unchanged."""
        if not is_block_quantized(qtype):
            raise BerniniError(f"GGML type {qtype} is not a block-quantised type; its values load as a float weight.")
        numel = self.out_features * self.in_features
        qt = QUANT_TYPES[int(qtype)]
        stored = tuple(int(s) for s in stored_shape)
        count = 1
        for s in stored:
            count *= s
        if numel % qt.block_size or count != packed_bytes(numel, qtype):
            raise BerniniError(f"packed {qt.name} weight of byte shape {stored} does not hold the "
                               f"{self.out_features}x{self.in_features} values of this layer.")
        self.qtype = int(qtype)
        self.weight = torch.nn.Parameter(torch.empty(stored, dtype=torch.uint8, device="meta"), requires_grad=False)

    def extra_repr(self) -> str:
        kind = QUANT_TYPES[self.qtype].name if self.qtype is not None else str(self.weight.dtype)
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"weight={kind}"

    def dequantized_weight(self, dtype: torch.dtype, device=None) -> torch.Tensor:
        """The weight as `dtype` on `device` (default: where it is), before any weight_function."""
        device = self.weight.device if device is None else device
        if self.qtype is None:
            return self.weight.to(device=device, dtype=dtype)
        packed = self.weight.to(device=device, non_blocking=True)
        return dequantize(packed, self.qtype, self.weight_shape, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # LoRA patches add to the float32 values and round once, as ComfyUI's weight patching does
        weight = self.dequantized_weight(torch.float32 if self.weight_function else x.dtype, x.device)
        for patch in self.weight_function:
            weight = patch(weight)
        weight = weight.to(x.dtype)
        bias = None
        if self.bias is not None:
            bias = self.bias.to(device=x.device, dtype=x.dtype)
            for patch in self.bias_function:
                bias = patch(bias)
        return F.linear(x, weight, bias)


def gguf_ops(base_ops=None):
    """An ops namespace (see bernini_core/ops.py) whose Linear is :class:`GGUFLinear`, the rest from `base_ops`."""
    from ..ops import resolve_ops

    base = resolve_ops(base_ops)
    names = ("Conv2d", "Conv3d", "LayerNorm", "GroupNorm", "Embedding")
    return types.SimpleNamespace(Linear=GGUFLinear, **{name: getattr(base, name) for name in names})
