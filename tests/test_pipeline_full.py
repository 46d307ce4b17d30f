"""Full Bernini (v1 and v2) end to end on the tiny checkpoints: every task, seeds, the random-number protocol,
the renderer contexts, source ids and token order, presets, and bad input
(docs/official_behaviour.md §3.4–§3.7, §4.7, §4.8, §5.1, §5.2, §7.1, §7.4).

Expected values are derived by hand from that document (sizes, token counts) or transcribed from its formulas (the
MaskGIT schedule, the template lengths, the RNG sequence), never read back from the engine.
"""

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bernini_core import BerniniError, BerniniPipeline
from bernini_core.pipeline_full import FullPipeline
from bernini_core.planner.rng import PlannerRng
from bernini_core.tasks import bernini_preset
from bernini_core.text_encoder import negative_prompt

SMALL = dict(num_frames=5, height=32, width=32, max_image_size=48, num_inference_steps=2, planning_step=2,
             vit_denoising_step=1)
PLAN = dict(planning_step=2, vit_denoising_step=1, vit_txt_cfg=1.2, vit_img_cfg=1.0)
TASKS = ("t2i", "i2i", "t2v", "v2v", "mv2v", "rv2v", "r2v", "ads2v")
VIDEO_EDIT_TASKS = ("v2v", "mv2v", "rv2v", "ads2v")  # a source video fixes the size when height/width are 0
FULL_MODES = ("vae_txt_vit_wapg", "vae_txt_vit", "rv2v_wapg", "v2v_apg")  # docs/official_behaviour.md §4.7
PROMPTS_FILE = Path(__file__).resolve().parent.parent / "bernini_core" / "data" / "bernini_prompts.json"


@pytest.fixture(scope="module")
def pipe_v1(tiny_bernini_v1_dir):
    return BerniniPipeline.from_pretrained(tiny_bernini_v1_dir, device="cpu", dtype="bf16")


@pytest.fixture(scope="module")
def pipe_v2(tiny_bernini_v2_dir):
    return BerniniPipeline.from_pretrained(tiny_bernini_v2_dir, device="cpu", dtype="bf16")


@pytest.fixture
def pipes(pipe_v1, pipe_v2):
    return {"v1": pipe_v1, "v2": pipe_v2}


def sources_for(task, media_dir):
    video, ref_video = str(media_dir / "source.mp4"), str(media_dir / "reference.mp4")
    refs = [str(media_dir / "ref0.png"), str(media_dir / "ref1.png")]
    return {
        "t2i": {}, "t2v": {},
        "i2i": {"image": refs[0]},
        "v2v": {"video": video}, "mv2v": {"video": video},
        "ads2v": {"video": [video, ref_video]},
        "r2v": {"images": refs},
        "rv2v": {"video": video, "images": refs},
    }[task]


def prompt_table():
    return json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))


