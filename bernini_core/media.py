"""Source media preprocessing and output writing (docs/official_behaviour.md §4.8, §7.4).

Reproduces the official ``bernini/data_utils.py`` (``MaxLongEdgeMinShortEdgeResize``,
``VAEVideoTransform``, ``smart_video_nframes``, ``preprocess_video/_image``) and
``bernini/io_utils.py`` (``save_output``):

* frames are resampled to ``fps`` by the official index rule, then each frame is
  resized as an 8-bit RGB PIL image with PIL bicubic (what torchvision's
  ``F.resize`` does on a PIL image, antialias included), then ``/255`` and
  ``(x - 0.5) / 0.5`` in float32;
* in-memory float frames are first rounded to 8 bit, so ComfyUI IMAGE frames
  (uint8 / 255) give exactly the tensor the official gets from the file.

Videos are decoded with PyAV (the official uses decord, which this package does
not depend on); the frame count is the number of demuxed video packets, as
decord counts it.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .errors import BerniniError

log = logging.getLogger(__name__)
NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems

# io_utils.py: a single frame goes to an image file, several to a video file; an
# extension of the wrong kind is replaced (".png" / ".mp4"), as the official does.
_IMAGE_FORMATS = {".bmp": "BMP", ".gif": "GIF", ".jpeg": "JPEG", ".jpg": "JPEG", ".png": "PNG",
                  ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}
_VIDEO_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi",
                  ".webm": None}  # WebM cannot hold H.264: refused with a clear error
_MP4_CRF = 8  # io_utils.py: libx264, yuv420p, crf 8


# --------------------------------------------------------------------------- size and frame rules

def _snapped(value: float, stride: int) -> int:
    # data_utils.make_divisible without its max(stride, .) floor; Python round = banker's.
    return int(round(value / stride) * stride)


def _scale_pair(w: int, h: int, scale: float, stride: int, describe) -> tuple[int, int]:
    out = []
    for side in (w, h):
        snapped = _snapped(round(side * scale), stride)
        if snapped < stride:
            # The official floors this side to `stride`, stretching the picture;
            # we refuse instead (a too-small source is a user error, docs/architecture.md §7).
            raise BerniniError(
                f"{describe()} is too small: after the resize rule a side would be "
                f"{round(side * scale)} px, under half the {stride}-px grid. Use a source whose sides "
                f"are at least {stride} px after scaling its long edge to the size limit.")
        out.append(snapped)
    return out[0], out[1]


def resized_size(h: int, w: int, *, max_long_edge: int, min_short_edge: int = 1, stride: int = 16,
                 what: str = "image") -> tuple[int, int]:
    """``(new_h, new_w)`` by the official MaxLongEdgeMinShortEdgeResize: long edge
    ≤ ``max_long_edge`` (never upscaled for that), short edge ≥ ``min_short_edge``,
    both snapped to multiples of ``stride``; one capping pass when the min-edge
    rule pushed the long edge over the limit (so the result may exceed
    ``max_long_edge`` by up to half a stride, e.g. 848 for a limit of 842)."""
    h, w = int(h), int(w)
    if h < 1 or w < 1:
        raise BerniniError(f"{what} has an empty size {w}×{h} px.")
    if max_long_edge < stride:
        raise BerniniError(f"max_image_size is {max_long_edge}; it must be at least {stride}.")

    def describe():
        return f"{what} ({w}×{h} px)"

    scale = min(max_long_edge / max(w, h), 1.0)
    scale = max(scale, min_short_edge / min(w, h))
    new_w, new_h = _scale_pair(w, h, scale, stride, describe)
    if max(new_w, new_h) > max_long_edge:
        scale = max_long_edge / max(new_w, new_h)
        new_w, new_h = _scale_pair(new_w, new_h, scale, stride, describe)
    return new_h, new_w


def _initial_count(total_frames: int, video_fps: float, target_fps: float, frame_factor: int,
                   add_one: bool) -> int:
    # smart_video_nframes before the max_frames cap: the resampled length rounded
    # down to frame_factor·n (+1), at least frame_factor (+1).
    extra = int(add_one)
    n = total_frames / video_fps * target_fps
    n = math.floor(n / frame_factor) * frame_factor + extra
    return max(n, frame_factor + extra)


def smart_video_nframes(total_frames: int, video_fps: float, target_fps: float, *, frame_factor: int = 4,
                        max_frames: int | None, add_one: bool = True) -> int:
    """How many frames the official rule takes: the clip resampled to
    ``target_fps`` rounded down to ``4n+1``, capped at ``max_frames // 4 * 4 + 1``.

    That cap equals ``max_frames`` when it is already ``4n+1`` (the pipeline forces
    ``num_frames`` to ``num_frames // 4 * 4 + 1``, docs/official_behaviour.md §4.8); for ``max_frames = 4n`` it is
    one more, exactly as the official. Very short clips still give 5 frames
    (repeating frames)."""
    count = _initial_count(total_frames, video_fps, target_fps, frame_factor, add_one)
    if max_frames is not None:
        count = min(count, (max_frames // frame_factor) * frame_factor + int(add_one))
    return count


def frame_indices(total_frames: int, video_fps: float, target_fps: float, n_frames: int, *,
                  frame_factor: int = 4, add_one: bool = True) -> list[int]:
    """The source frames taken, in order (repeats allowed). The official spreads
    its uncapped count evenly over the whole clip and keeps the first
    ``n_frames``, so a long clip yields its beginning at ``target_fps`` rather
    than a sped-up summary. Indices are clamped to the clip, as the reader does."""
    count = _initial_count(total_frames, video_fps, target_fps, frame_factor, add_one)
    span = total_frames
    if float(video_fps) == float(target_fps):
        # Official quirk: the span itself is snapped to 4n+1 and may pass the end.
        span = math.floor(total_frames / frame_factor) * frame_factor + int(add_one)
    # torch float32 linspace + round-half-even, bit-for-bit the official computation.
    idx = torch.linspace(0, span - 1, count, dtype=torch.float32).round().long().tolist()
    idx = idx[:n_frames]
    while len(idx) < n_frames:
        idx.append(idx[-1])
    last = total_frames - 1
    return [min(max(i, 0), last) for i in idx]


# --------------------------------------------------------------------------- decoding

def reject_url(source, what: str) -> None:
    """A URL given as a media path: said as such (a Path would fold "https://" into "https:/" and call it a
    missing file)."""
    if isinstance(source, str) and "://" in source:
        raise BerniniError(f"{what} {source!r} is a URL; only local files are read (nothing is downloaded): "
                           "download it first and pass the file's path.")


def _require_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise BerniniError(f"{str(path)!r} is a folder, not {'an' if what[0] in 'aeiou' else 'a'} {what} file; "
                           f"give the path of the {what} itself.")
    if not path.is_file():
        raise BerniniError(f"{what} file {str(path)!r} does not exist; check the path.")


def _open_container(path: Path):
    import av

    _require_file(path, "video")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise BerniniError(f"video {str(path)!r} cannot be decoded ({exc}); use an MP4/MOV/MKV/WebM video file.") \
            from exc
    if not container.streams.video:
        container.close()
        raise BerniniError(f"video {str(path)!r} has no video stream (0 frames); use a file that holds video.")
    return container


def _stream_fps(stream, path: Path) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise BerniniError(f"video {str(path)!r} does not state a frame rate; re-encode it with a fixed fps.")
    return float(rate)


def _probe(path: Path) -> tuple[int, float]:
    """(frame count, fps): the count is the number of video packets, like decord."""
    import av

    container = _open_container(path)
    try:
        stream = container.streams.video[0]
        fps = _stream_fps(stream, path)
        count = sum(1 for packet in container.demux(stream) if packet.size > 0)
    except av.error.FFmpegError as exc:
        raise BerniniError(f"video {str(path)!r} cannot be decoded ({exc}).") from exc
    finally:
        container.close()
    return count, fps


def _decode(path: Path, wanted: set[int] | None) -> dict[int, np.ndarray]:
    """Decode RGB24 frames by index (all when ``wanted`` is None), stopping after
    the last wanted one."""
    import av

    container = _open_container(path)
    frames: dict[int, np.ndarray] = {}
    stop = max(wanted) if wanted else None
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if wanted is None or i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
            if stop is not None and i >= stop:
                break
    except av.error.FFmpegError as exc:
        raise BerniniError(f"video {str(path)!r} cannot be decoded ({exc}).") from exc
    finally:
        container.close()
    return frames


def probe_video(path) -> tuple[int, float]:
    """(frame count, fps) of a video file; the count is the number of packets, like decord."""
    path = Path(path)
    total, fps = _probe(path)
    if total == 0:
        raise BerniniError(f"video {str(path)!r} is empty (0 frames).")
    return total, fps


def decode_frames(path, indices) -> np.ndarray:
    """uint8 ``[len(indices), H, W, 3]``: only the frames at ``indices`` are kept (decoding stops after the
    last one). Like decord's fault tolerance, a frame the packets promised but the decoder did not deliver
    falls back to the last decoded one."""
    path = Path(path)
    decoded = _decode(path, set(indices))
    if not decoded:
        raise BerniniError(f"video {str(path)!r} has no decodable frames.")
    last = decoded[max(decoded)]
    return np.stack([decoded.get(i, last) for i in indices])


def check_video_file(path) -> None:
    """Fail now, not after the model load, when a video file cannot be read: it must open, state a frame rate,
    hold packets, and its first frame must decode."""
    reject_url(path, "video")
    total, _ = probe_video(path)
    decode_frames(path, [0])


def check_image_file(path) -> None:
    """Fail now, not after the model load, when an image file cannot be decoded."""
    reject_url(path, "image")
    path = Path(path)
    _require_file(path, "image")
    try:
        with Image.open(path) as img:
            pil_to_rgb(img, f"image {str(path)!r}")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BerniniError(f"image {str(path)!r} cannot be decoded ({exc}); use a PNG/JPEG/WebP image.") from exc


def read_video(path) -> tuple[np.ndarray, float]:
    """All frames of a video file as uint8 ``[F, H, W, 3]`` RGB, and its fps."""
    path = Path(path)
    _, fps = _probe(path)
    frames = _decode(path, None)
    if not frames:
        raise BerniniError(f"video {str(path)!r} is empty (0 frames).")
    return np.stack([frames[i] for i in range(len(frames))]), fps


# --------------------------------------------------------------------------- in-memory frames

# Float pixels outside 0..1 by more than this are another scale, not a resampling overshoot (bicubic resizes
# overshoot by a few percent, and ComfyUI's savers clip them too): 0..255 or -1..1 frames would be clipped to
# near-white / lose their dark half without a word.
FLOAT_PIXEL_SLACK = 0.5


def _check_float_pixels(low: float, high: float, finite: bool, what: str) -> None:
    if not finite:
        raise BerniniError(f"{what} hold NaN or infinite values; fix the frames that produced them.")
    if high > 1 + FLOAT_PIXEL_SLACK:
        raise BerniniError(f"{what} are floats up to {high:g}: float pixels must be in 0..1 (these look like "
                           "0..255); divide them by 255, or pass uint8.")
    if low < -FLOAT_PIXEL_SLACK:
        raise BerniniError(f"{what} are floats down to {low:g}: float pixels must be in 0..1 (these look like "
                           "-1..1); map them with (x + 1) / 2.")


def to_uint8(array, what: str) -> np.ndarray:
    """uint8 or float 0..1 (numpy or torch) → uint8, floats rounded to 8 bit. Floats with NaN/inf or on
    another scale (0..255, -1..1) are refused; small overshoots are clipped."""
    if isinstance(array, torch.Tensor):
        t = array.detach().cpu()
        if t.dtype == torch.uint8:
            return t.numpy()
        if not t.is_floating_point():
            raise BerniniError(f"{what} must be uint8 (0..255) or float (0..1), got {t.dtype}.")
        t = t.float()
        if t.numel():
            _check_float_pixels(float(t.min()), float(t.max()), bool(torch.isfinite(t).all()), what)
        return (t.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    a = np.asarray(array)
    if a.dtype == np.uint8:
        return a
    if not np.issubdtype(a.dtype, np.floating):
        raise BerniniError(f"{what} must be uint8 (0..255) or float (0..1), got {a.dtype}.")
    a = a.astype(np.float32)
    if a.size:
        _check_float_pixels(float(np.nanmin(a)) if not np.isnan(a).all() else 0.0,
                            float(np.nanmax(a)) if not np.isnan(a).all() else 0.0, bool(np.isfinite(a).all()), what)
    return np.rint(np.clip(a, 0, 1) * 255).astype(np.uint8)


def pil_to_rgb(img: Image.Image, what: str) -> np.ndarray:
    """A PIL image as uint8 RGB. 16-bit grayscale (PNG mode I;16*, or I holding 0..65535) is scaled to 8 bit by its
    high byte, as Pillow itself reduces 16-bit colour PNGs; PIL's own convert("RGB") would clip it to white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        gray = np.asarray(img).astype(np.int64)
        if gray.size and (gray.min() < 0 or gray.max() > 65535):
            raise BerniniError(f"{what} holds 32-bit integer pixels ({gray.min()}..{gray.max()}); save it as an "
                               "8- or 16-bit image.")
        return np.repeat((gray >> 8).astype(np.uint8)[..., None], 3, axis=2)
    if img.mode == "F":
        return np.repeat(to_uint8(np.asarray(img), what)[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def _check_frames_shape(shape, what: str) -> None:
    if len(shape) != 4 or shape[-1] != 3:
        raise BerniniError(f"{what} must be [frames, height, width, 3] RGB, got shape {tuple(shape)}.")
    if shape[0] == 0:
        raise BerniniError(f"{what} is empty (0 frames).")


def _normalise(frames_u8: list[np.ndarray], size: tuple[int, int]) -> Tensor:
    """Resize uint8 RGB frames (PIL bicubic) and map to float32 [-1, 1], [3, F, H, W]."""
    h, w = size
    resized = []
    for f in frames_u8:
        if f.shape[:2] != (h, w):  # the official skips resampling at the same size
            f = np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC))
        resized.append(f)
    x = torch.from_numpy(np.stack(resized)).permute(3, 0, 1, 2).float()
    # ToTensor (/255) then Normalize(0.5, 0.5), in this order and dtype, as the official.
    return x.div(255).sub_(0.5).div_(0.5).contiguous()


# --------------------------------------------------------------------------- public loaders

def load_video(source, *, fps: float = 16, num_frames: int = 81, max_image_size: int = 848,
               min_short_edge: int = 1, video_fps: float | None = None) -> Tensor:
    """A source video as float32 ``[3, F', H', W']`` in [-1, 1] (official ``preprocess_video``).

    ``source``: a path (decoded with PyAV) or frames ``[F, H, W, 3]`` (numpy/torch,
    uint8 or float 0..1) whose rate is ``video_fps`` (default: ``fps``). Frames are
    resampled to ``fps`` (``F' = smart_video_nframes(...)``), resized per
    ``resized_size`` (``min_short_edge`` 1 for Bernini-R, 240 for full Bernini)."""
    if num_frames < 1:
        raise BerniniError(f"num_frames is {num_frames}; it must be at least 1.")
    if not fps or fps <= 0:
        raise BerniniError(f"fps is {fps}; it must be positive.")

    if isinstance(source, (str, os.PathLike)):
        reject_url(source, "video")
        path = Path(source)
        what = f"video {str(path)!r}"
        if video_fps is not None:
            log.warning("video_fps=%s has no effect on %s: a video file carries its own frame rate (video_fps is "
                        "for in-memory frames).", video_fps, what)
        total, src_fps = probe_video(path)
        n = smart_video_nframes(total, src_fps, fps, max_frames=num_frames)
        idx = frame_indices(total, src_fps, fps, n)
        picked = list(decode_frames(path, idx))
    else:
        what = "video frames"
        if not hasattr(source, "shape"):
            source = np.asarray(source)
        shape = tuple(source.shape)
        _check_frames_shape(shape, what)
        rate = fps if video_fps is None else video_fps
        if rate <= 0:
            raise BerniniError(f"video_fps is {video_fps}; it must be positive.")
        total = shape[0]
        n = smart_video_nframes(total, rate, fps, max_frames=num_frames)
        idx = frame_indices(total, rate, fps, n)
        unique = sorted(set(idx))
        converted = dict(zip(unique, to_uint8(source[unique], what)))
        picked = [converted[i] for i in idx]

    h, w = picked[0].shape[:2]
    size = resized_size(h, w, max_long_edge=max_image_size, min_short_edge=min_short_edge, what=what)
    return _normalise(picked, size)


def load_image(source, *, max_image_size: int = 848, min_short_edge: int = 1) -> Tensor:
    """A source / reference image as float32 ``[3, 1, H', W']`` in [-1, 1]
    (official ``preprocess_image``). ``source``: a path, a PIL image, or an array
    ``[H, W, 3]`` / ``[1, H, W, 3]`` (uint8 or float 0..1). Alpha is dropped
    (PIL ``convert("RGB")``); EXIF orientation is not applied, as in the official."""
    if isinstance(source, (str, os.PathLike)):
        reject_url(source, "image")
        path = Path(source)
        what = f"image {str(path)!r}"
        _require_file(path, "image")
        try:
            with Image.open(path) as img:
                rgb = pil_to_rgb(img, what)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise BerniniError(f"{what} cannot be decoded ({exc}); use a PNG/JPEG/WebP image.") from exc
    elif isinstance(source, Image.Image):
        what = "image"
        rgb = pil_to_rgb(source, what)
    else:
        what = "image array"
        if not hasattr(source, "shape"):
            source = np.asarray(source)
        shape = tuple(source.shape)
        if len(shape) == 4 and shape[0] == 1:
            source, shape = source[0], shape[1:]
        if len(shape) != 3 or shape[-1] != 3:
            raise BerniniError(f"{what} must be [height, width, 3] RGB, got shape {shape}.")
        rgb = to_uint8(source, what)
    h, w = rgb.shape[:2]
    size = resized_size(h, w, max_long_edge=max_image_size, min_short_edge=min_short_edge, what=what)
    return _normalise([np.ascontiguousarray(rgb)], size)


# --------------------------------------------------------------------------- output

def _frames_for_saving(frames) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        frames = frames.numpy() if frames.dtype == torch.uint8 else frames.float().numpy()
    a = np.asarray(frames)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3 or a.shape[0] == 0:
        raise BerniniError(f"output frames must be [frames, height, width, 3] RGB, got shape {a.shape}.")
    if a.dtype == np.uint8:
        return a
    if not np.issubdtype(a.dtype, np.floating):
        raise BerniniError(f"output frames must be uint8 or float 0..1, got {a.dtype}.")
    # io_utils.py: clip to [0, 1], scale by 255 and truncate (astype), not round.
    return (np.clip(a.astype(np.float32, copy=False), 0.0, 1.0) * 255).astype(np.uint8)


def _output_target(path: Path, n_frames: int, quiet: bool = False) -> tuple[Path, str, str]:
    """(final path, kind, container format) after the official extension rule."""
    suffix = path.suffix.lower()
    if n_frames == 1:
        if suffix not in _IMAGE_FORMATS:
            new = path.with_suffix(".png")
            if not quiet:
                log.warning("one frame is saved as an image: writing %s instead of %s", new, path)
            path, suffix = new, ".png"
        return path, "image", _IMAGE_FORMATS[suffix]
    if suffix not in _VIDEO_FORMATS:
        new = path.with_suffix(".mp4")
        if not quiet:
            log.warning("%d frames are saved as a video: writing %s instead of %s", n_frames, new, path)
        path, suffix = new, ".mp4"
    fmt = _VIDEO_FORMATS[suffix]
    if fmt is None:
        raise BerniniError(f"output {str(path)!r}: WebM cannot hold H.264 video; use a .mp4 path.")
    return path, "video", fmt


def _write_video(frames: np.ndarray, target: str, fmt: str, fps: float) -> None:
    import av

    rate = Fraction(fps).limit_denominator(1001)
    with av.open(target, mode="w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(_MP4_CRF)}
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            # ffmpeg's command line (used by the official imageio writer) converts with bicubic swscale.
            video_frame = video_frame.reformat(format="yuv420p", interpolation="BICUBIC")
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_output(frames, path, *, fps: float, make_parents: bool = False, overwrite: bool = False) -> Path:
    """Write frames ``[F, H, W, 3]`` (float 0..1 or uint8): one frame → image
    (PNG unless the path names another image type), several → H.264 MP4
    (libx264, yuv420p, crf 8) at ``fps``. Like the official, a path whose
    extension does not fit the frame count gets ".png" / ".mp4" instead, and the
    path actually written is returned. The file is written beside the target and
    renamed into place, so a failure never destroys an existing file.
    An existing file is never replaced unless ``overwrite``: the result goes to
    the next free numbered name (``clip_00001.mp4``, as ComfyUI's savers number
    theirs) and the log says so; the name is claimed atomically (a hard link that
    fails when the name exists), so a concurrent writer cannot be clobbered either.
    The parent folder must exist unless ``make_parents`` (the official pipeline
    creates it before saving)."""
    data = _frames_for_saving(frames)
    final, kind, fmt = _output_target(Path(path), data.shape[0])
    if kind == "video":
        if not fps or not math.isfinite(fps) or fps <= 0:
            raise BerniniError(f"fps is {fps}; it must be a positive number to write {str(final)!r}.")
        if data.shape[1] % 2 or data.shape[2] % 2:
            raise BerniniError(f"output {str(final)!r}: H.264 yuv420p needs an even width and height, "
                               f"got {data.shape[2]}×{data.shape[1]}.")
    parent = final.parent if str(final.parent) else Path(".")
    if not parent.is_dir():
        if not make_parents:
            raise BerniniError(f"output folder {str(parent)!r} for {str(final)!r} does not exist; create it "
                               "or choose another output path.")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BerniniError(f"cannot create output folder {str(parent)!r}: {exc}") from exc
    if final.is_dir():
        raise BerniniError(f"output path {str(final)!r} is a folder; give a file name.")

    try:
        # a short temporary name: a legal 255-byte output name must not fail on its own ".part" sibling
        fd, tmp = tempfile.mkstemp(prefix=".bernini-", suffix=".part", dir=parent)
        os.close(fd)
    except OSError as exc:
        raise BerniniError(f"cannot write to output folder {str(parent)!r} for {str(final)!r}: {exc}") from exc
    try:
        if kind == "image":
            Image.fromarray(data[0]).save(tmp, format=fmt)
        else:
            _write_video(data, tmp, fmt, fps)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        written = _place(tmp, final, overwrite)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) or type(exc).__module__.startswith("av"):
            raise BerniniError(f"writing {str(final)!r} failed: {exc}") from exc
        raise
    if written != final:
        log.warning("%s already exists; wrote %s instead (overwrite=True / --overwrite replaces it).", final, written)
    return written


def save_latents(latents, path, settings: dict, *, overwrite: bool = False) -> Path:
    """The raw final latents [1,16,T,H/8,W/8] as safetensors (tensor "latents"), the settings the run used as JSON
    metadata ("bernini_settings"): for checking a run against another, or decoding later. Same rules as
    ``save_output``: written beside and renamed into place, an existing file kept unless ``overwrite``."""
    import json

    from safetensors.torch import save_file

    final = Path(path)
    if final.suffix != ".safetensors":
        raise BerniniError(f"latents file {str(final)!r} must end in .safetensors.")
    check_output_path(final)
    parent = final.parent if str(final.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bernini-", suffix=".part", dir=parent)
    os.close(fd)
    try:
        save_file({"latents": latents.detach().float().cpu().contiguous()}, tmp,
                  metadata={"format": "bernini-latents", "bernini_settings": json.dumps(settings, default=str)})
        os.chmod(tmp, 0o666 & ~_umask())
        written = _place(tmp, final, overwrite)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if written != final:
        log.warning("%s already exists; wrote %s instead (overwrite=True / --overwrite replaces it).", final, written)
    return written


MAX_NUMBERED = 99999


def numbered_names(path: Path):
    """``path``, then ``stem_00001.ext``, ``stem_00002.ext``, ...: the names tried for an output."""
    yield path
    for index in range(1, MAX_NUMBERED + 1):
        stem, tail = path.stem, f"_{index:05d}{path.suffix}"
        while len(os.fsencode(stem + tail)) > NAME_MAX and stem:  # a long name loses its stem's end, not the run
            stem = stem[:-1]
        yield path.with_name(stem + tail)


def _place(tmp: str, final: Path, overwrite: bool) -> Path:
    """Move the finished temporary file to ``final`` (replacing it only if ``overwrite``), else to the first free
    numbered name; returns the path written."""
    if overwrite:
        os.replace(tmp, final)
        return final
    for candidate in numbered_names(final):
        try:
            os.link(tmp, candidate)  # atomic: fails if the name exists
        except FileExistsError:
            continue
        except OSError:  # no hard links on this file system: check, then rename
            if candidate.exists():
                continue
            os.replace(tmp, candidate)
            return candidate
        os.unlink(tmp)
        return candidate
    raise BerniniError(f"output {str(final)!r} and its {MAX_NUMBERED} numbered names all exist; choose another "
                       "output path or pass overwrite=True (--overwrite).")


def planned_output(path, n_frames: int) -> Path:
    """The path ``save_output`` aims at for ``n_frames`` frames (after the extension rule), before numbering."""
    return _output_target(Path(path), n_frames, quiet=True)[0]


def check_output_path(path) -> None:
    """Fail before a long run when the output can never be written: the nearest existing folder
    above `path` must be a writable directory and `path` itself must not be a folder."""
    if not isinstance(path, (str, os.PathLike)):
        raise BerniniError(f"output path must be a file path (a string), got {type(path).__name__} {path!r}.")
    if "\x00" in os.fspath(path):
        raise BerniniError(f"output path {os.fspath(path)!r} holds a NUL byte, which no file name can; remove it.")
    target = Path(path)
    if not target.name:
        raise BerniniError(f"output path {str(target)!r} names no file; give a file name such as output.mp4.")
    if len(os.fsencode(target.name)) > NAME_MAX:
        raise BerniniError(f"output file name {target.name[:40]!r}… is {len(os.fsencode(target.name))} bytes long; "
                           f"file systems allow {NAME_MAX}. Choose a shorter name.")
    if target.is_dir():
        raise BerniniError(f"output path {str(target)!r} is a folder; give a file name.")
    parent = target.parent if str(target.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BerniniError(f"output path {str(target)!r} is not writable (folder {str(parent)!r} cannot be written); "
                           "choose another output path.")
    try:  # os.access says yes to root everywhere, and knows nothing of read-only or virtual file systems
        fd, probe = tempfile.mkstemp(prefix=".bernini-", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BerniniError(f"output path {str(target)!r} is not writable (a file cannot be created in "
                           f"{str(parent)!r}: {exc.strerror or exc}); choose another output path.") from None
