"""LoRA key layouts for the Wan DiT: split a key into (module base, kind), and map a base to our parameter name.

A LoRA key is ``<base><suffix>``: the base names a module of the model in one of the published layouts, the
suffix says what the tensor is (ComfyUI ``comfy/lora.py`` ``load_lora`` and ``comfy/weight_adapter`` read the
same suffixes):

* ComfyUI / original Wan: ``diffusion_model.blocks.0.self_attn.q`` (also without the prefix), ``.lora_down/up``
  or ``.lora_A/B``; lightx2v's full-weight deltas ``.diff`` (weight), ``.diff_b`` (bias) and ``blocks.0.diff_m``
  (the block's ``modulation``);
* kohya / musubi-tuner: ``lora_unet_blocks_0_self_attn_q`` (Wan-Fun: ``lora_unet__blocks_...``);
* diffusers / PEFT: ``transformer.blocks.0.attn1.to_q`` (also ``base_model.model.`` or no prefix), ``.lora_A/B``.

Targets are our (diffusers ``WanTransformer3DModel``) parameter names: ``<module>.weight`` for layers, so a
``.diff_b`` lands on ``<module>.bias`` by ComfyUI's rule, and the bare name for ``scale_shift_table``.
"""

from __future__ import annotations

from typing import Iterable, Optional

from ..keymaps.wan_dit import dit_key_to_original

# Low-rank pairs: (up suffix, down suffix), as ComfyUI's LoRAAdapter.load looks for them (first match wins).
PAIR_SUFFIXES = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
)
# Everything else a base may carry: suffix -> kind.
OTHER_SUFFIXES = {
    ".alpha": "alpha",
    ".dora_scale": "dora_scale",
    ".lora_mid.weight": "lora_mid",
    ".reshape_weight": "reshape_weight",
    ".diff": "diff",
    ".diff_b": "diff_b",
    ".set_weight": "set_weight",
    ".w_norm": "w_norm",
    ".b_norm": "b_norm",
}
# Adapters ComfyUI's own loader applies but the standalone merge does not (suffix -> adapter name).
UNSUPPORTED_SUFFIXES = {
    **{f".hada_{p}": "LoHa" for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f".lokr_{p}": "LoKr" for p in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2")},
    **{f".{p}.weight": "GLoRA" for p in ("a1", "a2", "b1", "b2")},
    ".oft_blocks": "OFT/BOFT",
    ".rescale": "OFT/BOFT",
}


def _suffix_table() -> list:
    table = []
    for up, down in PAIR_SUFFIXES:
        table += [(up, "up"), (down, "down")]
    table += list(OTHER_SUFFIXES.items())
    table += [(suffix, "unsupported") for suffix in UNSUPPORTED_SUFFIXES]
    return sorted(table, key=lambda item: -len(item[0]))  # ".lora_B.weight" before ".lora_B"


_SUFFIXES = tuple(_suffix_table())

# Module prefixes trainers put in front of the model's own names (dotted forms), most specific first.
DOTTED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.transformer.",
                   "base_model.model.", "transformer.", "unet.", "model.")
# kohya-style flattened names: the module path with "_" for ".".
UNDERSCORE_PREFIXES = ("lora_unet__", "lora_unet_", "lora_transformer_", "lycoris_")

ACCEPTED_LAYOUTS = ("ComfyUI / original Wan (diffusion_model.blocks.0.self_attn.q.lora_down.weight, .lora_A/.lora_B, "
                    ".diff/.diff_b/.diff_m), kohya / musubi-tuner (lora_unet_blocks_0_self_attn_q.lora_down.weight), "
                    "diffusers / PEFT (transformer.blocks.0.attn1.to_q.lora_A.weight)")


def split_key(key: str) -> tuple[Optional[str], Optional[str]]:
    """(base, kind) of a LoRA key; kind is "up", "down", one of OTHER_SUFFIXES' kinds or "unsupported";
    (None, None) when the suffix is none of these."""
    for suffix, kind in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], kind
    return None, None


def canonical_key(key: str) -> str:
    """The key under the names ComfyUI's ``load_lora`` reads: Wan-Fun's ``lora_unet__`` becomes ``lora_unet_``
    (as ComfyUI's convert_lora does), lightx2v's ``<x>.diff_m`` becomes ``<x>.modulation.diff`` and PEFT's bias
    of lora_B (diffusers' conversion of ``diff_b``) becomes ``.diff_b``."""
    if key.startswith("lora_unet__"):
        key = "lora_unet_" + key[len("lora_unet__"):]
    if key.endswith(".diff_m"):
        return key[: -len(".diff_m")] + ".modulation.diff"
    if key.endswith(".lora_B.bias"):
        return key[: -len(".lora_B.bias")] + ".diff_b"
    return key


