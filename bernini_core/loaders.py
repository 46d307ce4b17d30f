"""Build the renderer's components from each supported on-disk layout (docs/official_behaviour.md §2.3–§2.4).

Every model is built on the meta device and filled shard by shard by `checkpoints.load_weights_`,
casting each tensor to its final dtype as it arrives, so a checkpoint never exists twice in memory.
Dtype policy (docs/official_behaviour.md §7.3): Bernini-R DiT in the requested dtype with the fp32 islands, UMT5 in the
requested dtype, VAE always fp32.
"""

from __future__ import annotations

import math

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from .checkpoints import (Layout, TensorSource, detect_layout, load_weights_, read_config, read_json,
                          split_checkpoint_source)
from .errors import BerniniError
from .keymaps.wan_dit import comfy_prefix, dit_key_from_original, is_original_wan_keys, strip_comfy_prefix
from .progress import StageSteps
from .quant import dequantize_fp8_state, fp8_format_of, fp8_ops, has_fp8_weights, normalize_quant_key
from .renderer.config import DiTConfig
from .renderer.transformer import BerniniDiT, is_fp32_param
from .text_encoder import UMT5TextEncoder, check_umt5_folder
from .vae import VAEConfig, WanVAE
from .weight_files import check_tokenizer_folder, field_types

log = logging.getLogger("bernini.loaders")

WAN_HEAD_DIM = 128  # every released Wan / Bernini DiT (docs/official_behaviour.md §7.2); single files carry no config

# The parts a load may be limited to (`parts=`): the DiT experts, UMT5 (with its tokenizer), the VAE, and full
# Bernini's planner (Qwen2.5-VL + connector + ViT decoder + mask tokens, with its processor). A multi-process run
# loads everything on each group's leader and only the experts on the other ranks (issue 10 item 5).
PARTS = ("experts", "text_encoder", "vae", "planner")
ALL_PARTS = frozenset(PARTS)
RENDERER_PARTS = frozenset(("experts", "text_encoder", "vae"))  # Bernini-R has no planner


def resolve_parts(parts: Union[None, str, Iterable[str]]) -> frozenset:
    """`parts` of a load as a frozenset of PARTS names: None = every part (the default load); one name or an
    iterable of names otherwise. An unknown name or an empty selection is a BerniniError."""
    if parts is None:
        return ALL_PARTS
    if isinstance(parts, str):
        parts = (parts,)
    try:
        chosen = frozenset(parts)
    except TypeError:
        raise BerniniError(f"parts must be a collection of part names out of {list(PARTS)}, got {parts!r}.") from None
    unknown = sorted(repr(p) for p in chosen if p not in ALL_PARTS)
    if unknown:
        raise BerniniError(f"unknown part(s) {', '.join(unknown)}; parts are named {', '.join(map(repr, PARTS))}.")
    if not chosen:
        raise BerniniError(f"parts names nothing to load; give one or more of {list(PARTS)} (None loads every part).")
    return chosen


def renderer_parts(parts) -> frozenset:
    """The parts of a Bernini-R load: `parts` resolved, "planner" dropped (Bernini-R has none, so one selection
    serves both families)."""
    chosen = resolve_parts(parts) & RENDERER_PARTS
    if not chosen:
        raise BerniniError("Bernini-R has no planner: parts=['planner'] leaves nothing to load; name 'experts', "
                           "'text_encoder' and/or 'vae'.")
    return chosen


def parts_label(parts) -> str:
    """`parts` as messages show it: the names in PARTS order."""
    return "[" + ", ".join(repr(p) for p in PARTS if p in parts) + "]"


