"""`python -m bernini_core generate` with full Bernini (v1 directory, `--config tiny-full-v2`): written files,
planner flags, error exits (docs/official_behaviour.md §4.8, §5.1, §5.4, §6.1, §6.2, §7.4)."""

from pathlib import Path

import pytest

from bernini_core.cli import main
from written_media import probe
from bernini_core.pipeline_full import FullPipeline

SMALL = ["--num_frames", "5", "--max_image_size", "48", "--num_inference_steps", "2", "--device", "cpu"]
FAST_PLAN = ["--planning_step", "2", "--vit_denoising_step", "1"]
FULL_MODES = ("vae_txt_vit_wapg", "vae_txt_vit", "rv2v_wapg", "v2v_apg")  # docs/official_behaviour.md §4.7


@pytest.fixture
def planner_calls(monkeypatch):
    """Records the planner settings every FullPipeline.plan_semantics call receives, then runs it."""
    calls = []
    original = FullPipeline.plan_semantics

    def spy(self, sources, embeds, **kwargs):
        calls.append(dict(kwargs, version=self.version))
        return original(self, sources, embeds, **kwargs)

    monkeypatch.setattr(FullPipeline, "plan_semantics", spy)
    return calls


def test_video_task_and_planner_flags(tiny_bernini_v1_dir, media_dir, tmp_path, capsys, planner_calls):
    out = tmp_path / "out" / "v2v.mp4"
    code = main(["generate", "--config", str(tiny_bernini_v1_dir), "--task_type", "v2v", "--prompt", "make it snow",
                 "--video", str(media_dir / "source.mp4"), "--output", str(out), "--fps", "12", *SMALL,
                 "--planning_step", "3", "--vit_denoising_step", "2", "--vit_txt_cfg", "1.5", "--vit_img_cfg", "0.5"])
    assert code == 0
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]) == out
    # v1 v2v preset: height/width 0 -> the source's size (48x40 -> 48x32, docs/official_behaviour.md §4.8); 5 frames
    # written at --fps.
    assert probe(out) == (5, 32, 48, 12.0)
    assert len(planner_calls) == 1
    call = planner_calls[0]
    assert call["version"] == "v1"
    assert (call["planning_step"], call["vit_denoising_step"], call["vit_txt_cfg"], call["vit_img_cfg"]) == (3, 2, 1.5, 0.5)
    assert call["prompt"] == "make it snow"


def test_image_task_writes_a_png_with_preset_planner_settings(tiny_bernini_v1_dir, tmp_path, capsys, planner_calls):
    out = tmp_path / "t2i.mp4"
    code = main(["generate", "--config", str(tiny_bernini_v1_dir), "--task_type", "t2i", "--prompt", "a fox",
                 "--output", str(out), "--height", "32", "--width", "48", *SMALL])
    assert code == 0
    written = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert written.suffix == ".png"  # one frame is written as PNG (official save_output)
    assert probe(written) == (1, 32, 48, None)
    # No planner flags: the values of docs/official_behaviour.md §5.1 (planning 25, ViT 5 steps, cfg 1.2 / 1.0) reach
    # the planner.
    call = planner_calls[0]
    assert (call["planning_step"], call["vit_denoising_step"], call["vit_txt_cfg"], call["vit_img_cfg"]) == (25, 5, 1.2, 1.0)
    assert call["seed"] == 42


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--task_type", "t2v", "--guidance_mode", "t2v_apg"], ("t2v_apg",) + FULL_MODES),
        (["--task_type", "v2v"], ("needs a source video",)),
        (["--task_type", "t2v", "--height", "0", "--width", "0"], ("height/width",)),
    ],
)
def test_errors_exit_2_with_a_message(tiny_bernini_v1_dir, capsys, extra, fragments):
    code = main(["generate", "--config", str(tiny_bernini_v1_dir), "--prompt", "a fox", *SMALL, *FAST_PLAN, *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert all(f in err for f in fragments), err


def test_split_checkpoints_with_a_full_directory(tiny_bernini_v1_dir, capsys):
    """docs/official_behaviour.md §6.1: full Bernini takes no --high_noise_ckpt/--low_noise_ckpt; the error must say
    so."""
    ckpt = str(Path(tiny_bernini_v1_dir) / "bernini")
    for flags in (["--high_noise_ckpt", ckpt], ["--high_noise_ckpt", ckpt, "--low_noise_ckpt", ckpt]):
        code = main(["generate", "--config", str(tiny_bernini_v1_dir), "--prompt", "a fox", "--task_type", "t2v",
                     *SMALL, *flags])
        assert code == 2
        err = capsys.readouterr().err
        assert "full Bernini" in err and "high_noise_ckpt" in err, err


def _task_media(task, media_dir):
    video, ref_video = str(media_dir / "source.mp4"), str(media_dir / "reference.mp4")
    refs = [str(media_dir / "ref0.png"), str(media_dir / "ref1.png")]
    return {
        "t2i": [], "t2v": [], "i2i": ["--image", refs[0]],
        "v2v": ["--video", video], "mv2v": ["--video", video], "ads2v": ["--video", video, ref_video],
        "r2v": ["--images", *refs], "rv2v": ["--video", video, "--images", *refs],
    }[task]


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("task", ["t2i", "i2i", "t2v", "v2v", "mv2v", "rv2v", "r2v", "ads2v"])
def test_every_task_through_the_cli(request, media_dir, tmp_path, capsys, task, version):
    folder = request.getfixturevalue(f"tiny_bernini_{version}_dir")
    size = ["--height", "32", "--width", "32"]  # every task gets an explicit size: small and comparable
    code = main(["generate", "--config", str(folder), "--task_type", task, "--prompt", "a fox",
                 "--output", str(tmp_path / f"{task}.mp4"), *SMALL, *FAST_PLAN, *size, *_task_media(task, media_dir)])
    assert code == 0
    written = Path(capsys.readouterr().out.strip().splitlines()[-1])
    frames, height, width, _ = probe(written)
    assert (height, width) == (32, 32)
    assert frames == (1 if task in ("t2i", "i2i") else 5)
    assert written.suffix == (".png" if task in ("t2i", "i2i") else ".mp4")
