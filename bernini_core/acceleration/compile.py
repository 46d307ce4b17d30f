"""Regional torch.compile of the renderer DiT: every DiTBlock is compiled in place, the rest stays eager.

Why regional: the blocks of an expert (40 in A14B) run the same code on different weights. ``nn.Module.compile``
on each block compiles ``DiTBlock.forward``; dynamo keys its cache on that code object and takes parameters as
graph inputs (it inlines nn.Modules, always on in current torch), so all blocks share ONE compiled graph: compile
time is that of one block, and a new token layout (resolution, frame count, number of source streams) recompiles
once for all blocks instead of once per block.

The blocks are compile-ready by construction (tests/test_compile.py keeps them so): the attention kernel is
resolved once per forward outside them (renderer/attention.py), RoPE is real float64 arithmetic on cached tables
(renderer/rope.py), and whether an fp8-scaled Linear uses ``torch._scaled_mm`` is decided in eager before any
tracing (quant.prepare_fp8_matmul; here before compiling and, for layers reset since, before every forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..errors import BerniniError
from ..quant import Fp8ScaledLinear, prepare_fp8_matmul

# Every distinct token layout adds one cache entry on DiTBlock.forward (dynamic=False specialises on shapes). A
# session sees a handful of layouts per task (guidance arms with / without source streams, CFG batch 1 or 2) and
# several tasks in a long ComfyUI session; torch's default of 8 entries would then silently fall back to eager.
# 64 layouts cost only memory for the compiled code, and the limit is per code object, so the 40 blocks sharing one
# graph do not multiply it.
RECOMPILE_LIMIT = 64
FALLBACK_BACKEND = "aot_eager"  # no code generation (no compiler needed): checks tracing, no speed-up


@dataclass(frozen=True)
class CompileSettings:
    """What compile_blocks did to a DiT (``dit.compiled_blocks``)."""

    backend: Union[str, Callable]
    mode: Optional[str]
    dynamic: bool


def compile_blocks(dit: nn.Module, *, backend: Union[str, Callable] = "inductor", mode: Optional[str] = None,
                   dynamic: bool = False, device=None) -> None:
    """Compile each block of ``dit`` (a BerniniDiT) in place with ``torch.compile``; the settings are recorded as
    ``dit.compiled_blocks``. Idempotent: the same settings again do nothing, other settings recompile.

    backend: a torch.compile backend name ("inductor", "aot_eager", ...) or a backend callable; mode: an inductor
    mode ("default", "max-autotune-no-cudagraphs", ...); dynamic: False specialises on shapes (a new layout
    recompiles once), True traces symbolic shapes. device: where the blocks will run (default: where the DiT's
    patch embedding is; give it when the DiT is offloaded at compile time). BerniniError, before anything is
    changed, when torch.compile cannot run there (checked by compiling a tiny function on that device).
    """
    blocks = _blocks_of(dit)
    settings = CompileSettings(backend, mode, bool(dynamic))
    if getattr(dit, "compiled_blocks", None) == settings:
        return
    device = dit.patch_embedding.weight.device if device is None else torch.device(device)
    _check_settings(backend, mode)
    if getattr(dit, "block_swap", None) is not None and _uses_cuda_graphs(mode):
        raise BerniniError(f"compile mode {mode!r} records CUDA graphs, which keep fixed weight addresses, while block "
                           "swap moves weights every forward; use mode 'max-autotune-no-cudagraphs' or the default.")
    _check_compile_works(backend, device)
    _raise_recompile_limits()
    if any(isinstance(m, Fp8ScaledLinear) for m in dit.modules()):
        prepare_fp8_matmul(dit, device, dit.compute_dtype)  # decided in eager, never inside the traced graph
        if getattr(dit, "_fp8_decision_hook", None) is None:
            dit._fp8_decision_hook = dit.register_forward_pre_hook(_decide_fp8_before_forward, with_kwargs=True)
    for block in blocks:
        block.compile(backend=backend, mode=mode, dynamic=bool(dynamic))
    dit.compiled_blocks = settings


def uncompile_blocks(dit: nn.Module) -> None:
    """Undo compile_blocks: the blocks run eagerly again (the compiled code stays in dynamo's cache)."""
    for block in _blocks_of(dit):
        block._compiled_call_impl = None  # what nn.Module.compile sets; None is eager
    hook = getattr(dit, "_fp8_decision_hook", None)
    if hook is not None:
        hook.remove()
        dit._fp8_decision_hook = None
    dit.compiled_blocks = None


def explain_block(dit: nn.Module, inputs) -> int:
    """Number of dynamo graph breaks in a DiT block when ``dit`` runs on ``inputs``: the DiT forward's arguments
    as a tuple ``(streams, source_ids, timestep, context)`` or a dict of keyword arguments. 0 is compile-ready."""
    return block_explanation(dit, inputs).graph_break_count


def block_explanation(dit: nn.Module, inputs):
    """torch._dynamo.explain's report (graph_count, graph_break_count, break_reasons, ...) for block 0 of ``dit``
    called with exactly what the forward on ``inputs`` hands it (see explain_block)."""
    args, kwargs = block_inputs(dit, inputs)
    block = _blocks_of(dit)[0]
    with torch.no_grad():
        return torch._dynamo.explain(block.forward)(*args, **kwargs)


def block_inputs(dit: nn.Module, inputs) -> tuple[tuple, dict]:
    """(args, kwargs) that block 0 receives when ``dit`` runs on ``inputs`` (tuple of forward arguments or dict of
    keyword arguments); the forward stops there, so this costs the embeddings only."""
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, dict) else (tuple(inputs), {})
    block = _blocks_of(dit)[0]
    compiled, block._compiled_call_impl = block._compiled_call_impl, None  # hooks run in the eager call only

    def capture(_module, block_args, block_kwargs):
        raise _BlockInputs(block_args, block_kwargs)

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            dit(*args, **kwargs)
    except _BlockInputs as captured:
        return captured.args, captured.kwargs
    finally:
        handle.remove()
        block._compiled_call_impl = compiled
    raise BerniniError("explain_block: the DiT forward returned without calling its first block.")


