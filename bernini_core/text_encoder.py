"""UMT5 prompt encoding: the prompt strings the models were trained with, the
exact text UMT5 sees, and trimmed / zero-padded embeddings.

Two official code paths build the UMT5 input differently, and both are
reproduced here (docs/official_behaviour.md §3.7, §4.4; official ``bernini/pipeline.py``):

* Bernini-R (``BerniniRendererPipeline.__call__``):
  positive = ``system_prompt + prompt_clean(prompt)`` (the system prompt is not
  cleaned, the concatenation is not cleaned again); negative = the negative
  prompt exactly as given, never cleaned.
* Full Bernini v1/v2 (``BerniniPipeline.__call__`` + ``_get_t5_text_ids``):
  positive = ``prompt_clean(prompt_clean(system_prompt + prompt_clean(prompt)))``;
  negative = ``prompt_clean(prompt_clean(neg_prompt))``. The extra passes are not
  no-ops: ftfy folds full-width punctuation, so the default Chinese negative
  prompt reaches UMT5 with ASCII commas in full Bernini but not in Bernini-R.

Tokenisation and trimming follow the official ``_tokenize`` / ``encode_prompt``:
pad to 512 with truncation and EOS, run the encoder with the attention mask,
keep the first ``mask.sum()`` rows.
"""

from __future__ import annotations

import html
import json
import logging
import re
import threading
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .checkpoints import TensorSource, load_weights_, read_json
from .errors import BerniniError
from .quant import dequantize_fp8_state, fp8_format_of
from .weight_files import broken_file, check_config_types, check_tokenizer_folder, config_error

log = logging.getLogger("bernini.text_encoder")

_WHITESPACE = re.compile(r"\s+")


# --------------------------------------------------------------------------- prompts

@lru_cache(maxsize=1)
def _prompt_table() -> dict:
    path = Path(__file__).resolve().parent / "data" / "bernini_prompts.json"
    return json.loads(path.read_text(encoding="utf-8"))


def prompt_clean(text: str) -> str:
    """Wan / Bernini prompt cleaning (docs/wan_qwen.md §3): ftfy, HTML-unescape twice,
    collapse whitespace, strip."""
    import ftfy  # imported lazily: only needed when a prompt is encoded

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return _WHITESPACE.sub(" ", text).strip()


def renderer_system_prompt(task: str) -> str:
    """The UMT5 system-prompt prefix of a task; unknown tasks get "default"
    (official ``bernini/prompt_enhancer.py`` ``get_system_prompt_for_task``)."""
    table = _prompt_table()["renderer_system_prompts"]
    if task != "_about" and task in table:
        return table[task]
    return table["default"]


def negative_prompt(kind: str = "default_zh") -> str:
    """A shipped negative prompt: "default_zh" (the Wan2.2 CLI default) or
    "english" (its translation, used by the v2v/mv2v/r2v presets)."""
    table = _prompt_table()["negative_prompts"]
    if kind == "_about" or kind not in table:
        kinds = ", ".join(sorted(k for k in table if k != "_about"))
        raise BerniniError(f"negative prompt kind {kind!r} is unknown; use one of: {kinds}.")
    return table[kind]


def _resolve_system_prompt(task: str, system_prompt: str | None) -> str:
    # official `bernini/cli.py` `resolve_system_prompt`: an explicit, non-empty system prompt wins.
    return system_prompt if system_prompt else renderer_system_prompt(task)


def t5_positive_text(task: str, prompt: str, system_prompt: str | None = None, *,
                     full_bernini: bool = False) -> str:
    """The exact string UMT5 tokenises for the positive prompt.

    ``system_prompt`` None or "" selects the task's system prompt. ``full_bernini``
    picks the full-Bernini (v1/v2) cleaning order instead of Bernini-R's (see the
    module docstring)."""
    system = _resolve_system_prompt(task, system_prompt)
    raw = prompt_clean(prompt)
    if full_bernini:
        # pipeline.py: t5_prompt = clean(system + raw); _get_t5_text_ids cleans again.
        return prompt_clean(prompt_clean(system + raw))
    return system + raw


