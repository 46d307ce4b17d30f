"""The one module that talks to ComfyUI (docs/architecture.md §1, §5; docs/node_contract.md §6): handles are
(Core)ModelPatchers loaded with ``load_models_gpu`` so ComfyUI's memory manager evicts our models like its own; progress
goes to ``comfy.utils.ProgressBar`` with Latent2RGB previews; interrupts come from ComfyUI; layers from ``comfy.ops`` so
``--lowvram`` can stream weights; model folders from ``folder_paths``. ComfyUI is imported inside functions only:
without it the package imports and every function here falls back to the standalone behaviour.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import types
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from .errors import BerniniError
from .runtime import ModelHandle, Runtime, module_bytes, resolve_device

MODEL_FOLDER = "bernini"  # models/bernini/<official folder with config.json>
FILE_KINDS = ("diffusion_models", "text_encoders", "vae", "loras")
# ComfyUI lists only its own weight formats (folder_paths.supported_pt_extensions, no .gguf) under diffusion_models;
# GGUF experts are listed from the same folders through a kind of our own (ComfyUI-GGUF registers "unet_gguf" alike).
GGUF_KIND = "bernini_gguf_diffusion_models"
TEXT_ENCODER_HANDLES = ("umt5", "t5", "text_encoder")
VAE_HANDLES = ("vae",)
OPS_LAYERS = ("Linear", "Conv2d", "Conv3d", "LayerNorm", "GroupNorm", "Embedding")
DEFAULT_PREVIEW_SIZE = 512  # ComfyUI's --preview-size default
_HANDLE_ATTR = "_bernini_comfy_handle"


def comfy_available() -> bool:
    """True inside ComfyUI. ComfyUI imports comfy.model_management before any custom node loads; we only
    look, never import it ourselves (importing it initialises devices and reads ComfyUI's CLI flags)."""
    return "comfy.model_management" in sys.modules


def _model_management():
    import comfy.model_management

    return comfy.model_management


# ---------------------------------------------------------------------------------------------- runtime
@dataclass
class PatcherHandle(ModelHandle):
    """A ModelHandle whose module is owned by a ComfyUI ModelPatcher."""

    patcher: Any = None
    # Modules not built from ComfyUI's layers (transformers' UMT5 and Qwen) cannot be streamed under --lowvram:
    # ComfyUI would leave their layers on the CPU. They are loaded whole.
    force_full_load: bool = False

    def load(self, memory_required: int = 0) -> torch.nn.Module:
        _load_models([self], memory_required)
        return self.module

    def offload(self) -> None:  # nothing: ComfyUI's manager evicts models when it needs the memory
        pass


def _streamable(module: torch.nn.Module) -> bool:
    """Whether ComfyUI may stream this model layer by layer (--lowvram): only when it is built from ComfyUI's
    cast layers and holds no layer that cannot follow its input's device — transformers models (UMT5, the Qwen
    part of the planner) and our fp8 Linear keep their weights where ComfyUI leaves them, so such a model
    (the planner mixes both kinds) is loaded whole."""
    from .quant import Fp8ScaledLinear

    has_cast_layers = False
    for m in module.modules():
        if isinstance(m, Fp8ScaledLinear) or type(m).__module__.startswith("transformers."):
            return False
        has_cast_layers = has_cast_layers or bool(getattr(m, "comfy_cast_weights", False))
    return has_cast_layers


def _load_models(handles, memory_required: int = 0) -> None:
    """load_models_gpu with the stage's working memory, as ComfyUI's own sampler and VAE pass it, so the manager
    frees room for the activations too (and not only ~1 GB above the weights)."""
    kwargs = {"force_full_load": any(h.force_full_load for h in handles)}
    if memory_required:
        kwargs.update(memory_required=int(memory_required), minimum_memory_required=int(memory_required))
    _model_management().load_models_gpu([h.patcher for h in handles], **kwargs)


PATCHER_PREFIX = "inner."  # our module's parameter names as ComfyUI's patcher sees them (_PatcherModel.inner)


class _PatcherModel(torch.nn.Module):
    """What a ModelPatcher owns: our module as its only child. ComfyUI writes bookkeeping attributes on the model
    it patches (`device`, `model_loaded_weight_memory`, ...); a transformers model's read-only `device` refuses."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module


# ComfyUI's log names a model by its class name ("Requested to load <class>"): one subclass of _PatcherModel per
# handle role, named for the model it holds (an identifier, as ComfyUI prints it as is).
MODEL_CLASS_NAMES = {
    "dit_high": "BerniniHighNoiseExpert",
    "dit_low": "BerniniLowNoiseExpert",
    "umt5": "BerniniUMT5TextEncoder",
    "t5": "BerniniUMT5TextEncoder",
    "text_encoder": "BerniniUMT5TextEncoder",
    "vae": "BerniniWan21VAE",
    "planner": "BerniniPlanner",
    "planner_lm_head": "BerniniPlannerLMHead",
    "prompt_enhancer": "BerniniPromptEnhancer",
}
POOL_CLASS_NAME = "BerniniMultiGPUPool"


def model_class_name(handle_name: str) -> str:
    """The class name ComfyUI logs for the model of a handle role; unknown roles read as Bernini<CamelCase>."""
    known = MODEL_CLASS_NAMES.get(handle_name)
    if known:
        return known
    words = [w for w in "".join(c if c.isalnum() else " " for c in handle_name).split() if w]
    return "Bernini" + "".join(w[:1].upper() + w[1:] for w in words)


@functools.lru_cache(maxsize=None)  # one class per (base, name): stable, built once
def _named_model_class(base: type, name: str) -> type:
    return type(name, (base,), {"__module__": __name__, "__qualname__": name})


@functools.lru_cache(maxsize=4)  # one subclass per ComfyUI patcher class: stable, built once
def _patcher_class(base):
    """ComfyUI's (Core)ModelPatcher, taught about quantised layers (GGUF experts, bernini_core/gguf): their weight
    is packed bytes that ComfyUI's weight patching cannot add a LoRA to. As ComfyUI-GGUF does, such a layer's
    patches are applied after dequantisation, in its forward: loading the patcher hangs one ComfyUI LowVramPatch
    (which computes comfy.lora.calculate_weight over the patcher's patches) on the layer's `weight_function`, and
    unpatching takes it off again, so the packed bytes themselves never change."""

    # ComfyUI patches only the parameters of leaf modules (ModelPatcher._load_list skips modules with children), but
    # the DiT keeps its per-block modulation (`scale_shift_table`) on the block itself: its LoRA diffs (lightx2v's
    # `.diff_m` / `.modulation.diff`) are patched here, through ComfyUI's own patch_weight_to_device (backup and
    # unpatch included), so the patched model equals the standalone merge.
    class BerniniModelPatcher(base):
        def patch_weight_to_device(self, key, *args, **kwargs):
            layer = _quantised_layer(self.model, key)
            if layer is None:
                return super().patch_weight_to_device(key, *args, **kwargs)
            # packed bytes: never cast or patched here (the patches apply in the layer's forward)
            return layer.weight if kwargs.get("return_weight") else None

        def load(self, *args, **kwargs):
            result = super().load(*args, **kwargs)
            device_to = args[0] if args else kwargs.get("device_to")
            for key in _non_leaf_patch_keys(self):
                self.patch_weight_to_device(key, device_to=device_to)
            _attach_quantised_patches(self)
            return result

        def unpatch_model(self, *args, **kwargs):
            result = super().unpatch_model(*args, **kwargs)
            _detach_quantised_patches(self)
            return result

    BerniniModelPatcher.__name__ = BerniniModelPatcher.__qualname__ = f"Bernini{base.__name__}"
    return BerniniModelPatcher


def _non_leaf_patch_keys(patcher) -> list[str]:
    """Patched parameters that sit on modules with children and are not patched yet."""
    keys = []
    for key in patcher.patches:
        path, _, leaf = key.rpartition(".")
        try:
            module = patcher.model.get_submodule(path) if path else patcher.model
        except AttributeError:
            continue
        if any(True for _ in module.children()) and key not in patcher.backup and leaf in module._parameters:
            keys.append(key)
    return keys


def _quantised_layer(model: torch.nn.Module, key: str) -> Optional[torch.nn.Module]:
    """The quantised layer whose packed weight `key` names, or None."""
    path, _, leaf = key.rpartition(".")
    if leaf != "weight":
        return None
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return module if getattr(module, "bernini_quantized", False) else None


def _quantised_layers(patcher) -> Iterator[tuple[str, torch.nn.Module]]:
    for name, module in patcher.model.named_modules():
        if getattr(module, "bernini_quantized", False):
            yield f"{name}.weight", module


def _attach_quantised_patches(patcher) -> None:
    from comfy.model_patcher import LowVramPatch

    for key, module in _quantised_layers(patcher):
        module.weight_function = [LowVramPatch(key, patcher.patches)] if key in patcher.patches else []


def _detach_quantised_patches(patcher) -> None:
    for _, module in _quantised_layers(patcher):
        module.weight_function = []


def lora_patches(lora_state: dict, to_load: dict) -> dict:
    """ComfyUI's own LoRA reader (comfy.lora.load_lora) over `to_load` {LoRA module name: patcher key}: the patches
    ComfyUI's LoraLoader would make, with its rank/alpha rules and every adapter kind it knows."""
    import comfy.lora

    try:
        return comfy.lora.load_lora(lora_state, to_load, log_missing=False)
    except TypeError:  # ComfyUI before log_missing (2025)
        return comfy.lora.load_lora(lora_state, to_load)


def patched_handle(handle: "PatcherHandle", patches: dict, strength: float) -> "PatcherHandle":
    """A handle over a clone of `handle`'s patcher carrying `patches` at `strength`: ComfyUI patches the shared module
    when the clone loads and restores the original weights when another clone of it loads (native LoRA behaviour;
    no reload from disk)."""
    if not isinstance(handle, PatcherHandle):
        raise BerniniError("LoRA patches apply to models held by ComfyUI's model management; outside ComfyUI merge "
                           "LoRAs at load time (BerniniPipeline.from_pretrained(loras=...), CLI --lora).")
    clone = handle.patcher.clone()
    clone.add_patches(patches, strength)
    return dataclasses.replace(handle, patcher=clone)


class _PoolModel(torch.nn.Module):
    """What ComfyUI's model management holds for a pool of Bernini Multi-GPU workers: no weights here (they live in
    the workers); unloading it ends the pool."""

    def __init__(self, pool):
        super().__init__()
        self.pool_ref = weakref.ref(pool)


def _pool_patcher_class(base):
    class BerniniPoolPatcher(base):
        """Ends the pool when ComfyUI unloads it: /free with unload_models, "Unload models" in the menu, or ComfyUI
        needing the memory of the device the pool was registered on (the next run starts the pool again)."""

        def detach(self, *args, **kwargs):
            pool = self.model.pool_ref()
            if pool is not None:
                pool.shutdown()
            return super().detach(*args, **kwargs)

    BerniniPoolPatcher.__name__ = BerniniPoolPatcher.__qualname__ = "BerniniPoolPatcher"
    return BerniniPoolPatcher


def track_pool(pool) -> None:
    """Inside ComfyUI: make the pool one of ComfyUI's loaded models (a weightless ModelPatcher on the device ComfyUI
    renders on), so that freeing models ends its workers. Outside ComfyUI: nothing (the pool ends with its owner)."""
    if not comfy_available():
        return
    patcher = getattr(pool, "_comfy_patcher", None)
    if patcher is None:
        import comfy.model_patcher as model_patcher

        mm = _model_management()
        device = mm.get_torch_device()
        model = _named_model_class(_PoolModel, POOL_CLASS_NAME)(pool)
        patcher = _pool_patcher_class(model_patcher.ModelPatcher)(model, load_device=device, offload_device=device,
                                                                  size=0)
        pool._comfy_patcher = patcher
    _model_management().load_models_gpu([patcher])


@dataclass
class _StageBar:  # the ProgressBar of one stage run
    stage: str
    total: int
    step: int
    bar: Any
    preview_size: Optional[int]  # None: previews are off


class ComfyRuntime(Runtime):
    """The engine's runtime protocol backed by ComfyUI's model management, progress bar and interrupts."""

    def __init__(self, device="auto"):
        # An explicit device pins every model to it; "auto" lets ComfyUI pick per model kind.
        self._pinned_device = None if device in (None, "auto") else resolve_device(device)
        self.device = self._pinned_device or _model_management().get_torch_device()
        self.offload = False  # the memory manager decides, not us
        self._bar: Optional[_StageBar] = None
        self._rgb = {}  # (device, dtype) -> (factors [3,16], bias [3]) for previews, built once

    def _devices_for(self, name: str, mm) -> tuple[torch.device, torch.device]:
        if name in TEXT_ENCODER_HANDLES:
            load, offload = mm.text_encoder_device(), mm.text_encoder_offload_device()
        elif name in VAE_HANDLES:
            load, offload = mm.vae_device(), mm.vae_offload_device()
        else:  # the DiT experts and the planner: the diffusion model's devices
            load, offload = mm.get_torch_device(), mm.unet_offload_device()
        return (self._pinned_device or load), offload

    def handle(self, name: str, module: torch.nn.Module) -> PatcherHandle:
        """A (Core)ModelPatcher per module: ComfyUI tracks loaded models per patcher, so two around the same weights
        would count them twice and one could evict them under the other. The handle lives on the module (a cycle
        the GC collects with it): the planner, wrapped on every planning call, keeps one patcher."""
        mm = _model_management()
        load_device, offload_device = self._devices_for(name, mm)
        existing = module.__dict__.get(_HANDLE_ATTR)
        if existing is not None and (existing.load_device, existing.offload_device) == (load_device, offload_device):
            return existing
        import comfy.model_patcher as model_patcher

        # CoreModelPatcher is ModelPatcherDynamic where ComfyUI's dynamic VRAM is on (docs/node_contract.md §6).
        patcher_class = _patcher_class(getattr(model_patcher, "CoreModelPatcher", model_patcher.ModelPatcher))
        model = _named_model_class(_PatcherModel, model_class_name(name))(module)
        patcher = patcher_class(model, load_device=load_device, offload_device=offload_device,
                                size=module_bytes(module))
        handle = PatcherHandle(name, module, load_device, offload_device, patcher=patcher,
                               force_full_load=not _streamable(module))
        module.__dict__[_HANDLE_ATTR] = handle
        return handle

    @contextlib.contextmanager
    def use(self, *handles: PatcherHandle, memory_required: int = 0) -> Iterator[tuple[torch.nn.Module, ...]]:
        """Load the stage's models together; nothing is offloaded afterwards (the manager evicts on demand)."""
        _load_models(handles, memory_required)
        yield tuple(h.module for h in handles)

    def acquire(self, handle: PatcherHandle, memory_required: int = 0) -> torch.nn.Module:
        return handle.load(memory_required)  # ComfyUI's manager tracks its loaded models; nothing to count

    def release(self, *handles: PatcherHandle) -> None:  # nothing forced: load_models_gpu evicts on demand
        pass

    def check_interrupt(self) -> None:
        _model_management().throw_exception_if_processing_interrupted()

    def progress(self, stage: str, step: int, total: int, latent: Optional[torch.Tensor] = None) -> None:
        """One ProgressBar per stage run: a new run starts when the stage or total changes or the step goes back."""
        run = self._bar
        if run is None or run.stage != stage or run.total != total or step <= run.step:
            import comfy.utils

            run = self._bar = _StageBar(stage, total, step, comfy.utils.ProgressBar(total), _preview_size())
        run.step = step
        preview = None
        if latent is not None and run.preview_size:
            preview = ("JPEG", self._preview_image(latent), run.preview_size)
        run.bar.update_absolute(step, total, preview)

    def _preview_image(self, latent: torch.Tensor):
        """The last latent frame through Wan 2.1's latent_rgb_factors/bias, as ComfyUI's Latent2RGB previewer. ComfyUI
        applies them to the latent it samples, Wan21.process_in(raw) = (raw - mean) / std (samplers.inner_sample;
        latent_preview's TAEHV path alone calls process_out first): the engine's normalised latent, used as is."""
        from PIL import Image

        frame = latent[0, :, -1] if latent.ndim == 5 else latent[0]  # [16, h, w]
        key = (frame.device, frame.dtype)
        if key not in self._rgb:
            import comfy.latent_formats

            fmt = comfy.latent_formats.Wan21
            factors = torch.tensor(fmt.latent_rgb_factors, dtype=frame.dtype, device=frame.device).t()
            bias = torch.tensor(fmt.latent_rgb_factors_bias, dtype=frame.dtype, device=frame.device)
            self._rgb[key] = (factors, bias)
        factors, bias = self._rgb[key]
        rgb = torch.nn.functional.linear(frame.movedim(0, -1), factors, bias)  # [h, w, 3] in about -1..1
        pixels = ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).to(torch.uint8).cpu()
        return Image.fromarray(pixels.numpy())


def _preview_size() -> Optional[int]:
    """--preview-size, or None when --preview-method is "none" (latent_preview.get_previewer's rule)."""
    try:
        from comfy.cli_args import args
    except ImportError:
        return None
    method = getattr(args, "preview_method", None)
    if method is None or str(getattr(method, "value", method)).lower() == "none":
        return None
    return int(getattr(args, "preview_size", None) or DEFAULT_PREVIEW_SIZE)


def runtime(device="auto", offload: bool = True) -> Runtime:
    """ComfyRuntime inside ComfyUI (which decides offloading), else the standalone Runtime."""
    return ComfyRuntime(device) if comfy_available() else Runtime(device, offload=offload)


def intermediate_device() -> torch.device:
    """Where ComfyUI keeps latents and images between nodes (the CPU unless --gpu-only)."""
    return _model_management().intermediate_device() if comfy_available() else torch.device("cpu")


# ---------------------------------------------------------------------------------------------- ops
def comfy_ops(dtype=None):
    """ComfyUI's cast/offload layers for our models (ops.py), or None outside ComfyUI (→ torch.nn).

    manual_cast for every dtype: its layers cast weights to the input's dtype and device in every forward, which
    lets --lowvram stream weights and serves the fp32 islands (the DiT runs LayerNorm on .float() input, full
    Bernini keeps those norms in bf16: disable_weight_init's plain forward refuses that mix). Conv3d casts the
    same way. `dtype` is accepted for interface stability only.

    The layers are subclassed to allocate parameters at construction: with ComfyUI's dynamic VRAM on, comfy.ops
    layers leave `weight` None until load_state_dict (only for classes keeping ComfyUI's _load_from_state_dict),
    while our loaders build on the meta device and assign into existing parameters."""
    del dtype
    if not comfy_available():
        return None
    import comfy.ops

    return _eager_layers(comfy.ops.manual_cast)


@functools.lru_cache(maxsize=2)  # one namespace per ops base: stable classes, built once
def _eager_layers(base) -> types.SimpleNamespace:
    def _load_from_state_dict(self, *args, **kwargs):
        return torch.nn.Module._load_from_state_dict(self, *args, **kwargs)

    def eager(layer):
        return type(layer.__name__, (layer,), {"_load_from_state_dict": _load_from_state_dict, "__module__": __name__})

    return types.SimpleNamespace(**{name: eager(getattr(base, name)) for name in OPS_LAYERS})


# ---------------------------------------------------------------------------------------------- folders
def register_model_folders() -> None:
    """Register models/bernini for the official model folders (idempotent: folder_paths skips known paths)."""
    if not comfy_available():
        return
    import folder_paths

    folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))


