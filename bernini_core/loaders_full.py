"""Loading full Bernini (planner + renderer) from a Bernini-Diffusers(-v2) folder
(docs/official_behaviour.md §2.1, §2.2).

Layout: ``config.json`` (model_type "bernini"), ``transformer_config.json`` / ``transformer_2_config.json``,
ONE combined sharded checkpoint ``bernini/`` holding every trained module under its prefix, ``mllm/``
(Qwen2.5-VL config, tokenizer, processor), ``t5_text_encoder/``, ``t5_tokenizer/``, ``vae/``, ``scheduler/``.

The combined checkpoint is split into lazy prefix views (no data read); each module is built on the meta
device and filled view by view, shard by shard, each tensor cast to its final dtype as it arrives, so no
module ever exists twice. Dtypes follow the official loaders (docs/official_behaviour.md §7.3): Qwen, UMT5
and BOTH DiTs entirely in the requested dtype (bf16: no fp32 islands), connector / ViT decoder / mask_tokens
fp32, VAE fp32.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional

import torch

from .checkpoints import Layout, TensorSource, detect_layout, load_weights_, read_json
from .errors import BerniniError
from .loaders import ALL_PARTS, build_dit, load_vae, read_dit_config, read_vae_config, resolve_parts
from .progress import StageSteps
from .renderer.config import DiTConfig
from .renderer.transformer import BerniniDiT
from .text_encoder import UMT5TextEncoder, check_umt5_folder, load_umt5_tokenizer, read_umt5_config
from .vae import WanVAE
from .weight_files import check_config_types, check_tokenizer_folder, config_error, field_types

log = logging.getLogger("bernini.loaders_full")

V2_DIRNAME = "Bernini-Diffusers-v2"  # official `gradio_demo.py` `_is_bernini_v2_config`
RENDERER_HEAD_DIM = 128  # the source-id RoPE is always built with head dim 128 (docs/official_behaviour.md §7.2)
# docs/official_behaviour.md §3.7; None = the "else" branch of official `bernini/pipeline.py`
SUPPORTED_FEATURE_TYPES = (None, "masked_tgt_embed_with_qwen_txt_vit_tokens")

# What the official CLI passes to BerniniPipeline.from_pretrained (official `bernini/cli.py` `build_pipeline`,
# defaults of docs/official_behaviour.md §5.4);
# the config.json defaults differ (use_unipc False), so callers mirroring the CLI apply these.
CLI_OVERRIDES = {"use_unipc": True, "use_src_id_rotary_emb": True, "interpolate_src_id": True,
                 "max_trained_src_id": 5}

# Component -> key prefix in the combined checkpoint (docs/official_behaviour.md §2.1, §2.2). "mask_tokens" is one
# tensor, not a prefix.
COMPONENT_PREFIXES = {"dit_high": "diff_dec.transformer.", "dit_low": "diff_dec_low.transformer_2.",
                      "planner_mllm": "mllm.", "t5": "t5_text_encoder.", "connector": "connector.",
                      "vit_decoder": "vit_decoder.", "mask_tokens": "mask_tokens"}
_COMPONENT_NAMES = {"dit_high": "the high-noise DiT", "dit_low": "the low-noise DiT", "t5": "the UMT5 copy",
                    "planner_mllm": "the Qwen2.5-VL planner", "connector": "the connector",
                    "vit_decoder": "the ViT decoder", "mask_tokens": "the mask-token table"}

# Official BerniniConfig defaults for the nested configs (official `bernini/models/bernini.py` `.get(..., default)`).
CLIP_DIFF_DEFAULTS = {"z_channels": 3584, "target_channels": 3584, "depth": 16, "width": 1536,
                      "diff_net": "SimpleMLPAdaLN", "scheduler_type": "FlowMatchScheduler", "shift": 3.0,
                      "num_inference_steps": 100, "extra_one_step": True, "diffusion_batch_mul": 1}
CONNECTOR_DEFAULTS = {"num_layers_for_gen": 1, "out_dim_for_gen": 4096, "enable_gen_branch": True,
                      "gen_head_type": "mlp", "num_layers_for_vit": 1, "out_dim_for_vit": 3584,
                      "enable_vit_branch": True}


# ---------------------------------------------------------------------------- config
@dataclass
class BerniniConfig:
    """``config.json`` of Bernini-Diffusers(-v2): every field of docs/official_behaviour.md §2.1, with the official
    BerniniConfig defaults for fields a file omits. ``version`` ("v1"/"v2") only selects presets
    (docs/official_behaviour.md §3.9, §5.2); the architecture is the same."""

    version: str = "v1"
    version_source: str = "default"  # which signal decided `version` (see detect_version)
    model_type: str = "bernini"
    architectures: list = field(default_factory=lambda: ["BerniniModel"])
    mllm_attn_implementation: str = "sdpa"
    partial_pretrain_model: Optional[str] = None
    base_dir: Optional[str] = None
    transformers_version: Optional[str] = None
    # component folders (the official *_path fields, absent from the release, are read from `extra`)
    bernini_ckpt_subfolder: Optional[str] = None
    mllm_subfolder: Optional[str] = None
    processor_subfolder: Optional[str] = None
    t5_text_encoder_subfolder: Optional[str] = None
    t5_tokenizer_subfolder: Optional[str] = None
    vae_subfolder: Optional[str] = None
    # renderer
    switch_dit_boundary: float = 0.875
    shift: float = 3.0
    flow_shift: float = 5.0  # the config default; the CLI passes its own flow_shift per call
    use_unipc: bool = False  # official default; the CLI overrides to True (CLI_OVERRIDES)
    use_src_id_rotary_emb: bool = False
    interpolate_src_id: bool = True
    max_trained_src_id: int = 5
    max_sequence_length: int = 512
    target_fps: int = 16
    # planner
    num_mask_token: int = 256
    feature_type_from_stage_one: Optional[str] = None
    clip_diff_cfg: dict = field(default_factory=dict)
    connector_cfg: dict = field(default_factory=dict)
    mask_ratio_infer_cfg: Optional[dict] = None
    t5_max_sequence_length: int = 512
    t5_combine_type: str = "kl_loss"  # the pipeline always concatenates (docs/official_behaviour.md §3.7); unused
    # training-only fields, kept for completeness
    cotrain: bool = False
    scratch: bool = False
    scratch_mllm: bool = False
    boundary_ratio: Optional[float] = None
    logit_mean: Optional[float] = None
    logit_std: Optional[float] = None
    mode_scale: Optional[float] = None
    wovae_task_list: list = field(default_factory=lambda: ["und_img", "und_txt", "und_vid"])
    extra: dict = field(default_factory=dict)  # keys of the file this class does not know

    def __post_init__(self):
        self.clip_diff_cfg = {**CLIP_DIFF_DEFAULTS, **(self.clip_diff_cfg or {})}
        self.connector_cfg = {**CONNECTOR_DEFAULTS, **(self.connector_cfg or {})}
        _validate_config(self)

    @classmethod
    def from_dict(cls, data: dict, overrides: Optional[dict] = None, *, source: str = "config.json") -> "BerniniConfig":
        """Build from the parsed config.json; ``overrides`` (e.g. CLI_OVERRIDES, {"version": "v2"}) win."""
        if not isinstance(data, dict):
            raise BerniniError(f"{source} must hold a JSON object, found {type(data).__name__}.")
        names = {f.name for f in fields(cls)} - {"extra", "version_source"}
        # JSON types first: "use_unipc": "false" must not read as true, nor "0.875" pass as a boundary.
        check_config_types(source, data, {k: v for k, v in field_types(cls, scalars_only=True).items()
                                          if k in names and k != "version"})
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise BerniniError(f"unknown Bernini option(s) {unknown}; valid options: {sorted(names)}.")
        values = {k: v for k, v in data.items() if k in names and k != "version"}
        extra = {k: v for k, v in data.items() if k not in names}
        values.update(overrides)
        if "version" in overrides:
            values["version_source"] = "override"
        try:
            return cls(**values, extra=extra)
        except BerniniError as exc:
            raise BerniniError(f"{source}: {exc}") from None

    @classmethod
    def from_dir(cls, path, overrides: Optional[dict] = None) -> "BerniniConfig":
        """config.json of a Bernini-Diffusers folder, with the version told from the folder (detect_version)."""
        path = Path(path)
        data = read_json(path / "config.json")
        config = cls.from_dict(data, overrides, source=str(path / "config.json"))
        if config.version_source != "override":
            config.version, config.version_source = detect_version(path, data)
        return config

    # -- derived values -----------------------------------------------------------------------
    @property
    def gen_dim(self) -> int:
        """Width of the renderer context the connector produces (= DiT text_dim = UMT5 d_model)."""
        return int(self.connector_cfg["out_dim_for_gen"])

    @property
    def vit_dim(self) -> int:
        return int(self.connector_cfg["out_dim_for_vit"])


_BOOL_FIELDS = ("use_unipc", "use_src_id_rotary_emb", "interpolate_src_id", "cotrain", "scratch", "scratch_mllm")
_POSITIVE_INT_FIELDS = ("num_mask_token", "max_trained_src_id", "max_sequence_length", "t5_max_sequence_length",
                        "target_fps", "clip_diff_cfg.z_channels", "clip_diff_cfg.target_channels",
                        "clip_diff_cfg.width", "clip_diff_cfg.depth", "connector_cfg.out_dim_for_gen",
                        "connector_cfg.out_dim_for_vit")
_POSITIVE_NUMBER_FIELDS = ("shift", "flow_shift", "clip_diff_cfg.shift")


def _validate_config(cfg: BerniniConfig) -> None:
    def value(name):
        section, _, key = name.partition(".")
        return getattr(cfg, section).get(key) if key else getattr(cfg, section)

    def check(ok: bool, name: str, why: str):
        if not ok:
            raise BerniniError(f"'{name}' = {value(name)!r} {why}")

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    renderer = cfg.model_type == "bernini_renderer"
    hint = " (a Bernini-R renderer folder: load it with the renderer loader)" if renderer else ""
    check(cfg.model_type == "bernini", "model_type",
          f"is not 'bernini'{hint}; pass a Bernini-Diffusers or Bernini-Diffusers-v2 folder.")
    check(cfg.version in ("v1", "v2"), "version", "must be 'v1' or 'v2'.")
    for name in ("clip_diff_cfg", "connector_cfg"):
        check(isinstance(value(name), dict), name, "must be a JSON object.")
    for name in _BOOL_FIELDS:
        check(isinstance(value(name), bool), name, "must be true or false.")
    for name in _POSITIVE_INT_FIELDS:
        check(isinstance(value(name), int) and number(value(name)) and value(name) > 0, name,
              "must be a positive integer.")
    for name in _POSITIVE_NUMBER_FIELDS:
        check(number(value(name)) and value(name) > 0, name, "must be a positive number.")
    check(number(cfg.switch_dit_boundary) and 0 <= cfg.switch_dit_boundary <= 1, "switch_dit_boundary",
          "must be in [0, 1]: the expert boundary as a fraction of the 1000 timesteps (0.875 in the release).")
    for name in ("connector_cfg.enable_gen_branch", "connector_cfg.enable_vit_branch"):
        check(value(name) is True, name, "must be true: inference uses both connector branches.")
    check(cfg.clip_diff_cfg["z_channels"] == cfg.vit_dim, "clip_diff_cfg.z_channels",
          f"must equal connector_cfg.out_dim_for_vit ({cfg.vit_dim}): the ViT decoder is conditioned on it.")
    check(cfg.feature_type_from_stage_one in SUPPORTED_FEATURE_TYPES, "feature_type_from_stage_one",
          f"is not supported; only {SUPPORTED_FEATURE_TYPES[1]!r} (the released planner hand-off, "
          "docs/official_behaviour.md §3.7) is.")


def detect_version(path, config_data: Optional[dict] = None) -> tuple:
    """("v1" | "v2", reason). The official signal is the folder name ending in "Bernini-Diffusers-v2"
    (official ``gradio_demo.py`` ``_is_bernini_v2_config``); a Hugging Face cache folder of that repository and a
    config.json ``base_dir`` naming it [inferred: the v2 config's base_dir] are accepted as well."""
    text = str(path).rstrip("/\\")
    if text.endswith(V2_DIRNAME):
        return "v2", "folder name"
    for part in Path(text).parts:
        if part.startswith("models--") and part.endswith("--" + V2_DIRNAME):
            return "v2", "Hugging Face cache folder name"
    base_dir = (config_data or {}).get("base_dir")
    if isinstance(base_dir, str) and base_dir.rstrip("/\\").endswith(V2_DIRNAME):
        return "v2", "config.json base_dir"
    return "v1", "no v2 signal, so the default"


def check_target_tokens(n_tokens: int, config: BerniniConfig) -> None:
    """Refuse a target with more planner tokens than the mask-token table holds (config num_mask_token).

    The official code only ever reads mask_tokens[:, :1] and has no such check (docs/official_behaviour.md §3.1);
    the table size is the training bound, so a larger target would run outside anything the planner was trained on."""
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens <= 0:
        raise BerniniError(f"the target must have a positive number of planner tokens, got {n_tokens!r}.")
    if n_tokens > config.num_mask_token:
        raise BerniniError(
            f"the target needs {n_tokens} planner tokens but this checkpoint's mask-token table holds "
            f"{config.num_mask_token} (config.json num_mask_token). Lower num_frames or the output size "
            f"(the planner sees the target at ViT resolution, 2 fps), or split the video.")


# ---------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class FullPaths:
    root: Path
    checkpoint: Path
    mllm: Path
    processor: Path
    t5_encoder: Path
    t5_tokenizer: Path
    vae: Path
    transformer_config: Path
    transformer_2_config: Path
    scheduler: Path


def component_paths(config: BerniniConfig, root) -> FullPaths:
    """Where each component lives. Mirrors official ``bernini/pipeline.py`` ``_localize_bernini_config``: an
    explicit path that exists wins, otherwise <base>/<subfolder>, base = an existing absolute ``base_dir`` or the
    folder itself (the released ``base_dir`` is a hub id). Subfolders default to the names of
    docs/official_behaviour.md §2.1."""
    root = Path(root)
    base = Path(config.base_dir) if config.base_dir and Path(config.base_dir).is_absolute() \
        and Path(config.base_dir).is_dir() else root

    def explicit(name):  # an official *_path field that names an existing path wins
        value = config.extra.get(name)
        return Path(value) if isinstance(value, str) and value and Path(value).exists() else None

    def folder(start, subfolder, default):
        sub = subfolder if subfolder is not None else default
        return (start or base) / sub if sub else (start or base)

    mllm_start = explicit("mllm_config_path")
    processor_sub = config.processor_subfolder if config.processor_subfolder is not None else config.mllm_subfolder
    return FullPaths(
        root=root,
        checkpoint=folder(None, config.bernini_ckpt_subfolder, "bernini"),
        mllm=folder(mllm_start, config.mllm_subfolder, "mllm"),
        processor=folder(explicit("processor_config_path") or mllm_start, processor_sub, "mllm"),
        t5_encoder=folder(explicit("t5_text_encoder_path"), config.t5_text_encoder_subfolder, "t5_text_encoder"),
        t5_tokenizer=folder(explicit("t5_tokenizer_path"), config.t5_tokenizer_subfolder, "t5_tokenizer"),
        vae=folder(explicit("vae_model_path"), config.vae_subfolder, "vae"),
        transformer_config=explicit("transformer_config_path") or base / "transformer_config.json",
        transformer_2_config=explicit("transformer_2_config_path") or base / "transformer_2_config.json",
        scheduler=explicit("scheduler_config_path") or base / "scheduler",
    )


def _require_paths(paths: FullPaths, parts=ALL_PARTS, needs_checkpoint: bool = True) -> None:
    """Every path the load of `parts` reads must exist (the UMT5 config is read by the planner's check too)."""
    needed = {"bernini/ (combined checkpoint)": (paths.checkpoint, needs_checkpoint),
              "mllm/ (Qwen2.5-VL config)": (paths.mllm, "planner" in parts),
              "t5_text_encoder/": (paths.t5_encoder, bool(parts & {"text_encoder", "planner"})),
              "t5_tokenizer/": (paths.t5_tokenizer, "text_encoder" in parts),
              "vae/": (paths.vae, "vae" in parts),
              "transformer_config.json": (paths.transformer_config, "experts" in parts),
              "transformer_2_config.json": (paths.transformer_2_config, "experts" in parts)}
    missing = [f"{label} at '{p}'" for label, (p, used) in needed.items() if used and not p.exists()]
    if missing:
        raise BerniniError(f"the Bernini-Diffusers folder '{paths.root}' is incomplete: missing "
                           f"{'; '.join(missing)}. Re-download the missing parts.")


def is_full_bernini_dir(path) -> bool:
    """True when ``path`` is a folder whose config.json says model_type "bernini" (never raises)."""
    try:
        path = Path(path)
        return path.is_dir() and read_json(path / "config.json").get("model_type") == "bernini"
    except (BerniniError, OSError):
        return False


# ---------------------------------------------------------------------------- combined checkpoint
def _checkpoint_location(path: Path) -> Path:
    """The bernini/ folder (or its index) given the release root, the folder itself or its index file."""
    if path.is_dir() and (path / "config.json").is_file() and not any(path.glob("*.safetensors*")):
        data = read_json(path / "config.json")
        if data.get("model_type") == "bernini":
            return path / (data.get("bernini_ckpt_subfolder") or "bernini")
    return path


def split_combined_checkpoint(path) -> Dict[str, TensorSource]:
    """Lazy prefix views over the ONE combined checkpoint: {"planner_mllm", "connector", "vit_decoder",
    "mask_tokens", "dit_high", "dit_low", "t5"} -> TensorSource with the prefix stripped (headers and index
    read only). ``ema.`` copies are not preferred: the official loads the plain keys (BerniniModel.from_pretrained).
    A component with no tensors is a BerniniError; keys of no component are logged and ignored."""
    location = _checkpoint_location(Path(path))
    if not location.exists():
        raise BerniniError(f"combined Bernini checkpoint '{location}' does not exist; the bernini/ folder of the "
                           "Bernini-Diffusers download is missing.")
    raw = TensorSource.open(location)
    stored = raw.stored_keys()
    views: Dict[str, TensorSource] = {}
    for component, prefix in COMPONENT_PREFIXES.items():
        if component == "mask_tokens":
            # One tensor named exactly "mask_tokens": a view with that single entry, name kept.
            entries = {prefix: prefix} if prefix in raw else {}
            views[component] = TensorSource(raw.path, raw._stored, entries)  # noqa: SLF001 (same package)
        else:
            views[component] = raw.select(prefix)
    missing = [c for c, view in views.items() if len(view) == 0]
    if missing:
        described = ", ".join(f"{_COMPONENT_NAMES[c]} ('{COMPONENT_PREFIXES[c]}{'*' if c != 'mask_tokens' else ''}')"
                              for c in missing)
        hint = ""
        if any(k.startswith(("diff_dec.transformer_2.", "ema.diff_dec.")) for k in stored):
            hint = " It looks like a Bernini-R split renderer checkpoint, which has no planner."
        raise BerniniError(f"the combined checkpoint '{location}' has no tensors for {described}; the download is "
                           f"incomplete or this is not a Bernini-Diffusers checkpoint.{hint}")
    claimed = sum(len(v) for v in views.values())
    if claimed != len(stored):
        prefixes = tuple(p for p in COMPONENT_PREFIXES.values() if p != "mask_tokens")
        stray = sorted(k for k in stored if k != "mask_tokens" and not k.startswith(prefixes))
        log.warning("combined checkpoint %s: ignoring %d tensor(s) of no Bernini component (e.g. %s)",
                    location, len(stray), ", ".join(stray[:3]))
    return views


# ---------------------------------------------------------------------------- Qwen key mapping
def qwen_key_map(target_keys: Iterable[str], *, tied_lm_head: bool = False) -> Callable[[str], Optional[str]]:
    """Original HF Qwen2.5-VL names (visual.*, model.*, lm_head.weight) -> names of the module being filled.

    transformers >= 4.52 (5.x included) nest ForConditionalGeneration as model.visual / model.language_model
    (Qwen2_5_VLModel as visual / language_model); older releases kept visual / model. The first candidate the
    module has wins; lm_head.weight is dropped when the module has none (unused at inference,
    docs/official_behaviour.md §3.1) or when it is tied to the embeddings."""
    targets = set(target_keys)

    def key_map(key: str) -> Optional[str]:
        if key.startswith("visual."):
            rest = key[len("visual."):]
            candidates = ("model.visual." + rest, "visual." + rest)
        elif key.startswith("model."):
            rest = key[len("model."):]
            candidates = ("model.language_model." + rest, "language_model." + rest, key)
        elif key == "lm_head.weight":
            return key if key in targets and not tied_lm_head else None
        else:
            candidates = (key,)
        for candidate in candidates:
            if candidate in targets:
                return candidate
        return candidates[0]  # reported as unexpected by the strict load

    return key_map


@contextmanager
def parameters_on_meta():
    """Build modules with every parameter on the meta device but buffers real: no memory or init time for
    the weights, while non-persistent buffers computed in __init__ (rotary inv_freq) stay valid."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def _assert_materialised(module: torch.nn.Module, what: str) -> None:
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.device.type == "meta"]
    if left:
        raise BerniniError(f"internal error: {what} still has unloaded tensors after loading: {left[:5]}.")


# ---------------------------------------------------------------------------- planner
def build_planner(config: BerniniConfig, mllm_dir, sources: Dict[str, TensorSource], *,
                  dtype: torch.dtype = torch.bfloat16, ops=None, origin: str = "the combined checkpoint"):
    """The PlannerModel: Qwen2.5-VL from ``mllm/config.json`` in ``dtype``, connector / ViT decoder /
    mask_tokens in fp32 (docs/official_behaviour.md §7.3), each filled strictly from its view of the combined
    checkpoint."""
    from transformers import AutoConfig

    from .planner.model import PlannerModel

    check_mllm_config(mllm_dir, sources["planner_mllm"])
    mllm_config = AutoConfig.from_pretrained(str(mllm_dir), local_files_only=True)
    hidden = _qwen_hidden_size(mllm_config)
    if config.vit_dim != hidden or config.clip_diff_cfg["target_channels"] != hidden:
        raise BerniniError(
            f"config.json connector_cfg.out_dim_for_vit ({config.vit_dim}) and clip_diff_cfg.target_channels "
            f"({config.clip_diff_cfg['target_channels']}) must equal the Qwen hidden size ({hidden}) of "
            f"'{mllm_dir}/config.json'; the config and the mllm/ folder belong to different models.")
    # Parameters on meta, buffers real: build() casts the Qwen model to `dtype`, buffers included, so its
    # rotary inv_freq ends up in bf16 exactly as the official `mllm.to(weight_dtype)` in __call__ leaves it.
    with parameters_on_meta():
        planner = PlannerModel.build(
            mllm_config,
            num_mask_tokens=config.num_mask_token,
            gen_dim=config.gen_dim,
            vit_dim=config.vit_dim,
            decoder_width=config.clip_diff_cfg["width"],
            decoder_depth=config.clip_diff_cfg["depth"],
            ops=ops,
            mllm_dtype=dtype,
            head_dtype=torch.float32,
            attn_implementation=config.mllm_attn_implementation,
        )
    mllm = planner.mllm
    tied = bool(getattr(mllm_config, "tie_word_embeddings", False))
    load_weights_(mllm, sources["planner_mllm"], dtype_for=lambda name: dtype,
                  key_map=qwen_key_map(mllm.state_dict(keep_vars=True).keys(), tied_lm_head=tied),
                  origin=f"{origin} (mllm.*)")
    fp32 = lambda name: torch.float32  # noqa: E731
    load_weights_(planner.connector, sources["connector"], dtype_for=fp32, origin=f"{origin} (connector.*)")
    load_weights_(planner.vit_decoder, sources["vit_decoder"], dtype_for=fp32, origin=f"{origin} (vit_decoder.*)")
    _load_mask_tokens(planner, sources["mask_tokens"], origin)
    _assert_materialised(planner, "the planner")
    return planner.eval().requires_grad_(False)


_QWEN_TEXT_TYPES = {**dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"), int),
                    "rms_norm_eps": float, "tie_word_embeddings": bool}
_QWEN_VISION_TYPES = dict.fromkeys(("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
                                    "patch_size", "spatial_merge_size", "temporal_patch_size"), int)


def check_mllm_config(mllm_dir, source: TensorSource) -> None:
    """mllm/config.json before transformers reads it: its sizes JSON integers, and vocab_size / hidden_size those
    of the checkpoint's Qwen embedding (a wrong one fails deep inside transformers, or not at all)."""
    path = Path(mllm_dir) / "config.json"
    data = read_json(path)
    check_config_types(path, data, _QWEN_TEXT_TYPES)  # transformers 4.x keeps the text settings at the top
    text, prefix = data, ""
    if isinstance(data.get("text_config"), dict):
        text, prefix = data["text_config"], "text_config."
        check_config_types(path, text, _QWEN_TEXT_TYPES, prefix)
    if isinstance(data.get("vision_config"), dict):
        check_config_types(path, data["vision_config"], _QWEN_VISION_TYPES, "vision_config.")
    key = next((k for k in ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight") if k in source),
               None)
    if key is None:
        return  # the strict load names the missing tensor
    shape = source.shape(key)
    for name, have in zip(("vocab_size", "hidden_size"), shape):
        if name in text and text[name] != have:
            raise config_error(path, prefix + name, text[name],
                               f"does not match the Qwen embedding 'mllm.{key}' ({list(shape)}) of the combined "
                               f"checkpoint: the mllm/ folder and the checkpoint are of different models")


def _qwen_hidden_size(mllm_config) -> int:
    text = getattr(mllm_config, "text_config", None) or mllm_config
    return int(text.hidden_size)


def _load_mask_tokens(planner, source: TensorSource, origin: str) -> None:
    expected = tuple(planner.mask_tokens.shape)  # (1, num_mask_token, hidden)
    shape = tuple(source.shape("mask_tokens"))
    if shape != expected:
        raise BerniniError(f"'mask_tokens' in {origin} has shape {shape} but config.json num_mask_token and the "
                           f"Qwen hidden size give {expected}; the config and the checkpoint do not match.")
    value = source.get("mask_tokens").to(torch.float32)
    planner.mask_tokens = torch.nn.Parameter(value, requires_grad=False)


# ---------------------------------------------------------------------------- whole model
@dataclass
class FullComponents:
    config: BerniniConfig
    planner: Any  # planner.model.PlannerModel
    dit_high: BerniniDiT
    dit_low: BerniniDiT
    text_encoder: UMT5TextEncoder
    vae: WanVAE
    processor: Any  # transformers Qwen2.5-VL processor from mllm/
    tokenizer: Any  # the Qwen tokenizer (processor.tokenizer)
    paths: Optional[FullPaths] = None
    parts: frozenset = ALL_PARTS  # the parts loaded; the components of the others are None (load_full `parts`)


def _dit_config(path: Path, config: BerniniConfig) -> DiTConfig:
    dit = read_dit_config(path)
    if dit.attention_head_dim != RENDERER_HEAD_DIM:
        raise BerniniError(f"'{path}': attention_head_dim {dit.attention_head_dim} is not supported; full Bernini "
                           f"builds the source-id RoPE with head dim {RENDERER_HEAD_DIM} "
                           "(docs/official_behaviour.md §7.2).")
    if dit.text_dim != config.gen_dim:
        raise BerniniError(f"'{path}': text_dim {dit.text_dim} differs from config.json connector_cfg.out_dim_for_gen "
                           f"({config.gen_dim}); the renderer could not read the planner's contexts.")
    return dit


@dataclass
class ProcessorParts:
    """Stand-in for the Qwen2.5-VL processor when transformers cannot build its video processor (it needs
    torchvision, which ComfyUI always has): the same three attributes the official pipeline uses."""

    tokenizer: Any
    image_processor: Any
    video_processor: Any = None


def load_processor(path):
    """The Qwen2.5-VL processor of mllm/ (offline; right padding as the official loads it)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    check_tokenizer_folder(path, "Qwen2.5-VL")  # transformers 5 builds an empty tokenizer from a folder without one
    try:
        return AutoProcessor.from_pretrained(str(path), local_files_only=True, padding_side="right")
    except ImportError:  # transformers builds the video processor only with torchvision (ComfyUI has it)
        log.info("transformers' Qwen2.5-VL video processor needs torchvision, which is not installed; the planner "
                 "uses planner.vision.TorchVitProcessor, a torch port of the same preprocessing")
    except (OSError, ValueError) as exc:
        raise BerniniError(f"cannot load the Qwen2.5-VL processor from '{path}' ({exc}); the mllm/ folder needs "
                           "tokenizer and preprocessor files.") from None
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, padding_side="right")
    return ProcessorParts(tokenizer, AutoImageProcessor.from_pretrained(str(path), local_files_only=True))


def _t5_from_checkpoint(folder: Path, tokenizer_dir: Path, source: TensorSource, dtype, origin) -> UMT5TextEncoder:
    """UMT5 from the combined checkpoint's ``t5_text_encoder.*`` copy (the copy the official load ends with)."""
    from transformers import UMT5Config, UMT5EncoderModel

    read_umt5_config(folder)  # JSON types, before transformers reads it
    with parameters_on_meta():
        model = UMT5EncoderModel(UMT5Config.from_pretrained(str(folder), local_files_only=True))
    load_weights_(model, source, dtype_for=lambda name: dtype, origin=f"{origin} (t5_text_encoder.*)",
                  key_map=lambda k: None if k == "encoder.embed_tokens.weight" else k)  # tied to `shared`
    _assert_materialised(model, "UMT5")
    tokenizer = load_umt5_tokenizer(tokenizer_dir)
    return UMT5TextEncoder(model.eval().requires_grad_(False), tokenizer)


def load_full(path, *, dtype: torch.dtype = torch.bfloat16, attention: str = "auto",
              overrides: Optional[Dict[str, Any]] = None, ops=None, t5_weights: str = "folder",
              with_planner: bool = True, with_renderer: bool = True, progress=None, parts=None) -> FullComponents:
    """Every component of a Bernini-Diffusers(-v2) folder, on the CPU.

    ``with_planner`` / ``with_renderer`` load only one half (the ComfyUI loaders load them separately):
    without the planner, ``planner`` is None; without the renderer, the experts, UMT5 and VAE are None.

    ``parts``: None (every part) or some of "experts", "text_encoder", "vae", "planner" (loaders.PARTS), narrowed
    further by ``with_planner`` / ``with_renderer``; the components of the other parts are None and neither their
    weights nor their config files are read (the experts' configs and the combined checkpoint's headers always are
    when the experts load). ``FullComponents.parts`` says what was loaded. The experts are memory-mapped from the
    combined checkpoint (checkpoints.TensorSource), so processes loading only them share the file's page cache.

    ``t5_weights``: "folder" reads UMT5 from t5_text_encoder/ (smaller, bf16 in the release); "checkpoint" reads
    the redundant ``t5_text_encoder.*`` copy of bernini/ (the same weights, docs/official_behaviour.md §2.1).

    ``progress(stage, step, total)``: stage "load", one step per component (bernini_core/progress.py)."""
    path = Path(path)
    if path.is_file() and path.name == "config.json":
        path = path.parent
    layout = detect_layout(path)
    if layout != Layout.BERNINI_FULL:
        raise BerniniError(
            f"'{path}' is a {layout.value}, not a Bernini-Diffusers folder: full Bernini needs the planner "
            f"(mllm/ and the combined bernini/ checkpoint). Load it with the renderer loader instead, or pass a "
            f"Bernini-Diffusers / Bernini-Diffusers-v2 folder.")
    if t5_weights not in ("folder", "checkpoint"):
        raise BerniniError(f"t5_weights must be 'folder' or 'checkpoint', got {t5_weights!r}.")
    parts = resolve_parts(parts)
    if not with_planner:
        parts = parts - {"planner"}
    if not with_renderer:
        parts = parts - {"experts", "text_encoder", "vae"}
    config = BerniniConfig.from_dir(path, overrides)
    paths = component_paths(config, path)
    needs_checkpoint = bool(parts & {"experts", "planner"}) or ("text_encoder" in parts and t5_weights == "checkpoint")
    _require_paths(paths, parts, needs_checkpoint)
    if "experts" in parts:
        high_config = _dit_config(paths.transformer_config, config)
        low_config = _dit_config(paths.transformer_2_config, config)
    if parts & {"text_encoder", "planner"}:  # the planner's contexts are joined to UMT5's
        d_model = read_umt5_config(paths.t5_encoder).get("d_model")
        if d_model != config.gen_dim:
            raise BerniniError(f"UMT5 d_model ({d_model}) of '{paths.t5_encoder}' differs from config.json "
                               f"connector_cfg.out_dim_for_gen ({config.gen_dim}); T5 and planner contexts are "
                               f"concatenated, so they must match.")
    if "experts" in parts:
        from .loaders import check_scheduler_config

        check_scheduler_config(paths.scheduler.parent if paths.scheduler.name == "scheduler" else path)
    # checks every shard's header
    sources = split_combined_checkpoint(paths.checkpoint) if needs_checkpoint else {}
    origin = str(paths.checkpoint)
    # Every other config and weight-file header the load will use, before anything is built.
    if "planner" in parts:
        check_mllm_config(paths.mllm, sources["planner_mllm"])
        check_tokenizer_folder(paths.processor, "Qwen2.5-VL")
    if "text_encoder" in parts:
        if t5_weights == "folder":
            check_umt5_folder(paths.t5_encoder)
        check_tokenizer_folder(paths.t5_tokenizer, "UMT5")
    if "vae" in parts:
        read_vae_config(paths.vae)
        TensorSource.open(paths.vae)
    log.info("loading full Bernini %s from %s (%s)", config.version, path, config.version_source)

    # planner; two experts, UMT5, VAE
    steps = StageSteps(progress, "load", ("planner" in parts) + 2 * ("experts" in parts) + ("text_encoder" in parts)
                       + ("vae" in parts))
    planner = processor = None
    if "planner" in parts:
        planner = build_planner(config, paths.mllm, sources, dtype=dtype, ops=ops, origin=origin)
        processor = load_processor(paths.processor)
        steps.advance()
    dit_high = dit_low = text_encoder = vae = None
    if "experts" in parts:
        dit_high = build_dit(high_config, sources["dit_high"], dtype=dtype, keep_fp32_islands=False, ops=ops,
                             attention=attention, origin=f"{origin} (diff_dec.transformer.*)")
        steps.advance()
        dit_low = build_dit(low_config, sources["dit_low"], dtype=dtype, keep_fp32_islands=False, ops=ops,
                            attention=attention, origin=f"{origin} (diff_dec_low.transformer_2.*)")
        steps.advance()
    if "text_encoder" in parts:
        if t5_weights == "checkpoint":
            text_encoder = _t5_from_checkpoint(paths.t5_encoder, paths.t5_tokenizer, sources["t5"], dtype, origin)
        else:
            text_encoder = UMT5TextEncoder.from_pretrained(paths.t5_encoder, paths.t5_tokenizer, dtype=dtype)
        text_encoder.max_length = config.t5_max_sequence_length
        steps.advance()
    if "vae" in parts:
        vae = load_vae(paths.vae, ops=ops)
        steps.advance()
    return FullComponents(config=config, planner=planner, dit_high=dit_high, dit_low=dit_low,
                          text_encoder=text_encoder, vae=vae, processor=processor,
                          tokenizer=getattr(processor, "tokenizer", processor) if processor else None, paths=paths,
                          parts=frozenset(parts))