@dataclass
class RendererConfig:
    """The renderer `config.json` fields inference uses (docs/official_behaviour.md §2.3), with the official
    defaults."""

    switch_dit_boundary: float = 0.875
    shift: float = 3.0
    use_unipc: bool = True
    use_src_id_rotary_emb: bool = True
    interpolate_src_id: bool = True
    max_trained_src_id: int = 5
    skip_transformer_2: bool = False
    max_sequence_length: int = 512
    wan22_base: Optional[str] = None

    @classmethod
    def from_dict(cls, data: dict, overrides: Optional[dict] = None) -> "RendererConfig":
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values.update({k: v for k, v in (overrides or {}).items() if k in names})
        unknown = sorted(set(overrides or {}) - names)
        if unknown:
            raise BerniniError(f"unknown renderer option(s) {unknown}; valid options: {sorted(names)}.")
        boundary = values.get("switch_dit_boundary", cls.switch_dit_boundary)
        if not (isinstance(boundary, (int, float)) and math.isfinite(boundary) and 0 <= boundary <= 1):
            # a boundary of 87.5 or NaN would leave one expert unused without a word
            raise BerniniError(f"switch_dit_boundary is {boundary!r}; it is the fraction of the 1000 timesteps where "
                               "the low-noise expert takes over and must lie in [0, 1] (0.875 in the release).")
        return cls(**values)


@dataclass
class RendererComponents:
    """A Bernini-R load; the components of parts not loaded (`parts`) are None."""

    config: RendererConfig
    dit_high: Optional[BerniniDiT]
    dit_low: Optional[BerniniDiT]
    text_encoder: Optional[UMT5TextEncoder]
    vae: Optional[WanVAE]
    parts: frozenset = RENDERER_PARTS


# ---------------------------------------------------------------------------- single models
def _dit_dtype_policy(dtype: torch.dtype, keep_fp32_islands: bool):
    def dtype_for(name: str) -> torch.dtype:
        return torch.float32 if keep_fp32_islands and is_fp32_param(name) else dtype

    return dtype_for


def build_dit(
    config: DiTConfig,
    source,
    *,
    dtype: torch.dtype = torch.bfloat16,
    keep_fp32_islands: bool = True,
    key_map=None,
    ops=None,
    attention: str = "auto",
    origin: Optional[str] = None,
) -> BerniniDiT:
    """A DiT built on meta and filled from `source` (TensorSource or iterable of shard dicts)."""
    model = BerniniDiT(config, ops=ops, device="meta")
    load_weights_(model, source, dtype_for=_dit_dtype_policy(dtype, keep_fp32_islands), key_map=key_map, origin=origin)
    model.set_attention_backend(attention)
    if any(p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for p in model.parameters()):
        model.compute_dtype = dtype  # fp8 weights: activations in the requested dtype
    return model.eval().requires_grad_(False)


def dit_config_from_weights(shapes: dict[str, tuple], head_dim: int = WAN_HEAD_DIM) -> DiTConfig:
    """Infer the DiT config of a config-less file (diffusers names) from its tensor shapes."""
    try:
        dim, in_channels = shapes["patch_embedding.weight"][:2]
        num_layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
        return DiTConfig(
            num_attention_heads=dim // head_dim,
            attention_head_dim=head_dim,
            in_channels=in_channels,
            out_channels=shapes["proj_out.weight"][0] // 4,
            text_dim=shapes["condition_embedder.text_embedder.linear_1.weight"][1],
            freq_dim=shapes["condition_embedder.time_embedder.linear_1.weight"][1],
            ffn_dim=shapes["blocks.0.ffn.net.0.proj.weight"][0],
            num_layers=num_layers,
        )
    except (KeyError, ValueError, IndexError) as exc:
        raise BerniniError(f"cannot infer the DiT configuration from the file's tensors (missing {exc}); "
                           "is it a Wan2.x text-to-video diffusion model?") from None


