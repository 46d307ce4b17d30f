"""The CLI is honest: every flag's help states its default or choices, the program names itself as it was
started, a value the engine changes gets one warning line, every input that can be checked without the model is
checked before the model loads (batches included), and the log of a tiny run reads well."""

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from bernini_core import cli
from bernini_core.cli import build_parser, main
from bernini_core.errors import BerniniError
from bernini_core.pipeline import BerniniPipeline

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--num_frames", "5", "--height", "32", "--width", "32", "--max_image_size", "48",
         "--num_inference_steps", "2", "--device", "cpu"]


def generate_parser(prog: str = cli.PROG) -> argparse.ArgumentParser:
    parser = build_parser(prog)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["generate"]


# ---------------------------------------------------------------------------------------------------- --help
def test_every_generate_option_states_its_default_or_its_choices():
    options = [a for a in generate_parser()._actions if not isinstance(a, argparse._HelpAction)]
    assert len(options) > 40
    for action in options:
        flag = action.option_strings[0]
        text = action.help or ""
        assert text.strip(), f"{flag} has no help"
        states_default = "default" in text
        lists_choices = bool(action.choices) and all(str(c) in text or str(c) in action.format_usage()
                                                     for c in action.choices)
        required = action.required and "required" in text
        assert states_default or lists_choices or required, f"{flag}: {text!r}"