def t5_negative_text(neg_prompt: str, *, full_bernini: bool = False) -> str:
    """The exact string UMT5 tokenises for the negative prompt: unchanged in
    Bernini-R, cleaned twice in full Bernini."""
    if full_bernini:
        return prompt_clean(prompt_clean(neg_prompt))
    return neg_prompt


# --------------------------------------------------------------------------- encoder

_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def _resolve_tokenizer_dir(model_dir: Path, tokenizer_dir) -> Path:
    if tokenizer_dir is not None:
        path = Path(tokenizer_dir)
        if not path.is_dir():
            raise BerniniError(f"UMT5 tokenizer folder {str(path)!r} does not exist; pass the folder that "
                               "holds tokenizer.json / spiece.model (in a diffusers layout: <model>/tokenizer).")
        return path
    if any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        return model_dir
    sibling = model_dir.parent / "tokenizer"  # diffusers layout: text_encoder/ next to tokenizer/
    if sibling.is_dir():
        return sibling
    raise BerniniError(f"no UMT5 tokenizer found in {str(model_dir)!r} or {str(sibling)!r}; "
                       "pass tokenizer_dir explicitly.")


# The config.json values transformers builds UMT5 from; a string here fails deep inside transformers.
_UMT5_CONFIG_TYPES = {**dict.fromkeys(("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                                       "relative_attention_num_buckets", "relative_attention_max_distance"), int),
                      "layer_norm_epsilon": float, "feed_forward_proj": str}


def read_umt5_config(model_dir) -> dict:
    """A UMT5 ``config.json`` with its sizes checked to be JSON integers (a BerniniError names file and key)."""
    path = Path(model_dir) / "config.json"
    data = read_json(path)
    check_config_types(path, data, _UMT5_CONFIG_TYPES)
    return data


def check_umt5_folder(model_dir) -> dict:
    """Before UMT5 is built: its typed config.json, every weight file's header (weight_files), and an embedding
    table of the vocab_size x d_model the config says; returns the config."""
    model_dir = Path(model_dir)
    config = read_umt5_config(model_dir)
    source = TensorSource.open(model_dir)
    for key in ("shared.weight", "encoder.embed_tokens.weight"):
        if key in source:
            shape = source.shape(key)
            for name, have in zip(("vocab_size", "d_model"), shape):
                if name in config and config[name] != have:
                    raise config_error(model_dir / "config.json", name, config[name],
                                       f"does not match the UMT5 embedding '{key}' ({list(shape)}) in "
                                       f"'{model_dir}': the config and the weights are of different models")
            break
    return config


def load_umt5_tokenizer(folder):
    """The tokenizer of ``folder`` (local files only); an empty or unreadable folder is a BerniniError naming it."""
    from transformers import AutoTokenizer

    check_tokenizer_folder(folder, "UMT5")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 (tokenizers raises bare Exceptions; any failure = unreadable folder)
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise broken_file(folder, f"holds a tokenizer transformers cannot read ({type(exc).__name__}: {reason})"
                          ) from None


class UMT5TextEncoder:
    """A transformers ``UMT5EncoderModel`` plus its tokenizer, encoding prompts
    exactly as the official pipelines do."""

    def __init__(self, model, tokenizer, max_length: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        # A fast tokenizer switches its truncation/padding state per call and raises "Already borrowed" when two
        # threads do so at once (pipelines sharing this encoder): one call at a time.
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, model_dir, tokenizer_dir=None, *, dtype=torch.bfloat16,
                        device="cpu") -> "UMT5TextEncoder":
        """Load a diffusers-style ``text_encoder`` folder (safetensors only, local
        files only). ``tokenizer_dir`` defaults to ``model_dir`` when it holds
        tokenizer files, else to its sibling ``tokenizer`` folder."""
        from transformers import UMT5EncoderModel

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise BerniniError(f"UMT5 text encoder folder {str(model_dir)!r} does not exist; pass the "
                               "text_encoder folder of the checkpoint (config.json + *.safetensors).")
        if not any(model_dir.glob("*.safetensors")):
            raise BerniniError(f"UMT5 text encoder folder {str(model_dir)!r} holds no .safetensors weights; "
                               "only safetensors are loaded (convert .bin/.pth weights first).")
        config = check_umt5_folder(model_dir)
        tok_dir = _resolve_tokenizer_dir(model_dir, tokenizer_dir)
        tokenizer = load_umt5_tokenizer(tok_dir)
        if len(tokenizer) > config.get("vocab_size", len(tokenizer)):
            raise config_error(model_dir / "config.json", "vocab_size", config["vocab_size"],
                               f"is smaller than the {len(tokenizer)} tokens of the tokenizer in '{tok_dir}'")
        # Same loader and dtype as the official (renderer.py / bernini.py): in bf16
        # transformers keeps no fp32 islands (`_keep_in_fp32_modules` is fp16-only).
        try:
            model, info = UMT5EncoderModel.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True,
                                                           local_files_only=True, output_loading_info=True)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, OSError) as exc:  # e.g. a config size that does not fit the tensors
            raise broken_file(model_dir, f"could not be loaded as a UMT5 encoder ({type(exc).__name__}: "
                                         f"{str(exc).strip()[:300]})") from None
        missing = sorted(info.get("missing_keys") or ())
        if missing:  # transformers would fill them with random values and only log it
            raise broken_file(model_dir, f"lacks {len(missing)} UMT5 tensor(s) ({', '.join(missing[:3])}"
                                         f"{' ...' if len(missing) > 3 else ''}): its weight files are incomplete "
                                         "or of another model")
        model.eval().requires_grad_(False)
        if torch.device(device) != torch.device("cpu"):
            model.to(device)
        return cls(model, tokenizer)

    @classmethod
    def from_single_file(cls, path, *, dtype=torch.bfloat16, device="cpu",
                         tokenizer_dir=None) -> "UMT5TextEncoder":
        """Load a UMT5-XXL encoder kept as one ``.safetensors`` file, as ComfyUI keeps it in
        models/text_encoders (Comfy-Org/Wan_2.1_ComfyUI_repackaged ``umt5_xxl_fp16.safetensors``,
        ``umt5_xxl_fp8_e4m3fn_scaled.safetensors``).

        Key names are transformers' (ComfyUI's T5 module uses them too) or the original Wan
        ``.pth`` names (docs/wan_qwen.md §3). fp8 weights are dequantised to ``dtype`` ("scaled" files:
        ``weight * scale``). The config is read off the tensor shapes. The tokenizer comes from the
        SentencePiece model ComfyUI embeds as a uint8 ``spiece_model`` tensor, unless
        ``tokenizer_dir`` names a tokenizer folder (needed for files without one)."""
        from transformers import UMT5EncoderModel

        path = Path(path)
        if path.is_dir():
            raise BerniniError(f"UMT5 text encoder '{path}' is a folder; from_single_file takes one .safetensors "
                               "file (use UMT5TextEncoder.from_pretrained for a text_encoder folder).")
        source = TensorSource.open(path)  # refuses pickles and non-safetensors files with a clear message
        fp8_format_of(source)  # rejects quantisations other than fp8 (nvfp4, int8, ...) before any work
        keys = source.keys()
        key_map = _umt5_key_map(keys, path)
        names = {key_map(k): k for k in keys if not _is_quant_side_key(k) and key_map(k) is not None}
        config = _umt5_config_from_shapes(names, source, path)

        if tokenizer_dir is not None:
            tokenizer = _tokenizer_from_folder(tokenizer_dir)
        else:
            tokenizer = _tokenizer_from_spiece(_embedded_spiece(keys, source, path), config.vocab_size, path)

        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        # transformers keeps `_keep_in_fp32_modules` ("wo") in fp32 for fp16 loads only; do the same so
        # this equals from_pretrained for every dtype.
        keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else ()

        def dtype_for(name: str) -> torch.dtype:
            return torch.float32 if any(part in keep_fp32 for part in name.split(".")) else dtype

        # One transformer block at a time (a weight and its scale share a block), so a ~11 GB file is never
        # held twice; fp8 goes to fp32 first and load_weights_ casts once, to the final dtype.
        groups = (dequantize_fp8_state(group, torch.float32) for group in _read_block_groups(source, keys))
        load_weights_(model, groups, key_map=key_map, dtype_for=dtype_for, device=device, origin=f"'{path}'")
        model.eval().requires_grad_(False)
        return cls(model, tokenizer)

    @property
    def module(self) -> torch.nn.Module:
        """The torch module, for offloading handles."""
        return self.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, text: str) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)``, each ``[1, max_length]``, with the
        official arguments (official ``bernini/pipeline.py`` ``_tokenize`` / ``_get_t5_text_ids``).
        A text longer than ``max_length`` tokens loses its tail, as in the official; one warning line says so."""
        with self._tokenizer_lock:
            full_length = len(self.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False).input_ids)
            out = self.tokenizer(
                text,
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                add_special_tokens=True,
                return_attention_mask=True,
                return_tensors="pt",
            )
        if full_length > self.max_length:
            log.warning("a text for UMT5 is %d tokens long; the text encoder keeps the first %d and drops the rest "
                        "(as the official does); the text ends with %r.", full_length, self.max_length, text[-60:])
        return out.input_ids, out.attention_mask

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> list[Tensor]:
        """One ``[L_i, d_model]`` tensor per text, cut to its true token count
        (EOS included). Texts are encoded one at a time, each padded to
        ``max_length``, as the official does: same GEMM shapes, same numerics,
        and no extra cost since every row is padded to 512 anyway."""
        if isinstance(texts, str):
            raise BerniniError("UMT5TextEncoder.encode expects a list of prompts, got a single string; "
                               "wrap it in a list.")
        device = self.device
        results = []
        for text in texts:
            ids, mask = self.tokenize(text)
            ids, mask = ids.to(device), mask.to(device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            length = min(int(mask.gt(0).sum()), self.max_length)
            results.append(hidden[0, :length])
        return results


# --------------------------------------------------------------------------- single files

# google/umt5-xxl's tokenizer = its 256,000-piece SentencePiece model + 300 sentinels <extra_id_299>..<extra_id_0>
# appended in that order (ids 256000..256299); the embedding has 256,384 rows.
_UMT5_EXTRA_IDS = 300
_UMT5_MAX_DISTANCE = 128  # relative_attention_max_distance: not visible in any tensor shape (docs/wan_qwen.md §3)
_FINAL_NORM = "encoder.final_layer_norm.weight"
_SPIECE_KEY = "spiece_model"
_GET_UMT5 = ("get umt5_xxl_fp16.safetensors or umt5_xxl_fp8_e4m3fn_scaled.safetensors from "
             "Comfy-Org/Wan_2.1_ComfyUI_repackaged (split_files/text_encoders) into models/text_encoders")
# Tensors that only qualify an fp8 weight (quant.py): consumed by dequantize_fp8_state, never model weights.
_QUANT_SIDE_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant")
# Original Wan names (wan/modules/t5.py) -> transformers names inside encoder.block.N (docs/wan_qwen.md §3).
_WAN_BLOCK_NAMES = {
    "attn.q.weight": "layer.0.SelfAttention.q.weight", "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight", "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm1.weight": "layer.0.layer_norm.weight", "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight", "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_WAN_GLOBAL_NAMES = {"token_embedding.weight": "shared.weight", "norm.weight": _FINAL_NORM}
_BLOCK_INDEX = re.compile(r"(?:^|\.)blocks?\.(\d+)\.")


def _is_quant_side_key(key: str) -> bool:
    return key == "scaled_fp8" or key.endswith(".scaled_fp8") or key.endswith(_QUANT_SIDE_SUFFIXES)


def _is_spiece_key(key: str) -> bool:
    return key == _SPIECE_KEY or key.endswith("." + _SPIECE_KEY)


def _umt5_key_map(keys: Sequence[str], path: Path):
    """Stored name -> transformers ``UMT5EncoderModel`` name (None: not an encoder weight), for either layout."""
    final = [k for k in keys if k == _FINAL_NORM or k.endswith("." + _FINAL_NORM)]
    if final:
        prefix = final[0][: -len(_FINAL_NORM)]  # "" for ComfyUI's files; e.g. "t5_text_encoder." in combined ones

        def hf_name(key: str):
            if not key.startswith(prefix) or _is_spiece_key(key):
                return None
            name = key[len(prefix):]
            if name.startswith(("decoder.", "lm_head.")):
                return None  # an encoder-decoder export: the decoder is not needed
            return name
        return hf_name
    if "token_embedding.weight" in keys and "blocks.0.attn.q.weight" in keys:
        def wan_name(key: str):
            if key in _WAN_GLOBAL_NAMES:
                return _WAN_GLOBAL_NAMES[key]
            head, _, rest = key.partition(".")
            index, _, leaf = rest.partition(".")
            if head == "blocks" and index.isdigit() and leaf in _WAN_BLOCK_NAMES:
                return f"encoder.block.{index}.{_WAN_BLOCK_NAMES[leaf]}"
            return None if _is_spiece_key(key) else key
        return wan_name
    first = ", ".join(sorted(k for k in keys if not _is_quant_side_key(k))[:5])
    raise BerniniError(f"'{path}' is not a UMT5 text encoder file (first keys: {first}); {_GET_UMT5}.")


def _umt5_config_from_shapes(names: dict, source: TensorSource, path: Path):
    """A transformers UMT5Config whose sizes are read off the checkpoint (so tiny files load too)."""
    from transformers import UMT5Config

    def shape(name: str) -> tuple:
        if name not in names:
            raise BerniniError(f"'{path}' lacks the UMT5 tensor '{name}'; the file is truncated or not a UMT5 "
                               f"encoder; {_GET_UMT5}.")
        return source.shape(names[name])

    attention = "encoder.block.{}.layer.0.SelfAttention."
    layers = len({int(n.split(".")[2]) for n in names if n.startswith("encoder.block.")})
    if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in names:
        raise BerniniError(f"'{path}' is an original T5 (non-gated feed-forward) encoder, not UMT5; {_GET_UMT5}.")
    if layers > 1 and attention.format(1) + "relative_attention_bias.weight" not in names:
        # T5 v1.1 / t5xxl (Flux, SD3) share one position-bias table; UMT5 has one per layer.
        raise BerniniError(f"'{path}' is a T5 encoder with a shared position bias (e.g. t5xxl for Flux / SD3), "
                           f"not UMT5-XXL, which Wan and Bernini use; {_GET_UMT5}.")
    vocab, d_model = shape("shared.weight")
    buckets, heads = shape(attention.format(0) + "relative_attention_bias.weight")
    inner = shape(attention.format(0) + "q.weight")[0]
    d_ff = shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0]
    if inner % heads:
        raise BerniniError(f"'{path}' has inconsistent attention shapes ({inner} features for {heads} heads).")
    return UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers,
                      num_decoder_layers=layers, num_heads=heads, relative_attention_num_buckets=buckets,
                      relative_attention_max_distance=_UMT5_MAX_DISTANCE, feed_forward_proj="gated-gelu",
                      layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def _read_block_groups(source: TensorSource, keys: Sequence[str]):
    """Yield the file's weights one block at a time (non-block tensors first), through one open handle."""
    from safetensors import safe_open

    groups: dict = {}
    for key in keys:
        if _is_spiece_key(key):
            continue
        match = _BLOCK_INDEX.search(key)
        groups.setdefault(int(match.group(1)) if match else -1, []).append(key)
    with safe_open(str(source.path), framework="pt", device="cpu") as handle:
        for index in sorted(groups):
            yield {key: handle.get_tensor(key) for key in groups[index]}


