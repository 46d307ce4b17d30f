"""UMT5 prompt encoding: the prompt strings the models were trained with, the
exact text UMT5 sees, and trimmed / zero-padded embeddings.

Two official code paths build the UMT5 input differently, and both are
reproduced here (spec bernini.md §3.7, §4.4; OFF: bernini/pipeline.py):

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
import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .errors import BerniniError

_WHITESPACE = re.compile(r"\s+")


# --------------------------------------------------------------------------- prompts

@lru_cache(maxsize=1)
def _prompt_table() -> dict:
    path = Path(__file__).resolve().parent / "data" / "bernini_prompts.json"
    return json.loads(path.read_text(encoding="utf-8"))


def prompt_clean(text: str) -> str:
    """Wan / Bernini prompt cleaning (wan_qwen.md §3): ftfy, HTML-unescape twice,
    collapse whitespace, strip."""
    import ftfy  # imported lazily: only needed when a prompt is encoded

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return _WHITESPACE.sub(" ", text).strip()


def renderer_system_prompt(task: str) -> str:
    """The UMT5 system-prompt prefix of a task; unknown tasks get "default"
    (OFF: prompt_enhancer.get_system_prompt_for_task)."""
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
    # OFF cli.resolve_system_prompt: an explicit, non-empty system prompt wins.
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


class UMT5TextEncoder:
    """A transformers ``UMT5EncoderModel`` plus its tokenizer, encoding prompts
    exactly as the official pipelines do."""

    def __init__(self, model, tokenizer, max_length: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    @classmethod
    def from_pretrained(cls, model_dir, tokenizer_dir=None, *, dtype=torch.bfloat16,
                        device="cpu") -> "UMT5TextEncoder":
        """Load a diffusers-style ``text_encoder`` folder (safetensors only, local
        files only). ``tokenizer_dir`` defaults to ``model_dir`` when it holds
        tokenizer files, else to its sibling ``tokenizer`` folder."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise BerniniError(f"UMT5 text encoder folder {str(model_dir)!r} does not exist; pass the "
                               "text_encoder folder of the checkpoint (config.json + *.safetensors).")
        if not any(model_dir.glob("*.safetensors")):
            raise BerniniError(f"UMT5 text encoder folder {str(model_dir)!r} holds no .safetensors weights; "
                               "only safetensors are loaded (convert .bin/.pth weights first).")
        tok_dir = _resolve_tokenizer_dir(model_dir, tokenizer_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        # Same loader and dtype as the official (renderer.py / bernini.py): in bf16
        # transformers keeps no fp32 islands (`_keep_in_fp32_modules` is fp16-only).
        model = UMT5EncoderModel.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True,
                                                 local_files_only=True)
        model.eval().requires_grad_(False)
        if torch.device(device) != torch.device("cpu"):
            model.to(device)
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
        official arguments (OFF: pipeline.py ``_tokenize`` / ``_get_t5_text_ids``)."""
        out = self.tokenizer(
            text,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
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


def pad_context(embeds: Sequence[Tensor], min_rows: int = 512) -> Tensor:
    """Stack ``[L_i, D]`` embeddings into ``[B, max(min_rows, max L_i), D]`` with
    zero rows after each one. Never truncates: full-Bernini contexts may exceed
    512 rows (spec §3.7, §11.4)."""
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
