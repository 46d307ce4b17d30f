"""Shape of the renderer DiT, read from / written to a diffusers ``transformer/config.json``.

The renderer is a stock Wan text-to-video transformer (docs/official_behaviour.md §4.1): Bernini adds no
parameters, only inference behaviour (in-context streams, source-id RoPE), so the config is the
diffusers ``WanTransformer3DModel`` config restricted to the T2V family.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import BerniniError

# Keys of a diffusers config.json that carry no information for us (bookkeeping, or Bernini's
# build-time flag, which our model always honours through per-stream source ids).
_IGNORED_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "use_src_id_rotary_emb", "window_size"}
# Image-conditioned (I2V / FLF2V) Wan variants: extra image branch we do not implement.
_IMAGE_BRANCH_KEYS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
_SUPPORTED_QK_NORM = "rms_norm_across_heads"


@dataclass(frozen=True)
class DiTConfig:
    patch_size: tuple = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str = _SUPPORTED_QK_NORM
    eps: float = 1e-6
    rope_max_seq_len: int = 1024

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        _validate(self)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        """Build from a diffusers ``WanTransformer3DModel`` config dict; unknown keys are ignored."""
        if not isinstance(d, dict):
            raise BerniniError(f"transformer config: expected a dict (config.json content), got {type(d).__name__}.")
        for key in _IMAGE_BRANCH_KEYS:
            if d.get(key) is not None:
                raise BerniniError(
                    f"transformer config: '{key}' = {d[key]!r} means an image-to-video Wan model, which Bernini "
                    "does not use. Load a text-to-video Wan2.2-A14B / Wan2.1-1.3B transformer (with "
                    f"'{key}': null)."
                )
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "out_channels" in kwargs and kwargs["out_channels"] is None:
            kwargs["out_channels"] = kwargs.get("in_channels", cls.in_channels)  # diffusers: out or in
        if "patch_size" in kwargs and isinstance(kwargs["patch_size"], (list, tuple)):
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """diffusers-style ``config.json`` content, loadable by ``WanTransformer3DModel.from_config``."""
        d = {"_class_name": "WanTransformer3DModel"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            d[f.name] = list(value) if isinstance(value, tuple) else value
        d.update({key: None for key in _IMAGE_BRANCH_KEYS})
        return d


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(cfg: DiTConfig) -> None:
    def fail(field: str, why: str):
        raise BerniniError(f"transformer config: '{field}' = {getattr(cfg, field)!r} {why}")

    if len(cfg.patch_size) != 3 or not all(_is_int(p) and p > 0 for p in cfg.patch_size):
        fail("patch_size", "must be three positive integers (t, h, w), e.g. [1, 2, 2].")
    for name in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
                 "freq_dim", "ffn_dim", "num_layers", "rope_max_seq_len"):
        if not _is_int(getattr(cfg, name)) or getattr(cfg, name) <= 0:
            fail(name, "must be a positive integer.")
    head_dim = cfg.attention_head_dim
    # 3D RoPE splits the head into t/h/w parts of d-4(d//6), 2(d//6), 2(d//6) channels (docs/wan_qwen.md §1.2).
    if head_dim % 2 or head_dim // 6 == 0:
        fail("attention_head_dim", "must be even and at least 6 (the 3D RoPE splits it into t/h/w pairs).")
    if cfg.freq_dim % 2:
        fail("freq_dim", "must be even (sinusoidal timestep features are cos/sin pairs).")
    if not isinstance(cfg.cross_attn_norm, bool):
        fail("cross_attn_norm", "must be true or false.")
    if cfg.qk_norm != _SUPPORTED_QK_NORM:
        fail("qk_norm", f"is not supported; Wan T2V models use {_SUPPORTED_QK_NORM!r}.")
    if isinstance(cfg.eps, bool) or not isinstance(cfg.eps, (int, float)) or not cfg.eps > 0:
        fail("eps", "must be a positive number, e.g. 1e-6.")


WAN22_A14B = DiTConfig()
WAN21_1_3B = DiTConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30)
