"""fp8 e4m3fn "scaled" weights as ComfyUI / kijai ship them.

Two on-disk forms exist (ComfyUI ``comfy/utils.py`` ``convert_old_quants``,
``comfy/ops.py`` ``mixed_precision_ops``):

* old: a ``scaled_fp8`` marker tensor plus ``<layer>.scale_weight`` (fp32, one value
  per tensor) next to each fp8 ``<layer>.weight``; optionally ``<layer>.scale_input``;
* new: ``<layer>.weight_scale`` plus ``<layer>.comfy_quant`` (JSON bytes as uint8,
  ``{"format": "float8_e4m3fn"}``), optionally ``<layer>.input_scale``.

In both the real weight is ``fp8_weight.float() * scale``. We either dequantise at
load time (:func:`dequantize_fp8_state`) or keep the fp8 bytes in memory and
dequantise per call (:class:`Fp8ScaledLinear`, built through :func:`fp8_ops`).
"""

import json
import types
from typing import Dict, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F

from .errors import BerniniError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
E4M3_MAX = 448.0
_HALF = (torch.bfloat16, torch.float16)  # activation dtypes the _scaled_mm path takes

_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
# Side tensors that carry no weight: the marker, per-layer format tags and
# activation scales (we quantise activations dynamically, or not at all).
_DROPPED_SUFFIXES = (".comfy_quant", ".scale_input", ".input_scale")


def is_fp8(tensor: torch.Tensor) -> bool:
    return tensor.dtype in FP8_DTYPES


def _is_marker(key: str) -> bool:
    return key == "scaled_fp8" or key.endswith(".scaled_fp8")