def _embedded_spiece(keys: Sequence[str], source: TensorSource, path: Path) -> bytes:
    found = [k for k in keys if _is_spiece_key(k)]
    if not found:
        raise BerniniError(
            f"'{path}' has no embedded tokenizer (the '{_SPIECE_KEY}' tensor ComfyUI stores). Either {_GET_UMT5} "
            "(they embed it), or pass tokenizer_dir=<a google/umt5-xxl tokenizer folder, e.g. the tokenizer/ "
            "folder of Wan-AI/Wan2.1-T2V-14B-Diffusers>.")
    tensor = source.get(found[0])
    if tensor.element_size() != 1:
        raise BerniniError(f"'{found[0]}' in '{path}' is not a byte tensor; the embedded tokenizer is corrupted.")
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def _tokenizer_from_spiece(model_bytes: bytes, vocab_size: int, path: Path):
    """google/umt5-xxl's tokenizer rebuilt from its SentencePiece model: T5 pieces, pad 0, EOS 1 appended, the
    300 sentinels after the pieces. ``legacy`` is set as the T5 family's historical default; it only changes
    text that directly follows a literal special token, and transformers 5 ignores it."""
    import tempfile

    import sentencepiece
    from transformers import T5TokenizerFast

    try:
        processor = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise BerniniError(f"The embedded tokenizer of '{path}' is not a valid SentencePiece model ({exc}); the "
                           f"file is corrupted, re-download it.") from None
    pieces = processor.get_piece_size()
    if processor.pad_id() != 0 or processor.eos_id() != 1 or pieces > vocab_size:
        raise BerniniError(f"The embedded tokenizer of '{path}' is not UMT5's (pad {processor.pad_id()}, eos "
                           f"{processor.eos_id()}, {pieces} pieces for {vocab_size} embedding rows); {_GET_UMT5}.")
    has_sentinels = processor.piece_to_id("<extra_id_0>") != processor.unk_id()
    extra_ids = _UMT5_EXTRA_IDS if not has_sentinels and vocab_size >= pieces + _UMT5_EXTRA_IDS else 0
    with tempfile.TemporaryDirectory(prefix="bernini_umt5_") as folder:
        (Path(folder) / "spiece.model").write_bytes(model_bytes)
        tokenizer = T5TokenizerFast.from_pretrained(
            folder, extra_ids=extra_ids, legacy=True, local_files_only=True,
            pad_token=processor.id_to_piece(0), eos_token=processor.id_to_piece(1),
            unk_token=processor.id_to_piece(processor.unk_id()))
    if tokenizer.pad_token_id != 0 or tokenizer.eos_token_id != 1:
        raise BerniniError(f"The embedded tokenizer of '{path}' maps pad/eos to {tokenizer.pad_token_id}/"
                           f"{tokenizer.eos_token_id} instead of 0/1; it is not UMT5's. {_GET_UMT5}.")
    return tokenizer


