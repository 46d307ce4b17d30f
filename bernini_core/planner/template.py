"""The planner chat template: token layout, token types, 4D mask, M-RoPE ids
(docs/official_behaviour.md §3.2–§3.4, §7.2).

One branch (cond / imgcond / uncond) is tokenised as

    <|im_start|>system\\n{system prompt}<|im_start|>user\\n{visual inputs}{text}<|im_start|>assistant\\n
    <|vision_start|>{target pads}<|vision_end|>

with no ``<|im_end|>`` anywhere, every message content stripped and empty messages skipped
(docs/official_behaviour.md §3.3, §7.2). Visual item ``i`` (0-based, sources in conversation order, the target last) is
written ``<|vision_start|>`` + ``pad_i`` × tokens + ``<|vision_end|>`` with the Bernini input /
output pad tokens; after tokenisation the pads become ``<|image_pad|>`` / ``<|video_pad|>``.
Dropped sources (imgcond, uncond) still consume their item number, so the target keeps
``pad_{n_sources}`` and segment id ``n_sources + 1`` in every branch, as the official counter does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..errors import BerniniError
from .branch import BRANCHES, EncodedBranch
from .rng import PlannerRng

IMAGE_PAD_ID = 151655  # hard-coded in the official template (docs/official_behaviour.md §7.2)
VIDEO_PAD_ID = 151656
MAX_VISUAL_ITEMS = 64  # 64 input + 64 output pad tokens (docs/official_behaviour.md §3.3): sources + target ≤ 64
VISUAL_INPUT_PADS = tuple(f"<|visual_input_token_pad_{i}|>" for i in range(MAX_VISUAL_ITEMS))
VISUAL_OUTPUT_PADS = tuple(f"<|visual_output_token_pad_{i}|>" for i in range(MAX_VISUAL_ITEMS))
VISION_START, VISION_END, IM_START = "<|vision_start|>", "<|vision_end|>", "<|im_start|>"

# Token types of docs/official_behaviour.md §3.3.
TEXT, PLANNING, VISUAL_INPUT, VISUAL_OUTPUT = 0, 1, 2, 3
_TARGET_VAE_CHANNELS = (16, 1, 2, 2)  # one packed target VAE token: 16 channels × patch (1, 2, 2)

_PROMPTS_FILE = Path(__file__).resolve().parent.parent / "data" / "bernini_prompts.json"


@lru_cache(maxsize=1)
def _planner_system_prompts() -> dict:
    prompts = json.loads(_PROMPTS_FILE.read_text(encoding="utf-8"))["planner_system_prompts"]
    return {k: v for k, v in prompts.items() if not k.startswith("_")}


def planner_system_prompt(task: str) -> str:
    """The system message of the planner template: one of its 7 task keys, else the default
    (so mv2v, ads2v, … use "You are a helpful assistant.", docs/official_behaviour.md §3.3)."""
    prompts = _planner_system_prompts()
    return prompts.get(task, prompts["default"])


@dataclass(frozen=True)
class VisualItem:
    """One image or video as the planner sees it: its Qwen patch grid before the 2×2 merge."""

    kind: str  # "image" | "video" (a target is "image" when num_frames == 1, else "video")
    grid_thw: tuple[int, int, int]

    def __post_init__(self):
        if self.kind not in ("image", "video"):
            raise ValueError(f"VisualItem kind must be 'image' or 'video', got {self.kind!r}")
        grid = tuple(int(v) for v in self.grid_thw)
        if len(grid) != 3 or min(grid) < 1 or grid[1] % 2 or grid[2] % 2:
            raise ValueError(f"grid_thw must be (t, h, w) with positive t and even h, w; got {self.grid_thw}")
        object.__setattr__(self, "grid_thw", grid)

    @property
    def n_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w // 4

    @property
    def pad_id(self) -> int:
        return IMAGE_PAD_ID if self.kind == "image" else VIDEO_PAD_ID


def attention_mask_4d(token_types: Tensor, segment_ids: Tensor) -> Tensor:
    """The additive ``[L, L]`` mask of docs/official_behaviour.md §3.3 (0 = attend, -inf = blocked): every query sees
    the earlier-or-same text / visual-input tokens causally; planning (1) and target (3)
    queries also see every token of their own type and segment, in both directions."""
    length = token_types.shape[0]
    q_type, k_type = token_types[:, None], token_types[None, :]
    same_segment = segment_ids[:, None] == segment_ids[None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril_()
    visible = causal & ((k_type == TEXT) | (k_type == VISUAL_INPUT))  # what any query may see
    for kind in (PLANNING, VISUAL_OUTPUT):
        visible |= (q_type == kind) & (k_type == kind) & same_segment
    return torch.zeros(length, length).masked_fill_(~visible, float("-inf"))


def mrope_position_ids(input_ids: Tensor, image_grids: Sequence[Sequence[int]], video_grids: Sequence[Sequence[int]],
                       *, spatial_merge_size: int = 2, tokens_per_second: float = 2) -> Tensor:
    """``[3, L]`` M-RoPE ids (t, h, w) as ``Qwen2_5_VLModel.get_rope_index`` of transformers
    4.57.3 (the version the official pins, docs/official_behaviour.md §2.1) computes them with no
    ``second_per_grid_ts``:

    text runs count up by one on all three axes from the running start; each image / video
    run (its grid taken in order of appearance per kind) gets start + (t·interval, row, col)
    with interval = ``tokens_per_second`` for videos and 0 for images; the text after it
    resumes at the largest id of the run + 1.

    transformers 5.x resumes at start + max(rows, cols) instead, which differs whenever a
    video's last temporal id reaches its spatial extent (an 81-frame 512×512 video: grid
    (5, 8, 8) → the text after it starts at start + 9 in 4.57, start + 8 in 5.x; likewise any
    video of 14+ ViT frames at 480p), so the installed library is not called here; the tests
    compare this function with the library and with a transcription of the 4.57 rule."""
    ids = input_ids.tolist()
    grids = {IMAGE_PAD_ID: iter(image_grids), VIDEO_PAD_ID: iter(video_grids)}
    chunks, start, next_pos, length = [], 0, 0, len(ids)
    while True:
        ed = next((i for i in range(start, length) if ids[i] in grids), None)
        if ed is None:
            break
        kind = ids[ed]
        try:
            t, h, w = (int(v) for v in next(grids[kind]))
        except StopIteration:
            raise ValueError(f"more {'image' if kind == IMAGE_PAD_ID else 'video'} runs than grids") from None
        h, w = h // spatial_merge_size, w // spatial_merge_size
        text_len = ed - start
        chunks.append(torch.arange(text_len).expand(3, -1) + next_pos)
        interval = tokens_per_second if kind == VIDEO_PAD_ID else 0
        t_ids = (torch.arange(t) * (1.0 * interval)).long()  # 4.57: float multiply, then truncation
        grid = torch.stack(torch.meshgrid(t_ids, torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1)
        vision = grid + text_len + next_pos
        chunks.append(vision)
        next_pos = int(vision.max()) + 1
        start = ed + t * h * w
    chunks.append(torch.arange(length - start).expand(3, -1) + next_pos)
    return torch.cat(chunks, dim=1).long()


class PlannerTemplate:
    """Encodes planner branches with the Qwen tokenizer of ``mllm/``.

    ``spatial_merge_size`` and ``tokens_per_second`` come from the mllm config's
    ``vision_config`` (2 and 2 for Qwen2.5-VL-7B)."""

    def __init__(self, tokenizer, *, spatial_merge_size: int = 2, tokens_per_second: float = 2):
        self.tokenizer = tokenizer
        self.spatial_merge_size = int(spatial_merge_size)
        self.tokens_per_second = tokens_per_second
        vocab = tokenizer.get_vocab()  # a fresh dict per call (151k entries): fetch it once
        missing = [p for p in VISUAL_INPUT_PADS + VISUAL_OUTPUT_PADS if p not in vocab]
        if missing:
            # The official template registers the 128 pads as special tokens; ids follow the vocabulary.
            from tokenizers import AddedToken

            tokenizer.add_tokens([AddedToken(p, special=True, normalized=False) for p in missing],
                                 special_tokens=True)
            vocab = tokenizer.get_vocab()
        for name in (VISION_START, VISION_END, IM_START):
            if name not in vocab:
                raise BerniniError(f"the planner tokenizer (mllm/) has no {name} token; point the planner at the "
                                   "Bernini-Diffusers mllm/ folder (a Qwen2.5-VL tokenizer).")
        self._input_pad_ids = [vocab[p] for p in VISUAL_INPUT_PADS]
        self._output_pad_ids = [vocab[p] for p in VISUAL_OUTPUT_PADS]

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_branch(self, name: str, *, task: str, text: str, visual_inputs: Sequence[VisualItem],
                      target: VisualItem, visual_features: Sequence[Tensor] = ()) -> EncodedBranch:
        """Tokenise one branch (docs/official_behaviour.md §3.4): ``cond`` keeps the sources, ``imgcond`` drops them,
        ``uncond`` drops them and takes ``text`` = the negative prompt, used only when longer
        than one character (the official ``len(neg_prompt) > 1``), else no text at all.

        ``visual_inputs`` are the sources in conversation order (videos first, then images);
        ``visual_features`` their ViT features ``[n_tokens_i, hidden]`` (cond only; may be empty
        when only the layout is wanted)."""
        if name not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {name!r}")
        sources = list(visual_inputs)
        kinds = [item.kind for item in sources]
        if kinds != sorted(kinds, key=lambda k: k != "video"):
            raise ValueError("visual_inputs must list the source videos before the source images "
                             "(docs/official_behaviour.md §3.2)")
        if len(sources) + 1 > MAX_VISUAL_ITEMS:
            raise BerniniError(f"{len(sources)} source images/videos were given; the planner template holds at most "
                               f"{MAX_VISUAL_ITEMS - 1} (plus the target). Pass fewer reference images.")
        keep_sources = name == "cond"
        features = list(visual_features) if keep_sources else []
        if features:
            if len(features) != len(sources):
                raise ValueError(f"{len(features)} feature tensors for {len(sources)} visual inputs")
            for i, (item, feat) in enumerate(zip(sources, features)):
                if feat.shape[0] != item.n_tokens:
                    raise ValueError(f"visual input {i}: {feat.shape[0]} feature rows, its grid needs {item.n_tokens}")
        if name == "uncond" and len(text) <= 1:
            text = ""

        user = "".join(VISION_START + VISUAL_INPUT_PADS[i] * item.n_tokens + VISION_END
                       for i, item in enumerate(sources) if keep_sources) + text
        target_index = len(sources)  # dropped sources still take their item numbers
        assistant = VISION_START + VISUAL_OUTPUT_PADS[target_index] * target.n_tokens + VISION_END
        ids: list[int] = []
        for role, content in (("system", planner_system_prompt(task)), ("user", user), ("assistant", assistant)):
            content = content.strip()
            if content:  # role header and content are tokenised separately, as the official does
                ids += self._encode(f"{IM_START}{role}\n") + self._encode(content)

        input_ids = torch.tensor(ids, dtype=torch.long)
        length = input_ids.shape[0]
        token_types = torch.zeros(length, dtype=torch.long)
        segment_ids = torch.arange(length, dtype=torch.long)
        placed = [(i, item, self._input_pad_ids[i], VISUAL_INPUT) for i, item in enumerate(sources) if keep_sources]
        placed.append((target_index, target, self._output_pad_ids[target_index], VISUAL_OUTPUT))
        for index, item, pad, token_type in placed:
            where = input_ids == pad
            if int(where.sum()) != item.n_tokens:
                raise BerniniError("the planner tokenizer split the Bernini visual pad tokens; use the mllm/ "
                                   "tokenizer of Bernini-Diffusers (it must treat them as special tokens).")
            token_types[where] = token_type
            segment_ids[where] = index + 1
            input_ids[where] = item.pad_id

        in_order = [item for _, item, _, _ in placed]
        position_ids = mrope_position_ids(
            input_ids,
            [item.grid_thw for item in in_order if item.kind == "image"],
            [item.grid_thw for item in in_order if item.kind == "video"],
            spatial_merge_size=self.spatial_merge_size, tokens_per_second=self.tokens_per_second)
        return EncodedBranch(
            name=name,
            input_ids=input_ids,
            token_types=token_types,
            segment_ids=segment_ids,
            visual_input_mask=token_types == VISUAL_INPUT,
            visual_output_mask=token_types == VISUAL_OUTPUT,
            attention_mask_4d=attention_mask_4d(token_types, segment_ids),
            position_ids=position_ids,
            visual_inputs=features,
        )

    @staticmethod
    def random_draws(n_target_vit_tokens: int, n_target_vae_tokens: int, rng: PlannerRng) -> None:
        """Advance the planner's streams exactly as one official branch encoding advances the global ones
        (docs/official_behaviour.md §7.1 item 1); nothing drawn here affects the output. In order:

        1. three ``random.random()`` (the text / image / video dropout decisions);
        2. ``np.random.shuffle(list(range(n_target_vit_tokens)))`` (the training-time target
           mask order);
        3. ``torch.randn([n_target_vae_tokens, 16, 1, 2, 2])`` in float32 on the CPU generator (the noise of the
           packed target VAE latent, multiplied by σ = 0).

        ``rng`` (bernini_core/planner/rng.py) stands in for the official global generators. Call it once per
        branch, in the order cond, imgcond, uncond, right after seeding."""
        for _ in range(3):
            rng.python.random()
        rng.numpy.shuffle(list(range(int(n_target_vit_tokens))))
        torch.randn(int(n_target_vae_tokens), *_TARGET_VAE_CHANNELS, dtype=torch.float32, generator=rng.torch)