@pytest.mark.parametrize("flag", ["--dtype", "--attention", "--task_type", "--guidance_mode"])
def test_closed_sets_are_argparse_choices(flag, capsys):
    action = next(a for a in generate_parser()._actions if flag in a.option_strings)
    assert action.choices
    with pytest.raises(SystemExit) as info:
        main(["generate", "--config", "tiny", "--prompt", "x", flag, "no-such-value"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_closed_sets_are_what_the_engine_accepts():
    from bernini_core.renderer.attention import BACKENDS
    from bernini_core.runtime import DTYPES
    from bernini_core.sampling.guidance import RENDERER_MODES
    from bernini_core.sampling.guidance_full import FULL_MODES

    assert cli.RENDERER_GUIDANCE_MODES == RENDERER_MODES and cli.FULL_GUIDANCE_MODES == FULL_MODES
    assert set(cli.GUIDANCE_MODES) == set(RENDERER_MODES) | set(FULL_MODES)
    assert len(cli.GUIDANCE_MODES) == len(set(cli.GUIDANCE_MODES))
    assert set(cli.DTYPE_CHOICES) == set(DTYPES)
    assert set(cli.ATTENTION_CHOICES) == set(BACKENDS)


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"]])
def test_help_shows_examples_under_the_console_script_name(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bernini " if argv == ["--help"] else "usage: bernini generate ")
    assert "python -m bernini_core" not in out
    examples = out[out.index("examples:"):]
    assert "bernini generate --config tiny --task_type t2v" in examples  # the tiny run
    assert "--task_type v2v" in examples and "--video input.mp4" in examples  # a real edit
    assert "--inputs batch.jsonl" in examples  # a batch


def test_console_script_is_main_with_its_default_name():
    try:
        import tomllib
    except ImportError:  # Python 3.10: the test extra installs tomli
        import tomli as tomllib
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"bernini": "bernini_core.cli:main"}
    assert cli.PROG == "bernini"


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"]])
def test_python_dash_m_names_itself(argv):
    result = subprocess.run([sys.executable, "-m", "bernini_core", *argv], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m bernini_core")
    assert "python -m bernini_core generate --config tiny" in result.stdout
    assert "usage: bernini" not in result.stdout and "\n  bernini generate" not in result.stdout


# ---------------------------------------------------------------------------------------------------- checks first
@pytest.fixture
def no_model(monkeypatch):
    """Every model load (and tiny checkpoint write) is recorded and refused: a test using this fixture passes
    only if its error comes from the checks made before loading."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(BerniniPipeline, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr("bernini_core.tiny.make_tiny_renderer", refuse)
    monkeypatch.setattr("bernini_core.tiny_full.make_tiny_bernini", refuse)
    return calls


def _stop(*args, **kwargs):
    raise BerniniError("stop")


def _run(config, *args):
    return main(["generate", "--config", str(config), "--prompt", "a fox", *SMALL, *args])


@pytest.mark.parametrize("extra, fragments", [
    (["--task_type", "v2v", "--video", "/nonexistent/clip.mp4"],
     ("--video file", "/nonexistent/clip.mp4", "does not exist")),
    (["--task_type", "i2i", "--image", "/nonexistent/a.png"], ("--image file", "/nonexistent/a.png")),
    (["--task_type", "r2v", "--images", "/nonexistent/b.png"], ("--images file", "/nonexistent/b.png")),
    (["--task_type", "t2v", "--case", "/nonexistent/case.json"], ("--case file", "does not exist")),
    (["--task_type", "t2v", "--inputs", "/nonexistent/batch.jsonl"], ("--inputs file", "does not exist")),
    (["--task_type", "t2v", "--output", "/dev/null/out/x.mp4"], ("not writable",)),
    (["--task_type", "t2v", "--output", "/tmp/x.webm"], ("WebM",)),
    (["--task_type", "v2v"], ("needs a source video",)),
    (["--task_type", "t2v", "--guidance_mode", "vae_txt_vit_wapg"], ("not a Bernini-R mode",)),
    (["--task_type", "t2v", "--no-use_unipc"], ("t2v_apg", "needs the UniPC scheduler")),
    (["--task_type", "t2v", "--num_frames", "0"], ("num_frames is 0", "at least 1")),
    (["--task_type", "t2v", "--fps", "0"], ("fps is 0", "finite number in [0.001, 1000]")),
    (["--task_type", "t2v", "--num_inference_steps", "0"], ("num_inference_steps is 0", "at least 1")),
    (["--task_type", "t2v", "--height", "0"], ("height/width must be positive",)),
    (["--task_type", "t2v", "--vae_tile_px", "8"], ("tile_px=8",)),
    (["--task_type", "t2v", "--device", "gpu"], ("device 'gpu'",)),
])
def test_bad_input_fails_before_the_model_loads(tiny_renderer_dir, no_model, capsys, extra, fragments):
    assert _run(tiny_renderer_dir, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(f in err for f in fragments), err
    assert no_model == []


@pytest.mark.parametrize("extra, fragments", [
    (["--task_type", "t2v", "--height", "70"], ("multiples of 16", "70x32", "--height 64")),
    (["--task_type", "t2v", "--guidance_mode", "t2v_apg"], ("is a Bernini-R mode", "vae_txt_vit_wapg")),
    (["--task_type", "t2v", "--seed", "-1"], ("--seed -1", "0..4294967295")),
    (["--task_type", "t2v", "--planning_step", "0"], ("planning_step is 0", "at least 1")),
    (["--task_type", "i2i", "--image", "IMG", "--images", "IMG"], ("edits one image",)),
])
def test_full_bernini_checks_before_loading(tiny_bernini_v1_dir, media_dir, no_model, capsys, extra, fragments):
    extra = [str(media_dir / "ref0.png") if a == "IMG" else a for a in extra]
    assert _run(tiny_bernini_v1_dir, *extra) == 2
    err = capsys.readouterr().err
    assert all(f in err for f in fragments), err
    assert no_model == []


def test_tiny_config_checks_before_writing_the_checkpoint(no_model, capsys):
    assert _run("tiny", "--task_type", "v2v", "--video", "/nonexistent/clip.mp4") == 2
    assert "--video file '/nonexistent/clip.mp4' does not exist" in capsys.readouterr().err
    assert no_model == []


def test_every_batch_entry_is_checked_before_loading(tiny_renderer_dir, media_dir, no_model, tmp_path, capsys):
    (tmp_path / "clip.mp4").write_bytes((media_dir / "source.mp4").read_bytes())
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(json.dumps(e) for e in (
        {"task_type": "v2v", "prompt": "make it snow", "video": "clip.mp4"},
        {"task_type": "v2v", "prompt": "make it rain", "video": "missing.mp4"},
    )) + "\n")
    assert _run(tiny_renderer_dir, "--inputs", str(batch), "--output", str(tmp_path / "o.mp4")) == 2
    err = capsys.readouterr().err
    assert "--inputs entry 1: --video file 'missing.mp4'" in err and "does not exist" in err, err
    assert no_model == []


def test_batch_entry_with_an_unknown_task(tiny_renderer_dir, no_model, tmp_path, capsys):
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps([{"task_type": "t2v", "prompt": "a"}, {"task_type": "x2y", "prompt": "b"}]))
    assert _run(tiny_renderer_dir, "--inputs", str(batch)) == 2
    err = capsys.readouterr().err
    assert "--inputs entry 1: task_type 'x2y'" in err and "t2v" in err, err
    assert no_model == []


@pytest.mark.parametrize("entry, fragment", [
    ({"prompt": "x", "video": 5}, "--inputs entry 0: 'video' must be a path or a list of paths, got 5"),
    ({"prompt": "x", "images": ["a.png", None]}, "'images' must be a path or a list of paths"),
    ({"prompt": "x", "image": ["a.png"]}, "'image' must be a path, got [\"a.png\"]"),
    ({"prompt": 7}, "'prompt' must be text, got 7"),
])
def test_batch_entry_values_of_the_wrong_type(tiny_renderer_dir, no_model, tmp_path, capsys, entry, fragment):
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps([entry]))
    assert _run(tiny_renderer_dir, "--inputs", str(batch)) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err


def test_the_model_loads_once_the_checks_pass(tiny_renderer_dir, media_dir, no_model, capsys):
    with pytest.raises(AssertionError, match="loaded before"):
        _run(tiny_renderer_dir, "--task_type", "v2v", "--video", str(media_dir / "source.mp4"))
    assert len(no_model) == 1  # the fixture really catches a load: the tests above can fail


# ---------------------------------------------------------------------------------------------------- warnings
def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("config, extra, expected", [
    ("renderer", ["--task_type", "t2v", "--planning_step", "3", "--omega_tgt", "1.0"],
     ["--planning_step is ignored: Bernini-R has no planner", "--omega_tgt is ignored"]),
    ("full", ["--task_type", "t2v", "--eta", "0.2", "--no-use_src_tgt_id"],
     ["--eta is ignored: full Bernini's APG uses the official fixed settings", "--no-use_src_tgt_id is ignored"]),
    ("renderer", ["--task_type", "v2v", "--video", "VIDEO"],
     ["--height/--width are ignored: Bernini-R takes the output size from the source video"]),
    ("renderer", ["--task_type", "t2i", "--num_frames", "9"], ["--num_frames 9 is ignored: t2i renders one frame"]),
    ("renderer", ["--task_type", "t2v", "--video_fps", "24"], ["--video_fps is ignored: video files carry"]),
    ("full", ["--task_type", "v2v", "--video", "VIDEO"], []),  # full Bernini uses an explicit size with a source
])
def test_ignored_flags_get_one_warning_each(request, media_dir, caplog, monkeypatch, config, extra, expected):
    folder = request.getfixturevalue("tiny_renderer_dir" if config == "renderer" else "tiny_bernini_v1_dir")
    monkeypatch.setattr(BerniniPipeline, "from_pretrained", classmethod(_stop))
    extra = [str(media_dir / "source.mp4") if a == "VIDEO" else a for a in extra]
    with caplog.at_level(logging.WARNING):
        assert _run(folder, *extra) == 2  # stopped at the load: every check passed
    warnings = _warnings(caplog)
    assert len(warnings) == len(expected), warnings
    for fragment in expected:
        assert sum(fragment in w for w in warnings) == 1, warnings


def test_renderer_rounds_the_size_with_one_warning_per_value(caplog):
    from bernini_core.pipeline import RendererPipeline
    from bernini_core.stages import Sources

    settings = {"num_frames": 10, "height": 70, "width": 64}
    with caplog.at_level(logging.WARNING):
        geometry = RendererPipeline.output_geometry(None, Sources(task="t2v"), settings)
    assert geometry == (9, 64, 64)
    assert _warnings(caplog) == [
        "num_frames=10 is not of the form 4n+1; using 9 as the official pipeline does.",
        "height=70 is not a multiple of 16; using 64 (the nearest one) as the official pipeline does."]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert RendererPipeline.output_geometry(None, Sources(task="t2v"), dict(settings, num_frames=9,
                                                                                height=48)) == (9, 48, 64)
    assert _warnings(caplog) == []


def test_full_bernini_warns_about_the_frame_rule(caplog):
    from bernini_core.pipeline_full import FullPipeline, PlannerSources

    sources = PlannerSources(task="t2v", target_latent_shape=(3, 4, 4))
    with caplog.at_level(logging.WARNING):
        assert FullPipeline.output_geometry(None, sources, {"num_frames": 10, "height": 32, "width": 48}) == (9, 32, 48)
    assert _warnings(caplog) == ["num_frames=10 is not of the form 4n+1; using 9 as the official pipeline does."]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        FullPipeline.output_geometry(None, sources, {"num_frames": 9, "height": 32, "width": 48})
        FullPipeline.output_geometry(None, PlannerSources(task="t2i", target_latent_shape=(1, 4, 4)),
                                     {"num_frames": 81, "height": 32, "width": 48})
    assert _warnings(caplog) == []


def test_rounded_size_is_reported_by_the_cli(tiny_renderer_dir, tmp_path, caplog, capsys):
    out = tmp_path / "t2i.png"
    with caplog.at_level(logging.INFO):
        assert main(["generate", "--config", str(tiny_renderer_dir), "--task_type", "t2i", "--prompt", "a fox",
                     "--output", str(out), *SMALL, "--num_frames", "1", "--height", "36"]) == 0
    assert _warnings(caplog) == [
        "height=36 is not a multiple of 16; using 32 (the nearest one) as the official pipeline does."]
    saved = [r.getMessage() for r in caplog.records if r.getMessage().startswith("saved ")]
    assert saved == [f"saved {out} (1 frame, 32x32)"]


# ---------------------------------------------------------------------------------------------------- tiny runs
def test_tiny_1p3b_is_written_in_its_own_layout(monkeypatch, caplog):
    configs = []
    monkeypatch.setattr(BerniniPipeline, "from_pretrained",
                        classmethod(lambda cls, config, **k: configs.append(config) or _stop()))
    with caplog.at_level(logging.INFO):
        assert _run("tiny-1.3b", "--task_type", "t2v") == 2
    assert Path(configs[0]).name == "Bernini-R-1.3B-Diffusers"
    (line,) = [r.getMessage() for r in caplog.records if r.name == "bernini.cli"]
    assert line.startswith("--config tiny-1.3b: tiny random checkpoint in the Bernini-R-1.3B-Diffusers layout")
    assert "tiny random tiny" not in line


def test_transformers_progress_bars_are_off_only_during_our_load(monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    hub_before = are_progress_bars_disabled()
    for enabled in (True, False):
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        hub_state = are_progress_bars_disabled()
        with cli.transformers_progress_bars_off():
            assert not hf_logging.is_progress_bar_enabled()
            assert are_progress_bars_disabled() == hub_state  # the Hub's own bars are not touched
        assert hf_logging.is_progress_bar_enabled() is enabled
        with pytest.raises(RuntimeError):
            with cli.transformers_progress_bars_off():
                raise RuntimeError("a failed load")
        assert hf_logging.is_progress_bar_enabled() is enabled
    hf_logging.enable_progress_bar()
    if hub_before:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
