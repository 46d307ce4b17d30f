"""Nothing a user owns is overwritten: an existing output keeps its bytes and the result goes to the next free
numbered name (as ComfyUI's savers number theirs), unless overwrite=True / --overwrite; a batch whose entries
would write one file is refused before any model loads; the path written is always reported."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from bernini_core import BerniniError, BerniniPipeline, media
from bernini_core.cli import main

SMALL = ["--num_frames", "5", "--height", "32", "--width", "32", "--num_inference_steps", "1", "--device", "cpu"]
USER_BYTES = b"the user's own file, not a render"


def user_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(USER_BYTES)
    return path


def pixels(path):
    """The decoded frames of a written video (MP4 headers carry a creation time, so bytes differ run to run)."""
    return media.read_video(path)[0]


def frames(n):
    return np.random.default_rng(0).integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)


# ------------------------------------------------------------------ media.save_output
@pytest.mark.parametrize("asked, n, expected", [
    ("clip.mp4", 5, "clip_00001.mp4"),
    ("still.png", 1, "still_00001.png"),
    ("clip.png", 5, "clip_00001.mp4"),  # a video asked as .png goes to clip.mp4, which is the user's
])
def test_an_existing_file_keeps_its_bytes(tmp_path, caplog, asked, n, expected):
    existing = user_file(tmp_path / media.planned_output(asked, n).name)
    with caplog.at_level(logging.WARNING, logger="bernini_core.media"):
        written = media.save_output(frames(n), tmp_path / asked, fps=16)
    assert existing.read_bytes() == USER_BYTES
    assert written == tmp_path / expected and written.stat().st_size > 0
    assert f"{existing} already exists; wrote {written} instead" in caplog.text
    assert not list(tmp_path.glob("*.part"))


def test_numbering_skips_taken_names_and_overwrite_replaces(tmp_path):
    taken = [user_file(tmp_path / name) for name in ("out.mp4", "out_00001.mp4", "out_00002.mp4")]
    assert media.save_output(frames(5), tmp_path / "out.mp4", fps=16) == tmp_path / "out_00003.mp4"
    assert all(p.read_bytes() == USER_BYTES for p in taken)
    replaced = media.save_output(frames(5), tmp_path / "out.mp4", fps=16, overwrite=True)
    assert replaced == taken[0] and taken[0].read_bytes() != USER_BYTES
    assert all(p.read_bytes() == USER_BYTES for p in taken[1:])


# ------------------------------------------------------------------ the Python API
def test_pipeline_keeps_the_users_file(tiny_renderer_dir, tmp_path):
    pipe = BerniniPipeline.from_pretrained(tiny_renderer_dir, device="cpu", dtype="fp32")
    existing = user_file(tmp_path / "fox.mp4")
    kwargs = dict(num_frames=5, height=32, width=32, num_inference_steps=1, seed=3)
    out = pipe("t2v", "a fox", output_path=str(existing), **kwargs)
    assert existing.read_bytes() == USER_BYTES and Path(out.output_path) == tmp_path / "fox_00001.mp4"
    again = pipe("t2v", "a fox", output_path=str(existing), overwrite=True, **kwargs)
    assert Path(again.output_path) == existing and existing.read_bytes() != USER_BYTES
    assert pixels(existing).shape == pixels(out.output_path).shape == (5, 32, 32, 3)


# ------------------------------------------------------------------ the CLI
def test_cli_keeps_the_users_file_and_prints_the_path_written(tiny_renderer_dir, tmp_path, capsys):
    existing = user_file(tmp_path / "out.mp4")
    args = ["generate", "--config", str(tiny_renderer_dir), "--task_type", "t2v", "--prompt", "a fox",
            "--output", str(existing), *SMALL]
    assert main(args) == 0
    printed = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert existing.read_bytes() == USER_BYTES and printed == tmp_path / "out_00001.mp4" and printed.is_file()
    assert main(args + ["--overwrite"]) == 0
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]) == existing
    assert existing.read_bytes() != USER_BYTES and pixels(existing).shape == pixels(printed).shape


def test_batch_entries_writing_one_file_are_refused_before_loading(tiny_renderer_dir, tmp_path, capsys, monkeypatch):
    loads = []
    monkeypatch.setattr(BerniniPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a)))
    batch = tmp_path / "batch.json"
    # "b.png" for a video becomes b.mp4: the same file as the first entry's
    batch.write_text(json.dumps([{"task_type": "t2v", "prompt": "a", "output": str(tmp_path / "b.mp4")},
                                 {"task_type": "t2v", "prompt": "b", "output": str(tmp_path / "b.png")}]))
    code = main(["generate", "--config", str(tiny_renderer_dir), "--inputs", str(batch), *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and "--inputs entries 0 and 1 both write" in err and "b.mp4" in err
    assert loads == [] and not (tmp_path / "b.mp4").exists()


def test_a_second_batch_does_not_overwrite_the_first(tiny_renderer_dir, tmp_path, capsys):
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(json.dumps({"task_type": "t2v", "prompt": p}) for p in ("a fox", "a cat")))
    args = ["generate", "--config", str(tiny_renderer_dir), "--inputs", str(batch),
            "--output", str(tmp_path / "run.mp4"), *SMALL]
    assert main(args) == 0
    first = capsys.readouterr().out.split()
    assert [Path(p).name for p in first] == ["run_000.mp4", "run_001.mp4"]
    before = [pixels(p) for p in first]
    for p in first:  # the user edits the first batch's results
        Path(p).write_bytes(USER_BYTES)
    assert main(args) == 0
    second = capsys.readouterr().out.split()
    assert [Path(p).name for p in second] == ["run_000_00001.mp4", "run_001_00001.mp4"]
    assert all(Path(p).read_bytes() == USER_BYTES for p in first)
    assert all(pixels(p).shape == b.shape for p, b in zip(second, before))


def test_numbered_names_run_out_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(media, "MAX_NUMBERED", 2)
    for name in ("x.png", "x_00001.png", "x_00002.png"):
        user_file(tmp_path / name)
    with pytest.raises(BerniniError, match="numbered names all exist; choose another output path"):
        media.save_output(frames(1), tmp_path / "x.png", fps=16)
    assert not list(tmp_path.glob("*.part"))
