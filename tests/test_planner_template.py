"""Planner chat template (bernini_core.planner.template) and the tiny Qwen2.5-VL assets
(planner/tiny_mllm.py): token layout per task, token types / segments, the docs/official_behaviour.md §3.3 mask, M-RoPE
ids against transformers, the docs/official_behaviour.md §7.1 RNG draws, and offline loading of the assets."""

import inspect
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from bernini_core.errors import BerniniError  # noqa: E402
from bernini_core.planner.rng import PlannerRng  # noqa: E402
from bernini_core.planner.template import (  # noqa: E402
    PlannerTemplate,
    VisualItem,
    attention_mask_4d,
    mrope_position_ids,
    planner_system_prompt,
)
from bernini_core.planner.tiny_mllm import tiny_qwen_config, write_tiny_mllm_assets  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLModel  # noqa: E402

IM_START, VISION_START, VISION_END, IM_END = 151644, 151652, 151653, 151645
IMAGE_PAD, VIDEO_PAD = 151655, 151656
SYSTEM_PROMPTS = {  # docs/official_behaviour.md §3.3 (the seven planner keys)
    "t2i": "You are a helpful assistant specialized in text-to-image generation.",
    "t2v": "You are a helpful assistant specialized in text-to-video generation.",
    "i2i": "You are a helpful assistant specialized in image editing.",
    "v2v": "You are a helpful assistant specialized in video editing.",
    "r2v": "You are a helpful assistant specialized in subject-to-video generation.",
    "rv2v": "You are a helpful assistant specialized in video editing with reference.",
}
DEFAULT_PROMPT = "You are a helpful assistant."


def image(t, h, w):
    return VisualItem("image", (t, h, w))


def video(t, h, w):
    return VisualItem("video", (t, h, w))


# (sources in conversation order, target) per task; realistic grids (docs/official_behaviour.md §3.2 examples).
TASK_CASES = {
    "t2i": ([], image(1, 16, 16)),
    "i2i": ([image(1, 12, 20)], image(1, 16, 16)),
    "t2v": ([], video(5, 12, 20)),
    "v2v": ([video(5, 12, 20)], video(5, 12, 20)),
    "rv2v": ([video(5, 12, 20), image(1, 16, 16), image(1, 12, 20)], video(5, 12, 20)),
    "r2v": ([image(1, 16, 16), image(1, 12, 20), image(1, 8, 10)], video(5, 12, 20)),
    "ads2v": ([video(5, 12, 20), video(4, 16, 16)], video(5, 12, 20)),
}


@pytest.fixture(scope="module")
def mllm_dir(tmp_path_factory):
    return write_tiny_mllm_assets(tmp_path_factory.mktemp("tiny") / "mllm", seed=0)


@pytest.fixture(scope="module")
def tokenizer(mllm_dir):
    return AutoTokenizer.from_pretrained(str(mllm_dir))


@pytest.fixture(scope="module")
def template(tokenizer):
    return PlannerTemplate(tokenizer)


@pytest.fixture(scope="module")
def qwen_model(mllm_dir):
    return Qwen2_5_VLModel(AutoConfig.from_pretrained(str(mllm_dir))).eval()


def text_ids(s):
    # The tiny vocabulary is the byte-level alphabet in byte order with no merges: id == byte.
    return list(s.encode("utf-8"))


def expected_ids(task, text, sources, target, keep_sources):
    """The docs/official_behaviour.md §7.2 layout written out by hand."""
    ids = [IM_START] + text_ids("system\n") + text_ids(SYSTEM_PROMPTS.get(task, DEFAULT_PROMPT))
    user = []
    if keep_sources:
        for item in sources:
            user += [VISION_START] + [item.pad_id] * item.n_tokens + [VISION_END]
    user_text = text if user else text.strip()  # message content is stripped as a whole
    user += text_ids(user_text.rstrip())
    if user:
        ids += [IM_START] + text_ids("user\n") + user
    ids += [IM_START] + text_ids("assistant\n") + [VISION_START] + [target.pad_id] * target.n_tokens + [VISION_END]
    return ids


# --------------------------------------------------------------------------- assets

