"""Bad inputs a second round of trying found: flags given as strings, a model folder missing its config, URLs,
names that grow too long when numbered, folders only root could fool os.access about, ignored settings."""

import json
import logging
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from bernini_core import BerniniError, BerniniPipeline, media
from bernini_core.cli import main
from bernini_core.loaders import RendererConfig
from bernini_core.runtime import resolve_dtype

SMALL = dict(num_frames=5, height=32, width=32, num_inference_steps=2, seed=3)




@pytest.mark.parametrize("kwargs, fragment", [
    (dict(overwrite="false"), "overwrite must be True or False, got str"),
    (dict(force="yes"), "force must be True or False"),
    (dict(progress="tqdm"), "progress must be a function"),
])
def test_flags_of_the_wrong_type_are_refused_before_any_stage(fp32_renderer, no_work, tmp_path, kwargs, fragment):
    user = tmp_path / "clip.mp4"
    user.write_bytes(b"the user's video")
    with pytest.raises(BerniniError, match=fragment):
        fp32_renderer("t2v", "a fox", output_path=str(user), **SMALL, **kwargs)
    assert no_work == [] and user.read_bytes() == b"the user's video"


def test_ads2v_takes_exactly_two_videos(fp32_renderer, no_work, media_dir):
    clip = str(media_dir / "source.mp4")
    with pytest.raises(BerniniError, match="takes two videos"):
        fp32_renderer("ads2v", "add it", video=[clip, clip, clip], **SMALL)


def test_settings_the_family_ignores_get_one_warning_each(fp32_renderer, caplog, monkeypatch):
    monkeypatch.setattr(fp32_renderer, "encode_prompt", lambda *a, **k: (_ for _ in ()).throw(BerniniError("stop")))
    with caplog.at_level(logging.WARNING), pytest.raises(BerniniError, match="stop"):
        fp32_renderer("t2v", "a fox", planning_step=10, omega_tgt=1.0, **SMALL)
    lines = [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]
    assert len(lines) == 2 and "planning_step is ignored: Bernini-R has no planner" in lines[0]


@pytest.mark.parametrize("boundary", [87.5, float("nan"), -0.1, "0.875"])
def test_an_expert_boundary_outside_0_1_is_refused(boundary):
    with pytest.raises(BerniniError, match="switch_dit_boundary"):
        RendererConfig.from_dict({"switch_dit_boundary": boundary})


def test_only_the_supported_dtypes_are_accepted():
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(BerniniError, match="not supported; use one of bf16, fp16, fp32"):
        resolve_dtype(torch.float64)


def test_a_model_path_that_is_not_a_path_is_named():
    with pytest.raises(BerniniError, match="needs the model folder's path, got NoneType"):
        BerniniPipeline.from_pretrained(None)


def test_a_folder_missing_its_config_says_so(tiny_renderer_dir, tmp_path):
    folder = tmp_path / "no_config"
    shutil.copytree(tiny_renderer_dir, folder, symlinks=True)
    (folder / "config.json").unlink()
    with pytest.raises(BerniniError, match="no config.json"):
        BerniniPipeline.from_pretrained(folder, device="cpu")


def test_full_bernini_refuses_a_missing_device_before_loading(tiny_bernini_v1_dir, monkeypatch):
    monkeypatch.setattr("bernini_core.loaders_full.load_full", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(BerniniError, match="meta"):
        BerniniPipeline.from_pretrained(tiny_bernini_v1_dir, device="meta")


@pytest.mark.parametrize("kind", ["video", "image"])
def test_urls_are_named_as_urls(kind):
    url = f"https://example.com/clip.{'mp4' if kind == 'video' else 'png'}"
    with pytest.raises(BerniniError, match="is a URL; only local files are read"):
        media.load_video(url) if kind == "video" else media.load_image(url)
    with pytest.raises(BerniniError, match="is a URL"):
        media.check_video_file(url) if kind == "video" else media.check_image_file(url)


def test_a_long_existing_name_numbers_within_the_name_limit(tmp_path):
    path = tmp_path / ("n" * 250 + ".png")
    path.write_bytes(b"the user's image")
    written = media.save_output(np.zeros((1, 8, 8, 3), np.uint8), path, fps=16)
    assert path.read_bytes() == b"the user's image" and written != path and written.is_file()
    assert len(os.fsencode(written.name)) <= 255 and written.name.endswith("_00001.png")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_a_folder_that_cannot_hold_files_is_refused_up_front():
    with pytest.raises(BerniniError, match="is not writable"):
        media.check_output_path("/proc/bernini_clip.mp4")


def test_the_cli_refuses_a_blank_prompt_before_loading(tiny_renderer_dir, monkeypatch, capsys):
    monkeypatch.setattr(BerniniPipeline, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    assert main(["generate", "--config", str(tiny_renderer_dir), "--prompt", "   ", "--task_type", "t2v",
                 "--height", "32", "--width", "32"]) == 2
    assert "prompt is empty" in capsys.readouterr().err


def test_full_bernini_whole_calls_keep_the_planner_seed_range(tiny_bernini_v1_dir, monkeypatch):
    full = BerniniPipeline.from_pretrained(tiny_bernini_v1_dir, device="cpu", dtype="fp32")
    assert full.resolve("t2v", {"seed": 2**40})["seed"] == 2**40  # the Sample node's noise seed
    monkeypatch.setattr(full, "prepare_sources", lambda *a, **k: pytest.fail("a stage started"))
    with pytest.raises(BerniniError, match="0..4294967295"):
        full("t2v", "a fox", **{**SMALL, "seed": 2**40})


def test_the_settings_file_of_save_latents_is_json(tmp_path):
    written = media.save_latents(torch.zeros(1, 16, 1, 2, 2), tmp_path / "l.safetensors", {"norm_threshold": (50,)})
    from safetensors import safe_open

    with safe_open(str(written), "pt") as f:
        assert json.loads(f.metadata()["bernini_settings"]) == {"norm_threshold": [50]}
