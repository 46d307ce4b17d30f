"""Source preprocessing and output writing (docs/official_behaviour.md §4.8, §7.4).

Expected sizes / counts / indices are hand-computed from the official
data_utils.py formulas; pixel references are built here with PyAV and PIL
directly (the official VAEVideoTransform: PIL bicubic, /255, (x-0.5)/0.5).
"""

import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

from bernini_core import media
from bernini_core.errors import BerniniError
from bernini_core.media import (
    frame_indices,
    load_image,
    load_video,
    read_video,
    resized_size,
    save_output,
    smart_video_nframes,
)


# --------------------------------------------------------------------------- helpers

def synthetic_frames(n=30, h=48, w=64):
    """Smooth gradients plus a moving square: resampling and resizing both matter."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    for i in range(n):
        f = np.stack([(xx * 4 + i * 3) % 256, (yy * 5) % 256, np.full_like(xx, (i * 8) % 256)], -1)
        f[(yy // 8 == i % 6) & (xx // 8 == i % 8)] = 255
        frames.append(f.astype(np.uint8))
    return np.stack(frames)


def write_mp4(path, frames, fps):
    """Reference writer (PyAV, libx264 yuv420p), independent of save_output."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def decode_all(path):
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        return np.stack(frames), float(stream.average_rate)


def official_transform(frames_u8, size):
    """VAEVideoTransform on uint8 RGB frames → [3, F, H, W] (transcribed)."""
    h, w = size
    out = []
    for f in frames_u8:
        img = Image.fromarray(f)
        if img.size != (w, h):
            img = img.resize((w, h), Image.BICUBIC)
        t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
        out.append((t - 0.5) / 0.5)
    return torch.stack(out, dim=1)