def test_tiny_assets_load_offline(mllm_dir, tokenizer):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    real_ids = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
    for token, token_id in real_ids.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    pads = [f"<|visual_input_token_pad_{i}|>" for i in range(64)] + \
        [f"<|visual_output_token_pad_{i}|>" for i in range(64)]
    pad_ids = tokenizer.convert_tokens_to_ids(pads)
    assert min(pad_ids) > 151656 and len(set(pad_ids)) == 128
    assert tokenizer.encode("a<|visual_output_token_pad_5|>b", add_special_tokens=False) == \
        [97, pad_ids[64 + 5], 98]

    config = AutoConfig.from_pretrained(str(mllm_dir))
    assert isinstance(config, Qwen2_5_VLConfig)
    assert (config.image_token_id, config.video_token_id, config.vision_start_token_id) == (151655, 151656, 151652)
    assert config.text_config.vocab_size > max(pad_ids)
    vision = config.vision_config
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size, vision.window_size,
            vision.out_hidden_size) == (14, 2, 2, 112, config.text_config.hidden_size)
    assert sum(tiny_qwen_config()["text_config"]["rope_scaling"]["mrope_section"]) * 2 == \
        config.text_config.hidden_size // config.text_config.num_attention_heads

    from transformers import AutoImageProcessor

    image_processor = AutoImageProcessor.from_pretrained(str(mllm_dir))
    assert image_processor.patch_size == 14 and image_processor.merge_size == 2
    try:
        import torchvision  # noqa: F401
    except Exception:
        return  # transformers' video processor (and so AutoProcessor) needs torchvision
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(mllm_dir))
    assert processor.tokenizer.convert_tokens_to_ids("<|video_pad|>") == 151656


