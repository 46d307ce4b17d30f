"""Progress outside ComfyUI (bernini_core/progress.py): the `progress(stage, step, total)` callback of
from_pretrained and of a pipeline call, and the CLI's tqdm bars on stderr (off with --quiet)."""

import json
import threading
from pathlib import Path

import pytest

from bernini_core import BerniniPipeline
from bernini_core.cli import main
from bernini_core.progress import StageSteps, TqdmProgress

RENDERER_SMALL = dict(num_frames=5, height=32, width=32, max_image_size=48, num_inference_steps=3)
FULL_SMALL = dict(num_frames=5, height=32, width=32, max_image_size=48, num_inference_steps=2, planning_step=2,
                  vit_denoising_step=1)
CLI_SMALL = ["--num_frames", "5", "--height", "32", "--width", "32", "--max_image_size", "48",
             "--num_inference_steps", "3", "--device", "cpu"]
BAR_LABELS = ("loading", "encoding", "planning", "denoising", "decoding")


def stage_runs(events):
    """[(stage, total)] of the stage runs in order, checking that each run reports 0, 1, ..., total once."""
    runs = []
    for stage, step, total in events:
        if step == 0:
            runs.append((stage, total, []))
        assert runs and runs[-1][0] == stage and runs[-1][1] == total, events
        runs[-1][2].append(step)
    for stage, total, steps in runs:
        assert steps == list(range(total + 1)), (stage, total, steps)
    return [(stage, total) for stage, total, _ in runs]


@pytest.fixture(scope="module")
def renderer(tiny_renderer_dir):
    events = []
    pipe = BerniniPipeline.from_pretrained(tiny_renderer_dir, device="cpu", dtype="bf16",
                                           progress=lambda *e: events.append(e))
    return pipe, events


def test_renderer_load_reports_each_component(renderer):
    _, events = renderer
    assert stage_runs(events) == [("load", 4)]  # high and low expert, UMT5, VAE


def test_renderer_call_reports_encode_sample_decode_in_order(renderer, media_dir):
    pipe, _ = renderer
    events = []
    refs = [str(media_dir / "ref0.png"), str(media_dir / "ref1.png")]
    out = pipe("rv2v", "a fox", video=str(media_dir / "source.mp4"), images=refs,
               progress=lambda *e: events.append(e), **RENDERER_SMALL)
    frames_t = out.latents.shape[2]  # one decoder call per latent frame
    # encode: the prompt, the source video, two references
    assert stage_runs(events) == [("encode", 4), ("sample", 3), ("decode", frames_t)]


def test_tiled_decode_reports_every_tile(renderer):
    pipe, _ = renderer
    events = []
    out = pipe("t2v", "a fox", progress=lambda *e: events.append(e),
               **dict(RENDERER_SMALL, height=48, width=48, vae_tile_px=32, vae_tile_overlap_px=8))
    # 48 px in tiles of 32 every 24 px: 2 x 2 tiles, each decoded frame by frame
    assert stage_runs(events)[-1] == ("decode", 4 * out.latents.shape[2])