@pytest.fixture(scope="module")
def mp4_24fps(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "src.mp4"
    write_mp4(path, synthetic_frames(), 24)
    return path


# --------------------------------------------------------------------------- resize rule

@pytest.mark.parametrize("h, w, max_edge, min_edge, expected", [
    (480, 848, 848, 1, (480, 848)),       # already on the grid
    (720, 1280, 848, 1, (480, 848)),      # 477 → 480
    (1280, 720, 848, 1, (848, 480)),      # portrait
    (1080, 1920, 1280, 1, (720, 1280)),
    (100, 150, 848, 1, (96, 144)),        # small: never upscaled, only snapped
    (4000, 6000, 848, 1, (560, 848)),     # huge: 565.3 → 560
    (100, 150, 848, 240, (240, 352)),     # full-Bernini min edge; 22.5 rounds to 22 (half-even)
    (200, 2000, 848, 240, (80, 848)),     # min edge overshoots, one capping pass wins
    (480, 848, 842, 1, (480, 848)),       # 842 snaps back to 848: a single capping pass
    (4, 4, 848, 240, (240, 240)),         # tiny but upscaled by the min-edge rule
    (9, 9, 848, 1, (16, 16)),
])
def test_resized_size_table(h, w, max_edge, min_edge, expected):
    assert resized_size(h, w, max_long_edge=max_edge, min_short_edge=min_edge) == expected


@pytest.mark.parametrize("h, w", [(4, 4), (8, 8), (6, 400), (16, 2000)])
def test_resized_size_too_small(h, w):
    with pytest.raises(BerniniError, match="too small.*16 px"):
        resized_size(h, w, max_long_edge=848)


def test_resized_size_bad_limit():
    with pytest.raises(BerniniError, match="max_image_size"):
        resized_size(480, 848, max_long_edge=8)


# --------------------------------------------------------------------------- frame count / indices

@pytest.mark.parametrize("total, vfps, fps, max_frames, expected", [
    (30, 24, 16, 81, 21),     # 20 resampled frames → 21
    (48, 24, 16, 81, 33),
    (300, 30, 16, 81, 81),    # capped
    (3, 16, 16, 81, 5),       # very short clip: at least 5 frames
    (100, 16, 16, 1, 1),
    (100, 16, 16, 49, 49),
    (100, 16, 16, 80, 81),    # official cap is 80 // 4 * 4 + 1
    (17, 32, 16, 81, 9),
])
def test_smart_video_nframes(total, vfps, fps, max_frames, expected):
    n = smart_video_nframes(total, vfps, fps, max_frames=max_frames)
    assert n == expected and n % 4 == 1


@pytest.mark.parametrize("total, vfps, fps, n, expected", [
    (9, 16, 16, 9, list(range(9))),
    (10, 16, 16, 9, list(range(9))),                  # span snapped to 4n+1: frame 9 dropped
    (12, 16, 16, 13, list(range(12)) + [11]),         # span 13 > 12 frames: clamped to the last
    (17, 32, 16, 9, list(range(0, 17, 2))),
    (3, 24, 16, 5, [0, 0, 1, 2, 2]),                  # linspace(0, 2, 5), half-even rounding
    (3, 16, 16, 5, [0, 0, 0, 0, 0]),                  # same fps: span snaps to 1
])
def test_frame_indices_exact(total, vfps, fps, n, expected):
    assert frame_indices(total, vfps, fps, n) == expected


def test_frame_indices_long_clip_takes_the_beginning():
    idx = frame_indices(300, 30, 16, 81)
    assert len(idx) == 81 and idx[0] == 0
    assert all(b > a for a, b in zip(idx, idx[1:]))
    # Spread of the uncapped 161 frames over 0..299, first 81 kept: about 5 s of a 10 s clip.
    assert all(abs(i - k * 299 / 160) <= 0.5 + 1e-6 for k, i in enumerate(idx))


# --------------------------------------------------------------------------- loading

def test_read_video(mp4_24fps):
    frames, fps = read_video(mp4_24fps)
    ref, ref_fps = decode_all(mp4_24fps)
    assert frames.dtype == np.uint8 and frames.shape == (30, 48, 64, 3)
    assert fps == ref_fps == 24.0 and np.array_equal(frames, ref)


def test_load_video_file(mp4_24fps):
    video = load_video(mp4_24fps, fps=16, num_frames=81, max_image_size=848)
    assert video.dtype == torch.float32 and video.shape == (3, 21, 48, 64)
    assert video.min() >= -1 and video.max() <= 1 and video.min() < -0.9 and video.max() > 0.9

    decoded, _ = decode_all(mp4_24fps)
    idx = torch.linspace(0, 29, 21).round().long().tolist()
    small = load_video(mp4_24fps, fps=16, num_frames=81, max_image_size=32)
    assert small.shape == (3, 21, 32, 32)
    assert torch.equal(small, official_transform(decoded[idx], (32, 32)))
    assert torch.equal(video, official_transform(decoded[idx], (48, 64)))

    short = load_video(mp4_24fps, fps=16, num_frames=9)
    assert short.shape == (3, 9, 48, 64) and torch.equal(short, video[:, :9])


def test_in_memory_frames_match_file(mp4_24fps):
    from_file = load_video(mp4_24fps, fps=16, max_image_size=32)
    frames, fps = decode_all(mp4_24fps)
    as_uint8 = load_video(frames, fps=16, max_image_size=32, video_fps=fps)
    as_float = load_video(torch.from_numpy(frames).float() / 255, fps=16, max_image_size=32, video_fps=fps)
    as_f64 = load_video(frames.astype(np.float64) / 255, fps=16, max_image_size=32, video_fps=fps)
    for other in (as_uint8, as_float, as_f64):
        assert torch.equal(from_file, other)
    # Without video_fps the frames are taken to be at `fps` already: no resampling.
    same_rate = load_video(frames[:21], fps=16, max_image_size=848)
    assert torch.equal(same_rate, official_transform(frames[:21], (48, 64)))


def test_load_image_sources(tmp_path):
    rng = np.random.RandomState(0)
    rgba = rng.randint(0, 256, (30, 40, 4), dtype=np.uint8)
    path = tmp_path / "ref.png"
    Image.fromarray(rgba, "RGBA").save(path)
    rgb = np.array(Image.fromarray(rgba, "RGBA").convert("RGB"))

    out = load_image(path, max_image_size=848)
    assert out.shape == (3, 1, 32, 32)                        # 30×40: 40/16 = 2.5 rounds half-even to 32
    assert torch.equal(out, official_transform(rgb[None], (32, 32)))
    assert torch.equal(load_image(Image.open(path)), out)
    assert torch.equal(load_image(rgb), out)
    assert torch.equal(load_image(torch.from_numpy(rgb)[None].float() / 255), out)
    big = load_image(path, max_image_size=848, min_short_edge=240)
    assert big.shape == (3, 1, 240, 320)


# --------------------------------------------------------------------------- input errors

def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(BerniniError, match="nope.mp4.*does not exist"):
        load_video(tmp_path / "nope.mp4")
    with pytest.raises(BerniniError, match="nope.png.*does not exist"):
        load_image(tmp_path / "nope.png")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 10)
    with pytest.raises(BerniniError, match="junk.mp4.*cannot be decoded"):
        load_video(junk)
    junk_png = tmp_path / "junk.png"
    junk_png.write_bytes(b"not an image")
    with pytest.raises(BerniniError, match="junk.png.*cannot be decoded"):
        load_image(junk_png)


