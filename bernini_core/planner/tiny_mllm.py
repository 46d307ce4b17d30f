"""A tiny Qwen2.5-VL ``mllm/`` asset folder, written offline (tests and ``--config tiny``).

The official ``Bernini-Diffusers/mllm/`` folder holds the Qwen2.5-VL config, tokenizer and
processor configs; the weights live in the combined ``bernini/`` checkpoint under ``mllm.``
(docs/official_behaviour.md §2.1). This module writes the same folder with a model small enough for a
2-core CPU, keeping every id the planner hard-codes (docs/official_behaviour.md §7.2):

* the Qwen special tokens at their real ids (``<|endoftext|>`` 151643 … ``<|file_sep|>`` 151664),
  then the 64 + 64 Bernini visual pad tokens (151665 …), so ``image_token_id`` 151655 and
  ``video_token_id`` 151656 exist; ids below 151643 are the 256 byte-level characters
  followed by inert filler entries;
* a text model with hidden 64 and tied embeddings (the large vocabulary stays cheap), a vision tower with the
  real patch / merge / window structure (patch 14, temporal patch 2, merge 2, window 112,
  full attention in its last block, tokens_per_second 2);
* processor configs with the 7B values (min 3136 / max 12845056 pixels, CLIP mean/std).

The folder loads with ``AutoProcessor.from_pretrained`` and ``Qwen2_5_VLConfig`` in
transformers 4.57 and 5.x with no network. Everything is deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

# Qwen2.5-VL special tokens in id order from 151643 (real Qwen2.5-VL tokenizer); "special" = the
# flag the real tokenizer gives them (tool-call / FIM tokens are ordinary added tokens).
QWEN_SPECIAL_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)
FIRST_SPECIAL_ID = 151643
N_VISUAL_PADS = 64  # per direction (Bernini template, docs/official_behaviour.md §3.3)
VISUAL_INPUT_PADS = tuple(f"<|visual_input_token_pad_{i}|>" for i in range(N_VISUAL_PADS))
VISUAL_OUTPUT_PADS = tuple(f"<|visual_output_token_pad_{i}|>" for i in range(N_VISUAL_PADS))
# 151643 + 22 Qwen specials + 128 visual pads = 151793 ids in use; rounded up to a multiple of 64.
TINY_VOCAB_SIZE = 151808

# Qwen2's pre-tokenizer split (the same regex the real tokenizer.json carries).
_QWEN_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Informational. Not "4.57.3": transformers 4.57.3 treats a tokenizer folder whose config names 4.57.3
# as a Mistral one and warns about its regex (the 651961 fork's fix_mistral_regex=True would even swap it).
_TRANSFORMERS_VERSION = "4.57.1"


def tiny_qwen_config(*, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                     intermediate_size: int = 128, vision_depth: int = 2, vision_hidden: int = 32,
                     vision_heads: int = 4, vocab_size: int = TINY_VOCAB_SIZE) -> dict:
    """The ``config.json`` dict of the tiny Qwen2.5-VL (``text_config`` + ``vision_config``, a
    layout transformers 4.57 and 5.x both read). ``mrope_section`` splits the rotary half of
    the head dim 1:1.5:1.5 like the 7B's [16, 24, 24]."""
    head_dim = hidden_size // num_heads
    half = head_dim // 2
    temporal = half // 4
    spatial = (half - temporal) // 2
    mrope_section = [temporal + (half - temporal) % 2, spatial, spatial]  # sums to head_dim / 2
    text = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": mrope_section},
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": num_layers,
        "initializer_range": 0.02,
        "use_cache": True,
        "tie_word_embeddings": True,  # halves the (large-vocabulary) parameter count
        "bos_token_id": FIRST_SPECIAL_ID,
        "eos_token_id": FIRST_SPECIAL_ID + 2,  # <|im_end|>
        "pad_token_id": FIRST_SPECIAL_ID,
    }
    vision = {
        "model_type": "qwen2_5_vl",
        "depth": vision_depth,
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "num_heads": vision_heads,
        "hidden_act": "silu",
        "in_chans": 3,  # 4.57 name
        "in_channels": 3,  # 5.x name
        "out_hidden_size": hidden_size,  # the merger writes into the LLM embedding space
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [vision_depth - 1],
        "tokens_per_second": 2,
        "initializer_range": 0.02,
    }
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "text_config": {"model_type": "qwen2_5_vl_text", **text},
        "vision_config": vision,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "tie_word_embeddings": text["tie_word_embeddings"],
        "torch_dtype": "float32",
        "transformers_version": _TRANSFORMERS_VERSION,
    }


