"""Bernini-R end to end on the tiny checkpoints: every task, seeds, experts, layouts, and bad input."""

import logging

import numpy as np
import pytest
import torch

from bernini_core import BerniniError, BerniniPipeline
from bernini_core.denoise import initial_noise
from bernini_core.pipeline import RendererPipeline
from bernini_core.sampling.schedulers import FlowUniPCScheduler, expert_split

SMALL = dict(num_frames=5, height=32, width=32, max_image_size=48, num_inference_steps=3)


@pytest.fixture(scope="module")
def pipe(tiny_renderer_dir):
    return BerniniPipeline.from_pretrained(tiny_renderer_dir, device="cpu", dtype="bf16")


def sources_for(task, media_dir):
    video, ref_video = str(media_dir / "source.mp4"), str(media_dir / "reference.mp4")
    refs = [str(media_dir / "ref0.png"), str(media_dir / "ref1.png")]
    return {
        "t2i": {},
        "t2v": {},
        "i2i": {"image": refs[0]},
        "v2v": {"video": video},
        "mv2v": {"video": video},
        "ads2v": {"video": [video, ref_video]},
        "r2v": {"images": refs},
        "rv2v": {"video": video, "images": refs},
    }[task]


@pytest.mark.parametrize("task", ["t2i", "i2i", "t2v", "v2v", "mv2v", "ads2v", "r2v", "rv2v"])
def test_every_task_runs(pipe, media_dir, task):
    out = pipe(task, "a small red fox", **sources_for(task, media_dir), **SMALL)
    frames = out.frames
    assert frames.dtype == torch.float32 and frames.ndim == 4 and frames.shape[-1] == 3
    assert torch.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1
    if task in ("t2i", "i2i"):
        assert frames.shape[0] == 1
    else:
        assert frames.shape[0] == 5
    if task == "i2i":
        assert frames.shape[1:3] == (32, 48)  # follows the edited image (40x56, long edge 48 -> 34x48 -> 32x48)
    elif task in ("v2v", "mv2v", "ads2v", "rv2v"):
        assert frames.shape[1:3] == (32, 48)  # follows the first source video (40x48 -> 32x48)
    else:
        assert frames.shape[1:3] == (32, 32)  # height/width
    assert out.latents.shape == (1, 16, (frames.shape[0] - 1) // 4 + 1, frames.shape[1] // 8, frames.shape[2] // 8)
    assert out.settings["guidance_mode"] == {
        "t2i": "t2v_apg", "t2v": "t2v_apg", "i2i": "v2v", "v2v": "v2v_apg", "mv2v": "v2v_apg",
        "ads2v": "v2v_apg", "r2v": "r2v_apg", "rv2v": "rv2v",
    }[task]


def test_same_seed_same_result_other_seed_differs(pipe):
    a = pipe("t2v", "a fox", seed=7, **SMALL).frames
    b = pipe("t2v", "a fox", seed=7, **SMALL).frames
    c = pipe("t2v", "a fox", seed=8, **SMALL).frames
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_initial_noise_matches_the_official_draw():
    pytest.importorskip("diffusers")
    from diffusers.utils.torch_utils import randn_tensor

    shape = (1, 16, 3, 4, 6)
    official = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(42), device=torch.device("cpu"),
                            dtype=torch.float32)
    assert torch.equal(initial_noise(42, 9, 32, 48), official)


def test_sources_and_prompt_change_the_result(pipe, media_dir):
    base = pipe("v2v", "a fox", video=str(media_dir / "source.mp4"), **SMALL).frames
    other_prompt = pipe("v2v", "a bear", video=str(media_dir / "source.mp4"), **SMALL).frames
    assert (base - other_prompt).abs().max() > 1e-4


def test_tiled_vae_option_runs_and_is_validated(pipe, media_dir):
    out = pipe("v2v", "a fox", video=str(media_dir / "source.mp4"), vae_tile_px=32, vae_tile_overlap_px=16, **SMALL)
    assert out.frames.shape == (5, 32, 48, 3) and torch.isfinite(out.frames).all()
    with pytest.raises(BerniniError, match="overlap"):
        pipe("t2v", "a fox", vae_tile_px=32, vae_tile_overlap_px=32, **SMALL)