# ------------------------------------------------------------------ 1. every task, v1 and v2
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("task", TASKS)
def test_every_task_runs(pipes, media_dir, version, task):
    pipe = pipes[version]
    assert isinstance(pipe, FullPipeline) and pipe.version == version
    settings = dict(SMALL)
    if task in VIDEO_EDIT_TASKS:
        settings.update(height=0, width=0)  # the presets' "source" size (docs/official_behaviour.md §4.8)
    out = pipe(task, "a small red fox", **sources_for(task, media_dir), **settings)
    frames = out.frames
    assert frames.dtype == torch.float32 and frames.ndim == 4 and frames.shape[-1] == 3
    assert torch.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1
    # Frames: min(num_frames, 1 + 4(T-1)); source.mp4 (17 frames at 24 fps) resampled to 16 fps keeps 9 frames,
    # capped at num_frames 5 -> latent T 2 -> 5 frames. A black target placeholder of 5 frames -> T 2 -> 5.
    assert frames.shape[0] == (1 if task in ("t2i", "i2i") else 5)
    if task in VIDEO_EDIT_TASKS:
        # height/width 0: the target latent x 8. source.mp4 is 48x40 (WxH); short edge >= 240 capped by the long
        # edge <= 48 gives 48x40, snapped to 16 -> 48x32 -> latent 6x4 -> 48x32 px.
        assert frames.shape[1:3] == (32, 48)
    else:
        assert frames.shape[1:3] == (32, 32)  # height/width > 0 win
    assert out.latents.shape == (1, 16, (frames.shape[0] - 1) // 4 + 1, frames.shape[1] // 8, frames.shape[2] // 8)
    # docs/official_behaviour.md §5.1 / §5.2: rv2v uses rv2v_wapg, every other task vae_txt_vit_wapg (v1 and v2).
    assert out.settings["guidance_mode"] == ("rv2v_wapg" if task == "rv2v" else "vae_txt_vit_wapg")


def test_output_geometry_rules(pipe_v1, media_dir):
    """docs/official_behaviour.md §4.8 with numbers that tell the rules apart."""
    ref_video = str(media_dir / "reference.mp4")  # 9 frames at 16 fps, 32x32
    # num_frames 13 but the clip holds 9 frames at 16 fps -> latent T 3 -> min(13, 1 + 4*2) = 9 frames. Size:
    # 32x32 with short edge >= 240 capped at 48 -> 48x48 -> latent 6x6 -> 48x48 px.
    out = pipe_v1("v2v", "a fox", video=ref_video, **dict(SMALL, num_frames=13, height=0, width=0))
    assert tuple(out.frames.shape) == (9, 48, 48, 3)
    # height/width > 0 win over the source size, even with a source video.
    out = pipe_v1("v2v", "a fox", video=str(media_dir / "source.mp4"), **dict(SMALL, height=32, width=32))
    assert tuple(out.frames.shape) == (5, 32, 32, 3)


# ------------------------------------------------------------------ 2. seeds and prompts
def test_same_seed_same_result_other_seed_differs(pipe_v1):
    a = pipe_v1("t2v", "a fox", seed=7, **SMALL).frames
    b = pipe_v1("t2v", "a fox", seed=7, **SMALL).frames
    c = pipe_v1("t2v", "a fox", seed=8, **SMALL).frames
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def _plan(pipe, task, prompt, neg, seed=3, sources=None, **geometry):
    geometry = {**dict(num_frames=5, height=32, width=32, max_image_size=48), **geometry}
    sources = sources if sources is not None else pipe.prepare_sources(task, **geometry)
    embeds = pipe.encode_prompt(task, prompt, neg)
    plan = pipe.plan_semantics(sources, embeds, prompt=prompt, neg_prompt=neg, seed=seed, **PLAN)
    return sources, embeds, plan


def test_prompt_changes_the_plan(pipe_v1):
    neg = "blurry"
    sources, _, fox = _plan(pipe_v1, "t2v", "a red fox", neg)
    _, _, again = _plan(pipe_v1, "t2v", "a red fox", neg, sources=sources)
    _, _, whale = _plan(pipe_v1, "t2v", "a blue whale", neg, sources=sources)
    names = ("wtxt_wvit", "wtxt_wovit", "wotxt_wvit", "wotxt_wovit")
    assert all(torch.equal(fox.contexts[n], again.contexts[n]) for n in names)
    for name in ("wtxt_wvit", "wtxt_wovit", "wotxt_wvit"):  # all read the prompt (T5 rows or the cond branch)
        a, b = fox.contexts[name], whale.contexts[name]
        assert a.shape != b.shape or (a.float() - b.float()).abs().max() > 0, name
    # wotxt_wovit = T5(negative) + the uncond branch without its target: the prompt never reaches it (text
    # tokens do not attend to target tokens, docs/official_behaviour.md §3.3), so it is bit-identical.
    assert torch.equal(fox.contexts["wotxt_wovit"], whale.contexts["wotxt_wovit"])


# ---------------------------------------------- 3. random-number protocol (docs/official_behaviour.md §7.1)
def official_reveal_counts(order, steps):
    """docs/official_behaviour.md §3.5 / §7.2 transcribed: per planning step, how many tokens the ViT decoder
    samples (0 = no draw)."""
    n = len(order)
    masked = np.ones(n, dtype=bool)
    counts = []
    for s in range(steps):
        ratio = math.cos(math.pi / 2 * (s + 1) / steps)
        mask_len = max(1, min(int(masked.sum()) - 1, int(math.floor(n * ratio))))
        next_masked = np.zeros(n, dtype=bool)
        next_masked[order[:mask_len]] = True
        predict = masked.copy() if s == steps - 1 else masked & ~next_masked
        indices = np.nonzero(predict)[0]
        masked = next_masked
        counts.append(0 if indices.sum() == 0 else len(indices))  # {0} (or nothing): skipped, no draw
    return counts


def replay_rng(seed, n_vit, n_vae, steps, channels):
    """Seed the global generators like the official __call__ and replay every documented draw by hand; returns the
    reveal counts."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    for _ in ("cond", "imgcond", "uncond"):
        for _ in range(3):
            random.random()
        np.random.shuffle(list(range(n_vit)))
        torch.randn([n_vae, 16, 1, 2, 2])
    order = np.arange(n_vit)
    np.random.shuffle(order)
    counts = official_reveal_counts(order, steps)
    for count in counts:
        if count:
            torch.randn(count, channels)
    return counts


@pytest.mark.parametrize(
    "task, height, width, n_vit, latent, seed, steps, skips",
    [
        # t2i 32x32: ViT 56x56 (min_pixels 3136) -> grid (1, 4, 4) -> 4 tokens; VAE 48x48 -> (1, 6, 6) -> 9 tokens.
        ("t2i", 32, 32, 4, (1, 6, 6), 0, 3, False),
        ("t2i", 32, 32, 4, (1, 6, 6), 5, 3, True),  # order[3] == 0: step 0 reveals exactly {0} and is skipped
        # t2v 64x112: ViT 56x112, 2 frames -> grid (1, 4, 8) -> 8 tokens; VAE 32x48, 5 frames -> (2, 4, 6) -> 12.
        ("t2v", 64, 112, 8, (2, 4, 6), 42, 3, False),
    ],
    ids=["t2i-seed0", "t2i-seed5-skip-quirk", "t2v-seed42"],
)
def test_rng_protocol(pipe_v1, tiny_bernini_v1_dir, monkeypatch, task, height, width, n_vit, latent, seed, steps,
                      skips):
    num_frames = 1 if task == "t2i" else 5
    sources = pipe_v1.prepare_sources(task, num_frames=num_frames, height=height, width=width, max_image_size=48)
    assert sources.target.n_tokens == n_vit and tuple(sources.target_latent_shape) == latent
    embeds = pipe_v1.encode_prompt(task, "a fox", "blurry")
    made = []  # the call's own generators (bernini_core/planner/rng.py), to read their final state
    from_seed = PlannerRng.from_seed
    monkeypatch.setattr(PlannerRng, "from_seed", lambda s: made.append(from_seed(s)) or made[-1])
    for seed_everything in (random.seed, np.random.seed, torch.manual_seed):
        seed_everything(999)  # whatever came before must not matter
    before = random.getstate(), np.random.get_state(), torch.get_rng_state()
    pipe_v1.plan_semantics(sources, embeds, prompt="a fox", neg_prompt="blurry", seed=seed,
                           **dict(PLAN, planning_step=steps))
    assert random.getstate() == before[0] and torch.equal(torch.get_rng_state(), before[2])  # globals untouched
    assert np.array_equal(np.random.get_state()[1], before[1][1]) and np.random.get_state()[2:] == before[1][2:]
    assert len(made) == 1
    after = made[0].python.getstate(), made[0].numpy.get_state(), made[0].torch.get_state()

    config = json.loads((Path(tiny_bernini_v1_dir) / "config.json").read_text())
    channels = config["clip_diff_cfg"]["target_channels"]
    t, h, w = latent
    counts = replay_rng(seed, n_vit, t * (h // 2) * (w // 2), steps, channels)
    assert (0 in counts) == skips and sum(counts) == (n_vit - 1 if skips else n_vit)
    assert after[0] == random.getstate()
    np_after, np_expected = after[1], np.random.get_state()
    assert np_after[0] == np_expected[0] and np.array_equal(np_after[1], np_expected[1])
    assert np_after[2:] == np_expected[2:]
    assert torch.equal(after[2], torch.get_rng_state())


def test_renderer_noise_ignores_the_global_generator(pipe_v1, monkeypatch):
    sources, _, plan = _plan(pipe_v1, "t2v", "a fox", "blurry")
    settings = pipe_v1.resolve("t2v", dict(SMALL, seed=11))
    first_targets = []
    original = pipe_v1.experts.high.module.forward

    def spy(latents, *args, **kwargs):
        if not first_targets:
            first_targets.append(latents[-1].detach().clone())
        return original(latents, *args, **kwargs)

    monkeypatch.setattr(pipe_v1.experts.high.module, "forward", spy)
    results = []
    for global_seed in (1, 2):
        for seed_everything in (random.seed, np.random.seed, torch.manual_seed):
            seed_everything(global_seed)
        results.append(pipe_v1.sample(plan, sources, settings))
    assert torch.equal(results[0], results[1])
    # docs/official_behaviour.md §7.1 item 4: a CPU generator of its own seeded with `seed`, float32
    # [1, 16, T, H/8, W/8].
    expected = torch.randn((1, 16, 2, 4, 4), generator=torch.Generator("cpu").manual_seed(11), dtype=torch.float32)
    assert torch.equal(first_targets[0].float(), expected.to(first_targets[0].dtype).float())


# ---------------------------------------------------------------- 4. contexts (docs/official_behaviour.md §3.7)
def reference_t5_rows(pipe, text):
    """UMT5 features of `text`, tokenised to 512 with truncation and cut to the true length
    (docs/official_behaviour.md §3.7, §4.4)."""
    encoder = pipe.components.text_encoder
    batch = encoder.tokenizer(text, padding="max_length", max_length=512, truncation=True,
                              add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return hidden[0, : int(batch.attention_mask.sum())]


def template_length(pipe, task, user_text, n_target):
    """Tokens of one planner branch without sources (docs/official_behaviour.md §7.2): system, user and assistant
    messages, each `<|im_start|>{role}\\n` + stripped content, no `<|im_end|>`; the assistant holds vision_start, N
    pads, vision_end."""
    tokenizer = pipe.components.tokenizer
    planner_prompts = prompt_table()["planner_system_prompts"]
    system = planner_prompts.get(task, planner_prompts["default"])

    def count(text):
        return len(tokenizer.encode(text, add_special_tokens=False))

    length = count("<|im_start|>system\n") + count(system.strip())
    if user_text.strip():
        length += count("<|im_start|>user\n") + count(user_text.strip())
    return length + count("<|im_start|>assistant\n") + n_target + 2


@pytest.mark.parametrize("neg", ["blurry", "blurry, " * 120], ids=["short_negative", "long_negative"])
def test_contexts_layout(pipe_v1, neg):
    prompt, task = "a red fox runs", "t2v"
    sources, embeds, plan = _plan(pipe_v1, task, prompt, neg)
    n = sources.target.n_tokens
    system = prompt_table()["renderer_system_prompts"][task]
    positive_text = " ".join((system + prompt).split())  # prompt_clean on plain ASCII: collapse whitespace
    negative_text = " ".join(neg.split())
    assert embeds.positive_text == positive_text and embeds.negative_text == negative_text
    t5 = {"wtxt": reference_t5_rows(pipe_v1, positive_text), "wotxt": reference_t5_rows(pipe_v1, negative_text)}

    cond = template_length(pipe_v1, task, prompt, n)
    uncond = template_length(pipe_v1, task, neg, n)
    planner_rows = {"wtxt_wvit": cond, "wtxt_wovit": cond - n, "wotxt_wvit": n, "wotxt_wovit": uncond - n}
    for name, rows in planner_rows.items():
        context = plan.contexts[name]
        text = t5[name.split("_")[0]]
        used = text.shape[0] + rows
        assert context.shape == (1, max(512, used), text.shape[1]), name  # >= 512 rows, never truncated
        assert torch.equal(context[0, : text.shape[0]], text.to(context.dtype)), name  # T5 rows first
        norms = context[0].float().norm(dim=-1)
        assert (norms[:used] > 0).all(), name  # no padding inside
        assert (norms[used:] == 0).all(), name  # zero rows only at the end
    if len(neg) > 100:  # T5 keeps 512 rows (tokenizer truncation); the joined contexts go past 512
        assert t5["wotxt"].shape[0] == 512
        assert plan.contexts["wotxt_wvit"].shape[1] == 512 + n and plan.contexts["wotxt_wovit"].shape[1] > 1000
    else:
        assert all(c.shape[1] == 512 for c in plan.contexts.values())  # short: every context padded to 512

    # The planner parts are views of the cond branch: its target occupies [cond-1-n, cond-1) (vision_end last).
    n_pos = t5["wtxt"].shape[0]
    full = plan.contexts["wtxt_wvit"][0, n_pos: n_pos + cond]
    without_target = torch.cat([full[: cond - 1 - n], full[cond - 1:]])
    assert torch.equal(plan.contexts["wtxt_wovit"][0, n_pos: n_pos + cond - n], without_target)
    n_neg = t5["wotxt"].shape[0]
    assert torch.equal(plan.contexts["wotxt_wvit"][0, n_neg: n_neg + n], full[cond - 1 - n: cond - 1])


# ---------------------------------------- 5. source ids and token order (docs/official_behaviour.md §4.2, §4.3)
def record_dit_calls(pipe, monkeypatch, stop_after=None):
    calls = []

    class Stop(Exception):
        pass

    for name, handle in (("high", pipe.experts.high), ("low", pipe.experts.low)):
        original = handle.module.forward

        def spy(latents, ids, timestep, context, *args, _name=name, _orig=original, **kwargs):
            calls.append({"expert": _name, "latents": [x.detach().clone() for x in latents], "ids": list(ids),
                          "context": context})
            if stop_after is not None and len(calls) >= stop_after:
                raise Stop
            return _orig(latents, ids, timestep, context, *args, **kwargs)

        monkeypatch.setattr(handle.module, "forward", spy)
    return calls, Stop


def test_rv2v_source_ids_token_order_and_arms(pipe_v1, media_dir, monkeypatch):
    task = "rv2v"
    srcs = sources_for(task, media_dir)  # 1 video + 2 reference images
    settings = pipe_v1.resolve(task, dict(SMALL, height=0, width=0))
    sources = pipe_v1.prepare_sources(task, **srcs, num_frames=5, height=0, width=0, max_image_size=48)
    embeds = pipe_v1.encode_prompt(task, "a fox", settings["neg_prompt"])
    plan = pipe_v1.plan_semantics(sources, embeds, prompt="a fox", neg_prompt=settings["neg_prompt"], seed=1, **PLAN)
    # Conversation order: ref0 (56x40 px -> 48x32 -> latent 6x4), ref1 (32x48 px -> latent 4x6), the video.
    video = sources.videos[0]
    img0, img1 = sources.images
    assert video.shape[2:] == (2, 4, 6) and img0.shape[2:] == (1, 4, 6) and img1.shape[2:] == (1, 6, 4)
    calls, _ = record_dit_calls(pipe_v1, monkeypatch)
    pipe_v1.sample(plan, sources, settings)

    def streams(call):
        out = []
        for x in call["latents"][:-1]:
            match = [name for name, ref in (("video", video), ("img0", img0), ("img1", img1))
                     if ref.shape == x.shape and torch.equal(ref.to(x.dtype), x)]
            out.append(match[0] if match else "?")
        return out

    embedded = {}

    def context_name(call):
        dit = getattr(pipe_v1.experts, call["expert"]).module
        for name, ctx in plan.contexts.items():
            key = (call["expert"], name)
            if key not in embedded:
                embedded[key] = dit.embed_context(ctx, device="cpu").hidden
            if embedded[key].shape == call["context"].hidden.shape and torch.equal(embedded[key],
                                                                                    call["context"].hidden):
                return name
        return "?"

    arms = [(tuple(streams(c)), tuple(c["ids"]), context_name(c)) for c in calls]
    all_sources = (("img0", "img1", "video"), (2.0, 3.0, 1.0, 0.0))  # images, videos, target; video id 1
    per_step = [
        (*all_sources, "wtxt_wvit"),  # ε_full first (docs/official_behaviour.md §7.4)
        ((), (0.0,), "wotxt_wovit"),  # base: target only
        (("video",), (1.0, 0.0), "wotxt_wovit"),  # ε_V
        (*all_sources, "wotxt_wovit"),  # ε_VI
        (*all_sources, "wtxt_wovit"),  # ε_VTI (ε_VTIC = ε_full, same inputs)
    ]
    assert arms == per_step * settings["num_inference_steps"]


def test_more_than_five_sources_use_float32_linspace_ids(pipe_v1, media_dir, monkeypatch):
    refs = [str(media_dir / "ref0.png"), str(media_dir / "ref1.png")] * 2 + [str(media_dir / "ref0.png")]
    calls, stop = record_dit_calls(pipe_v1, monkeypatch, stop_after=1)
    with pytest.raises(stop):
        pipe_v1("rv2v", "a fox", video=str(media_dir / "source.mp4"), images=refs, **dict(SMALL, height=0, width=0))
    ids = calls[0]["ids"]  # ε_full: all 6 sources; conversation order video, 5 images -> linspace(1, 5, 6)
    spread = [float(v) for v in np.linspace(1, 5, 6).astype(np.float32)]  # float32 values, e.g. 1.7999999523
    # DiT order: the 5 images, the video (conversation position 1 -> id 1), the target (id 0).
    assert ids == spread[1:] + [spread[0], 0.0]
    assert ids[0] != 1.8  # not the exact decimal


# ---------------------------------------------------------- 6. presets (docs/official_behaviour.md §5.1, §5.2)
def _row(mode, frames, height, width, max_img, steps, txt, tgt, img, vid, scale):
    return dict(guidance_mode=mode, num_frames=frames, height=height, width=width, max_image_size=max_img,
                num_inference_steps=steps, omega_txt=txt, omega_tgt=tgt, omega_img=img, omega_vid=vid,
                omega_scale=scale)


W = "vae_txt_vit_wapg"
# docs/official_behaviour.md §5.1 (scripts; "source" size = 0x0); ads2v has no v1 script: gradio's v1 table (40 steps,
# 848, 480x848 base).
SPEC_V1 = {
    "t2i": _row(W, 1, 512, 512, 842, 50, 4.0, 0.5, 1.0, 1.0, 1.0),
    "i2i": _row(W, 1, 512, 512, 842, 40, 4.0, 0.5, 1.25, 1.25, 0.75),
    "t2v": _row(W, 81, 480, 848, 842, 50, 4.0, 0.5, 1.0, 1.0, 1.0),
    "v2v": _row(W, 81, 0, 0, 848, 40, 4.0, 0.5, 1.25, 1.25, 0.75),
    "mv2v": _row(W, 81, 0, 0, 848, 40, 4.0, 0.5, 1.25, 1.25, 0.75),
    "rv2v": _row("rv2v_wapg", 81, 0, 0, 848, 40, 4.0, 1.5, 3.0, 0.75, 0.75),
    "r2v": _row(W, 81, 480, 848, 842, 40, 4.0, 1.5, 4.5, 1.25, 0.8),
    "ads2v": _row(W, 81, 480, 848, 848, 40, 4.0, 0.5, 1.25, 1.25, 0.75),
}
SPEC_V1_PLANNER = dict(planning_step=25, vit_denoising_step=5, vit_txt_cfg=1.2, vit_img_cfg=1.0)
V1_ENGLISH = {"v2v", "mv2v"}  # run_v2v.sh (the docs/official_behaviour.md §5.1 row "v2v (+mv2v)")

# docs/official_behaviour.md §5.2 (gradio v2 table): steps, ω_vid, ω_img, ω_txt, ω_tgt, ω_scale, planning, vit_denoise,
# size, max_image_size.
SPEC_V2 = {
    "t2i": (W, 50, 1.0, 1.0, 4.0, 0.5, 1.0, 25, 5, (512, 512), 842),
    "i2i": (W, 40, 1.25, 1.25, 4.0, 0.5, 0.75, 25, 5, (512, 512), 842),
    "t2v": (W, 50, 1.0, 1.0, 5.0, 1.2, 1.0, 50, 1, (480, 848), 842),
    "v2v": (W, 40, 1.25, 1.25, 4.0, 1.2, 0.75, 50, 1, (0, 0), None),
    "mv2v": (W, 40, 1.25, 1.25, 4.0, 1.2, 0.75, 50, 1, (0, 0), None),
    "rv2v": ("rv2v_wapg", 40, 1.75, 4.0, 5.5, 1.5, 0.75, 50, 1, (0, 0), 848),
    "r2v": (W, 40, 1.0, 3.0, 4.5, 1.5, 0.75, 50, 1, (480, 848), 842),
    "ads2v": (W, 40, 1.25, 1.25, 4.0, 1.2, 0.75, 50, 1, (0, 0), None),
}
V2_ENGLISH = {"v2v", "mv2v", "r2v"}
COMMON = dict(flow_shift=5.0, seed=42, fps=16, vit_txt_cfg=1.2, vit_img_cfg=1.0)


@pytest.mark.parametrize("task", TASKS)
def test_presets_follow_the_spec_tables(task):
    v1 = bernini_preset(task, "v1")
    for key, value in {**SPEC_V1[task], **SPEC_V1_PLANNER, **COMMON}.items():
        assert v1[key] == value, ("v1", task, key)
    assert v1["negative"] == ("english" if task in V1_ENGLISH else "default_zh")

    v2 = bernini_preset(task, "v2")
    mode, steps, vid, img, txt, tgt, scale, planning, vit_steps, size, max_img = SPEC_V2[task]
    expected = dict(guidance_mode=mode, num_inference_steps=steps, omega_vid=vid, omega_img=img, omega_txt=txt,
                    omega_tgt=tgt, omega_scale=scale, planning_step=planning, vit_denoising_step=vit_steps,
                    height=size[0], width=size[1], num_frames=1 if task in ("t2i", "i2i") else 81, **COMMON)
    if max_img is not None:
        expected["max_image_size"] = max_img
    for key, value in expected.items():
        assert v2[key] == value, ("v2", task, key)
    assert v2["negative"] == ("english" if task in V2_ENGLISH else "default_zh")
    assert bernini_preset(task, "v1") is not bernini_preset(task, "v1")  # a fresh dict per call


def test_english_negative_is_the_script_one():
    english = negative_prompt("english")
    assert english.startswith("vivid tones, overexposed, static, blurry details") and english.isascii()
    assert not negative_prompt("default_zh").isascii()


def test_pipeline_uses_the_preset_negative(pipe_v1, pipe_v2):
    assert pipe_v1.resolve("v2v", {})["neg_prompt"] == negative_prompt("english")
    assert pipe_v1.resolve("t2v", {})["neg_prompt"] == negative_prompt("default_zh")
    assert pipe_v2.resolve("r2v", {})["neg_prompt"] == negative_prompt("english")
    assert pipe_v2.resolve("r2v", {"neg_prompt": "ugly"})["neg_prompt"] == "ugly"


# ------------------------------------------------------------------ 8. bad input
@pytest.mark.parametrize("mode", ["t2v_apg", "rv2v", "r2v_apg"])
def test_renderer_mode_names_are_rejected(pipe_v1, mode):
    with pytest.raises(BerniniError) as info:
        pipe_v1("t2v", "a fox", guidance_mode=mode, **SMALL)
    message = str(info.value)
    assert mode in message and all(m in message for m in FULL_MODES)


@pytest.mark.parametrize(
    "task, kwargs, fragment",
    [
        ("v2v", {}, "needs a source video"),
        ("rv2v", {"video": "VIDEO"}, "needs reference images"),
        ("i2i", {}, "needs the image to edit"),
        ("t2v", {"height": 0, "width": 0}, "height/width"),  # no source fixes the size
        ("r2v", {"images": ["REF"], "height": 0, "width": 0}, "height/width"),  # images do not fix it either
    ],
)
def test_bad_input_messages(pipe_v1, media_dir, task, kwargs, fragment):
    kwargs = {k: (str(media_dir / "source.mp4") if v == "VIDEO" else v) for k, v in kwargs.items()}
    if kwargs.get("images") == ["REF"]:
        kwargs["images"] = [str(media_dir / "ref0.png")]
    with pytest.raises(BerniniError, match=fragment):
        pipe_v1(task, "a fox", **{**SMALL, **kwargs})


def test_target_larger_than_the_mask_token_table(tiny_bernini_v1_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    root = tmp_path / "Bernini-Diffusers"
    shutil.copytree(tiny_bernini_v1_dir, root)
    config = json.loads((root / "config.json").read_text())
    config["num_mask_token"] = 4
    (root / "config.json").write_text(json.dumps(config))
    index = json.loads((root / "bernini" / "model.safetensors.index.json").read_text())
    shard = root / "bernini" / index["weight_map"]["mask_tokens"]
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["mask_tokens"] = tensors["mask_tokens"][:, :4].clone()  # the table the edited config describes
    save_file(tensors, str(shard), metadata={"format": "pt"})

    pipe = FullPipeline.from_pretrained(root, device="cpu", dtype="bf16")
    # 32x32: ViT grid (1, 4, 4) -> 4 tokens, exactly the table: fine.
    assert pipe("t2v", "a fox", **SMALL).frames.shape == (5, 32, 32, 3)
    # 32x64: ViT 56x84 -> grid (1, 4, 6) -> 6 tokens > 4.
    with pytest.raises(BerniniError, match="num_mask_token") as info:
        pipe("t2v", "a fox", **dict(SMALL, width=64))
    assert "6" in str(info.value) and "4" in str(info.value)


def test_renderer_only_directory_is_not_full_bernini(tiny_renderer_dir):
    with pytest.raises(BerniniError, match="planner"):
        FullPipeline.from_pretrained(tiny_renderer_dir, device="cpu")


def test_full_directory_with_split_checkpoints_is_rejected(tiny_bernini_v1_dir):
    """docs/official_behaviour.md §6.1: a model_type "bernini" folder takes no --high/--low_noise_ckpt; the message must
    say so (not send the user looking for a Wan2.2 base folder)."""
    ckpt = str(Path(tiny_bernini_v1_dir) / "bernini")
    with pytest.raises(BerniniError, match="high_noise_ckpt") as info:
        FullPipeline.from_pretrained(tiny_bernini_v1_dir, device="cpu", high_noise_ckpt=ckpt)
    assert "full Bernini" in str(info.value)
    for kwargs in ({"high_noise_ckpt": ckpt}, {"high_noise_ckpt": ckpt, "low_noise_ckpt": ckpt}):
        with pytest.raises(BerniniError) as info:
            BerniniPipeline.from_pretrained(tiny_bernini_v1_dir, device="cpu", **kwargs)
        assert "full Bernini" in str(info.value) and "high_noise_ckpt" in str(info.value), str(info.value)


def test_plan_from_another_release_is_rejected(pipe_v1, pipe_v2):
    sources, _, plan = _plan(pipe_v1, "t2v", "a fox", "blurry")
    with pytest.raises(BerniniError, match="v1"):
        pipe_v2.sample(plan, sources, pipe_v2.resolve("t2v", dict(SMALL)))


def test_seed_outside_numpy_range_is_a_clear_error(pipe_v1):
    """The planner seeds numpy (official np.random.seed), which takes 0..2**32-1."""
    with pytest.raises(BerniniError, match="out of range"):
        pipe_v1("t2i", "a fox", seed=2**40, **{**SMALL, "num_frames": 1})


def test_v1_mv2v_uses_the_system_prompt_run_v2v_sh_passes(pipe_v1):
    """scripts/bernini/run_v2v.sh runs the mv2v case with --system_prompt '...video editing.'
    (docs/official_behaviour.md §5.1)."""
    mv2v = pipe_v1.encode_prompt("mv2v", "make it dance", system_prompt=pipe_v1.default_settings("mv2v")["system_prompt"])
    assert mv2v.positive_text.startswith("You are a helpful assistant specialized in video editing.")
    assert "system_prompt" not in pipe_v1.default_settings("t2v")


def test_i2i_takes_one_image_without_references(pipe_v1, media_dir):
    with pytest.raises(BerniniError, match="i2i edits one image"):
        pipe_v1("i2i", "make it red", image=str(media_dir / "ref0.png"), images=[str(media_dir / "ref1.png")],
                **{**SMALL, "num_frames": 1})