def load_dit_file(
    path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    keep_fp8: bool = False,
    keep_fp32_islands: bool = True,
    head_dim: int = WAN_HEAD_DIM,
    ops=None,
    attention: str = "auto",
) -> BerniniDiT:
    """One expert from a single .safetensors file (ComfyUI's original Wan names or diffusers names;
    bf16/fp16/fp32, or fp8 e4m3fn "scaled": dequantised to `dtype`, or kept fp8 with `keep_fp8`) or from a .gguf
    file (ComfyUI-GGUF layout; Linear weights stay quantised, bernini_core/gguf)."""
    if is_gguf_path(path):
        from .gguf import load_gguf_dit

        return load_gguf_dit(path, dtype=dtype, keep_fp32_islands=keep_fp32_islands, head_dim=head_dim, ops=ops,
                             attention=attention)
    source = TensorSource.open(path)
    fp8 = fp8_format_of(source) is not None  # also rejects nvfp4 / int8 files with a clear message
    key_map = _single_file_key_map(source.keys())
    shapes = {}
    for key in source.keys():
        mapped = key_map(key)
        if mapped is not None:
            shapes[mapped] = tuple(source.shape(key))
    config = dit_config_from_weights(shapes, head_dim)
    if fp8 and keep_fp8:
        shards, ops = source.iter_shards(), fp8_ops(ops)
    else:
        shards = (dequantize_fp8_state(s, dtype) if has_fp8_weights(s) else s for s in source.iter_shards())
    return build_dit(config, shards, dtype=dtype, keep_fp32_islands=keep_fp32_islands, key_map=key_map,
                     ops=ops, attention=attention, origin=str(path))


def is_gguf_path(path) -> bool:
    """A .gguf expert file (read by bernini_core/gguf instead of as safetensors)."""
    return str(path).lower().endswith(".gguf")


def _single_file_key_map(keys):
    """Single-file key → our name: strip ComfyUI's wrapper prefix, rename fp8 side tensors, map original Wan
    names to diffusers names; markers map to None (dropped)."""
    keys = list(keys)
    prefix = comfy_prefix(keys)
    original = is_original_wan_keys(keys)

    def key_map(key: str) -> Optional[str]:
        name = normalize_quant_key(strip_comfy_prefix(key, prefix))
        if name is None:
            return None
        return dit_key_from_original(name) if original else name

    return key_map


def load_vae(path, *, config: Optional[VAEConfig] = None, ops=None) -> WanVAE:
    """The Wan 2.1 VAE from a diffusers `vae/` folder or a ComfyUI single file; always fp32
    (docs/official_behaviour.md §7.3).

    A folder's config.json is used; a single file carries none, so it is the standard Wan 2.1 VAE unless
    `config` says otherwise (a file of another size fails with a shape message)."""
    from .keymaps.wan_vae import convert_vae_state_dict

    path = Path(path)
    config_file = path / "config.json"
    if config is None:
        config = read_vae_config(path) if path.is_dir() and config_file.is_file() else VAEConfig()
    source = TensorSource.open(path)
    # The VAE is small (0.5 GB fp32) and the layout test needs every key, so its shards are joined first.
    state = convert_vae_state_dict({k: v for shard in source.iter_shards() for k, v in shard.items()})
    with torch.device("meta"):
        model = WanVAE(config, ops=ops)
    load_weights_(model, state, dtype_for=lambda name: torch.float32, origin=str(path))
    return model.eval().requires_grad_(False)


def read_vae_config(folder) -> VAEConfig:
    """A `vae/` folder's config.json, every field of its JSON type ("z_dim": "16" is refused naming the file)."""
    return read_config(Path(folder) / "config.json", VAEConfig.from_dict, field_types(VAEConfig))


def read_dit_config(path) -> DiTConfig:
    """A transformer config.json, its values of their JSON types first (then DiTConfig's own checks)."""
    # out_channels may be null in a diffusers config: it then equals in_channels.
    return read_config(path, DiTConfig.from_dict, {**field_types(DiTConfig), "out_channels": Optional[int]})


def read_renderer_config(path, overrides: Optional[dict] = None) -> RendererConfig:
    """A renderer config.json, every field of its JSON type: "skip_transformer_2": "false" would read as true
    and silently drop the low-noise expert."""
    return read_config(path, lambda data: RendererConfig.from_dict(data, overrides), field_types(RendererConfig))