def test_in_memory_video_equals_file(pipe, media_dir):
    from bernini_core.media import read_video

    frames, fps = read_video(media_dir / "source.mp4")
    from_file = pipe("v2v", "a fox", video=str(media_dir / "source.mp4"), **SMALL).frames
    from_memory = pipe("v2v", "a fox", video=frames, video_fps=fps, **SMALL).frames
    as_float = pipe("v2v", "a fox", video=frames.astype(np.float32) / 255.0, video_fps=fps, **SMALL).frames
    assert torch.equal(from_file, from_memory)
    assert torch.equal(from_file, as_float)


def test_expert_switch_and_omega_scale(tiny_renderer_dir):
    pipe = BerniniPipeline.from_pretrained(tiny_renderer_dir, device="cpu", dtype="fp32")
    calls = []
    for name, handle in (("high", pipe.experts.high), ("low", pipe.experts.low)):
        original = handle.module.forward

        def spy(*args, _name=name, _orig=original, **kwargs):
            calls.append((_name, float(args[2][0])))
            return _orig(*args, **kwargs)

        handle.module.forward = spy
    settings = dict(SMALL, num_inference_steps=6, guidance_mode="t2v")
    out_a = pipe("t2v", "a fox", omega_scale=1.0, **settings).frames
    scheduler = FlowUniPCScheduler(shift=5.0)
    scheduler.set_timesteps(6)
    n_high = expert_split(scheduler.timesteps)
    assert 0 < n_high < 6
    per_step = 2  # t2v: neg then pos
    assert [c[0] for c in calls] == ["high"] * (n_high * per_step) + ["low"] * ((6 - n_high) * per_step)
    assert all(t >= 875 for name, t in calls if name == "high") and all(t < 875 for name, t in calls if name == "low")
    out_b = pipe("t2v", "a fox", omega_scale=0.5, **settings).frames
    assert (out_a - out_b).abs().max() > 1e-5  # omega_scale acts on the low-noise steps


def test_single_expert_1p3b(tmp_path):
    from bernini_core.tiny import make_tiny_renderer

    path = make_tiny_renderer(tmp_path / "Bernini-R-1.3B-Diffusers", variant="1.3b", seed=0)
    pipe = BerniniPipeline.from_pretrained(path, device="cpu", dtype="bf16")
    assert pipe.experts.low is None and pipe.experts.boundary == 0.0
    out = pipe("t2v", "a fox", **SMALL)
    assert out.frames.shape == (5, 32, 32, 3)


def test_split_checkpoints_load_the_ema_experts(tmp_path):
    from bernini_core.tiny import TINY_DIT, make_tiny_split, tiny_dit_state_dict

    root = make_tiny_split(tmp_path / "split", seed=0)
    base = next(p for p in root.iterdir() if (p / "model_index.json").exists())
    pipe = BerniniPipeline.from_pretrained(
        base, high_noise_ckpt=root / "bernini_renderer_high", low_noise_ckpt=root / "bernini_renderer_low",
        device="cpu", dtype="fp32",
    )
    ema_high = tiny_dit_state_dict(TINY_DIT, 0, expert="high_ema")
    low = tiny_dit_state_dict(TINY_DIT, 0, expert="low")
    high_sd, low_sd = pipe.experts.high.module.state_dict(), pipe.experts.low.module.state_dict()
    assert all(torch.equal(high_sd[k], v.float()) for k, v in ema_high.items())
    assert all(torch.equal(low_sd[k], v.float()) for k, v in low.items())
    assert pipe("t2v", "a fox", **SMALL).frames.shape == (5, 32, 32, 3)