def canonical_state_dict(state: dict) -> dict:
    """``state`` with canonical keys (same tensors, no copies): what to hand ComfyUI's ``comfy.lora.load_lora``
    together with the map of :func:`lora_module_map`."""
    return {canonical_key(key): value for key, value in state.items()}


def patch_targets(param_names: Iterable[str]) -> dict[str, str]:
    """Module path -> target parameter name: ``<module>.weight`` for every weight, the bare name for
    ``scale_shift_table`` parameters (biases are reached through their weight's module, fp8 scales never)."""
    targets = {}
    for name in param_names:
        if name.endswith(".weight"):
            targets[name[: -len(".weight")]] = name
        elif name.rsplit(".", 1)[-1] == "scale_shift_table":
            targets[name] = name
    return targets


class KeyMatcher:
    """LoRA module base -> our target parameter name, in every accepted layout."""

    def __init__(self, param_names: Iterable[str]):
        dotted: dict[str, set] = {}
        for module, target in patch_targets(param_names).items():
            original = dit_key_to_original(target)
            if target.endswith(".weight"):
                original = original[: -len(".weight")]
            for alias in {module, original}:
                dotted.setdefault(alias, set()).add(target)
        underscored: dict[str, set] = {}
        for alias, targets in dotted.items():
            underscored.setdefault(alias.replace(".", "_"), set()).update(targets)
        # an alias two parameters could claim is no alias (none exists for the Wan DiT; kept as a guard)
        self.dotted = {alias: next(iter(t)) for alias, t in dotted.items() if len(t) == 1}
        self.underscored = {alias: next(iter(t)) for alias, t in underscored.items() if len(t) == 1}

    def target(self, base: str) -> Optional[str]:
        if base in self.dotted:
            return self.dotted[base]
        for prefix in DOTTED_PREFIXES:
            if base.startswith(prefix) and base[len(prefix):] in self.dotted:
                return self.dotted[base[len(prefix):]]
        for prefix in UNDERSCORE_PREFIXES:
            if base.startswith(prefix) and base[len(prefix):] in self.underscored:
                return self.underscored[base[len(prefix):]]
        return None


def lora_module_map(keys: Iterable[str], param_names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """(mapping, unmatched_keys) for ComfyUI's ``comfy.lora.load_lora(canonical_state_dict(lora), to_load)``:
    ``mapping`` takes each LoRA module base (the canonical key minus its suffix) to our parameter name
    (``<module>.weight`` for layers, the bare ``scale_shift_table`` name otherwise); ``unmatched_keys`` lists the
    given keys (as given) that no parameter takes. The keys are canonicalised here, so raw and canonical keys
    give the same mapping."""
    matcher = KeyMatcher(param_names)
    mapping, unmatched = {}, []
    for key in keys:
        base, kind = split_key(canonical_key(key))
        target = None if base is None else matcher.target(base)
        if target is None or (kind == "diff_b" and not target.endswith(".weight")):
            unmatched.append(key)
        else:
            mapping[base] = target
    return mapping, unmatched


def describe_layout(keys: Iterable[str]) -> str:
    """The layout(s) a LoRA's keys are written in, for log lines and errors."""
    found = []
    keys = list(keys)
    bases = [split_key(canonical_key(k))[0] or k for k in keys]
    if any(b.startswith(UNDERSCORE_PREFIXES) for b in bases):
        found.append("kohya/musubi")
    dotted = [b for b in bases if not b.startswith(UNDERSCORE_PREFIXES)]
    if any(part in b for b in dotted for part in (".self_attn.", ".cross_attn.", ".ffn.0", ".ffn.2", "head.head",
                                                  "text_embedding.", "time_embedding.", "time_projection.",
                                                  ".modulation")):
        found.append("ComfyUI/original Wan")
    if any(part in b for b in dotted for part in (".attn1.", ".attn2.", "condition_embedder.", "proj_out",
                                                  ".ffn.net.")):
        found.append("diffusers/PEFT")
    if any(k.endswith((".diff", ".diff_b", ".diff_m")) for k in keys):
        found.append("full-weight diffs")
    return " + ".join(found) if found else "unknown"