def check_renderer_files(folder: Path, experts=(), parts=RENDERER_PARTS) -> None:
    """Read every config and weight-file header a renderer load will use (the expert folders named, UMT5 and its
    tokenizer, the VAE: those of `parts`) before anything is built, so a broken file is named in seconds, not after
    the experts have loaded."""
    for name in experts:
        read_dit_config(folder / name / "config.json")
        TensorSource.open(folder / name)
    if "text_encoder" in parts:
        check_umt5_folder(folder / "text_encoder")
        check_tokenizer_folder(folder / "tokenizer", "UMT5")
    if "vae" in parts:
        read_vae_config(folder / "vae")
        TensorSource.open(folder / "vae")


# ---------------------------------------------------------------------------- whole renderers
def load_renderer(
    path,
    *,
    high_noise_ckpt: Optional[str] = None,
    low_noise_ckpt: Optional[str] = None,
    dtype: torch.dtype = torch.bfloat16,
    attention: str = "auto",
    overrides: Optional[dict[str, Any]] = None,
    ops=None,
    progress=None,
    parts=None,
) -> RendererComponents:
    """UMT5, the experts and the VAE of a Bernini-R release.

    * a Bernini-R-Diffusers folder (`transformer/`, `transformer_2/`, `text_encoder/`, ...);
    * the split release: `high_noise_ckpt` + `low_noise_ckpt` with `path` = the renderer config folder
      (its `wan22_base` names the Wan2.2 -Diffusers base) or the base folder itself.

    `progress(stage, step, total)`: stage "load", one step per component (bernini_core/progress.py).

    `parts`: None (everything) or some of "experts", "text_encoder", "vae" ("planner" is ignored: Bernini-R has
    none); the components of the other parts are None, and neither their weights nor their config files are read.
    """
    path = Path(path)
    parts = renderer_parts(parts)
    if (high_noise_ckpt is None) != (low_noise_ckpt is None):
        raise BerniniError("--high_noise_ckpt and --low_noise_ckpt must be given together; got only one of them.")
    if high_noise_ckpt is not None:
        return _load_split(path, Path(high_noise_ckpt), Path(low_noise_ckpt), dtype, attention, overrides or {}, ops,
                           progress, parts)
    layout = detect_layout(path)
    if layout != Layout.RENDERER_DIFFUSERS:
        raise BerniniError(
            f"{str(path)!r} is a {layout.value}, not a Bernini-R-Diffusers folder. Pass a Bernini-R-Diffusers "
            "folder, or the split checkpoints with --high_noise_ckpt/--low_noise_ckpt and their Wan2.2 base."
        )
    config = read_renderer_config(path / "config.json", overrides)
    with_low = not config.skip_transformer_2 and (path / "transformer_2").is_dir()
    experts = ("transformer", "transformer_2") if with_low else ("transformer",)
    check_renderer_files(path, experts if "experts" in parts else (), parts)
    steps = StageSteps(progress, "load", _load_steps(parts, len(experts)))  # experts, UMT5, VAE
    dit_high = dit_low = None
    if "experts" in parts:
        dit_high = _load_expert_dir(path / "transformer", dtype, attention, ops)
        steps.advance()
        if with_low:
            dit_low = _load_expert_dir(path / "transformer_2", dtype, attention, ops)
            steps.advance()
    return _with_text_encoder_and_vae(config, dit_high, dit_low, path, dtype, ops, steps, parts)


def _load_steps(parts, n_experts: int) -> int:
    """The "load" progress steps of a renderer load of `parts`: one per expert, UMT5, VAE."""
    return n_experts * ("experts" in parts) + ("text_encoder" in parts) + ("vae" in parts)


def check_scheduler_config(folder: Path) -> None:
    """Warn when a release's scheduler/scheduler_config.json is not the stock flow UniPC this engine implements
    (the official code would sample with whatever the file says; flow_shift is always the call's)."""
    from .sampling.schedulers import unsupported_scheduler_fields

    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return
    odd = unsupported_scheduler_fields(read_json(path))
    if odd:
        log.warning("%s differs from the stock Wan2.2 UniPC flow scheduler this engine implements (%s); results may "
                    "differ from the official pipeline.", path, "; ".join(odd))


