"""What a pool rank loads: only the DiT experts, from the same files the driver's loader node names.

A spec is JSON-able (it crosses to the Ray actors): {"kind": "folder", "path": ...} for an official / models/bernini
folder (full Bernini or Bernini-R; the loader node's settings), or {"kind": "files", "high": ..., "low": ... | None,
"keep_fp8": bool} for ComfyUI single files (safetensors or GGUF). Paths must resolve on every node of the cluster.
Optional keys: "loras" (Apply Bernini LoRA) and "compile" (a torch.compile backend name: the ranks compile their
experts' blocks once the layout is set, pool/worker.py).
"""

from __future__ import annotations

import torch

from ...errors import BerniniError
from ...runtime import resolve_dtype


def spec_paths(spec: dict) -> list:
    """The files and folders a spec reads (checked on every node before the load)."""
    paths = [spec["path"]] if spec["kind"] == "folder" else [p for p in (spec["high"], spec.get("low")) if p]
    return paths + [entry[0] for entry in spec.get("loras", [])]


def load_experts(spec: dict, *, device: torch.device, dtype: str, attention: str, runtime):
    """A pipeline holding only the experts of `spec`, on `runtime` (a pool rank's PoolRuntime), with the spec's
    LoRAs ([file, strength, "high" | "low"] entries, Apply Bernini LoRA on a pooled renderer) merged in."""
    pipe = _load(spec, device=device, dtype=dtype, attention=attention, runtime=runtime)
    if spec.get("loras"):
        from ...lora import LoraSpec, apply_loras_

        apply_loras_(pipe, [LoraSpec(path, float(strength), expert) for path, strength, expert in spec["loras"]],
                     compute_device=device)
    return pipe


def _load(spec: dict, *, device: torch.device, dtype: str, attention: str, runtime):
    if spec["kind"] == "folder":
        from ...pipeline import BerniniPipeline

        pipe = BerniniPipeline.from_pretrained(spec["path"], device=str(device), dtype=dtype, attention=attention,
                                               parts=("experts",), offload=runtime.offload)
        pipe.runtime = runtime  # same devices and offload policy as the one it was built with
        return pipe
    if spec["kind"] == "files":
        from ...loaders import RendererComponents, RendererConfig, load_dit_file
        from ...pipeline import RendererPipeline

        keep_fp8 = bool(spec.get("keep_fp8"))
        compute = torch.bfloat16 if keep_fp8 else resolve_dtype(dtype)

        def expert(path):
            return load_dit_file(path, dtype=compute, keep_fp8=keep_fp8, attention=attention)

        components = RendererComponents(config=RendererConfig(), dit_high=expert(spec["high"]),
                                        dit_low=expert(spec["low"]) if spec.get("low") else None, text_encoder=None,
                                        vae=None, parts=frozenset(("experts",)))
        return RendererPipeline(components, runtime)
    raise BerniniError(f"unknown expert source {spec.get('kind')!r} for a pool (expected 'folder' or 'files').")
