"""Everything checkable is checked before the models load (CLI) or the first stage runs (Python API): whole
numbers, step counts, seeds, sizes and frame counts, the memory a size needs, devices, output paths, and whether
each media file decodes."""

import logging

import numpy as np
import pytest

from bernini_core import BerniniError, BerniniPipeline
from bernini_core import media
from bernini_core.cli import main
from bernini_core.memory_estimate import check_fits, render_estimate
from bernini_core.pipeline import BerniniPipeline as Base
from bernini_core.runtime import resolve_device
from bernini_core.tasks import MAX_STEPS, check_numbers, resolve_settings

SMALL = dict(num_frames=5, height=32, width=32, num_inference_steps=2, seed=3)




@pytest.fixture
def no_model(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(Base, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr("bernini_core.tiny.make_tiny_renderer", refuse)
    monkeypatch.setattr("bernini_core.tiny_full.make_tiny_bernini", refuse)
    return calls


# ------------------------------------------------------------------------------------- whole numbers and maxima
@pytest.mark.parametrize("name, value, fragment", [
    ("num_inference_steps", 2.7, "whole number"), ("seed", 7.9, "whole number"), ("num_frames", "9", "whole number"),
    ("num_inference_steps", True, "whole number"), ("planning_step", float("nan"), "whole number"),
    ("height", "480", "whole number"),
    ("num_frames", 0, "at least 1"), ("num_frames", -7, "at least 1"), ("num_inference_steps", 0, "at least 1"),
    ("vit_denoising_step", 0, "at least 1"), ("max_image_size", 8, "at least 16"), ("height", -32, "at least 0"),
    ("num_inference_steps", 100000, "sane maximum of 200"), ("planning_step", 10**6, "sane maximum of 200"),
    ("vit_denoising_step", 201, "sane maximum of 200"),
    ("seed", 2**64, "out of range"), ("seed", -(2**63) - 1, "out of range"),
])
def test_whole_number_settings_are_checked_not_truncated(name, value, fragment):
    with pytest.raises(BerniniError, match=name) as info:
        check_numbers({name: value})
    assert fragment in str(info.value)


def test_whole_floats_become_ints_and_force_lifts_the_step_maxima():
    settings = resolve_settings({"num_inference_steps": 40.0, "seed": 7, "num_frames": 81}, {})
    assert settings["num_inference_steps"] == 40 and isinstance(settings["num_inference_steps"], int)
    assert resolve_settings({}, {"num_inference_steps": MAX_STEPS + 1}, force=True)["num_inference_steps"] == 201
    with pytest.raises(BerniniError, match="out of range"):  # force never lifts the seed range
        resolve_settings({}, {"seed": 2**64}, force=True)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(num_inference_steps=2.7), "num_inference_steps"), (dict(seed=7.9), "seed"),
    (dict(num_frames="9"), "num_frames"), (dict(num_inference_steps=100000), "sane maximum"),
    (dict(seed=2**64), "seed"), (dict(num_frames=-7), "num_frames"), (dict(fps=0), "fps"),
    (dict(height=100000, width=100000), "GiB of working memory"),
])
def test_the_api_refuses_before_any_stage(fp32_renderer, no_work, kwargs, fragment):
    with pytest.raises(BerniniError, match=fragment):
        fp32_renderer("t2v", "a fox", **{**SMALL, **kwargs})
    assert no_work == []


def test_full_bernini_seed_range_is_checked_before_any_stage(tiny_bernini_v1_dir, monkeypatch):
    full = BerniniPipeline.from_pretrained(tiny_bernini_v1_dir, device="cpu", dtype="fp32")
    calls = []
    for stage in ("encode_prompt", "prepare_sources", "plan_semantics"):
        monkeypatch.setattr(full, stage, lambda *a, _s=stage, **k: calls.append(_s))
    with pytest.raises(BerniniError, match="0..4294967295"):
        full("t2v", "a fox", **{**SMALL, "seed": 2**32})
    assert calls == []


# ------------------------------------------------------------------------------------------------- memory
def test_a_size_beyond_the_machines_memory_is_refused_with_the_estimate(fp32_renderer):
    with pytest.raises(BerniniError) as info:
        check_fits(81, 100000, 100000, "cpu")
    message = str(info.value)
    assert "100000x100000" in message and "GiB of working memory" in message and "force=True (--force)" in message
    check_fits(81, 100000, 100000, "cpu", force=True)  # forced: no refusal
    check_fits(81, 480, 848, "cpu", dit=fp32_renderer.experts.high.module)  # the official size fits