def _load_expert_dir(folder: Path, dtype, attention, ops) -> BerniniDiT:
    config = read_dit_config(folder / "config.json")
    return build_dit(config, TensorSource.open(folder), dtype=dtype, attention=attention, ops=ops, origin=str(folder))


def _load_split(path: Path, high: Path, low: Path, dtype, attention, overrides, ops,
                progress=None, parts=RENDERER_PARTS) -> RendererComponents:
    base, config_data = path, {}
    if (path / "config.json").is_file():
        data = read_json(path / "config.json")
        if data.get("model_type") == "bernini_renderer":
            config_data = data
            wan_base = data.get("wan22_base")
            if not (path / "text_encoder").is_dir() and wan_base:
                base = Path(wan_base) if Path(wan_base).is_absolute() else (path / wan_base)
                if not base.is_dir():
                    base = Path(wan_base)
    needed = {"transformer": "experts", "text_encoder": "text_encoder", "tokenizer": "text_encoder", "vae": "vae"}
    missing = [d for d, part in needed.items() if part in parts and not (base / d).exists()]
    if missing:
        raise BerniniError(
            f"the split checkpoints need a Wan2.2 -Diffusers base folder (text_encoder/, tokenizer/, vae/, "
            f"transformer/config.json); {str(base)!r} lacks {', '.join(missing)}. Pass that folder as --config."
        )
    config = read_renderer_config(path / "config.json", overrides) if config_data else RendererConfig.from_dict(
        {}, overrides)
    dit_high = dit_low = None
    if "experts" in parts:
        dit_config = read_dit_config(base / "transformer" / "config.json")
        low_config_file = base / "transformer_2" / "config.json"
        low_config = read_dit_config(low_config_file) if low_config_file.is_file() else dit_config
        # a .gguf expert (ComfyUI-GGUF layout) loads through bernini_core/gguf with the base folder's config
        high_source, low_source = (ckpt if is_gguf_path(ckpt) else split_checkpoint_source(ckpt, which)
                                   for ckpt, which in ((high, "high"), (low, "low")))
    check_renderer_files(base, (), parts)
    steps = StageSteps(progress, "load", _load_steps(parts, 2))  # two experts, UMT5, VAE
    if "experts" in parts:
        dit_high = _build_split_expert(dit_config, high_source, high, dtype, attention, ops)
        steps.advance()
        dit_low = _build_split_expert(low_config, low_source, low, dtype, attention, ops)
        steps.advance()
    return _with_text_encoder_and_vae(config, dit_high, dit_low, base, dtype, ops, steps, parts)


def _build_split_expert(config: DiTConfig, source, path: Path, dtype, attention, ops) -> BerniniDiT:
    """One expert of a split load: `source` is a TensorSource, or the path of a .gguf expert."""
    if isinstance(source, TensorSource):
        return build_dit(config, source, dtype=dtype, attention=attention, ops=ops, origin=str(path))
    from .gguf import load_gguf_dit

    return load_gguf_dit(source, dtype=dtype, attention=attention, ops=ops, config=config)


def _with_text_encoder_and_vae(config, dit_high, dit_low, folder: Path, dtype, ops,
                               steps: Optional[StageSteps] = None, parts=RENDERER_PARTS) -> RendererComponents:
    """Complete the experts with UMT5 (`text_encoder/` + `tokenizer/`) and the VAE (`vae/`) of `folder`, those of
    `parts`; `steps`: the load's progress, advanced once per component."""
    steps = steps or StageSteps(None, "load", 2)
    if "experts" in parts:
        check_scheduler_config(folder)
    text_encoder = vae = None
    if "text_encoder" in parts:
        text_encoder = UMT5TextEncoder.from_pretrained(folder / "text_encoder", folder / "tokenizer", dtype=dtype)
        steps.advance()
    if "vae" in parts:
        vae = load_vae(folder / "vae", ops=ops)
        steps.advance()
    return RendererComponents(config=config, dit_high=dit_high, dit_low=dit_low, text_encoder=text_encoder, vae=vae,
                              parts=frozenset(parts))
