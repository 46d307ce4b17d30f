"""The local backend: the same conversation answered by a Qwen2.5-VL on this machine with transformers' ``generate``
— the full-Bernini planner's own model (its language-model head ships in the checkpoint), or any Qwen2.5-VL folder
(docs/prompt_enhancer.md §5). Nothing here touches the network.

The pictures are real vision inputs: each goes through the planner's vision preprocessing
(``planner.vision.preprocess_image_for_vit``: the Qwen2.5-VL processor's rule with the planner's pixel bounds) and
stands in the text as ``<|vision_start|>`` + one ``<|image_pad|>`` per merged patch + ``<|vision_end|>``, as
transformers' Qwen2.5-VL processor lays it out. The conversation is rendered by transformers' chat-template engine
with the folder's own Qwen2.5-VL template, or ``QWEN_VL_CHAT_TEMPLATE`` (the same layout) when the folder has none.

Weights move only through the runtime: the planner's model is loaded under the same handle name the planning stage
uses ("planner"), so inside ComfyUI it is the planner's own ModelPatcher; an untied head is one more handle.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import BerniniError
from ..runtime import Runtime, resolve_dtype
from .templates import EnhanceRequest

log = logging.getLogger("bernini.prompt_enhancer")

DEFAULT_MAX_NEW_TOKENS = 1024
IMAGE_PAD = "<|image_pad|>"
CHAT_ENDS = ("<|im_end|>", "<|endoftext|>")  # Qwen's end-of-turn and end-of-text tokens stop the generation
_CACHE_ATTR = "_bernini_pe_generator"  # the generation wrapper of a planner model, kept on the model itself

# Qwen2.5-VL's chat layout, written for transformers' chat-template engine (trim_blocks / lstrip_blocks): each turn is
# <|im_start|>role\n ... <|im_end|>\n (a system turn "You are a helpful assistant." when the first is not one), an
# image part is <|vision_start|><|image_pad|><|vision_end|>, and the generation prompt is <|im_start|>assistant\n.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ---------------------------------------------------------------------------- the model
@dataclass(eq=False)
class QwenGenerator:
    """A Qwen2.5-VL that can generate text. ``model`` is a transformers ``Qwen2_5_VLForConditionalGeneration``;
    ``owner`` the module whose runtime handle holds its weights (the planner model, or ``model`` itself) under
    ``handle_name``; ``head`` an lm_head outside ``owner`` (the planner's untied head), else None."""

    model: nn.Module
    tokenizer: Any
    vit_processor: Any
    chat_template: str
    owner: nn.Module
    handle_name: str
    head: Optional[nn.Module] = None

    def handles(self, runtime) -> list:
        handles = [runtime.handle(self.handle_name, self.owner)]
        if self.head is not None:
            handles.append(runtime.handle("planner_lm_head", self.head))
        return handles


def _is_vl_template(template) -> bool:
    return isinstance(template, str) and "image" in template and "im_start" in template


def chat_template_for(tokenizer, folder=None) -> str:
    """The folder's Qwen2.5-VL chat template (the tokenizer's, else the processor's chat_template.json / .jinja),
    else QWEN_VL_CHAT_TEMPLATE. A text-only template (no image parts) is not used: it cannot place the pictures."""
    template = getattr(tokenizer, "chat_template", None)
    if _is_vl_template(template):
        return template
    if folder is not None:
        folder = Path(folder)
        candidates = [(folder / "chat_template.jinja", None), (folder / "chat_template.json", "chat_template")]
        for path, key in candidates:
            if path.is_file():
                try:
                    text = path.read_text(encoding="utf-8")
                    text = json.loads(text).get(key) if key else text
                except (OSError, ValueError, AttributeError):
                    continue
                if _is_vl_template(text):
                    return text
    return QWEN_VL_CHAT_TEMPLATE


def _generation_wrapper(mllm: nn.Module, head: nn.Module) -> nn.Module:
    """A ``Qwen2_5_VLForConditionalGeneration`` around an existing ``Qwen2_5_VLModel`` and head, sharing their
    weights (built on the meta device, then given the real modules: no copy)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        wrapper = Qwen2_5_VLForConditionalGeneration._from_config(mllm.config)
    wrapper.model = mllm
    wrapper.lm_head = head
    return wrapper.eval().requires_grad_(False)


def _tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def _planner_head(mllm: nn.Module, folder) -> tuple[nn.Module, bool]:
    """(lm_head, whether it is a module of its own). A tied head is the embedding matrix itself; an untied one is read
    from ``mllm.lm_head.weight`` of the combined checkpoint in ``folder`` (the planner load leaves it out)."""
    embed = mllm.get_input_embeddings()
    vocab, hidden = embed.weight.shape
    head = nn.Linear(1, 1, bias=False, device="meta")
    if _tied(mllm.config):
        head.weight = embed.weight  # the same Parameter: it moves with the planner
        return head, False
    if folder is None:
        raise BerniniError("prompt enhancer (local backend): this planner's Qwen2.5-VL has its own lm_head "
                           "(tie_word_embeddings false), which loading the planner leaves out; pass the "
                           "Bernini-Diffusers folder it was loaded from (folder=...) so the head can be read.")
    from ..loaders_full import BerniniConfig, component_paths, split_combined_checkpoint

    folder = Path(folder)
    checkpoint = component_paths(BerniniConfig.from_dir(folder), folder).checkpoint
    source = split_combined_checkpoint(checkpoint)["planner_mllm"]
    if "lm_head.weight" not in source:
        raise BerniniError(f"prompt enhancer (local backend): the combined checkpoint of '{folder}' has no "
                           "'mllm.lm_head.weight'; the download is incomplete or the checkpoint is not a full-Bernini "
                           "one. Re-download it, or use the openai backend.")
    shape = tuple(source.shape("lm_head.weight"))
    if shape != (vocab, hidden):
        raise BerniniError(f"prompt enhancer (local backend): 'mllm.lm_head.weight' in '{folder}' has shape "
                           f"{list(shape)} but the planner's vocabulary × hidden size is {[vocab, hidden]}; the folder "
                           "is not the one the planner was loaded from.")
    head.weight = nn.Parameter(source.get("lm_head.weight").to(embed.weight.dtype), requires_grad=False)
    return head, True


def generator_from_planner(planner_model: nn.Module, tokenizer, vit_processor, folder=None) -> QwenGenerator:
    """The planner's Qwen2.5-VL as a generator (made once per planner model and kept on it)."""
    cached = planner_model.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached.tokenizer is tokenizer and cached.vit_processor is vit_processor:
        return cached
    mllm = planner_model.mllm
    head, own_head = _planner_head(mllm, folder)
    processor_dir = None
    if folder is not None:
        from ..loaders_full import BerniniConfig, component_paths

        processor_dir = component_paths(BerniniConfig.from_dir(Path(folder)), Path(folder)).processor
    generator = QwenGenerator(model=_generation_wrapper(mllm, head), tokenizer=tokenizer, vit_processor=vit_processor,
                              chat_template=chat_template_for(tokenizer, processor_dir), owner=planner_model,
                              handle_name="planner", head=head if own_head else None)
    planner_model.__dict__[_CACHE_ATTR] = generator  # a plain attribute: not a submodule, not in the state dict
    return generator


def load_generator(folder, dtype="bf16") -> QwenGenerator:
    """A Qwen2.5-VL from ``folder``, head included, on the CPU in ``dtype``: a Bernini-Diffusers(-v2) folder (only
    the ``mllm.`` tensors of its combined checkpoint are read, not the rest of the planner) or a Qwen2.5-VL folder
    (config.json model_type "qwen2_5_vl", safetensors weights)."""
    folder = Path(folder)
    dtype = resolve_dtype(dtype)
    check_local_folder(folder)  # before transformers is even imported
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from ..checkpoints import TensorSource, load_weights_
    from ..loaders_full import (BerniniConfig, check_mllm_config, component_paths, is_full_bernini_dir, load_processor,
                                parameters_on_meta, qwen_key_map, split_combined_checkpoint)
    from ..planner.vision import load_vit_processor

    if is_full_bernini_dir(folder):
        paths = component_paths(BerniniConfig.from_dir(folder), folder)
        mllm_dir, processor_dir = paths.mllm, paths.processor
        source = split_combined_checkpoint(paths.checkpoint)["planner_mllm"]
        origin = f"{paths.checkpoint} (mllm.*)"
    else:
        mllm_dir = processor_dir = folder
        source = TensorSource.open(folder)
        origin = str(folder)
    check_mllm_config(mllm_dir, source)
    config = AutoConfig.from_pretrained(str(mllm_dir), local_files_only=True)
    with parameters_on_meta():  # weights on meta, buffers (rotary tables) real
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    model = model.to(dtype)
    tied = _tied(config)
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    load_weights_(model, source, dtype_for=lambda name: dtype,
                  key_map=qwen_key_map(model.state_dict(keep_vars=True).keys(), tied_lm_head=tied), origin=origin)
    unloaded = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if unloaded:
        raise BerniniError(f"prompt enhancer (local backend): '{folder}' lacks weights for {unloaded[:3]}; it is not a "
                           "complete Qwen2.5-VL checkpoint.")
    model = model.eval().requires_grad_(False)
    tokenizer = getattr(load_processor(processor_dir), "tokenizer", None)
    return QwenGenerator(model=model, tokenizer=tokenizer, vit_processor=load_vit_processor(processor_dir),
                         chat_template=chat_template_for(tokenizer, processor_dir), owner=model,
                         handle_name="prompt_enhancer")


def check_local_folder(folder) -> None:
    """A folder the local backend can load: a Bernini-Diffusers(-v2) folder or a Qwen2.5-VL one (before any load)."""
    from ..checkpoints import read_json
    from ..loaders_full import is_full_bernini_dir

    folder = Path(folder)
    if not folder.is_dir():
        raise BerniniError(f"prompt enhancer (local backend): model folder '{folder}' "
                           f"{'is a file' if folder.exists() else 'does not exist'}; give a Bernini-Diffusers(-v2) "
                           "folder or a Qwen2.5-VL folder (e.g. Qwen2.5-VL-7B-Instruct).")
    if is_full_bernini_dir(folder):
        return
    if not (folder / "config.json").is_file():
        raise BerniniError(f"prompt enhancer (local backend): '{folder}' has no config.json; give a Bernini-Diffusers"
                           "(-v2) folder or a Qwen2.5-VL folder.")
    model_type = read_json(folder / "config.json").get("model_type")
    if model_type != "qwen2_5_vl":
        raise BerniniError(f"prompt enhancer (local backend): '{folder}' holds a {model_type!r} model, neither "
                           "Bernini-Diffusers nor Qwen2.5-VL (model_type 'qwen2_5_vl'); the local backend runs "
                           "Qwen2.5-VL only.")


# ---------------------------------------------------------------------------- the backend
class _Steps:
    """A stopping criterion that never stops: it reports each generated token and lets an interrupt through."""

    def __init__(self, runtime, total: int, start: int):
        self.runtime, self.total, self.start = runtime, total, start

    def __call__(self, input_ids, scores, **kwargs):
        self.runtime.check_interrupt()
        self.runtime.progress("enhance", min(int(input_ids.shape[-1]) - self.start, self.total), self.total)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _stopping_list(criterion):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Steps(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return criterion(input_ids, scores, **kwargs)

    return StoppingCriteriaList([Steps()])


class LocalBackend:
    """Answers an EnhanceRequest with a local Qwen2.5-VL: greedy by default (the same answer every time);
    ``seed`` samples instead (temperature / top_p, repeatable for one seed); at most ``max_new_tokens`` tokens."""

    name = "local"

    def __init__(self, generator: QwenGenerator, runtime: Optional[Runtime] = None, *,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, seed: Optional[int] = None, temperature: float = 0.7,
                 top_p: float = 0.9, repetition_penalty: float = 1.05):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise BerniniError(f"prompt enhancer: max_new_tokens {max_new_tokens!r} must be a whole number of at "
                               "least 1.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64):
            raise BerniniError(f"prompt enhancer: seed {seed!r} must be None (greedy) or a whole number in "
                               "0..2^64-1.")
        for name, value, low in (("temperature", temperature, 0.0), ("top_p", top_p, 0.0),
                                 ("repetition_penalty", repetition_penalty, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low or value != value:
                raise BerniniError(f"prompt enhancer: {name} {value!r} must be a number above {low:g}.")
        if top_p > 1:
            raise BerniniError(f"prompt enhancer: top_p {top_p} must be at most 1.")
        self.generator = generator
        self.runtime = runtime if runtime is not None else Runtime("auto")
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.temperature, self.top_p, self.repetition_penalty = float(temperature), float(top_p), \
            float(repetition_penalty)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_planner(cls, planner, runtime: Optional[Runtime] = None, folder=None, **options) -> "LocalBackend":
        """The planner's Qwen2.5-VL: ``planner`` is a full-Bernini pipeline (its loaded planner and runtime), a
        ``pipeline_full.PlannerBundle`` or the ComfyUI node's ``PlannerModel``. ``folder``: the Bernini-Diffusers
        folder it came from, needed only when its lm_head is untied (the release's 7B is)."""
        bundle = getattr(planner, "bundle", None) or planner
        if hasattr(planner, "planner") and hasattr(planner, "runtime"):  # a FullPipeline
            bundle = planner.planner
            runtime = runtime if runtime is not None else planner.runtime
            if bundle is None:
                raise BerniniError("prompt enhancer (local backend): this full-Bernini pipeline was loaded without "
                                   "its planner; load it with the planner part, or use the openai backend.")
        model = getattr(bundle, "model", None)
        template = getattr(bundle, "template", None)
        if model is None or not hasattr(model, "mllm") or template is None:
            raise BerniniError(f"prompt enhancer (local backend): planner must be a full-Bernini planner (Load Bernini "
                               f"Planner, or a Bernini-Diffusers pipeline), got {type(planner).__name__}.")
        generator = generator_from_planner(model, template.tokenizer, bundle.vit_processor, folder)
        return cls(generator, runtime, **options)

    @classmethod
    def from_folder(cls, folder, *, device="auto", dtype="bf16", offload: bool = True,
                    runtime: Optional[Runtime] = None, **options) -> "LocalBackend":
        """A Qwen2.5-VL loaded from ``folder`` (see load_generator), run on ``device`` (or the given runtime)."""
        check_local_folder(folder)
        runtime = runtime if runtime is not None else Runtime(device, offload=offload)
        return cls(load_generator(folder, dtype), runtime, **options)

    def describe(self) -> str:
        how = "greedy" if self.seed is None else f"sampling, seed {self.seed}"
        return f"local Qwen2.5-VL ({how}, at most {self.max_new_tokens} new tokens)"

    # ------------------------------------------------------------------ inputs
    def chat_messages(self, request: EnhanceRequest) -> list[dict]:
        """The endpoint's conversation with the pictures as image parts (the same text parts, in the same order)."""
        content = [{"type": "text", "text": self._clean(request.user_text)}]
        for index in range(len(request.images)):
            content.append({"type": "text", "text": f"\n[Image {index}]:"})
            content.append({"type": "image"})
        return [{"role": "system", "content": self._clean(request.system)}, {"role": "user", "content": content}]

    def _clean(self, text: str) -> str:
        """Text without the tokenizer's special tokens: a prompt holding "<|im_end|>" or "<|image_pad|>" would
        otherwise end the turn or claim a picture."""
        tokenizer = self.generator.tokenizer
        specials = set(getattr(tokenizer, "all_special_tokens", ()) or ()) | {IMAGE_PAD, *CHAT_ENDS,
                                                                            "<|im_start|>", "<|vision_start|>",
                                                                            "<|vision_end|>", "<|video_pad|>"}
        for token in sorted(specials, key=len, reverse=True):
            if token:
                text = text.replace(token, "")
        return text

    def model_inputs(self, request: EnhanceRequest) -> dict:
        """What ``generate`` receives: input_ids / attention_mask [1, L] of the rendered chat (each image pad
        repeated once per merged patch, as the Qwen2.5-VL processor expands it), pixel_values and image_grid_thw of
        the pictures, and mm_token_type_ids where the installed transformers takes them (5.x)."""
        from ..planner.vision import preprocess_image_for_vit

        gen = self.generator
        text = gen.tokenizer.apply_chat_template(self.chat_messages(request), chat_template=gen.chat_template,
                                                 tokenize=False, add_generation_prompt=True)
        pieces = text.split(IMAGE_PAD)
        if len(pieces) - 1 != len(request.images):
            raise BerniniError(f"prompt enhancer (local backend): the chat template placed {len(pieces) - 1} image(s) "
                               f"for {len(request.images)} picture(s); the folder's chat template is not a Qwen2.5-VL "
                               "one.")
        pixels, grids = [], []
        merge = int(getattr(gen.model.config.vision_config, "spatial_merge_size", 2))
        expanded = pieces[0]
        for picture, piece in zip(request.images, pieces[1:]):
            values, grid = preprocess_image_for_vit(gen.vit_processor, picture)
            pixels.append(values)
            grids.append(list(grid))
            expanded += IMAGE_PAD * (grid[0] * grid[1] * grid[2] // (merge * merge)) + piece
        input_ids = gen.tokenizer(expanded, return_tensors="pt")["input_ids"]
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels)
            inputs["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
            if "mm_token_type_ids" in inspect.signature(gen.model.forward).parameters:
                image_id = gen.model.config.image_token_id
                inputs["mm_token_type_ids"] = (input_ids == image_id).to(torch.int32)
        return inputs

    def generation_config(self):
        from transformers import GenerationConfig

        tokenizer = self.generator.tokenizer
        ends = [tokenizer.convert_tokens_to_ids(t) for t in CHAT_ENDS]
        ends = [i for i in ends if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id] or \
            [self.generator.model.config.eos_token_id]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[-1]
        options = dict(max_new_tokens=self.max_new_tokens, eos_token_id=ends, pad_token_id=pad,
                       repetition_penalty=self.repetition_penalty)
        if self.seed is None:
            return GenerationConfig(do_sample=False, **options)
        return GenerationConfig(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0, **options)

    # ------------------------------------------------------------------ answering
    def chat(self, request: EnhanceRequest) -> str:
        gen = self.generator
        inputs = self.model_inputs(request)
        config = self.generation_config()
        log.info("prompt enhancer: %s, %d prompt tokens, %d picture(s)", self.describe(),
                 int(inputs["input_ids"].shape[-1]), len(request.images))
        inner = gen.model.model
        with self.runtime.use(*gen.handles(self.runtime)) as modules:
            device = next(modules[0].parameters()).device
            inputs = {k: v.to(device) for k, v in inputs.items()}
            start = int(inputs["input_ids"].shape[-1])
            stopping = _stopping_list(_Steps(self.runtime, self.max_new_tokens, start))
            try:
                with torch.inference_mode(), _seeded(self.seed, device):
                    output = gen.model.generate(**inputs, generation_config=config, stopping_criteria=stopping)
            finally:
                if hasattr(inner, "rope_deltas"):
                    inner.rope_deltas = None  # generate's M-RoPE offset: not left on a shared planner model
        return gen.tokenizer.decode(output[0, start:].cpu(), skip_special_tokens=True)


class _seeded:
    """Sampling from ``seed`` on generators forked for this call: the caller's global RNG state is restored after.
    Greedy decoding (no seed) draws nothing."""

    def __init__(self, seed: Optional[int], device: torch.device):
        self.seed, self.device = seed, device
        self._fork = None

    def __enter__(self):
        if self.seed is None:
            return self
        devices = [self.device] if self.device.type == "cuda" else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        torch.manual_seed(self.seed)
        return self

    def __exit__(self, *exc):
        if self._fork is not None:
            return self._fork.__exit__(*exc)
        return False