def test_the_estimate_counts_the_dit_activations(fp32_renderer):
    without, host = render_estimate(81, 480, 848)
    with_dit, _ = render_estimate(81, 480, 848, dit=fp32_renderer.experts.high.module, source_tokens=10**7)
    assert with_dit > without > 0 and host == 81 * 480 * 848 * 3 * 5


def test_the_sample_stage_checks_memory_for_sizes_the_sources_fix(fp32_renderer, monkeypatch):
    """Nodes call the stages directly: sample() refuses before the first step."""
    embeds = fp32_renderer.encode_prompt("t2v", "a fox")
    sources = fp32_renderer.prepare_sources("t2v")
    settings = fp32_renderer.resolve("t2v", dict(SMALL, height=100000, width=100000))
    monkeypatch.setattr("bernini_core.pipeline.renderer_denoise", lambda *a, **k: pytest.fail("sampling started"))
    with pytest.raises(BerniniError, match="GiB of working memory"):
        fp32_renderer.sample(embeds, sources, settings)


def test_the_cli_refuses_a_huge_size_before_loading(tiny_renderer_dir, no_model, capsys):
    assert main(["generate", "--config", str(tiny_renderer_dir), "--prompt", "a fox", "--task_type", "t2v",
                 "--height", "100000", "--width", "100000"]) == 2
    assert "GiB of working memory" in capsys.readouterr().err and no_model == []


# -------------------------------------------------------------------------------------------- devices and paths
@pytest.mark.parametrize("device, fragment", [("meta", "cannot run Bernini"), ("mps", "MPS is not available"),
                                              ("cuda:7", "CUDA")])
def test_devices_this_machine_lacks_are_one_clear_line(device, fragment):
    import torch

    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(BerniniError, match=fragment):
        resolve_device(device)


@pytest.mark.parametrize("output, fragment", [(5, "must be a file path"), ("out\x00put.mp4", "NUL byte"),
                                              ("x" * 300 + ".mp4", "bytes long"), ("clip.webm", "WebM")])
def test_bad_output_paths_are_refused_before_any_stage(fp32_renderer, no_work, tmp_path, output, fragment):
    path = output if not isinstance(output, str) else str(tmp_path / output)
    with pytest.raises(BerniniError, match=fragment):
        fp32_renderer("t2v", "a fox", output_path=path, **SMALL)
    assert no_work == []


def test_the_cli_refuses_a_nul_output_before_loading(tiny_renderer_dir, no_model, capsys):
    assert main(["generate", "--config", str(tiny_renderer_dir), "--prompt", "a fox", "--task_type", "t2v",
                 "--height", "32", "--width", "32", "--output", "a\x00b.mp4"]) == 2
    assert "NUL byte" in capsys.readouterr().err and no_model == []


# ------------------------------------------------------------------------------------------------- media files
@pytest.mark.parametrize("flag, name", [("--video", "broken.mp4"), ("--image", "broken.png")])
def test_media_that_does_not_decode_is_refused_before_loading(tiny_renderer_dir, tmp_path, no_model, capsys, flag,
                                                              name):
    path = tmp_path / name
    path.write_bytes(b"\x00not a media file" * 64)
    task = "v2v" if flag == "--video" else "i2i"
    assert main(["generate", "--config", str(tiny_renderer_dir), "--prompt", "a fox", "--task_type", task, flag,
                 str(path)]) == 2
    err = capsys.readouterr().err
    assert "cannot be decoded" in err and str(path) in err and no_model == []


def test_media_that_decodes_passes(media_dir):
    media.check_image_file(media_dir / "ref0.png")
    for path in sorted(media_dir.glob("*.mp4"))[:1]:
        media.check_video_file(path)


# ------------------------------------------------------------------------------------------ adjusted values
@pytest.mark.parametrize("height, width, expected", [(40, 32, "height=40"), (32, 8, "width=8")])
def test_rounded_sizes_get_one_warning_line(fp32_renderer, caplog, height, width, expected):
    sources = fp32_renderer.prepare_sources("t2v")
    settings = fp32_renderer.resolve("t2v", dict(SMALL, height=height, width=width))
    with caplog.at_level(logging.WARNING):
        frames, h, w = fp32_renderer.output_geometry(sources, settings)
    assert (h, w) == ((32 if height == 40 else 32), (16 if width == 8 else 32))
    assert [r.getMessage() for r in caplog.records if expected in r.getMessage()] != []
    assert np.all(np.array([h, w]) % 16 == 0)
