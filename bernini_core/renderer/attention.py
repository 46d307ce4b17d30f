"""The one attention function of the renderer, with selectable kernels.

Layout everywhere: q, k, v are [B, L, heads, head_dim]; the result has q's layout and dtype.

Backends (docs/architecture.md §5): "sdpa" (torch scaled_dot_product_attention, always there), "flash"
(FlashAttention-3 ``flash_attn_interface`` else FlashAttention-2 ``flash_attn``), "sage"
(``sageattention``, quantised: never picked by "auto"), "auto" (on CUDA with fp16/bf16 inputs the
best exact kernel that imports, like the official FA3 -> FA2 -> SDPA order of docs/official_behaviour.md §4.1;
else sdpa).

The flash/sage kernels take no key mask: masked calls (cross-attention of a batch whose contexts
have different lengths) always go through SDPA, which is exact and cheap for a few hundred keys.

The kernel is resolved once per forward (``resolve_attention`` -> ``AttentionKernel``, outside the DiT blocks), so
the blocks carry no import, cache lookup or name check and torch.compile traces them without graph breaks.

Sequence parallelism plugs in per call, never through process state: ``attention(..., sequence_parallel=handler)``
calls ``handler(q, k, v, local_attention)`` instead of the local kernel, where ``local_attention(q, k, v)`` runs the
selected kernel on whatever the handler gathered (bernini_core/parallel/ulysses.py; the DiT instance that holds the
handler passes it to its self-attention calls only, docs/architecture.md §5.1).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import BerniniError

BACKENDS = ("sdpa", "flash", "sage", "auto")


@functools.lru_cache(maxsize=None)
def _import_optional(module_name: str):
    try:
        return importlib.import_module(module_name)
    except Exception:  # missing, or built against another torch/CUDA: treat as unavailable
        return None


def _flash_module():
    """(module, is_fa3) for the best importable FlashAttention, or (None, False)."""
    fa3 = _import_optional("flash_attn_interface")
    if fa3 is not None and hasattr(fa3, "flash_attn_func"):
        return fa3, True
    fa2 = _import_optional("flash_attn")
    if fa2 is not None and hasattr(fa2, "flash_attn_func"):
        return fa2, False
    return None, False


def available_backends() -> list[str]:
    """Concrete backends usable here ("auto" is always accepted on top of these)."""
    names = ["sdpa"]
    if _flash_module()[0] is not None:
        names.append("flash")
    sage = _import_optional("sageattention")
    if sage is not None and hasattr(sage, "sageattn"):
        names.append("sage")
    return names


def check_backend(name: Optional[str]) -> str:
    """Validate a backend choice (None means "auto"); returns the normalised name."""
    name = "auto" if name is None else str(name).lower()
    if name not in BACKENDS:
        raise BerniniError(
            f"attention backend {name!r} is unknown; choose one of {', '.join(BACKENDS)}."
        )
    if name in ("flash", "sage") and name not in available_backends():
        package = "flash-attn (flash_attn / flash_attn_interface)" if name == "flash" else "sageattention"
        raise BerniniError(
            f"attention backend {name!r} is not available: {package} is not installed or does not import. "
            f"Install it, or choose one of {', '.join(available_backends() + ['auto'])}."
        )
    return name


def _sdpa(q, k, v, key_mask=None):
    mask = None if key_mask is None else key_mask[:, None, None, :].to(device=q.device, dtype=torch.bool)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _flash(flash_attn_func, q, k, v):
    out = flash_attn_func(q, k, v, causal=False)
    if isinstance(out, tuple):  # some FA3 releases also return the log-sum-exp
        out = out[0]
    return out


def _sage(sageattn, q, k, v):
    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


@dataclass(frozen=True)
class AttentionKernel:
    """The attention of one forward, resolved once outside the DiT blocks (resolve_attention): calling it does no
    import, cache lookup or name check, so a compiled block traces straight into the kernel.

    backend: the requested setting ("auto", "sdpa", ...); name: the kernel unmasked calls run ("sdpa", "flash",
    "sage"); local: that kernel as ``(q, k, v) -> out``. Masked calls always run SDPA (module docstring).
    """

    backend: str
    name: str
    local: Callable

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: Optional[torch.Tensor] = None,
                 sequence_parallel: Optional[Callable] = None) -> torch.Tensor:
        if sequence_parallel is not None:
            if key_mask is not None:
                raise BerniniError("sequence-parallel self-attention does not support a key mask.")
            return sequence_parallel(q, k, v, self.local)
        if key_mask is not None:
            return _sdpa(q, k, v, key_mask)
        return self.local(q, k, v)


def resolve_attention(backend: Optional[str], device, dtype: torch.dtype) -> AttentionKernel:
    """The kernel a forward on ``device`` with ``dtype`` activations runs for the setting ``backend`` (None = auto).

    "auto" takes FlashAttention on CUDA with fp16/bf16 when it imports, else SDPA; "flash" / "sage" need CUDA and
    fp16/bf16 (BerniniError otherwise, before any work).
    """
    name = check_backend(backend)
    device = torch.device(device)
    fast_capable = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    flash_module = _flash_module()[0]
    if name == "auto":
        name_run = "flash" if fast_capable and flash_module is not None else "sdpa"
    else:
        name_run = name
        if name in ("flash", "sage") and not fast_capable:
            raise BerniniError(
                f"attention backend {name!r} needs CUDA tensors in float16/bfloat16 (got {dtype} on "
                f"{device}); run the model in bf16 on a GPU, or choose 'sdpa' / 'auto'."
            )
    if name_run == "flash":
        local = functools.partial(_flash, flash_module.flash_attn_func)
    elif name_run == "sage":
        local = functools.partial(_sage, _import_optional("sageattention").sageattn)
    else:
        local = _sdpa
    return AttentionKernel(name, name_run, local)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: Optional[torch.Tensor] = None,
              backend=None, sequence_parallel: Optional[Callable] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v over [B, L, heads, head_dim] tensors.

    backend: an AttentionKernel from resolve_attention (what the DiT passes its blocks), or a setting name / None
    resolved here for q's device and dtype. key_mask: optional bool [B, Lk], True = key attended.
    sequence_parallel: for sharded self-attention, a handler ``(q, k, v, local_attention) -> out`` (e.g. a bound
    ``UlyssesAttention``) that runs the selected kernel on the gathered sequence; None attends locally.
    """
    kernel = backend if isinstance(backend, AttentionKernel) else resolve_attention(backend, q.device, q.dtype)
    return kernel(q, k, v, key_mask=key_mask, sequence_parallel=sequence_parallel)