def test_empty_videos(tmp_path):
    with pytest.raises(BerniniError, match="0 frames"):
        load_video(np.zeros((0, 16, 16, 3), np.uint8))
    empty = tmp_path / "empty.mp4"
    with av.open(str(empty), "w", format="mp4") as c:         # header only, no frames
        s = c.add_stream("libx264", rate=16)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        c.start_encoding()
    with pytest.raises(BerniniError, match="empty.mp4.*0 frames"):
        load_video(empty)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((16, 16, 3), np.uint8), "shape"),
    (np.zeros((2, 16, 16, 4), np.uint8), "shape"),
    (np.zeros((2, 16, 16, 3), np.int32), "int32"),
    (torch.zeros(2, 16, 16, 3, dtype=torch.int64), "int64"),
])
def test_bad_in_memory_frames(bad, message):
    with pytest.raises(BerniniError, match=message):
        load_video(bad)


def test_tiny_image_and_bad_counts(mp4_24fps):
    with pytest.raises(BerniniError, match="too small.*16 px"):
        load_image(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(BerniniError, match="image array"):
        load_image(np.zeros((4, 4), np.uint8))
    with pytest.raises(BerniniError, match="num_frames"):
        load_video(mp4_24fps, num_frames=0)


# --------------------------------------------------------------------------- output

def test_save_png_truncates_like_the_official(tmp_path):
    frame = np.zeros((1, 20, 24, 3), np.float32)
    frame[..., 0], frame[..., 1], frame[..., 2] = 0.5, 0.999, 1.5      # → 127, 254, 255 (truncation, clip)
    out = save_output(frame, tmp_path / "img.png", fps=16)
    assert out == tmp_path / "img.png"
    back = np.array(Image.open(out))
    assert back.shape == (20, 24, 3) and back[0, 0].tolist() == [127, 254, 255]


def test_save_mp4_roundtrip(tmp_path):
    frames = synthetic_frames(n=5, h=32, w=48)
    out = save_output(torch.from_numpy(frames).float() / 255, tmp_path / "clip.mp4", fps=16)
    decoded, fps = decode_all(out)
    assert decoded.shape == (5, 32, 48, 3) and fps == 16.0
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 4     # crf 8: near-lossless
    with av.open(str(out)) as c:
        st = c.streams.video[0]
        assert st.codec_context.name == "h264" and st.codec_context.pix_fmt == "yuv420p"
    out24 = save_output(frames, tmp_path / "clip24.mp4", fps=24)          # uint8 input
    assert decode_all(out24)[1] == 24.0


def test_save_wrong_extension_follows_official(tmp_path):
    frames = synthetic_frames(n=5, h=32, w=48)
    out = save_output(frames, tmp_path / "video.png", fps=16)
    assert out == tmp_path / "video.mp4" and not (tmp_path / "video.png").exists()
    assert decode_all(out)[0].shape[0] == 5
    single = save_output(frames[:1], tmp_path / "still.mp4", fps=16)
    assert single == tmp_path / "still.png" and not (tmp_path / "still.mp4").exists()
    assert Image.open(single).format == "PNG"


def test_save_errors_and_atomic_write(tmp_path, monkeypatch):
    frames = synthetic_frames(n=3, h=32, w=48)
    with pytest.raises(BerniniError, match="missing_dir"):
        save_output(frames, tmp_path / "missing_dir" / "a.mp4", fps=16)
    made = save_output(frames, tmp_path / "new_dir" / "a.mp4", fps=16, make_parents=True)
    assert made.is_file()
    with pytest.raises(BerniniError, match="even"):
        save_output(frames[:, :31], tmp_path / "odd.mp4", fps=16)
    with pytest.raises(BerniniError, match="WebM"):
        save_output(frames, tmp_path / "a.webm", fps=16)

    target = tmp_path / "keep.mp4"
    target.write_bytes(b"previous result")

    def failing_writer(data, tmp, fmt, fps):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(media, "_write_video", failing_writer)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        save_output(frames, target, fps=16)
    assert target.read_bytes() == b"previous result"
    assert sorted(os.listdir(tmp_path)) == ["keep.mp4", "new_dir"]   # no temporary file left behind