def _bernini_roots() -> list[Path]:
    import folder_paths

    register_model_folders()
    return [Path(p) for p in folder_paths.get_folder_paths(MODEL_FOLDER)]


def _model_dirs(root: Path) -> list[str]:
    """Folders one or two levels down holding a config.json; an official folder's own sub-folders
    (transformer/, vae/, ...) hold one too, so those are not listed. Hidden folders are skipped: an unfinished
    download waits in one (download.staging_folder)."""
    found = sorted(c.parent for c in root.glob("*/config.json"))
    found += sorted(c.parent for c in root.glob("*/*/config.json") if not (c.parent.parent / "config.json").is_file())
    found = [folder for folder in found if not any(p.startswith(".") for p in folder.relative_to(root).parts)]
    return [folder.relative_to(root).as_posix() for folder in found]


def _check_kind(kind: str) -> None:
    if kind != MODEL_FOLDER and kind not in FILE_KINDS:
        raise BerniniError(f"unknown model kind {kind!r}; use one of {(MODEL_FOLDER,) + FILE_KINDS}.")


def list_models(kind: str) -> list[str]:
    """Model folders ("bernini") or files ("diffusion_models", "text_encoders", "vae"); [] outside ComfyUI."""
    _check_kind(kind)
    if not comfy_available():
        return []
    if kind == MODEL_FOLDER:
        return list(dict.fromkeys(name for root in _bernini_roots() for name in _model_dirs(root)))
    import folder_paths

    names = list(folder_paths.get_filename_list(kind))
    if kind == "diffusion_models":
        _register_gguf_kind()
        names += [n for n in folder_paths.get_filename_list(GGUF_KIND) if n not in names]
    return names