def test_comfy_single_files_load(tmp_path, tiny_renderer_dir):
    from bernini_core.loaders import load_dit_file, load_vae
    from bernini_core.tiny import TINY_DIT, make_tiny_comfy_files

    files = make_tiny_comfy_files(tmp_path / "comfy", seed=0)
    head_dim = TINY_DIT["attention_head_dim"]
    high = load_dit_file(files["high"], dtype=torch.float32, head_dim=head_dim)
    reference = RendererPipeline.from_pretrained(tiny_renderer_dir, device="cpu", dtype="fp32")
    ref_sd = reference.experts.high.module.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in high.state_dict().items())
    low_dq = load_dit_file(files["low"], dtype=torch.float32, head_dim=head_dim)
    low_fp8 = load_dit_file(files["low"], dtype=torch.float32, keep_fp8=True, head_dim=head_dim)
    assert any(p.dtype == torch.float8_e4m3fn for p in low_fp8.parameters())
    x = torch.randn(1, 16, 2, 4, 6)
    ctx = torch.randn(1, 20, TINY_DIT["text_dim"])
    # exact: both paths form the weight as fp8.float() * scale in fp32 (quant.py) and run the same F.linear
    assert torch.equal(low_dq([x], [0.0], torch.tensor([500.0]), ctx), low_fp8([x], [0.0], torch.tensor([500.0]), ctx))
    from bernini_core.tiny import TINY_VAE
    from bernini_core.vae import VAEConfig

    vae = load_vae(files["vae"], config=VAEConfig.from_dict(TINY_VAE))
    vae_sd = reference.components.vae.state_dict()
    assert all(torch.equal(v, vae_sd[k]) for k, v in vae.state_dict().items())


# ------------------------------------------------------------------ bad input
def test_frame_count_not_4n_plus_1_is_adjusted_with_a_warning(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="bernini.pipeline"):
        out = pipe("t2v", "a fox", **dict(SMALL, num_frames=7))
    assert out.frames.shape[0] == 5  # 7 // 4 * 4 + 1
    assert "4n+1" in caplog.text


@pytest.mark.parametrize(
    "task, kwargs, fragment",
    [
        ("v2v", {}, "needs a source video"),
        ("rv2v", {"video": "VIDEO"}, "needs reference images"),
        ("i2i", {}, "needs the image to edit"),
        ("t2v", {"video": "VIDEO"}, "takes no source video"),
        ("t2v", {"guidance_mode": "nope"}, "rv2v"),
        ("t2v", {"omega_text": 3.0}, "unknown keyword"),
        ("r2v", {"images": ["REF4"]}, "16"),
        ("nope", {}, "not an official Bernini task"),
    ],
)
def test_bad_input_messages(pipe, media_dir, task, kwargs, fragment):
    kwargs = {k: (str(media_dir / "source.mp4") if v == "VIDEO" else v) for k, v in kwargs.items()}
    if kwargs.get("images") == ["REF4"]:
        kwargs["images"] = [str(media_dir / "tiny4x4.png")]
    with pytest.raises(BerniniError, match=fragment):
        pipe(task, "a fox", **{**SMALL, **kwargs})


def test_empty_video_is_rejected(pipe):
    with pytest.raises(BerniniError, match="(?i)empty|no frames|0 frames"):
        pipe("v2v", "a fox", video=np.zeros((0, 32, 32, 3), np.uint8), **SMALL)


def test_apg_mode_needs_unipc(tiny_renderer_dir):
    pipe = BerniniPipeline.from_pretrained(tiny_renderer_dir, device="cpu", dtype="fp32", use_unipc=False)
    with pytest.raises(BerniniError, match="UniPC"):
        pipe("t2v", "a fox", **SMALL)
    assert pipe("t2v", "a fox", guidance_mode="t2v", **SMALL).frames.shape == (5, 32, 32, 3)  # Euler works


def test_unwritable_output_fails_before_the_run(pipe, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(BerniniError, match="not writable|folder"):
        pipe("t2v", "a fox", output_path=str(blocker / "out.mp4"), **SMALL)


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "empty").mkdir() or (p / "empty"), "empty"),
    ],
)
def test_wrong_or_missing_directory(tmp_path, make, fragment):
    with pytest.raises(BerniniError, match=fragment):
        BerniniPipeline.from_pretrained(make(tmp_path), device="cpu")


def test_missing_shard(tmp_path):
    import shutil

    from bernini_core.tiny import make_tiny_renderer

    path = make_tiny_renderer(tmp_path / "r", seed=0)
    shard = sorted((path / "transformer").glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(BerniniError, match=shard.name):
        BerniniPipeline.from_pretrained(path, device="cpu")
    shutil.rmtree(path)


def test_a_single_norm_threshold_number_is_accepted(pipe):
    """The official accepts one number for all APG rungs (and the CLI takes one value)."""
    one = pipe("t2v", "a fox", norm_threshold=50.0, **SMALL).frames
    three = pipe("t2v", "a fox", norm_threshold=(50.0, 50.0, 50.0), **SMALL).frames
    assert torch.equal(one, three)
