"""The ComfyUI side of a pool: Load Bernini Renderer with a `parallel` input loads UMT5 and the VAE here and the
experts on a Ray pool; Sample Bernini Video then sends the stage inputs there (node_api.sample calls `pool_sample`).
No ComfyUI import: comfy_bridge registers the pool with ComfyUI's model management so that "free models" ends it."""

from __future__ import annotations

import json
from pathlib import Path

from ... import comfy_bridge
from ...errors import BerniniError
from .options import NODE, PoolOptions
from .pool import WorkerPool

SINGLE_FILES, NONE = "single files", "none"


def load_pooled_renderer(name, weight_dtype, attention, download, high_noise_model, low_noise_model, text_encoder,
                         vae, options, compile=False):
    """node_models.load_renderer with its experts on a pool: (renderer, text encoder, VAE) handles whose renderer
    carries the started pool. The pool's errors (Ray missing or unreachable, too few GPUs, a path missing on a node)
    come before any weight loads. `compile`: every rank compiles its experts' blocks (acceleration/compile.py)."""
    from ...node_models import (FULL_FAMILY, RendererModel, TextEncoderModel, VAEModel, _bernini_folder,
                                _load_folder, _load_single_files)

    if not isinstance(options, PoolOptions):
        raise BerniniError(f"Load Bernini Renderer: parallel must come from a {NODE} node, got "
                           f"{type(options).__name__}.")
    runtime = comfy_bridge.runtime()
    if name == SINGLE_FILES:
        if high_noise_model in (None, "", NONE):
            raise BerniniError("Load Bernini Renderer: model 'single files' needs high_noise_model: pick the "
                               "Bernini-R high-noise (or single-expert) file in models/diffusion_models.")
        files = {"high": str(comfy_bridge.model_path("diffusion_models", high_noise_model)),
                 "low": (str(comfy_bridge.model_path("diffusion_models", low_noise_model))
                         if low_noise_model not in (None, "", NONE) else None)}
        spec = {"kind": "files", **files, "keep_fp8": weight_dtype == "fp8_e4m3fn"}
        heads = _file_heads(files["high"])
        label = "Bernini-R"
    else:
        folder = _bernini_folder(name, "renderer", download, "Load Bernini Renderer")
        spec = {"kind": "folder", "path": str(folder)}
        heads = _folder_heads(folder)
        label = name
    if compile:  # the backend named here, where a test or a user may have set it, travels with the spec
        from ...acceleration.settings import DEFAULT_COMPILE_BACKEND

        spec["compile"] = DEFAULT_COMPILE_BACKEND
    pool = WorkerPool(options, spec, heads=heads, dtype=_pool_dtype(weight_dtype), attention=attention, label=label)
    pool.start()  # before the driver's own load: a pool that cannot start fails fast
    if name == SINGLE_FILES:
        pipe = _load_single_files(weight_dtype, attention, runtime, high_noise_model, low_noise_model, text_encoder,
                                  vae, with_experts=False)
    else:
        pipe = _load_folder(name, weight_dtype if weight_dtype != "fp8_e4m3fn" else "bf16", attention, download,
                            runtime, parts=("text_encoder", "vae"))
    comfy_bridge.track_pool(pool)
    version = pipe.version if pipe.family == FULL_FAMILY else "R"
    renderer = RendererModel(pipe, pipe.family, version, name, pool=pool)
    return renderer, TextEncoderModel(pipe, pipe.family, version, name), VAEModel(pipe, pipe.family, version, name)


def _pool_dtype(weight_dtype: str) -> str:
    return "bf16" if weight_dtype == "fp8_e4m3fn" else weight_dtype


def _folder_heads(folder: Path) -> int:
    """The experts' attention head count from the folder's transformer config (no weights read)."""
    from ...loaders import read_dit_config
    from ...loaders_full import CLI_OVERRIDES, BerniniConfig, component_paths, is_full_bernini_dir

    folder = Path(folder)
    if is_full_bernini_dir(folder):
        config = component_paths(BerniniConfig.from_dir(folder, dict(CLI_OVERRIDES)), folder).transformer_config
    else:
        config = folder / "transformer" / "config.json"
    if not config.is_file():
        raise BerniniError(f"Load Bernini Renderer: {str(folder)!r} has no {config.name} to size the {NODE} layout "
                           "from; is it a complete Bernini folder?")
    return read_dit_config(config).num_attention_heads


def _file_heads(path: str) -> int:
    """The head count of a single-file expert, from its tensor shapes (Wan's head dim 128)."""
    from ...loaders import WAN_HEAD_DIM

    if path.lower().endswith(".gguf"):
        from ...gguf.reader import read_gguf

        contents = read_gguf(path, check_types=False)
        shapes = {t.name: tuple(t.shape) for t in contents.tensors}
    else:
        from ...checkpoints import TensorSource

        source = TensorSource.open(path)
        shapes = {k: tuple(source.shape(k)) for k in source.keys()}
    for key, shape in shapes.items():
        if key.endswith("patch_embedding.weight"):
            return int(shape[0]) // WAN_HEAD_DIM
    raise BerniniError(f"Load Bernini Renderer: {path!r} has no patch_embedding.weight; is it a Wan DiT file? "
                       f"({json.dumps(sorted(shapes)[:5])} ...)")


def pool_sample(renderer, task_inputs, sources, settings, boundary=None):
    """Sample Bernini Video on the renderer's pool: the stage inputs packed as the scale-out hand-off does, the
    leader's latents back (normalised, CPU)."""
    from ...tasks import check_mode_sources
    from ..handoff import pack_full, pack_renderer

    pipe = renderer.pipeline
    check_mode_sources(settings["guidance_mode"], n_videos=len(sources.videos), n_images=len(sources.images),
                       task=sources.task)
    pack = pack_renderer if renderer.family == "bernini_renderer" else pack_full
    tensors, meta = pack(task_inputs, sources)
    comfy_bridge.track_pool(renderer.pool)
    return renderer.pool.sample(renderer.family, tensors, meta, settings, runtime=pipe.runtime, boundary=boundary)