def _register_gguf_kind() -> None:
    """GGUF_KIND: the diffusion_models folders (as configured now, extra_model_paths included) with .gguf files."""
    import folder_paths

    paths = folder_paths.get_folder_paths("diffusion_models")
    known = folder_paths.folder_names_and_paths.get(GGUF_KIND)
    if known is None or list(known[0]) != list(paths):
        folder_paths.folder_names_and_paths[GGUF_KIND] = (list(paths), {".gguf"})


def model_path(kind: str, name: str) -> Path:
    """The full path of a listed model; a BerniniError naming the kind and the folder to put it in if missing."""
    _check_kind(kind)
    if not comfy_available():
        raise BerniniError(f"model names ({kind!r}: {name!r}) resolve only inside ComfyUI; pass a path instead.")
    import folder_paths

    if kind == MODEL_FOLDER:
        roots = _bernini_roots()
        for root in roots:
            # Containment is checked on the normalised, unresolved path: a listed folder may be a symlink to
            # another disk, but a name must not climb out of the root ("../x").
            candidate = Path(os.path.normpath(root / name))
            inside = candidate == Path(os.path.normpath(root)) or Path(os.path.normpath(root)) in candidate.parents
            if inside and (candidate / "config.json").is_file():
                return candidate
        raise BerniniError(
            f"Bernini model folder {name!r} was not found: put the official folder (e.g. Bernini-R-Diffusers, "
            f"with its config.json) in models/{MODEL_FOLDER}/ (searched: {', '.join(map(str, roots)) or 'none'}).")
    lookup = kind
    if kind == "diffusion_models" and str(name).lower().endswith(".gguf"):
        _register_gguf_kind()
        lookup = GGUF_KIND
    try:
        return Path(folder_paths.get_full_path_or_raise(lookup, name))
    except FileNotFoundError:
        raise BerniniError(f"{kind} file {name!r} was not found: put it in models/{kind}/ "
                           f"(searched: {', '.join(folder_paths.get_folder_paths(kind))}).") from None


def models_root() -> Path:
    """ComfyUI's models directory (downloads go to models_root() / "bernini")."""
    if not comfy_available():
        raise BerniniError("models_root() is only defined inside ComfyUI; pass a download folder instead.")
    import folder_paths

    return Path(folder_paths.models_dir)


def download_progress(total: int = 0) -> Callable[..., None]:
    """A ComfyUI ProgressBar callback `report(done, total=None)`: `done` units more, or with `total` (also when
    the total is learnt late, total=0 here) `done` of `total` (download.py's two forms); no-op outside ComfyUI."""
    if not comfy_available():
        return lambda done=1, total=None: None
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)
    return lambda done=1, total=None: bar.update(done) if total is None else bar.update_absolute(done, total)