def _byte_level_alphabet() -> list[str]:
    """The 256 characters byte-level BPE uses for the bytes 0..255, in byte order (the
    printable Latin-1 bytes map to themselves, the others to code points from 256 up)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _added_token(token_id: int | None, content: str, special: bool) -> dict:
    entry = {} if token_id is None else {"id": token_id}  # tokenizer_config keys entries by id instead
    return {**entry, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def _added_tokens() -> list[tuple[int, str, bool]]:
    tokens = [(FIRST_SPECIAL_ID + i, text, special) for i, (text, special) in enumerate(QWEN_SPECIAL_TOKENS)]
    next_id = FIRST_SPECIAL_ID + len(QWEN_SPECIAL_TOKENS)
    for text in VISUAL_INPUT_PADS + VISUAL_OUTPUT_PADS:
        tokens.append((next_id, text, True))
        next_id += 1
    return tokens


def _tokenizer_json() -> dict:
    """A byte-level BPE tokenizer with Qwen2's normalizer / pre-tokenizer / decoder. The model
    vocabulary is the byte alphabet (ids 0..255, no merges) padded with filler entries
    (made of printable ASCII, never produced by encoding) up to id 151642, so the added
    tokens land on their real ids."""
    vocab = {char: i for i, char in enumerate(_byte_level_alphabet())}
    for token_id in range(len(vocab), FIRST_SPECIAL_ID):
        vocab[f"[filler{token_id}]"] = token_id
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(*t) for t in _added_tokens()],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _QWEN_SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


def _tokenizer_config() -> dict:
    specials = [text for text, special in QWEN_SPECIAL_TOKENS[1:14] if special]  # <|im_start|> … <|video_pad|>
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): _added_token(None, text, special) for i, text, special in _added_tokens()},
        "additional_special_tokens": specials + list(VISUAL_INPUT_PADS + VISUAL_OUTPUT_PADS),
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "padding_side": "right",
        "processor_class": "Qwen2_5_VLProcessor",
    }


def _vision_processor_fields() -> dict:
    return {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": _CLIP_MEAN,
        "image_std": _CLIP_STD,
        "processor_class": "Qwen2_5_VLProcessor",
    }


def _write_json(path: Path, data: dict, *, indent: int | None = 2) -> None:
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tiny_mllm_assets(folder, *, seed: int = 0) -> Path:
    """Write the tiny ``mllm/`` folder (config, tokenizer, image and video processor configs)
    into ``folder`` (created if needed) and return it. The files hold no random content, so
    ``seed`` changes nothing; it is accepted so every tiny writer has the same signature."""
    del seed
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", tiny_qwen_config())
    _write_json(folder / "tokenizer.json", _tokenizer_json(), indent=None)
    _write_json(folder / "tokenizer_config.json", _tokenizer_config())
    _write_json(folder / "special_tokens_map.json", {
        "additional_special_tokens": _tokenizer_config()["additional_special_tokens"],
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    _write_json(folder / "preprocessor_config.json",
                {"image_processor_type": "Qwen2VLImageProcessor", **_vision_processor_fields()})
    _write_json(folder / "video_preprocessor_config.json",
                {"video_processor_type": "Qwen2VLVideoProcessor", **_vision_processor_fields()})
    return folder
