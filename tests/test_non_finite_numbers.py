"""No NaN / inf video: every real-valued setting is checked for finiteness and range before any work, and
sampling stops at the first step whose latents are not finite, naming the step; no file is written."""

import math

import pytest
import torch

from bernini_core import BerniniError, BerniniPipeline
from bernini_core.cli import main
from bernini_core.tasks import check_numbers

SMALL = dict(num_frames=5, height=32, width=32, num_inference_steps=2, seed=3)


@pytest.fixture(scope="module")
def pipe(tiny_renderer_dir):
    return BerniniPipeline.from_pretrained(tiny_renderer_dir, device="cpu", dtype="fp32")


@pytest.mark.parametrize("name, value", [
    ("omega_txt", float("nan")), ("omega_img", float("inf")), ("omega_vid", 1e30), ("omega_tgt", -1e30),
    ("omega_scale", float("nan")), ("eta", 1e30), ("momentum", float("nan")), ("norm_threshold", [50, float("inf")]),
    ("flow_shift", 0.0), ("flow_shift", float("nan")), ("vit_txt_cfg", float("inf")), ("fps", 0),
    ("fps", float("nan")), ("video_fps", -1.0), ("height", 32.5), ("width", float("nan")), ("eta", "0.5"),
    ("norm_threshold", "19"),
])
def test_bad_numbers_are_refused_by_name(name, value):
    with pytest.raises(BerniniError, match=name):
        check_numbers({name: value})


def test_official_values_pass():
    check_numbers({"omega_txt": 4.0, "omega_scale": 0.75, "eta": 0.5, "momentum": 0.0, "norm_threshold": [50, 50, 50],
                   "flow_shift": 5.0, "fps": 16, "height": 480, "width": 848.0, "vit_txt_cfg": 1.2})


def test_api_refuses_before_any_work(pipe, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: calls.append(a))
    out = tmp_path / "nan.mp4"
    with pytest.raises(BerniniError, match=r"omega_txt is nan; it must be a finite number"):
        pipe("t2v", "a fox", output_path=str(out), omega_txt=math.nan, **SMALL)
    assert calls == [] and not out.exists()


def test_cli_refuses_a_nan_omega(tiny_renderer_dir, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    code = main(["generate", "--config", str(tiny_renderer_dir), "--task_type", "t2v", "--prompt", "a fox",
                 "--omega_txt", "nan", "--output", str(out), "--device", "cpu"])
    assert code == 2 and "omega_txt is nan" in capsys.readouterr().err and not out.exists()


def test_nan_weights_stop_at_the_first_step(tiny_renderer_dir, tmp_path):
    pipe = BerniniPipeline.from_pretrained(tiny_renderer_dir, device="cpu", dtype="fp32")
    with torch.no_grad():
        next(pipe.components.dit_high.parameters()).fill_(float("nan"))
    out = tmp_path / "black.mp4"
    with pytest.raises(BerniniError, match=r"sampling step 1/2 \(dit_high\) produced non-finite latents"):
        pipe("t2v", "a fox", output_path=str(out), **SMALL)
    assert not out.exists()
