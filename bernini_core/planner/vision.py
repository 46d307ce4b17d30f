"""Planner vision preprocessing: Qwen patch grids, ViT frames, target placeholders
(docs/official_behaviour.md §3.2, §7.2).

The official pipeline runs the Qwen2.5-VL processor of ``mllm/`` with its own pixel bounds
(min 3136, max 50176 per frame: a 28-multiple smart resize) and samples video frames at
``vit_fps = fps // 8`` (``preprocess_inputs``). Grids are computed here without the
processor (they only depend on sizes); pixel values come from the real processor when
torchvision is installed (what the official runs: transformers uses its torchvision
image / video processors) and otherwise from ``TorchVitProcessor``, a pure-torch copy of
that code path, so the planner also runs where torchvision is missing.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..errors import BerniniError
from .. import media
from ..media import frame_indices, smart_video_nframes
from ..tasks import get_task
from .template import VisualItem

VIT_MIN_PIXELS = 3136  # preprocess_inputs(vit_min_pixels, vit_max_pixels), docs/official_behaviour.md §7.2
VIT_MAX_PIXELS = 50176
VIT_PATCH = 14
VIT_MERGE = 2
VIT_TEMPORAL_PATCH = 2
VIT_FACTOR = VIT_PATCH * VIT_MERGE  # 28
_VIT_SIZE = {"shortest_edge": VIT_MIN_PIXELS, "longest_edge": VIT_MAX_PIXELS}
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- grids

def vit_fps(fps) -> int:
    """The ViT frame rate: ``fps // 8`` (2 at 16 fps; the VAE keeps ``fps``), docs/official_behaviour.md §7.2."""
    return int(fps // 8)


def smart_resize(height: int, width: int, *, factor: int = VIT_FACTOR, min_pixels: int = VIT_MIN_PIXELS,
                 max_pixels: int = VIT_MAX_PIXELS) -> tuple[int, int]:
    """Qwen2-VL's resize rule: both sides multiples of ``factor`` (Python ``round``, i.e.
    half to even), area brought into [min_pixels, max_pixels] keeping the aspect ratio."""
    height, width = int(height), int(width)
    if min(height, width) < 1:
        raise BerniniError(f"image of {width}×{height} px is empty; give the planner a real image.")
    if max(height, width) / min(height, width) > 200:
        raise BerniniError(f"image of {width}×{height} px is too elongated for the planner (aspect ratio over 200); "
                           "crop it first.")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_grid(height: int, width: int) -> tuple[int, int, int]:
    """The ``image_grid_thw`` the Qwen image processor gives for an image of this size
    (one temporal patch: the image is repeated to 2 frames). 480×848 → (1, 12, 20)."""
    h, w = smart_resize(height, width)
    return 1, h // VIT_PATCH, w // VIT_PATCH


def video_grid(n_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The ``video_grid_thw`` of ``n_frames`` frames of this size (2 frames per temporal
    patch; an odd count is padded with the last frame, as the processor does)."""
    if n_frames < 1:
        raise BerniniError("a video for the planner needs at least one frame.")
    _, h, w = image_grid(height, width)
    return -(-int(n_frames) // VIT_TEMPORAL_PATCH), h, w


def video_vit_frame_count(total_frames: int, video_fps: float, fps: int, num_frames: int) -> int:
    """How many frames of a source clip the ViT sees: the official ``smart_video_nframes(
    fps=vit_fps, frame_factor=2, max_frames=num_frames, add_one=False)`` (the clip resampled
    to ``fps // 8``, rounded down to an even count, at least 2, at most ``num_frames // 2 * 2``).
    81 frames at 16 fps → 10."""
    return smart_video_nframes(total_frames, video_fps, vit_fps(fps), frame_factor=VIT_TEMPORAL_PATCH,
                               max_frames=num_frames, add_one=False)


def video_vit_frame_indices(total_frames: int, video_fps: float, fps: int, num_frames: int) -> list[int]:
    """The source frame indices behind ``video_vit_frame_count`` (the official reader samples
    the uncapped count evenly over the clip and keeps the first ones)."""
    count = video_vit_frame_count(total_frames, video_fps, fps, num_frames)
    return frame_indices(total_frames, video_fps, vit_fps(fps), count, frame_factor=VIT_TEMPORAL_PATCH,
                         add_one=False)


def target_item(task: str, num_frames: int, height: int, width: int, first_video: VisualItem | None = None,
                *, fps: int = 16) -> VisualItem:
    """The target placeholder's grid (docs/official_behaviour.md §3.2): one frame → a black image of ``height × width``;
    several → the first source video again when there is one (so v2v's target grid equals
    its source's), else a black video of ``num_frames`` frames at ``fps`` (FakeVideoReader)
    sampled at the ViT rate. Its pixels never matter (the mask token overwrites them)."""
    spec = get_task(task)
    if spec.single_frame and num_frames != 1:
        raise BerniniError(f"task {task!r} renders one frame but num_frames is {num_frames}; set num_frames to 1.")
    if num_frames < 1:
        raise BerniniError(f"num_frames is {num_frames}; it must be at least 1.")
    if num_frames == 1:
        return VisualItem("image", image_grid(height, width))
    if first_video is not None:
        if first_video.kind != "video":
            raise ValueError("first_video must be a video item")
        return VisualItem("video", first_video.grid_thw)
    frames = video_vit_frame_count(num_frames, fps, fps, num_frames)
    return VisualItem("video", video_grid(frames, height, width))


# --------------------------------------------------------------------------- pixels

def _to_uint8_hwc(array, what: str) -> np.ndarray:
    """PIL, uint8 or float 0..1 (numpy / torch) → uint8 numpy, floats rounded to 8 bit (as media does)."""
    if isinstance(array, Image.Image):
        return media.pil_to_rgb(array, what)
    return media.to_uint8(array, what)


def open_image_for_vit(path) -> Image.Image:
    """An image file as the official ViT side reads it: it hands the path to the processor,
    whose loader applies the EXIF orientation and converts to RGB (the VAE side does not
    apply EXIF, see media.load_image)."""
    from PIL import ImageOps

    path = Path(path)
    if path.is_dir():
        raise BerniniError(f"{str(path)!r} is a folder, not an image file; give the path of the image itself.")
    if not path.is_file():
        raise BerniniError(f"image file {str(path)!r} does not exist; check the path.")
    try:
        with Image.open(path) as img:
            return Image.fromarray(media.pil_to_rgb(ImageOps.exif_transpose(img), f"image {str(path)!r}"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BerniniError(f"image {str(path)!r} cannot be decoded ({exc}); use a PNG/JPEG/WebP image.") from exc


def _image_uint8(image) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        image = open_image_for_vit(image)
    rgb = _to_uint8_hwc(image, "planner image")
    if rgb.ndim == 4 and rgb.shape[0] == 1:
        rgb = rgb[0]
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise BerniniError(f"planner image must be [height, width, 3] RGB, got shape {tuple(rgb.shape)}.")
    return np.require(rgb, requirements=["C", "W"])  # torch.from_numpy wants a writable array


def video_uint8(frames) -> np.ndarray:
    video = _to_uint8_hwc(frames, "planner video frames")
    if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] == 0:
        raise BerniniError("planner video frames must be [frames, height, width, 3] RGB, "
                           f"got shape {tuple(video.shape)}.")
    return np.require(video, requirements=["C", "W"])


class TorchVitProcessor:
    """The Qwen2-VL image / video preprocessing as transformers runs it with torchvision, in
    plain torch: smart resize, ``resize`` of the uint8 frames (torchvision resizes uint8
    bicubic natively on the CPU, i.e. ``F.interpolate(uint8, bicubic, antialias=True)``;
    same size → untouched), the fused rescale+normalise ``(x - 255·mean) / (255·std)`` in
    float32, then the patch layout ``[t·h·w, 3·2·14·14]`` ordered 2×2-merge-block first."""

    def __init__(self, *, patch_size: int = VIT_PATCH, temporal_patch_size: int = VIT_TEMPORAL_PATCH,
                 merge_size: int = VIT_MERGE, image_mean: Sequence[float] = _CLIP_MEAN,
                 image_std: Sequence[float] = _CLIP_STD, rescale_factor: float = 1 / 255):
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        # transformers' _fuse_mean_std_and_rescale_factor, kept as its float32 products.
        self._mean = (torch.tensor(list(image_mean)) * (1.0 / rescale_factor)).view(-1, 1, 1)
        self._std = (torch.tensor(list(image_std)) * (1.0 / rescale_factor)).view(-1, 1, 1)

    @classmethod
    def from_folder(cls, mllm_dir) -> "TorchVitProcessor":
        cfg = json.loads((Path(mllm_dir) / "preprocessor_config.json").read_text(encoding="utf-8"))
        keys = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "rescale_factor")
        return cls(**{k: cfg[k] for k in keys if k in cfg})

    def _frames(self, frames_tchw: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        _, _, height, width = frames_tchw.shape
        factor = self.patch_size * self.merge_size
        new_h, new_w = smart_resize(height, width, factor=factor)
        if (new_h, new_w) != (height, width):
            frames_tchw = F.interpolate(frames_tchw, size=(new_h, new_w), mode="bicubic", align_corners=False,
                                        antialias=True)
        x = frames_tchw.to(torch.float32).sub_(self._mean).div_(self._std)
        if pad := -x.shape[0] % self.temporal_patch_size:
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        gt, gh, gw = x.shape[0] // tp, new_h // p, new_w // p
        x = x.view(gt, tp, 3, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, 3 * tp * p * p), (gt, gh, gw)

    def image(self, image_hwc: np.ndarray) -> tuple[Tensor, tuple[int, int, int]]:
        # One frame; the temporal padding repeats it to fill the temporal patch, as the processor does.
        return self._frames(torch.from_numpy(image_hwc).permute(2, 0, 1)[None].contiguous())

    def video(self, frames_thwc: np.ndarray) -> tuple[Tensor, tuple[int, int, int]]:
        return self._frames(torch.from_numpy(frames_thwc).permute(0, 3, 1, 2).contiguous())


def _torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # a broken torchvision install counts as missing
        return False
    return True


def load_vit_processor(mllm_dir):
    """The planner's vision preprocessor for an ``mllm/`` folder: transformers'
    ``AutoProcessor`` when torchvision is installed (what the official runs), else
    ``TorchVitProcessor`` built from its ``preprocessor_config.json``."""
    mllm_dir = Path(mllm_dir)
    if not (mllm_dir / "preprocessor_config.json").is_file():
        raise BerniniError(f"{str(mllm_dir)!r} has no preprocessor_config.json; point the planner at the mllm/ "
                           "folder of Bernini-Diffusers.")
    if not _torchvision_available():
        return TorchVitProcessor.from_folder(mllm_dir)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(mllm_dir), local_files_only=True)  # a local folder: never the network


def _as_tuple(grid: Tensor) -> tuple[int, int, int]:
    t, h, w = (int(v) for v in grid.reshape(-1, 3)[0])
    return t, h, w


def preprocess_image_for_vit(processor, image) -> tuple[Tensor, tuple[int, int, int]]:
    """``(pixel_values [t·h·w, 1176] float32, grid_thw)`` of one image at its original size
    (a path, PIL, or ``[H, W, 3]`` uint8 / float 0..1) with the planner's pixel bounds.
    ``processor``: a transformers Qwen2.5-VL processor (or its image processor) or a
    ``TorchVitProcessor``."""
    rgb = _image_uint8(image)
    if isinstance(processor, TorchVitProcessor):
        return processor.image(rgb)
    image_processor = getattr(processor, "image_processor", processor)
    with warnings.catch_warnings():
        # The official passes min_pixels / max_pixels, which transformers 4.57 requires (it ignores a call-time
        # `size` when the config names min/max pixels); 5.x prefers `size` and warns about the pair.
        warnings.simplefilter("ignore", FutureWarning)
        out = image_processor(images=[Image.fromarray(rgb)], size=dict(_VIT_SIZE), min_pixels=VIT_MIN_PIXELS,
                              max_pixels=VIT_MAX_PIXELS, return_tensors="pt")
    return out["pixel_values"], _as_tuple(out["image_grid_thw"])


def preprocess_video_for_vit(processor, frames_uint8) -> tuple[Tensor, tuple[int, int, int]]:
    """``(pixel_values_videos [t·h·w, 1176] float32, grid_thw)`` of frames ``[F, H, W, 3]``
    already sampled at the ViT rate (``video_vit_frame_indices``)."""
    video = video_uint8(frames_uint8)
    if isinstance(processor, TorchVitProcessor):
        return processor.video(video)
    video_processor = getattr(processor, "video_processor", processor)
    kwargs = {}
    if hasattr(video_processor, "cap_pixels_per_frame"):
        kwargs["cap_pixels_per_frame"] = False  # transformers ≥ 5.x option; the official (4.57) has no cap
    out = video_processor(videos=[video], size=dict(_VIT_SIZE), return_tensors="pt", **kwargs)
    return out["pixel_values_videos"], _as_tuple(out["video_grid_thw"])
