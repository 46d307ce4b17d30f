"""`python -m bernini_core generate`: every Bernini-R task, case files, written files, error exits."""

import json
from pathlib import Path

import pytest

from bernini_core.cli import main
from written_media import probe

SMALL = ["--num_frames", "5", "--height", "32", "--width", "32", "--max_image_size", "48",
         "--num_inference_steps", "2", "--device", "cpu"]


def task_args(task, media_dir):
    video, ref_video = str(media_dir / "source.mp4"), str(media_dir / "reference.mp4")
    refs = [str(media_dir / "ref0.png"), str(media_dir / "ref1.png")]
    return {
        "t2i": [], "t2v": [],
        "i2i": ["--image", refs[0]],
        "v2v": ["--video", video], "mv2v": ["--video", video],
        "ads2v": ["--video", video, ref_video],
        "r2v": ["--images", *refs],
        "rv2v": ["--video", video, "--images", *refs],
    }[task]


@pytest.mark.parametrize("task", ["t2i", "i2i", "t2v", "v2v", "mv2v", "ads2v", "r2v", "rv2v"])
def test_every_task_writes_a_decodable_file(tiny_renderer_dir, media_dir, tmp_path, task, capsys):
    out = tmp_path / "out" / f"{task}.mp4"
    code = main(["generate", "--config", str(tiny_renderer_dir), "--task_type", task, "--prompt", "a fox",
                 "--output", str(out), "--fps", "12", *SMALL, *task_args(task, media_dir)])
    assert code == 0
    written = Path(capsys.readouterr().out.strip().splitlines()[-1])
    n, h, w, fps = probe(written)
    if task in ("t2i", "i2i"):
        assert written.suffix == ".png" and n == 1  # one frame is written as PNG (official save_output)
    else:
        assert written == out and n == 5 and fps == 12.0
    expected = (32, 32) if task in ("t2i", "t2v", "r2v") else (32, 48)
    assert (h, w) == expected


def test_case_file_with_relative_media(tiny_renderer_dir, media_dir, tmp_path, capsys):
    case = tmp_path / "case.json"
    (tmp_path / "clip.mp4").write_bytes((media_dir / "source.mp4").read_bytes())
    case.write_text(json.dumps({"task_type": "v2v", "prompt": "make it snow", "video": "clip.mp4",
                                "output": str(tmp_path / "case_out.mp4")}))
    assert main(["generate", "--config", str(tiny_renderer_dir), "--case", str(case), *SMALL]) == 0
    assert probe(tmp_path / "case_out.mp4")[:3] == (5, 32, 48)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--task_type", "v2v"], "needs a source video"),
        (["--task_type", "t2v", "--output", "/dev/null/x.mp4"], "not writable"),
        (["--task_type", "t2v", "--case", "/nonexistent.json"], "does not exist"),
    ],
)
def test_errors_exit_2_with_a_message(tiny_renderer_dir, capsys, extra, fragment):
    code = main(["generate", "--config", str(tiny_renderer_dir), "--prompt", "a fox", *SMALL, *extra])
    assert code == 2
    assert fragment in capsys.readouterr().err


def test_wrong_config_directory(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    assert main(["generate", "--config", str(tmp_path / "junk"), "--prompt", "a fox", "--task_type", "t2v"]) == 2
    assert "junk" in capsys.readouterr().err


def test_inputs_batch_runs_every_entry_with_one_model_load(tiny_renderer_dir, media_dir, tmp_path, capsys,
                                                           monkeypatch):
    from bernini_core.pipeline import BerniniPipeline

    loads = []
    original = BerniniPipeline.from_pretrained.__func__
    monkeypatch.setattr(BerniniPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k)))
    (tmp_path / "clip.mp4").write_bytes((media_dir / "source.mp4").read_bytes())
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(json.dumps(e) for e in (
        {"task_type": "t2v", "prompt": "a fox", "output": str(tmp_path / "a.mp4")},
        {"task_type": "v2v", "prompt": "make it snow", "video": "clip.mp4", "guidance_mode": "v2v"},
    )) + "\n")
    assert main(["generate", "--config", str(tiny_renderer_dir), "--inputs", str(batch),
                 "--output", str(tmp_path / "out.mp4"), *SMALL]) == 0
    written = [Path(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert written == [tmp_path / "a.mp4", tmp_path / "out_001.mp4"] and len(loads) == 1
    assert probe(written[0])[:3] == (5, 32, 32) and probe(written[1])[:3] == (5, 32, 48)


@pytest.mark.parametrize("content, fragment", [
    ('[{"task_type": "t2v"}]', "set 'prompt'"),
    ('[{"prompt": "x", "seed": 3}]', "unsupported keys"),
    ("not json", "not valid JSON"),
])
def test_inputs_batch_errors(tiny_renderer_dir, tmp_path, capsys, content, fragment):
    batch = tmp_path / "batch.json"
    batch.write_text(content)
    assert main(["generate", "--config", str(tiny_renderer_dir), "--inputs", str(batch), *SMALL]) == 2
    assert fragment in capsys.readouterr().err
