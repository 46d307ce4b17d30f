"""Inputs are read as meant or refused: 16-bit PNGs, float frames on the wrong scale or with NaN, guidance modes
whose sources are missing, ads2v without its reference video, prompts that are not strings; inputs that have no
effect (video_fps with a file) or lose their tail (prompts beyond 512 tokens) get one warning line."""

import logging
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from bernini_core import BerniniError, BerniniPipeline, media
from bernini_core.cli import main
from bernini_core.node_api import _check_source_inputs
from bernini_core.planner.vision import open_image_for_vit
from bernini_core.tasks import check_mode_sources

SMALL = dict(num_frames=5, height=32, width=32, num_inference_steps=2, seed=3)




# --------------------------------------------------------------------------------------------- 16-bit PNGs
def write_png16(path, samples: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): samples [H, W, C] uint16."""
    h, w = samples.shape[:2]
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("kind", ["gray16", "gray16_pillow", "rgb16"])
def test_16_bit_pngs_are_scaled_to_8_bit(tmp_path, kind):
    level = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    path = tmp_path / f"{kind}.png"
    if kind == "gray16":
        write_png16(path, level[..., None], color_type=0)
    elif kind == "gray16_pillow":
        Image.fromarray(level).save(path)  # Pillow's own 16-bit grayscale (mode I;16)
    else:
        write_png16(path, np.stack([level] * 3, axis=-1), color_type=2)
    expected = (level >> 8).astype(np.uint8)
    vae_side = media.load_image(path, max_image_size=32)  # [3, 1, H, W] in -1..1
    pixels = ((vae_side[:, 0].permute(1, 2, 0) * 0.5 + 0.5) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(pixels[..., 0], expected) and np.array_equal(pixels[..., 2], expected)
    vit_side = np.asarray(open_image_for_vit(path))
    assert np.array_equal(vit_side[..., 1], expected)
    assert (pixels == 255).mean() < 0.05  # not clipped to white, as PIL's convert("RGB") does for I;16


# ------------------------------------------------------------------------------------------- float frames
@pytest.mark.parametrize("scale, fragment", [(255.0, "look like 0..255"), (-1.0, "look like -1..1"),
                                             (float("nan"), "NaN")])
@pytest.mark.parametrize("form", ["video_numpy", "video_torch", "image_numpy"])
def test_float_frames_on_another_scale_or_with_nan_are_refused(scale, fragment, form):
    frames = np.random.default_rng(0).random((5, 16, 16, 3), dtype=np.float32)
    frames = frames * scale if scale != -1.0 else frames * 2 - 1
    if np.isnan(scale):
        frames = np.random.default_rng(0).random((5, 16, 16, 3), dtype=np.float32)
        frames[0, 0, 0, 0] = np.nan
    with pytest.raises(BerniniError, match=fragment):
        if form == "video_numpy":
            media.load_video(frames, num_frames=5)
        elif form == "video_torch":
            media.load_video(torch.from_numpy(frames), num_frames=5)
        else:
            media.load_image(frames[0])


def test_small_overshoots_are_clipped_as_before():
    frames = np.full((1, 16, 16, 3), 1.03, np.float32)
    frames[..., 0] = -0.02
    assert media.to_uint8(frames, "frames")[0, 0, 0].tolist() == [0, 255, 255]


# ------------------------------------------------------------------------------- sources the settings need
@pytest.mark.parametrize("task, mode, fragment", [
    ("t2v", "v2v", "a source video or image"), ("t2v", "rv2v", "a source video"), ("t2v", "v2v_apg", "source"),
    ("t2i", "v2v_chain", "a source video"), ("t2v", "r2v_apg", "reference images"),
])
def test_a_mode_needing_sources_is_refused_on_a_task_without(fp32_renderer, no_work, task, mode, fragment):
    with pytest.raises(BerniniError, match=fragment) as info:
        fp32_renderer(task, "a fox", guidance_mode=mode, **SMALL)
    assert repr(mode) in str(info.value) and no_work == []


def test_mode_sources_rules():
    check_mode_sources("t2v_apg", n_videos=1, n_images=0, task="v2v")  # a text-only mode may ignore sources
    check_mode_sources("v2v", n_videos=0, n_images=1, task="i2i")  # i2i edits its image with v2v
    check_mode_sources("vae_txt_vit_wapg", n_videos=0, n_images=0, task="t2v")
    with pytest.raises(BerniniError, match="rv2v_wapg"):
        check_mode_sources("rv2v_wapg", n_videos=0, n_images=2, task="r2v")
    with pytest.raises(BerniniError, match="r2v_apg"):
        check_mode_sources("r2v_apg", n_videos=1, n_images=0, task="v2v")


def test_the_sample_stage_refuses_a_mode_without_its_sources(fp32_renderer):
    embeds = fp32_renderer.encode_prompt("t2v", "a fox")
    settings = fp32_renderer.resolve("t2v", dict(SMALL, guidance_mode="v2v_apg"))
    with pytest.raises(BerniniError, match="v2v_apg"):
        fp32_renderer.sample(embeds, fp32_renderer.prepare_sources("t2v"), settings)


def test_the_cli_refuses_a_mode_without_its_sources_before_loading(tiny_renderer_dir, capsys, monkeypatch):
    monkeypatch.setattr("bernini_core.pipeline.BerniniPipeline.from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("the model was loaded")))
    assert main(["generate", "--config", str(tiny_renderer_dir), "--prompt", "a fox", "--task_type", "t2v",
                 "--height", "32", "--width", "32", "--guidance_mode", "v2v"]) == 2
    assert "--guidance_mode 'v2v'" in capsys.readouterr().err


def test_full_bernini_refuses_rv2v_wapg_without_a_video(tiny_bernini_v1_dir, monkeypatch):
    full = BerniniPipeline.from_pretrained(tiny_bernini_v1_dir, device="cpu", dtype="fp32")
    monkeypatch.setattr(full, "prepare_sources", lambda *a, **k: pytest.fail("a stage started"))
    with pytest.raises(BerniniError, match="rv2v_wapg"):
        full("t2v", "a fox", guidance_mode="rv2v_wapg", **SMALL)


def test_ads2v_needs_its_reference_video(fp32_renderer, no_work, media_dir, tiny_renderer_dir, capsys):
    clip = str(sorted(media_dir.glob("*.mp4"))[0])
    with pytest.raises(BerniniError, match="reference video"):
        fp32_renderer("ads2v", "add the logo", video=clip, **SMALL)
    assert no_work == []
    with pytest.raises(BerniniError, match="reference_video"):
        _check_source_inputs("ads2v", has_video=True, has_ref_video=False, has_image=False, n_refs=0)
    _check_source_inputs("ads2v", has_video=True, has_ref_video=True, has_image=False, n_refs=0)
    assert main(["generate", "--config", str(tiny_renderer_dir), "--prompt", "add it", "--task_type", "ads2v",
                 "--video", clip]) == 2
    assert "reference video" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ prompts
@pytest.mark.parametrize("kwargs, fragment", [
    (dict(prompt=5), "prompt must be a string, got int"), (dict(prompt=["a fox"]), "prompt must be a string"),
    (dict(prompt="a fox", neg_prompt=3), "neg_prompt must be a string"),
    (dict(prompt="a fox", system_prompt=b"x"), "system_prompt must be a string"),
    (dict(prompt="   "), "prompt is empty"),
])
def test_prompts_that_are_not_strings_are_refused_as_such(fp32_renderer, no_work, kwargs, fragment):
    prompt = kwargs.pop("prompt")
    with pytest.raises(BerniniError, match=fragment):
        fp32_renderer("t2v", prompt, **SMALL, **kwargs)
    assert no_work == []


def test_a_string_norm_threshold_is_refused(fp32_renderer, no_work):
    with pytest.raises(BerniniError, match="norm_threshold must be a number"):
        fp32_renderer("t2v", "a fox", norm_threshold="19", **SMALL)


# ------------------------------------------------------------------------------------------ warnings
def test_video_fps_with_a_file_warns_once(media_dir, caplog):
    clip = sorted(media_dir.glob("*.mp4"))[0]
    with caplog.at_level(logging.WARNING):
        media.load_video(clip, num_frames=5, video_fps=8)
    lines = [r.getMessage() for r in caplog.records if "video_fps" in r.getMessage()]
    assert len(lines) == 1 and "no effect" in lines[0] and str(clip) in lines[0]


def test_a_prompt_beyond_512_tokens_warns_once(fp32_renderer, caplog):
    prompt = " ".join(["a red fox runs"] * 400)
    with caplog.at_level(logging.WARNING):
        fp32_renderer.encode_prompt("t2v", prompt)
    lines = [r.getMessage() for r in caplog.records if "keeps the first 512" in r.getMessage()]
    assert len(lines) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fp32_renderer.encode_prompt("t2v", "a red fox runs")
    assert not [r for r in caplog.records if "keeps the first" in r.getMessage()]