def test_the_callback_belongs_to_its_call_only(renderer):
    pipe, _ = renderer
    first, second = [], []
    pipe("t2v", "a fox", progress=lambda *e: first.append(e), **RENDERER_SMALL)
    count = len(first)
    pipe("t2v", "a fox", **RENDERER_SMALL)  # no callback: nothing left behind from the first call
    assert len(first) == count and pipe.runtime._progress is None

    first.clear()
    threads = [threading.Thread(target=pipe, args=("t2v", "a fox"),
                                kwargs=dict(progress=lambda *e, sink=sink: sink.append(e), **RENDERER_SMALL))
               for sink in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stage_runs(first) == stage_runs(second) == [("encode", 1), ("sample", 3), ("decode", 2)]


def test_full_bernini_load_and_call_report_plan_between_encode_and_sample(tiny_bernini_v1_dir, media_dir):
    events = []
    pipe = BerniniPipeline.from_pretrained(tiny_bernini_v1_dir, device="cpu", dtype="bf16",
                                           progress=lambda *e: events.append(e))
    assert stage_runs(events) == [("load", 5)]  # planner, two experts, UMT5, VAE
    events.clear()
    out = pipe("v2v", "make it snow", video=str(media_dir / "source.mp4"), progress=lambda *e: events.append(e),
               **FULL_SMALL)
    # encode: the source video, then the prompt (the official order); MaskGIT steps 1..planning_step
    assert stage_runs(events) == [("encode", 2), ("plan", 2), ("sample", 2), ("decode", out.latents.shape[2])]


def test_stage_steps_never_overrun_and_do_nothing_without_a_callback():
    events = []
    steps = StageSteps(lambda *e: events.append(e), "decode", 2)
    for _ in range(3):
        steps.advance()
    assert events == [("decode", 0, 2), ("decode", 1, 2), ("decode", 2, 2)]  # a surplus step is not reported
    StageSteps(None, "decode", 2).advance()  # no callback: no error


def test_tqdm_progress_starts_a_bar_per_stage_run(capsys):
    bars = TqdmProgress(prefix="run 2/5 ")
    for stage, total in (("sample", 3), ("decode", 2)):
        for step in range(total + 1):
            bars(stage, step, total)
    bars("decode", 2, 2)  # the last step again: no second bar
    bars.close()
    err = capsys.readouterr().err
    assert "run 2/5 denoising: 100%" in err and "3/3" in err and "run 2/5 decoding: 100%" in err
    assert err.count("decoding:   0%") == 1


# ------------------------------------------------------------------------------------------------------- CLI
def test_cli_draws_bars_on_stderr_and_keeps_stdout_for_the_path(tiny_renderer_dir, tmp_path, capsys):
    out = tmp_path / "t2v.mp4"
    assert main(["generate", "--config", str(tiny_renderer_dir), "--task_type", "t2v", "--prompt", "a fox",
                 "--output", str(out), *CLI_SMALL]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{out}\n"
    for label in ("loading", "encoding", "denoising", "decoding"):
        assert f"{label}: 100%" in captured.err, captured.err
    assert "3/3" in captured.err and ("s/step" in captured.err or "step/s" in captured.err)  # speed, ETA


def test_cli_quiet_draws_no_bars(tiny_renderer_dir, tmp_path, capsys):
    out = tmp_path / "quiet.mp4"
    assert main(["generate", "--config", str(tiny_renderer_dir), "--task_type", "t2v", "--prompt", "a fox",
                 "--output", str(out), "--quiet", *CLI_SMALL]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{out}\n"
    assert "%|" not in captured.err and not any(label in captured.err for label in BAR_LABELS), captured.err


def test_cli_quiet_still_prints_errors(tiny_renderer_dir, capsys):
    assert main(["generate", "--config", str(tiny_renderer_dir), "--task_type", "v2v", "--prompt", "a fox",
                 "--quiet", *CLI_SMALL]) == 2
    assert "needs a source video" in capsys.readouterr().err


def test_cli_batch_bars_name_the_run(tiny_renderer_dir, tmp_path, capsys):
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(json.dumps({"task_type": "t2v", "prompt": p}) for p in ("a fox", "a cat")) + "\n")
    assert main(["generate", "--config", str(tiny_renderer_dir), "--inputs", str(batch),
                 "--output", str(tmp_path / "b.mp4"), *CLI_SMALL]) == 0
    captured = capsys.readouterr()
    assert [Path(p) for p in captured.out.split()] == [tmp_path / "b_000.mp4", tmp_path / "b_001.mp4"]
    assert "run 1/2 denoising: 100%" in captured.err and "run 2/2 decoding: 100%" in captured.err


def test_cli_full_bernini_shows_planning(tiny_bernini_v1_dir, tmp_path, capsys):
    out = tmp_path / "full.mp4"
    assert main(["generate", "--config", str(tiny_bernini_v1_dir), "--task_type", "t2v", "--prompt", "a fox",
                 "--output", str(out), *CLI_SMALL, "--num_inference_steps", "2", "--planning_step", "2",
                 "--vit_denoising_step", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{out}\n"
    assert "planning: 100%" in captured.err and "denoising: 100%" in captured.err, captured.err