def _tokenizer_from_folder(tokenizer_dir):
    folder = Path(tokenizer_dir)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise BerniniError(f"tokenizer_dir '{folder}' holds no tokenizer.json / spiece.model; pass the "
                           "google/umt5-xxl tokenizer folder (in a Wan -Diffusers download: <model>/tokenizer).")
    return load_umt5_tokenizer(folder)


def pad_context(embeds: Sequence[Tensor], min_rows: int = 512) -> Tensor:
    """Stack ``[L_i, D]`` embeddings into ``[B, max(min_rows, max L_i), D]`` with
    zero rows after each one. Never truncates: full-Bernini contexts may exceed
    512 rows (docs/official_behaviour.md §3.7, §7.4)."""
    if len(embeds) == 0:
        raise BerniniError("pad_context needs at least one embedding.")
    dims = {e.shape[-1] for e in embeds}
    if any(e.dim() != 2 for e in embeds) or len(dims) != 1:
        raise BerniniError("pad_context expects 2-D [rows, dim] embeddings that share one width; got shapes "
                           f"{[tuple(e.shape) for e in embeds]}.")
    first = embeds[0]
    rows = max(int(min_rows), max(e.shape[0] for e in embeds))
    out = first.new_zeros(len(embeds), rows, first.shape[-1])
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
    return out
