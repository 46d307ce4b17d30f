"""The pictures the prompt enhancer shows its model: evenly sampled frames of each source video and the reference
images, as uint8 RGB arrays, and as base64 PNG for an endpoint (docs/prompt_enhancer.md §2).

Sources are what the engine takes everywhere: file paths, or in-memory frames ``[F, H, W, 3]`` / images
``[H, W, 3]`` (uint8, or float 0..1 as ComfyUI's IMAGE).
"""

from __future__ import annotations

import base64
import io
import os
from typing import Any, Optional, Sequence

import numpy as np

from .. import media
from ..errors import BerniniError

FRAMES_PER_VIDEO = 3  # official DEFAULT_VIDEO_FRAMES


def frame_indices(total: int, count: int = FRAMES_PER_VIDEO) -> list[int]:
    """``count`` frame indices spread evenly over ``total`` frames, the first and the last included (one frame:
    the middle one), as the official ``extract_uniform_frames`` picks them."""
    if total <= 0 or count <= 0:
        return []
    if count == 1:
        return [total // 2]
    return [min(max(round(i * (total - 1) / (count - 1)), 0), total - 1) for i in range(count)]


def _is_path(item) -> bool:
    return isinstance(item, (str, bytes, os.PathLike))


def video_frames(video, count: int = FRAMES_PER_VIDEO) -> np.ndarray:
    """uint8 ``[count, H, W, 3]`` of one video: a file (only those frames are decoded) or in-memory frames."""
    if _is_path(video):
        media.reject_url(video, "video")
        total, _ = media.probe_video(video)
        return media.decode_frames(video, frame_indices(total, count))
    frames = video if hasattr(video, "shape") else np.asarray(video)
    if len(frames.shape) != 4 or frames.shape[-1] not in (3, 4) or frames.shape[0] == 0:
        raise BerniniError(f"prompt enhancer: a source video must be frames [frames, height, width, 3]; got shape "
                           f"{tuple(frames.shape)}.")
    picked = frames[frame_indices(int(frames.shape[0]), count)][..., :3]
    return media.to_uint8(picked, "prompt enhancer: source video frames")


def image_rgb(image) -> np.ndarray:
    """uint8 ``[H, W, 3]`` of one image: a file (EXIF orientation applied, as a viewer shows it), a PIL image or an
    array ``[H, W, 3]`` / ``[1, H, W, 3]``."""
    from PIL import Image

    if _is_path(image):
        media.reject_url(image, "image")
        from ..planner.vision import open_image_for_vit

        return np.asarray(open_image_for_vit(image))
    if isinstance(image, Image.Image):
        return media.pil_to_rgb(image, "prompt enhancer: image")
    array = image if hasattr(image, "shape") else np.asarray(image)
    if len(array.shape) == 4 and array.shape[0] == 1:
        array = array[0]
    if len(array.shape) != 3 or array.shape[-1] not in (3, 4):
        raise BerniniError(f"prompt enhancer: an image must be [height, width, 3]; got shape {tuple(array.shape)}.")
    return media.to_uint8(array[..., :3], "prompt enhancer: image")


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def source_pictures(task: str, sources: Optional[dict], frames_per_video: int = FRAMES_PER_VIDEO
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(video frames, reference images) the enhancer shows for ``task``, in the official order
    (``PromptEnhancer.__call__``): ``frames_per_video`` frames of every source video, one clip after the other;
    the references are ``image`` (i2i: the image to edit; r2v / rv2v: the first reference) then ``images``.
    ``sources``: a dict with any of "video" (one video or a list), "image", "images" (one image or a list)."""
    sources = dict(sources or {})
    unknown = sorted(set(sources) - {"video", "image", "images"})
    if unknown:
        raise BerniniError(f"prompt enhancer: sources has unknown key(s) {unknown}; use 'video', 'image' and "
                           "'images'.")
    frames: list[np.ndarray] = []
    if task in ("v2v", "mv2v", "rv2v", "ads2v"):
        for video in _as_list(sources.get("video")):
            frames.extend(video_frames(video, frames_per_video))
    references: list[np.ndarray] = []
    if task in ("i2i", "r2v", "rv2v"):
        references = [image_rgb(item) for item in _as_list(sources.get("image")) + _as_list(sources.get("images"))]
    return frames, references


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(rgb: np.ndarray) -> str:
    """An uint8 RGB picture as base64 PNG text (the official request's image encoding)."""
    return base64.b64encode(png_bytes(rgb)).decode("ascii")


def describe(images: Sequence[Any]) -> str:
    """'3 pictures (48x40)' for log lines."""
    if not images:
        return "no pictures"
    sizes = sorted({f"{im.shape[1]}x{im.shape[0]}" for im in images})
    return f"{len(images)} picture{'s' if len(images) != 1 else ''} ({', '.join(sizes)})"