def test_template_registers_missing_pads(mllm_dir, tmp_path, template):
    """A plain Qwen tokenizer (no Bernini pads, like Qwen2.5-VL-7B's) gets the 128 pads
    appended as special tokens; the encoded branch is the same once pads are replaced."""
    import json
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(mllm_dir, plain)
    data = json.loads((plain / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if "visual_" not in t["content"]]
    (plain / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items()
                                      if "visual_" not in v["content"]}
    config["additional_special_tokens"] = [t for t in config["additional_special_tokens"] if "visual_" not in t]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "special_tokens_map.json").unlink()
    tokenizer = AutoTokenizer.from_pretrained(str(plain))
    assert tokenizer.convert_tokens_to_ids("<|visual_input_token_pad_0|>") in (None, tokenizer.unk_token_id)

    fresh = PlannerTemplate(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|visual_input_token_pad_0|>") >= 151665
    sources, target = TASK_CASES["rv2v"]
    ours = fresh.encode_branch("cond", task="rv2v", text="a b", visual_inputs=sources, target=target)
    tiny = template.encode_branch("cond", task="rv2v", text="a b", visual_inputs=sources, target=target)
    assert torch.equal(ours.input_ids, tiny.input_ids) and torch.equal(ours.position_ids, tiny.position_ids)


def test_tiny_model_builds_and_runs(mllm_dir, qwen_model):
    ids = torch.tensor([[IM_START, 104, 105, VISION_START, IMAGE_PAD, VISION_END, 33]])
    with torch.no_grad():
        out = qwen_model(input_ids=ids, pixel_values=torch.randn(4, 1176), image_grid_thw=torch.tensor([[1, 2, 2]]),
                         output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 7, 64) and torch.isfinite(out.last_hidden_state).all()


# --------------------------------------------------------------------------- layout

def test_system_prompts():
    for task, prompt in SYSTEM_PROMPTS.items():
        assert planner_system_prompt(task) == prompt
    for task in ("default", "mv2v", "ads2v", "r2i", "anything"):
        assert planner_system_prompt(task) == DEFAULT_PROMPT


@pytest.mark.parametrize("task", list(TASK_CASES))
def test_layout_per_task(template, task):
    sources, target = TASK_CASES[task]
    text = "  Replace the cat with a red car. "
    n_src = len(sources)
    for name in ("cond", "imgcond", "uncond"):
        branch = template.encode_branch(name, task=task, text=text, visual_inputs=sources, target=target)
        keep = name == "cond"
        assert branch.input_ids.tolist() == expected_ids(task, text, sources, target, keep), name
        assert IM_END not in branch.input_ids.tolist()
        ids = branch.input_ids
        # Target: the run right before the final <|vision_end|>, of the target's pad id and token count.
        out_pos = branch.visual_output_mask.nonzero().flatten()
        assert out_pos.tolist() == list(range(len(ids) - 1 - target.n_tokens, len(ids) - 1))
        assert (ids[out_pos] == target.pad_id).all() and ids[-1] == VISION_END
        assert (branch.token_types[out_pos] == 3).all() and (branch.segment_ids[out_pos] == n_src + 1).all()
        # Sources: in order, each with its own segment (item number + 1) and pad id.
        in_pos = branch.visual_input_mask.nonzero().flatten()
        assert len(in_pos) == (sum(s.n_tokens for s in sources) if keep else 0)
        start = 0
        for i, item in enumerate(sources if keep else []):
            run = in_pos[start:start + item.n_tokens]
            assert (run[1:] - run[:-1] == 1).all() and ids[run[0] - 1] == VISION_START
            assert (ids[run] == item.pad_id).all() and (branch.segment_ids[run] == i + 1).all()
            assert (branch.token_types[run] == 2).all()
            start += item.n_tokens
        text_pos = (branch.token_types == 0).nonzero().flatten()
        assert torch.equal(branch.segment_ids[text_pos], text_pos)  # text: its own position
        assert branch.n_target_tokens == target.n_tokens
        assert branch.visual_inputs == []


def test_uncond_takes_negative_prompt_only_when_longer_than_one_char(template):
    sources, target = TASK_CASES["v2v"]
    neg = "ugly, blurry"
    branch = template.encode_branch("uncond", task="v2v", text=neg, visual_inputs=sources, target=target)
    assert branch.input_ids.tolist() == expected_ids("v2v", neg, sources, target, False)
    for short in ("", "x"):  # dropped: with no sources left the user message is empty and skipped
        branch = template.encode_branch("uncond", task="v2v", text=short, visual_inputs=sources, target=target)
        assert branch.input_ids.tolist() == expected_ids("v2v", "", sources, target, False)
        assert branch.input_ids.tolist().count(IM_START) == 2  # system + assistant only


def test_visual_features_checked_and_kept_for_cond_only(template):
    sources, target = TASK_CASES["rv2v"]
    feats = [torch.randn(item.n_tokens, 8) for item in sources]
    cond = template.encode_branch("cond", task="rv2v", text="a", visual_inputs=sources, target=target,
                                  visual_features=feats)
    assert len(cond.visual_inputs) == 3 and cond.visual_inputs[1] is feats[1]
    imgcond = template.encode_branch("imgcond", task="rv2v", text="a", visual_inputs=sources, target=target,
                                     visual_features=feats)
    assert imgcond.visual_inputs == []
    with pytest.raises(ValueError):
        template.encode_branch("cond", task="rv2v", text="a", visual_inputs=sources, target=target,
                               visual_features=feats[:2])
    with pytest.raises(ValueError):
        template.encode_branch("cond", task="rv2v", text="a", visual_inputs=sources, target=target,
                               visual_features=[f[:-1] for f in feats])


def test_bad_inputs(template):
    with pytest.raises(BerniniError, match="at most 63"):
        template.encode_branch("cond", task="r2v", text="a", visual_inputs=[image(1, 2, 2)] * 64,
                               target=video(1, 2, 2))
    with pytest.raises(ValueError, match="videos before"):
        template.encode_branch("cond", task="rv2v", text="a", visual_inputs=[image(1, 2, 2), video(1, 2, 2)],
                               target=video(1, 2, 2))
    with pytest.raises(ValueError):
        template.encode_branch("neg", task="t2v", text="a", visual_inputs=[], target=video(1, 2, 2))
    with pytest.raises(ValueError):
        VisualItem("image", (1, 3, 2))


# --------------------------------------------------------------------------- mask

def mask_by_rules(types, segments):
    """docs/official_behaviour.md §3.3 written as loops: causal over text / input keys; planning and target queries also
    see every key of their own type and segment."""
    n = len(types)
    mask = torch.full((n, n), float("-inf"))
    for q in range(n):
        for k in range(n):
            visible = k <= q and types[k] in (0, 2)
            if types[q] in (1, 3) and types[k] == types[q] and segments[k] == segments[q]:
                visible = True
            if visible:
                mask[q, k] = 0.0
    return mask


def test_mask_matches_rules_on_template_output(template):
    sources = [video(2, 4, 4), image(1, 2, 4)]
    for name in ("cond", "uncond"):
        branch = template.encode_branch(name, task="rv2v", text="go", visual_inputs=sources, target=video(2, 4, 2))
        assert branch.length < 200
        reference = mask_by_rules(branch.token_types.tolist(), branch.segment_ids.tolist())
        assert branch.attention_mask_4d.dtype == torch.float32
        assert torch.equal(branch.attention_mask_4d, reference)
        # Sanity of the rule itself: text never sees the target; the target sees all of itself.
        out = branch.visual_output_mask
        assert torch.isinf(branch.attention_mask_4d[~out][:, out]).all()
        assert (branch.attention_mask_4d[out][:, out] == 0).all()


def test_mask_function_with_planning_tokens():
    types = torch.tensor([0, 0, 2, 2, 0, 1, 1, 1, 0, 3, 3, 3, 1, 1, 0])
    segments = torch.tensor([0, 1, 1, 1, 4, 2, 2, 2, 8, 3, 3, 3, 2, 9, 14])
    assert torch.equal(attention_mask_4d(types, segments), mask_by_rules(types.tolist(), segments.tolist()))


# --------------------------------------------------------------------------- M-RoPE

def library_rope(model, input_ids, image_grids, video_grids):
    """transformers' own Qwen2_5_VLModel.get_rope_index (5.x needs mm_token_type_ids)."""
    ig = torch.tensor(image_grids) if image_grids else None
    vg = torch.tensor(video_grids) if video_grids else None
    ids = input_ids[None]
    mask = torch.ones_like(ids)
    if "mm_token_type_ids" in inspect.signature(model.get_rope_index).parameters:
        mm = (ids == IMAGE_PAD).int() + 2 * (ids == VIDEO_PAD).int()
        return model.get_rope_index(ids, mm, image_grid_thw=ig, video_grid_thw=vg, attention_mask=mask)[0][:, 0]
    return model.get_rope_index(ids, image_grid_thw=ig, video_grid_thw=vg, attention_mask=mask)[0][:, 0]


def rope_rule_4_57(input_ids, image_grids, video_grids, merge=2, tokens_per_second=2):
    """transformers 4.57.3's rule, scanning <|vision_start|> tokens: each text run restarts at the
    largest id so far + 1; a vision run adds (t·interval, row, col) to that start."""
    ids = input_ids.tolist()
    images, videos = iter(image_grids), iter(video_grids)
    rows, current = [[], [], []], 0
    i = 0
    while i < len(ids):
        if ids[i] == VISION_START and i + 1 < len(ids) and ids[i + 1] in (IMAGE_PAD, VIDEO_PAD):
            for axis in range(3):
                rows[axis].append(current)
            is_video = ids[i + 1] == VIDEO_PAD
            t, h, w = next(videos) if is_video else next(images)
            start, peak = current + 1, current
            for ti in range(t):
                for hi in range(h // merge):
                    for wi in range(w // merge):
                        tid = int(ti * 1.0 * tokens_per_second) if is_video else 0
                        for axis, value in enumerate((tid, hi, wi)):
                            rows[axis].append(start + value)
                            peak = max(peak, start + value)
            current = peak + 1
            i += 1 + t * h * w // merge ** 2  # <|vision_start|> + the vision run
            continue
        for axis in range(3):
            rows[axis].append(current)
        current += 1
        i += 1
    return torch.tensor(rows)


def _grids(branch, sources, target):
    items = (sources if branch.name == "cond" else []) + [target]
    return ([i.grid_thw for i in items if i.kind == "image"], [i.grid_thw for i in items if i.kind == "video"])


@pytest.mark.parametrize("case", ["image_only", "video_only", "mixed"])
def test_mrope_matches_transformers(template, qwen_model, case):
    sources, target, task = {
        "image_only": ([image(1, 12, 20), image(1, 16, 16)], image(1, 16, 16), "i2i"),
        "video_only": ([video(5, 12, 20)], video(5, 12, 20), "v2v"),
        "mixed": ([video(5, 12, 20), image(1, 16, 16), image(1, 8, 12)], video(5, 12, 20), "rv2v"),
    }[case]
    for name in ("cond", "imgcond", "uncond"):
        branch = template.encode_branch(name, task=task, text="a man walks", visual_inputs=sources, target=target)
        image_grids, video_grids = _grids(branch, sources, target)
        reference = library_rope(qwen_model, branch.input_ids, image_grids, video_grids)
        assert branch.position_ids.dtype == torch.long and branch.position_ids.shape == (3, branch.length)
        assert torch.equal(branch.position_ids, reference), (case, name)
        assert torch.equal(branch.position_ids, rope_rule_4_57(branch.input_ids, image_grids, video_grids))


def test_mrope_follows_4_57_where_transformers_5_differs(template, qwen_model):
    """A 512×512 81-frame video (grid 5×16×16: temporal ids reach 8 = rows) and a 121-frame one:
    the official's transformers 4.57.3 restarts the text after it at max id + 1, 5.x at
    start + max(rows, cols). We follow 4.57.3."""
    for sources, target in (([video(5, 16, 16)], video(5, 16, 16)), ([image(1, 16, 16)], video(7, 12, 20))):
        branch = template.encode_branch("cond", task="v2v", text="x y", visual_inputs=sources, target=target)
        image_grids, video_grids = _grids(branch, sources, target)
        expected = rope_rule_4_57(branch.input_ids, image_grids, video_grids)
        assert torch.equal(branch.position_ids, expected)
        library = library_rope(qwen_model, branch.input_ids, image_grids, video_grids)
        if int(transformers.__version__.split(".")[0]) < 5:
            assert torch.equal(library, expected)
        else:  # documents the divergence: only ids after the long video change
            assert not torch.equal(library, expected)
    # The standalone function: one video with t·2 > rows, then text.
    ids = torch.tensor([1, VISION_START] + [VIDEO_PAD] * 8 + [VISION_END, 7])
    pos = mrope_position_ids(ids, [], [(8, 2, 2)])
    assert pos[:, 2:10].tolist() == [[2, 4, 6, 8, 10, 12, 14, 16], [2] * 8, [2] * 8]
    assert pos[:, 10].tolist() == [17, 17, 17]


# --------------------------------------------------------------------------- RNG protocol

def _stream_state(rng=None):
    if rng is None:  # the global generators
        return random.random(), float(np.random.random_sample()), float(torch.rand(1))
    return rng.python.random(), float(rng.numpy.random_sample()), float(torch.rand(1, generator=rng.torch))


def test_random_draws_advance_streams_like_the_official(template):
    n_vit, n_vae = 300, 1590
    rng = PlannerRng.from_seed(42)
    for _ in ("cond", "imgcond", "uncond"):
        template.random_draws(n_vit, n_vae, rng)
    after = _stream_state(rng)

    # By hand on the global generators, docs/official_behaviour.md §7.1 item 1: per branch 3 random.random(), a numpy
    # shuffle of N items (same draws on an array as on a list), 64·n_vae float32 normals.
    random.seed(42), np.random.seed(42), torch.manual_seed(42)
    for _ in range(3):
        [random.random() for _ in range(3)]
        np.random.shuffle(np.arange(n_vit))
        torch.randn(n_vae * 64)
    assert _stream_state() == after

    assert _stream_state(PlannerRng.from_seed(42)) != after  # the draws really advance every stream
    rng = PlannerRng.from_seed(42)
    template.random_draws(n_vit, n_vae - 1, rng)
    template.random_draws(n_vit, n_vae, rng)
    template.random_draws(n_vit, n_vae, rng)
    after_fewer = _stream_state(rng)
    assert after_fewer[:2] == after[:2] and after_fewer[2] != after[2]  # the torch count matters