def _check_comfy_quant(key: str, tag: torch.Tensor) -> None:
    try:
        conf = json.loads(bytes(tag.to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BerniniError(f"Unreadable quantisation tag '{key}' in the checkpoint ({exc}).") from None
    fmt = conf.get("format") if isinstance(conf, dict) else None
    if fmt not in FP8_FORMATS:
        raise BerniniError(
            f"Checkpoint layer '{key[: -len('.comfy_quant')]}' is quantised as '{fmt}', which Bernini "
            f"cannot load; use a bf16/fp16/fp32 or an fp8 e4m3fn 'scaled' file instead."
        )


def normalize_quant_key(key: str) -> Optional[str]:
    """Name of a tensor for the keep-fp8 path: ``weight_scale`` -> ``scale_weight``; markers -> None."""
    if _is_marker(key) or key.endswith(_DROPPED_SUFFIXES):
        return None
    if key.endswith(".weight_scale"):
        return key[: -len(".weight_scale")] + ".scale_weight"
    return key


def has_fp8_weights(state: Dict[str, torch.Tensor]) -> bool:
    return any(is_fp8(t) for t in state.values())


def dequantize_fp8_state(sd: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """New dict where every fp8 ``<layer>.weight`` becomes ``(weight.float() * scale).to(dtype)``.

    Scale tensors, the ``scaled_fp8`` marker and ``comfy_quant`` tags are dropped;
    other tensors are passed through untouched (their dtype policy is the loader's).
    An fp8 tensor without a scale is taken with scale 1. The input dict is not changed.
    """
    for key, tensor in sd.items():
        if key.endswith(".comfy_quant"):
            _check_comfy_quant(key, tensor)
    out = {}
    for key, tensor in sd.items():
        if _is_marker(key) or key.endswith(_SCALE_SUFFIXES) or key.endswith(_DROPPED_SUFFIXES):
            continue
        if not is_fp8(tensor):
            out[key] = tensor
            continue
        scale = None
        if key.endswith(".weight"):
            layer = key[: -len(".weight")]
            scale = sd.get(layer + ".scale_weight", sd.get(layer + ".weight_scale"))
        value = tensor.to(torch.float32)
        if scale is not None:
            value = value * scale.to(torch.float32)
        out[key] = value.to(dtype)
    return out


def iter_dequantized(shards: Iterable[Dict[str, torch.Tensor]], dtype: torch.dtype) -> Iterator[dict]:
    """Dequantise shard by shard (a layer's weight and scale must share a shard, as in every known file)."""
    for shard in shards:
        yield dequantize_fp8_state(shard, dtype)


def fp8_format_of(source) -> Optional[str]:
    """"float8_e4m3fn" / "float8_e5m2" when a checkpoint (a checkpoints.TensorSource) holds fp8 weights,
    None for a plain float file. Reads headers and the tiny ``comfy_quant`` tags only; other quantisations
    (nvfp4, int8, ...) raise a BerniniError saying which files are accepted."""
    formats = set()
    meta = source.metadata().get("_quantization_metadata")
    if meta:
        try:
            layers = json.loads(meta).get("layers", {})
        except (ValueError, AttributeError):
            raise BerniniError(f"Checkpoint '{source.path}' has unreadable quantisation metadata.") from None
        formats |= {conf.get("format") if isinstance(conf, dict) else conf for conf in layers.values()}
    for key in source.keys():
        if key.endswith(".comfy_quant"):
            _check_comfy_quant(key, source.get(key))
    unsupported = sorted(str(f) for f in formats if f not in FP8_FORMATS)
    if unsupported:
        raise BerniniError(f"Checkpoint '{source.path}' is quantised as {', '.join(unsupported)}, which Bernini "
                           f"cannot load; use a bf16/fp16/fp32 or an fp8 e4m3fn 'scaled' file instead.")
    found = {source.dtype(key) for key in source.keys()} & set(FP8_DTYPES)
    if not found:
        return None
    return "float8_e4m3fn" if torch.float8_e4m3fn in found else "float8_e5m2"


def fp8_matmul_supported(device) -> bool:
    """Whether ``torch._scaled_mm`` with e4m3 operands can run on ``device``: CUDA of compute capability >= 8.9
    (Ada, Hopper, Blackwell). Asked once per layer and device by prepare_fp8_matmul, never inside a forward."""
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return tuple(torch.cuda.get_device_capability(device)) >= (8, 9)


def _exact_device(device) -> torch.device:
    """'cuda' -> 'cuda:<current>', so that it compares equal to a tensor's device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class Fp8ScaledLinear(torch.nn.Module):
    """A Linear that may hold its weight as fp8 plus one fp32 scale.

    ``weight`` is whatever the checkpoint gave: fp8 (kept, 1 byte per value) or a
    regular float tensor (then this is a plain Linear). fp8 weights are
    dequantised on the fly to the input dtype, exactly ``weight.float() * scale``;
    on CUDA devices of compute capability >= 8.9 a bf16/fp16 input can instead go
    through ``torch._scaled_mm`` with a dynamic per-tensor input scale (what
    ComfyUI does for fp8 files). That path is decided per layer and device in eager,
    never inside a (possibly compiled) forward: :func:`prepare_fp8_matmul` before compiling, or lazily at the first
    eager bf16/fp16 call. Deciding runs the kernel once on a synthetic input against the dequantised result and
    keeps it only if it agrees and does not raise. State: ``_fp8_matmul_state`` None (undecided), True (verified) or
    False (dequantise), valid for the (device, activation dtype) in ``_fp8_matmul_key``.
    """

    # The loader (checkpoints.load_weights_) consults these two hooks.
    def _bernini_load_dtype(self, leaf: str, tensor: torch.Tensor, proposed: torch.dtype) -> torch.dtype:
        if leaf == "weight" and is_fp8(tensor):
            return tensor.dtype
        if leaf == "scale_weight":
            return torch.float32
        return proposed

    def _bernini_missing_defaults(self) -> dict:
        return {"scale_weight": 1.0}  # layers stored unquantised have no scale

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 fp8_matmul: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.empty((out_features, in_features), device=device, dtype=dtype),
                                         requires_grad=False)
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_buffer("scale_weight", torch.ones((), device=device, dtype=torch.float32))
        self.fp8_matmul = fp8_matmul
        self._fp8_matmul_state = None  # None: undecided, True: verified, False: dequantise ...
        self._fp8_matmul_key = None  # ... for this (device, activation dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.weight.dtype}"

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if is_fp8(self.weight):
            return (self.weight.to(torch.float32) * self.scale_weight.to(torch.float32)).to(dtype)
        return self.weight.to(dtype)

    # ComfyUI's ModelPatcher patches a weight through these two hooks when the layer has them
    # (comfy/model_patcher.py get_key_weight / patch_weight_to_device): it casts a copy of the stored weight to its
    # LoRA compute dtype, asks `convert_weight` for the real values, adds the patches, then hands the result to
    # `set_weight`. Re-quantising with the layer's own scale keeps the bytes' meaning, so ComfyUI's backup of the
    # original fp8 tensor alone restores the layer exactly on unpatch.
    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **_) -> torch.Tensor:
        if not is_fp8(self.weight):
            return weight
        scale = self.scale_weight.to(device=weight.device, dtype=weight.dtype)
        return weight.mul_(scale) if inplace else weight * scale

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed=None, return_weight: bool = False,
                   **_) -> Optional[torch.Tensor]:
        del seed  # round to nearest, deterministic (ComfyUI rounds fp8 stochastically from a per-key seed)
        if is_fp8(self.weight):
            scale = self.scale_weight.to(device=weight.device, dtype=torch.float32)
            limit = torch.finfo(self.weight.dtype).max
            weight = (weight.to(torch.float32) / scale).clamp(-limit, limit)
        weight = weight.to(self.weight.dtype)
        if return_weight:
            return weight
        if inplace_update:
            self.weight.data.copy_(weight)
        else:
            self.weight = torch.nn.Parameter(weight, requires_grad=False)
        return None

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def fp8_matmul_eligible(self, dtype: torch.dtype) -> bool:
        """The static conditions of the _scaled_mm path: e4m3 weight, one scale, sizes multiple of 16, fp16/bf16
        activations (the device is asked separately, fp8_matmul_supported)."""
        return (self.fp8_matmul and self.weight.dtype == torch.float8_e4m3fn and self.scale_weight.numel() == 1
                and dtype in _HALF and self.in_features % 16 == 0 and self.out_features % 16 == 0)

    @torch.no_grad()
    def verify_fp8_matmul(self, device, dtype: torch.dtype, rows: int = 32) -> bool:
        """Run the _scaled_mm path once on a seeded synthetic input on ``device`` against the dequantised result:
        True when it runs and agrees (relative error < 0.1; fp8 activations typically cost 1-3 %)."""
        device = torch.device(device)
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(rows, self.in_features, generator=generator, device=device).to(dtype)
        weight, scale = self.weight.to(device), self.scale_weight.to(device)
        bias = None if self.bias is None else self.bias.to(device)
        try:
            out = _scaled_mm_linear(x, weight, scale, bias).float()
        except (RuntimeError, NotImplementedError, TypeError):  # kernel missing for this device / shape / dtype
            return False
        reference = F.linear(x, (weight.float() * scale.float()).to(dtype), None if bias is None else bias.to(dtype))
        reference = reference.float()
        error = (out - reference).norm() / reference.norm().clamp(min=1e-12)
        return bool(torch.isfinite(error) and error < 0.1)

    def decide_fp8_matmul(self, device, dtype: torch.dtype, supported: Optional[bool] = None) -> bool:
        """Decide (eager) whether calls on ``device`` with ``dtype`` activations use _scaled_mm; stores the decision
        on the layer. ``supported``: the device's answer when already known (fp8_matmul_supported)."""
        device = _exact_device(device)
        if supported is None:
            supported = fp8_matmul_supported(device)
        use = bool(supported and self.fp8_matmul_eligible(dtype) and self.verify_fp8_matmul(device, dtype))
        self._fp8_matmul_state, self._fp8_matmul_key = use, (device, dtype)
        return use

    def fp8_matmul_decided(self, device, dtype: torch.dtype) -> bool:
        return self._fp8_matmul_state is not None and self._fp8_matmul_key == (device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in _HALF and is_fp8(self.weight) and not self.fp8_matmul_decided(x.device, x.dtype) \
                and not torch.compiler.is_compiling():
            self.decide_fp8_matmul(x.device, x.dtype)  # first eager call; a compiled graph never verifies
        if self._fp8_matmul_state and self._fp8_matmul_key == (x.device, x.dtype):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return _scaled_mm_linear(x, self.weight, self.scale_weight, bias)
        return self._reference_forward(x)


def _scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, scale_weight: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x @ (weight * scale_weight)^T + bias with fp8 operands: x quantised to e4m3 with one dynamic scale (its
    absolute max / 448), accumulated by torch._scaled_mm, result in x's dtype."""
    in_features, out_features = weight.shape[1], weight.shape[0]
    flat = x.reshape(-1, in_features)
    scale_in = (flat.abs().amax().to(torch.float32) / E4M3_MAX).clamp(min=1e-12)
    x_fp8 = (flat.to(torch.float32) / scale_in).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(x_fp8, weight.t(), scale_a=scale_in, scale_b=scale_weight.to(torch.float32).reshape(()),
                           bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], out_features)


def prepare_fp8_matmul(model: torch.nn.Module, device, dtype: torch.dtype = torch.bfloat16, *,
                       supported: Optional[bool] = None) -> dict:
    """Decide, in eager and before torch.compile traces anything, which Fp8ScaledLinear layers of ``model`` compute
    with torch._scaled_mm on ``device`` for ``dtype`` activations; the rest dequantise. Layers already decided for
    this device are kept (a LoRA merge resets a layer to undecided). The kernel is verified once per distinct layer
    shape (with that shape's first layer's weights, moved to ``device`` for the check if they live elsewhere, e.g.
    block swap). ``supported``: override the device check (tests). Returns counts {"scaled_mm": n, "dequantize": m}.
    """
    device = _exact_device(device)
    if supported is None:
        supported = fp8_matmul_supported(device)
    verified: dict = {}
    counts = {"scaled_mm": 0, "dequantize": 0}
    for layer in model.modules():
        if not isinstance(layer, Fp8ScaledLinear) or not is_fp8(layer.weight):
            continue
        if not layer.fp8_matmul_decided(device, dtype):
            shape = (layer.in_features, layer.out_features, layer.bias is not None)
            if not (supported and layer.fp8_matmul_eligible(dtype)):
                layer._fp8_matmul_state, layer._fp8_matmul_key = False, (device, dtype)
            elif shape in verified:
                layer._fp8_matmul_state, layer._fp8_matmul_key = verified[shape], (device, dtype)
            else:
                verified[shape] = layer.decide_fp8_matmul(device, dtype, supported=True)
        counts["scaled_mm" if layer._fp8_matmul_state else "dequantize"] += 1
    return counts


def fp8_ops(base_ops=None, *, fp8_matmul: bool = True):
    """An ops namespace (see ops.py) whose Linear is :class:`Fp8ScaledLinear`, the rest from ``base_ops``."""
    from .ops import resolve_ops

    base = resolve_ops(base_ops)

    class Linear(Fp8ScaledLinear):
        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
            super().__init__(in_features, out_features, bias, device=device, dtype=dtype, fp8_matmul=fp8_matmul)

    names = ("Conv2d", "Conv3d", "LayerNorm", "GroupNorm", "Embedding")
    return types.SimpleNamespace(Linear=Linear, **{name: getattr(base, name) for name in names})