class _BlockInputs(Exception):
    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("block inputs captured")
        self.args, self.kwargs = args, kwargs


def _blocks_of(dit: nn.Module) -> nn.ModuleList:
    from ..renderer.transformer import DiTBlock

    blocks = getattr(dit, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0 or not all(isinstance(b, DiTBlock) for b in blocks):
        raise BerniniError(f"compile: expected a BerniniDiT (a model with DiTBlock blocks), got {type(dit).__name__}.")
    return blocks


def _check_settings(backend, mode) -> None:
    if isinstance(backend, str):
        known = torch._dynamo.list_backends(exclude_tags=())
        if backend not in known:
            raise BerniniError(f"compile backend {backend!r} is unknown; choose one of {', '.join(sorted(known))} "
                               f"(usually 'inductor', or '{FALLBACK_BACKEND}' where inductor cannot build).")
    elif not callable(backend):
        raise BerniniError(f"compile backend must be a name or a callable, got {type(backend).__name__}.")
    if mode is not None:
        if backend != "inductor":
            raise BerniniError(f"compile mode {mode!r} is an inductor option; leave mode unset for backend "
                               f"{backend!r}.")
        from torch._inductor import list_mode_options

        if mode not in list_mode_options():
            raise BerniniError(f"compile mode {mode!r} is unknown; choose one of {', '.join(list_mode_options())}.")


def _uses_cuda_graphs(mode: Optional[str]) -> bool:
    if mode is None:
        return False
    from torch._inductor import list_mode_options

    return bool(list_mode_options().get(mode, {}).get("triton.cudagraphs"))


def _probe(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(t * 2.0 + 1.0)


def _check_compile_works(backend, device: torch.device) -> None:
    """Compile and run a tiny function with ``backend`` on ``device`` (a missing C++ compiler for inductor on CPU or
    a missing/broken triton on CUDA fails here, not in the middle of a render)."""
    if not torch._dynamo.is_dynamo_supported():
        raise BerniniError("torch.compile is not supported by this Python / torch build; run without compiling.")
    name = backend if isinstance(backend, str) else getattr(backend, "__name__", type(backend).__name__)
    try:
        probe = torch.compile(_probe, backend=backend, dynamic=False)
        expected = _probe(torch.linspace(-2, 2, 8, device=device))
        if not torch.allclose(probe(torch.linspace(-2, 2, 8, device=device)), expected, atol=1e-5):
            raise RuntimeError("the compiled probe computed a wrong result")
    except Exception as exc:  # any toolchain failure: say what and how to get around it
        need = ""
        if backend == "inductor":
            need = (" Inductor needs a C++ compiler on CPU (install g++ / clang, or set CXX)" if device.type == "cpu"
                    else " Inductor needs a working triton for this GPU (the triton wheel matching torch)") + ";"
        raise BerniniError(
            f"torch.compile with backend {name!r} does not work on {device} ({_root_cause(exc)}).{need} compile "
            f"with backend='{FALLBACK_BACKEND}' instead (traces the blocks, no code generation, no speed-up), or run "
            "without compiling."
        ) from None


def _root_cause(exc: BaseException) -> str:
    """'Type: first line' of the innermost exception (dynamo wraps backend failures in BackendCompilerFailed)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if inner is None:
            break
        exc = inner
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def _raise_recompile_limits() -> None:
    config: Any = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6; keep whichever exists
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
            break
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 4 * RECOMPILE_LIMIT))
            break


def _decide_fp8_before_forward(dit: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a compiled DiT: layers undecided since compiling (a LoRA merge resets them) are decided
    in eager here, before the compiled blocks run; decided layers cost one attribute check each."""
    streams = args[0] if args else kwargs.get("streams")
    device = streams[-1].device if streams else dit.patch_embedding.weight.device
    prepare_fp8_matmul(dit, device, dit.compute_dtype)
